"""Match the routed experts inside a block's region.

Two families of weights are recognised:

* **stacked**: two [E, a, b] parameters (``gate_up_proj``, ``down_proj``) and
  optionally two [E, n] biases, used by a grouped GEMM (``grouped_mm``), by
  per-token gathered weights and ``bmm`` / ``matmul`` / ``einsum``
  (``batched_mm``), or by a ``bmm`` or ``einsum`` over every expert
  (``dense_bmm``, Llama 4);
* **per-expert modules**: E sets of nn.Linear weights selected in a Python
  loop by ``ids == e`` (``module_loop``), or each run on every token and
  combined through a gate matrix zero outside the top-k (``dense_modules``:
  expert e is the e-th module of their ``ModuleList``); the rewrite stacks
  them (at compile time, or in the graph when it will be differentiated).

For both, the orientation of each weight is read from how its GEMM uses it,
and the activation from the ops between the two GEMMs::

    gated concat        h.chunk(2) → act(gate) * up                 (Mixtral, Qwen, DeepSeek, Llama 4)
    gated interleaved   h[..., ::2], h[..., 1::2] → clamp → g·σ(αg)·(u+1)   (gpt-oss)
    plain               act(h)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, example_value, op_name, tensor_shape
from moepass.compiler.detect.common import (
    CAST_OPS,
    Mismatch,
    arg,
    common_module_path,
    module_path_of_param,
    ndim,
    resolve_param,
    same_tokens,
)
from moepass.compiler.detect.region import Region
from moepass.compiler.detect.router import RouterMatch
from moepass.compiler.lifted import ElementwiseProgram, LiftError, lift_elementwise
from moepass.compiler.spec import ExpertsSpec
from moepass.lowering.activations import apply_activation

__all__ = ["ExpertsMatch", "match_experts"]

_GROUPED_GEMMS = {"transformers::grouped_mm_fallback", "_grouped_mm", "grouped_mm"}
_GEMMS = _GROUPED_GEMMS | {"bmm", "mm", "matmul", "linear", "baddbmm", "addmm", "einsum"}
_ACTIVATIONS = {"silu": "silu", "relu": "relu", "gelu": "gelu"}
#: Ops between the two GEMMs that only move data around.
_PLUMBING = CAST_OPS | {
    "getitem",
    "chunk",
    "split",
    "view",
    "reshape",
    "unsqueeze",
    "squeeze",
    "add",
    "add_",
    "iadd",
    "contiguous",
    "mul",
    "imul",
    "mul_",
    "index_select",
}


@dataclass
class ExpertsMatch:
    """Matched routed experts: their spec and where their weights come from."""

    spec: ExpertsSpec
    #: For stacked weights: the parameter nodes; for modules: lists per expert.
    w1: fx.Node | list[list[fx.Node]]
    w2: fx.Node | list[fx.Node]
    b1: fx.Node | list[list[fx.Node]] | None
    b2: fx.Node | list[fx.Node] | None
    module_path: str | None = None
    #: The tokens the experts read (rows gathered per slot): the block input,
    #: or a transform of it the router does not see (Gemma 4's pre-norm).
    x_input: fx.Node | None = None
    #: The tensors the per-slot output function (``spec.output``) reads, in its order.
    output_tensors: tuple[fx.Node, ...] = ()


def _first_gemm(param: fx.Node, region: Region) -> tuple[fx.Node, int, int, bool]:
    """Follow a weight into the GEMM that uses it.

    Returns (gemm node, operand position, number of transposes on the way,
    gathered per token).
    """
    frontier = [(param, 0, False)]
    seen = set()
    while frontier:
        node, transposes, gathered = frontier.pop(0)
        for user in node.users:
            if user not in region.nodes or user in seen:
                continue
            seen.add(user)
            name = op_name(user)
            if name == "einsum":
                operands = einsum_operands(user)[1]
                if node not in operands:
                    raise Mismatch(f"{user.name}: an einsum whose operands cannot be read")
                return user, operands.index(node), transposes, gathered
            if name in _GEMMS:
                position = next(i for i, a in enumerate(user.args) if a is node) if node in user.args else 1
                return user, position, transposes, gathered
            if name in ("transpose", "t", "mT", "permute"):
                frontier.append((user, transposes + 1, gathered))
            elif name == "getitem" and user.args[0] is node:
                frontier.append((user, transposes, True))
            elif name in CAST_OPS | {"contiguous", "unsqueeze", "view", "reshape", "index_select"}:
                frontier.append((user, transposes, gathered or name == "index_select"))
    raise Mismatch(f"expert weight {param.name} is not used by a matrix multiply")


def einsum_operands(node: fx.Node) -> tuple[str, list]:
    """(equation without spaces, operands) of an ``einsum`` call in either spelling
    (``einsum(eq, a, b)`` or ``einsum(eq, [a, b])``)."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str):
        raise Mismatch(f"{node.name}: einsum with a non-constant equation")
    return equation.replace(" ", ""), operands


def _einsum_weight_transposed(gemm: fx.Node, position: int, transposes: int) -> bool:
    """Whether an expert weight that reaches an ``einsum`` as operand ``position`` is stored [E, in, out].

    The weight's last two subscripts are its stored axes 1 and 2 (gathered by
    ids or not, the expert axis leads): the one summed away (absent from the
    output) is its input axis.
    """
    equation, operands = einsum_operands(gemm)
    if "->" not in equation or "..." in equation:
        raise Mismatch(f"{gemm.name}: einsum {equation!r} without an explicit output (or with an ellipsis)")
    inputs, output = equation.split("->")
    subscripts = inputs.split(",")
    if len(subscripts) != len(operands) or position >= len(subscripts) or len(subscripts[position]) < 3:
        raise Mismatch(f"{gemm.name}: einsum {equation!r} does not contract a 3-D expert weight")
    axis1, axis2 = subscripts[position][-2:]
    summed = [letter not in output for letter in (axis1, axis2)]
    if summed == [False, True]:
        stored_in_out = False  # [E, out, in]: the last axis is contracted
    elif summed == [True, False]:
        stored_in_out = True
    else:
        raise Mismatch(f"{gemm.name}: einsum {equation!r} does not contract exactly one axis of the expert weight")
    return stored_in_out != (transposes % 2 == 1)


def _stored_transposed(gemm: fx.Node, position: int, transposes: int) -> bool:
    """Whether a weight reaching ``gemm`` at ``position`` is stored [in, out]."""
    name = op_name(gemm)
    if name == "einsum":
        return _einsum_weight_transposed(gemm, position, transposes)
    if name in ("linear",):
        return transposes % 2 == 1
    if name in ("addmm", "baddbmm"):
        position -= 1
    if position == 1:  # x @ B
        return transposes % 2 == 0
    return transposes % 2 == 1  # W @ x (batched_mm's bmm(W[ids], x[..., None]))


def _is_sentinel_mask(node: fx.Node, ids: fx.Node | None, flow: Dataflow) -> bool:
    """``masked_fill(h, mask, 0)`` with a mask computed from the routing ids.

    transformers >= 5.17 zeroes the rows of empty (sentinel) slots between the
    GEMMs; the experts op never computes those rows, so the mask is plumbing.
    """
    if op_name(node) not in ("masked_fill", "masked_fill_") or ids is None:
        return False
    mask, value = arg(node, 1, "mask"), arg(node, 2, "value")
    return value == 0 and isinstance(mask, fx.Node) and ids in flow.ancestors(mask)


def _activation_between(
    first: fx.Node | list[fx.Node], second: fx.Node, region_nodes: set[fx.Node], flow: Dataflow,
    ids: fx.Node | None = None, expert_params: set[fx.Node] = frozenset(),
):
    """Lift the ops between two GEMMs and name them when they are a known form.

    Returns (activation, gated, layout, alpha, limit, program): a fused form
    (``program`` "") when the lifted program computes exactly what one of
    the lowerings' named activations does on a probe, else ``"lifted"`` with
    the program's JSON.  Adds of expert biases gathered by expert (the bias
    is handled as ``b1``) and masks of empty slots pass through.  ``first``
    may be the list [gate, up] of two projections read as one [gate; up].
    """
    firsts = first if isinstance(first, list) else [first]
    between = set().union(*(flow.descendants(f) for f in firsts)) & flow.ancestors(second) & region_nodes
    passthrough: dict[fx.Node, fx.Node] = {}
    for node in between:
        if _is_sentinel_mask(node, ids, flow):
            passthrough[node] = node.args[0]
        elif op_name(node) in ("add", "add_", "iadd") and len(node.args) == 2:
            inside = [a for a in node.args if isinstance(a, fx.Node) and (a in firsts or a in between)]
            outside = [a for a in node.args if isinstance(a, fx.Node) and a not in inside]
            if len(inside) == 1 and len(outside) == 1 and _derived_from(outside[0], expert_params, flow):
                passthrough[node] = inside[0]
    output = next((a for a in second.all_input_nodes if a in firsts or a in between), None)
    if output is None:
        raise Mismatch(f"{second.name} does not read the first projection's output")
    # batched GEMMs keep features on the second-last axis ([S, N, 1]): lift
    # from the squeezed view, up to what is unsqueezed for the second GEMM
    source = first
    if not isinstance(first, list) and (tensor_shape(first) or (0,))[-1] == 1:
        views = [u for u in first.users if u in between and op_name(u) in ("squeeze", "view", "reshape")]
        if len(views) == 1 and tensor_shape(views[0])[-1] != 1:
            source = views[0]
            between = between - {views[0]}
    if (tensor_shape(output) or (0,))[-1] == 1 and op_name(output) in ("unsqueeze", "view", "reshape"):
        between = between - {output}
        output = output.args[0]
    try:
        program = lift_elementwise(between, source, output, passthrough)
    except LiftError as error:
        raise Mismatch(f"unsupported expert activation: {error}") from None
    width = sum(concrete_width(f) for f in (source if isinstance(source, list) else [source]))
    for candidate in _known_forms(program, between):
        if _same_function(program, candidate, width):
            return candidate.activation, candidate.gated, candidate.gate_up_layout, candidate.swiglu_alpha, \
                candidate.swiglu_limit, ""
    return "lifted", False, "none", 1.702, 7.0, program.to_json()


def concrete_width(node: fx.Node) -> int:
    """The feature width (last axis) of a tensor node."""
    size = tensor_shape(node)[-1]
    return int(size.node.hint) if hasattr(size, "node") else int(size)


def _derived_from(node: fx.Node, params: set[fx.Node], flow: Dataflow) -> bool:
    return node in params or bool(flow.ancestors(node) & params)


def _known_forms(program: ElementwiseProgram, between: set[fx.Node]) -> list[ExpertsSpec]:
    """Named activations to try against a lifted program (the fused lowerings' vocabulary)."""
    names = {op_name(n) for n in between}
    candidates = []
    alpha, limit = 1.702, 7.0
    for n in between:
        if op_name(n) == "clamp" and arg(n, 2, "max") is not None and arg(n, 1, "min") is None:
            limit = float(arg(n, 2, "max"))
        if op_name(n) == "mul":
            scalars = [a for a in n.args if isinstance(a, float)]
            if scalars and any(op_name(u) == "sigmoid" for u in n.users):
                alpha = scalars[0]
    base = dict(dispatch="grouped_mm", num_experts=1, hidden_size=1, intermediate_size=1)
    for layout in ("concat", "interleaved"):
        if "sigmoid" in names and "clamp" in names:
            candidates.append(ExpertsSpec(**base, activation="swiglu_clamp", gated=True, gate_up_layout=layout,
                                          swiglu_alpha=alpha, swiglu_limit=limit))
        for act in ("silu", "gelu", "gelu_tanh", "relu"):
            candidates.append(ExpertsSpec(**base, activation=act, gated=True, gate_up_layout=layout))
    for act in ("silu", "gelu", "gelu_tanh", "relu"):
        candidates.append(ExpertsSpec(**base, activation=act, gated=False, gate_up_layout="none"))
    return candidates


def _same_function(program: ElementwiseProgram, spec: ExpertsSpec, width: int) -> bool:
    """Whether ``program`` and the named activation of ``spec`` agree on a probe (float64)."""
    if spec.gated and width % 2:
        return False
    probe = torch.randn(64, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    try:
        expected = program(probe)
        actual = apply_activation(probe, spec)
    except (RuntimeError, ValueError):
        return False
    if expected.shape != actual.shape:
        return False
    scale = expected.abs().max().clamp_min(1e-30)
    return bool((expected - actual).abs().max() / scale <= 1e-6)


#: Ops the tokens pass on their way to the first GEMM: gathers by slot, casts, views, copies per slot.
_TOKEN_PLUMBING = CAST_OPS | {
    "getitem", "index_select", "view", "reshape", "unsqueeze", "squeeze", "repeat_interleave", "repeat", "expand",
    "contiguous", "flatten", "mul", "imul",
}


def _experts_input(region: Region, router: RouterMatch, gemm1: fx.Node, weight: fx.Node, flow: Dataflow, hidden: int):
    """The tokens the experts read: the first GEMM's data operand, followed back through gathers and casts.

    The walk takes, at each step, the operand that is not the routing (ids,
    weights) and not the expert weight, and stops at the first per-token
    [.., H] value of the block's size: the block input, or a transform of it
    the router does not see (Gemma 4's pre-norm of the experts).
    """
    routed = flow.descendants(router.linear) | {router.linear}
    node = next(
        (a for a in gemm1.all_input_nodes if a is not weight and weight not in flow.ancestors(a)
         and isinstance(example_value(a), torch.Tensor) and example_value(a).dtype.is_floating_point),
        None,
    )
    for _ in range(32):
        if node is None:
            break
        shape = tensor_shape(node)
        if node not in routed and shape is not None and shape[-1] == hidden and same_tokens(node, region.x_base):
            return node
        if op_name(node) not in _TOKEN_PLUMBING:
            break
        data = [a for a in node.all_input_nodes if a not in routed or a is node.args[0]]
        data = [a for a in data if isinstance(example_value(a), torch.Tensor) and example_value(a).dtype.is_floating_point]
        node = data[0] if data else None
    raise Mismatch(f"cannot find the tokens {gemm1.name} reads")


def _weight_on_input(router: RouterMatch, gemm1: fx.Node, flow: Dataflow) -> bool:
    return router.weights_start in flow.ancestors(gemm1)


def match_experts(region: Region, router: RouterMatch, flow: Dataflow, width: int | None = None) -> ExpertsMatch:
    """Match the routed experts of ``region``; raises :class:`Mismatch` with the reason.

    ``width``: the experts run at a width of their own, between projections
    from and back to the block's hidden size (Muse Spark); the region then
    ends at the experts' combined output of that width, and weights applied
    to the tokens before any routing reaches them (the projection into that
    width) are not the experts'.
    """
    num_experts = _gemm_experts(region, router)
    # the experts' own width: the router's input, or the tokens beside a router that stays outside the block
    hidden = width or (tensor_shape(region.x_base)[-1] if region.free_inputs else tensor_shape(router.weight)[1])
    params = [
        n
        for n in region.inputs
        if n.op in ("placeholder", "get_attr")
        and n is not region.x_base
        and n not in router.param_nodes
        and tensor_shape(n) is not None
    ]
    if width is not None:
        params = [p for p in params if not _before_dispatch(p, region, router, flow)]
    own_ops = [n for n in region.nodes if op_name(n) == "moepass::experts"]
    if own_ops:
        return _match_moepass_op(region, router, flow, own_ops, hidden)
    stacked = [p for p in params if ndim(p) == 3 and tensor_shape(p)[0] == num_experts]
    stacked_bias = [p for p in params if ndim(p) == 2 and tensor_shape(p)[0] == num_experts]
    # 1-D parameters (norm weights, scales on the way in) are never an expert's weights
    others = [p for p in params if p not in stacked and p not in stacked_bias and ndim(p) != 1]
    if stacked and not others:
        return _match_stacked(region, router, flow, stacked, stacked_bias, hidden, num_experts)
    if not stacked and others:
        return _match_module_loop(region, router, flow, others, hidden)
    if not params:
        raise Mismatch("no expert weights inside the block")
    raise Mismatch(
        f"mixed expert weights: {len(stacked)} stacked [E, ., .] and {len(others)} others "
        f"({', '.join(sorted(p.name for p in others)[:3])})"
    )


def _before_dispatch(param: fx.Node, region: Region, router: RouterMatch, flow: Dataflow) -> bool:
    """Whether ``param`` is applied to the tokens before routing reaches them (a projection into the experts' width)."""
    routed = flow.descendants(router.ids) | {router.ids}
    try:
        gemm = _first_gemm(param, region)[0]
    except Mismatch:
        return False
    return gemm not in routed and not flow.ancestors(gemm) & routed


def _gemm_experts(region: Region, router: RouterMatch) -> int:
    """How many experts run GEMMs: the router's classes, less trailing classes that add nothing.

    A router may select among E + Z classes of which the last Z have their
    weight forced to 0 (ZAYA's skip class): when the block's stacked weights
    hold E experts, those Z are no experts at all.  The experts op treats
    their ids (≥ E) as empty slots, so they cost no GEMM row.
    """
    classes = router.spec.num_experts
    zero = router.zero_weight_classes
    counts = [  # a list: the leading size of a weight may be symbolic (unhashable)
        tensor_shape(n)[0]
        for n in region.inputs
        if n.op in ("placeholder", "get_attr") and n not in router.param_nodes and ndim(n) == 3
    ]
    counts = [e for e in counts if isinstance(e, int)]
    if classes in counts or not zero:
        return classes
    fewer = [e for e in counts if 0 < e < classes and set(range(e, classes)) <= zero]
    return max(fewer) if fewer else classes


def _match_stacked(region, router, flow, stacked, stacked_bias, hidden, num_experts) -> ExpertsMatch:
    if len(stacked) != 2:
        raise Mismatch(f"found {len(stacked)} stacked expert weights; expected 2 (gate_up and down)")
    uses = {p: _first_gemm(p, region) for p in stacked}
    w1, w2 = sorted(stacked, key=lambda p: flow.position[uses[p][0]])
    gemm1, pos1, tr1, gathered1 = uses[w1]
    gemm2, pos2, tr2, _ = uses[w2]
    if gemm1 not in flow.ancestors(gemm2):
        raise Mismatch(f"{w2.name}'s GEMM does not consume {w1.name}'s GEMM output")
    transposed = _stored_transposed(gemm1, pos1, tr1)
    if _stored_transposed(gemm2, pos2, tr2) != transposed:
        raise Mismatch("the two expert weights are stored in different orientations")
    s1, s2 = tensor_shape(w1), tensor_shape(w2)
    (in1, n1), (inter, out2) = ((s1[1], s1[2]), (s2[1], s2[2])) if transposed else ((s1[2], s1[1]), (s2[2], s2[1]))
    if in1 != hidden or out2 != hidden:
        raise Mismatch(f"expert weights {tuple(s1)} and {tuple(s2)} do not map hidden size {hidden} to itself")
    activation, gated, layout, alpha, limit, program = _activation_between(
        gemm1, gemm2, region.nodes, flow, router.ids, set(stacked_bias)
    )
    if gated and n1 != 2 * inter:
        raise Mismatch(f"gated activation but the first projection has {n1} outputs for intermediate {inter}")
    if not gated and not program and n1 != inter:
        raise Mismatch(f"first projection has {n1} outputs but the second takes {inter}")
    output, output_tensors, output_params = _output_function(region, router, flow, gemm2, num_experts, stacked_bias)
    stacked_bias = [p for p in stacked_bias if p not in output_params]
    b1 = b2 = None
    for bias in stacked_bias:
        width = tensor_shape(bias)[1]
        reaches_gemm2 = any(n in flow.ancestors(gemm2) for n in flow.descendants(bias) & region.nodes) or (
            bias in flow.ancestors(gemm2)
        )
        if width == n1 and (width != hidden or reaches_gemm2):
            b1 = bias
        elif width == hidden:
            b2 = bias
        else:
            raise Mismatch(f"expert bias {bias.name} of width {width} fits neither projection")
    if (b1 is None) != (b2 is None):
        raise Mismatch("only one of the two expert projections has a bias")
    if router.spec.num_experts > num_experts:
        _check_zeroed_slots_add_nothing(region, router, flow)
    gemm_names = {op_name(gemm1), op_name(gemm2)}
    if gemm_names & _GROUPED_GEMMS:
        dispatch = "grouped_mm"
    elif gathered1:
        dispatch = "batched_mm"
    else:
        dispatch = "dense_bmm"
    spec = ExpertsSpec(
        dispatch=dispatch,
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=inter,
        activation=activation,
        gated=gated,
        gate_up_layout=layout if gated else "none",
        transposed=transposed,
        has_bias=b1 is not None,
        weight_on_input=_weight_on_input(router, gemm1, flow),
        swiglu_alpha=alpha,
        swiglu_limit=limit,
        program=program,
        # router classes past the GEMM experts whose weight the model forces to 0 (ZAYA's skip class):
        # zero experts, so the report counts the slots that went to them; those the block serves as
        # identity experts itself (LongCat-Flash from 5.25): identity experts
        zero_compute=_zero_compute_kinds(router, num_experts),
        output=output,
    )
    x_input = _experts_input(region, router, gemm1, w1, flow, hidden)
    return ExpertsMatch(
        spec, w1, w2, b1, b2, module_path=module_path_of_param(w1), x_input=x_input, output_tensors=output_tensors
    )


#: Ops of a per-row function after the down projection that are more than plumbing (a norm's reduction).
_ROW_FUNCTION_OPS = {"mean", "rsqrt", "norm", "var", "var_mean", "layer_norm", "rms_norm", "linalg_vector_norm"}
#: Constructors of all-ones tensors (transformers' experts called with unit routing weights per row: Ergo).
_ONES = {"new_ones", "ones", "ones_like"}


def _is_unit(node) -> bool:
    """Whether ``node`` is all ones: a ones constructor, through views, casts and row gathers."""
    for _ in range(12):
        if not isinstance(node, fx.Node):
            return False
        name = op_name(node)
        if name in _ONES:
            return True
        if name in ("full", "new_full") and arg(node, 2 if name == "new_full" else 1, "fill_value") == 1:
            return True
        if name not in CAST_OPS | {"view", "reshape", "unsqueeze", "squeeze", "expand", "getitem", "flatten"}:
            return False
        node = node.args[0]
    return False


def _routing_multiply(gemm2: fx.Node, weights: fx.Node, region: Region, flow: Dataflow) -> tuple[fx.Node, fx.Node] | None:
    """(the multiply by the routing weights after the down projection, its operand from the projection)."""
    weighted = flow.descendants(weights) | {weights}
    after = flow.descendants(gemm2) & region.nodes
    for node in flow.sorted(after):
        if op_name(node) not in ("mul", "imul", "mul_", "__mul__") or len(node.args) != 2:
            continue
        a, b = node.args
        for rows, scale in ((a, b), (b, a)):
            if isinstance(rows, fx.Node) and isinstance(scale, fx.Node) and (rows is gemm2 or rows in after) and (
                scale in weighted and rows not in weighted
            ):
                return node, rows
    return None


def _output_function(
    region: Region, router: RouterMatch, flow: Dataflow, gemm2: fx.Node, num_experts: int, stacked_bias: list[fx.Node]
) -> tuple[str, tuple[fx.Node, ...], set[fx.Node]]:
    """A function of each slot's output row applied before the routing weight (a per-expert norm), if one.

    Returns (the program's JSON, the tensors it reads, the [E, ·] parameters
    among them) — ("", (), set()) when the routing weight multiplies the down
    projection's rows directly, up to plumbing (the usual case).  Between the
    down projection and the multiply, row plumbing passes through: views,
    casts, row gathers (undoing the sort by expert), a product with unit
    weights (transformers' experts called once per slot, Ergo), a sum over a
    size-1 axis, a bias gathered by expert right after the projection, masks
    of empty slots.  What is left must lift (:func:`lift_elementwise`) with
    tensors computed from parameters alone — shared ([W]) or gathered by the
    routing ids ([E, W] indexed by each row's expert).  Which rows a gathered
    tensor meets is proven by validation, which draws such tensors at random.
    """
    weights = router.weights_end
    found = _routing_multiply(gemm2, weights, region, flow) if weights is not None else None
    if found is None:
        return "", (), set()
    _, end = found
    from_tokens = flow.descendants(region.x_base) | {region.x_base}
    routed = flow.descendants(router.ids) | {router.ids}
    between = (flow.descendants(gemm2) & (flow.ancestors(end) | {end}) & region.nodes) - {gemm2}
    passthrough: dict[fx.Node, fx.Node] = {}
    tensors: dict[fx.Node, tuple] = {}
    tensor_nodes: list[fx.Node] = []
    params: set[fx.Node] = set()
    chain = between | {gemm2}

    def tensor(node: fx.Node, kind: str, source: fx.Node) -> None:
        if node not in tensors:
            tensors[node] = (kind, len(tensor_nodes))
            tensor_nodes.append(source)

    for node in flow.sorted(between):
        name = op_name(node)
        inside = [a for a in node.all_input_nodes if a in chain]
        outside = [a for a in node.all_input_nodes if a not in chain]
        if name in ("mul", "imul", "mul_", "__mul__") and len(inside) == 1 and outside and all(
            _is_unit(a) for a in outside
        ):
            passthrough[node] = inside[0]
        elif name in ("getitem", "index_select") and len(inside) == 1 and node.args[0] is inside[0] and outside and all(
            not example_value(a).dtype.is_floating_point for a in outside
        ):
            passthrough[node] = inside[0]  # rows regrouped (the sort by expert undone): a row function commutes
        elif _is_sentinel_mask(node, router.ids, flow):
            passthrough[node] = node.args[0]
        elif name in ("add", "add_", "iadd") and len(inside) == 1 and len(outside) == 1 and _traces_back_to(
            inside[0], gemm2
        ) and any(p in flow.ancestors(outside[0]) | {outside[0]} for p in stacked_bias):
            passthrough[node] = inside[0]  # the down projection's bias, gathered by expert: b2
        for source in outside:
            if source in passthrough or source.op in ("placeholder", "get_attr") and source in region.inputs and (
                ndim(source) not in (1, 2)
            ):
                continue
            value = example_value(source)
            if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or node in passthrough:
                continue
            if op_name(source) == "getitem" and isinstance(source.args[1], fx.Node) and source.args[1] in routed:
                table = source.args[0]
                shape = tensor_shape(table)
                if table not in from_tokens and shape is not None and len(shape) == 2 and shape[0] == num_experts:
                    tensor(source, "expert_tensor", table)
                    params |= {a for a in flow.ancestors(table) | {table} if a.op in ("placeholder", "get_attr")}
                    continue
            if source not in from_tokens and source not in routed:
                tensor(source, "tensor", source)
    if not any(op_name(n) in _ROW_FUNCTION_OPS for n in between) and not tensors:
        return "", (), set()  # plumbing only: the routing weight multiplies the projection's rows
    try:
        program = lift_elementwise(between, gemm2, end, passthrough, tensors)
    except LiftError as error:
        raise Mismatch(f"per-expert output function after the down projection: {error}") from None
    if not any(op[0] not in ("input", "cast") and op != ("mul", ("v", len(program.ops) - 2), 1) for op in program.ops):
        return "", (), set()
    return program.to_json(), tuple(tensor_nodes), params


def _zero_compute_kinds(router: RouterMatch, num_experts: int) -> tuple[str, ...]:
    """The kinds of the router's classes past the ``num_experts`` GEMM experts (see :data:`ZERO_COMPUTE_KINDS`)."""
    return tuple(
        "identity" if c in router.identity_classes else "zero" for c in range(num_experts, router.spec.num_experts)
    )


def _check_zeroed_slots_add_nothing(region: Region, router: RouterMatch, flow: Dataflow) -> None:
    """Mismatch when the block itself uses the weights of the slots it sets to 0 for its experts.

    Slots whose weight the model sets to 0 before its experts become zero
    experts (no GEMM row, nothing added).  That is only the block's function
    when nothing else in the block reads their weight: LongCat-Flash (5.25)
    adds an identity term from it — kept as the model's own when it is a
    branch beside the experts (:func:`moepass.compiler.detect.shared.split_coupled_shared`),
    but a block that still holds such a reader cannot be replaced by the experts alone.
    """
    on_path = flow.ancestors(router.weights_end) | {router.weights_end}
    for node in region.nodes:
        if op_name(node) not in ("masked_fill", "masked_fill_") or node not in on_path:
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            continue
        readers = [u for u in source.users if u in region.nodes and u not in on_path]
        if readers:
            raise Mismatch(
                f"the block sets some slots' weight to 0 before its experts ({node.name}) and also reads their "
                f"weights elsewhere ({', '.join(sorted(r.name for r in readers)[:3])}): a term of its own for those "
                "slots that the experts op would not compute"
            )


def _expert_selector_index(node: fx.Node, router: RouterMatch, flow: Dataflow) -> int | None:
    """For ``ids == e`` (or ``one_hot(ids)[e]``), the constant e."""
    name = op_name(node)
    if name in ("eq", "__eq__") and len(node.args) == 2:
        a, b = node.args
        if isinstance(b, int) and isinstance(a, fx.Node) and (a is router.ids or router.ids in flow.ancestors(a)):
            return b
    if name == "getitem" and isinstance(node.args[1], int) and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        if any(op_name(n) == "one_hot" for n in flow.ancestors(source) | {source}) and router.ids in flow.ancestors(
            source
        ):
            return node.args[1]
    return None


#: Ops that pass routing ids or weights through unchanged in value.
_PASS_THROUGH = CAST_OPS | {"view", "reshape", "contiguous"}


def _traces_back_to(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is ``source`` up to casts and reshapes."""
    for _ in range(8):
        if node is source:
            return True
        if not isinstance(node, fx.Node) or op_name(node) not in _PASS_THROUGH or not node.args:
            return False
        node = node.args[0]
    return False


def _same_value(a: fx.Node, b: fx.Node) -> bool:
    """Whether ``a`` and ``b`` are one value up to casts and reshapes (either derived from the other)."""
    return _traces_back_to(a, b) or _traces_back_to(b, a)


def _remaps_zero_weight_slots(ids: fx.Node, router: RouterMatch, flow: Dataflow) -> bool:
    """Whether ``ids`` is ``where(ids_r ≥ c, other, ids_r)`` over the router's ids for zero-weight classes only.

    LongCat-Flash (transformers 5.25) spreads its identity slots over real
    experts before the experts run, at weight 0: the experts see other ids
    for exactly the slots whose weight the model set to 0.
    """
    from moepass.compiler.detect.lifted_router import _classes_of_mask

    for _ in range(4):
        if op_name(ids) != "where" and op_name(ids) in _PASS_THROUGH and ids.args:
            ids = ids.args[0]
    if op_name(ids) != "where" or len(ids.args) != 3 or not isinstance(ids.args[2], fx.Node):
        return False
    mask, _, kept = ids.args
    if not _same_value(kept, router.ids):
        return False
    classes = _classes_of_mask(mask, router.ids, flow.ancestors(ids) | {ids}, router.spec.num_experts)
    return bool(classes) and classes <= router.zero_weight_classes


def _zeroes_identity_slots(weights: fx.Node, router: RouterMatch, flow: Dataflow) -> bool:
    """Whether ``weights`` are the router's weights with the block's identity slots set to 0 (LongCat 5.25)."""
    from moepass.compiler.detect.identity_term import zeroes_classes

    if not router.identity_classes:
        return False
    zeroed = zeroes_classes(weights, router, flow)
    return zeroed is not None and zeroed[1] == router.identity_classes and _same_value(zeroed[0], router.weights_end)


def _match_moepass_op(region, router, flow, own_ops, hidden) -> ExpertsMatch:
    """The experts are already ``moepass.experts`` (a loop :func:`moepass.make_traceable` replaced).

    The op's configuration is the spec; its weight operands (parameters, or
    views of them) are the weights.  Zero-computation experts beside it must
    read the same tokens, ids and weights.
    """
    from moepass.runtime.ops import parse_experts_config

    if len(own_ops) != 1:
        raise Mismatch(f"{len(own_ops)} moepass.experts calls in one block")
    node = own_ops[0]
    x, ids, weights, w1, w2, b1, b2, config = node.args
    spec = parse_experts_config(config).spec
    if not (_same_value(ids, router.ids) or _remaps_zero_weight_slots(ids, router, flow)) or not (
        _same_value(weights, router.weights_end) or _zeroes_identity_slots(weights, router, flow)
    ):
        raise Mismatch(f"{node.name}: its ids and weights are not the router's selection")

    zero = [n for n in region.nodes if op_name(n) == "moepass::zero_compute_experts"]
    if spec.zero_compute:
        if len(zero) != 1:
            raise Mismatch(f"{node.name}: zero-computation experts declared but {len(zero)} zero_compute_experts calls")
        zx, zids, zweights, first, kinds, constants = zero[0].args
        checks = {
            "tokens": zx is x,
            "ids": _same_value(zids, router.ids),
            "weights": _same_value(zweights, router.weights_end),
            "first id": first == spec.num_experts,
            "kinds": tuple(kinds.split(",")) == spec.zero_compute,
            "constants": constants is None,
        }
        wrong = [name for name, ok in checks.items() if not ok]
        if wrong:
            raise Mismatch(f"{zero[0].name}: zero-computation experts whose {', '.join(wrong)} differ from {node.name}'s")
    elif zero:
        raise Mismatch(f"{zero[0].name}: zero-computation experts the experts op does not declare")
    total = spec.num_experts + len(spec.zero_compute)
    if not spec.zero_compute and total < router.spec.num_experts and set(
        range(total, router.spec.num_experts)
    ) <= router.zero_weight_classes:
        # the router's classes past the GEMM experts whose weight the model sets to 0 (LongCat-Flash from
        # transformers 5.25 remaps them onto real experts at weight 0): zero experts, no GEMM row
        spec = dataclasses.replace(spec, zero_compute=_zero_compute_kinds(router, total))
    if spec.hidden_size != hidden or spec.num_experts + len(spec.zero_compute) != router.spec.num_experts:
        raise Mismatch(
            f"{node.name}: {spec.num_experts} experts + {len(spec.zero_compute)} zero-computation ones of width "
            f"{spec.hidden_size} do not match the router ({router.spec.num_experts} experts, width {hidden})"
        )
    weight = resolve_param(w2) or next((p for p in flow.ancestors(w2) if p.op in ("placeholder", "get_attr")), None)
    module = module_path_of_param(weight) if weight is not None else None
    return ExpertsMatch(spec, w1, w2, b1, b2, module_path=module, x_input=x)


def _module_list_index(weights: list[fx.Node]) -> dict[fx.Node, int] | None:
    """Each weight's index in the ``ModuleList`` that holds the experts (``experts.3.up_proj.weight`` → 3).

    The list is the longest module path the weights share; the component
    after it must be an integer for every weight.  None when it is not.
    """
    paths = {w: module_path_of_param(w) for w in weights}
    if any(p is None for p in paths.values()):
        return None
    owner = common_module_path(paths.values())
    depth = len(owner.split(".")) if owner else 0
    found = {}
    for weight, path in paths.items():
        parts = path.split(".")
        if len(parts) <= depth or not parts[depth].isdigit():
            return None
        found[weight] = int(parts[depth])
    return found


def _match_module_loop(region, router, flow, params, hidden) -> ExpertsMatch:
    """Per-expert ``nn.Linear`` modules: selected in a loop by ``ids == e``, or (dense) each run on every token.

    Dense: no per-expert selection reaches the experts; each expert runs on
    every token and a gate matrix that is zero outside the top-k combines
    them.  Expert e is then the e-th module of the ``ModuleList`` that holds
    them (validation proves the rewrite reproduces the block).
    """
    num_experts = router.spec.num_experts
    selectors = {}
    for node in region.nodes:
        index = _expert_selector_index(node, router, flow)
        if index is not None:
            selectors[node] = index
    linears = [n for n in region.nodes if op_name(n) == "linear" and n is not router.linear]
    per_expert: dict[int, list[fx.Node]] = {}
    listed = None
    if not selectors:
        weights = [resolve_param(arg(lin, 1, "weight")) for lin in linears]
        listed = _module_list_index([w for w in weights if w is not None]) if all(weights) else None
        if listed is None or not linears:
            raise Mismatch(
                "expert weights are not stacked, no per-expert selection (ids == e) was found, and the expert "
                "linears are not the modules of one ModuleList"
            )
    for lin in linears:
        weight = resolve_param(arg(lin, 1, "weight"))
        if weight is None or weight not in params:
            raise Mismatch(f"{lin.name}: an expert linear whose weight is not a parameter")
        if listed is not None:
            per_expert.setdefault(listed[weight], []).append(lin)
            continue
        found = {selectors[s] for s in flow.ancestors(lin) if s in selectors}
        if len(found) != 1:
            raise Mismatch(f"{lin.name}: cannot tell which expert it belongs to ({len(found)} selections reach it)")
        per_expert.setdefault(found.pop(), []).append(lin)
    if sorted(per_expert) != list(range(num_experts)):
        raise Mismatch(f"per-expert linears found for experts {sorted(per_expert)}, expected 0..{num_experts - 1}")
    gates, ups, downs = [], [], []
    activation = gated = lifted = None
    for expert in range(num_experts):
        lins = flow.sorted(per_expert[expert])
        down = [n for n in lins if any(m in flow.ancestors(n) for m in lins if m is not n)]
        first = [n for n in lins if n not in down]
        if len(down) != 1 or len(first) not in (1, 2):
            raise Mismatch(f"expert {expert}: {len(lins)} linears in an unrecognised arrangement")
        if len(first) == 2:
            # [gate; up]: the gate is the projection an activation reads directly
            acted = [n for n in first if any(op_name(u) in _ACTIVATIONS for u in n.users)]
            if len(acted) != 1:
                raise Mismatch(f"expert {expert}: cannot tell the gate projection from the up projection")
            gate = acted[0]
            up = next(n for n in first if n is not gate)
            act, is_gated, _, _, _, program = _activation_between(
                [gate, up], down[0], region.nodes, flow, router.ids
            )
            gates.append(gate)
            ups.append(up)
        else:
            act, is_gated, _, _, _, program = _activation_between(first[0], down[0], region.nodes, flow, router.ids)
            ups.append(first[0])
        if len(first) == 2 and not (is_gated or program):
            raise Mismatch(f"expert {expert}: two input projections but no gated activation")
        downs.append(down[0])
        if activation is None:
            activation, gated, lifted = act, is_gated, program
        elif (act, is_gated, program) != (activation, gated, lifted):
            raise Mismatch(f"expert {expert} computes another activation than expert 0")
    if len(gates) not in (0, num_experts):
        raise Mismatch("some experts are gated and others are not")

    def weights_of(nodes):
        return [resolve_param(arg(n, 1, "weight")) for n in nodes]

    def biases_of(nodes):
        raw = [arg(n, 2, "bias") for n in nodes]
        if all(b is None for b in raw):
            return None
        resolved = [resolve_param(b) for b in raw]
        if any(b is None for b in resolved):
            raise Mismatch("some expert linears have biases and others do not")
        return resolved

    two_inputs = bool(gates)
    w1 = [weights_of(gates), weights_of(ups)] if two_inputs else [weights_of(ups)]
    b1_parts = [biases_of(gates), biases_of(ups)] if two_inputs else [biases_of(ups)]
    b1 = None if all(b is None for b in b1_parts) else b1_parts
    w2 = weights_of(downs)
    b2 = biases_of(downs)
    if (b1 is None) != (b2 is None):
        raise Mismatch("only one of the two expert projections has a bias")
    up_shape = tensor_shape(w1[-1][0])
    down_shape = tensor_shape(w2[0])
    inter = down_shape[1]
    if up_shape[1] != hidden or down_shape[0] != hidden or (not lifted and up_shape[0] != inter):
        raise Mismatch(f"expert linears {up_shape} and {down_shape} do not map hidden size {hidden} to itself")
    for group in w1 + [w2]:
        if len({tuple(tensor_shape(w)) for w in group}) != 1:
            raise Mismatch("experts of different shapes")
    first_gemm = (gates or ups)[0]
    spec = ExpertsSpec(
        dispatch="module_loop" if listed is None else "dense_modules",
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=inter,
        activation=activation,
        gated=gated,
        gate_up_layout="concat" if gated else "none",
        transposed=False,
        has_bias=b1 is not None,
        weight_on_input=_weight_on_input(router, first_gemm, flow),
        stacked_from_modules=True,
        program=lifted or "",
    )
    module = common_module_path(module_path_of_param(w) for w in w2)
    x_input = _experts_input(region, router, first_gemm, resolve_param(arg(first_gemm, 1, "weight")), flow, hidden)
    return ExpertsMatch(spec, w1, w2, b1, b2, module_path=module, x_input=x_input)

