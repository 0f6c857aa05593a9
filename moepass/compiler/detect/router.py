"""Match the router of an MoE block, anchored on its expert-selection ``topk``.

Patterns (``x`` the block input, ``W`` an [E, H] parameter)::

    softmax_topk        linear(x, W) → [float] → softmax → topk(k) ─► values → [÷ sum] → weights
                                                                   └► ids
    topk_softmax        linear(x, W[, b]) → [float] → topk(k) ─► values → softmax → weights
    sigmoid_group_topk  linear → sigmoid ─┬► (+ bias) → [group top-2 sum → topk(groups) → mask]
                                          │            → topk(k) ─► ids
                                          └► gather(ids) → [÷ (sum + eps)] → [× scale] → weights
    topk_sigmoid        linear → topk(k) → scatter into full(-inf) → sigmoid → dense weights [T, E]

The walk back from ``topk`` to the router linear passes only casts, shape ops,
softmax/sigmoid, a bias add and the group mask; anything else is a mismatch
with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, example_value, op_name, tensor_shape
from moepass.compiler.detect.common import CAST_OPS, SHAPE_OPS, Mismatch, arg, module_path_of_param, resolve_param
from moepass.compiler.spec import RouterSpec

__all__ = ["RouterMatch", "is_topk", "match_router", "find_router_linear"]

_DIV_OPS = {"truediv", "itruediv", "div", "div_", "true_divide"}
_MUL_OPS = {"mul", "imul", "mul_", "multiply"}
_ADD_OPS = {"add", "iadd", "add_"}
_WEIGHT_CHAIN_OPS = CAST_OPS | _DIV_OPS | _MUL_OPS | _ADD_OPS | {"softmax", "sigmoid"}


@dataclass
class RouterMatch:
    """A matched router and the graph nodes it is made of."""

    spec: RouterSpec
    anchor: fx.Node
    linear: fx.Node
    #: The router linear's input, and the deepest node it is a cast/view of.
    x_input: fx.Node
    x_base: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    correction_bias: fx.Node | None
    #: ``topk(...)[1]``: selected expert ids [T, k].
    ids: fx.Node
    #: Where the routing weights start (``topk(...)[0]`` or ``gather``) and end.
    weights_start: fx.Node
    weights_end: fx.Node | None
    #: Module path of the router linear's weight owner, e.g. ``model.layers.0.mlp.gate``.
    module_path: str | None
    param_nodes: set[fx.Node] = field(default_factory=set)
    #: Classes the selection may pick whose routing weight the model forces to
    #: 0 (ZAYA's skip class E: ``w.masked_fill(ids == E, 0)``): they add
    #: nothing, so they need no expert (lifted routers only).
    zero_weight_classes: frozenset[int] = frozenset()
    #: Classes the block serves itself as identity experts (it adds w·x for their slots and
    #: keeps them from its experts: LongCat-Flash from transformers 5.25), once detection has
    #: recognised that term (:mod:`moepass.compiler.detect.identity_term`); ``weights_end`` is
    #: then the router's true weights, before the block zeroes those slots.
    identity_classes: frozenset[int] = frozenset()


def is_topk(node: fx.Node) -> bool:
    """Whether ``node`` is a ``topk`` call of any spelling."""
    return node.op in ("call_function", "call_method") and op_name(node) == "topk"


def _topk_k(node: fx.Node) -> int:
    k = arg(node, 1, "k")
    if not isinstance(k, int):
        raise Mismatch(f"{node.name}: topk with a non-constant k ({k!r})")
    return k


def _check_last_dim(node: fx.Node, dim, what: str) -> None:
    shape = tensor_shape(node.args[0]) if node.args else None
    rank = len(shape) if shape is not None else None
    if dim is None:
        dim = -1
    if not isinstance(dim, int) or (dim != -1 and dim != (rank or 0) - 1):
        raise Mismatch(f"{node.name}: {what} over dim {dim}, not the expert dim")


def _getitem_users(node: fx.Node) -> dict[int, fx.Node]:
    return {
        user.args[1]: user
        for user in node.users
        if op_name(user) == "getitem" and isinstance(user.args[1], int)
    }


#: Elementwise ops a selection score may pass through on its way from the
#: router linear (the lifted router keeps them in the graph as they are).
_ELEMENTWISE = {
    "neg", "abs", "exp", "log", "sqrt", "rsqrt", "square", "tanh", "erf", "relu", "silu", "softplus", "gelu",
    "clamp", "clamp_min", "clamp_max", "pow", "sub", "rsub", "log_sigmoid", "logsigmoid",
}
#: What the named router kinds are made of between the linear and the top-k.
_KNOWN_PATH = CAST_OPS | SHAPE_OPS | {"softmax", "sigmoid", "log_softmax", "masked_fill", "dropout", "linear"} | (
    _ADD_OPS | _MUL_OPS | _DIV_OPS
)


def find_router_linear(start: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from a topk input to the router linear; return it and the path.

    The walk passes casts, views, softmax/sigmoid, biases and scales, and any
    elementwise op (a square-root-softplus score, say).
    """
    path: list[fx.Node] = []
    node = start
    for _ in range(32):
        name = op_name(node)
        path.append(node)
        if name == "linear":
            return node, path
        if name in CAST_OPS | SHAPE_OPS | _ELEMENTWISE | {"softmax", "sigmoid", "log_softmax"} and node.args:
            node = node.args[0]
        elif name in ("masked_fill", "dropout") and node.args:
            # dropout passes through here so the block is found and its region
            # check can report the random numbers it draws in training mode
            node = node.args[0]
        elif name in _ADD_OPS and len(node.args) == 2:
            a, b = node.args
            a_param = resolve_param(a) is not None or not isinstance(a, fx.Node)
            node = b if a_param else a
        elif name in _MUL_OPS | _DIV_OPS and len(node.args) == 2 and not isinstance(node.args[1], fx.Node):
            node = node.args[0]
        elif name in _MUL_OPS | _DIV_OPS and len(node.args) == 2 and resolve_param(node.args[1]) is not None:
            node = node.args[0]
        else:
            raise Mismatch(f"the scores selected by {start.name} come from {name} ({node.name}), not a router linear")
        if not isinstance(node, fx.Node):
            break
    raise Mismatch(f"no router linear found behind {start.name}")


def _x_base(node: fx.Node) -> fx.Node:
    """The deepest node ``node`` is a cast or view of."""
    for _ in range(16):
        # a cast that reads a second tensor (type_as(y), to(y)) is where the block's input starts
        reads_other = any(isinstance(a, fx.Node) for a in node.args[1:]) or any(
            isinstance(v, fx.Node) for v in node.kwargs.values()
        )
        if op_name(node) in CAST_OPS | SHAPE_OPS and node.args and isinstance(node.args[0], fx.Node) and not (
            op_name(node) in CAST_OPS and reads_other
        ):
            node = node.args[0]
        else:
            break
    return node


def _weights_chain(start: fx.Node) -> list[fx.Node]:
    """Nodes that keep transforming the [T, k] routing weights, from ``start``."""
    shape = tensor_shape(start)
    chain = [start]
    frontier = [start]
    seen = {start}
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            if op_name(user) in _WEIGHT_CHAIN_OPS and tensor_shape(user) == shape:
                seen.add(user)
                chain.append(user)
                frontier.append(user)
    return chain


def _scalar_args(node: fx.Node) -> list[float]:
    return [float(a) for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]


def _read_weight_formula(chain: list[fx.Node], flow: Dataflow) -> tuple[bool, float, float]:
    """(renormalize, eps, scaling factor) from the ops of a weights chain.

    A scale by a constant (``* c`` or ``/ c``) applied before a renormalisation
    cancels in it; only the scales after the last renormalisation count.
    """
    renormalize, eps = False, 0.0
    members = set(chain)
    renormalized_at = -1
    scales: list[tuple[int, float]] = []
    for node in chain:
        name = op_name(node)
        if name in _DIV_OPS and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
            divisor = node.args[1]
            # divisor = sum(weights) [+ eps]
            for _ in range(4):
                dname = op_name(divisor)
                if dname in _ADD_OPS:
                    eps += sum(_scalar_args(divisor))
                    divisor = next(a for a in divisor.args if isinstance(a, fx.Node))
                elif dname in ("sum", "norm") and divisor.args and divisor.args[0] in members:
                    renormalize = True
                    renormalized_at = max(renormalized_at, flow.position[node])
                    break
                else:
                    raise Mismatch(f"{node.name}: routing weights divided by {dname}, not their sum")
        elif name in _DIV_OPS and len(node.args) == 2 and _scalar_args(node)[-1:] == [node.args[1]]:
            scales.append((flow.position[node], 1.0 / float(node.args[1])))
        elif name in _MUL_OPS:
            scalars = _scalar_args(node)
            if len(scalars) != 1:
                symbolic = [a for a in node.args if isinstance(a, fx.Node) and isinstance(example_value(a), torch.SymFloat)]
                if symbolic:
                    raise Mismatch(
                        f"routing weights are scaled by {symbolic[0].name}, a value known only at run time "
                        "(torch.compile(dynamic=True) "
                        "turns float attributes into inputs); compile without dynamic=True"
                    )
                raise Mismatch(f"{node.name}: routing weights multiplied by a tensor")
            scales.append((flow.position[node], scalars[0]))
    scale = 1.0
    for position, factor in scales:
        if position > renormalized_at:
            scale *= factor
    return renormalize, eps, scale


def match_router(anchor: fx.Node, flow: Dataflow) -> RouterMatch:
    """Match the router whose expert selection is the ``topk`` node ``anchor``."""
    k = _topk_k(anchor)
    _check_last_dim(anchor, arg(anchor, 2, "dim", -1), "topk")
    if arg(anchor, 3, "largest", True) is not True:
        raise Mismatch(f"{anchor.name}: topk(largest=False) is not an expert selection")
    linear, path = find_router_linear(anchor.args[0])
    weight = resolve_param(arg(linear, 1, "weight"))
    if weight is None:
        raise Mismatch(f"{linear.name}: router weight is not a parameter")
    w_shape = tensor_shape(weight)
    if w_shape is None or len(w_shape) != 2 or not all(isinstance(s, int) for s in w_shape):
        raise Mismatch(f"{linear.name}: router weight has shape {w_shape}, expected [E, H]")
    num_experts, hidden = w_shape
    bias = resolve_param(arg(linear, 2, "bias"))
    if arg(linear, 2, "bias") is not None and bias is None:
        raise Mismatch(f"{linear.name}: router bias is not a parameter")
    outputs = _getitem_users(anchor)
    if 1 not in outputs:
        raise Mismatch(f"{anchor.name}: the selected expert ids are never used")
    ids = outputs[1]
    values = outputs.get(0)

    path_ops = [op_name(n) for n in path]
    foreign = sorted(set(path_ops) - _KNOWN_PATH)
    if foreign:
        raise Mismatch(f"{anchor.name}: the scores pass through {', '.join(foreign)}, outside the named router kinds")
    scored = [i for i, name in enumerate(path_ops) if name in ("softmax", "sigmoid", "log_softmax")]
    before_score = path[scored[-1] + 1 : -1] if scored else []
    arithmetic = [n.name for n in before_score if op_name(n) in _ADD_OPS | _MUL_OPS | _DIV_OPS | {"masked_fill"}]
    if arithmetic:  # the named kinds score the linear's output itself (Muse Spark scales its logits first)
        raise Mismatch(f"{anchor.name}: the logits are changed ({', '.join(arithmetic)}) before they are scored")
    correction_bias = None
    n_group, topk_group = 1, 1
    params = {weight} | ({bias} if bias is not None else set())
    after_linear = flow.descendants(linear)
    group_topks = [n for n in flow.ancestors(anchor) if is_topk(n) and n in after_linear]

    if "sigmoid" in path_ops:
        kind = "sigmoid_group_topk"
        for node in path:
            if op_name(node) in _ADD_OPS:
                for a in node.args:
                    p = resolve_param(a)
                    shape = tensor_shape(p) if p is not None else None
                    if p is not None and shape == (num_experts,):
                        correction_bias = p
                        params.add(p)
        if group_topks:
            inner = [n for n in group_topks if len(tensor_shape(n.args[0]) or ()) == 3]
            outer = [n for n in group_topks if len(tensor_shape(n.args[0]) or ()) == 2]
            if len(inner) != 1 or len(outer) != 1:
                raise Mismatch(f"{anchor.name}: group-limited selection with an unexpected structure")
            n_group = int(tensor_shape(inner[0].args[0])[1])
            topk_group = _topk_k(outer[0])
        gathers = [u for u in ids.users if op_name(u) == "gather"]
        weights_start = gathers[0] if gathers else values
    elif "softmax" in path_ops:
        if group_topks:  # DeepSeek-V2's group-limited greedy: groups scored by their best expert
            raise Mismatch(f"{anchor.name}: group-limited selection over softmax scores (carried as a lifted router)")
        kind = "softmax_topk"
        weights_start = values
    else:
        if group_topks:
            raise Mismatch(f"{anchor.name}: group-limited selection without sigmoid scores")
        if values is None:
            raise Mismatch(f"{anchor.name}: the selected logits are never used")
        users = {op_name(u): u for u in values.users}
        if "softmax" in users:
            kind = "topk_softmax"
            _check_last_dim(users["softmax"], arg(users["softmax"], 1, "dim"), "softmax")
        elif "scatter_" in users or "scatter" in users:
            scatter = users.get("scatter_") or users["scatter"]
            dense = _dense_sigmoid(scatter)
            if dense is None:
                raise Mismatch(f"{anchor.name}: top-k logits scattered but not passed through sigmoid")
            kind = "topk_sigmoid"
        else:
            raise Mismatch(
                f"{anchor.name}: top-k over raw logits, then {sorted(users)}: no softmax or sigmoid to form weights"
            )
        weights_start = values
    if weights_start is None:
        raise Mismatch(f"{anchor.name}: could not find where the routing weights are formed")

    chain = _weights_chain(weights_start) if kind != "topk_sigmoid" else [weights_start]
    renormalize, eps, scale = _read_weight_formula(chain, flow) if kind != "topk_sigmoid" else (False, 0.0, 1.0)
    if kind == "topk_softmax":
        renormalize = True
    weights_end = max(chain, key=flow.position.__getitem__) if kind != "topk_sigmoid" else None

    spec = RouterSpec(
        kind=kind,
        num_experts=num_experts,
        top_k=k,
        renormalize=renormalize,
        renormalize_eps=eps,
        scaling_factor=scale,
        has_correction_bias=correction_bias is not None,
        n_group=n_group,
        topk_group=topk_group,
        linear_has_bias=bias is not None,
        hidden_size=hidden,
    )
    x_input = arg(linear, 0, "input")
    if (tensor_shape(x_input) or (None,))[-1] != hidden:
        raise Mismatch(f"{linear.name}: router input is not [.., {hidden}]")
    return RouterMatch(
        spec=spec,
        anchor=anchor,
        linear=linear,
        x_input=x_input,
        x_base=_x_base(x_input),
        weight=weight,
        bias=bias,
        correction_bias=correction_bias,
        ids=ids,
        weights_start=weights_start,
        weights_end=weights_end,
        module_path=module_path_of_param(weight),
        param_nodes=params,
    )


def _dense_sigmoid(scatter: fx.Node) -> fx.Node | None:
    """For Llama 4: the sigmoid applied to the scattered top-k logits, if any."""
    base = scatter.args[0] if scatter.args else None
    fill = arg(base, 1, "fill_value") if isinstance(base, fx.Node) and op_name(base) == "full_like" else None
    if fill != float("-inf"):
        return None
    node = scatter
    for _ in range(4):
        sig = [u for u in node.users if op_name(u) == "sigmoid"]
        if sig:
            return sig[0]
        casts = [u for u in node.users if op_name(u) in CAST_OPS]
        if not casts:
            return None
        node = casts[0]
    return None

