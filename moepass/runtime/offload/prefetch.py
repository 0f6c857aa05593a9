"""The prefetch worker: one background thread that reads predicted experts into their layer's cache.

::

    compute thread (layer l)                      prefetch thread
    ─────────────────────────                     ───────────────
    ids_{l+1}' = route_{l+1}(x_l @ W_gate_{l+1})
    cache_{l+1}.offer_prefetch(experts) ──queue──► cache_{l+1}.load_prefetch(e)   (pread, GIL released)
    experts of layer l (GEMMs)                    ...
    layer l+1: acquire(e) → hit / wait / read

The worker only ever writes slots nobody holds (see :mod:`moepass.runtime.offload.cache`),
so it changes which loads the compute thread waits for, never the numbers.
It runs no torch ops.  :meth:`Prefetcher.close` stops it: queued work is
dropped, a read in progress finishes, the thread is joined.
"""

from __future__ import annotations

import collections
import logging
import threading

from moepass.runtime.offload.cache import LayerCache

__all__ = ["Prefetcher"]

logger = logging.getLogger(__name__)


class Prefetcher:
    """A daemon thread serving prefetch requests in submission order."""

    def __init__(self, name: str = "moepass-prefetch"):
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[LayerCache, int]] = collections.deque()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the thread is running."""
        return self._thread.is_alive()

    def submit(self, cache: LayerCache, experts: list[int]) -> int:
        """Queue ``experts`` of ``cache`` (most likely first); returns how many will be read."""
        todo = cache.offer_prefetch(experts)
        if not todo:
            return 0
        with self._cond:
            if self._closed:
                return 0
            self._queue.extend((cache, expert) for expert in todo)
            self._cond.notify()
        return len(todo)

    def drain(self) -> None:
        """Wait until every queued request has been served (tests, re-partitioning)."""
        with self._cond:
            while (self._queue or self._busy) and not self._closed:
                self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                cache, expert = self._queue.popleft()
                self._busy = True
            try:
                cache.load_prefetch(expert)  # errors are kept by the cache and raised on the compute thread
            except BaseException:  # a bug in the cache itself: keep serving, say so
                logger.exception("prefetch of expert %d of %s failed", expert, cache.block.path)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread: drop queued requests, let a read in progress finish, join."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the prefetch thread did not stop within %.0f s", timeout)
