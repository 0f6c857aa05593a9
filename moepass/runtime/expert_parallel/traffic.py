"""Counters of what the expert-parallel exchange moves: rows and bytes, per rank.

Inside :func:`count_traffic` every expert-parallel experts call (forward and
backward) adds what *this rank* sends to the other ranks of its expert group:

* ``dispatch``: token rows to the ranks owning their experts (one row per kept
  slot on a remote expert: dropped slots, null experts and zero-computation
  experts are never sent);
* ``combine``: the expert outputs sent back to the ranks the rows came from;
* ``counts``: the per-expert row counts (and the header that checks the ranks
  agree) exchanged first.

Rows a rank's own experts serve are counted apart (``rows_local``): they are
copied, not sent.  Tests check rows sent against the kept remote slots; the
benchmark reports bytes per token per layer from the same counters.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["Traffic", "count_traffic", "note_exchange"]


@dataclass
class Traffic:
    """What one rank exchanged inside a :func:`count_traffic` block."""

    #: Expert-parallel experts calls (forward and backward each count one).
    calls: int = 0
    #: Tokens this rank brought to the calls (after any batch slicing).
    tokens: int = 0
    #: Rows sent to other ranks' experts (kept slots on remote experts).
    rows_sent: int = 0
    #: Kept slots on this rank's own experts (no communication).
    rows_local: int = 0
    #: Rows other ranks sent to this rank's experts.
    rows_received: int = 0
    dispatch_bytes: int = 0
    combine_bytes: int = 0
    counts_bytes: int = 0
    #: Rows this rank's experts ran per call (its own and received), for max/mean load.
    rows_run_per_call: list[int] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """All bytes this rank sent."""
        return self.dispatch_bytes + self.combine_bytes + self.counts_bytes


_lock = threading.Lock()
_counters: list[Traffic] = []


def note_exchange(
    tokens: int, rows_sent: int, rows_local: int, rows_received: int,
    dispatch_bytes: int, combine_bytes: int, counts_bytes: int,
) -> None:
    """Called by the exchange once per experts call with what this rank sent."""
    with _lock:
        for counter in _counters:
            counter.calls += 1
            counter.tokens += tokens
            counter.rows_sent += rows_sent
            counter.rows_local += rows_local
            counter.rows_received += rows_received
            counter.dispatch_bytes += dispatch_bytes
            counter.combine_bytes += combine_bytes
            counter.counts_bytes += counts_bytes
            counter.rows_run_per_call.append(rows_local + rows_received)


@contextlib.contextmanager
def count_traffic() -> Iterator[Traffic]:
    """Count every expert-parallel exchange this process makes inside the block."""
    counter = Traffic()
    with _lock:
        _counters.append(counter)
    try:
        yield counter
    finally:
        with _lock:
            _counters.remove(counter)
