"""Lifted elementwise programs: the model's own math, carried as data.

Detection does not need to recognise an expert activation by name: whatever
elementwise subgraph sits between the two expert GEMMs is *lifted* out of the
FX graph into an :class:`ElementwiseProgram` — a short list of whitelisted
ops over one input tensor (features on the last axis), constants and scalars
— which every lowering then applies to each expert's rows::

    FX (between GEMM1 and GEMM2)             program (JSON)
    h ─► chunk(2) ─► clamp(max=7) ─┐         v0 = input
             └─────► clamp(±7) ────┤         v1 = slice(v0, 0, I)      v2 = slice(v0, I, 2I)
                       silu ◄──────┘         v3 = clamp(v1, None, 7)   v4 = clamp(v2, -7, 7)
                        mul ─► a             v5 = silu(v3)             v6 = mul(v5, v4) → output

The program is plain data (it round-trips through JSON, so it travels in the
experts op's config string), it evaluates with torch ops (autograd and
Inductor see through it in the split form), and
:mod:`moepass.lowering.onnx` translates it op by op.  Ops outside the
whitelist make lifting fail with the op's name, which reaches the report.

Row functions.  A program may also reduce each row over its features
(``mean``, ``rms_norm``: a norm is still a function of one row) and read
tensors given beside it: ``("tensor", j)`` is tensor j broadcast over the rows
(a norm's scale [W]) and ``("expert_tensor", j)`` the row of tensor j [E, W]
that belongs to each row's expert.  Per-slot output functions — a norm each
expert applies to its output before the routing weight, Ergo's and Muse
Spark's ``post_expert_norm`` — are such programs::

    FX (after the down GEMM, per slot)                        program
    y ─► float ─► rms_norm(eps) ─► mul(W[ids]) ─► to ─► ·w    v0 = input   v1 = cast(v0, float32)
                                                              v2 = rms_norm(v1, eps)
                                                              v3 = expert_tensor 0   v4 = mul(v2, v3)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from moepass.compiler.dataflow import example_value, op_name

__all__ = ["ElementwiseProgram", "LiftError", "lift_elementwise", "UNARY_OPS", "BINARY_OPS"]


class LiftError(ValueError):
    """A subgraph cannot be lifted; the message names the op and why."""


#: op name → (x) -> y.  Names are the program's vocabulary.
UNARY_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "neg": torch.neg,
    "abs": torch.abs,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "square": torch.square,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "erf": torch.erf,
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "softplus": F.softplus,
    "mish": F.mish,
}
#: dtype names a ``cast`` instruction may name.
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: op name → (a, b) -> y; either side may be a scalar.
BINARY_OPS: dict[str, Callable[[Any, Any], torch.Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}

# FX spellings → program names
_UNARY_SPELLINGS = {
    "neg": "neg", "abs": "abs", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "square": "square",
    "sigmoid": "sigmoid", "tanh": "tanh", "erf": "erf", "relu": "relu", "relu_": "relu", "silu": "silu",
    "softplus": "softplus", "mish": "mish",
}
_BINARY_SPELLINGS = {
    "add": "add", "iadd": "add", "add_": "add", "__add__": "add", "__radd__": "add",
    "sub": "sub", "isub": "sub", "sub_": "sub", "__sub__": "sub", "rsub": "rsub", "__rsub__": "rsub",
    "mul": "mul", "imul": "mul", "mul_": "mul", "__mul__": "mul", "__rmul__": "mul", "multiply": "mul",
    "truediv": "div", "itruediv": "div", "div": "div", "div_": "div", "__truediv__": "div", "true_divide": "div",
    "pow": "pow", "__pow__": "pow", "maximum": "maximum", "minimum": "minimum",
}
#: Program instructions besides the unary and binary ops.
_STRUCTURAL = ("slice", "clamp", "rsub", "cast", "mean", "rms_norm", "tensor", "expert_tensor")
#: Ops that keep values and dtype.
_IDENTITY = {"contiguous", "clone", "detach"}
#: Casts: op name → the dtype it casts to (None: read from the arguments).
_CASTS = {"float": torch.float32, "bfloat16": torch.bfloat16, "half": torch.float16, "double": torch.float64,
          "to": None, "type": None, "type_as": None}


@dataclass(frozen=True)
class ElementwiseProgram:
    """A lifted elementwise function of one tensor, features on the last axis.

    ``ops`` is a tuple of instructions ``(name, *operands)``; an operand is
    ``["v", i]`` (the value of instruction i; instruction 0 is the input) or a
    Python number.  Structural ops: ``("slice", v, start, stop, step)`` over
    the feature axis, ``("clamp", v, min, max)`` with ``None`` for no bound,
    ``("cast", v, dtype_name)`` (the model's own up- and down-casts, so a
    bfloat16 model computes its activation in the precision it chose).  The
    last instruction is the output; it is returned in the input's dtype.
    """

    ops: tuple

    def to_json(self) -> str:
        """The program as a JSON string (the form configs carry)."""
        return json.dumps([list(op) for op in self.ops], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "ElementwiseProgram":
        """Inverse of :meth:`to_json` (validated)."""
        raw = json.loads(text)
        program = cls(tuple(tuple(_freeze(part) for part in op) for op in raw))
        program.check()
        return program

    def check(self) -> None:
        """Raise :class:`LiftError` unless every instruction is known and refers backwards."""
        if not self.ops or self.ops[0] != ("input",):
            raise LiftError("a program starts with ('input',)")
        for index, op in enumerate(self.ops[1:], start=1):
            name = op[0]
            if name not in UNARY_OPS and name not in BINARY_OPS and name not in _STRUCTURAL:
                raise LiftError(f"instruction {index}: unknown op {name!r}")
            if name == "cast" and op[2] not in _DTYPES:
                raise LiftError(f"instruction {index}: cast to an unknown dtype {op[2]!r}")
            if name in ("tensor", "expert_tensor") and (len(op) != 2 or not isinstance(op[1], int) or op[1] < 0):
                raise LiftError(f"instruction {index}: {name} names no tensor ({op!r})")
            for operand in op[1:]:
                if isinstance(operand, tuple) and (operand[0] != "v" or not 0 <= operand[1] < index):
                    raise LiftError(f"instruction {index}: bad operand {operand!r}")

    @property
    def tensor_reads(self) -> dict[int, str]:
        """The tensors the program reads: index → ``"tensor"`` or ``"expert_tensor"``."""
        return {op[1]: op[0] for op in self.ops if op[0] in ("tensor", "expert_tensor")}

    def __call__(
        self,
        x: torch.Tensor,
        dim: int = -1,
        tensors: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
        experts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Evaluate on ``x`` whose features lie along ``dim``.

        ``tensors`` are the tensors the program reads; ``experts`` [rows] the
        expert of each row (for ``expert_tensor``: rows of x along the first axis,
        features last).
        """
        values: list[Any] = [x]

        def get(operand):
            return values[operand[1]] if isinstance(operand, tuple) else operand

        for op in self.ops[1:]:
            name, operands = op[0], op[1:]
            if name in ("tensor", "expert_tensor"):
                if operands[0] >= len(tensors) or (name == "expert_tensor" and experts is None):
                    raise ValueError(f"the program reads {name} {operands[0]}, which was not given")
                tensor = tensors[operands[0]]
                values.append(tensor[experts] if name == "expert_tensor" else tensor)
            elif name == "mean":
                values.append(get(operands[0]).mean(dim=dim, keepdim=True))
            elif name == "rms_norm":
                source = get(operands[0]).movedim(dim, -1)
                values.append(F.rms_norm(source, (source.shape[-1],), eps=operands[1]).movedim(-1, dim))
            elif name == "slice":
                source, start, stop, step = get(operands[0]), operands[1], operands[2], operands[3]
                index = [slice(None)] * source.ndim
                index[dim] = slice(start, stop, step)
                values.append(source[tuple(index)])
            elif name == "clamp":
                values.append(torch.clamp(get(operands[0]), min=operands[1], max=operands[2]))
            elif name == "cast":
                values.append(get(operands[0]).to(_DTYPES[operands[1]]))
            elif name == "rsub":
                values.append(torch.sub(get(operands[1]), get(operands[0])))
            elif name in UNARY_OPS:
                values.append(UNARY_OPS[name](get(operands[0])))
            else:
                a, b = (get(o) for o in operands)
                values.append(_binary(name, a, b))
        out = values[-1]
        return out.to(x.dtype) if out.dtype != x.dtype else out

    def output_width(self, width: int) -> int:
        """Features of the output for an input of ``width`` features (a program reading no tensors)."""
        return int(self(torch.zeros(1, width)).shape[-1])

    def describe(self) -> str:
        """A compact formula-like text, e.g. ``mul(silu(slice(x,0,64)), slice(x,64,128))``."""
        texts: list[str] = ["x"]
        for op in self.ops[1:]:
            if op[0] in ("tensor", "expert_tensor"):
                texts.append(f"t{op[1]}" + ("[e]" if op[0] == "expert_tensor" else ""))
                continue
            parts = [texts[o[1]] if isinstance(o, tuple) else _number(o) for o in op[1:]]
            texts.append(f"{op[0]}({','.join(parts)})")
        return texts[-1]


def _binary(name: str, a: Any, b: Any) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        # a scalar on the left: keep the tensor's dtype
        if name == "add":
            return b + a
        if name == "mul":
            return b * a
        if name == "sub":
            return -b + a
        if name == "div":
            return torch.reciprocal(b) * a
        return BINARY_OPS[name](torch.as_tensor(a, dtype=b.dtype, device=b.device), b)
    return BINARY_OPS[name](a, b)


def _number(value: Any) -> str:
    return "None" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _freeze(part: Any) -> Any:
    return tuple(part) if isinstance(part, list) else part


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _feature_slice(node: fx.Node, width: int) -> tuple[int, int, int] | None:
    """(start, stop, step) when ``node`` slices only the last axis of its input, else None."""
    index = node.args[1]
    if isinstance(index, slice):
        index = (index,)
    if not isinstance(index, tuple):
        return None
    parts = list(index)
    if parts and parts[0] is Ellipsis:
        parts = parts[1:]
        if len(parts) != 1:
            return None
        last = parts[0]
    else:
        source_shape = example_value(node.args[0]).shape
        if len(parts) != len(source_shape) or any(p != slice(None) for p in parts[:-1]):
            return None
        last = parts[-1]
    if not isinstance(last, slice) or not all(v is None or isinstance(v, int) for v in (last.start, last.stop, last.step)):
        return None
    return last.indices(width)


def lift_elementwise(
    nodes: set[fx.Node],
    source: fx.Node | list[fx.Node],
    output: fx.Node,
    passthrough: dict[fx.Node, fx.Node] | None = None,
    tensors: dict[fx.Node, tuple] | None = None,
) -> ElementwiseProgram:
    """Lift the subgraph ``nodes`` computing ``output`` from ``source`` into a program.

    ``nodes`` are the nodes between ``source`` (the first GEMM's output) and
    ``output`` (what the second GEMM reads); every node must be an op of the
    vocabulary acting along the last axis, reading only ``source``, other
    nodes of the set, and Python scalars.  ``passthrough`` maps nodes the
    caller accounts for elsewhere (a bias add, a mask of empty slots, a view
    of the rows) to the input whose value they forward.  ``tensors`` maps
    values computed outside the set that the program may read to their
    instruction, ``("tensor", j)`` or ``("expert_tensor", j)``.  ``source`` may be a
    list of nodes read as one input concatenated along the features (a gate
    and an up projection computed by separate linears).  Raises
    :class:`LiftError` naming the first node that does not fit.
    """
    passthrough = passthrough or {}
    tensors = tensors or {}
    ops: list[tuple] = [("input",)]
    if isinstance(source, fx.Node):
        index: dict[fx.Node, int] = {source: 0}
        widths: dict[fx.Node, int] = {source: example_value(source).shape[-1]}
        anchor = source
    else:
        # several projections read as one input, concatenated along the features
        index, widths, start = {}, {}, 0
        for part in source:
            width = int(example_value(part).shape[-1])
            index[part] = len(ops)
            widths[part] = width
            ops.append(("slice", ("v", 0), start, start + width, 1))
            start += width
        anchor = source[0]
    ordered = sorted(nodes | {output}, key=_topological_key(anchor, nodes | {output}))

    def ref(value: Any, node: fx.Node) -> Any:
        if isinstance(value, fx.Node) and value in tensors and value not in index:
            index[value] = len(ops)  # a tensor read beside the input, emitted before its first reader
            widths[value] = int(example_value(value).shape[-1]) if example_value(value).dim() else 1
            ops.append(tuple(tensors[value]))
        if isinstance(value, fx.Node):
            if value not in index:
                raise LiftError(f"{node.name} ({op_name(node)}) reads {value.name}, computed outside the activation")
            return ("v", index[value])
        if _scalar(value):
            return float(value) if isinstance(value, float) else int(value)
        raise LiftError(f"{node.name} ({op_name(node)}) takes {value!r}, not a tensor of the activation or a number")

    def emit(node: fx.Node, op: tuple, out_width: int) -> None:
        index[node] = len(ops)
        widths[node] = out_width
        ops.append(op)

    for node in ordered:
        if node in index:
            continue
        name = op_name(node)
        args = node.args
        if node in passthrough:
            forwarded = passthrough[node]
            index[node] = index[forwarded] if forwarded in index else _missing(node, forwarded)
            widths[node] = widths[forwarded]
            continue
        if name in ("view", "reshape", "squeeze", "unsqueeze", "flatten") and isinstance(args[0], fx.Node):
            in_shape, out_shape = example_value(args[0]).shape, example_value(node).shape
            if in_shape[-1] == out_shape[-1]:  # rows regrouped, features untouched
                index[node] = index[args[0]] if args[0] in index else _missing(node, args[0])
                widths[node] = widths[args[0]]
                continue
            raise LiftError(f"{node.name}: {name} changes the feature axis ({tuple(in_shape)} → {tuple(out_shape)})")
        if name == "getitem" and isinstance(args[0], fx.Node) and op_name(args[0]) in ("chunk", "split"):
            parent = args[0]
            whole = widths.get(parent.args[0])
            if whole is None:
                raise LiftError(f"{parent.name}: splits a tensor computed outside the activation")
            dim = parent.args[2] if len(parent.args) > 2 else parent.kwargs.get("dim", 0 if name == "split" else -1)
            rank = len(example_value(parent.args[0]).shape)
            if dim not in (-1, rank - 1):
                raise LiftError(f"{parent.name}: {op_name(parent)} over dim {dim}, not the feature axis")
            if op_name(parent) == "chunk":
                pieces = parent.args[1]
                size = -(-whole // pieces)
            else:
                size = parent.args[1]
                if not isinstance(size, int):
                    raise LiftError(f"{parent.name}: split into uneven sizes {size!r}")
            start = args[1] * size
            stop = min(start + size, whole)
            emit(node, ("slice", ref(parent.args[0], node), start, stop, 1), stop - start)
            continue
        if name in ("chunk", "split"):
            continue  # handled through its getitem users
        if name in ("mean", "sum") and isinstance(args[0], fx.Node):
            dims = args[1] if len(args) > 1 else node.kwargs.get("dim")
            dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
            shape = example_value(args[0]).shape
            rank = len(shape)
            keepdim = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            if name == "mean" and dims in ((-1,), (rank - 1,)) and keepdim:
                emit(node, ("mean", ref(args[0], node)), 1)
                continue
            if dims != (None,) and all(isinstance(d, int) and d % rank != rank - 1 and shape[d] == 1 for d in dims):
                index[node] = index[args[0]] if args[0] in index else _missing(node, args[0])  # over size-1 row axes
                widths[node] = widths[args[0]]
                continue
            raise LiftError(f"{node.name}: {name} over {dims} (keepdim={keepdim}), not a row's mean over its features")
        if name == "rms_norm" and isinstance(args[0], fx.Node):
            shape = args[1] if len(args) > 1 else node.kwargs.get("normalized_shape")
            weight = args[2] if len(args) > 2 else node.kwargs.get("weight")
            eps = args[3] if len(args) > 3 else node.kwargs.get("eps")
            if list(shape) != [widths.get(args[0], -1)] or not (eps is None or _scalar(eps)):
                raise LiftError(f"{node.name}: rms_norm over {shape!r}, not the row's features")
            if weight is None:
                emit(node, ("rms_norm", ref(args[0], node), eps), widths[args[0]])
            else:
                normalized = ref(args[0], node)
                normed = len(ops)
                ops.append(("rms_norm", normalized, eps))
                emit(node, ("mul", ("v", normed), ref(weight, node)), widths[args[0]])
            continue
        if name == "getitem":
            bounds = _feature_slice(node, widths.get(args[0], -1)) if isinstance(args[0], fx.Node) else None
            if bounds is None:
                raise LiftError(f"{node.name}: an index that is not a slice of the feature axis ({args[1]!r})")
            start, stop, step = bounds
            emit(node, ("slice", ref(args[0], node), start, stop, step), len(range(start, stop, step)))
            continue
        if name in _IDENTITY:
            index[node] = index[args[0]] if args[0] in index else _missing(node, args[0])
            widths[node] = widths[args[0]]
            continue
        if name in _CASTS:
            dtype = example_value(node).dtype
            if dtype == example_value(args[0]).dtype:
                index[node] = index[args[0]] if args[0] in index else _missing(node, args[0])
                widths[node] = widths[args[0]]
            else:
                emit(node, ("cast", ref(args[0], node), _dtype_name(dtype)), widths[args[0]])
            continue
        if name in ("clamp", "clamp_", "clip", "clamp_min", "clamp_max"):
            low = args[1] if len(args) > 1 else node.kwargs.get("min")
            high = args[2] if len(args) > 2 else node.kwargs.get("max")
            if name == "clamp_min":
                low, high = args[1], None
            elif name == "clamp_max":
                low, high = None, args[1]
            if not all(v is None or _scalar(v) for v in (low, high)):
                raise LiftError(f"{node.name}: clamp with tensor bounds")
            emit(node, ("clamp", ref(args[0], node), low, high), widths[args[0]])
            continue
        if name == "gelu":
            approximate = node.kwargs.get("approximate", args[1] if len(args) > 1 else "none")
            emit(node, ("gelu_tanh" if approximate == "tanh" else "gelu", ref(args[0], node)), widths[args[0]])
            continue
        if name in ("softplus",) and (len(args) > 1 or node.kwargs):
            beta = node.kwargs.get("beta", args[1] if len(args) > 1 else 1.0)
            threshold = node.kwargs.get("threshold", args[2] if len(args) > 2 else 20.0)
            if beta != 1 or threshold != 20:
                raise LiftError(f"{node.name}: softplus with beta={beta}, threshold={threshold}")
        if name in _UNARY_SPELLINGS:
            emit(node, (_UNARY_SPELLINGS[name], ref(args[0], node)), widths[args[0]])
            continue
        if name in _BINARY_SPELLINGS and len(args) == 2:
            a, b = args
            op = _BINARY_SPELLINGS[name]
            out_width = max(widths.get(a, 1) if isinstance(a, fx.Node) else 1, widths.get(b, 1) if isinstance(b, fx.Node) else 1)
            if op == "rsub":
                emit(node, ("rsub", ref(a, node), ref(b, node)), out_width)
            else:
                emit(node, (op, ref(a, node), ref(b, node)), out_width)
            continue
        raise LiftError(f"{node.name}: op {name!r} between the expert GEMMs is not an elementwise op moepass can lift")
    if output not in index:
        raise LiftError(f"the activation's output {output.name} was not reached from the first GEMM")
    if index[output] != len(ops) - 1:
        ops.append(("mul", ("v", index[output]), 1))
    program = ElementwiseProgram(tuple(ops))
    program.check()
    return program


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise LiftError(f"a cast to {dtype}, not a floating dtype")


def _missing(node: fx.Node, source: Any) -> int:
    raise LiftError(f"{node.name} reads {getattr(source, 'name', source)}, computed outside the activation")


def _topological_key(source: fx.Node, nodes: set[fx.Node]):
    order = {n: i for i, n in enumerate(source.graph.nodes)}
    return lambda n: order.get(n, math.inf)

