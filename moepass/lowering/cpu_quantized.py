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
``dequant``
    the expert's weights dequantized to the activations' dtype into a scratch buffer, then the
    float kernel of :mod:`moepass.lowering.cpu_kernels` (a GEMM at many rows beats the weight-only
    kernels, whose inner loops are made for a few rows).

:func:`choose_quantized_kernel` picks per projection and row count.

The operands come in one of two *forms* (the op's config says which):

``plain``
    the portable layout of :mod:`moepass.quantize.layout` (codes, float32 scales, zero points);
    any scheme; projections run ``dequant``.
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

import torch

from moepass.compiler.spec import ExpertsSpec
from moepass.lowering.cpu import combine_rows, expert_outputs, gather_rows, plan_slots
from moepass.lowering.cpu_kernels import activate_inplace, choose_kernel, project
from moepass.lowering.workspace import scratch
from moepass.quantize.layout import QuantizedWeight, dequantize, unpack_int4
from moepass.quantize.scheme import QuantScheme
from moepass.runtime.stats import note_gemm_rows

__all__ = [
    "FORMS",
    "QUANTIZED_KERNELS",
    "aten_cpu_supported",
    "to_aten_cpu",
    "dequantize_expert",
    "choose_quantized_kernel",
    "experts_forward",
    "operand_shape",
]

logger = logging.getLogger(__name__)

FORMS = ("plain", "aten_cpu")
QUANTIZED_KERNELS = ("aten", "dequant")
#: Rows per expert from which an int8 projection dequantizes and runs a float GEMM (heuristic until
#: the machine's table measures it): on the 2-core CI machine ``_weight_int8pack_mm`` streamed a
#: Mixtral-shaped expert 2× faster than the bfloat16 GEMM at 1–4 rows and 2–3× slower at 64+.
INT8_DEQUANT_FROM_ROWS = 32


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
    group = weight.group
    packed = torch.empty(experts, out_features, in_features // 2, dtype=torch.uint8)
    codes = weight.integer_codes()
    for expert in range(experts):
        packed[expert] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[expert].to(torch.int32).contiguous(), 1)
    zeros = weight.zero_points().float()
    offsets = (8.0 - zeros) * weight.scales  # (q − z)·s = (q − 8)·s + (8 − z)·s
    scale_and_zero = torch.stack([weight.scales, offsets], dim=-1)  # [E, N, K/G, 2]
    del group
    return [packed, scale_and_zero.transpose(1, 2).to(dtype).contiguous()]


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
    if form == "plain":
        zeros = operands[2][expert : expert + 1] if len(operands) > 2 else None
        one = QuantizedWeight(operands[0][expert : expert + 1], operands[1][expert : expert + 1], zeros, scheme,
                              (1, out_features, in_features))
        return dequantize(one, dtype)[0]
    if scheme.bits == 8:
        codes, scales = operands
        return (codes[expert].to(scales.dtype) * scales[expert].unsqueeze(1)).to(dtype)
    packed, scale_and_zero = operands
    eye = _identity(in_features, scale_and_zero.dtype)
    transposed = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed[expert], scheme.group_of(in_features),
                                                           scale_and_zero[expert])
    return transposed.t().to(dtype)


def choose_quantized_kernel(scheme: QuantScheme, form: str, rows: int, out_features: int, in_features: int,
                            dtype: torch.dtype) -> str:
    """The kernel (:data:`QUANTIZED_KERNELS`) for one projection of ``rows`` rows.

    The one place the choice is made: a heuristic until the machine-keyed
    tables of the CPU tuning (issue 21) measure it per machine.  int4 always
    runs ``aten`` (its dequantization goes through the kernel: never faster);
    int8 runs ``aten`` up to :data:`INT8_DEQUANT_FROM_ROWS` rows.
    """
    del out_features, in_features, dtype  # the measured table will key on them
    if form != "aten_cpu":
        return "dequant"
    if scheme.bits == 4:
        return "aten"
    return "aten" if rows < INT8_DEQUANT_FROM_ROWS else "dequant"


def _run_aten(scheme: QuantScheme, operands: list[torch.Tensor], expert: int, xs: torch.Tensor,
              in_features: int) -> torch.Tensor:
    if scheme.bits == 8:
        codes, scales = operands
        return torch._weight_int8pack_mm(xs, codes[expert], scales[expert])
    packed, scale_and_zero = operands
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xs, packed[expert], scheme.group_of(in_features),
                                                     scale_and_zero[expert])


def _project_quantized(inputs: torch.Tensor, outputs: torch.Tensor, counts: list[int], operands: list[torch.Tensor],
                       bias: torch.Tensor | None, scheme: QuantScheme, form: str, note: bool) -> None:
    """outputs[rows of e] = inputs[rows of e] · deq(W[e])ᵀ (+ b[e]) for every expert e with rows."""
    _, out_features, in_features = operand_shape(operands, form, scheme)
    dtype = inputs.dtype
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        rows = slice(start, start + count)
        kernel = choose_quantized_kernel(scheme, form, count, out_features, in_features, dtype)
        if kernel == "aten":
            result = _run_aten(scheme, operands, expert, inputs[rows], in_features)
            if bias is not None:
                result = result.add_(bias[expert].to(result.dtype))
            outputs[rows].copy_(result)
        else:
            matrix = scratch("dequantized", (out_features, in_features), dtype)
            matrix.copy_(dequantize_expert(operands, form, scheme, expert, dtype))
            float_kernel = choose_kernel(count, (out_features, in_features), dtype, False)
            project(float_kernel, inputs[rows], outputs[rows], matrix, None if bias is None else bias[expert], False)
        if note:
            note_gemm_rows(count)
        start += count


def experts_forward(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: list[torch.Tensor],
                    w2: list[torch.Tensor], b1: torch.Tensor | None, b2: torch.Tensor | None, spec: ExpertsSpec,
                    scheme: QuantScheme, form: str) -> torch.Tensor:
    """The quantized experts op on CPU tensors ([E, out, in] operands; see the module docstring)."""
    plan = plan_slots(ids, spec.num_experts)
    xs = gather_rows(x, weights, plan, spec)
    n1 = operand_shape(w1, form, scheme)[1]
    h = scratch("h", (xs.shape[0], n1), x.dtype)
    _project_quantized(xs, h, plan.counts, w1, b1, scheme, form, note=False)
    a = activate_inplace(h, spec)
    if not a.is_contiguous():
        a = a.contiguous()
    y = expert_outputs(x.shape[1], plan, x.dtype)
    _project_quantized(a, y, plan.counts, w2, b2, scheme, form, note=True)
    return combine_rows(y, weights, plan, spec)
