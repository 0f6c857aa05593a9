"""Down GEMM with the routing weight fused, and the deterministic combine over a token's slots.

::

    down_kernel, row r of an expert-sorted block (expert e), s = sorted_slots[r]:
        y[s] = routing_weight[s] · (h[r] @ W2[e]ᵀ + b2[e])        fp32 accumulator,
                                                                  stored in x's dtype
    combine_slots_kernel, token t:
        out[t] = Σ_{j < K, ids[t, j] valid} y[t*K + j]             in slot order, fp32

How the combine avoids atomics: the down GEMM scatters each row to its own
*slot* row ``y[t*K + j]`` (rows are unique, so no two programs write the same
element), and a second, tiny kernel sums each token's K slot rows in slot
order.  The result is deterministic run to run, sums a token's experts in
slot order as transformers' experts do, and needs no fp32 scratch output or
zeroing pass; atomics (``tl.atomic_add`` into an fp32 ``out``) would make the
low bits depend on scheduling and need a final cast pass anyway.  The price
is one extra read and write of the non-empty slot rows (T·k_avg·H elements,
small beside the expert weights the GEMMs stream) and one launch.  Empty
slots are neither written by the GEMM nor read by the combine (it checks the
slot's id first).  When K == 1 the slot row *is* the token row, so
the down GEMM writes the output directly (zero-initialised for tokens whose
only slot is empty) and the combine is skipped.

With ``weight_on_input`` the routing weight was applied to the expert input
by the gate/up kernel and APPLY_ROUTING_WEIGHT is off here.
"""

from __future__ import annotations

import triton.language as tl
from moepass.kernels._jit import jit_kernel
from moepass.kernels.config_store import tile_config_space

__all__ = ["down_kernel", "combine_slots_kernel", "down_config_space"]


@jit_kernel
def down_kernel(
    h_ptr,
    routing_ptr,
    sorted_slots_ptr,
    block_experts_ptr,
    padded_rows_ptr,
    w2_ptr,
    b2_ptr,
    y_ptr,
    num_slots,
    hidden,
    inter,
    capacity,
    stride_hr,
    stride_hi,
    stride_w2e,
    stride_w2n,
    stride_w2i,
    stride_b2e,
    stride_b2n,
    stride_ys,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPLY_ROUTING_WEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """y[slot] = weight · (h[row] @ W2[e]ᵀ + b2[e]) for every aligned, non-padding row.

    Args:
        h_ptr: [capacity, I] activations from the gate/up kernel.
        routing_ptr: [T*K] routing weights.
        sorted_slots_ptr: [capacity] int32 from the alignment kernel.
        block_experts_ptr: [cdiv(capacity, BLOCK_M)] int32 expert per row block.
        padded_rows_ptr: [1] int32 rows in use.
        w2_ptr: [E, H, I] or [E, I, H] (strides say which).
        b2_ptr: [E, H] biases (read only when HAS_BIAS).
        y_ptr: [T*K, H] out, one row per slot (rows of empty slots are not written).
        num_slots: T*K (the padding value of sorted_slots).
        hidden: H (columns of y).
        inter: I (the reduction size).
        capacity: rows of sorted_slots (sets the grid).
        stride_*: element strides of h [r, i], w2 [e, n, i], b2 [e, n], y [s, n].
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M: tile sizes and row-block grouping.
        HAS_BIAS: add b2.  APPLY_ROUTING_WEIGHT: multiply by the slot's routing weight.
        DOT_PRECISION, UPCAST_DOT: as in the gate/up kernel.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(capacity, BLOCK_M)
    num_pid_n = tl.cdiv(hidden, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    if pid_m * BLOCK_M >= tl.load(padded_rows_ptr):
        return
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    slots = tl.load(sorted_slots_ptr + rows)
    row_valid = slots < num_slots

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_hr + offs_k[None, :] * stride_hi
    w_ptrs = w2_ptr + expert * stride_w2e + offs_n.to(tl.int64)[None, :] * stride_w2n + offs_k[:, None] * stride_w2i

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(inter, BLOCK_K)):
        k_valid = offs_k < inter - k * BLOCK_K
        a = tl.load(h_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hi
        w_ptrs += BLOCK_K * stride_w2i

    if HAS_BIAS:
        acc += tl.load(b2_ptr + expert * stride_b2e + offs_n * stride_b2n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    if APPLY_ROUTING_WEIGHT:
        acc = acc * tl.load(routing_ptr + slots, mask=row_valid, other=0.0).to(tl.float32)[:, None]

    y_ptrs = y_ptr + slots.to(tl.int64)[:, None] * stride_ys + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_valid[:, None] & n_valid[None, :])


@jit_kernel
def combine_slots_kernel(
    y_ptr,
    ids_ptr,
    out_ptr,
    slots_per_token,
    hidden,
    num_experts,
    stride_ys,
    stride_yn,
    stride_ot,
    stride_on,
    BLOCK_N: tl.constexpr,
):
    """out[t] = Σ over t's non-empty slots j (in order) of y[t*K + j]. Grid: (T, cdiv(H, BLOCK_N)).

    Args:
        y_ptr: [T*K, H] per-slot rows from the down kernel.
        ids_ptr: [T*K] expert ids (int64 or int32); an id outside [0, E) marks an empty slot.
        out_ptr: [T, H] out, in x's dtype.
        slots_per_token: K.  hidden: H.  num_experts: E.
        stride_*: element strides of y [s, n] and out [t, n].
        BLOCK_N: columns per program.
    """
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < hidden
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(0, slots_per_token):
        slot = token * slots_per_token + j
        expert = tl.load(ids_ptr + slot)
        if (expert >= 0) & (expert < num_experts):  # an empty slot's row is never read
            row = tl.load(y_ptr + slot * stride_ys + offs_n * stride_yn, mask=n_valid, other=0.0)
            acc += row.to(tl.float32)
    tl.store(out_ptr + token * stride_ot + offs_n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=n_valid)


def down_config_space(block_m: int, hidden: int, inter: int, element_bytes: int, quick: bool = False):
    """Candidate tile configs of :func:`down_kernel` for a fixed BLOCK_M (see gate_up_config_space)."""
    return tile_config_space(block_m, n=hidden, k=inter, element_bytes=element_bytes, b_operands=1, quick=quick)
