"""The experts op of an offloaded block: the CPU lowering, with each expert's weights read through the cache.

::

    ids [T,K] ──► slots grouped by expert (moepass.lowering.cpu.plan_slots)
    session.begin_call   prefetch layer l+1's predicted experts; order: resident experts first
    for each expert e hit (resident first, the rest as their loads complete):
        w = cache.acquire(e)          hit, wait for a prefetch, or read now
        y[rows of e] = expert(x[rows of e]; w)   the CPU lowering's own projections and activation
        cache.release(e)
    out = Σ weight · y per token (same combine, same row order as the CPU lowering)

Each expert's rows are computed by the same kernels (chosen from the same
table by the same rows, dtype and shapes), on weights with the same bytes and
strides, with the activation on the same token-major layout (the in-memory
lowering runs it once over all rows, elementwise), and combined in the same
order as the in-memory CPU lowering — so the result is bit for bit the in-memory one, whichever experts
happened to be cached or prefetched.  Inference only.
"""

from __future__ import annotations

import torch

from moepass.lowering.cpu import combine_rows, expert_outputs, gather_rows, plan_slots
from moepass.lowering.cpu_kernels import activate_inplace, project
from moepass.lowering.cpu_choice import choose_kernel
from moepass.lowering.workspace import scratch
from moepass.runtime.offload.session import OffloadError, lookup
from moepass.runtime.stats import note_gemm_rows

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
    plan = plan_slots(ids, spec.num_experts)
    counts = plan.counts
    xs = gather_rows(x, weights, plan, spec)
    y = expert_outputs(x.shape[1], plan, x.dtype)
    block = provider.block
    first, second = block.tensor("w1"), block.tensor("w2")  # one expert's shapes and dtype: the kernel choice
    n1 = first.shape[1] if spec.transposed else first.shape[0]
    h = scratch("h", (plan.rows, n1), x.dtype)
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
                up = choose_kernel(count, first.shape, first.torch_dtype, spec.transposed)
                project(up, xs[rows], h[rows], views["w1"], views.get("b1"), spec.transposed)
                a = activate_inplace(h[rows], spec)
                down = choose_kernel(count, second.shape, second.torch_dtype, spec.transposed)
                project(down, a, y[rows], views["w2"], views.get("b2"), spec.transposed)
            finally:
                provider.release(expert)
            note_gemm_rows(count)
    finally:
        provider.end()
    return combine_rows(y, weights, plan, spec)
