"""The fast-memory cache of one block's experts: fixed slots, LRU, safe under a prefetch thread.

::

    LayerCache(block, capacity=c)          c slots of one expert's range each, + 1 scratch slot
        begin(needed)   pin the needed experts that are resident; drop queued prefetches not needed;
                        order: resident experts first (computed while the rest load)
        acquire(e)      resident          -> hit (a prefetched expert's first use: a prefetch hit)
                        being prefetched  -> wait for it (late prefetch; the wait is load-wait time)
                        otherwise         -> read it now into the least recently used free slot,
                                             or the scratch slot when every slot is pinned (miss)
        release(e)      unpin after computing with it
        offer_prefetch / load_prefetch      the prefetch worker's side: queue, then read into an
                                             unpinned slot (never one the compute thread uses)

A slot's contents only become visible (``READY``) after its read completed;
a failed read empties the slot and raises on the compute thread, so no call
ever computes with the previous occupant's weights.  Which experts hit
depends on timing; the numbers computed never do (every expert's weights are
the store's exact bytes wherever they come from).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moepass.runtime.offload.store import ExpertReader, StoredBlock, aligned_buffer, expert_views

__all__ = ["LayerStats", "LayerCache", "DirectLoader"]

_READY, _LOADING, _EMPTY = "ready", "loading", "empty"


@dataclass
class LayerStats:
    """Run-time counters of one block's expert loading."""

    path: str
    #: Cache slots (each holds one expert) and the bytes they take, scratch slot included.
    slots: int = 0
    resident_bytes: int = 0
    #: Bytes of one expert's weights (without alignment padding).
    expert_bytes: int = 0
    calls: int = 0
    tokens: int = 0
    #: Experts the calls needed (distinct experts per call, summed over calls).
    accesses: int = 0
    #: Needed experts that were resident when their turn came (prefetch hits included).
    hits: int = 0
    #: Hits on an expert the prefetcher loaded and nothing used before.
    prefetch_hits: int = 0
    #: Needed experts whose prefetch was still reading: the call waited for the rest.
    late: int = 0
    #: Needed experts read on demand by the compute thread.
    misses: int = 0
    #: Experts the prefetcher read.
    prefetch_loads: int = 0
    #: Prefetched experts evicted before any use.
    prefetch_wasted: int = 0
    #: Predicted experts dropped before the prefetcher reached them.
    prefetch_cancelled: int = 0
    #: Bytes read from the store (aligned ranges, both threads).
    bytes_read: int = 0
    #: Seconds the compute thread was blocked on loads.
    load_wait_s: float = 0.0
    #: Seconds spent in reads (both threads) and the number of reads.
    read_s: float = 0.0
    reads: int = 0
    #: Misses served by the lower-precision copy (HOBBIT) and the bytes they read.
    low_loads: int = 0
    low_bytes_read: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits / needed experts."""
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def reuse_hits(self) -> int:
        """Hits on an expert that an earlier call already used (the cache's own saving)."""
        return self.hits - self.prefetch_hits

    @property
    def ideal_bytes(self) -> int:
        """Bytes the loads needed at least: every needed expert not kept from an earlier use, read once."""
        return (self.accesses - self.reuse_hits) * self.expert_bytes

    @property
    def mean_read_s(self) -> float | None:
        """Mean seconds per read, None before any."""
        return self.read_s / self.reads if self.reads else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived rates."""
        data = asdict(self)
        data.update(hit_rate=self.hit_rate, ideal_bytes=self.ideal_bytes)
        return data


class _Slot:
    __slots__ = ("buffer", "views", "expert", "state", "last_use", "pins", "fresh")

    def __init__(self, block: StoredBlock):
        self.buffer = aligned_buffer(block.stride)
        self.views = expert_views(block, self.buffer)
        self.expert = -1
        self.state = _EMPTY
        self.last_use = -1
        self.pins = 0
        #: Loaded by the prefetcher and not used yet.
        self.fresh = False


class LayerCache:
    """``capacity`` cached experts of one block (see the module docstring)."""

    def __init__(self, block: StoredBlock, reader: ExpertReader, capacity: int):
        self.block = block
        self.reader = reader
        self._cond = threading.Condition()
        self._slots = [_Slot(block) for _ in range(self._clamp(capacity))]
        self._scratch = _Slot(block)
        self._resident: dict[int, _Slot] = {}
        self._queued: set[int] = set()
        self._pinned: set[int] = set()
        self._clock = 0
        self._error: BaseException | None = None
        self.stats = LayerStats(block.path, expert_bytes=block.expert_nbytes)
        self._update_size()

    def _clamp(self, capacity: int) -> int:
        return max(0, min(int(capacity), self.block.num_experts))

    def _update_size(self) -> None:
        self.stats.slots = len(self._slots)
        self.stats.resident_bytes = (len(self._slots) + 1) * self.block.stride

    @property
    def capacity(self) -> int:
        """Cache slots (the scratch slot not counted)."""
        return len(self._slots)

    def is_ready(self, expert: int) -> bool:
        """Whether ``expert`` is resident or being read into the cache now (a full copy is there or on its way)."""
        with self._cond:
            return expert in self._resident

    def resident(self) -> list[int]:
        """Experts held (ready) now, for tests and reports."""
        with self._cond:
            return sorted(e for e, s in self._resident.items() if s.state == _READY)

    def _touch(self, slot: _Slot) -> None:
        self._clock += 1
        slot.last_use = self._clock

    def _victim(self) -> _Slot | None:
        """The slot to (re)fill: an empty one, else the least recently used one nobody holds."""
        best = None
        for slot in self._slots:
            if slot.pins or slot.state == _LOADING:
                continue
            if slot.state == _EMPTY:
                return slot
            if best is None or slot.last_use < best.last_use:
                best = slot
        return best

    def _evict(self, slot: _Slot) -> None:
        if slot.state != _EMPTY:
            del self._resident[slot.expert]
            if slot.fresh:
                self.stats.prefetch_wasted += 1
        slot.expert, slot.state, slot.fresh = -1, _EMPTY, False

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    # --- the compute thread ----------------------------------------------------

    def begin(self, needed: list[int], tokens: int) -> list[int]:
        """Start a call needing ``needed`` experts; returns them in compute order (resident first).

        Raises a load error the prefetcher hit since the last call.
        """
        with self._cond:
            self._raise_pending()
            wanted = set(needed)
            for expert in list(self._queued):
                if expert not in wanted:
                    self._queued.discard(expert)
                    self.stats.prefetch_cancelled += 1
            ready, later = [], []
            for expert in needed:
                slot = self._resident.get(expert)
                if slot is not None and slot.state == _READY:
                    slot.pins += 1
                    self._pinned.add(expert)
                    ready.append(expert)
                else:
                    later.append(expert)
            self.stats.calls += 1
            self.stats.tokens += tokens
            return ready + later

    def acquire(self, expert: int) -> dict[str, torch.Tensor]:
        """The weights of ``expert`` (typed views of its slot), loading it if needed; pinned until :meth:`release`."""
        started = time.perf_counter()
        with self._cond:
            self.stats.accesses += 1
            slot = self._resident.get(expert)
            if slot is not None and slot.state == _LOADING:
                self.stats.late += 1
                while slot.state == _LOADING and slot.expert == expert:
                    self._cond.wait()
                self.stats.load_wait_s += time.perf_counter() - started
                self._raise_pending()
                slot = self._resident.get(expert)
                if slot is not None and slot.state == _READY:
                    slot.fresh = False
                    slot.pins += 1
                    self._pinned.add(expert)
                    self._touch(slot)
                    return slot.views
                # the prefetch failed and was raised above, or the slot went: read it here
                self.stats.late -= 1
                started = time.perf_counter()
            if slot is not None and slot.state == _READY:
                self.stats.hits += 1
                if slot.fresh:
                    self.stats.prefetch_hits += 1
                    slot.fresh = False
                if expert not in self._pinned:
                    slot.pins += 1
                    self._pinned.add(expert)
                self._touch(slot)
                return slot.views
            self._queued.discard(expert)
            slot = self._victim() or self._scratch
            if slot is self._scratch and slot.pins:
                raise RuntimeError(f"block {self.block.path}: two experts acquired without a release in between")
            if slot is not self._scratch:
                self._evict(slot)
                slot.expert, slot.state = expert, _LOADING
                self._resident[expert] = slot
            slot.pins += 1
            self._pinned.add(expert)
        try:
            read_started = time.perf_counter()
            got = self.reader.read(self.block, expert, slot.buffer)
        except BaseException:
            with self._cond:
                slot.pins -= 1
                self._pinned.discard(expert)
                if slot is not self._scratch:
                    self._evict(slot)
                self._cond.notify_all()
            raise
        finished = time.perf_counter()
        with self._cond:
            if slot is not self._scratch:
                slot.state = _READY
            self._touch(slot)
            self.stats.misses += 1
            self.stats.bytes_read += got
            self.stats.reads += 1
            self.stats.read_s += finished - read_started
            self.stats.load_wait_s += finished - started
            self._cond.notify_all()
        if slot is self._scratch:
            slot.expert = expert
        return slot.views

    def release(self, expert: int) -> None:
        """Unpin ``expert`` after computing with it."""
        with self._cond:
            if expert not in self._pinned:
                return
            self._pinned.discard(expert)
            slot = self._resident.get(expert)
            if slot is None and self._scratch.expert == expert:
                slot = self._scratch
            if slot is not None:
                slot.pins -= 1
            if slot is self._scratch:
                slot.expert = -1

    def end(self) -> None:
        """Unpin whatever the call still holds (after an error)."""
        for expert in list(self._pinned):
            self.release(expert)

    # --- the prefetch thread ---------------------------------------------------

    def offer_prefetch(self, experts: list[int]) -> list[int]:
        """Queue predicted ``experts`` (most likely first); returns those the prefetcher must read.

        Experts already resident are marked recently used so the new ones do
        not evict them; at most ``capacity`` experts are kept.
        """
        with self._cond:
            todo = []
            for expert in experts[: len(self._slots)]:
                slot = self._resident.get(expert)
                if slot is not None:
                    self._touch(slot)
                elif expert not in self._queued:
                    self._queued.add(expert)
                    todo.append(expert)
            return todo

    def load_prefetch(self, expert: int) -> None:
        """Read a queued ``expert`` into a free or least recently used unpinned slot (prefetch thread)."""
        with self._cond:
            if expert not in self._queued:
                return  # the compute thread took it over, or the call that needed it is over
            self._queued.discard(expert)
            slot = self._victim()
            if slot is None:
                self.stats.prefetch_cancelled += 1
                return
            self._evict(slot)
            slot.expert, slot.state = expert, _LOADING
            self._resident[expert] = slot
        started = time.perf_counter()
        try:
            got = self.reader.read(self.block, expert, slot.buffer)
        except BaseException as error:
            with self._cond:
                self._evict(slot)
                self._error = error
                self._cond.notify_all()
            return
        finished = time.perf_counter()
        with self._cond:
            slot.state, slot.fresh = _READY, True
            self._touch(slot)
            self.stats.prefetch_loads += 1
            self.stats.bytes_read += got
            self.stats.reads += 1
            self.stats.read_s += finished - started
            self._cond.notify_all()

    def reset_stats(self) -> None:
        """Zero the counters; experts resident now count as kept from earlier use (not prefetch hits)."""
        with self._cond:
            for slot in self._slots:
                slot.fresh = False
            self.stats = LayerStats(self.block.path, expert_bytes=self.block.expert_nbytes)
            self._update_size()

    # --- re-partitioning -------------------------------------------------------

    def resize(self, capacity: int) -> None:
        """Change the number of slots, keeping the most recently used experts that fit (between calls)."""
        capacity = self._clamp(capacity)
        with self._cond:
            while any(s.state == _LOADING for s in self._slots):
                self._cond.wait()
            self.stats.prefetch_cancelled += len(self._queued)
            self._queued.clear()
            ranked = sorted(self._slots, key=lambda s: (s.state != _EMPTY, s.last_use), reverse=True)
            keep, drop = ranked[:capacity], ranked[capacity:]
            for slot in drop:
                self._evict(slot)
            self._slots = keep + [_Slot(self.block) for _ in range(capacity - len(keep))]
            self._update_size()

    def clear(self) -> None:
        """Drop every cached expert (and queued prefetch)."""
        with self._cond:
            while any(s.state == _LOADING for s in self._slots):
                self._cond.wait()
            self._queued.clear()
            for slot in self._slots:
                self._evict(slot)

    def free(self) -> None:
        """Give the slots' memory back (the cache is unusable afterwards; its counters stay)."""
        self.clear()
        with self._cond:
            self._slots = []
            self._scratch = None


class DirectLoader:
    """No cache: each needed expert is read into one scratch buffer, used, and dropped (validation runs)."""

    def __init__(self, block: StoredBlock, reader: ExpertReader):
        self.block = block
        self.reader = reader
        self._scratch = _Slot(block)

    def begin(self, needed: list[int], tokens: int) -> list[int]:
        """Compute order: as needed."""
        return list(needed)

    def acquire(self, expert: int) -> dict[str, torch.Tensor]:
        """Read ``expert`` into the scratch buffer."""
        self.reader.read(self.block, expert, self._scratch.buffer)
        return self._scratch.views

    def release(self, expert: int) -> None:
        """Nothing to unpin."""

    def end(self) -> None:
        """Nothing to unpin."""
