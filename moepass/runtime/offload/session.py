"""One offloading session: the store, the per-layer caches, the prefetcher and the counters.

A session belongs to one ``torch.compile(model, backend="adaptive_moe",
options={"offload": ...})`` call (every graph and recompile of it shares the
session) and lives until that compiled model is garbage-collected or
:func:`close_all` runs.  The ``moepass.experts`` op of an offloaded block
carries a key ``"<session>|<block path>"`` in its config; :func:`lookup`
resolves it at run time.

Per call of layer l (:meth:`OffloadSession.begin_call`)::

    allocation   after ``profile_calls`` calls of the first layer (cache="allocated"):
                 simulate each layer's trace, DP-split the budget, resize the caches
    trace        (experts needed, experts predicted for this call) while profiling
    prefetch     ids' = route_{l+1}(x_l @ W_gate_{l+1}ᵀ) with layer l+1's own policy,
                 experts ranked by routed weight, handed to the prefetch thread
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from moepass.runtime.offload.allocation import allocate_slots, even_split, miss_curve
from moepass.runtime.offload.cache import DirectLoader, LayerCache, LayerStats
from moepass.runtime.offload.options import OffloadOptions
from moepass.runtime.offload.prefetch import Prefetcher
from moepass.runtime.offload.store import ExpertReader, StoredBlock, aligned_buffer, expert_views, open_store

__all__ = ["OffloadError", "OffloadSession", "NextRouter", "session_for", "lookup", "close_all", "sessions"]

logger = logging.getLogger(__name__)


class OffloadError(RuntimeError):
    """Offloading cannot do what was asked (wrong store for the model, training, a GPU tensor...)."""


@dataclass
class NextRouter:
    """What predicting a block's experts from the previous block's input needs."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    #: The block's ``moepass.route`` config (its own policy) and tensors.
    route_config: str
    route_tensors: list[torch.Tensor]
    uses_x: bool
    #: Slots per token (k_max): the prefetch buffer size when there is no cache.
    depth: int


@dataclass
class _Profile:
    """The trace the allocation is computed from."""

    calls: dict[str, list[tuple[frozenset[int], frozenset[int]]]] = field(default_factory=dict)
    first_calls: int = 0
    tokens: int = 0
    done: bool = False


class OffloadSession:
    """The store, caches and prefetcher of one compiled model (see the module docstring)."""

    _ids = itertools.count()

    def __init__(self, options: OffloadOptions):
        self.options = options
        self.root, self.manifest = open_store(options.store)
        self.key = f"s{next(self._ids)}"
        self.reader = ExpertReader(self.root, self.manifest, io=options.io, verify=options.verify)
        self.order = self.manifest.paths
        self._next = dict(zip(self.order, self.order[1:]))
        self._routers: dict[str, NextRouter] = {}
        self._predicted: dict[str, frozenset[int]] = {}
        self._profile = _Profile()
        self._validating = 0
        self._lock = threading.Lock()
        self.closed = False
        self.total_slots = self._budget_slots()
        if options.allocation is not None and len(options.allocation) != len(self.order):
            raise OffloadError(
                f"offload 'allocation' has {len(options.allocation)} entries; the store {self.root} has "
                f"{len(self.order)} blocks ({', '.join(self.order)})"
            )
        self.caches: dict[str, LayerCache] = {
            block.path: LayerCache(block, self.reader, capacity)
            for block, capacity in zip(self.manifest.blocks, self._initial_split())
        }
        self.allocation_source = "explicit" if options.allocation is not None else (
            "even split" if options.cache in ("lru", "allocated") and self.total_slots else "none"
        )
        self.prefetcher = Prefetcher(f"moepass-prefetch-{self.key}") if options.prefetch else None
        if options.low_precision_below and not self.manifest.low:
            raise OffloadError(
                f"offload 'low_precision_below' needs lower-precision copies of the experts, and the store {self.root} "
                "has none: write it with `moepass offload --low-dtype int4` (write_model_store(..., low_dtype='int4'))"
            )
        #: block path -> (its low-precision copy, one read buffer, typed views of it)
        self._low: dict[str, tuple[StoredBlock, Any, dict]] = {}
        with _registry_lock:
            _sessions[self.key] = self
        logger.info("offload session %s: %s, %d cache slots, reads with %s", self.key, options.describe(),
                    self.total_slots, self.reader.io)

    # --- sizes ------------------------------------------------------------------

    def _budget_slots(self) -> int:
        if self.options.cache == "none":
            return 0
        stride = max(b.stride for b in self.manifest.blocks)
        return int(self.options.cache_bytes // stride)

    def _limits(self) -> list[int]:
        return [b.num_experts for b in self.manifest.blocks]

    def _initial_split(self) -> list[int]:
        if self.options.allocation is not None:
            return list(self.options.allocation)
        return even_split(self.total_slots, self._limits())

    @property
    def prefetch_buffers_only(self) -> bool:
        """No cache budget: with prefetch, each layer keeps k_max slots for prefetched experts."""
        return self.options.allocation is None and self.total_slots == 0

    # --- registration (compile time) --------------------------------------------

    def register_block(self, path: str, router: NextRouter) -> None:
        """Record how to predict ``path``'s experts (its gate, its policy's route op)."""
        if path not in self.caches:
            raise OffloadError(f"block {path} is not in the store {self.root}")
        self._routers[path] = router
        if self.prefetch_buffers_only and self.prefetcher is not None:
            cache = self.caches[path]
            if cache.capacity < router.depth:
                cache.resize(router.depth)

    @contextlib.contextmanager
    def validating(self) -> Iterator[None]:
        """Inside: offloaded experts calls read straight from the store, uncached and uncounted."""
        self._validating += 1
        try:
            yield
        finally:
            self._validating -= 1

    # --- run time -----------------------------------------------------------------

    def provider(self, path: str) -> LayerCache | DirectLoader:
        """Where ``path``'s experts come from in this call."""
        if self.closed:
            raise OffloadError(f"offload session {self.key} ({self.root}) is closed")
        if self._validating:
            return DirectLoader(self.manifest.block(path), self.reader)
        return self.caches[path]

    def begin_call(self, path: str, x: torch.Tensor, counts: list[int]) -> list[int]:
        """Start layer ``path``'s call on tokens ``x`` needing ``counts[e]`` rows per expert; returns the compute order."""
        needed = [e for e, c in enumerate(counts) if c]
        if self._validating:
            return needed
        tokens = int(x.shape[0])
        if self._profiling:
            self._profile_step(path, needed, tokens)
        order = self.caches[path].begin(needed, tokens)
        if self.prefetcher is not None:
            self._prefetch_next(path, x)
        return order

    @property
    def _profiling(self) -> bool:
        options = self.options
        return options.cache == "allocated" and options.allocation is None and self.total_slots > 0 and not self._profile.done

    def _first_registered(self) -> str | None:
        return next((p for p in self.order if p in self._routers), None)

    def _profile_step(self, path: str, needed: list[int], tokens: int) -> None:
        profile = self._profile
        if path == self._first_registered():
            if profile.first_calls >= self.options.profile_calls:
                self._reallocate()
                return
            profile.first_calls += 1
            profile.tokens += tokens
        profile.calls.setdefault(path, []).append((frozenset(needed), self._predicted.pop(path, frozenset())))

    def _reallocate(self) -> None:
        """Split the budget by the DP over each layer's simulated misses × bytes per miss.

        A miss costs its layer's expert bytes (one read from the same disk);
        the read times measured on a busy machine vary several-fold between
        layers for the same bytes, and weighting by them misallocated.
        """
        if self.prefetcher is not None:
            self.prefetcher.drain()
        costs = []
        for block in self.manifest.blocks:
            trace = self._profile.calls.get(block.path, [])
            curve = miss_curve(trace, block.num_experts, self.prefetcher is not None)
            costs.append([misses * block.stride for misses in curve])
        sizes = allocate_slots(costs, self.total_slots)
        for path, size in zip(self.order, sizes):
            self.caches[path].resize(size)
        self._profile.done = True
        self.allocation_source = (
            f"allocated (DP on {self._profile.first_calls} calls, {self._profile.tokens} tokens)"
        )
        logger.info("offload session %s: cache slots per layer %s", self.key, sizes)

    def _prefetch_next(self, path: str, x: torch.Tensor) -> None:
        target = self._next.get(path)
        router = self._routers.get(target) if target is not None else None
        if router is None:
            return
        stored = self.caches[target].block.num_experts  # ids past it are zero-computation experts: nothing to read
        experts = [e for e in predict_experts(router, x) if e < stored]
        self._predicted[target] = frozenset(experts)
        self.prefetcher.submit(self.caches[target], experts)

    def low_copy_wanted(self, path: str, expert: int, weight: float) -> bool:
        """HOBBIT: whether this call of ``path`` should use ``expert``'s lower-precision copy.

        Only on a miss (the full expert is neither resident nor being read) of
        an expert whose largest routing weight in the call is below
        ``low_precision_below``; never while validating.
        """
        below = self.options.low_precision_below
        if not below or self._validating or weight >= below or self.manifest.low_block(path) is None:
            return False
        return not self.caches[path].is_ready(expert)

    def low_copy(self, path: str, expert: int) -> tuple[StoredBlock, dict]:
        """Read ``expert``'s lower-precision copy into the layer's one buffer for it; (its block entry, views)."""
        entry = self._low.get(path)
        if entry is None:
            block = self.manifest.low_block(path)
            buffer = aligned_buffer(block.stride)
            entry = self._low[path] = (block, buffer, expert_views(block, buffer))
        block, buffer, views = entry
        got = self.reader.read(block, expert, buffer)
        stats = self.caches[path].stats
        stats.low_loads += 1
        stats.low_bytes_read += got
        return block, views

    # --- results ------------------------------------------------------------------

    def stats(self) -> list[LayerStats]:
        """A copy of each layer's counters, in store order."""
        return [LayerStats(**{k: v for k, v in vars(self.caches[p].stats).items()}) for p in self.order]

    def reset_stats(self) -> None:
        """Zero the counters (the caches keep their contents, now counted as loaded before)."""
        for path in self.order:
            self.caches[path].reset_stats()

    def report_lines(self) -> list[str]:
        """The per-layer table of the report."""
        from moepass.runtime.offload.report import offload_table

        return offload_table(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "store": str(self.root),
            "io": self.reader.io,
            "cache": self.options.cache,
            "cache_bytes": self.options.cache_bytes,
            "prefetch": self.options.prefetch,
            "allocation": self.allocation_source,
            "layers": [s.to_dict() for s in self.stats()],
        }

    def close(self) -> None:
        """Stop the prefetch thread, free the caches, close the store's files."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        if self.prefetcher is not None:
            self.prefetcher.close()
        for cache in self.caches.values():
            cache.free()
        self.reader.close()
        with _registry_lock:
            _sessions.pop(self.key, None)


def predict_experts(router: NextRouter, x: torch.Tensor) -> list[int]:
    """The experts ``router``'s block would pick for tokens ``x``, most routed weight first.

    Runs the block's own routing (its policy, so adaptive k decides how many
    experts each token needs) on its gate applied to ``x``; the global RNG
    is left untouched (a sampling policy must not shift the model's draws).
    """
    from moepass.runtime.route_capture import routes_not_captured

    num_experts = router.weight.shape[0]
    with torch.no_grad(), routes_not_captured(), torch.random.fork_rng(devices=[]):
        logits = F.linear(x.to(router.weight.dtype), router.weight, router.bias)
        ids, weights = torch.ops.moepass.route(
            logits, x if router.uses_x else None, router.route_tensors, router.route_config
        )
        flat_ids = ids.reshape(-1)
        kept = flat_ids < num_experts
        mass = torch.zeros(num_experts, dtype=torch.float64)
        mass.index_add_(0, flat_ids[kept], weights.reshape(-1)[kept].double())
        count = torch.bincount(flat_ids[kept], minlength=num_experts)
    ranked = sorted((e for e in range(num_experts) if count[e] > 0), key=lambda e: (-float(mass[e]), e))
    return ranked


# --- the registry -------------------------------------------------------------------

_registry_lock = threading.Lock()
_sessions: dict[str, OffloadSession] = {}
#: id(torch.compile wrapper) -> (weak reference to it, {store options: session})
_by_compile: dict[int, tuple[weakref.ref, dict[OffloadOptions, OffloadSession]]] = {}
_by_options: dict[OffloadOptions, OffloadSession] = {}


def sessions() -> list[OffloadSession]:
    """The open sessions."""
    with _registry_lock:
        return list(_sessions.values())


def lookup(key: str) -> tuple[OffloadSession, str]:
    """The session and block path an experts op's ``offload`` key names."""
    session_key, _, path = key.partition("|")
    with _registry_lock:
        session = _sessions.get(session_key)
    if session is None:
        raise OffloadError(
            f"offload session {session_key} of block {path} is closed: compile the model again"
        )
    return session, path


def session_for(options: OffloadOptions, create: bool = True) -> OffloadSession | None:
    """The session of the ``torch.compile`` call being compiled (made on first use).

    Graphs of one ``torch.compile`` call share a session; the session closes
    when that compiled model is garbage-collected.  Outside a
    ``torch.compile`` call (the backend called directly), sessions are shared
    per options until :func:`close_all`.
    """
    from moepass.runtime.report import _compile_session

    wrapper = _compile_session()
    with _registry_lock:
        if wrapper is not None:
            entry = _by_compile.get(id(wrapper))
            if entry is None or entry[0]() is not wrapper:
                entry = (weakref.ref(wrapper), {})
                _by_compile[id(wrapper)] = entry
            table = entry[1]
        else:
            table = _by_options
        session = table.get(options)
        if session is not None and not session.closed:
            return session
    if not create:
        return None
    session = OffloadSession(options)
    with _registry_lock:
        table[options] = session
    if wrapper is not None:
        weakref.finalize(wrapper, session.close)
    return session


def close_all() -> None:
    """Close every session (stops their prefetch threads)."""
    for session in sessions():
        session.close()
    with _registry_lock:
        _by_compile.clear()
        _by_options.clear()


atexit.register(close_all)
