"""Recognise shared (always-on) experts next to a routed block, for the report.

Shared experts are never rewritten: they stay in the graph exactly as they
were.  This matcher only names them::

    out = routed(x) + shared_mlp(x)                      (DeepSeek-V3, Llama 4 via add_)
    out = routed(x) + sigmoid(x @ g) * shared_mlp(x)     (Qwen2-MoE)
"""

from __future__ import annotations

import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, op_name, tensor_shape
from moepass.compiler.detect.common import CAST_OPS, SHAPE_OPS, Mismatch, arg, resolve_param
from moepass.compiler.detect.region import block_region
from moepass.compiler.spec import SharedExpertSpec

__all__ = ["match_shared_experts"]

_ADDS = {"add", "add_", "iadd"}


def _shared_branch(other: fx.Node, flow: Dataflow, x_base: fx.Node) -> SharedExpertSpec | None:
    try:
        region = block_region(flow, other, x_base)
    except Mismatch:
        return None
    linears = [n for n in region.nodes if op_name(n) == "linear"]
    if len(linears) < 2:
        return None
    gate = "none"
    widths = []
    for lin in linears:
        weight = resolve_param(arg(lin, 1, "weight"))
        shape = tensor_shape(weight) if weight is not None else None
        if shape is None or len(shape) != 2:
            return None
        if shape[0] == 1 and any(op_name(u) == "sigmoid" for u in lin.users):
            gate = "sigmoid"
        else:
            widths.append(shape)
    hidden = tensor_shape(x_base)[-1]
    inner = [s[0] for s in widths if s[1] == hidden and s[0] != hidden] or [s[1] for s in widths if s[0] == hidden]
    if not inner:
        return None
    return SharedExpertSpec(intermediate_size=int(inner[0]), gate=gate)


def match_shared_experts(flow: Dataflow, combine: fx.Node, x_base: fx.Node) -> tuple[SharedExpertSpec, ...]:
    """Shared experts added to the routed output ``combine`` (empty if none)."""
    found = []
    frontier = list(flow.readers_after(combine))
    for _ in range(6):
        next_frontier = []
        for node in frontier:
            name = op_name(node)
            if name in CAST_OPS | SHAPE_OPS:
                next_frontier.extend(node.users)
            elif name in _ADDS and len(node.args) == 2:
                others = [a for a in node.args if isinstance(a, fx.Node) and a is not combine]
                for other in others:
                    if combine in flow.ancestors(other) or other is combine:
                        continue
                    spec = _shared_branch(other, flow, x_base)
                    if spec is not None:
                        found.append(spec)
        frontier = next_frontier
        if found or not frontier:
            break
    return tuple(found)
