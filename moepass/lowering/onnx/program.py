"""A lifted elementwise program (:class:`moepass.compiler.lifted.ElementwiseProgram`) as ONNX nodes.

Each instruction becomes one or a few standard ONNX ops on the value ``h``
[R, N] (features on the last axis), so a lifted expert activation runs inside
the block's local function on any runtime::

    slice(v, a, b, s)   → Slice(v, [a], [b], [-1], [s])
    clamp(v, lo, hi)    → Max / Min with constants (Clip needs both bounds)
    silu(v)             → Mul(v, Sigmoid(v))        gelu(v) → erf form
    mul/add/sub/div/pow → the ONNX op, scalars as constants of the value's type
    cast(v, dtype)      → Cast

The output is cast back to ``h``'s element type when the program ends in
another (a bfloat16 model whose activation computes in float32).
"""

from __future__ import annotations

import math

from moepass.lowering.onnx.builder import NodeBuilder
from onnx import TensorProto

from moepass.compiler.lifted import ElementwiseProgram

__all__ = ["program_nodes", "unary_nodes"]

_ELEM = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE, "bfloat16": TensorProto.BFLOAT16,
         "float16": TensorProto.FLOAT16}
_SIMPLE_UNARY = {"neg": "Neg", "abs": "Abs", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "sigmoid": "Sigmoid",
                 "tanh": "Tanh", "erf": "Erf", "relu": "Relu", "softplus": "Softplus"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min"}


def program_nodes(b: NodeBuilder, h: str, program: ElementwiseProgram, elem_type: int) -> str:
    """Append the program applied to ``h`` to ``b``; returns the output value's name."""
    values: list[str] = [h]
    types: list[int] = [elem_type]

    def operand(item, like: int) -> tuple[str, int]:
        if isinstance(item, tuple):
            return values[item[1]], types[item[1]]
        return b.const(float(item), types[like]), types[like]

    for op in program.ops[1:]:
        name, args = op[0], op[1:]
        first = args[0][1] if isinstance(args[0], tuple) else None
        if name == "slice":
            source, start, stop, step = args
            values.append(b.slice(values[source[1]], [start], [stop], [-1], [step]))
            types.append(types[source[1]])
        elif name == "clamp":
            value, kind = values[first], types[first]
            if args[1] is not None:
                value = b.op("Max", value, b.const(float(args[1]), kind))
            if args[2] is not None:
                value = b.op("Min", value, b.const(float(args[2]), kind))
            values.append(value)
            types.append(kind)
        elif name == "cast":
            values.append(b.cast(values[first], _ELEM[args[1]]))
            types.append(_ELEM[args[1]])
        elif name in _BINARY or name == "rsub":
            tensor_side = next(a for a in args if isinstance(a, tuple))
            left, _ = operand(args[0], tensor_side[1])
            right, _ = operand(args[1], tensor_side[1])
            if name == "rsub":
                left, right = right, left
            values.append(b.op(_BINARY.get(name, "Sub"), left, right))
            types.append(types[tensor_side[1]])
        else:
            values.append(unary_nodes(b, name, values[first], types[first]))
            types.append(types[first])
    out = values[-1]
    return out if types[-1] == elem_type else b.cast(out, elem_type)


def unary_nodes(b: NodeBuilder, name: str, x: str, elem_type: int) -> str:
    """One unary activation (silu, relu, gelu in its erf form, gelu_tanh, tanh, ...) of ``x`` as ONNX nodes."""
    if name in _SIMPLE_UNARY:
        return b.op(_SIMPLE_UNARY[name], x)
    if name == "silu":
        return b.op("Mul", x, b.op("Sigmoid", x))
    if name == "square":
        return b.op("Mul", x, x)
    if name == "rsqrt":
        return b.op("Reciprocal", b.op("Sqrt", x))
    if name == "mish":
        return b.op("Mul", x, b.op("Tanh", b.op("Softplus", x)))
    half = b.op("Mul", x, b.const(0.5, elem_type))
    if name == "gelu":
        erf = b.op("Erf", b.op("Mul", x, b.const(1.0 / math.sqrt(2.0), elem_type)))
        return b.op("Mul", half, b.op("Add", erf, b.const(1.0, elem_type)))
    if name == "gelu_tanh":
        cube = b.op("Mul", b.op("Mul", x, x), x)
        inner = b.op("Add", x, b.op("Mul", cube, b.const(0.044715, elem_type)))
        tanh = b.op("Tanh", b.op("Mul", inner, b.const(math.sqrt(2.0 / math.pi), elem_type)))
        return b.op("Mul", half, b.op("Add", tanh, b.const(1.0, elem_type)))
    raise ValueError(f"no ONNX form for program op {name!r}")
