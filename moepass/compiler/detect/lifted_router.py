"""Match any top-k router by what it computes, keeping the model's own math in the graph.

When a router is none of the named kinds (:mod:`moepass.compiler.detect.router`), the
general case applies: moepass owns only the selection of how many experts a
token keeps; everything else the model computes stays as it is::

    x ─► linear(W_r) ─► [the model's scoring ops] ─► S ─► topk(S, k) ─┬► ids ─────────────┐
              │                                                       └► [the model's weight ops,
              └──────────────────────────────────────────────────────────  gathers, renorms] ─► w
                                                                                              │
    rewrite:  topk(S, k, sorted=True)   (the same picks, best first)                          ▼
              ids', w' = moepass.route(logits, x, [ids, w, …], config{kind: lifted})   k per token

The *routing set* grows forward from the router linear: a node belongs to it
when it reads only routing nodes, parameters, constants and sizes, and keeps
the per-token layout (its leading axes are the tokens').  The weights are the
float routing value of the selection's size that leaves the routing set (to
the experts' dispatch, or out of the graph when the experts loop
graph-broke).  Validation then proves the rewrite reproduces the block.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, example_value, op_name, tensor_shape
from moepass.compiler.detect.common import CAST_OPS, SHAPE_OPS, Mismatch, arg, module_path_of_param, resolve_param
from moepass.compiler.detect.router import RouterMatch, _check_last_dim, _getitem_users, _topk_k, _x_base
from moepass.compiler.spec import RouterSpec

__all__ = ["match_lifted_router", "match_top1_router", "is_top1_selection", "feeds_capacity", "routing_set"]

#: Ops that only plumb values; left out of the formula shown to users.
_QUIET = CAST_OPS | SHAPE_OPS | {"getitem", "squeeze", "expand", "expand_as", "contiguous"}


def _expr(size) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _same(a, b) -> bool:
    return sympy.simplify(_expr(a) - _expr(b)) == 0


def _router_linear(scores: fx.Node, flow: Dataflow, num_experts: int) -> fx.Node:
    """The latest linear behind ``scores`` whose weight is an [E', H] parameter with E' ≥ E.

    E' > E: the router scores more than the routed experts (Inkling's rows for
    its shared experts) and the selection reads E of its columns.
    """
    found = []
    for node in flow.ancestors(scores) | {scores}:
        if op_name(node) != "linear":
            continue
        weight = resolve_param(arg(node, 1, "weight"))
        shape = tensor_shape(weight) if weight is not None else None
        if shape is not None and len(shape) == 2 and isinstance(shape[0], int) and shape[0] >= num_experts:
            found.append(node)
    if not found:
        raise Mismatch(
            f"no router linear with {num_experts} outputs behind the scores {scores.name} selects from "
            "(a router that is not a linear of the block input)"
        )
    return max(found, key=flow.position.__getitem__)


def _is_scalar(node: fx.Node) -> bool:
    return isinstance(example_value(node), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def _per_token(node: fx.Node, token_dims: tuple) -> bool:
    value = example_value(node)
    if isinstance(value, (tuple, list)):  # topk / sort / max results: judged by their getitems
        return True
    if not isinstance(value, torch.Tensor):
        return _is_scalar(node)
    shape = tuple(value.shape)
    return len(shape) > len(token_dims) and all(_same(a, b) for a, b in zip(shape, token_dims))


def routing_set(
    linear: fx.Node, x_base: fx.Node, flow: Dataflow, token_dims: tuple, per_token_ids: fx.Node | None = None
) -> set[fx.Node]:
    """Nodes computed from the router's logits alone (plus parameters), in per-token layout.

    ``per_token_ids`` is a selection with one value per token (an ``argmax``,
    [T]): a member though it has no feature axis.
    """
    from_input = flow.descendants(x_base) | {x_base}
    members = {linear}
    for node in flow.sorted(flow.descendants(linear)):
        if node.op != "call_function" and node.op != "call_method":
            continue
        sources = node.all_input_nodes
        if not all(s in members or s not in from_input or _is_scalar(s) for s in sources):
            continue
        if _per_token(node, token_dims) or node is per_token_ids:
            members.add(node)
    return members


def _viewed_parameter(node: fx.Node) -> fx.Node | None:
    """The parameter ``node`` is a view or cast of (through single-input ops), if any."""
    for _ in range(8):
        if node.op in ("placeholder", "get_attr"):
            return node
        if op_name(node) not in CAST_OPS | SHAPE_OPS | {"squeeze", "expand", "expand_as"} or not node.args:
            return None
        if not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _formula(nodes: list[fx.Node]) -> str:
    names = []
    for node in nodes:
        name = op_name(node)
        if name in _QUIET or (names and names[-1] == name):
            continue
        names.append(name)
    return "→".join(names)


def match_lifted_router(anchor: fx.Node, flow: Dataflow) -> RouterMatch:
    """Match the router whose selection is ``anchor`` by what it computes (see the module docstring)."""
    k = _topk_k(anchor)
    _check_last_dim(anchor, arg(anchor, 2, "dim", -1), "topk")
    if arg(anchor, 3, "largest", True) is not True:
        raise Mismatch(f"{anchor.name}: topk(largest=False) is not an expert selection")
    scores = anchor.args[0]
    score_shape = tensor_shape(scores)
    if score_shape is None or not isinstance(score_shape[-1], int):
        raise Mismatch(f"{anchor.name}: selects from {scores.name}, whose last axis is not a fixed expert count")
    num_experts = score_shape[-1]
    linear = _router_linear(scores, flow, num_experts)
    weight = resolve_param(arg(linear, 1, "weight"))
    hidden = tensor_shape(weight)[1]
    raw_bias = arg(linear, 2, "bias")
    bias = resolve_param(raw_bias)
    if raw_bias is not None and bias is None:
        raise Mismatch(f"{linear.name}: router bias is not a parameter")
    x_input = arg(linear, 0, "input")
    if (tensor_shape(x_input) or (None,))[-1] != hidden:
        raise Mismatch(f"{linear.name}: router input is not [.., {hidden}]")
    x_base = _x_base(x_input)
    token_dims = tuple(tensor_shape(linear)[:-1])
    members = routing_set(linear, x_base, flow, token_dims)
    if anchor not in members:
        raise Mismatch(f"{anchor.name}: the scores it selects from depend on more than the router's logits")
    outputs = _getitem_users(anchor)
    if 1 not in outputs:
        raise Mismatch(f"{anchor.name}: the selected expert ids are never used")
    ids = outputs[1]
    selection = flow.descendants(anchor)
    candidates = []
    for node in members & selection:
        value = example_value(node)
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            continue
        trailing = tuple(value.shape)[len(token_dims):]
        if not all(isinstance(size, int) for size in trailing) or sympy.prod(trailing) != k:
            continue
        if any(user not in members for user in node.users):
            candidates.append(node)
    if not candidates:
        raise Mismatch(f"{anchor.name}: no routing weights of the selection's size leave the router")
    # weights shaped [..., k] before ones that only hold k values ([..., k, 1]): with as many shared experts
    # as picks, Inkling's shared gammas reshaped to [T, S, 1] would pass for the routed weights
    exact = [n for n in candidates if tuple(example_value(n).shape)[len(token_dims):] == (k,)]
    weights_end = max(exact or candidates, key=flow.position.__getitem__)
    formula_nodes = flow.sorted((flow.ancestors(weights_end) | flow.ancestors(anchor) | {weights_end}) & members)
    params = {weight} | ({bias} if bias is not None else set())
    for node in formula_nodes:  # parameters read directly or through views of them (a squeezed bias)
        for source in node.all_input_nodes:
            if source in members or source is x_base:
                continue
            if source.op in ("placeholder", "get_attr"):
                params.add(source)  # a parameter, or a float attribute made an input (dynamic=True)
                continue
            viewed = _viewed_parameter(source)  # a squeezed or cast parameter (Ernie's bias)
            if viewed is not None:
                params.add(viewed)
            elif _is_scalar(source):  # a scale read from an input (dynamic=True makes float attributes inputs)
                params |= {a for a in source.all_input_nodes if a.op in ("placeholder", "get_attr")}
    zero_classes = _zero_weight_classes(formula_nodes, weights_end, ids, members, num_experts, flow)
    return _lifted_match(num_experts, k, hidden, formula_nodes, anchor, linear, x_input, x_base, weight, bias, ids,
                         weights_end, params, zero_classes)


_MASK_FILLS = {"masked_fill", "masked_fill_"}
_COMPARISONS = {"eq": "==", "__eq__": "==", "ge": ">=", "__ge__": ">=", "gt": ">", "__gt__": ">"}


def _classes_of_mask(mask, ids: fx.Node, members: set[fx.Node], num_experts: int) -> set[int]:
    """The classes ``mask`` is true for, when it compares the selected ids with a constant (else empty)."""
    if not isinstance(mask, fx.Node) or op_name(mask) not in _COMPARISONS or len(mask.args) != 2:
        return set()
    source, constant = mask.args
    if not isinstance(source, fx.Node) or not isinstance(constant, int) or isinstance(constant, bool):
        return set()
    # the ids themselves, or views and casts of them
    while source is not ids and source in members and op_name(source) in CAST_OPS | SHAPE_OPS and source.args:
        source = source.args[0]
    if source is not ids:
        return set()
    relation = _COMPARISONS[op_name(mask)]
    if relation == "==":
        return {constant} if 0 <= constant < num_experts else set()
    first = constant if relation == ">=" else constant + 1
    return set(range(max(first, 0), num_experts))


#: Ops that map a zero weight to zero (a division only through its numerator).
_KEEP_ZERO = CAST_OPS | SHAPE_OPS | {"getitem", "squeeze", "expand", "mul", "imul", "mul_", "__mul__", "truediv", "div",
                                    "div_", "itruediv", "__truediv__", "masked_fill", "masked_fill_"}


def _stays_zero(start: fx.Node, end: fx.Node, flow: Dataflow) -> bool:
    """Whether a zero in ``start`` is still zero in ``end`` (every op between them keeps zeros)."""
    between = (flow.descendants(start) & flow.ancestors(end)) | {end}
    for node in between:
        name = op_name(node)
        if name not in _KEEP_ZERO or (name in _MASK_FILLS and arg(node, 2, "value") != 0):
            return False
        if name in ("truediv", "div", "div_", "itruediv", "__truediv__") and not (
            node.args and (node.args[0] is start or node.args[0] in between)
        ):
            return False
    return True



def _lifted_match(num_experts: int, top_k: int, hidden, formula_nodes, anchor, linear, x_input, x_base, weight, bias,
                  ids, weights_end, params, zero_classes: frozenset[int] = frozenset()) -> RouterMatch:
    """The match of a lifted router: its spec (the model's own formula, kept as it computes it) and its nodes."""
    spec = RouterSpec(
        kind="lifted",
        num_experts=num_experts,
        top_k=top_k,
        linear_has_bias=bias is not None,
        hidden_size=hidden,
        formula=_formula(formula_nodes),
    )
    return RouterMatch(
        spec=spec,
        anchor=anchor,
        linear=linear,
        x_input=x_input,
        x_base=x_base,
        weight=weight,
        bias=bias,
        correction_bias=None,
        ids=ids,
        weights_start=weights_end,
        weights_end=weights_end,
        module_path=module_path_of_param(weight),
        param_nodes=params,
        zero_weight_classes=zero_classes,
    )

def _zero_weight_classes(
    nodes: list[fx.Node], weights_end: fx.Node, ids: fx.Node, members: set[fx.Node], num_experts: int, flow: Dataflow
) -> frozenset[int]:
    """Classes whose selected weight the model's formula sets to 0 (``w.masked_fill(ids == c, 0)``).

    Such a class is an expert that adds nothing (ZAYA's skip expert): its
    slots cost no GEMM row once it is given no expert weights.  Only masks
    whose zeros reach the weights unchanged count.
    """
    found: set[int] = set()
    for node in nodes:
        if op_name(node) in _MASK_FILLS and arg(node, 2, "value") == 0 and (
            node is weights_end or _stays_zero(node, weights_end, flow)
        ):
            found |= _classes_of_mask(arg(node, 1, "mask"), ids, members, num_experts)
    return frozenset(found)



def is_top1_selection(node: fx.Node) -> bool:
    """Whether ``node`` picks one entry per row by value: ``argmax(s, -1)``, or ``max(s, -1)`` whose indices are used."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    name = op_name(node)
    if arg(node, 2, "keepdim", False):  # a [.., 1] pick: sparsemixer thresholds, not a selection of experts
        return False
    if name == "argmax":
        return arg(node, 1, "dim") is not None
    if name == "max":
        dim = arg(node, 1, "dim")
        return isinstance(dim, int) and 1 in _getitem_users(node)
    return False


def feeds_capacity(ids: fx.Node, flow: Dataflow) -> bool:
    """Whether the selected ids are counted in token order against a capacity (a ``cumsum`` over them)."""
    return any(op_name(n) == "cumsum" for n in flow.descendants(ids))


def match_top1_router(anchor: fx.Node, flow: Dataflow) -> RouterMatch:
    """Match a router that picks one expert per token by ``argmax`` (or ``max(dim)``'s indices).

    The selection is a top-1 of the same scores; it is matched as a lifted
    router of k = 1 (the model's weight formula, e.g. the chosen expert's
    probability gathered by its id, stays in the graph).  A selection whose
    ids are counted against an expert capacity (Switch Transformers, NLLB-MoE:
    a ``cumsum`` over them, tokens past the capacity skip the experts) is not
    a top-k routing.
    """
    _check_last_dim(anchor, arg(anchor, 1, "dim"), op_name(anchor))
    if arg(anchor, 2, "keepdim", False):
        raise Mismatch(f"{anchor.name}: {op_name(anchor)}(keepdim=True) selection")
    scores = anchor.args[0]
    score_shape = tensor_shape(scores)
    if score_shape is None or len(score_shape) < 2 or not isinstance(score_shape[-1], int):
        raise Mismatch(f"{anchor.name}: selects from {scores.name}, whose last axis is not a fixed expert count")
    num_experts = score_shape[-1]
    linear = _router_linear(scores, flow, num_experts)
    weight = resolve_param(arg(linear, 1, "weight"))
    hidden = tensor_shape(weight)[1]
    raw_bias = arg(linear, 2, "bias")
    bias = resolve_param(raw_bias)
    if raw_bias is not None and bias is None:
        raise Mismatch(f"{linear.name}: router bias is not a parameter")
    x_input = arg(linear, 0, "input")
    if (tensor_shape(x_input) or (None,))[-1] != hidden:
        raise Mismatch(f"{linear.name}: router input is not [.., {hidden}]")
    x_base = _x_base(x_input)
    token_dims = tuple(tensor_shape(linear)[:-1])
    ids = anchor if op_name(anchor) == "argmax" else _getitem_users(anchor)[1]
    if feeds_capacity(ids, flow):
        raise Mismatch(
            "no top-k expert selection: the router picks experts by argmax with an expert capacity "
            "(tokens over capacity skip the experts); only top-k routers are supported"
        )
    members = routing_set(linear, x_base, flow, token_dims, per_token_ids=anchor if ids is anchor else None)
    if anchor not in members:
        raise Mismatch(f"{anchor.name}: the scores it selects from depend on more than the router's logits")
    members.add(ids)
    candidates = []
    for node in members & flow.descendants(anchor):
        value = example_value(node)
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            continue
        trailing = tuple(value.shape)[len(token_dims):]
        if not all(isinstance(size, int) for size in trailing) or sympy.prod(trailing) != 1:
            continue
        if any(user not in members for user in node.users):
            candidates.append(node)
    if not candidates:
        raise Mismatch(f"{anchor.name}: no routing weight of the chosen expert leaves the router (a top-1 with no weight)")
    weights_end = max(candidates, key=flow.position.__getitem__)
    formula_nodes = flow.sorted((flow.ancestors(weights_end) | flow.ancestors(anchor) | {weights_end}) & members)
    params = {weight} | ({bias} if bias is not None else set())
    for node in formula_nodes:
        for source in node.all_input_nodes:
            if source in members or source is x_base:
                continue
            if source.op in ("placeholder", "get_attr"):
                params.add(source)
                continue
            viewed = _viewed_parameter(source)
            if viewed is not None:
                params.add(viewed)
    return _lifted_match(num_experts, 1, hidden, formula_nodes, anchor, linear, x_input, x_base, weight, bias, ids,
                         weights_end, params)
