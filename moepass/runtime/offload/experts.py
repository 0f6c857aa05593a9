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

__all__ = ["experts_forward", "quantized_experts_forward"]


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
    largest = _largest_weight_per_expert(weights, plan, spec.num_experts) if session.options.low_precision_below else None
    try:
        order = session.begin_call(path, x, counts)  # pins resident experts, starts the next layer's prefetch
        for expert in order:
            count = counts[expert]
            rows = slice(starts[expert], starts[expert] + count)
            if largest is not None and session.low_copy_wanted(path, expert, largest[expert]):
                _low_precision_expert(session, path, expert, xs[rows], h[rows], y[rows], spec, x.dtype)
                note_gemm_rows(count)
                continue
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


def _low_precision_expert(session, path: str, expert: int, xs, h, y, spec, dtype) -> None:
    """HOBBIT: one expert's rows computed on its lower-precision copy from the store (read now, not cached)."""
    from moepass.lowering.cpu_quantized import project_rows, stored_expert_operands
    from moepass.quantize.scheme import QuantScheme

    stored, views = session.low_copy(path, expert)
    scheme = QuantScheme.from_dict({k: v for k, v in stored.quant.items() if k != "row_block"})
    row_block = int(stored.quant.get("row_block", 0))
    first, form = stored_expert_operands(views, "w1", scheme, row_block, dtype)
    project_rows(xs, h, first, views.get("b1"), scheme, form)
    a = activate_inplace(h, spec).contiguous()
    second, form = stored_expert_operands(views, "w2", scheme, row_block, dtype)
    project_rows(a, y, second, views.get("b2"), scheme, form)


def _largest_weight_per_expert(weights: torch.Tensor, plan, num_experts: int) -> list[float]:
    """The largest routing weight each expert gets in this call (0 for experts without rows)."""
    row_weights = weights.reshape(-1).index_select(0, plan.row_slot).float()
    largest = torch.zeros(num_experts)
    if row_weights.numel():
        experts = torch.repeat_interleave(torch.arange(num_experts), torch.tensor(plan.counts))
        largest.scatter_reduce_(0, experts, row_weights, reduce="amax")
    return largest.tolist()


def quantized_experts_forward(x, ids, weights, spec, scheme, key: str) -> torch.Tensor:
    """``moepass.quantized_experts`` for a block whose quantized experts live in the offload store ``key`` names.

    Each expert's stored codes are used as read (int4 in this machine's ATen row-block order): the
    projections are those of the in-memory quantized op (:mod:`moepass.lowering.cpu_quantized`), on
    the same operands, so the result is the in-memory one.  With HOBBIT on (``low_precision_below``), a
    miss of an expert whose largest routing weight in the call is below it reads the store's
    lower-precision copy instead, uses it for this call and does not cache it.
    """
    from moepass.lowering.cpu_quantized import project_rows, stored_expert_operands
    from moepass.quantize.scheme import QuantScheme

    session, path = lookup(key)
    _check_inputs(x, path)
    provider = session.provider(path)
    plan = plan_slots(ids, spec.num_experts)
    counts = plan.counts
    xs = gather_rows(x, weights, plan, spec)
    y = expert_outputs(x.shape[1], plan, x.dtype)
    block = provider.block
    n1 = block.tensor("w1.codes").shape[0]
    h = scratch("h", (plan.rows, n1), x.dtype)
    starts, start = [], 0
    for count in counts:
        starts.append(start)
        start += count
    largest = _largest_weight_per_expert(weights, plan, spec.num_experts) if session.options.low_precision_below else None
    try:
        order = session.begin_call(path, x, counts)
        for expert in order:
            count = counts[expert]
            rows = slice(starts[expert], starts[expert] + count)
            low = largest is not None and session.low_copy_wanted(path, expert, largest[expert])
            if low:
                stored, views = session.low_copy(path, expert)
                use = QuantScheme.from_dict({k: v for k, v in stored.quant.items() if k != "row_block"})
            else:
                stored, views, use = block, provider.acquire(expert), scheme
            try:
                row_block = int(stored.quant.get("row_block", 0))
                first, form = stored_expert_operands(views, "w1", use, row_block, x.dtype)
                project_rows(xs[rows], h[rows], first, views.get("b1"), use, form)
                a = activate_inplace(h[rows], spec).contiguous()
                second, form = stored_expert_operands(views, "w2", use, row_block, x.dtype)
                project_rows(a, y[rows], second, views.get("b2"), use, form)
            finally:
                if not low:
                    provider.release(expert)
            note_gemm_rows(count)
    finally:
        provider.end()
    return combine_rows(y, weights, plan, spec)
