"""The experts half of a block's function in standard ONNX ops only.

::

    out = 0                                     [T, H] float32
    Loop e = 0 .. E-1:                          (one iteration per expert)
        tok, slot = NonZero(ids == e)           the slots routed to e, [R]
        xr  = x[tok]            (· w if the weight goes on the input: Llama 4)
        h   = Gemm(xr, w1[e], b1[e])            transB for [E, out, in] storage
        a   = act(h)                            gated: act(gate) · up, concat or interleaved halves
        y   = Gemm(a, w2[e], b2[e])             (· w otherwise)
        out = ScatterND(out, tok, y, reduction="add")

Every row is a (token, slot) routed to the expert, so empty slots (id E) and
tokens that keep fewer experts cost nothing.  The activations follow
:mod:`moepass.lowering.activations` exactly (``gelu`` is the erf form).
"""

from __future__ import annotations

from moepass.lowering.activations import lifted_program
from moepass.lowering.onnx.builder import BOOL, FLOAT, INT64, NodeBuilder
from moepass.lowering.onnx.program import program_nodes, unary_nodes
from onnx import helper

from moepass.compiler.spec import ExpertsSpec

__all__ = ["activation", "portable_experts"]


def activation(b: NodeBuilder, h: str, spec: ExpertsSpec, elem_type: int) -> str:
    """The expert activation of ``h`` [R, N1] → [R, I], as :func:`moepass.lowering.activations.apply_activation`."""
    if spec.activation == "lifted":
        return program_nodes(b, h, lifted_program(spec.program), elem_type)
    if not spec.gated:
        return unary_nodes(b, spec.activation, h, elem_type)
    inter = spec.intermediate_size
    if spec.gate_up_layout == "interleaved":
        gate = b.slice(h, [0], [2 * inter], [1], [2])
        up = b.slice(h, [1], [2 * inter], [1], [2])
    else:
        gate = b.slice(h, [0], [inter], [1])
        up = b.slice(h, [inter], [2 * inter], [1])
    if spec.activation == "swiglu_clamp":
        limit = spec.swiglu_limit
        gate = b.op("Min", gate, b.const(limit, elem_type))
        up = b.op("Clip", up, b.const(-limit, elem_type), b.const(limit, elem_type))
        glu = b.op("Mul", gate, b.op("Sigmoid", b.op("Mul", gate, b.const(spec.swiglu_alpha, elem_type))))
        return b.op("Mul", b.op("Add", up, b.const(1.0, elem_type)), glu)
    return b.op("Mul", unary_nodes(b, spec.activation, gate, elem_type), up)


def portable_experts(
    b: NodeBuilder,
    x: str,
    ids: str,
    weights: str,
    w1: str,
    w2: str,
    b1: str | None,
    b2: str | None,
    spec: ExpertsSpec,
    elem_type: int,
    project=None,
) -> str:
    """Append the expert computation to ``b``; returns the [T, H] output (``elem_type``).

    ``project(b, rows, "w1" | "w2", expert) -> [R, out]`` replaces the Gemm on the gathered weights
    (quantized experts: ``DequantizeLinear`` then Gemm, :mod:`.experts_quantized`).
    """
    body = NodeBuilder(f"{b.prefix}/expert")
    expert, cond_in, acc_in = f"{body.prefix}/e", f"{body.prefix}/cond_in", f"{body.prefix}/acc_in"
    picked = body.op("NonZero", body.op("Equal", ids, expert))  # [2, R]: token, slot
    token = body.gather(picked, body.const(0, INT64), axis=0)
    slot_weight = body.op("GatherND", weights, body.op("Transpose", picked, perm=[1, 0]))
    scale = body.unsqueeze(slot_weight if elem_type == FLOAT else body.cast(slot_weight, elem_type), [1])
    rows = body.gather(x, token)
    if spec.weight_on_input:
        rows = body.op("Mul", rows, scale)
    if project is not None:
        out = project(body, activation(body, project(body, rows, "w1", expert), spec, elem_type), "w2", expert)
    else:
        first = body.op("Gemm", rows, body.gather(w1, expert), body.gather(b1, expert) if b1 else None,
                        transB=0 if spec.transposed else 1)
        hidden = activation(body, first, spec, elem_type)
        out = body.op("Gemm", hidden, body.gather(w2, expert), body.gather(b2, expert) if b2 else None,
                      transB=0 if spec.transposed else 1)
    if not spec.weight_on_input:
        out = body.op("Mul", out, scale)
    if elem_type != FLOAT:
        out = body.cast(out, FLOAT)
    acc_out = body.op("ScatterND", acc_in, body.unsqueeze(token, [1]), out, reduction="add")
    cond_out = body.op("Identity", cond_in)
    graph = helper.make_graph(
        body.nodes,
        "expert",
        [
            helper.make_tensor_value_info(expert, INT64, []),
            helper.make_tensor_value_info(cond_in, BOOL, []),
            helper.make_tensor_value_info(acc_in, FLOAT, None),
        ],
        [helper.make_tensor_value_info(cond_out, BOOL, []), helper.make_tensor_value_info(acc_out, FLOAT, None)],
    )
    zeros = b.op("Expand", b.const(0.0, FLOAT), b.op("Shape", x))
    total = b.op("Loop", b.const(spec.num_experts, INT64), None, zeros, body=graph)
    return total if elem_type == FLOAT else b.cast(total, elem_type)
