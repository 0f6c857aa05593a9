"""Gate/up GEMM over the aligned rows, with the expert activation fused in its epilogue.

::

    row r (of an expert-sorted BLOCK_M block, expert e):  s = sorted_slots[r], t = s // K
    a      = x[t]                      (· routing_weight[s] first when weight_on_input)
    gate   = a @ W1[e][gate cols]ᵀ (+ b1[e][gate cols])      fp32 accumulators
    up     = a @ W1[e][up cols]ᵀ   (+ b1[e][up cols])
    h[r]   = act(gate) * up           gated silu / gelu / gelu_tanh / relu
           = (clamp(up,-l,l) + 1) · g · σ(α·g),  g = clamp(gate, max=l)    gpt-oss swiglu_clamp
           = act(a @ W1[e]ᵀ + b1[e])  plain (ungated) experts

Gate and up columns are addressed as ``gate col = n * col_step``, ``up col =
n * col_step + up_offset``: (1, I) for the concatenated layout ``[gate; up]``
and (2, 1) for the interleaved one ``[g0, u0, g1, u1, ...]``.  Weights are
read through strides, so ``[E, N1, H]`` and ``[E, H, N1]`` (transposed) need
no copy.  Padding rows (slot == T*K) load zeros and store nothing; blocks past
``padded_rows`` exit at once.  Grid: 1-D over cdiv(capacity, BLOCK_M) ×
cdiv(I, BLOCK_N), grouped GROUP_M row-blocks at a time so neighbouring
programs share weight tiles in L2.
"""

from __future__ import annotations

import triton.language as tl
from moepass.kernels._jit import jit_kernel
from moepass.kernels.config_store import tile_config_space

__all__ = ["gate_up_kernel", "gate_up_config_space", "ACTIVATION_CODES"]

#: Activation names (moepass.compiler.spec.ACTIVATIONS) to the kernels' ACTIVATION constexpr.
#: ``identity`` stores the projection as it is (a lifted activation then runs
#: as a separate elementwise pass before the down kernel).
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_clamp": 4, "identity": 5}

_SILU = tl.constexpr(0)
_GELU = tl.constexpr(1)
_GELU_TANH = tl.constexpr(2)
_RELU = tl.constexpr(3)
_SWIGLU_CLAMP = tl.constexpr(4)
_IDENTITY = tl.constexpr(5)


@jit_kernel
def gate_up_kernel(
    x_ptr,
    routing_ptr,
    sorted_slots_ptr,
    block_experts_ptr,
    padded_rows_ptr,
    w1_ptr,
    b1_ptr,
    h_ptr,
    num_slots,
    slots_per_token,
    hidden,
    inter,
    capacity,
    col_step,
    up_offset,
    swiglu_alpha,
    swiglu_limit,
    stride_xt,
    stride_xh,
    stride_w1e,
    stride_w1n,
    stride_w1h,
    stride_b1e,
    stride_b1n,
    stride_hr,
    stride_hi,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """h = act(x[token] @ W1[e]ᵀ + b1[e]) for every aligned row.

    Args:
        x_ptr: [T, H] tokens (bf16, fp16 or fp32).
        routing_ptr: [T*K] routing weights (read only when WEIGHT_ON_INPUT).
        sorted_slots_ptr: [capacity] int32 from the alignment kernel.
        block_experts_ptr: [cdiv(capacity, BLOCK_M)] int32 expert per row block.
        padded_rows_ptr: [1] int32 rows in use.
        w1_ptr: [E, N1, H] or [E, H, N1] (strides say which); N1 = 2I gated, I plain.
        b1_ptr: [E, N1] biases (read only when HAS_BIAS).
        h_ptr: [capacity, I] out, in x's dtype; padding rows are not written.
        num_slots: T*K (the padding value of sorted_slots).
        slots_per_token: K.
        hidden: H (the reduction size).
        inter: I (columns of h).
        capacity: rows of sorted_slots (sets the grid).
        col_step, up_offset: gate/up column placement in N1 (see the module docstring).
        swiglu_alpha, swiglu_limit: the clamped SwiGLU's α and limit.
        stride_*: element strides of x [t, h], w1 [e, n, h], b1 [e, n], h [r, i].
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M: tile sizes and row-block grouping.
        ACTIVATION: an ACTIVATION_CODES value.  GATED: act(gate) * up, or act(h).
        HAS_BIAS: add b1.  WEIGHT_ON_INPUT: scale x by the routing weight first (Llama 4).
        DOT_PRECISION: tl.dot's input_precision for fp32 inputs ("tf32x3" or "tf32"); unused for 16-bit.
        UPCAST_DOT: multiply in fp32 (the interpreter's bf16 dot is wrong in Triton 3.9).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(capacity, BLOCK_M)
    num_pid_n = tl.cdiv(inter, BLOCK_N)
    programs_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // programs_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    if pid_m * BLOCK_M >= tl.load(padded_rows_ptr):
        return
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    row_valid = slots < num_slots
    tokens = (slots // slots_per_token).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh
    gate_cols = (offs_n * col_step).to(tl.int64)
    gate_ptrs = w1_ptr + expert * stride_w1e + gate_cols[None, :] * stride_w1n + offs_k[:, None] * stride_w1h
    up_ptrs = gate_ptrs + up_offset * stride_w1n
    if WEIGHT_ON_INPUT:
        row_weight = tl.load(routing_ptr + slots, mask=row_valid, other=0.0).to(tl.float32)

    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        k_valid = offs_k < hidden - k * BLOCK_K
        a = tl.load(x_ptrs, mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        if WEIGHT_ON_INPUT:
            a = (a.to(tl.float32) * row_weight[:, None]).to(x_ptr.dtype.element_ty)
        b_gate = tl.load(gate_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b_gate = b_gate.to(tl.float32)
        acc_gate = tl.dot(a, b_gate, acc_gate, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(up_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
            if UPCAST_DOT:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        gate_ptrs += BLOCK_K * stride_w1h
        up_ptrs += BLOCK_K * stride_w1h

    if HAS_BIAS:
        bias_ptrs = b1_ptr + expert * stride_b1e + gate_cols * stride_b1n
        acc_gate += tl.load(bias_ptrs, mask=n_valid, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptrs + up_offset * stride_b1n, mask=n_valid, other=0.0).to(tl.float32)[None, :]

    # Epilogue: the activation, in fp32, on the accumulators.
    g = acc_gate
    if ACTIVATION == _SWIGLU_CLAMP:
        g = tl.minimum(g, swiglu_limit)
        act = g * tl.sigmoid(g * swiglu_alpha)
    elif ACTIVATION == _SILU:
        act = g * tl.sigmoid(g)
    elif ACTIVATION == _GELU:
        act = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACTIVATION == _GELU_TANH:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g * tl.sigmoid(2.0 * inner)  # 0.5·(1 + tanh(z)) = σ(2z)
    elif ACTIVATION == _IDENTITY:
        act = g
    else:
        act = tl.maximum(g, 0.0)
    if GATED:
        up = acc_up
        if ACTIVATION == _SWIGLU_CLAMP:
            up = tl.minimum(tl.maximum(up, -swiglu_limit), swiglu_limit) + 1.0
        act = act * up

    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hr + offs_n[None, :] * stride_hi
    tl.store(h_ptrs, act.to(h_ptr.dtype.element_ty), mask=row_valid[:, None] & n_valid[None, :])


def gate_up_config_space(block_m: int, hidden: int, inter: int, element_bytes: int, gated: bool, quick: bool = False):
    """Candidate tile configs of :func:`gate_up_kernel` for a fixed BLOCK_M.

    Returns dicts with BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.  Tiles
    larger than the problem (next power of two of I and H) are dropped, as are
    configs whose pipelined tiles exceed MAX_SHARED_BYTES of shared memory.
    """
    return tile_config_space(block_m, n=inter, k=hidden, element_bytes=element_bytes, b_operands=2 if gated else 1, quick=quick)
