"""Machine-keyed tables of measured choices: shipped, or measured on first use and cached on disk.

Any choice that depends on the machine (which CPU kernel runs an expert
projection, which path a block takes at a row count, which experts layout an
ONNX Runtime export gets; next, which int8/int4 kernel runs quantized experts)
is one *family* of entries in tables keyed by :class:`~moepass.runtime.machine.Machine`::

    Family("cpu_experts", version=1, shipped=<package folder>)
      └─ key   what the choice depends on besides the machine: "block bfloat16 E=128 H=2048 I=768 k=8 ..."
           └─ entry   what was measured and chosen (any JSON object; the family reads it)

    lookup(family, key)      the entry for this machine, first found of:
                               1. entries set by override_entries() (tests, experiments)
                               2. the user's cache   <cache_dir()>/tuning/<family>/<machine.file_stem>.json
                               3. the shipped table  <family.shipped>/<machine.file_stem>.json
                                  (used only when its recorded machine equals this one)
    store(family, key, entry)  into the user's cache: read, merge, write a temporary file and
                               os.replace it (under a lock file), so a reader in another process sees
                               the old table or the new one, never half of one
    obtain(family, key, measure, budget, description)
                             lookup(); else, when tuning is allowed, measure(Measurement(budget)) and
                             store() what it returns — the bounded measurement on first use

The cache folder is ``$MOEPASS_CACHE_DIR``, else ``$XDG_CACHE_HOME/moepass``,
else ``~/.cache/moepass``.  ``$MOEPASS_TUNING`` sets whether a missing entry
is measured: ``auto`` (the default: each family's own budget), ``off`` (never:
the family falls back to its tables from other machines or a heuristic, and
says so), or a number of seconds (the budget per measurement).
``$MOEPASS_SHIPPED_TABLES=off`` ignores the tables shipped with moepass (a
machine with no table: what ``benchmarks/tuning_cpu.py`` measures).

**Measuring.**  A family's ``measure`` function gets a :class:`Measurement`
and calls :meth:`Measurement.compare` once per step (a row count, a token
count): the candidates are timed interleaved (A, B, C, A, B, C …; each
candidate's samples come back), and a step that the remaining budget cannot
hold is skipped and listed in :attr:`Measurement.skipped` — the budget is
checked before each step against a prediction from the steps already timed,
so a measurement overruns it by at most one step's warm-up.  Tests make
measurement deterministic with :func:`measurement_override` (a fake timer that
returns chosen times, and a fake clock), so they assert keying, caching,
reuse across processes, bounds and the choice logic — never a timing.

**A new family** (the quantized-experts kernels, say) needs only: a
``Family`` with its shipped folder (or None), keys that name everything its
choice depends on besides the machine, a ``measure(m: Measurement) -> dict``
that times its candidates through ``m.compare`` and returns the entry (set
``"complete": False`` when steps were skipped: it is used as it is, and a
forced measurement such as ``moepass tune --cpu`` completes it), and code that reads the
entry back with :func:`lookup` (cheap: files are read once per process and
re-read only when they change; :func:`generation` changes whenever any table
does, for callers that cache decisions).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from moepass.runtime.machine import Machine, current_machine

__all__ = [
    "Family",
    "Lookup",
    "Measurement",
    "TuningError",
    "cache_dir",
    "generation",
    "lookup",
    "machine_entries",
    "forget_measured",
    "measure_and_store",
    "measurement_override",
    "best",
    "needs_measuring",
    "obtain",
    "other_machine_tables",
    "override_entries",
    "store",
    "table_path",
    "tuning_budget",
]

logger = logging.getLogger(__name__)

#: Environment variables (see the module docstring).
CACHE_ENV, TUNING_ENV, SHIPPED_ENV = "MOEPASS_CACHE_DIR", "MOEPASS_TUNING", "MOEPASS_SHIPPED_TABLES"


class TuningError(ValueError):
    """A bad tuning setting (the message names the valid ones)."""


@dataclass(frozen=True)
class Family:
    """A kind of machine-dependent choice."""

    name: str
    #: Bumped when entries change meaning; a table written for another version is ignored.
    version: int = 1
    #: The folder of tables the project measured and ships, one file per machine (None: none).
    shipped: Path | None = None


@dataclass
class Lookup:
    """What :func:`lookup` found: the entry (None: nothing), where it came from and the file."""

    entry: dict | None
    #: ``override`` | ``cache`` | ``shipped`` | ``measured`` (just now) | ``process`` (measured earlier
    #: in this process) | "" (nothing)
    source: str = ""
    path: Path | None = None

    def __bool__(self) -> bool:
        return self.entry is not None


def cache_dir() -> Path:
    """The user's cache folder for moepass (``$MOEPASS_CACHE_DIR`` or the XDG cache home)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moepass"


def table_path(family: Family, machine: Machine | None = None) -> Path:
    """The cache file of ``family`` for ``machine`` (default: this one)."""
    machine = machine or current_machine()
    return cache_dir() / "tuning" / family.name / f"{machine.file_stem}.json"


# --- reading ----------------------------------------------------------------------------------

_lock = threading.RLock()
#: path → (mtime_ns, size, parsed table or None)
_files: dict[Path, tuple[int, int, dict | None]] = {}
_generation = 0
_overrides: list[tuple[str, dict[str, dict]]] = []
#: (family, machine file stem, key) → entries measured in this process (found even when the cache is read-only)
_memo: dict[tuple[str, str, str], dict] = {}


def generation() -> int:
    """A number that changes whenever a table is stored or an override starts or ends."""
    return _generation


def _bump() -> None:
    global _generation
    with _lock:
        _generation += 1


def _read_table(path: Path, family: Family) -> dict | None:
    """The table in ``path`` (None when missing, unreadable or of another family version); parsed once
    per change of the file."""
    try:
        stat = path.stat()
    except OSError:
        return None
    with _lock:
        known = _files.get(path)
    if known is not None and known[:2] == (stat.st_mtime_ns, stat.st_size):
        data = known[2]
    else:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError("no 'entries' object")
            Machine.from_dict(data["machine"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring the tuning table %s: %s", path, error)
            data = None
        with _lock:
            _files[path] = (stat.st_mtime_ns, stat.st_size, data)
    if data is not None and (data.get("family") != family.name or data.get("version") != family.version):
        logger.debug("ignoring %s: written for %s version %s (this moepass reads version %d)",
                     path, data.get("family"), data.get("version"), family.version)
        return None
    return data


def _shipped_path(family: Family, machine: Machine) -> Path | None:
    if family.shipped is None or os.environ.get(SHIPPED_ENV, "on") == "off":
        return None
    return family.shipped / f"{machine.file_stem}.json"


def lookup(family: Family, key: str, machine: Machine | None = None) -> Lookup:
    """The entry ``key`` of ``family`` for ``machine`` (default: this one); see the module docstring."""
    for name, entries in reversed(_overrides):
        if name == family.name and key in entries:
            return Lookup(entries[key], "override")
    machine = machine or current_machine()
    memo = _memo.get((family.name, machine.file_stem, key))
    if memo is not None:
        return Lookup(memo, "process")
    cached = table_path(family, machine)
    table = _read_table(cached, family)
    if table is not None and Machine.from_dict(table["machine"]) == machine and key in table["entries"]:
        return Lookup(table["entries"][key], "cache", cached)
    shipped = _shipped_path(family, machine)
    if shipped is not None:
        table = _read_table(shipped, family)
        if table is not None and Machine.from_dict(table["machine"]) == machine and key in table["entries"]:
            return Lookup(table["entries"][key], "shipped", shipped)
    return Lookup(None)


def machine_entries(family: Family, machine: Machine | None = None) -> dict[str, dict]:
    """Every entry of ``family`` for ``machine`` (default: this one): shipped, overlaid by the cache."""
    machine = machine or current_machine()
    merged: dict[str, dict] = {}
    for path in (_shipped_path(family, machine), table_path(family, machine)):
        table = _read_table(path, family) if path is not None else None
        if table is not None and Machine.from_dict(table["machine"]) == machine:
            merged.update(table["entries"])
    merged.update({key: entry for (name, stem, key), entry in _memo.items() if name == family.name
                   and stem == machine.file_stem})
    return merged


def other_machine_tables(family: Family) -> list[tuple[Machine, dict[str, dict], Path]]:
    """Every shipped table of ``family`` (any machine): the fallback when this machine has none."""
    found = []
    if family.shipped is not None and family.shipped.is_dir() and os.environ.get(SHIPPED_ENV, "on") != "off":
        for path in sorted(family.shipped.glob("*.json")):
            table = _read_table(path, family)
            if table is not None:
                found.append((Machine.from_dict(table["machine"]), table["entries"], path))
    return found


@contextlib.contextmanager
def override_entries(family: Family | str, entries: Mapping[str, dict]) -> Iterator[None]:
    """Within the block, :func:`lookup` finds ``entries`` (key → entry) first (tests, experiments)."""
    name = family if isinstance(family, str) else family.name
    item = (name, dict(entries))
    with _lock:
        _overrides.append(item)
    _bump()
    try:
        yield
    finally:
        with _lock:
            _overrides.remove(item)
        _bump()


# --- writing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` + ".lock" (POSIX); elsewhere a no-op (os.replace stays atomic)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent writers may lose an update, never corrupt a file
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def store(family: Family, key: str, entry: dict, machine: Machine | None = None, path: Path | None = None) -> Path:
    """Add (or replace) ``entry`` under ``key`` in ``family``'s table for ``machine``, atomically.

    ``path`` writes elsewhere than the user's cache (``moepass tune --cpu --out``,
    the project's shipped tables).  Other entries of the file are kept.
    """
    machine = machine or current_machine()
    path = Path(path) if path is not None else table_path(family, machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path):
        table = _read_table(path, family)
        if table is None or Machine.from_dict(table["machine"]) != machine:
            table = {"family": family.name, "version": family.version, "machine": machine.to_dict(),
                     "about": machine.describe(), "entries": {}}
        table = dict(table, entries={**table["entries"], key: entry})
        text = json.dumps(table, indent=1, sort_keys=True) + "\n"
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
            tmp.write(text)
        os.replace(tmp.name, path)
    _bump()
    return path


# --- measuring --------------------------------------------------------------------------------

#: A fake timer: (step label, candidate names) → seconds per candidate (one sample each).
Timer = Callable[[str, list[str]], Mapping[str, float]]
_fake: list[tuple[Timer | None, Callable[[], float] | None]] = []


@contextlib.contextmanager
def measurement_override(timer: Timer | None = None, clock: Callable[[], float] | None = None) -> Iterator[None]:
    """Within the block, measurements use ``timer`` instead of running the candidates (and ``clock`` for
    the budget): tests get deterministic choices and can drive the budget."""
    _fake.append((timer, clock))
    try:
        yield
    finally:
        _fake.remove((timer, clock))


@dataclass
class Measurement:
    """A bounded measurement: steps of interleaved comparisons within ``budget`` seconds."""

    budget: float
    rounds: int = 5
    #: Labels of the steps skipped because the budget could not hold them.
    skipped: list[str] = field(default_factory=list)
    #: Labels of the steps measured.
    measured: list[str] = field(default_factory=list)
    _timer: Timer | None = None
    _clock: Callable[[], float] = time.perf_counter
    _started: float = 0.0
    #: Seconds per unit of cost_hint, from the steps timed so far (None: no prediction yet).
    _rate: float | None = None

    def __post_init__(self) -> None:
        if _fake:
            timer, clock = _fake[-1]
            self._timer = timer
            if clock is not None:
                self._clock = clock
        self._started = self._clock()

    def elapsed(self) -> float:
        """Seconds since the measurement began."""
        return self._clock() - self._started

    def remaining(self) -> float:
        """Seconds of budget left."""
        return self.budget - self.elapsed()

    def predict(self, cost_hint: float, candidates: int) -> float | None:
        """Seconds one round of ``candidates`` of cost ``cost_hint`` should take (None: unknown yet)."""
        return None if self._rate is None else self._rate * cost_hint * candidates

    def compare(self, label: str, candidates: Mapping[str, Callable[[], object]],
                cost_hint: float | None = None,
                before: Callable[[], object] | None = None) -> dict[str, list[float]] | None:
        """Seconds per call of each candidate (all samples), timed interleaved; None when skipped.

        ``cost_hint`` (any unit proportional to a call's time, e.g. FLOPs or
        bytes read) lets the budget check predict this step from earlier ones.
        ``before`` runs untimed before every call (e.g. evicting the caches, so
        that a kernel is timed on weights read from memory, as a model's next
        layer reads them).
        """
        names = list(candidates)
        left = self.remaining()
        predicted = self.predict(cost_hint, len(names)) if cost_hint else None
        if left <= 0 or (predicted is not None and predicted > left):
            self.skipped.append(label)
            return None
        if self._timer is not None:
            before = self._clock()
            faked = self._timer(label, names)
            times = {name: [float(faked[name])] for name in names}
            self._learn(cost_hint, len(names), self._clock() - before)
            self.measured.append(label)
            return times
        samples: dict[str, list[float]] = {name: [] for name in names}
        started = self._clock()
        for name in names:  # warm-up (first touch, packing, allocator), also the first estimate
            if before is not None:
                before()
            candidates[name]()
        warm = self._clock() - started
        rounds = self.rounds if warm * self.rounds <= max(self.remaining(), 0.0) else max(1, int(self.remaining() / max(warm, 1e-9)))
        for round_index in range(rounds):
            # each round starts one candidate later: every candidate follows every other one equally often, so
            # what one leaves behind (evicted caches, dirty lines to write back) does not always land on the same
            # successor
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                if before is not None:
                    before()
                t0 = time.perf_counter()
                candidates[name]()
                samples[name].append(time.perf_counter() - t0)
        self._learn(cost_hint, len(names), (self._clock() - started) / (rounds + 1))
        self.measured.append(label)
        return samples

    def _learn(self, cost_hint: float | None, count: int, seconds_per_round: float) -> None:
        if cost_hint:
            rate = seconds_per_round / (cost_hint * count)
            self._rate = rate if self._rate is None else max(self._rate * 0.5, rate)


def best(samples: list[float]) -> float:
    """The statistic choices are made on: the fastest of a candidate's interleaved rounds.

    Other work on the machine only ever adds time to a round, so on a shared
    machine the fastest round is the closest to what the kernel costs (the
    ``timeit`` convention); interleaving puts the same disturbances on every
    candidate.
    """
    return min(samples)


def forget_measured() -> None:
    """Drop the entries measured in this process from memory (the files stay): tests of reuse from disk."""
    with _lock:
        _memo.clear()
        _files.clear()
    _bump()


def tuning_budget(setting: Any, default: float) -> float | None:
    """Seconds a missing entry may be measured for (None: never), from an option and ``$MOEPASS_TUNING``.

    ``setting``: ``"auto"`` (defer to ``$MOEPASS_TUNING``, itself ``auto`` →
    ``default``), ``"off"`` / False (never), or seconds (> 0).
    """
    for value, where in ((setting, "tuning setting"), (os.environ.get(TUNING_ENV, "auto"), f"${TUNING_ENV}")):
        if value is None or value == "auto":
            continue
        if value is False or value == "off":
            return None
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise TuningError(f"{where} {value!r}: expected 'auto', 'off' or seconds (> 0)") from None
        if not seconds > 0 or math.isinf(seconds):
            raise TuningError(f"{where} {value!r}: seconds must be positive and finite")
        return seconds
    return default


def needs_measuring(found: Lookup, budget: float | None) -> bool:
    """Whether :func:`obtain` would measure: nothing found, and a budget.

    An entry an earlier measurement left incomplete (``"complete": False``) is
    used as it is: measuring it again on every first compile would cost every
    process the budget for a shape that never fits it.  A forced measurement
    (``moepass tune --cpu``) completes it.
    """
    return budget is not None and not found


def measure_and_store(family: Family, key: str, measure: Callable[[Measurement], dict], budget: float,
                      description: str = "", path: Path | None = None) -> Lookup:
    """Run ``measure`` within ``budget`` seconds and store its entry (in ``path``, default the user's cache).

    The entry gets ``date``, ``seconds`` and ``complete`` (False when steps
    were skipped, listed in ``skipped``).  A cache that cannot be written
    keeps the entry in memory for this process, with a warning.
    """
    measurement = Measurement(budget)
    logger.info("measuring %s on this machine (%s), at most %.3g s", key, current_machine().describe(), budget)
    entry = dict(measure(measurement))
    entry.setdefault("complete", not measurement.skipped)
    entry.update(date=datetime.date.today().isoformat(), seconds=round(measurement.elapsed(), 3))
    if measurement.skipped:
        entry["skipped"] = list(measurement.skipped)
    with _lock:
        _memo[(family.name, current_machine().file_stem, key)] = entry
    try:
        written = store(family, key, entry, path=path)
    except OSError as error:
        if path is not None:
            raise
        logger.warning("could not cache the measurement of %s (%s): it will be measured again next time", key, error)
        written = None
    _bump()
    return Lookup(entry, "measured", written)


def obtain(family: Family, key: str, measure: Callable[[Measurement], dict], budget: float | None,
           description: str = "") -> Lookup:
    """The entry ``key`` for this machine: looked up, else measured within ``budget`` and stored.

    ``budget`` None never measures; an entry found is used as it is, complete or not.
    """
    found = lookup(family, key)
    if not needs_measuring(found, budget):
        return found
    return measure_and_store(family, key, measure, budget, description)
