"""Token bucketing by k: turn a variable-k routing into fixed-k problems.

After routing, each token keeps k ≤ k_max experts (empty slots hold the
sentinel id E).  Grouping tokens by k, stably, gives one *fixed-k* MoE
problem per bucket, which any backend can run with its best fixed-k kernel
(ONNX Runtime's ``com.microsoft.MoE`` with attribute k, a Triton kernel with a
constexpr top-k, a grouped GEMM on CPU), with static shapes inside the bucket
and no work at all for empty slots::

    ids  [T, K]     k per token        buckets (stable)
    0: [3, 1]  →    2            ┐
    1: [2, E]  →    1            │     k=1: tokens [1, 3]   ids [[2], [0]]
    2: [E, E]  →    0            ├──►  k=2: tokens [0]      ids [[3, 1]]
    3: [0, E]  →    1            ┘     (k=0: token 2 gets no routed expert)

Bucket sizes may be padded up to a small set of sizes so kernels and tuned
configs are reused; padded rows point at token -1 with sentinel ids and weight
0, so they never change results.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["KBucket", "KBuckets", "bucket_by_k", "compact_slots"]


def compact_slots(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each token's non-empty slots to the front, keeping their order.

    Policies already emit this prefix form; other producers may not.
    """
    empty = (ids < 0) | (ids >= num_experts)
    if not bool(empty.any()):
        return ids, weights
    order = torch.sort(empty.to(torch.int8), dim=1, stable=True)[1]
    ids = ids.gather(1, order)
    weights = weights.gather(1, order)
    empty = empty.gather(1, order)
    return ids.masked_fill(empty, num_experts), weights.masked_fill(empty, 0.0)


@dataclass
class KBucket:
    """One fixed-k problem: ``tokens`` [n] (−1 for padding), ``ids``/``weights`` [n, k]."""

    k: int
    tokens: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor

    @property
    def size(self) -> int:
        """Rows, padding included."""
        return int(self.tokens.numel())


@dataclass
class KBuckets:
    """Tokens grouped by how many experts they keep."""

    #: One bucket per k present, ascending k, k = 0 excluded (no work).
    buckets: list[KBucket]
    #: tokens_per_k[k] = number of tokens that keep k experts (k = 0 .. K).
    tokens_per_k: list[int]
    num_experts: int

    @property
    def rows(self) -> int:
        """Non-empty slots: the GEMM rows the buckets need, padding excluded."""
        return sum(k * n for k, n in enumerate(self.tokens_per_k))


def _pad_target(size: int, pad_sizes: Sequence[int] | None) -> int:
    if not pad_sizes:
        return size
    index = bisect.bisect_left(pad_sizes, size)
    return pad_sizes[index] if index < len(pad_sizes) else size


def bucket_by_k(
    ids: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    pad_sizes: Sequence[int] | None = None,
) -> KBuckets:
    """Group tokens stably by their number of non-empty slots.

    Args:
        ids: [T, K] expert ids, sentinel ``num_experts`` for empty slots.
        weights: [T, K] routing weights.
        num_experts: E.
        pad_sizes: ascending sizes to pad each bucket up to (sizes above the
            largest are left as they are); None for no padding.
    """
    ids, weights = compact_slots(ids, weights, num_experts)
    k = ((ids >= 0) & (ids < num_experts)).sum(dim=1)
    counts = torch.bincount(k, minlength=ids.shape[1] + 1).tolist()
    order = torch.sort(k, stable=True)[1]
    buckets = []
    start = counts[0]  # k = 0 tokens come first and need no work
    for k_value in range(1, len(counts)):
        size = counts[k_value]
        if size == 0:
            continue
        tokens = order[start : start + size]
        start += size
        bucket_ids = ids.index_select(0, tokens)[:, :k_value]
        bucket_weights = weights.index_select(0, tokens)[:, :k_value]
        padded = _pad_target(size, sorted(pad_sizes) if pad_sizes else None)
        if padded > size:
            extra = padded - size
            tokens = torch.cat([tokens, tokens.new_full((extra,), -1)])
            bucket_ids = torch.cat([bucket_ids, bucket_ids.new_full((extra, k_value), num_experts)])
            bucket_weights = torch.cat([bucket_weights, bucket_weights.new_zeros((extra, k_value))])
        buckets.append(KBucket(k_value, tokens, bucket_ids, bucket_weights))
    return KBuckets(buckets, counts, num_experts)
