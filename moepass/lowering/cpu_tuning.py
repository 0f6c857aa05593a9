"""The CPU lowering's choices, measured on the machine that runs them (family ``cpu_experts``).

Two kinds of entries, both in :mod:`moepass.runtime.tuning`'s machine-keyed tables
(:mod:`moepass.lowering.cpu_choice` reads them on every call)::

    projection <dtype> <out>x<in> <plain|packed>        which kernel runs one expert's projection, per rows
        {"kernels": {"1": "gemv", "2": "packed", …}, "microseconds": {"1": {"token_major": 812.0, …}, …}}

    block <dtype> E=<E> H=<H> N1=<N1> I=<I> <[E,out,in]|[E,in,out]>[ bias] <plain|packed>
                                                        which path the whole experts op takes, per live rows
        {"k": 8, "points": [{"tokens": 1, "rows": 8, "path": "moepass",
                             "ms": {"moepass": 0.41, "grouped_mm": 0.52}}, …]}

The paths (:data:`~moepass.lowering.cpu_choice.PATHS`):

* ``moepass`` — the CPU lowering's own: one GEMM pair per expert hit, each
  projection run by the kernel its ``projection`` entry picks for the rows
  (token-major, weight-major, ATen's gemv, oneDNN's linear — AMX where the CPU
  has it — or oneDNN on pre-packed weights).
* ``grouped_mm`` — the path the model already had: the GEMMs of transformers'
  default experts implementation, ``torch._grouped_mm`` over the rows sorted
  by expert (on CPU a loop of ``mm`` per expert), around the same slot plan
  and combine.  A block whose model ran ``batched_mm``, a dense product or a
  module loop had a path no faster than this one.

At a row count where ``moepass`` does not beat ``grouped_mm`` on this
machine, the op runs ``grouped_mm`` — never slower than the model, decided on
the machine.  Empty slots cost no GEMM row on either path.

**Where the entries come from.**  :func:`prepare_block` (called by the
backend when it rewrites a block for the CPU) looks each entry up for this
machine (:func:`moepass.runtime.tuning.lookup`: the user's cache, then the
tables shipped in ``moepass/lowering/tables/cpu_experts/``); a missing one is
measured there and then on the block's own weights — the projection kernels
at 1–128 rows per expert (at most half the budget), then both paths at 1, 8,
64, 512 and 2048 tokens of random top-k routing (always at least the first:
the guard matters more than the last few percent of a kernel) — within a
budget (``options={"cpu_tuning": ...}``, ``$MOEPASS_TUNING``; default
:data:`DEFAULT_BUDGET` seconds per block shape), with a progress line, and
cached for every later compile and process.  What a budget left unmeasured
stays so (a partial entry is used as it is, and the report says so) until
``moepass tune --cpu`` measures everything ahead of time.  With tuning off
and no table for this machine, projections use the nearest shape of a table
measured on another machine (logged once, with what to run) and blocks take
the ``moepass`` path.  Choices are made on the fastest of the interleaved
rounds (:func:`moepass.runtime.tuning.best`); a kernel must beat token-major
by :data:`MARGIN` and in most rounds, and the moepass path must beat
``grouped_mm`` in most rounds, so noise does not pick.

**Candidates** (torch 2.13, checked 2026-12-07 on the 2-core AMD EPYC):

* oneDNN's linear and pre-packed linear (``onednn``, ``packed``): oneDNN
  dispatches to AMX tiles on CPUs with AMX-BF16 (Sapphire Rapids and later)
  and to AVX-512 BF16 elsewhere, so the same candidates measure AMX where it
  exists; ``machine.isa`` records whether it does.
* ``torch._grouped_mm`` on CPU works in float32, bfloat16 and float16 (not
  float64): a composite loop of ``mm`` per group, the ``grouped_mm`` path.
* Inductor's CPU GEMM template (``max_autotune_gemm_backends="CPP"``) is not a
  candidate: it compiles per (shape, rows) — about 3 s for one bfloat16
  [8, 2048] × [2048, 1536] product here, more than a first compile's whole
  budget for one projection — and wants the weight as a frozen constant, so
  a block of E experts would compile E kernels per row count; in that probe it
  was not faster than ATen's linear (5.4 ms against 3.9 ms, on the shared
  machine).

**For the next kernel family** (quantized experts): the same machinery takes
it — a :class:`moepass.runtime.tuning.Family`, keys naming what its choice
depends on, a ``measure(m)`` timing candidates through ``m.compare`` on the
block's own weights, and a reader like :mod:`moepass.lowering.cpu_choice`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from moepass.compiler.spec import ExpertsSpec
from moepass.lowering import cpu_choice
from moepass.lowering.cpu_choice import PATHS, TUNED_DTYPES, block_key, projection_key
from moepass.lowering.cpu_kernels import onednn_available, project
from moepass.runtime import tuning
from moepass.runtime.machine import current_machine
from moepass.runtime.progress import progress

__all__ = [
    "DEFAULT_BUDGET",
    "FULL_ROWS",
    "QUICK_ROWS",
    "TOKEN_POINTS",
    "BlockKernels",
    "measure_block",
    "measure_projection",
    "TuningSession",
    "prepare_block",
    "tune_block",
    "tune_shape",
    "tuning_session",
]

logger = logging.getLogger(__name__)

#: Seconds a first compile may spend measuring one block shape (``cpu_tuning="auto"``).
DEFAULT_BUDGET = 10.0
#: Rows per expert at which projections are measured on first compile (``moepass tune --cpu`` adds more).
QUICK_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
FULL_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
#: Tokens at which the two paths are compared.
TOKEN_POINTS = (1, 8, 64, 512, 2048)
#: A kernel must beat token-major by this much (and in most rounds) to displace it: noise does not pick.
MARGIN = 0.10
#: Weights touched per timed pass: past the last-level cache, as the experts of a real model are.
PASS_BYTES = 192 << 20


# --- measuring --------------------------------------------------------------------------------


def _pick(samples: dict[str, list[float]]) -> str:
    """The fastest kernel, unless token-major is within :data:`MARGIN` of it or it won fewer than 80%
    of the rounds against token-major."""
    times = {k: tuning.best(v) for k, v in samples.items()}
    best = min(times, key=times.get)
    if best == "token_major":
        return best
    base = samples["token_major"]
    wins = sum(a < b for a, b in zip(samples[best], base)) / max(len(base), 1)
    if times["token_major"] <= times[best] * (1 + MARGIN) or (len(base) >= 3 and wins < 0.8):
        return "token_major"
    return best


def _candidates(rows: int, dtype: torch.dtype, packed: bool) -> list[str]:
    names = ["token_major", "weight_major"]
    if rows == 1:
        names.append("gemv")
    if onednn_available() and dtype in (torch.float32, torch.bfloat16):
        names.append("onednn")
        if packed:
            names.append("packed")
    return names


def measure_projection(measurement: tuning.Measurement, weight: torch.Tensor, packed: bool,
                       rows_list=QUICK_ROWS, label: str = "") -> dict:
    """Time every kernel on ``weight`` [E, out, in] (the block's own experts, cycled so their weights
    come from memory as in the model) at each row count; the entry with the pick at each."""
    from moepass.lowering.cpu_packed import packed_matrix

    experts, out_features, in_features = weight.shape
    matrix_bytes = out_features * in_features * weight.element_size()
    cycle = max(1, min(experts, PASS_BYTES // max(matrix_bytes, 1)))
    g = torch.Generator().manual_seed(0)
    kernels, micro = {}, {}
    for rows in rows_list:
        names = _candidates(rows, weight.dtype, packed)
        xs = torch.randn(cycle, rows, in_features, generator=g).to(weight.dtype)
        out = torch.empty(cycle, rows, out_features, dtype=weight.dtype)
        # past a few dozen rows the GEMMs are compute-bound: fewer experts keep a pass short
        passes = max(1, min(cycle, int(2e9 // (2 * rows * out_features * in_features))))

        def run(kernel, passes=passes, xs=xs, out=out):
            for e in range(passes):
                matrix = packed_matrix(weight, e) if kernel == "packed" else None
                project(kernel, xs[e], out[e], weight[e], None, False, matrix)

        samples = measurement.compare(
            f"{label} rows {rows}", {k: functools.partial(run, k) for k in names},
            cost_hint=passes * (matrix_bytes + 2 * rows * out_features * in_features / 20),
        )
        if samples is None:
            continue
        samples = {k: [s / passes for s in v] for k, v in samples.items()}
        kernels[str(rows)] = _pick(samples)
        micro[str(rows)] = {k: round(tuning.best(v) * 1e6, 1) for k, v in samples.items()}
    return {"kernels": kernels, "microseconds": micro}


def _routing(tokens: int, experts: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    top, ids = logits.topk(k, dim=-1)
    return ids, top.softmax(dim=-1).to(dtype)


def measure_block(measurement: tuning.Measurement, spec: ExpertsSpec, weights: dict[str, Any], top_k: int,
                  key: str, prepack: str, token_points=TOKEN_POINTS) -> dict:
    """Time both paths of the whole experts op on the block's weights at each token count."""
    from moepass.lowering.cpu import experts_forward

    w1, w2, b1, b2 = (weights.get(n) for n in ("w1", "w2", "b1", "b2"))
    dtype = w1.dtype
    g = torch.Generator().manual_seed(1)
    points = []
    for tokens in token_points:
        x = torch.randn(tokens, spec.hidden_size, generator=g).to(dtype)
        ids, slot_weights = _routing(tokens, spec.num_experts, top_k, dtype, tokens)
        runs = {
            path: functools.partial(experts_forward, x, ids, slot_weights, w1, w2, b1, b2, spec, prepack, path)
            for path in PATHS
        }
        flops = 2 * tokens * top_k * (w1.shape[1] * w1.shape[2] + w2.shape[1] * w2.shape[2])
        with torch.no_grad():
            samples = measurement.compare(f"{key} tokens {tokens}", runs, cost_hint=flops / 20 + w1.numel() * w1.element_size())
        if samples is None:
            continue
        times = {p: tuning.best(v) for p, v in samples.items()}
        wins = sum(a < b for a, b in zip(samples["moepass"], samples["grouped_mm"])) / len(samples["moepass"])
        faster = times["moepass"] < times["grouped_mm"] and (len(samples["moepass"]) < 3 or wins >= 0.6)
        points.append({
            "tokens": tokens, "rows": tokens * top_k, "path": "moepass" if faster else "grouped_mm",
            "ms": {p: round(t * 1e3, 4) for p, t in times.items()}, "moepass_wins": round(wins, 2),
        })
    return {"k": top_k, "points": points}


# --- the backend's entry point ----------------------------------------------------------------


@dataclass
class BlockKernels:
    """What the CPU lowering will run for one block on this machine, and why (for the report)."""

    key: str
    #: Where the path table came from: ``measured`` (just now, ``seconds``), ``cache``, ``shipped``,
    #: ``override``, or ``none`` (not measured: every row count takes the moepass path).
    source: str
    machine: str
    points: list[dict] = field(default_factory=list)
    #: Projection kernels per rows, ``{"first": {"1": "gemv", …}, "second": …}``, and their source.
    projections: dict[str, dict[str, str]] = field(default_factory=dict)
    projection_source: str = ""
    seconds: float = 0.0
    complete: bool = True
    #: Why nothing was measured, when that is not the tuning setting (shown instead).
    note: str = ""

    def buckets(self) -> list[dict]:
        """Row-count ranges and the path each takes: ``[{"rows": (lo, hi or None), "path", "ms", "tokens"}]``."""
        if not self.points:
            return [{"rows": (1, None), "path": "moepass", "ms": {}, "tokens": None}]
        merged: list[dict] = []
        for index, point in enumerate(self.points):
            low = 1 if index == 0 else point["rows"]
            high = self.points[index + 1]["rows"] - 1 if index + 1 < len(self.points) else None
            merged.append({"rows": (low, high), "path": point["path"], "ms": point["ms"], "tokens": point["tokens"],
                           "wins": point.get("moepass_wins", 0.0)})
        return merged

    def lines(self) -> list[str]:
        """The report's lines: the path of each row-count range and the times that decided it."""
        origin = {
            "measured": f"measured on this machine at this compile ({self.seconds:.1f} s)",
            "cache": "measured on this machine earlier (cache)",
            "process": "measured on this machine earlier in this process",
            "shipped": "from the table shipped for this machine",
            "override": "from an override",
            "none": "not measured on this machine (tuning off): the moepass path at every row count",
        }.get(self.source, self.source)
        if self.note:
            origin = f"not measured: {self.note}"
        elif self.source == "none" and not self.complete:
            origin = ("not measured: the budget ran out before this block's paths "
                      "(`moepass tune --cpu` or a larger cpu_tuning budget measures them); the moepass path at every row count")
        lines = [f"CPU paths {origin}" + ("" if self.complete else "; partial: the budget ran out")]
        for bucket in self.buckets():
            low, high = bucket["rows"]
            span = f"rows {low}+" if high is None else f"rows {low}–{high}"
            if not bucket["ms"]:
                lines.append(f"  {span}: {bucket['path']}")
                continue
            ms = bucket["ms"]
            if bucket["path"] == "moepass":
                why = f"moepass {ms['moepass']:.3g} ms < grouped_mm {ms['grouped_mm']:.3g} ms"
            elif ms["moepass"] < ms["grouped_mm"]:
                why = (f"moepass {ms['moepass']:.3g} ms against grouped_mm {ms['grouped_mm']:.3g} ms, but faster in only "
                       f"{100 * bucket.get('wins', 0):.0f}% of the rounds: the model's path")
            else:
                why = f"grouped_mm {ms['grouped_mm']:.3g} ms ≤ moepass {ms['moepass']:.3g} ms: the model's path"
            tokens = f"{bucket['tokens']} token{'s' if bucket['tokens'] != 1 else ''}"
            lines.append(f"  {span} (measured at {tokens}): {bucket['path']} — {why}")
        for name, kernels in self.projections.items():
            if kernels:
                text = ", ".join(f"{k}@{r}" for r, k in sorted(kernels.items(), key=lambda item: int(item[0])))
                lines.append(f"  {name} projection kernels by rows per expert: {text}")
        return lines

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "key": self.key, "source": self.source, "machine": self.machine, "seconds": self.seconds,
            "complete": self.complete, "buckets": [dict(b, rows=list(b["rows"])) for b in self.buckets()],
            "projections": self.projections, "projection_source": self.projection_source,
        }


def _nothing(measurement: tuning.Measurement) -> dict:
    """The entry of a step the budget left no time for: nothing measured, marked incomplete."""
    return {"kernels": {}, "complete": False, "skipped": ["the first compile's budget ran out before this step"]}


def _projections_of(spec: ExpertsSpec, w1: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
    """The projections whose kernel choice is measured ([out, in] weights only)."""
    return {} if spec.transposed else {"first": w1, "second": w2}


def tune_block(spec: ExpertsSpec, weights: dict[str, Any], top_k: int, prepack: str, budget: float | None,
               description: str = "", rows_list=QUICK_ROWS, token_points=TOKEN_POINTS, force: bool = False,
               out: Path | None = None) -> BlockKernels:
    """This block's entries for this machine: looked up, or measured within ``budget`` seconds (None: never).

    ``weights``: the block's w1, w2 (stacked), b1, b2 — real tensors.
    ``force`` measures even what is found (``moepass tune --cpu``); ``out``
    writes the measured entries to that table file instead of the user's
    cache (the project's shipped tables).
    """
    from moepass.lowering.cpu_packed import packing_allowed

    w1, w2 = weights["w1"], weights["w2"]
    dtype = w1.dtype
    packed = not spec.transposed and packing_allowed(w1, prepack)
    n1 = w1.shape[2] if spec.transposed else w1.shape[1]
    key = block_key(spec, dtype, n1, packed)
    machine = current_machine()
    if dtype not in TUNED_DTYPES:
        return BlockKernels(key, "none", machine.describe(),
                            note=f"{str(dtype).removeprefix('torch.')} experts have no tuned kernels (the moepass path, "
                                 "token-major, at every row count)")
    label = description or key
    steps: list[tuple[str, str, Any]] = []
    for name, weight in _projections_of(spec, w1, w2).items():
        own = packing_allowed(weight, prepack)  # decided per weight, as the lowering does
        steps.append((name, projection_key(dtype, weight.shape[1], weight.shape[2], own),
                      functools.partial(measure_projection, weight=weight, packed=own, rows_list=rows_list,
                                        label=f"{label} {name}")))
    steps.append(("block", key, functools.partial(measure_block, spec=spec, weights=weights, top_k=top_k, key=label,
                                                  prepack=prepack, token_points=token_points)))
    found = {step_key: tuning.lookup(cpu_choice.FAMILY, step_key) for _, step_key, _ in steps}
    todo = [step for step in steps if budget is not None and (force or tuning.needs_measuring(found[step[1]], budget))]
    stopwatch = tuning.Measurement(math.inf)
    ran_out = False
    for name, step_key, measure in progress(todo, f"measuring CPU kernels for {label} (at most {budget or 0:.3g} s)",
                                            enabled=bool(todo)):
        # projections may use half the budget; the paths (the never-slower guard) always get the rest,
        # at least their first row count
        left = budget / 2 - stopwatch.elapsed() if name != "block" else max(budget - stopwatch.elapsed(), 1e-3)
        path = out / f"{machine.file_stem}.json" if out is not None else None
        if left <= 0:  # recorded as not measured, so later processes do not pay for it: `moepass tune --cpu` does
            ran_out = True
            found[step_key] = tuning.measure_and_store(cpu_choice.FAMILY, step_key, _nothing, 0.0, label, path=path)
            continue
        found[step_key] = tuning.measure_and_store(cpu_choice.FAMILY, step_key, measure, left, label, path=path)
    projections = {name: dict(found[k].entry["kernels"]) for name, k, _ in steps[:-1]
                   if found[k] and found[k].entry.get("kernels")}
    projection_source = found[steps[0][1]].source if len(steps) > 1 else ""
    block = found[key]
    if not block:
        return BlockKernels(key, "none", machine.describe(), projections=projections,
                            projection_source=projection_source or "none", seconds=stopwatch.elapsed() if todo else 0.0,
                            complete=not ran_out)
    return BlockKernels(
        key, block.source, machine.describe(), points=list(block.entry.get("points", [])), projections=projections,
        projection_source=projection_source, seconds=stopwatch.elapsed() if todo else 0.0,
        complete=bool(block.entry.get("complete", True)),
    )


@dataclass
class TuningSession:
    """``moepass tune --cpu`` compiling a model: every block shape is measured (again), once."""

    budget: float
    rows_list: tuple[int, ...] = FULL_ROWS
    token_points: tuple[int, ...] = TOKEN_POINTS
    out: Path | None = None
    #: Each block shape's result, by key (in the order first seen).
    results: dict[str, BlockKernels] = field(default_factory=dict)


_session: contextvars.ContextVar[TuningSession | None] = contextvars.ContextVar("moepass_cpu_tuning", default=None)


@contextlib.contextmanager
def tuning_session(session: TuningSession) -> Iterator[TuningSession]:
    """Within the block, compiles measure every block shape they rewrite for the CPU (once per shape)."""
    token = _session.set(session)
    try:
        yield session
    finally:
        _session.reset(token)


def prepare_block(spec: ExpertsSpec, weights: dict[str, Any], top_k: int, prepack: str, setting: Any,
                  description: str) -> BlockKernels:
    """The backend's call for a block rewritten for the CPU: its entries for this machine, measured within
    the budget ``setting`` gives (``cpu_tuning``: auto | off | seconds) when missing."""
    session = _session.get()
    if session is None:
        return tune_block(spec, weights, top_k, prepack, tuning.tuning_budget(setting, DEFAULT_BUDGET), description)
    from moepass.lowering.cpu_packed import packing_allowed

    n1 = weights["w1"].shape[2] if spec.transposed else weights["w1"].shape[1]
    key = block_key(spec, weights["w1"].dtype, n1, not spec.transposed and packing_allowed(weights["w1"], prepack))
    result = tune_block(spec, weights, top_k, prepack, session.budget, description, session.rows_list,
                        session.token_points, force=key not in session.results, out=session.out)
    session.results.setdefault(key, result)
    return result


def tune_shape(num_experts: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype, budget: float,
               rows_list=FULL_ROWS, token_points=TOKEN_POINTS, out: Path | None = None, prepack: str = "auto",
               seed: int = 0) -> BlockKernels:
    """Measure a gated [E, out, in] experts shape (random weights) ahead of time: ``moepass tune --cpu E,H,I,K``."""
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=num_experts, hidden_size=hidden, intermediate_size=inter)
    g = torch.Generator().manual_seed(seed)
    weights = {
        "w1": (torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5).to(dtype),
        "w2": (torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5).to(dtype),
        "b1": None, "b2": None,
    }
    with torch.no_grad():
        return tune_block(spec, weights, top_k, prepack, budget, f"E={num_experts} H={hidden} I={inter} top-{top_k} "
                          f"{str(dtype).removeprefix('torch.')}", rows_list, token_points, force=True, out=out)
