"""The CPU lowering of the experts op: sort by expert, one GEMM pair per expert.

::

    ids [T,K] ──► plan_slots       non-empty slots sorted by expert (stable): token and
                                    slot of each row, rows per expert, row of each slot
    x [T,H]   ──► gather rows      xs [S,H]                        S = non-empty slots
                  h[rows of e] = xs[rows of e] W1[e]ᵀ     for every expert e with rows, then
                  a = act(h)                              once over all rows (in place), then
                  y[rows of e] = a[rows of e] W2[e]ᵀ     for every expert e with rows
                                    (each projection token-major, weight-major, gemv or
                                    oneDNN: lowering/cpu_choice.py picks from a table
                                    measured on this machine, by rows, dtype and shape)
                  y[S] = 0          the row every empty slot reads
                  g = y[row of each slot]                           [T, K, H], token order
                  out[t] = Σ_j w[t,j] · g[t,j]                      one batched product,
                                                                    float32 accumulation

That is the ``moepass`` path.  At a row count where it does not beat the
path the model already had on this machine (the ``grouped_mm`` path: both
projections as ``torch._grouped_mm`` over the same sorted rows — the GEMMs of
transformers' default experts implementation), the op takes that path
instead: :func:`moepass.lowering.cpu_choice.choose_path` reads the choice per
row count from the machine's table.

The projections run phase by phase (all first projections, then all second
ones) rather than expert by expert: in float32 on the CI machine, alternating
the two GEMM shapes made the same GEMMs about 5% slower.  Empty slots cost no
GEMM work: each GEMM processes exactly the rows routed to
its expert (see :func:`moepass.runtime.stats.count_gemm_rows`); in the combine an
empty slot reads a row of zeros.  The intermediates (xs, h, y, g) live in
per-thread buffers reused across calls (:mod:`moepass.lowering.workspace`):
only the output is allocated per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moepass.compiler.spec import ExpertsSpec
from moepass.lowering.cpu_choice import block_key, choose_kernel, choose_path
from moepass.lowering.cpu_kernels import activate_inplace, project
from moepass.lowering.cpu_packed import packed_matrix, packing_allowed
from moepass.lowering.grouped import accumulation_dtype, token_ordered
from moepass.lowering.workspace import scratch
from moepass.runtime.stats import note_gemm_rows

__all__ = [
    "SlotPlan",
    "plan_slots",
    "gather_rows",
    "first_projection",
    "expert_outputs",
    "second_projection",
    "combine_rows",
    "experts_forward",
]


@dataclass
class SlotPlan:
    """Where every non-empty slot of a routing goes, rows grouped by expert.

    ``row_token`` [S] and ``row_slot`` [S] give the token and the flat slot
    index (t·K + j) of each row; rows of expert e are the ``counts[e]`` rows
    after those of experts 0 … e−1, in slot order.  ``slot_row`` [T·K] is the
    row of each slot, ``S`` for an empty slot.
    """

    row_token: torch.Tensor
    row_slot: torch.Tensor
    counts: list[int]
    slot_row: torch.Tensor
    num_tokens: int
    slots: int

    @property
    def rows(self) -> int:
        """S: the non-empty slots."""
        return self.row_token.shape[0]


def _plan_in_numpy(ids: torch.Tensor, num_experts: int) -> SlotPlan:
    """The plan made by NumPy on the CPU: a stable argsort and a bincount of a few hundred to a few
    thousand ids cost 15–800 µs, against 20–1000 µs for the same in torch ops or Python lists (each
    torch op pays its dispatch, each list step the interpreter)."""
    num_tokens, slots = ids.shape
    flat = ids.reshape(-1).numpy()
    keys = np.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=num_experts + 1)
    live = keys.size - int(counts[num_experts])
    row_slot = np.ascontiguousarray(order[:live])
    slot_row = np.empty_like(order)
    slot_row[order] = np.arange(order.size)
    np.minimum(slot_row, live, out=slot_row)
    return SlotPlan(
        torch.from_numpy(row_slot // slots),
        torch.from_numpy(row_slot),
        counts[:num_experts].tolist(),
        torch.from_numpy(slot_row),
        num_tokens,
        slots,
    )


def plan_slots(ids: torch.Tensor, num_experts: int) -> SlotPlan:
    """Sort the non-empty slots of ``ids`` [T, K] by expert (stably); ids outside [0, E) are empty."""
    num_tokens, slots = ids.shape
    if ids.device.type == "cpu" and ids.dtype == torch.int64:
        return _plan_in_numpy(ids.detach(), num_experts)
    flat = ids.reshape(-1)
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.sort(flat, stable=True)[1]
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()
    live = flat.numel() - counts[num_experts]
    row_slot = order[:live]
    row_token = torch.div(row_slot, slots, rounding_mode="floor")
    slot_row = torch.empty_like(order)
    slot_row[order] = torch.arange(order.numel(), device=ids.device)
    slot_row.clamp_(max=live)
    return SlotPlan(row_token, row_slot, counts[:num_experts], slot_row, num_tokens, slots)


def gather_rows(x: torch.Tensor, weights: torch.Tensor, plan: SlotPlan, spec: ExpertsSpec) -> torch.Tensor:
    """xs [S, H]: each row's token (times its routing weight for weight-on-input experts); a scratch buffer."""
    xs = scratch("xs", (plan.rows, x.shape[1]), x.dtype)
    torch.index_select(x, 0, plan.row_token, out=xs)
    if spec.weight_on_input:
        acc = accumulation_dtype(x.dtype)
        row_weights = weights.reshape(-1).index_select(0, plan.row_slot).to(acc).unsqueeze(1)
        xs.copy_(xs.to(acc) * row_weights)
    return xs


def expert_outputs(hidden: int, plan: SlotPlan, dtype: torch.dtype) -> torch.Tensor:
    """y [S + 1, H] for the experts to write rows 0 … S−1 into; row S (read by empty slots) is zero."""
    y = scratch("y", (plan.rows + 1, hidden), dtype)
    y[plan.rows].zero_()
    return y


def combine_rows(y: torch.Tensor, weights: torch.Tensor, plan: SlotPlan, spec: ExpertsSpec) -> torch.Tensor:
    """out [T, H] = Σ over each token's slots of weight · y[row] (no weight for weight-on-input experts).

    ``y`` [S + 1, H] is :func:`expert_outputs`'s buffer.  The rows are put in
    token order and reduced in one batched product per call, accumulating in
    float32 (the batched GEMM's accumulator for 16-bit inputs), in slot order.
    """
    num_tokens, slots, hidden = plan.num_tokens, plan.slots, y.shape[1]
    ordered = token_ordered(y, plan.slot_row, num_tokens, slots)
    if spec.weight_on_input:
        return ordered.sum(dim=1) if slots > 1 else ordered[:, 0].clone()
    if weights.dtype == y.dtype:
        return torch.bmm(weights.reshape(num_tokens, 1, slots), ordered).view(num_tokens, hidden)
    acc = accumulation_dtype(y.dtype)
    out = torch.bmm(weights.to(acc).reshape(num_tokens, 1, slots), ordered.to(acc))
    return out.view(num_tokens, hidden).to(y.dtype)


def _project_experts(inputs, outputs, counts, weight, bias, spec: ExpertsSpec, prepack: str, note: bool) -> None:
    """outputs[rows of e] = inputs[rows of e] W[e]ᵀ (+ b[e]) for every expert e with rows."""
    packed = not spec.transposed and packing_allowed(weight, prepack)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            kernel = choose_kernel(count, weight.shape[1:], weight.dtype, spec.transposed, packed)
            rows = slice(start, start + count)
            matrix = packed_matrix(weight, expert) if kernel == "packed" else None
            project(
                kernel, inputs[rows], outputs[rows], weight[expert], None if bias is None else bias[expert],
                spec.transposed, matrix,
            )
            if note:
                note_gemm_rows(count)
            start += count


def first_projection(xs, counts, w1, b1, spec: ExpertsSpec, prepack: str = "off") -> torch.Tensor:
    """h [S, N1]: every row's first projection, expert by expert (a scratch buffer)."""
    n1 = w1.shape[2] if spec.transposed else w1.shape[1]
    h = scratch("h", (xs.shape[0], n1), xs.dtype)
    _project_experts(xs, h, counts, w1, b1, spec, prepack, note=False)
    return h


def second_projection(a, y, counts, w2, b2, spec: ExpertsSpec, prepack: str = "off") -> None:
    """y[rows of e] = a[rows of e] W2[e]ᵀ (+ b2[e]) for every expert with rows; notes each expert's rows."""
    _project_experts(a, y, counts, w2, b2, spec, prepack, note=True)


def _grouped_mm_works(dtype: torch.dtype) -> bool:
    """Whether this torch runs ``torch._grouped_mm`` on CPU tensors of ``dtype`` (checked once per dtype)."""
    known = _GROUPED_MM.get(dtype)
    if known is None:
        try:
            a, b = torch.ones(3, 2, dtype=dtype), torch.ones(2, 2, 4, dtype=dtype)
            known = torch._grouped_mm(a, b, offs=torch.tensor([1, 3], dtype=torch.int32)).shape == (3, 4)
        except (AttributeError, RuntimeError, TypeError, NotImplementedError):
            known = False
        _GROUPED_MM[dtype] = known
    return known


_GROUPED_MM: dict[torch.dtype, bool] = {}


def _grouped_projection(inputs, counts, weight, bias, spec: ExpertsSpec) -> torch.Tensor:
    """[rows, out]: every expert's rows times its matrix in one ``torch._grouped_mm`` (a loop of ``mm``
    per expert where this torch has none for the dtype: transformers' own fallback)."""
    operand = weight if spec.transposed else weight.transpose(1, 2)  # [E, in, out]
    if _grouped_mm_works(inputs.dtype) and inputs.shape[0]:
        offsets = torch.from_numpy(np.cumsum(counts, dtype=np.int32))
        result = torch._grouped_mm(inputs, operand, offs=offsets)
    else:
        result = inputs.new_empty(inputs.shape[0], operand.shape[2])
        start = 0
        for expert, count in enumerate(counts):
            if count:
                torch.mm(inputs[start:start + count], operand[expert], out=result[start:start + count])
                start += count
    if bias is not None:
        row_expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        result += bias.index_select(0, row_expert)
    return result


def _grouped_path(x, weights, w1, w2, b1, b2, spec: ExpertsSpec, plan: SlotPlan) -> torch.Tensor:
    """The experts op on the ``grouped_mm`` path: the same plan and combine, GEMMs by ``torch._grouped_mm``."""
    xs = gather_rows(x, weights, plan, spec)
    h = _grouped_projection(xs, plan.counts, w1, b1, spec)
    a = activate_inplace(h, spec)
    y = expert_outputs(x.shape[1], plan, x.dtype)
    y[: plan.rows] = _grouped_projection(a, plan.counts, w2, b2, spec)
    for count in plan.counts:
        if count:
            note_gemm_rows(count)
    return combine_rows(y, weights, plan, spec)


def experts_forward(x, ids, weights, w1, w2, b1, b2, spec: ExpertsSpec, prepack: str = "auto",
                    path: str | None = None) -> torch.Tensor:
    """The experts op on CPU tensors (any float dtype; combine accumulates in float32).

    ``prepack``: whether bfloat16 expert weights run on copies pre-packed for
    oneDNN (``auto`` | ``on`` | ``off``, see :mod:`moepass.lowering.cpu_packed`).
    ``path``: ``moepass`` or ``grouped_mm``; None takes the one the machine's
    table gives for this call's row count (:func:`moepass.lowering.cpu_choice.choose_path`).
    """
    plan = plan_slots(ids, spec.num_experts)
    if path is None:
        packed = not spec.transposed and packing_allowed(w1, prepack)
        n1 = w1.shape[2] if spec.transposed else w1.shape[1]
        path = choose_path(block_key(spec, x.dtype, n1, packed), plan.rows)
    if path == "grouped_mm":
        return _grouped_path(x, weights, w1, w2, b1, b2, spec, plan)
    xs = gather_rows(x, weights, plan, spec)
    h = first_projection(xs, plan.counts, w1, b1, spec, prepack)
    a = activate_inplace(h, spec)
    y = expert_outputs(x.shape[1], plan, x.dtype)
    second_projection(a, y, plan.counts, w2, b2, spec, prepack)
    return combine_rows(y, weights, plan, spec)
