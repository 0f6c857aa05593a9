"""The experts op of an offloaded block: the CPU lowering, with each expert's weights read through the cache.

::

    ids [T,K] ──► slots grouped by expert (moepass.lowering.cpu.expert_slots)
    session.begin_call   prefetch layer l+1's predicted experts; order: resident experts first
    for each expert e hit (resident first, the rest as their loads complete):
        w = cache.acquire(e)          hit, wait for a prefetch, or read now
        y[rows of e] = expert(x[rows of e]; w)   the CPU lowering's own per-expert GEMMs
        cache.release(e)
    out = Σ weight · y per token (same combine, same row order as the CPU lowering)

Each expert's rows are computed by the same functions, on weights with the
same bytes and strides, and combined in the same order as the in-memory CPU
lowering — so the result is bit for bit the in-memory one, whichever experts
happened to be cached or prefetched.  Inference only.
"""

from __future__ import annotations

import torch

from moepass.lowering.cpu import _WEIGHT_MAJOR_MAX_ROWS, _expert_token_major, _expert_weight_major, expert_slots
from moepass.offload.session import OffloadError, lookup
from moepass.stats import note_gemm_rows

__all__ = ["experts_forward"]


def _check_inputs(x: torch.Tensor, path: str) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise OffloadError(
            f"block {path}: offloaded experts are inference-only (their weights are not in memory to take "
            "gradients of); run the model under torch.no_grad() or torch.inference_mode()"
        )
    if x.device.type != "cpu":
        raise OffloadError(
            f"block {path}: offloading runs on CPU tensors only (got {x.device}); the host-memory → GPU path "
            "is not implemented"
        )


def experts_forward(x, ids, weights, spec, key: str) -> torch.Tensor:
    """``moepass.experts`` for a block whose weights live in the offload store ``key`` names."""
    session, path = lookup(key)
    _check_inputs(x, path)
    provider = session.provider(path)
    num_tokens, hidden = x.shape
    token, slot_weights, counts = expert_slots(ids, weights, spec.num_experts)
    slot_weights = slot_weights.float().unsqueeze(1)
    xs = x.index_select(0, token)
    if spec.weight_on_input:
        xs = (xs.float() * slot_weights).to(x.dtype)
    block = provider.block
    first = block.tensor("w1")
    n1 = first.shape[1] if spec.transposed else first.shape[0]
    y = torch.empty(token.numel(), hidden, dtype=x.dtype, device=x.device)
    h_buffer = torch.empty(max(counts, default=0) * n1, dtype=x.dtype, device=x.device)
    starts, start = [], 0
    for count in counts:
        starts.append(start)
        start += count
    try:
        order = session.begin_call(path, x, counts)  # pins resident experts, starts the next layer's prefetch
        for expert in order:
            count = counts[expert]
            rows = slice(starts[expert], starts[expert] + count)
            views = provider.acquire(expert)
            try:
                w1, w2 = views["w1"].unsqueeze(0), views["w2"].unsqueeze(0)
                b1 = views["b1"].unsqueeze(0) if "b1" in views else None
                b2 = views["b2"].unsqueeze(0) if "b2" in views else None
                if count <= _WEIGHT_MAJOR_MAX_ROWS and not spec.transposed:
                    _expert_weight_major(xs[rows], y[rows], 0, w1, w2, b1, b2, spec, h_buffer[: count * n1])
                else:
                    _expert_token_major(xs[rows], y[rows], 0, w1, w2, b1, b2, spec, h_buffer[: count * n1])
            finally:
                provider.release(expert)
            note_gemm_rows(count)
    finally:
        provider.end()
    weighted = y.float() if x.dtype != torch.float32 else y
    if not spec.weight_on_input:
        weighted = weighted.mul_(slot_weights)
    out = torch.zeros(num_tokens, hidden, dtype=weighted.dtype, device=x.device)
    out.index_add_(0, token, weighted)
    return out.to(x.dtype)
