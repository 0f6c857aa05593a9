"""Recognise shared (always-on) experts next to a routed block.

Shared experts are never rewritten: they stay in the graph exactly as they
were.  :func:`match_shared_experts` names them for the report::

    out = routed(x) + shared_mlp(x)                      (DeepSeek-V3, Llama 4 via add_)
    out = routed(x) + sigmoid(x @ g) * shared_mlp(x)     (Qwen2-MoE)

Some routers score the shared experts too, and normalise their weights
jointly with the selected routed experts' (Inkling: one router row per shared
expert; the weights are a softmax of log-sigmoids over the k picks *and* the
shared rows).  The shared branch then reads the router, so the first value
after the selection that every path reaches is the sum routed + shared, not
the routed output.  :func:`split_coupled_shared` separates the two::

    logits ─► [router ops] ─► topk ─► ids, w ──────► [routed experts] ─► R ─┐
                   │                                                         add ─► C
                   └────────► γ (router values only) ─► [shared MLP · γ] ─► S ┘

The rewrite replaces the routed part (its region ends at R); the shared
branch, and the router values it reads, stay in the graph as the model's own
ops.

The same split finds a model's own term for slots whose weight it sets to 0
on the experts' side (LongCat-Flash from transformers 5.25: identity slots are
remapped onto real experts at weight 0, and the block adds x · Σ their
weights itself)::

    ids, w ─► masked_fill(w, ids ≥ E, 0), where(ids ≥ E, dummy, ids) ─► [routed experts] ─► R ─┐
       └─────► x · Σ w[ids ≥ E] (router values and x only, no GEMM) ─────────────────────► T ─ add ─► C

The branch T has no GEMM: it is no shared expert but the zero-computation
slots' term.  When it is the identity experts' term
(:mod:`moepass.compiler.detect.identity_term`) detection rewrites the whole
sum C instead, with the router's true selection and the term as
``moepass.zero_compute_experts``; any other such term is kept as the model
computes it, while those slots cost the rewritten experts no GEMM row (their
classes are the router's zero-weight classes, ids ≥ E).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, op_name, tensor_shape
from moepass.compiler.detect.common import CAST_OPS, SHAPE_OPS, Mismatch, arg, resolve_param
from moepass.compiler.detect.region import Region, block_region
from moepass.compiler.spec import SharedExpertSpec

__all__ = ["match_shared_experts", "split_coupled_shared", "CoupledShared"]

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


@dataclass
class CoupledShared:
    """A combine ``routed + shared`` whose shared branch reads the router (see the module docstring)."""

    #: The routed experts' output (the rewrite's combine) and its region.
    routed: fx.Node
    region: Region
    #: The shared branch's output, left in the graph.
    shared: fx.Node
    #: None for a zero-computation slots' term (no GEMM of its own: not a shared expert).
    spec: SharedExpertSpec | None
    #: The sum ``routed + shared`` itself (the block's output).
    combine: fx.Node | None = None


def _expert_widths(nodes: set[fx.Node], hidden: int) -> list[int]:
    """Intermediate widths of the expert weights ``nodes``' GEMMs read ([I, H], [S, I, H], transposes)."""
    widths = []
    for node in _by_name(nodes):
        if op_name(node) not in _GEMMS:
            continue
        for source in node.all_input_nodes:
            param = _viewed_param(source)
            shape = tensor_shape(param) if param is not None else None
            if shape is None or len(shape) not in (2, 3):
                continue
            inner = [d for d in shape[-2:] if d != hidden]
            if len(inner) == 1 and isinstance(inner[0], int):
                widths.append(inner[0])
    return widths


def _is_view_of(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is ``source`` through reshapes and casts only."""
    for _ in range(8):
        if node is source:
            return True
        if op_name(node) not in CAST_OPS | SHAPE_OPS or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False


def _by_name(nodes: set[fx.Node]) -> list[fx.Node]:
    """``nodes`` in a deterministic order (by name)."""
    return sorted(nodes, key=lambda n: n.name)


_GEMMS = {"bmm", "matmul", "einsum", "linear", "mm", "baddbmm"}


def _viewed_param(node: fx.Node) -> fx.Node | None:
    for _ in range(4):
        if node.op in ("placeholder", "get_attr"):
            return node
        if op_name(node) not in CAST_OPS | SHAPE_OPS | {"transpose", "permute", "t", "expand"} or not node.args:
            return None
        if not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def split_coupled_shared(
    flow: Dataflow,
    combine: fx.Node,
    x_base: fx.Node,
    routing: set[fx.Node],
    has_expert_gemm: Callable[[Region], bool],
    zero_weight_classes: frozenset[int] = frozenset(),
) -> CoupledShared | None:
    """Split ``combine = routed + shared`` when the shared branch reads the router's values alone.

    ``routing`` are the router's nodes (computed from its logits alone, per
    token); ``has_expert_gemm`` says whether a region multiplies by routed
    expert weights.  The split holds when one operand of the add is a closed
    region with the routed experts' GEMMs and the other's own nodes (those
    outside the routed region) read from the routed region nothing but
    router values, and contain GEMMs of their own (the shared experts) —
    or, when the router has ``zero_weight_classes`` (slots whose weight the
    model sets to 0 before its experts), no GEMM at all (those slots' own
    term, the module docstring's second sketch).  Returns None when
    ``combine`` is not such a sum.
    """
    if op_name(combine) not in _ADDS or len(combine.args) != 2:
        return None
    operands = [a for a in combine.args if isinstance(a, fx.Node)]
    if len(operands) != 2 or operands[0] is operands[1]:
        return None
    hidden = (tensor_shape(x_base) or (None,))[-1]
    for routed, shared in (operands, operands[::-1]):
        if tensor_shape(routed) != tensor_shape(combine):
            continue
        try:
            region = block_region(flow, routed, x_base)
        except Mismatch:
            continue
        if not has_expert_gemm(region):
            continue
        own = {
            n for n in (flow.ancestors(shared) | {shared})
            if n not in region.nodes and n.op not in ("placeholder", "get_attr")
            and n not in flow.ancestors(x_base) and n is not x_base
        }
        reads = {s for n in own for s in n.all_input_nodes if s in region.nodes}
        reads = {s for s in reads if not _is_view_of(s, x_base)}  # the block's input, reshaped or cast
        if not reads or not reads <= routing:
            continue  # independent of the router (the ordinary case), or reads the dispatch
        widths = _expert_widths(own, hidden)
        if not widths:
            if zero_weight_classes and not any(op_name(n) in _GEMMS | {"linear"} for n in own):
                return CoupledShared(routed=routed, region=region, shared=shared, spec=None, combine=combine)
            continue  # no GEMM of its own: not an expert
        spec = SharedExpertSpec(intermediate_size=int(widths[0]), gate="router")
        return CoupledShared(routed=routed, region=region, shared=shared, spec=spec, combine=combine)
    return None
