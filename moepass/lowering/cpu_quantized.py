"""The CPU lowering of quantized experts: ATen's weight-only int8 and int4 kernels, one GEMM pair per expert hit.

::

    ids [T,K] ──► plan_slots (lowering/cpu.py)     non-empty slots sorted by expert
    x [T,H]   ──► gather rows                       xs [S,H]
                  h[rows of e] = xs[rows of e] · deq(W1[e])ᵀ   every expert e with rows
                  a = act(h)
                  y[rows of e] = a[rows of e] · deq(W2[e])ᵀ    every expert e with rows
                  out[t] = Σ_j w[t,j] · y[row of slot j]        float32 accumulation

Only the projections differ from :mod:`moepass.lowering.cpu`: each runs one of

``aten``
    int8 per channel: ``torch._weight_int8pack_mm(xs, q [N, K] int8, s [N])``;
    int4 in groups: ``torch.ops.aten._weight_int4pack_mm_for_cpu(xs, packed, G, scale_and_zero)``
    on the weights packed once by ``_convert_weight_to_int4pack_for_cpu`` (ATen's own order, which
    depends on the CPU's vector ISA — so it is made on the machine that runs it, never stored);
``gemv``
    moepass's own kernel (:mod:`moepass.lowering.cpu_qgemv`, C++ built on first use): every expert
    with rows in one call, on the plain layout as stored, output rows split over the threads; when
    every row count up to the call's tokens runs ``gemv`` and the block is a gated SiLU MLP with the
    routing weight on its output, the whole op is one native call (:func:`fused_decode_usable`);
``dequant``
    the expert's weights dequantized to the activations' dtype into a scratch buffer (``native``
    form: by the native kernel's table lookup), then the float kernel of
    :mod:`moepass.lowering.cpu_kernels` (a GEMM at many rows beats the weight-only kernels, whose
    inner loops are made for a few rows).

:func:`choose_quantized_kernel` picks per projection and row count; which *form* a block's operands
take (and so whether ``aten`` or ``gemv`` runs its few-row projections) is chosen at compile time
from this machine's measurements (:mod:`moepass.lowering.cpu_quantized_tuning`).

The operands come in one of three *forms* (the op's config says which):

``plain``
    the portable layout of :mod:`moepass.quantize.layout` (codes, float32 scales, zero points);
    any scheme; projections run ``dequant`` (never the native kernel: the plain form never builds it).
``native``
    the same tensors as ``plain``, chosen at compile time only where the native kernel was built,
    checked and measured faster on this machine; projections run ``gemv`` for few rows, ``dequant``
    beyond (and ``dequant`` everywhere should the library be missing in this process).
``aten_cpu``
    what the ATen kernels take, made by :func:`to_aten_cpu` from the plain layout once, at
    compile time: int8 per channel ``[codes [E,N,K] int8, scales [E,N]]`` (the same codes);
    int4 ``[packed [E,N,K/2] uint8, scale_and_zero [E,K/G,N,2]]`` with the zero point folded into
    ATen's convention ``(q − 8)·s + m``, m = (8 − z)·s.  Scales are in the activations' dtype.

Empty slots (id ``E``) cost no GEMM work.  Inference and training alike: the
op's backward (:mod:`moepass.runtime.quantized_ops`) dequantizes the experts
that were hit.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from moepass.compiler.spec import ExpertsSpec
from moepass.lowering.cpu import combine_rows, expert_outputs, gather_rows, plan_slots
from moepass.lowering.cpu_choice import choose_kernel
from moepass.lowering.cpu_kernels import activate_inplace, project
from moepass.lowering.workspace import scratch
from moepass.quantize.layout import (
    QuantizedWeight,
    pack_int4,
    pack_int4_row_blocks,
    unpack_int4,
    unpack_int4_row_blocks,
)
from moepass.quantize.scheme import QuantScheme
from moepass.runtime.stats import note_gemm_rows

__all__ = [
    "FORMS",
    "FORM_KERNELS",
    "PLAIN_FORMS",
    "ATEN_DTYPES",
    "QUANTIZED_KERNELS",
    "aten_cpu_supported",
    "to_aten_cpu",
    "dequantize_expert",
    "choose_quantized_kernel",
    "ATEN_UP_TO_ROWS",
    "GEMV_UP_TO_ROWS",
    "native_gemv_usable",
    "experts_forward",
    "operand_shape",
    "aten_int4_row_block",
    "aten_int4_operand",
    "stored_expert_operands",
    "project_rows",
]

logger = logging.getLogger(__name__)

FORMS = ("plain", "aten_cpu", "native")
#: Forms whose operands are the portable layout as stored.
PLAIN_FORMS = ("plain", "native")
#: Activation dtypes the ATen weight-only kernels run fast (in float32 they take a scalar path: on the
#: CI machine 4× (int8) and 12–50× (int4) slower than a float32 GEMM on the dequantized weights).
ATEN_DTYPES = (torch.bfloat16, torch.float16)
QUANTIZED_KERNELS = ("aten", "dequant", "gemv")
#: Kernels each form can run.
FORM_KERNELS = {"aten_cpu": ("aten", "dequant"), "plain": ("dequant",), "native": ("gemv", "dequant")}
#: Rows per expert up to which the ATen kernels run, by bits (a heuristic until the machine's table
#: measures it).  On the 2-core CI machine, one thread, a Mixtral-shaped expert (5632×1024) in
#: bfloat16: ``_weight_int8pack_mm`` 0.30 / 0.61 / 12 ms at 1 / 4 / 16 rows against 3 ms to
#: dequantize + 0.5–3 ms of GEMM; ``_weight_int4pack_mm_for_cpu`` 0.30 / 6.3 / 45 ms at 1 / 16 / 128
#: rows against 60 ms to dequantize (unpacking nibbles costs ~10 ns a weight in torch ops) + 0.5–20 ms.
ATEN_UP_TO_ROWS = {8: 8, 4: 256}
#: Rows per expert up to which the native kernel runs in the native form (a heuristic until the machine's
#: table measures it; the native form itself exists only where the table measured it faster): from 16 rows
#: dequantizing + oneDNN's bfloat16 GEMM wins on the CI machine.
GEMV_UP_TO_ROWS = 8


def aten_cpu_supported(scheme: QuantScheme, in_features: int) -> bool:
    """Whether the ATen CPU kernels take this scheme for rows of ``in_features`` (else: plain form, dequant)."""
    if scheme.bits == 8:
        return scheme.group_size in (0, in_features)
    return scheme.group_size in (32, 64, 128, 256) and in_features % scheme.group_size == 0


def to_aten_cpu(weight: QuantizedWeight, dtype: torch.dtype) -> list[torch.Tensor]:
    """The ATen kernels' operands of ``weight`` for activations of ``dtype`` (see the module docstring)."""
    experts, out_features, in_features = weight.shape
    if not aten_cpu_supported(weight.scheme, in_features):
        raise ValueError(f"{weight.scheme.describe()} has no ATen CPU form")
    if weight.scheme.bits == 8:
        return [weight.codes, weight.scales[..., 0].to(dtype).contiguous()]
    block = aten_int4_row_block(out_features, in_features)
    codes = weight.integer_codes()
    if block is not None:  # the order is known: repack the codes in torch ops (4× faster than ATen's own)
        packed = pack_int4_row_blocks(codes, block)
    else:
        packed = torch.empty(experts, out_features, in_features // 2, dtype=torch.uint8)
        for expert in range(experts):
            packed[expert] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes[expert].to(torch.int32).contiguous(), 1
            )
    zeros = weight.zero_points().float()
    offsets = (8.0 - zeros) * weight.scales  # (q − z)·s = (q − 8)·s + (8 − z)·s
    scale_and_zero = torch.stack([weight.scales, offsets], dim=-1)  # [E, N, K/G, 2]
    return [packed, scale_and_zero.transpose(1, 2).to(dtype).contiguous()]


#: (out, in) → rows per block of ATen's int4 CPU packing on this machine (None: not a known order).
_INT4_BLOCKS: dict[tuple[int, int], int | None] = {}


def _unpack_aten_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Codes [N, K] from ATen's CPU int4 packing with ``block`` rows per block (see
    :func:`moepass.quantize.layout.pack_int4_row_blocks`)."""
    return unpack_int4_row_blocks(packed, block)


def _learn_int4_block(packed: torch.Tensor, codes: torch.Tensor) -> None:
    """Find which row-block order reads this shape's ATen packing back exactly.

    Checked on real codes of the shape (an expert just packed by ATen), so a torch build with another
    order falls back to reading through the kernel (right, slower) instead of misreading.
    """
    key = tuple(codes.shape)
    if key in _INT4_BLOCKS:
        return
    found = None
    for block in (64, 32, 16, 128):
        if codes.shape[0] % block == 0 and torch.equal(_unpack_aten_int4(packed, block), codes.to(torch.uint8)):
            found = block
            break
    if found is None:
        logger.info("ATen's int4 CPU packing of %s is not a known block order: dequantizing through the kernel", key)
    _INT4_BLOCKS[key] = found


def aten_int4_row_block(out_features: int, in_features: int) -> int | None:
    """The row-block order of ATen's int4 CPU operands for [out, in] on this machine (None: another order)."""
    key = (out_features, in_features)
    if key not in _INT4_BLOCKS:
        codes = torch.randint(0, 16, key, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        _learn_int4_block(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), codes)
    return _INT4_BLOCKS[key]


def aten_int4_operand(codes: torch.Tensor, stored_block: int) -> torch.Tensor:
    """ATen's int4 operand [N, K/2] for one matrix whose codes are stored in row-block order ``stored_block``
    (0: plain order) — the stored bytes themselves when this machine uses that order."""
    out_features, half = codes.shape
    block = aten_int4_row_block(out_features, 2 * half)
    if stored_block and block == stored_block:
        return codes
    values = unpack_int4_row_blocks(codes, stored_block) if stored_block else unpack_int4(codes)
    if block is not None:
        return pack_int4_row_blocks(values, block)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32).contiguous(), 1)


def operand_shape(operands: list[torch.Tensor], form: str, scheme: QuantScheme) -> tuple[int, int, int]:
    """(E, out, in) of one projection's operands."""
    codes = operands[0]
    experts, out_features, width = codes.shape
    return experts, out_features, width * (2 if scheme.bits == 4 else 1)


@functools.lru_cache(maxsize=64)
def _identity(size: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.eye(size, dtype=dtype)


def dequantize_expert(operands: list[torch.Tensor], form: str, scheme: QuantScheme, expert: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Expert ``expert``'s weights [out, in] in ``dtype``, from operands of either form.

    int4 ATen operands are read back through the kernel itself on an identity
    matrix (it computes (q − 8)·s + m exactly for one-hot rows), since their
    byte order is ATen's.
    """
    _, out_features, in_features = operand_shape(operands, form, scheme)
    group = scheme.group_of(in_features)
    if form in PLAIN_FORMS:
        codes, scales = operands[0][expert], operands[1][expert]
        if scheme.bits == 8:
            values = codes.to(dtype)
        else:
            values = torch.stack([codes & 0x0F, codes >> 4], dim=-1).view(out_features, in_features).to(dtype)
            zeros = operands[2][expert] if len(operands) > 2 else None
            values = values.view(out_features, in_features // group, group)
            values = values - (8 if zeros is None else zeros.to(dtype).unsqueeze(-1))
        values = values.view(out_features, in_features // group, group) * scales.to(dtype).unsqueeze(-1)
        return values.view(out_features, in_features)
    if scheme.bits == 8:
        codes, scales = operands
        return (codes[expert].to(scales.dtype) * scales[expert].unsqueeze(1)).to(dtype)
    packed, scale_and_zero = operands
    block = _INT4_BLOCKS.get((out_features, in_features))
    if block is None:  # read back through the kernel: it computes (q − 8)·s + m exactly for one-hot rows
        eye = _identity(in_features, scale_and_zero.dtype)
        transposed = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed[expert], group, scale_and_zero[expert])
        return transposed.t().to(dtype)
    codes = _unpack_aten_int4(packed[expert], block).view(out_features, in_features // group, group)
    scale, offset = scale_and_zero[expert].to(dtype).unbind(-1)  # [K/G, N] each
    matrix = torch.addcmul(offset.t().unsqueeze(-1), codes.to(dtype) - 8, scale.t().unsqueeze(-1))
    return matrix.reshape(out_features, in_features)


def native_gemv_usable(scheme: QuantScheme, in_features: int, dtype: torch.dtype) -> bool:
    """Whether the native kernel (:mod:`moepass.lowering.cpu_qgemv`) runs this projection here (builds the library
    on first call: only the compile-time choice with tuning on, and the ``native`` form, ask)."""
    from moepass.lowering import cpu_qgemv

    return cpu_qgemv.supports(scheme, in_features, dtype) and cpu_qgemv.available()


def choose_quantized_kernel(scheme: QuantScheme, form: str, rows: int, out_features: int, in_features: int,
                            dtype: torch.dtype) -> str:
    """The kernel (:data:`QUANTIZED_KERNELS`) for one projection of ``rows`` rows in ``form``.

    The one place the choice is made: this machine's measured table
    (:mod:`moepass.lowering.cpu_quantized_tuning`, family ``cpu_quantized``),
    else a heuristic — the ATen kernels up to :data:`ATEN_UP_TO_ROWS` rows, the
    native kernel up to :data:`GEMV_UP_TO_ROWS`; beyond, the weights are
    dequantized and a float GEMM runs.  ``gemv`` only in the ``native`` form
    and where the native kernel is available and takes the scheme.
    """
    if form not in ("aten_cpu", "native"):
        return "dequant"
    if form == "native" and not native_gemv_usable(scheme, in_features, dtype):
        return "dequant"
    from moepass.lowering.cpu_quantized_choice import chosen_kernel

    measured = chosen_kernel(scheme, dtype, out_features, in_features, rows, form)
    if measured is not None:
        return measured
    if form == "native":
        return "gemv" if rows <= GEMV_UP_TO_ROWS else "dequant"
    return "aten" if rows <= ATEN_UP_TO_ROWS[scheme.bits] else "dequant"


def _run_aten(scheme: QuantScheme, operands: list[torch.Tensor], expert: int, xs: torch.Tensor,
              in_features: int) -> torch.Tensor:
    if scheme.bits == 8:
        codes, scales = operands
        return torch._weight_int8pack_mm(xs, codes[expert], scales[expert])
    packed, scale_and_zero = operands
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xs, packed[expert], scheme.group_of(in_features),
                                                     scale_and_zero[expert])


def _dequantize_into(matrix: torch.Tensor, operands: list[torch.Tensor], form: str, scheme: QuantScheme,
                     expert: int) -> None:
    """matrix [out, in] ← expert ``expert``'s weights in matrix's dtype (the native kernel's table lookup for the
    native form: each weight (q − z)·s in float32, rounded once)."""
    if form == "native" and matrix.dtype in (torch.float32, torch.bfloat16, torch.float16):
        from moepass.lowering import cpu_qgemv

        if cpu_qgemv.available():
            if scheme.bits == 8:
                cpu_qgemv.dequantize_int8(operands[0][expert], operands[1][expert], matrix.dtype, out=matrix)
            else:
                zeros = operands[2][expert] if len(operands) > 2 else None
                cpu_qgemv.dequantize_int4(operands[0][expert], operands[1][expert], zeros,
                                          scheme.group_of(matrix.shape[1]), matrix.dtype, out=matrix)
            return
    matrix.copy_(dequantize_expert(operands, form, scheme, expert, matrix.dtype))


def _project_quantized(inputs: torch.Tensor, outputs: torch.Tensor, counts: list[int], operands: list[torch.Tensor],
                       bias: torch.Tensor | None, scheme: QuantScheme, form: str, note: bool,
                       kernel: str | None = None, tasks=None) -> None:
    """outputs[rows of e] = inputs[rows of e] · deq(W[e])ᵀ (+ b[e]) for every expert e with rows
    (``kernel`` forces one, for measuring; ``tasks``: :func:`moepass.lowering.cpu_qgemv.expert_tasks` of
    ``counts``, when the caller has it).

    The experts whose kernel is ``gemv`` run in one native call; the others one by one.
    """
    _, out_features, in_features = operand_shape(operands, form, scheme)
    dtype = inputs.dtype
    choices = {count: kernel or choose_quantized_kernel(scheme, form, count, out_features, in_features, dtype)
               for count in set(counts) if count}
    if "gemv" in choices.values():
        from moepass.lowering import cpu_qgemv

        if tasks is None:
            tasks = cpu_qgemv.expert_tasks(counts)
        if len(choices) > 1:  # some experts' row counts take another kernel
            keep = np.fromiter((choices[int(c)] == "gemv" for c in tasks[2]), dtype=bool, count=tasks.shape[1])
            tasks = np.ascontiguousarray(tasks[:, keep])
        cpu_qgemv.project(inputs, outputs, tasks, operands, bias, scheme)
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        rows = slice(start, start + count)
        chosen = choices[count]
        if chosen == "aten":
            result = _run_aten(scheme, operands, expert, inputs[rows], in_features)
            if bias is not None:
                result = result.add_(bias[expert].to(result.dtype))
            outputs[rows].copy_(result)
        elif chosen == "dequant":
            matrix = scratch("dequantized", (out_features, in_features), dtype)
            _dequantize_into(matrix, operands, form, scheme, expert)
            float_kernel = choose_kernel(count, (out_features, in_features), dtype, False)
            project(float_kernel, inputs[rows], outputs[rows], matrix, None if bias is None else bias[expert], False)
        if note:
            note_gemm_rows(count)
        start += count


def stored_expert_operands(views: dict[str, torch.Tensor], name: str, scheme: QuantScheme, row_block: int,
                           dtype: torch.dtype) -> tuple[list[torch.Tensor], str]:
    """One expert's projection ``name`` (``w1`` | ``w2``) as read from an expert store, as operands
    (stacks of one) and their form for :func:`project_rows` — ATen's for 16-bit activations (the stored
    int4 bytes themselves when this machine uses their row-block order), plain otherwise."""
    codes, scales = views[f"{name}.codes"], views[f"{name}.scales"]
    zeros = views.get(f"{name}.zeros")
    in_features = codes.shape[1] * (2 if scheme.bits == 4 else 1)
    if dtype in ATEN_DTYPES and aten_cpu_supported(scheme, in_features):
        if scheme.bits == 8:
            return [codes.unsqueeze(0), scales[:, 0].to(dtype).unsqueeze(0)], "aten_cpu"
        zero = 8.0 - (zeros.float() if zeros is not None else 8.0)
        scale_and_zero = torch.stack([scales, zero * scales], dim=-1).transpose(0, 1).to(dtype).contiguous()
        return [aten_int4_operand(codes, row_block).unsqueeze(0), scale_and_zero.unsqueeze(0)], "aten_cpu"
    if scheme.bits == 4 and row_block:
        codes = pack_int4(unpack_int4_row_blocks(codes, row_block))
    plain = [codes.unsqueeze(0), scales.unsqueeze(0)] + ([zeros.unsqueeze(0)] if zeros is not None else [])
    return plain, "plain"


def project_rows(inputs: torch.Tensor, outputs: torch.Tensor, operands: list[torch.Tensor], bias: torch.Tensor | None,
                 scheme: QuantScheme, form: str) -> None:
    """outputs = inputs · deq(W)ᵀ (+ bias) for one expert's operands (stacks of one)."""
    _project_quantized(inputs, outputs, [inputs.shape[0]], operands, None if bias is None else bias.unsqueeze(0),
                       scheme, form, note=False)


#: Tokens up to which the native form may run the whole op in one native call (where the measured kernel of
#: every row count up to the call's tokens is ``gemv`` for both projections).
FUSED_UP_TO_TOKENS = 16


@functools.lru_cache(maxsize=256)
def _fused_tokens(scheme: QuantScheme, dtype: torch.dtype, first: tuple[int, int], second: tuple[int, int],
                  generation: int) -> int:
    """The most tokens a call may have and still run fused: each expert then has at most that many rows, and
    every row count up to it must run ``gemv`` in both projections (this machine's table, else the
    heuristic)."""
    tokens = 0
    for rows in range(1, FUSED_UP_TO_TOKENS + 1):
        if any(choose_quantized_kernel(scheme, "native", rows, out, inp, dtype) != "gemv" for out, inp in (first, second)):
            break
        tokens = rows
    return tokens


def fused_decode_usable(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: list[torch.Tensor],
                        w2: list[torch.Tensor], b1, b2, spec: ExpertsSpec, scheme: QuantScheme, form: str) -> bool:
    """Whether this call runs as one native call (:func:`moepass.lowering.cpu_qgemv.fused_experts`): the native
    form, few tokens, a gated SiLU expert MLP the kernel has, the routing weight on the output, and operands
    and dtypes it takes."""
    from moepass.lowering import cpu_qgemv
    from moepass.runtime.tuning import generation

    dtypes = cpu_qgemv.DTYPES
    if (form != "native" or not spec.gated or spec.weight_on_input or spec.transposed or spec.output
            or (spec.activation, spec.gate_up_layout) not in cpu_qgemv.FUSED_ACTIVATIONS
            or x.dim() != 2 or ids.dtype != torch.int64 or x.dtype not in dtypes or weights.dtype not in dtypes
            or any(b is not None and (b.dtype not in dtypes or not b.is_contiguous()) for b in (b1, b2))
            or not all(t.is_contiguous() for t in (*w1, *w2))):
        return False
    _, out1, in1 = operand_shape(w1, form, scheme)
    _, out2, in2 = operand_shape(w2, form, scheme)
    if out1 != 2 * in2 or out2 != in1 or x.shape[1] != in1:
        return False
    return x.shape[0] <= _fused_tokens(scheme, x.dtype, (out1, in1), (out2, in2), generation())


def experts_forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: list[torch.Tensor],
                    w2: list[torch.Tensor], b1: torch.Tensor | None, b2: torch.Tensor | None, spec: ExpertsSpec,
                    scheme: QuantScheme, form: str) -> torch.Tensor:
    """The quantized experts op on CPU tensors ([E, out, in] operands; see the module docstring)."""
    if fused_decode_usable(x, ids, weights, w1, w2, b1, b2, spec, scheme, form):
        from moepass.lowering.cpu_qgemv import fused_experts
        from moepass.runtime.stats import counting_gemm_rows, note_gemm_rows

        counts = np.zeros(spec.num_experts, dtype=np.int64) if counting_gemm_rows() else None
        out = fused_experts(x, ids, weights, w1, w2, b1, b2, scheme, (spec.activation, spec.gate_up_layout), counts)
        for count in () if counts is None else counts[counts > 0].tolist():
            note_gemm_rows(count)
        return out
    plan = plan_slots(ids, spec.num_experts)
    xs = gather_rows(x, weights, plan, spec)
    n1 = operand_shape(w1, form, scheme)[1]
    h = scratch("h", (xs.shape[0], n1), x.dtype)
    tasks = None
    if form == "native":  # the experts' (first row, rows), once for both projections of the native kernel
        from moepass.lowering.cpu_qgemv import expert_tasks

        tasks = expert_tasks(plan.counts)
    _project_quantized(xs, h, plan.counts, w1, b1, scheme, form, note=False, tasks=tasks)
    a = activate_inplace(h, spec)
    if not a.is_contiguous():
        a = a.contiguous()
    y = expert_outputs(x.shape[1], plan, x.dtype)
    _project_quantized(a, y, plan.counts, w2, b2, scheme, form, note=True, tasks=tasks)
    return combine_rows(y, weights, plan, spec)
