"""Define every ``moepass.AdaptiveMoE`` node by a model-local function for a target.

::

    node  moepass.AdaptiveMoE(x, logits, *route tensors, w1, w2, b1?, b2?)   name = block path
      │   overload = one variant per distinct (routing, experts, target)      e.g. "top_p.softmax_topk.ort.1"
      ▼
    function moepass.AdaptiveMoE:<overload>
        ids, w = <routing: torch.onnx export of moepass.route for the block's config>
        y      = <experts:  target "ort"      → com.microsoft.MoE with k per token (dropped
                                                slots masked, k-buckets, or one row per slot)
                            target "portable" → standard ops (Loop over experts)>

Blocks with the same configuration share a function.  Any ONNX runtime can
inline the function (ONNX Runtime does so when it loads the model); tools
show one node per block, with its block path as the node name and the
configuration in the node's metadata.  For target ``ort``, experts that
``com.microsoft.MoE`` cannot run exactly (gated gelu, gelu) use the portable
computation inside that function, or fail when asked to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass

import onnx
from moepass.lowering.onnx.builder import FLOAT, INT64, NodeBuilder
from moepass.lowering.onnx.experts_gemm import gemm_experts
from moepass.lowering.onnx.experts_ort import (
    MOE_LAYOUTS,
    ORT_DOMAIN,
    native_routing_experts,
    native_routing_reason,
    ort_experts,
    unsupported_reason,
)
from moepass.lowering.onnx.experts_portable import portable_experts
from moepass.lowering.onnx.experts_quantized import (
    QuantizedOperands,
    dequantize_projector,
    matmulnbits_projector,
    qmoe_experts,
    qmoe_unsupported_reason,
)
from moepass.lowering.onnx.layout_tuning import choose_layouts, describe_plan
from moepass.lowering.onnx.layouts import ORT_LAYOUTS, PROVIDERS, default_ort_layout
from moepass.lowering.onnx.routing_graph import routing_graph, splice
from moepass.lowering.onnx.translate import DOMAIN, OP_TYPE
from onnx import helper

from moepass.compiler.spec import ExpertsSpec
from moepass.exports.errors import OnnxExportError
from moepass.quantize.scheme import QuantScheme
from moepass.runtime.ops import RouteConfig, parse_experts_config, parse_route_config

__all__ = ["FALLBACKS", "ORT_LAYOUTS", "PROVIDERS", "TARGETS", "BlockFunction", "block_nodes", "define_blocks"]

logger = logging.getLogger(__name__)

TARGETS = ("ort", "portable")
#: What target "ort" does with experts com.microsoft.MoE cannot run exactly.
FALLBACKS = ("portable", "error")


@dataclass(frozen=True)
class BlockFunction:
    """How one block was exported."""

    #: Module path of the block (the ONNX node's name; "<root>" there for a model that is one block).
    path: str
    #: The function's overload name (op type ``moepass.AdaptiveMoE``).
    overload: str
    #: The routing rule and its parameters, e.g. ``top_p(p=0.4)``.
    routing: str
    #: How the experts run: ``com.microsoft.MoE (k=1..2)`` or ``standard ops``.
    experts: str
    #: Why a target-"ort" block runs its experts in standard ops, else "".
    fallback_reason: str = ""
    #: Target "ort": which layout runs the experts at which token counts, and why (measured times,
    #: the option that named it, or the fixed default); "" for target "portable".
    layout: str = ""


def block_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ``moepass.AdaptiveMoE`` nodes of the main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def _attribute(node: onnx.NodeProto, name: str, default: str | None = None) -> str:
    for attr in node.attribute:
        if attr.name == name:
            return attr.s.decode()
    if default is not None:
        return default
    raise OnnxExportError(f"node {node.name}: missing attribute {name!r} (not made by moepass?)")


#: Inputs of a block node that are not route tensors (float or quantized expert weights).
_WEIGHT_ROLES = frozenset(
    ["x", "logits", "w1", "w2", "b1", "b2"] + [f"{w}.{p}" for w in ("w1", "w2") for p in ("codes", "scales", "zeros")]
)
#: How quantized experts run (:mod:`.experts_quantized`); the first two need ONNX Runtime's domain.
_QUANTIZED_HOWS = ("qmoe", "matmulnbits", "dequantize")


def _uses_ort(how: str) -> bool:
    return bool(_layouts_of(how) & set(MOE_LAYOUTS)) or how in ("qmoe", "matmulnbits")


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple]]:
    """Element type and shape of every typed value of the main graph."""
    types: dict[str, tuple[int, tuple]] = {}
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tensor = info.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim)
        types[info.name] = (tensor.elem_type, shape)
    for init in model.graph.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
    for node in model.graph.node:  # constants torch.onnx left as nodes
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = (attr.t.data_type, tuple(attr.t.dims))
    return types


def _type_of(types: dict, name: str, node: onnx.NodeProto) -> tuple[int, tuple]:
    if name not in types:
        raise OnnxExportError(f"block {node.name}: the type of its input {name!r} is unknown")
    return types[name]


def _typed_values(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, tuple[int, tuple]]:
    """Types of the main graph's values; shape inference fills in what torch.onnx left untyped."""
    types = _value_types(model)
    if all(name in types for node in nodes for name in node.input):
        return types
    return _value_types(onnx.shape_inference.infer_shapes(model))


def _without_block(route: RouteConfig) -> str:
    return dataclasses.replace(route, block="").to_json()


def _k_bounds(route: RouteConfig) -> tuple[int, int]:
    """(k_min, k_max) as :func:`moepass.runtime.routing.route` applies them."""
    k_min = route.k_min if route.k_min is not None else (route.depth if route.rule == "static" else 0)
    return k_min, route.depth


def _describe_rule(route: RouteConfig) -> str:
    if route.rule == "static":
        return f"static (k={route.depth})"
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(route.params.items()))
    bounds = f" k∈[{route.k_min},{route.k_max}]" if route.rule != "static" else ""
    return f"{route.rule}({params}){bounds}"


def _ranges_of(how: str) -> list[tuple[int, str]]:
    """``ranges:1=masked,64=gemm`` → [(1, "masked"), (64, "gemm")]; a single layout → [(1, how)]."""
    if not how.startswith("ranges:"):
        return [(1, how)]
    return [(int(start), layout) for start, _, layout in (part.partition("=") for part in how[7:].split(","))]


def _layouts_of(how: str) -> set[str]:
    return {layout for _, layout in _ranges_of(how)}


def _describe_experts(route: RouteConfig, spec: ExpertsSpec, how: str, scheme: QuantScheme | None = None) -> str:
    """How the experts run: ``how`` is ``portable``, a layout of target ``ort``, or ranges of them."""
    if scheme is not None:
        kind = scheme.describe()
        if how == "qmoe":
            return f"com.microsoft.QMoE {kind} (k={route.depth}, exact per-slot weights through router_weights)"
        if how == "matmulnbits":
            return f"MatMulNBits pair per expert ({kind})"
        return f"DequantizeLinear + Gemm per expert ({kind})"
    if how.startswith("ranges:"):
        ranges = _ranges_of(how)
        parts = []
        for index, (start, layout) in enumerate(ranges):
            end = ranges[index + 1][0] - 1 if index + 1 < len(ranges) else None
            span = f"{start}+ tokens" if end is None else f"{start}–{end} tokens"
            parts.append(f"{span}: {_describe_experts(route, spec, layout)}")
        return "; ".join(parts)
    if how == "portable":
        return "standard ops"
    if how == "gemm":
        return "Gemm pair per expert (weights pre-packed once)"
    k_min, k_max = _k_bounds(route)
    if spec.weight_on_input:
        return "com.microsoft.MoE (k=1 per slot: weight on the input)"
    if k_min == k_max:
        return f"com.microsoft.MoE (k={k_max})"
    if how == "masked":
        return f"com.microsoft.MoE (k={k_max}, dropped slots masked)"
    if how == "slots":
        return "com.microsoft.MoE (k=1 per kept slot)"
    return f"com.microsoft.MoE (k={max(k_min, 1)}..{k_max} buckets)"


def _route_tensor_shape(shown: str, role: str, dims) -> tuple[int, ...]:
    """A route tensor's shape for the routing export: -1 for a per-token (symbolic) first axis.

    Policy tensors are static; a lifted router's own selection
    (``selected_ids`` / ``selected_weights``) is [tokens, k].
    """
    shape = []
    for axis, dim in enumerate(dims):
        try:
            shape.append(int(dim))
        except (TypeError, ValueError):
            if axis != 0:
                raise OnnxExportError(
                    f"block {shown}: route tensor {role!r} has a symbolic size on axis {axis} ({dim}); "
                    "only the token axis may be dynamic"
                ) from None
            shape.append(-1)
    return tuple(shape)


def zero_compute_term(b: NodeBuilder, x: str, ids: str, weights: str, spec: ExpertsSpec, x_type: int) -> str:
    """What the zero-computation experts add, [T, H] in ``x_type``: Σ over identity slots of w·x.

    Zero experts add nothing; constant experts never reach an export (the
    rewrite only writes ones without constants).  No Gemm: the slots on
    these experts cost a masked sum and one multiply.
    """
    if "constant" in spec.zero_compute:
        raise OnnxExportError("constant zero-computation experts do not export yet")
    first, count = spec.num_experts, len(spec.zero_compute)
    relative = b.op("Sub", ids, b.const(first, INT64))
    routed = b.op("And", b.op("GreaterOrEqual", relative, b.const(0, INT64)), b.op("Less", relative, b.const(count, INT64)))
    flags = b.const([float(k == "identity") for k in spec.zero_compute])
    flag = b.op("Gather", flags, b.op("Clip", relative, b.const(0, INT64), b.const(count - 1, INT64)))
    slot_weight = b.op("Mul", b.op("Mul", b.cast(weights, FLOAT), flag), b.cast(routed, FLOAT))
    weight = b.reduce_sum(slot_weight, [1], keepdims=1)  # [T, 1]
    return b.cast(b.op("Mul", weight, b.cast(x, FLOAT)), x_type)


class _Definer:
    """Builds (and shares) the function of each block variant."""

    def __init__(self, model: onnx.ModelProto, target: str, fallback: str, layout, provider: str,
                 budget: float | None = None):
        self.model = model
        self.target = target
        self.fallback = fallback
        self.layout = layout
        self.provider = provider
        #: Seconds a block variant's layouts may be measured for (None: never; ``auto`` is the fixed default).
        self.budget = budget
        #: variant → (its layout plan, how it was chosen), so identical blocks are measured once
        self.choices: dict[str, tuple[tuple[tuple[int, str], ...], str]] = {}
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.types = _typed_values(model, block_nodes(model))
        self.functions: dict[str, onnx.FunctionProto] = {}
        self.overloads: dict[str, str] = {}
        self.uses_ort = False

    def define(self, node: onnx.NodeProto) -> BlockFunction:
        route = parse_route_config(_attribute(node, "route_config"))
        spec = parse_experts_config(_attribute(node, "experts_config")).spec
        roles = _attribute(node, "input_roles").split(",")
        path = route.block  # "" for a model that is one block
        shown = path or "<root>"
        if len(roles) != len(node.input):
            raise OnnxExportError(f"block {shown}: {len(node.input)} inputs for roles {roles}")
        if route.rule == "allocator" and route.params.get("sample"):
            raise OnnxExportError(
                f"block {shown}: the allocator policy samples k at random (sample=True); ONNX Runtime's random "
                "numbers differ from torch's, so the export would not be the same model: use sample=False"
            )
        if route.empty_slots != "sentinel":
            raise OnnxExportError(f"block {shown}: empty slots encoded as {route.empty_slots!r}; only 'sentinel' exports")
        x_type, _ = _type_of(self.types, node.input[0], node)
        logits_type, _ = _type_of(self.types, node.input[1], node)
        quantization = _attribute(node, "quantization", "")
        scheme = QuantScheme.from_dict(json.loads(quantization)) if quantization else None
        tensor_specs = tuple(
            (_route_tensor_shape(shown, role, _type_of(self.types, name, node)[1]), _type_of(self.types, name, node)[0])
            for name, role in zip(node.input, roles)
            if role not in _WEIGHT_ROLES
        )
        variant = json.dumps(
            [_without_block(route), dataclasses.asdict(spec), roles, x_type, logits_type, tensor_specs, quantization],
            sort_keys=True,
        )
        if scheme is None:
            how, fallback_reason, layout_note = self._how(shown, spec, x_type, node, route, logits_type, variant)
        else:
            (how, fallback_reason), layout_note = self._quantized_how(shown, spec, scheme), ""
        key = json.dumps([variant, how])
        if key not in self.overloads:
            digest = hashlib.sha1(key.encode()).hexdigest()[:6]
            tag = {"portable": "portable", "gemm": "gemm", "dequantize": "portable"}.get(
                how, "ranges" if how.startswith("ranges:") else "ort")
            overload = f"{route.rule}.{route.router.kind}.{tag}.{digest}"
            self.functions[overload] = self._function(overload, route, spec, roles, how, x_type, logits_type,
                                                      tensor_specs, scheme)
            self.overloads[key] = overload
        overload = self.overloads[key]
        self.uses_ort |= _uses_ort(how)
        experts = _describe_experts(route, spec, how, scheme)
        self._retarget(node, path, overload, route, experts)
        return BlockFunction(path, overload, _describe_rule(route), experts, fallback_reason or "", layout_note)

    def _how(self, shown: str, spec: ExpertsSpec, x_type: int, node: onnx.NodeProto, route: RouteConfig,
             logits_type: int, variant: str) -> tuple[str, str | None, str]:
        """(``portable``, the block's ``ort`` layout, or ``ranges:1=masked,64=gemm``; why an ``ort`` block runs
        in standard ops, or None; how the layout was chosen)."""
        if self.target != "ort":
            return "portable", None, ""
        fallback_reason = unsupported_reason(spec)
        plan, note = self._plan(spec, x_type, node, route, logits_type, variant, fallback_reason)
        resolved: list[tuple[int, str]] = []
        for start, layout in plan:
            if layout == "gemm":
                if x_type != FLOAT:
                    raise OnnxExportError(f"block {shown}: the gemm layout computes in float32, and this block is "
                                          f"{onnx.TensorProto.DataType.Name(x_type)}; use another ort_layout")
            elif fallback_reason:
                if self.fallback == "error":
                    raise OnnxExportError(
                        f"block {shown}: com.microsoft.MoE cannot run these experts exactly ({fallback_reason}); "
                        "use target='portable' or ort_fallback='portable'"
                    )
                layout = "portable"
            if not resolved or resolved[-1][1] != layout:
                resolved.append((start, layout))
        reason = fallback_reason if any(layout == "portable" for _, layout in resolved) else None
        if len(resolved) == 1:
            return resolved[0][1], reason, note
        return "ranges:" + ",".join(f"{start}={layout}" for start, layout in resolved), reason, note

    def _quantized_how(self, shown: str, spec: ExpertsSpec, scheme: QuantScheme) -> tuple[str, str | None]:
        """How quantized experts run: ``qmoe``, ``matmulnbits`` (target ort) or ``dequantize`` (portable)."""
        if self.target != "ort":
            return "dequantize", None
        layout = self.layout
        if not isinstance(layout, str):  # a plan: ((1, "gemm"),) names one layout, more entries are ranges
            layout = layout[0][1] if len(layout) == 1 else "ranges of layouts"
        if layout not in ("auto", "masked", "gemm"):
            raise OnnxExportError(
                f"block {shown}: quantized experts export with ort_layout 'masked' (com.microsoft.QMoE, the default) "
                f"or 'gemm' (MatMulNBits pairs), not {layout!r}"
            )
        if layout == "gemm":
            return "matmulnbits", None
        reason = qmoe_unsupported_reason(spec, scheme)
        if reason and self.fallback == "error":
            raise OnnxExportError(f"block {shown}: com.microsoft.QMoE cannot run these experts exactly ({reason}); "
                                  "use ort_layout='gemm' (MatMulNBits pairs) or ort_fallback='portable'")
        return ("matmulnbits" if reason else "qmoe"), reason

    def _plan(self, spec: ExpertsSpec, x_type: int, node: onnx.NodeProto, route: RouteConfig, logits_type: int,
              variant: str, fallback_reason: str | None) -> tuple[tuple[tuple[int, str], ...], str]:
        """The layout per token-count range and how it was chosen: named by the caller, measured on this
        machine (:mod:`.layout_tuning`), or the fixed default."""
        if self.layout != "auto":
            plan = _normalise_plan(self.layout)
            return plan, f"{describe_plan(plan)} (named by ort_layout)"
        if variant in self.choices:
            return self.choices[variant]
        default = ((1, default_ort_layout(self.provider, spec, x_type)),)
        why = "the fixed default for the provider and expert size"
        choice = None
        if self.provider != "cpu":
            why += f" (not measured: no {self.provider} device to measure on)"
        elif self.budget is None:
            why += " (not measured: tuning off)"
        else:
            native = logits_type == x_type and native_routing_reason(route.router, route.rule, spec) is None
            moe = [] if fallback_reason else ["masked"] if (native or spec.weight_on_input) else list(MOE_LAYOUTS)
            candidates = moe + (["gemm"] if x_type == FLOAT else [])
            description = (f"{_describe_rule(route)} E={spec.num_experts} H={spec.hidden_size} "
                           f"I={spec.intermediate_size} {spec.description}")
            choice = choose_layouts(self.model, node, variant, candidates, self.fallback, x_type, logits_type,
                                    spec.hidden_size, route.router.num_experts, self.budget, description,
                                    define_blocks)
            if choice is None:
                why += " (not measured: fewer than two layouts apply, the inputs are not float32, or the block's " \
                       "inputs beyond x and the logits are not initializers)"
        result = (choice.plan, choice.describe()) if choice is not None else (default, f"{default[0][1]} ({why})")
        self.choices[variant] = result
        return result

    def _function(self, overload, route: RouteConfig, spec: ExpertsSpec, roles, how: str, x_type, logits_type,
                  tensor_specs, scheme: QuantScheme | None = None) -> onnx.FunctionProto:
        b = NodeBuilder(overload)
        if how.startswith("ranges:"):
            out = self._ranged(b, overload, route, spec, roles, _ranges_of(how), x_type, logits_type, tensor_specs)
        else:
            out = self._experts(b, overload, route, spec, roles, how, x_type, logits_type, tensor_specs, scheme)
        return self._finish(b, overload, route, spec, roles, how, out)

    def _experts(self, b: NodeBuilder, prefix: str, route: RouteConfig, spec: ExpertsSpec, roles, how: str, x_type,
                 logits_type, tensor_specs, scheme: QuantScheme | None = None) -> str:
        """Append the routing and the experts for one layout to ``b``; returns the output's name."""
        present = set(roles)
        b1 = "b1" if "b1" in present else None
        b2 = "b2" if "b2" in present else None
        if how in MOE_LAYOUTS and logits_type == x_type and native_routing_reason(route.router, route.rule, spec) is None:
            # the static MoE model onnxruntime-genai's builder writes: ORT routes from the logits itself
            return native_routing_experts(b, "x", "logits", "w1", "w2", b1, b2, spec, route.router)
        graph = routing_graph(_without_block(route), logits_type, x_type, spec.hidden_size, tensor_specs, self.opset)
        tensor_roles = [r for r in roles if r not in _WEIGHT_ROLES]
        route_inputs = ["logits", *(["x"] if route.uses_x else []), *tensor_roles]
        routing = splice(graph, f"{prefix}/route", route_inputs)
        b.nodes.extend(routing.nodes)
        ids, weights = routing.outputs
        if scheme is not None:
            n1 = 2 * spec.intermediate_size if spec.gated else spec.intermediate_size
            operands = QuantizedOperands(list(roles), spec, scheme, n1)
            biases = {"w1": b1, "w2": b2}
            if how == "qmoe":
                out = qmoe_experts(b, "x", ids, weights, operands, b1, b2, route.depth, x_type)
            elif how == "matmulnbits":
                out = gemm_experts(b, "x", ids, weights, "", "", b1, b2, spec, x_type,
                                   project=matmulnbits_projector(operands, biases, x_type))
            else:
                out = portable_experts(b, "x", ids, weights, "", "", b1, b2, spec, x_type,
                                       project=dequantize_projector(operands, biases, x_type))
        elif how in MOE_LAYOUTS:
            k_min, k_max = _k_bounds(route)
            out = ort_experts(b, "x", ids, weights, "w1", "w2", b1, b2, spec, k_min, k_max, x_type, how)
        elif how == "gemm":
            out = gemm_experts(b, "x", ids, weights, "w1", "w2", b1, b2, spec, x_type)
        else:
            out = portable_experts(b, "x", ids, weights, "w1", "w2", b1, b2, spec, x_type)
        if spec.zero_compute:
            out = b.op("Add", out, zero_compute_term(b, "x", ids, weights, spec, x_type))
        return out

    def _ranged(self, b: NodeBuilder, overload: str, route: RouteConfig, spec: ExpertsSpec, roles,
                ranges: list[tuple[int, str]], x_type, logits_type, tensor_specs) -> str:
        """The experts as an If chain on the token count: ``ranges[0]``'s layout below ``ranges[1]``'s
        start, and so on; each branch routes and runs its experts itself (outer-scope x, logits, weights)."""
        tokens = b.op("Gather", b.op("Shape", "x"), b.const(0, INT64), axis=0)  # scalar: T

        def branch(position: int) -> onnx.GraphProto:
            # ranges[position:]: the last range's experts, or another If.  The If's own builder must not
            # share its prefix with its then-branch's (choose below), or their value names collide
            # (Constant outputs "<prefix>/const_1" twice) and the model fails ONNX's SSA check.
            last = position == len(ranges) - 1
            name = f"{overload}/{position}.{ranges[position][1]}" if last else f"{overload}/{position}+"
            inner = NodeBuilder(name)
            if last:
                out = self._experts(inner, name, route, spec, roles, ranges[position][1], x_type, logits_type,
                                    tensor_specs)
            else:
                out = choose(inner, position)
            inner.nodes.append(helper.make_node("Identity", [out], [f"{name}/y"], name=f"{name}/output"))
            return helper.make_graph(inner.nodes, name, [], [helper.make_tensor_value_info(f"{name}/y", x_type, None)])

        def choose(builder: NodeBuilder, position: int) -> str:  # ranges[position] or a later one
            below = builder.op("Less", tokens, builder.const(ranges[position + 1][0], INT64))
            first = f"{overload}/{position}.{ranges[position][1]}"
            inner = NodeBuilder(first)
            out = self._experts(inner, first, route, spec, roles, ranges[position][1], x_type, logits_type, tensor_specs)
            inner.nodes.append(helper.make_node("Identity", [out], [f"{first}/y"], name=f"{first}/output"))
            then = helper.make_graph(inner.nodes, first, [], [helper.make_tensor_value_info(f"{first}/y", x_type, None)])
            return builder.op("If", below, then_branch=then, else_branch=branch(position + 1))

        return choose(b, 0)

    def _finish(self, b: NodeBuilder, overload, route: RouteConfig, spec: ExpertsSpec, roles, how: str,
                out: str) -> onnx.FunctionProto:
        """The block's function from the nodes in ``b`` whose output is ``out``."""
        b.nodes.append(helper.make_node("Identity", [out], ["y"], name=f"{overload}/output"))
        imports = [helper.make_opsetid("", self.opset)]
        if _uses_ort(how):
            imports.append(helper.make_opsetid(ORT_DOMAIN, 1))
        function = helper.make_function(
            DOMAIN, OP_TYPE, roles, ["y"], b.nodes, imports, overload=overload,
            doc_string=(
                f"MoE block: routing {_describe_rule(route)} on a {route.router.description} router "
                f"({route.router.num_experts} experts), ids/weights [T,{route.depth}] with empty id "
                f"{route.router.num_experts}; experts {spec.description}, "
                + {"portable": "standard ONNX ops.", "gemm": "one Gemm pair per expert (standard ONNX ops).",
                   "qmoe": "com.microsoft.QMoE (quantized).", "matmulnbits": "MatMulNBits pairs (quantized).",
                   "dequantize": "DequantizeLinear + Gemm (quantized, standard ONNX ops)."}.get(
                    how, f"{_describe_experts(route, spec, how)}.")
            ),
        )
        return function

    def _retarget(self, node: onnx.NodeProto, path: str, overload: str, route: RouteConfig, experts: str) -> None:
        """Turn the translated node into a call of its function: no attributes, metadata instead."""
        route_json = _attribute(node, "route_config")
        experts_json = _attribute(node, "experts_config")
        quantization = _attribute(node, "quantization", "")
        del node.attribute[:]
        node.overload = overload
        node.name = path or "<root>"
        node.doc_string = f"{node.name}: {_describe_rule(route)} routing, experts via {experts}"
        for key, value in (
            ("moepass.block", node.name),
            ("moepass.target", self.target),
            ("moepass.experts", experts),
            ("moepass.route_config", route_json),
            ("moepass.experts_config", experts_json),
            *((("moepass.quantization", quantization),) if quantization else ()),
        ):
            entry = node.metadata_props.add()
            entry.key, entry.value = key, value


def _normalise_plan(layout) -> tuple[tuple[int, str], ...]:
    """A layout name, or {first token count: layout} ranges, as sorted ((start, layout), ...) from 1."""
    if isinstance(layout, str):
        ranges = {1: layout}
    elif isinstance(layout, dict):
        ranges = dict(layout)
    elif isinstance(layout, (tuple, list)):
        ranges = dict(layout)
    else:
        raise OnnxExportError(f"ort_layout {layout!r}: expected auto, a layout name or {{first token count: layout}}")
    bad = [v for v in ranges.values() if v not in ORT_LAYOUTS]
    if bad or not ranges:
        raise OnnxExportError(f"unknown ORT layout {bad[0] if bad else layout!r}; expected auto or one of "
                              f"{', '.join(ORT_LAYOUTS)} (or {{first token count: layout}} ranges of them)")
    starts = sorted(ranges)
    if any(not isinstance(start, int) or isinstance(start, bool) or start < 1 for start in starts) or starts[0] != 1:
        raise OnnxExportError(f"ort_layout ranges {layout!r}: the first token counts must be integers ≥ 1, "
                              "starting at 1")
    return tuple((start, ranges[start]) for start in starts)


def define_blocks(
    model: onnx.ModelProto, target: str, fallback: str = "portable", layout="auto", provider: str = "cpu",
    budget: float | None = None,
) -> list[BlockFunction]:
    """Give every AdaptiveMoE node of ``model`` a local function for ``target``, in place.

    Args:
        model: a model from :func:`moepass.lowering.onnx.translate.to_onnx`.
        target: ``ort`` (com.microsoft.MoE with k per token) or ``portable`` (standard ops only).
        fallback: for target ``ort``, what a block com.microsoft.MoE cannot run
            exactly does: ``portable`` (standard ops inside its function) or ``error``.
        layout: for target ``ort``, how the experts run: ``masked``, ``buckets`` or
            ``slots`` (com.microsoft.MoE, :mod:`.experts_ort`), ``gemm`` (pre-packed
            Gemm pairs, :mod:`.experts_gemm`), ranges of them by token count
            (``{1: "masked", 64: "gemm"}``: an If on the token count), or
            ``auto``: measured on this machine per token count when ``budget``
            allows (:mod:`.layout_tuning`), else the default for the provider
            and the block's experts (:func:`.layouts.default_ort_layout`).
        provider: ``cpu`` or ``cuda``, the execution provider the model is meant for.
        budget: seconds ``auto`` may spend measuring each block variant's layouts in ONNX
            Runtime on this machine (cached per machine); None never measures.

    Raises:
        OnnxExportError: naming the block that cannot be exported exactly, and why.
    """
    if target not in TARGETS:
        raise OnnxExportError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if fallback not in FALLBACKS:
        raise OnnxExportError(f"unknown fallback {fallback!r}; expected one of {', '.join(FALLBACKS)}")
    if provider not in PROVIDERS:
        raise OnnxExportError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    if layout != "auto":
        layout = _normalise_plan(layout)
    definer = _Definer(model, target, fallback, layout, provider, budget)
    blocks = [definer.define(node) for node in block_nodes(model)]
    model.functions.extend(definer.functions.values())
    domains = {o.domain for o in model.opset_import}
    if DOMAIN not in domains:
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if definer.uses_ort and ORT_DOMAIN not in domains:
        model.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    model.ir_version = max(model.ir_version, 10)  # function overloads need IR version 10
    for block in blocks:
        if block.fallback_reason:
            logger.warning("moepass: %s runs its experts in standard ops: %s", block.path or "<root>", block.fallback_reason)
        if block.layout:
            logger.info("moepass: %s experts layout: %s", block.path or "<root>", block.layout)
    logger.info("defined %d MoE blocks with %d functions (target %s)", len(blocks), len(definer.functions), target)
    return blocks
