"""Rewrite matched MoE blocks into ``torch.ops.moepass`` calls.

Full block (pattern → check → replacement)::

    pattern      logits = linear(x, W_r) ─► [router ops] ─► ids, weights ─► [dispatch, expert GEMMs,
                 activation, combine] ─► C
    check        the region of C is closed and safe; the replacement, run with
                 the static policy on a random x and the real weights, equals C
                 to round-off (see :mod:`moepass.compiler.validate`)
    replacement  ids, w = moepass.route(logits, x, tensors, route_config)
                 C'     = moepass.experts(x, ids, w, w1, w2, b1, b2, experts_config)
                          (+ moepass.zero_compute_experts(x, ids, w, E, kinds, None) when the
                          block has zero-computation experts: ids E… cost no GEMM row)

    with a per-slot output function (a per-expert norm before the routing weight)::

                 rows   = moepass.experts(repeat_interleave(x, K), ids.reshape(-1, 1), ones, …, rows_config)
                 C'     = moepass.expert_output(rows, ids, w, output_tensors, experts_config)

Router only (the experts loop graph-broke)::

    pattern      logits ─► [router ops] ─► ids, weights ─► (one_hot(E+1) / ids == e in this graph)
    replacement  ids', w' = moepass.route(logits, x, tensors, route_config)    (sentinel: id E, weight 0)

    pattern      logits ─► [router ops] ─► ids, weights ─► graph output (read where the graph does not show)
    replacement  _, w' = moepass.route(logits, x, [ids, weights, …], route_config)   (the model's ids stay;
                 a dropped slot's weight is 0)

Every applied rewrite bumps ``torch._dynamo.utils.counters["moepass"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from moepass.compiler.dataflow import Dataflow, alias_root, example_value, mutated_node, op_name, tensor_shape, written_value
from moepass.compiler.detect import BlockMatch
from moepass.compiler.detect.common import Mismatch
from moepass.compiler.detect.region import satellites
from moepass.compiler.detect.router import _x_base
from moepass.compiler.validate import concrete_shape, kept_readers_error, relative_error, run_region
from moepass.policies import ResolvedPolicy
from moepass.runtime.ops import (
    ExpertsConfig,
    RouteConfig,
    experts_with_output,
    parse_route_config,
    routes_not_captured,
    slot_rows_config,
    split_experts,
)

__all__ = [
    "BlockRewrite", "plan_rewrite", "validate_rewrite", "apply_rewrite", "remove_dead_nodes", "probe_renormalisation",
]

logger = logging.getLogger(__name__)


@dataclass
class BlockRewrite:
    """Everything needed to replace one block, with tensors resolved."""

    match: BlockMatch
    route_config: RouteConfig
    static_route_config: RouteConfig
    experts_config: ExpertsConfig | None
    #: Route op tensors in role order: graph nodes (parameters) or new tensors.
    route_tensors: list[fx.Node | torch.Tensor]
    #: The route tensors the static policy needs (for validation).
    static_route_tensors: list[fx.Node | torch.Tensor] = field(default_factory=list)
    #: Expert weights: graph nodes (stacked parameters) or stacked tensors.
    weights: dict[str, fx.Node | torch.Tensor | None] = field(default_factory=dict)
    inserted: list[fx.Node] = field(default_factory=list)
    #: Write the experts in their split form (expert_rows → experts_up →
    #: expert_activation → experts_down), whose pieces have autograd formulas.
    differentiable: bool = False
    #: The expert weights as tensors, once :func:`validate_rewrite` has resolved them (for tuning).
    weight_values: dict[str, torch.Tensor | None] | None = None


def _stack_modules(nodes: Any, env: dict[fx.Node, Any], dim_cat: int = 1) -> torch.Tensor | None:
    """Stack per-expert weights: [[gate_e...], [up_e...]] → [E, 2I, H]; [down_e...] → [E, H, I]."""
    if nodes is None:
        return None
    if nodes and isinstance(nodes[0], list):
        parts = [torch.stack([env[n].detach() for n in group]) for group in nodes]
        return torch.cat(parts, dim=dim_cat) if len(parts) > 1 else parts[0]
    return torch.stack([env[n].detach() for n in nodes])


@dataclass(frozen=True)
class StackInGraph:
    """Per-expert weights stacked by nodes in the graph on every call (``torch.stack`` / ``torch.cat``).

    Used when the graph will be differentiated: the gradients reach each
    expert's own parameters, and an optimizer's updates are seen by the next
    call (a snapshot taken at compile time would have neither).
    """

    #: [[gate_e...], [up_e...]] or [[w_e...]]: groups stacked, then joined on their first feature axis.
    groups: tuple[tuple[fx.Node, ...], ...]

    @staticmethod
    def of(nodes: Any) -> "StackInGraph | None":
        if nodes is None:
            return None
        groups = nodes if nodes and isinstance(nodes[0], list) else [nodes]
        return StackInGraph(tuple(tuple(group) for group in groups))

    def evaluate(self, env: dict[fx.Node, Any]) -> torch.Tensor:
        parts = [torch.stack([env[n] for n in group]) for group in self.groups]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def emit(self, inserter: "_Inserter", name: str) -> fx.Node:
        parts = [
            inserter.call("call_function", torch.stack, (list(group),), f"{name}_stack_{i}_{inserter.tag}")
            for i, group in enumerate(self.groups)
        ]
        if len(parts) == 1:
            return parts[0]
        return inserter.call("call_function", torch.cat, (parts, 1), f"{name}_cat_{inserter.tag}")


def plan_rewrite(
    match: BlockMatch,
    resolved: ResolvedPolicy,
    lowering: str,
    collect_stats: bool,
    env: dict[fx.Node, Any],
    differentiable: bool = False,
    cpu_prepack: str = "auto",
) -> BlockRewrite:
    """Resolve configs and weights for ``match`` under a resolved policy.

    ``differentiable`` asks for the split form of the experts (the graph will
    be differentiated); otherwise the fused ``moepass.experts`` op is used.
    """
    router = match.router
    roles: list[str] = []
    tensors: list[fx.Node | torch.Tensor] = []
    if router.correction_bias is not None:
        roles.append("correction_bias")
        tensors.append(router.correction_bias)
    model_order = match.experts is None and match.empty_slots == "model_ids"
    if model_order:  # the model's own selection, left in its order (see RouteConfig.empty_slots)
        roles += ["model_ids", "model_weights"]
        tensors += [router.ids, router.weights_end]
    elif router.spec.kind == "lifted":
        roles += ["selected_ids", "selected_weights"]
        tensors += [router.ids, router.weights_end]
    static_roles = tuple(roles)
    static_tensors = list(tensors)
    for name, tensor in resolved.tensors.items():
        roles.append(name)
        tensors.append(tensor)
    route_config = RouteConfig(
        router=match.spec.router,
        rule=resolved.rule,
        params=dict(resolved.params),
        k_min=resolved.k_min,
        k_max=resolved.k_max,
        tensor_roles=tuple(roles),
        uses_x=resolved.uses_x,
        renormalize=resolved.renormalize,
        block=match.path,
        empty_slots=match.empty_slots if match.experts is None else "sentinel",
    )
    static_config = RouteConfig(
        router=match.spec.router, tensor_roles=static_roles, block=match.path, empty_slots=route_config.empty_slots
    )
    experts_config = None
    weights: dict[str, Any] = {}
    if match.experts is not None:
        experts = match.experts
        experts_config = ExpertsConfig(
            spec=experts.spec, lowering=lowering, block=match.path, collect_stats=collect_stats, cpu_prepack=cpu_prepack
        )
        if experts.spec.stacked_from_modules and differentiable:
            weights = {name: StackInGraph.of(getattr(experts, name)) for name in ("w1", "w2", "b1", "b2")}
        elif experts.spec.stacked_from_modules:
            weights = {
                "w1": _stack_modules(experts.w1, env),
                "w2": _stack_modules(experts.w2, env),
                "b1": _stack_modules(experts.b1, env),
                "b2": _stack_modules(experts.b2, env),
            }
        else:
            weights = {"w1": experts.w1, "w2": experts.w2, "b1": experts.b1, "b2": experts.b2}
    return BlockRewrite(
        match, route_config, static_config, experts_config, tensors, static_tensors, weights,
        differentiable=differentiable,
    )


def _value(item: Any, env: dict[fx.Node, Any]) -> Any:
    if isinstance(item, StackInGraph):
        return item.evaluate(env)
    return env[item] if isinstance(item, fx.Node) else item


def _local_value(value: Any) -> Any:
    """A DTensor weight as its local tensor (validation gives expert-parallel blocks replicated ones)."""
    to_local = getattr(value, "to_local", None)
    return to_local() if callable(to_local) and isinstance(value, torch.Tensor) else value


def _dense(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    dense = torch.zeros(ids.shape[0], num_experts + 1, dtype=torch.float64)
    return dense.scatter_add_(1, ids.long().clamp(0, num_experts), weights.double())[:, :num_experts]


def validate_rewrite(gm: fx.GraphModule, flow: Dataflow, plan: BlockRewrite, env: dict[fx.Node, Any]) -> float:
    """Max relative error of the replacement (static routing) against the original block.

    Runs on a random block input with the model's real parameters; ``env``
    maps placeholders to the example inputs.
    """
    match = plan.match
    router = match.router
    x_base = match.region.x_base
    x_value = example_value(x_base)
    generator = torch.Generator().manual_seed(0)
    random_x = torch.randn(concrete_shape(x_base), generator=generator, dtype=torch.float32).to(
        dtype=x_value.dtype, device=x_value.device
    )
    local = dict(env)
    local[x_base] = random_x
    region = match.region
    _draw_output_tensors(gm, match, local, generator)
    local = run_region(gm, flow, region, local)
    logits = local[router.linear]
    logits = logits.reshape(-1, logits.shape[-1])  # [B, S, E] logits (ZAYA's router MLP) as [T, E]
    static_tensors = [_value(t, local) for t in plan.static_route_tensors]
    with torch.no_grad(), routes_not_captured():
        ids, weights = torch.ops.moepass.route(logits, None, static_tensors, plan.static_route_config.to_json())
        if match.experts is None:
            expected = _dense(local[router.ids].reshape(ids.shape[0], -1), local[router.weights_end].reshape(ids.shape[0], -1).float(), router.spec.num_experts)
            actual = _dense(ids, weights, router.spec.num_experts)
            return relative_error(actual, expected)
        w = {k: _local_value(_value(v, local)) for k, v in plan.weights.items()}
        plan.weight_values = w
        x2d = local[match.experts.x_input].reshape(-1, match.spec.experts.hidden_size)
        quiet = dataclasses.replace(plan.experts_config, collect_stats=False)  # random inputs are not traffic
        if match.spec.experts.output:
            tensors = [local[t] for t in match.experts.output_tensors]
            out = experts_with_output(
                x2d, ids, weights, w["w1"], w["w2"], w["b1"], w["b2"], tensors, quiet.to_json(), plan.differentiable
            )
        else:
            run = split_experts if plan.differentiable else torch.ops.moepass.experts
            out = run(x2d, ids, weights, w["w1"], w["w2"], w["b1"], w["b2"], quiet.to_json())
        zero_compute = match.spec.experts.zero_compute
        if zero_compute:
            spec = match.spec.experts
            out = out + torch.ops.moepass.zero_compute_experts(
                x2d, ids, weights, spec.num_experts, ",".join(zero_compute), None
            )
    expected = local[written_value(region.combine)]
    error = relative_error(out.reshape(expected.shape).float(), expected.float())
    selection = router.anchor if router.spec.kind == "lifted" else None  # apply_rewrite sorts a lifted top-k
    return max(error, kept_readers_error(gm, flow, region, match.kept_readers, selection, local))


def _draw_output_tensors(gm: fx.GraphModule, match: BlockMatch, env: dict[fx.Node, Any], generator: torch.Generator) -> None:
    """Give the parameters a per-slot output function reads random values (in ``env``, for validation only).

    A per-expert norm's scales are often all ones until trained (Ergo's are),
    and then a function that read another expert's row would pass: drawn at
    random, every expert's row differs, so validation proves each slot meets
    its own expert's.
    """
    if match.experts is None or not match.spec.experts.output:
        return
    params: set[fx.Node] = set()
    for node in match.experts.output_tensors:
        params |= _sources(node) | ({node} if node.op in ("placeholder", "get_attr") else set())
    for param in sorted(params, key=lambda n: n.name):
        value = env.get(param)
        if value is None and param.op == "get_attr":
            value = fx.Interpreter(gm).fetch_attr(param.target)
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            drawn = torch.rand(value.shape, generator=generator, dtype=torch.float32) + 0.5
            env[param] = drawn.to(dtype=value.dtype, device=value.device)


def _sources(node: fx.Node) -> set[fx.Node]:
    """The graph inputs (parameters, buffers) ``node`` is computed from."""
    seen, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        for source in current.all_input_nodes:
            if source not in seen:
                seen.add(source)
                frontier.append(source)
    return {n for n in seen if n.op in ("placeholder", "get_attr")}


def _fake_mode(gm: fx.GraphModule):
    """The fake mode dynamo recorded the graph's example values with."""
    for node in gm.graph.nodes:
        value = example_value(node)
        mode = getattr(value, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def _set_example_value(node: fx.Node, fake_mode) -> None:
    """Fill ``meta["example_value"]`` of an inserted node by running it on fake values."""
    if fake_mode is None:
        return

    def fake(a):
        if isinstance(a, fx.Node):
            return example_value(a)
        if isinstance(a, torch.Tensor):
            return fake_mode.from_tensor(a)
        return a

    try:
        args = fx.node.map_aggregate(node.args, fake)
        kwargs = fx.node.map_aggregate(node.kwargs, fake)
        with fake_mode:
            if node.target is torch.ops.moepass.route.default:
                # the composite would trace the whole routing; only shapes matter
                logits, depth = args[0], parse_route_config(args[3]).depth
                node.meta["example_value"] = (
                    logits.new_empty((logits.shape[0], depth), dtype=torch.int64),
                    logits.new_empty((logits.shape[0], depth), dtype=torch.float32),
                )
                return
            if node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                return
        node.meta["example_value"] = value
    except Exception as error:  # metadata is a convenience; the inner compiler re-derives it
        logger.debug("no example value for %s: %s", node.name, error)


class _Inserter:
    """Insert nodes at one point, registering new tensors as buffers and filling metadata."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, meta_from: fx.Node, tag: str):
        self.gm = gm
        self.anchor = anchor
        self.meta_from = meta_from
        self.tag = tag
        self.fake_mode = _fake_mode(gm)
        self.created: list[fx.Node] = []

    def bind(self, item: Any, name: str) -> Any:
        if not isinstance(item, torch.Tensor):
            return item
        attr = f"_moepass_{self.tag}_{name}"
        index = 0
        while hasattr(self.gm, f"{attr}_{index}"):
            index += 1
        attr = f"{attr}_{index}"
        self.gm.register_buffer(attr, item)
        first = next(n for n in self.gm.graph.nodes if n.op != "placeholder")
        with self.gm.graph.inserting_before(first):
            node = self.gm.graph.get_attr(attr)
        # static sizes: a constant bound into the graph has no source a guard could name, so a
        # symbolic size here would fail guard creation once an op's fake kernel reads it
        node.meta["example_value"] = self.fake_mode.from_tensor(item, static_shapes=True) if self.fake_mode else item
        self.created.append(node)
        return node

    def call(self, op: str, target: Any, args: tuple, name_hint: str, kwargs: dict | None = None) -> fx.Node:
        with self.gm.graph.inserting_after(self.anchor):
            node = self.gm.graph.create_node(op, target, args, kwargs or {}, name=name_hint)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]
        _set_example_value(node, self.fake_mode)
        self.anchor = node
        self.created.append(node)
        return node


def _safe_name(path: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in path) or "root"


def apply_rewrite(gm: fx.GraphModule, flow: Dataflow, plan: BlockRewrite) -> list[fx.Node]:
    """Insert the moepass ops for ``plan`` and drop what they replace; returns new nodes."""
    match = plan.match
    router = match.router
    tag = _safe_name(match.path)
    if match.experts is None:
        return _apply_router_only(gm, flow, plan, tag)
    region = match.region
    combine = region.combine
    root = alias_root(mutated_node(combine)) if mutated_node(combine) is not None else None
    readers = flow.readers_after(combine)
    for reader in readers:
        for source in reader.all_input_nodes:
            if source is combine or source is root:
                continue
            made_before = flow.position.get(source, -1) < flow.position[combine]
            if root is not None and alias_root(source) is root and made_before:
                raise Mismatch(f"{reader.name} reads the block's output through a view made before it was computed")
    if router.spec.kind == "lifted":
        _sort_selection(router.anchor)
    inserter = _Inserter(gm, combine, combine, tag)
    tensors = [inserter.bind(t, f"route{i}") for i, t in enumerate(plan.route_tensors)]
    weights = {
        k: v.emit(inserter, f"moe_{k}") if isinstance(v, StackInGraph) else inserter.bind(v, k)
        for k, v in plan.weights.items()
    }
    hidden = match.spec.experts.hidden_size
    x_experts = match.experts.x_input
    x2d = inserter.call("call_method", "reshape", (x_experts, -1, hidden), f"moe_x_{tag}")
    x_router = None
    if plan.route_config.uses_x and _x_base(router.x_input) is _x_base(x_experts):
        x_router = x2d  # the same tokens (up to casts and views): one input for both
    elif plan.route_config.uses_x:
        x_router = inserter.call(
            "call_method", "reshape", (router.x_input, -1, router.spec.hidden_size), f"moe_router_x_{tag}"
        )
    route = inserter.call(
        "call_function",
        torch.ops.moepass.route.default,
        (_logits_2d(inserter, router, tag), x_router, tensors, plan.route_config.to_json()),
        f"moe_route_{tag}",
    )
    ids = inserter.call("call_function", operator.getitem, (route, 0), f"moe_ids_{tag}")
    weights_node = inserter.call("call_function", operator.getitem, (route, 1), f"moe_weights_{tag}")
    experts_json = plan.experts_config.to_json()
    if match.spec.experts.output:
        out = _insert_experts_with_output(inserter, plan, x2d, ids, weights_node, weights, experts_json, tag)
    elif plan.differentiable:
        out = _insert_split_experts(inserter, x2d, ids, weights_node, weights, experts_json, match.spec, tag)
    else:
        out = inserter.call(
            "call_function",
            torch.ops.moepass.experts.default,
            (x2d, ids, weights_node, weights["w1"], weights["w2"], weights["b1"], weights["b2"], experts_json),
            f"moe_out_{tag}",
        )
    spec = match.spec.experts
    if spec.zero_compute:  # slots on zero-computation experts: no GEMM row, their term added beside
        zero = inserter.call(
            "call_function",
            torch.ops.moepass.zero_compute_experts.default,
            (x2d, ids, weights_node, spec.num_experts, ",".join(spec.zero_compute), None),
            f"moe_zero_compute_{tag}",
        )
        out = inserter.call("call_function", operator.add, (out, zero), f"moe_out_all_{tag}")
    expected_shape = tensor_shape(written_value(combine))
    if expected_shape is not None and len(expected_shape) != 2:
        shaped_like = match.region.x_base if tensor_shape(match.region.x_base) == expected_shape else x_experts
        out = inserter.call("call_method", "view_as", (out, shaped_like), f"moe_out_view_{tag}")
    combine_value = example_value(written_value(combine))
    if isinstance(combine_value, torch.Tensor) and combine_value.dtype != example_value(x_experts).dtype:
        out = inserter.call("call_method", "to", (out, combine_value.dtype), f"moe_out_cast_{tag}")
    for reader in readers:
        reader.replace_input_with(combine, out)
        if root is not None:
            reader.replace_input_with(root, out)
    removed = remove_dead_nodes(gm.graph, region.nodes | satellites(flow, region.nodes))
    counters["moepass"]["blocks_rewritten"] += 1
    counters["moepass"][f"dispatch_{match.spec.experts.dispatch}"] += 1
    logger.debug("rewrote %s: +%d nodes, -%d nodes", match.path, len(inserter.created), removed)
    return inserter.created


def _logits_2d(inserter: _Inserter, router, tag: str) -> fx.Node:
    """The router's logits as the route op takes them, [T, E] (a [B, S, E] router output is reshaped)."""
    shape = tensor_shape(router.linear)
    if shape is None or len(shape) == 2:
        return router.linear
    return inserter.call("call_method", "reshape", (router.linear, -1, shape[-1]), f"moe_logits_{tag}")


def _insert_split_experts(inserter, x2d, ids, weights_node, weights, experts_json, spec, tag) -> fx.Node:
    """The experts in their differentiable split form; returns the [T, H] output node."""
    ops = torch.ops.moepass
    rows = inserter.call(
        "call_function", ops.expert_rows.default, (ids, spec.experts.num_experts), f"moe_rows_{tag}"
    )
    row_token, row_slot, offsets = (
        inserter.call("call_function", operator.getitem, (rows, i), f"moe_{name}_{tag}")
        for i, name in enumerate(("row_token", "row_slot", "offsets"))
    )
    h = inserter.call(
        "call_function",
        ops.experts_up.default,
        (x2d, row_token, row_slot, offsets, weights_node, weights["w1"], weights["b1"], experts_json),
        f"moe_h_{tag}",
    )
    a = inserter.call("call_function", ops.expert_activation.default, (h, experts_json), f"moe_act_{tag}")
    return inserter.call(
        "call_function",
        ops.experts_down.default,
        (a, row_token, row_slot, offsets, weights_node, weights["w2"], weights["b2"], experts_json),
        f"moe_out_{tag}",
    )


def _insert_experts_with_output(inserter, plan, x2d, ids, weights_node, weights, experts_json, tag) -> fx.Node:
    """A block with a per-slot output function: each slot a row through the experts op, then moepass.expert_output.

    The nodes :func:`moepass.runtime.ops.experts_with_output` runs: the experts
    (fused, or split when differentiable) see one slot per row with weight 1.
    """
    slots = plan.route_config.depth
    rows_json = slot_rows_config(experts_json, slots)
    x_slots = inserter.call("call_function", torch.repeat_interleave, (x2d, slots), f"moe_x_slots_{tag}", {"dim": 0})
    ids_slots = inserter.call("call_method", "reshape", (ids, -1, 1), f"moe_ids_slots_{tag}")
    ones = inserter.call(
        "call_function", torch.ones_like, (ids_slots,), f"moe_unit_weights_{tag}", {"dtype": torch.float32}
    )
    if plan.differentiable:
        rows = _insert_split_experts(inserter, x_slots, ids_slots, ones, weights, rows_json, plan.match.spec, tag)
    else:
        rows = inserter.call(
            "call_function",
            torch.ops.moepass.experts.default,
            (x_slots, ids_slots, ones, weights["w1"], weights["w2"], weights["b1"], weights["b2"], rows_json),
            f"moe_rows_{tag}",
        )
    return inserter.call(
        "call_function",
        torch.ops.moepass.expert_output.default,
        (rows, ids, weights_node, list(plan.match.experts.output_tensors), experts_json),
        f"moe_out_{tag}",
    )


def _apply_router_only(gm: fx.GraphModule, flow: Dataflow, plan: BlockRewrite, tag: str) -> list[fx.Node]:
    """Insert the route op after the router; its ids and weights replace the model's where they are read.

    ``model_ids``: the model's ids stay as they are (the route op returns them
    unchanged) and only the weights are replaced, in the model's shape.
    ``sentinel``: both are replaced (a top-1 ``argmax``'s [T] ids keep that shape).
    """
    router = plan.match.router
    model_order = plan.route_config.empty_slots == "model_ids"
    after = router.anchor
    if router.spec.kind == "lifted" or model_order:
        if not model_order:
            _sort_selection(router.anchor)
        after = max(router.anchor, router.weights_end, router.ids, key=flow.position.__getitem__)
    inserter = _Inserter(gm, after, router.anchor, tag)
    tensors = [inserter.bind(t, f"route{i}") for i, t in enumerate(plan.route_tensors)]
    x_arg = None
    if plan.route_config.uses_x:
        hidden = tensor_shape(router.weight)[1]
        x_arg = inserter.call("call_method", "reshape", (router.x_input, -1, hidden), f"moe_x_{tag}")
    route = inserter.call(
        "call_function",
        torch.ops.moepass.route.default,
        (_logits_2d(inserter, router, tag), x_arg, tensors, plan.route_config.to_json()),
        f"moe_route_{tag}",
    )
    ids = inserter.call("call_function", operator.getitem, (route, 0), f"moe_ids_{tag}")
    weights = inserter.call("call_function", operator.getitem, (route, 1), f"moe_weights_{tag}")
    old_weights = example_value(router.weights_end)
    if isinstance(old_weights, torch.Tensor) and old_weights.dtype != torch.float32:
        weights = inserter.call("call_method", "to", (weights, old_weights.dtype), f"moe_weights_cast_{tag}")
    router_nodes = plan.match.region.nodes
    if model_order or len(tensor_shape(router.weights_end) or ()) != 2:
        weights = inserter.call("call_method", "view_as", (weights, router.weights_end), f"moe_weights_view_{tag}")
    if len(tensor_shape(router.ids) or ()) == 1 and not model_order:  # argmax: one id per token
        ids = inserter.call("call_method", "reshape", (ids, -1), f"moe_ids_view_{tag}")
    weights_users = [u for u in router.weights_end.users if u not in router_nodes and u not in inserter.created]
    if not model_order:
        for user in list(router.ids.users):
            if user not in inserter.created and user not in router_nodes:
                user.replace_input_with(router.ids, ids)
    for user in weights_users:
        user.replace_input_with(router.weights_end, weights)
    remove_dead_nodes(gm.graph, router_nodes - {router.linear})
    counters["moepass"]["routers_rewritten"] += 1
    return inserter.created


def _sort_selection(topk: fx.Node) -> None:
    """Make a lifted router's top-k return its picks best first (the same set).

    Policies keep a prefix of the ranking; the model's weight formula is the
    same function of its picks in any order.  A top-1 (``argmax``) is sorted.
    """
    if op_name(topk) != "topk":
        return
    if len(topk.args) > 4:
        topk.args = (*topk.args[:4], True, *topk.args[5:])
    else:
        topk.kwargs = {**topk.kwargs, "sorted": True}


def probe_renormalisation(gm: fx.GraphModule, flow: Dataflow, match: BlockMatch, env: dict[fx.Node, Any]) -> BlockMatch:
    """For a lifted router: whether the model's weights sum to the same total for every token.

    Runs the block on a random input with the real parameters; a router whose
    selected weights have the same row sum everywhere renormalises (adaptive
    policies then rescale survivors to that total).  Returns ``match`` with
    the router spec updated.
    """
    router = match.router
    if router.spec.kind != "lifted":
        return match
    x_base = match.region.x_base
    generator = torch.Generator().manual_seed(1)
    random_x = torch.randn(concrete_shape(x_base), generator=generator).to(example_value(x_base).dtype) * 2
    local = dict(env)
    local[x_base] = random_x
    local = run_region(gm, flow, match.region, local)
    weights = local[router.weights_end].reshape(-1, router.spec.top_k).double()
    sums = weights.sum(dim=-1)
    spread = float(sums.max() - sums.min()) if sums.numel() else 0.0
    renormalizes = sums.numel() > 1 and spread <= 1e-4 * max(float(sums.abs().max()), 1e-30)
    spec = dataclasses.replace(router.spec, renormalize=renormalizes)
    router.spec = spec
    match.spec = dataclasses.replace(match.spec, router=spec)
    return match


def remove_dead_nodes(graph: fx.Graph, candidates: set[fx.Node]) -> int:
    """Erase the nodes of ``candidates`` nothing live needs any more.

    A node is live if a node outside ``candidates`` reads it, if a live node
    reads it, or if it mutates a tensor that is live.  Returns the number of
    nodes erased.
    """
    nodes = list(graph.nodes)
    live = {n for n in nodes if n not in candidates}
    changed = True
    while changed:
        changed = False
        for node in reversed(nodes):
            if node in live:
                for source in node.all_input_nodes:
                    if source not in live:
                        live.add(source)
                        changed = True
            elif node in candidates:
                target = mutated_node(node)
                if target is not None and alias_root(target) in live:
                    live.add(node)
                    changed = True
    dead = [n for n in reversed(nodes) if n in candidates and n not in live]
    for node in dead:
        graph.erase_node(node)
    return len(dead)

