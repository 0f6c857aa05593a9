"""Quantized experts in a block's function: ``com.microsoft.QMoE``, ``MatMulNBits`` pairs, or ``DequantizeLinear``.

The block node's weights are the packed layout of :mod:`moepass.quantize.layout`
(``w1.codes``, ``w1.scales``, ``w1.zeros``?; the same for ``w2``; [E, out, in]).
Each form below turns them into its operator's operands with ops on those
initializers only (Gather, Cast, bit shifts, reshapes), which ONNX Runtime
folds once when the session is created.

``qmoe`` (target ``ort``, the default)::

    probs[t, e]   = log w_tj at each kept slot's expert, −1e30 elsewhere         selection
    weights[t, e] = w_tj at each kept slot's expert, 0 elsewhere                 router_weights (input 14)
    y = com.microsoft.QMoE(x, probs, fc1, s1, b1, fc2, s2, b2, …, z1, z2, …, weights,
                           k = k_max, expert_weight_bits, block_size, swiglu_fusion = 1)

    The top-k of ``probs`` holds a token's kept experts first; the per-slot
    weights come from ``router_weights``, exactly (no renormalisation), and the
    CPU kernel skips a route whose weight is ≤ 1e-8 — a dropped slot costs no
    GEMM row.  Codes: 8 bits as uint8 q + 128 (the kernel's default zero point
    128), 4 bits as stored (zero point 8 unless given, packed two per byte).

``matmulnbits`` (target ``ort``, ``ort_layout="gemm"``; also where QMoE cannot
compute the activation)::

    per expert e with rows:  h = MatMulNBits(x[rows], B1[e], s1[e], z1[e], b1[e]);  a = act(h)
                             y = MatMulNBits(a, B2[e], s2[e], z2[e], b2[e]) · w    (accuracy_level 0: exact)

``dequantize`` (target ``portable``: standard ONNX ops)::

    W[e] = DequantizeLinear(codes[e], scales[e], zeros[e])    int8: per output channel (axis 0);
                                                              int4: unpacked nibbles, one row per group
    h = Gemm(x[rows], W1[e], b1[e], transB=1) …                in the portable Loop over experts

Every form computes ``(q − z) · s`` in float32 from the same codes, so each
matches the torch model's quantized op (the dequantized reference) to
round-off.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from moepass.compiler.spec import ExpertsSpec
from moepass.lowering.onnx.builder import FLOAT, INT64, NodeBuilder
from moepass.lowering.onnx.experts_ort import _FLOOR, ORT_DOMAIN, _interleave_index, _masked_logits
from moepass.quantize.scheme import QuantScheme

__all__ = ["QUANTIZED_HOWS", "QuantizedOperands", "qmoe_unsupported_reason", "qmoe_experts", "matmulnbits_projector",
           "dequantize_projector"]

UINT8 = TensorProto.UINT8
INT8 = TensorProto.INT8
INT32 = TensorProto.INT32

#: How quantized experts run in an export (see the module docstring).
QUANTIZED_HOWS = ("qmoe", "matmulnbits", "dequantize")


class QuantizedOperands:
    """The names of one block's quantized weights inside its function, and their shapes."""

    def __init__(self, roles: list[str], spec: ExpertsSpec, scheme: QuantScheme, n1: int):
        self.scheme = scheme
        self.spec = spec
        present = set(roles)
        self.names = {
            name: {part: f"{name}.{part}" for part in ("codes", "scales", "zeros") if f"{name}.{part}" in present}
            for name in ("w1", "w2")
        }
        #: (out, in) of each projection.
        self.shapes = {"w1": (n1, spec.hidden_size), "w2": (spec.hidden_size, spec.intermediate_size)}

    def group(self, name: str) -> int:
        return self.scheme.group_of(self.shapes[name][1])


def qmoe_unsupported_reason(spec: ExpertsSpec, scheme: QuantScheme) -> str | None:
    """Why ``com.microsoft.QMoE`` cannot run these quantized experts exactly (None when it can)."""
    if spec.activation == "lifted":
        return "a lifted activation: QMoE has fixed activations only"
    if spec.gated and spec.activation not in ("silu", "swiglu_clamp"):
        return f"gated {spec.activation}: QMoE gates with SwiGLU only"
    if not spec.gated and spec.activation not in ("silu", "relu"):
        return f"{spec.activation}: QMoE's gelu is the tanh approximation"
    if spec.weight_on_input:
        return "the routing weight scales the experts' input"
    if scheme.group_size and (scheme.group_size < 16 or scheme.group_size & (scheme.group_size - 1)):
        return f"block size {scheme.group_size} is not a power of two ≥ 16"
    if scheme.bits == 8 and scheme.group_size:
        return "block-wise 8-bit QMoE runs int8 activations on CPU (not exact)"
    return None


def _uint8_codes(b: NodeBuilder, codes: str, scheme: QuantScheme) -> str:
    """Codes as the uint8 the ORT operators take: 8 bits shifted by 128 (their default zero point)."""
    if scheme.bits == 4:
        return codes
    return b.cast(b.op("Add", b.cast(codes, INT32), b.const(128, INT32)), UINT8)


def _pack_pairs(b: NodeBuilder, values: str, count: int) -> str:
    """uint8 [..., count] of 4-bit values → [..., ceil(count / 2)] two per byte, low nibble first."""
    if count % 2:
        pads = [0] * 3 + [0, 0, 1]  # pad the last axis of a 3-D tensor by one zero
        values = b.op("Pad", values, b.ints(pads), b.const(0, UINT8))
        count += 1
    low = b.slice(values, [0], [count], [-1], [2])
    high = b.slice(values, [1], [count], [-1], [2])
    return b.op("BitwiseOr", low, b.op("BitShift", high, b.const(4, UINT8), direction="LEFT"))


def _scales_as(b: NodeBuilder, scales: str, scheme: QuantScheme, elem_type: int) -> str:
    """Scales [E, N, groups] (per channel: [E, N]) in the activations' type."""
    if scheme.group_size == 0:
        scales = b.op("Squeeze", scales, b.ints([2]))
    return scales if elem_type == FLOAT else b.cast(scales, elem_type)


def qmoe_experts(b: NodeBuilder, x: str, ids: str, weights: str, ops: QuantizedOperands, b1: str | None,
                 b2: str | None, k_max: int, elem_type: int) -> str:
    """Append one ``com.microsoft.QMoE`` call with exact per-slot weights; returns the [T, H] output."""
    spec, scheme = ops.spec, ops.scheme
    compute = FLOAT if elem_type == TensorProto.BFLOAT16 else elem_type  # no bfloat16 QMoE kernel on CPU
    w1, w2 = ops.names["w1"], ops.names["w2"]
    fc1, s1, z1 = _uint8_codes(b, w1["codes"], scheme), _scales_as(b, w1["scales"], scheme, compute), w1.get("zeros")
    fc2, s2, z2 = _uint8_codes(b, w2["codes"], scheme), _scales_as(b, w2["scales"], scheme, compute), w2.get("zeros")
    if spec.gated and spec.gate_up_layout == "concat":
        order = b.ints(_interleave_index(spec.intermediate_size))
        fc1, s1 = b.gather(fc1, order, axis=1), b.gather(s1, order, axis=1)
        z1 = b.gather(z1, order, axis=1) if z1 else None
        b1 = b.gather(b1, order, axis=1) if b1 else None
    if z1:
        z1 = _pack_pairs(b, z1, ops.shapes["w1"][1] // ops.group("w1"))
    if z2:
        z2 = _pack_pairs(b, z2, ops.shapes["w2"][1] // ops.group("w2"))
    if spec.zero_compute:  # slots on zero-computation experts (ids ≥ E) are not this call's
        weights = b.op("Where", b.op("Less", ids, b.const(spec.num_experts, INT64)), weights, b.const(0.0, FLOAT))
    probs = _masked_logits(b, ids, b.op("Log", b.op("Max", weights, b.const(_FLOOR, FLOAT))), spec.num_experts)
    dense = _dense_weights(b, ids, weights, spec.num_experts)
    attrs = {"k": k_max, "expert_weight_bits": scheme.bits, "normalize_routing_weights": 0, "quant_type": "int"}
    if scheme.group_size:
        attrs["block_size"] = scheme.group_size
    if spec.gated:
        attrs.update(activation_type="swiglu", swiglu_fusion=1)
        if spec.activation == "swiglu_clamp":
            attrs.update(activation_alpha=float(spec.swiglu_alpha), activation_beta=1.0, swiglu_limit=float(spec.swiglu_limit))
        else:
            attrs.update(activation_alpha=1.0, activation_beta=0.0)
    else:
        attrs["activation_type"] = spec.activation
    xin = x if compute == elem_type else b.cast(x, compute)
    bias1 = None if b1 is None else (b1 if compute == elem_type else b.cast(b1, compute))
    bias2 = None if b2 is None else (b2 if compute == elem_type else b.cast(b2, compute))
    as_compute = (lambda v: v) if compute == FLOAT else (lambda v: b.cast(v, compute))
    y = b.op("QMoE", xin, as_compute(probs), fc1, s1, bias1, fc2, s2, bias2, None, None, None, z1, z2, None,
             as_compute(dense), domain=ORT_DOMAIN, **attrs)
    return y if compute == elem_type else b.cast(y, elem_type)


def _dense_weights(b: NodeBuilder, ids: str, weights: str, num_experts: int) -> str:
    """[T, E]: each kept slot's weight at its expert, 0 elsewhere (empty slots, id E, match nothing)."""
    experts = b.const(np.arange(num_experts).reshape(1, 1, -1), INT64)
    match = b.op("Equal", b.unsqueeze(ids, [2]), experts)  # [T, K, E]
    dense = b.op("Where", match, b.unsqueeze(weights, [2]), b.const(0.0, FLOAT))
    return b.reduce_sum(dense, [1])


def _int8_block(in_features: int) -> int:
    """A MatMulNBits block size for per-channel int8 rows of ``in_features`` (the scale repeats per block)."""
    for block in (128, 64, 32, 16):
        if in_features % block == 0:
            return block
    raise ValueError(f"{in_features} input features: no power-of-two block ≥ 16 divides them")


def matmulnbits_projector(ops: QuantizedOperands, biases: dict, elem_type: int):
    """``project(b, rows, name, expert) -> [R, out]``: a ``MatMulNBits`` of expert ``expert``'s projection."""
    scheme = ops.scheme

    def project(b: NodeBuilder, rows: str, name: str, expert: str) -> str:
        names = ops.names[name]
        out_features, in_features = ops.shapes[name]
        if scheme.bits == 4:
            group = ops.group(name)
            codes = b.op("Reshape", b.gather(names["codes"], expert), b.ints([out_features, in_features // group, group // 2]))
            scales = b.gather(names["scales"], expert)
        else:
            group = _int8_block(in_features)
            codes = b.op("Reshape", _uint8_codes(b, b.gather(names["codes"], expert), scheme),
                         b.ints([out_features, in_features // group, group]))
            scales = b.op("Expand", b.gather(names["scales"], expert), b.ints([out_features, in_features // group]))
        zeros = names.get("zeros")
        if zeros:
            zeros = _pack_pairs(b, b.unsqueeze(b.gather(zeros, expert), [0]), in_features // group)
            zeros = b.op("Squeeze", zeros, b.ints([0]))
        if elem_type != FLOAT:
            scales = b.cast(scales, elem_type)
        bias = biases.get(name)
        bias = b.gather(bias, expert) if bias else None
        return b.op("MatMulNBits", rows, codes, scales, zeros, None, bias, domain=ORT_DOMAIN, K=in_features,
                    N=out_features, bits=scheme.bits, block_size=group, accuracy_level=0)

    return project


def dequantize_projector(ops: QuantizedOperands, biases: dict, elem_type: int):
    """``project(b, rows, name, expert)``: ``DequantizeLinear`` of the expert's weights, then ``Gemm``."""
    scheme = ops.scheme

    def project(b: NodeBuilder, rows: str, name: str, expert: str) -> str:
        names = ops.names[name]
        out_features, in_features = ops.shapes[name]
        codes, scales = b.gather(names["codes"], expert), b.gather(names["scales"], expert)
        if scheme.bits == 8:
            values, zeros = codes, None  # signed codes, zero point 0
        else:
            low = b.op("BitwiseAnd", codes, b.const(15, UINT8))
            high = b.op("BitShift", codes, b.const(4, UINT8), direction="RIGHT")
            values = b.op("Reshape", b.op("Concat", b.unsqueeze(low, [2]), b.unsqueeze(high, [2]), axis=2),
                          b.ints([out_features, in_features]))
            zeros = names.get("zeros")
            zeros = b.gather(zeros, expert) if zeros else b.op("Expand", b.const(8, UINT8), b.op("Shape", scales))
            zeros = b.op("Reshape", zeros, b.ints([-1]))
        if scheme.group_size == 0:  # per output channel: axis 0 of [N, K]
            matrix = b.op("DequantizeLinear", values, b.op("Reshape", scales, b.ints([-1])), zeros, axis=0)
        else:  # one row per group: axis 0 of [N·K/G, G]
            grouped = b.op("Reshape", values, b.ints([-1, ops.group(name)]))
            matrix = b.op("DequantizeLinear", grouped, b.op("Reshape", scales, b.ints([-1])), zeros, axis=0)
            matrix = b.op("Reshape", matrix, b.ints([out_features, in_features]))
        if elem_type != FLOAT:
            matrix = b.cast(matrix, elem_type)
        bias = biases.get(name)
        return b.op("Gemm", rows, matrix, b.gather(bias, expert) if bias else None, transB=1)

    return project

