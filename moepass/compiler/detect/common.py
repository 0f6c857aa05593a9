"""Small helpers shared by the matchers: argument access, parameter sources,
module paths, symbolic sizes, and the ``Mismatch`` reason carrier."""

from __future__ import annotations

import re
from typing import Any, Iterable

import sympy
import torch
import torch.fx as fx

from moepass.compiler.dataflow import example_value, op_name, tensor_shape

__all__ = [
    "Mismatch",
    "arg",
    "source_path",
    "module_path_of_param",
    "common_module_path",
    "resolve_param",
    "sym_product",
    "same_numel",
    "same_tokens",
    "ndim",
    "CAST_OPS",
    "SHAPE_OPS",
]

#: Ops that change a tensor's dtype (or nothing) and keep its values.
#: Ops that keep a tensor's values (``full_tensor``: a DTensor gathered whole, the values it stands for).
CAST_OPS = {"float", "to", "type", "type_as", "half", "bfloat16", "double", "contiguous", "detach", "clone", "full_tensor"}
#: Ops that only change a tensor's shape.
SHAPE_OPS = {"view", "reshape", "view_as", "reshape_as", "flatten", "unsqueeze", "squeeze"}


class Mismatch(Exception):
    """A matcher's check failed; the message says which and why (it reaches the report)."""


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, or keyword ``name``, or ``default``.

    For ``call_method`` nodes index 0 is ``self``.
    """
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_SOURCE_TOKEN = re.compile(r"\['([^']+)'\]|\.(\w+)|\[(\d+)\]")


def source_path(node: fx.Node) -> str | None:
    """Dotted module path of a placeholder's source, e.g. ``model.layers.0.mlp.gate.weight``."""
    if node.op == "get_attr":
        return str(node.target)
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return None
    name = source.name if isinstance(source.name, str) else source.name()
    head = re.match(r"^[A-Z]\['[^']*'\]", name)
    rest = name[head.end():] if head else name
    parts = []
    for quoted, attr, index in _SOURCE_TOKEN.findall(rest):
        token = quoted or attr or index
        # ``__self__``: the receiver of a compiled bound method (``L['fn'].__self__``) is the root module
        if token in ("_modules", "_parameters", "_buffers", "__dict__", "__self__"):
            continue
        parts.append(token)
    return ".".join(parts)


def module_path_of_param(node: fx.Node) -> str | None:
    """Module path that owns a parameter placeholder (its source path minus the name)."""
    path = source_path(node)
    if path is None:
        return None
    return path.rsplit(".", 1)[0] if "." in path else ""


def common_module_path(paths: Iterable[str | None]) -> str:
    """Longest common dotted prefix of ``paths`` (ignoring None)."""
    split = [p.split(".") if p else [] for p in paths if p is not None]
    if not split:
        return ""
    prefix = split[0]
    for parts in split[1:]:
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix)


def resolve_param(node: Any) -> fx.Node | None:
    """Follow dtype casts back to a parameter/buffer placeholder or attribute."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 8:
        if node.op in ("placeholder", "get_attr"):
            return node if isinstance(example_value(node), torch.Tensor) or node.op == "get_attr" else None
        if op_name(node) in CAST_OPS and node.args:
            node = node.args[0]
            seen += 1
            continue
        return None
    return None


def _sym_expr(size: Any) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return size.node.expr
    return sympy.Integer(int(size))


def sym_product(shape: tuple | None) -> sympy.Expr | None:
    """Product of a (possibly symbolic) shape as a sympy expression."""
    if shape is None:
        return None
    product = sympy.Integer(1)
    for size in shape:
        product = product * _sym_expr(size)
    return product


def same_numel(a: fx.Node, b: fx.Node) -> bool:
    """Whether two tensor nodes have provably equal numel (no guards added)."""
    pa, pb = sym_product(tensor_shape(a)), sym_product(tensor_shape(b))
    if pa is None or pb is None:
        return False
    return sympy.simplify(pa - pb) == 0


def same_tokens(a: fx.Node, b: fx.Node) -> bool:
    """Whether two tensor nodes hold provably as many rows (all axes but the last), whatever their widths."""
    sa, sb = tensor_shape(a), tensor_shape(b)
    if not sa or not sb:
        return False
    pa, pb = sym_product(sa[:-1]), sym_product(sb[:-1])
    if pa is None or pb is None:
        return False
    return sympy.simplify(pa - pb) == 0


def ndim(node: fx.Node) -> int | None:
    """Number of dimensions of a tensor node, or None."""
    shape = tensor_shape(node)
    return None if shape is None else len(shape)
