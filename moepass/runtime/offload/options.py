"""The backend's ``offload`` option.

::

    options={"offload": {"store": "experts/", "cache_gb": 2.0, "prefetch": True}}
    options={"offload": "experts/"}                  # the store alone: no cache, prefetch on

============== ================================================================ ==============
key            meaning                                                          default
============== ================================================================ ==============
store          folder written by ``moepass offload`` (or :func:`write_store`)   required
cache_gb       fast-memory budget for cached experts, in 10⁹ bytes              0
cache_bytes    the same in bytes (give one of the two)
cache          how the budget is split over layers: ``allocated`` (AdapMoE:     ``allocated``
               a DP over measured per-layer miss costs), ``lru`` (even split),
               ``none`` (no cache; with prefetch each layer keeps top-k slots
               for the prefetched experts)
allocation     explicit slots per block, in store order (overrides the split)   —
prefetch       read layer l+1's predicted experts while layer l computes        on without a
               (default: on without a cache budget, off with one — measured    cache, off
               on the 2-core CPU, the worker's extra reads and the core it     with one
               takes cost more than the waits it hides once a cache keeps the
               hot experts: benchmarks/RESULTS.md, offload_cpu)
profile_calls  calls of the first block (a decode step is one) run with the    32
               even split before ``allocated`` measures and re-splits
io             ``auto`` | ``direct`` (O_DIRECT) | ``drop_cache`` (read, then    ``auto``
               drop the pages) | ``page_cache`` (let the OS cache the store)
verify         check every load's CRC-32 against the manifest                   ``False``
low_precision_ HOBBIT: on a cache miss of an expert whose largest routing      ``0`` (off)
below          weight in the call is below this, read its lower-precision
               copy (a store written with ``low_dtype``) instead of the full
               expert, use it once, do not cache it
============== ================================================================ ==============
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from moepass.runtime.offload.store import IO_MODES

__all__ = ["OffloadOptions", "OffloadOptionsError", "CACHE_MODES"]

CACHE_MODES = ("allocated", "lru", "none")


class OffloadOptionsError(ValueError):
    """A bad ``offload`` option; the message says which and what is valid."""


@dataclass(frozen=True)
class OffloadOptions:
    """Parsed ``offload`` option (see the module docstring)."""

    store: str
    cache_bytes: int = 0
    cache: str = "allocated"
    allocation: tuple[int, ...] | None = None
    prefetch: bool = True
    profile_calls: int = 32
    io: str = "auto"
    verify: bool = False
    #: HOBBIT: misses of experts whose largest routing weight in the call is below this read the
    #: store's lower-precision copy (0: off).
    low_precision_below: float = 0.0

    @classmethod
    def parse(cls, value: Any) -> OffloadOptions:
        """From a store path, a dict of the keys above, or an OffloadOptions."""
        if isinstance(value, OffloadOptions):
            return value
        if isinstance(value, (str, Path)):
            value = {"store": str(value)}
        if not isinstance(value, Mapping):
            raise OffloadOptionsError(
                f"option 'offload' must be a store folder or a dict with 'store', got {type(value).__name__}"
            )
        data = dict(value)
        valid = ("store", "cache_gb", "cache_bytes", "cache", "allocation", "prefetch", "profile_calls", "io", "verify",
                 "low_precision_below")
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise OffloadOptionsError(
                f"unknown offload option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
            )
        if "store" not in data:
            raise OffloadOptionsError("option 'offload' needs 'store': the folder written by `moepass offload`")
        store = data.pop("store")
        if not isinstance(store, (str, Path)) or not str(store):
            raise OffloadOptionsError(f"offload 'store' must be a folder path, got {store!r}")
        if "cache_gb" in data and "cache_bytes" in data:
            raise OffloadOptionsError("give offload 'cache_gb' or 'cache_bytes', not both")
        cache_bytes = 0
        if "cache_gb" in data:
            gigabytes = data.pop("cache_gb")
            if isinstance(gigabytes, bool) or not isinstance(gigabytes, (int, float)) or gigabytes < 0:
                raise OffloadOptionsError(f"offload 'cache_gb' must be a number ≥ 0, got {gigabytes!r}")
            cache_bytes = int(gigabytes * 1e9)
        if "cache_bytes" in data:
            cache_bytes = data.pop("cache_bytes")
            if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
                raise OffloadOptionsError(f"offload 'cache_bytes' must be an integer ≥ 0, got {cache_bytes!r}")
        cache = data.pop("cache", "allocated")
        if cache not in CACHE_MODES:
            raise OffloadOptionsError(f"unknown offload cache {cache!r}; valid: {', '.join(CACHE_MODES)}")
        allocation = data.pop("allocation", None)
        if allocation is not None:
            if isinstance(allocation, (str, bytes)) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in allocation
            ):
                raise OffloadOptionsError(f"offload 'allocation' must be a list of slot counts ≥ 0, got {allocation!r}")
            allocation = tuple(allocation)
        for flag in ("prefetch", "verify"):
            if flag in data and not isinstance(data[flag], bool):
                raise OffloadOptionsError(f"offload {flag!r} must be True or False, got {data[flag]!r}")
        calls = data.get("profile_calls", 32)
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
            raise OffloadOptionsError(f"offload 'profile_calls' must be an integer ≥ 1, got {calls!r}")
        below = data.get("low_precision_below", 0.0)
        if isinstance(below, bool) or not isinstance(below, (int, float)) or not 0 <= below <= 1:
            raise OffloadOptionsError(f"offload 'low_precision_below' must be a routing weight in [0, 1], got {below!r}")
        io = data.get("io", "auto")
        if io not in IO_MODES:
            raise OffloadOptionsError(f"unknown offload io {io!r}; valid: {', '.join(IO_MODES)}")
        return cls(
            store=str(store),
            cache_bytes=cache_bytes,
            cache=cache,
            allocation=allocation,
            prefetch=data.get("prefetch", cache_bytes == 0 and allocation is None),
            profile_calls=calls,
            io=io,
            verify=data.get("verify", False),
            low_precision_below=float(below),
        )

    def describe(self) -> str:
        """One line for reports."""
        budget = f"{self.cache_bytes / 1e6:.1f} MB" if self.cache_bytes else "no budget"
        split = "explicit allocation" if self.allocation is not None else self.cache
        low = f", low-precision copies below weight {self.low_precision_below:g}" if self.low_precision_below else ""
        return f"store {self.store}, cache {split} ({budget}), prefetch {'on' if self.prefetch else 'off'}{low}"

    def replace(self, **changes: Any) -> OffloadOptions:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)
