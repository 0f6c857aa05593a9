"""Fuse each rewritten block's route and experts ops into one ``moepass.moe_block``.

::

    pattern      r   = moepass.route(logits, x?, tensors, route_config)
                 ids = r[0];  w = r[1]
                 y   = moepass.experts(x, ids, w, w1, w2, b1, b2, experts_config)
                 (z  = moepass.zero_compute_experts(x, ids, w, E, kinds, None);  y' = y + z)
    check        r has no other reader; route and experts see the same x
    replacement  y   = moepass.moe_block(x, logits, tensors, w1, w2, b1, b2,
                                         route_config, experts_config)     (y' too: the block op adds z)

A route op without its experts op (a router-only rewrite: the experts loop
graph-broke) cannot be exported as one block and is refused, naming the block;
so is a block whose experts apply a per-slot output function before the
routing weight (``moepass.expert_output``: the fused block has no place for it).
As a backstop to detection's own report, stacked expert weights ([E, ., .]
parameters under a module path with "expert") that the output still reads
other than through a ``moe_block`` mean an MoE block was not rewritten: the
export would not apply the policy there, so it is refused, naming the module.
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass

import torch
from moepass.lowering.onnx import block_op  # noqa: F401  (registers moepass::moe_block)
from torch import fx

from moepass.compiler.dataflow import example_value
from moepass.exports.errors import OnnxExportError
from moepass.runtime.ops import parse_experts_config, parse_route_config

__all__ = ["FusedBlock", "fuse_blocks", "unrewritten_experts"]

logger = logging.getLogger(__name__)

_ROUTE = torch.ops.moepass.route.default
_EXPERTS = torch.ops.moepass.experts.default
_BLOCK = torch.ops.moepass.moe_block.default
_QUANTIZED = torch.ops.moepass.quantized_experts.default
_QUANTIZED_BLOCK = torch.ops.moepass.quantized_moe_block.default
_ZERO_COMPUTE = torch.ops.moepass.zero_compute_experts.default


@dataclass(frozen=True)
class FusedBlock:
    """One fused block: its module path and the node that now computes it."""

    path: str
    node: fx.Node


def _experts_config(experts: fx.Node):
    """The :class:`~moepass.runtime.ops.ExpertsConfig` of an experts node, float or quantized."""
    if experts.target is _QUANTIZED:
        from moepass.runtime.quantized_ops import parse_quantized_config

        return parse_quantized_config(experts.args[7]).experts
    return parse_experts_config(experts.args[7])


def _route_of(experts: fx.Node) -> fx.Node:
    config = _experts_config(experts)
    block = config.block or "<root>"
    if config.slots_per_token:
        raise OnnxExportError(
            f"block {block}: its experts apply a function to each slot's output before the routing weight (a "
            "per-expert output norm, moepass.expert_output), which the exported block (moepass.AdaptiveMoE, "
            "com.microsoft.MoE, moe_block) does not carry; it runs only through torch.compile"
        )
    ids, weights = experts.args[1], experts.args[2]
    for value, index in ((ids, 0), (weights, 1)):
        if not (
            isinstance(value, fx.Node)
            and value.target is operator.getitem
            and value.args[1] == index
            and isinstance(value.args[0], fx.Node)
            and value.args[0].target is _ROUTE
        ):
            raise OnnxExportError(f"block {block}: its experts op does not read a route op's ids and weights directly")
    route = ids.args[0]
    if weights.args[0] is not route:
        raise OnnxExportError(f"block {block}: ids and weights come from different route ops")
    readers = {user for out in route.users for user in out.users} | set(route.users)
    zero = _zero_compute_of(experts)
    if readers - {ids, weights, experts, *zero}:
        raise OnnxExportError(f"block {block}: its routing is also read outside the block, so it cannot be fused")
    uses_x = parse_route_config(route.args[3]).uses_x
    if uses_x and route.args[1] is not experts.args[0]:
        raise OnnxExportError(f"block {block}: the router and the experts see different inputs")
    return route


def _zero_compute_of(experts: fx.Node) -> list[fx.Node]:
    """The block's ``zero_compute_experts`` node and the add of its term (empty without zero-computation experts).

    Only in the form the rewrite writes: same x, ids and weights, its term
    added to the experts' output and read nowhere else.
    """
    if not _experts_config(experts).spec.zero_compute:
        return []
    x, ids, weights = experts.args[:3]
    for zero in ids.users:
        if zero.target is _ZERO_COMPUTE and zero.args[:3] == (x, ids, weights) and len(zero.users) == 1:
            (add,) = zero.users
            if add.target is operator.add and set(add.args) == {experts, zero} and len(experts.users) == 1:
                return [zero, add]
    block = _experts_config(experts).block or "<root>"
    raise OnnxExportError(f"block {block}: its zero-computation experts are not added to its experts' output")


def fuse_blocks(gm: fx.GraphModule) -> list[FusedBlock]:
    """Replace every route → experts pair of ``gm`` by one ``moe_block`` node, in place."""
    graph = gm.graph
    fused = []
    for experts in [n for n in graph.nodes if n.op == "call_function" and n.target in (_EXPERTS, _QUANTIZED)]:
        route = _route_of(experts)
        x, ids, weights, w1, w2, b1, b2, experts_config = experts.args
        logits, _, tensors, route_config = route.args
        target = _QUANTIZED_BLOCK if experts.target is _QUANTIZED else _BLOCK
        with graph.inserting_before(experts):
            args = (x, logits, tensors, w1, w2, b1, b2, route_config, experts_config)
            node = graph.create_node("call_function", target, args, {}, name=experts.name.replace("moe_out", "moe_block", 1))
        node.meta.update(experts.meta)
        zero = _zero_compute_of(experts)
        if zero:  # the block op adds the zero-computation term itself
            zero_node, add = zero
            add.replace_all_uses_with(node)
            graph.erase_node(add)
            graph.erase_node(zero_node)
        experts.replace_all_uses_with(node)
        for dead in (experts, ids, weights, route):
            graph.erase_node(dead)
        path = _experts_config(experts).block
        fused.append(FusedBlock(path, node))
    leftover = [n for n in graph.nodes if n.op == "call_function" and n.target is _ROUTE]
    if leftover:
        path = parse_route_config(leftover[0].args[3]).block or "<root>"
        raise OnnxExportError(
            f"block {path}: only its router was rewritten (its experts loop is not in the graph); "
            "use experts_implementation='grouped_mm' or 'batched_mm' to export it"
        )
    left = unrewritten_experts(gm)
    if left:
        raise OnnxExportError(
            f"block {left[0]}: its expert weights are still read outside a rewritten block, so the export would "
            "run it without the policy (see the moepass report for why it was not rewritten)"
        )
    graph.lint()
    gm.recompile()
    logger.debug("fused %d MoE blocks", len(fused))
    return fused


def unrewritten_experts(gm: fx.GraphModule) -> list[str]:
    """Module paths of stacked expert weights the output still reads other than through a moe_block."""
    live: set[fx.Node] = set()
    stack = [n for n in gm.graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        if node.target not in (_BLOCK, _QUANTIZED_BLOCK):  # what a moe_block reads is accounted for
            stack.extend(node.all_input_nodes)
    paths = []
    for node in gm.graph.nodes:
        value = example_value(node)
        if (
            node.op == "get_attr"
            and node in live
            and isinstance(value, torch.Tensor)
            and value.ndim == 3
            and re.search(r"expert", str(node.target))
        ):
            path = str(node.target).rsplit(".", 1)[0]
            path = re.sub(r"\.experts?$", "", path)
            if path not in paths:
                paths.append(path)
    return paths
