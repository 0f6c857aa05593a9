"""Opt-in run-time counters: tokens per k per block, and GEMM rows.

Routing statistics are recorded by the experts op when a block was compiled
with ``options={"stats": True}``; :func:`routing_stats` reads them and
:func:`reset_stats` clears them.  :func:`count_gemm_rows` counts the rows the
CPU lowering's GEMMs process, so tests can check that empty slots cost no
GEMM work.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = ["BlockStats", "record_routing", "record_k", "routing_stats", "reset_stats", "count_gemm_rows", "counting_gemm_rows", "note_gemm_rows"]

_lock = threading.Lock()
_stats: dict[str, "BlockStats"] = {}
_row_counters: list[list[int]] = []


@dataclass
class BlockStats:
    """Tokens routed through one block, by how many experts each got."""

    num_experts: int
    #: tokens_per_k[k] = number of tokens that kept k GEMM experts (the ones that cost compute).
    tokens_per_k: list[int] = field(default_factory=list)
    #: Slots routed to zero-computation experts (identity, zero, constant: no
    #: GEMM row).  Counted by the fused experts op; the training (split) form
    #: counts GEMM slots only.
    zero_compute_slots: int = 0

    @property
    def tokens(self) -> int:
        """Tokens seen."""
        return sum(self.tokens_per_k)

    @property
    def average_k(self) -> float:
        """Mean number of experts per token."""
        return sum(k * n for k, n in enumerate(self.tokens_per_k)) / max(self.tokens, 1)


def record_routing(block: str, ids: torch.Tensor, num_experts: int, num_zero_compute: int = 0) -> None:
    """Add one call's per-token k (slots of ``ids`` on GEMM experts) to ``block``'s counters.

    Ids ``num_experts`` … ``num_experts + num_zero_compute - 1`` are
    zero-computation experts: counted apart, not in k.
    """
    record_k(block, ((ids >= 0) & (ids < num_experts)).sum(dim=1), ids.shape[1], num_experts)
    if num_zero_compute:
        zero = int(((ids >= num_experts) & (ids < num_experts + num_zero_compute)).sum())
        with _lock:
            _stats[block].zero_compute_slots += zero


def record_k(block: str, k: torch.Tensor, max_k: int, num_experts: int) -> None:
    """Add one call's experts per token (``k`` [T]) to ``block``'s counters."""
    histogram = torch.bincount(k, minlength=max_k + 1).tolist()
    with _lock:
        entry = _stats.setdefault(block, BlockStats(num_experts))
        if len(entry.tokens_per_k) < len(histogram):
            entry.tokens_per_k.extend([0] * (len(histogram) - len(entry.tokens_per_k)))
        for k_value, count in enumerate(histogram):
            entry.tokens_per_k[k_value] += count


def routing_stats() -> dict[str, BlockStats]:
    """A copy of the counters, by block path."""
    with _lock:
        return {name: BlockStats(s.num_experts, list(s.tokens_per_k), s.zero_compute_slots) for name, s in _stats.items()}


def reset_stats() -> None:
    """Clear all routing counters."""
    with _lock:
        _stats.clear()


def counting_gemm_rows() -> bool:
    """Whether a :func:`count_gemm_rows` block is collecting (lowerings skip the bookkeeping otherwise)."""
    return bool(_row_counters)


def note_gemm_rows(rows: int) -> None:
    """Called by lowerings once per expert GEMM pair with the rows it processed."""
    for counter in _row_counters:
        counter.append(rows)


@contextlib.contextmanager
def count_gemm_rows() -> Iterator[list[int]]:
    """Collect the row count of every expert GEMM pair run inside the block."""
    counter: list[int] = []
    _row_counters.append(counter)
    try:
        yield counter
    finally:
        _row_counters.remove(counter)
