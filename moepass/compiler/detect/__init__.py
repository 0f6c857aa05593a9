"""Find the MoE blocks of a torch-level FX graph.

For every ``topk`` that selects experts (helpers of a group-limited selection
excluded), and every top-1 pick by ``argmax`` (or ``max(dim)``'s indices)
over a router's scores, the detector:

1. matches the router (:mod:`moepass.compiler.detect.router`);
2. walks the post-dominators of the ``topk`` to the first node with the size
   of the block input whose region contains an expert GEMM — the *combine*
   node, the value the block hands back to the model;
3. checks the region is closed and safe (:mod:`moepass.compiler.detect.region`) and
   matches the routed experts in it (:mod:`moepass.compiler.detect.experts`);
4. names any shared experts (:mod:`moepass.compiler.detect.shared`); when the
   router also weighs the shared experts (Inkling), the first such node is
   ``routed + shared`` and the combine is the routed operand, the shared
   branch staying in the graph.  When the branch is the block's own term for
   identity experts (LongCat-Flash from transformers 5.25,
   :mod:`moepass.compiler.detect.identity_term`) the combine stays the sum and
   those experts become zero-computation experts of the rewritten block.

Experts that run at a width of their own, between projections from and back
to the block's hidden size (Muse Spark), are matched at the latest value of
that width before the first combine (:func:`_latent_block`).

When no combine node exists because the experts loop graph-broke (transformers'
``eager`` experts, remote code that counts the ids on the host), the router
alone is matched where that is safe for whatever reads its ids
(:func:`_router_only`): consumers in this graph that skip id ``E`` get the
sentinel; consumers it does not show get the model's own ids unchanged, a
dropped slot at weight 0.  Otherwise — and for every router-like selection
whose router does not match — the block is reported with the reason.

Stacked expert weights that no matched router reaches are reported as blocks
that were not rewritten, with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, example_value, op_name, tensor_shape, written_value
from moepass.compiler.detect.common import (
    Mismatch,
    arg,
    common_module_path,
    module_path_of_param,
    ndim,
    resolve_param,
    same_numel,
    same_tokens,
    source_path,
)
from moepass.compiler.detect.experts import _GEMMS as _EXPERT_GEMMS
from moepass.compiler.detect.experts import ExpertsMatch, match_experts
from moepass.compiler.detect.identity_term import match_identity_term
from moepass.compiler.detect.lifted_router import (
    feeds_capacity,
    is_top1_selection,
    match_lifted_router,
    match_top1_router,
    routing_set,
)
from moepass.compiler.detect.region import ForeignInputs, Region, block_region
from moepass.compiler.detect.router import RouterMatch, find_router_linear, is_topk, match_router
from moepass.compiler.detect.shared import CoupledShared, match_shared_experts, split_coupled_shared
from moepass.compiler.spec import MoEBlockSpec, SharedExpertSpec, layer_index_of

logger = logging.getLogger(__name__)

__all__ = [
    "BlockMatch", "BlockRejection", "find_moe_blocks", "Mismatch", "layer_index_of", "internal_error_reason",
    "GRAPH_BREAK_REMEDY",
]


@dataclass
class BlockMatch:
    """A block the pass can rewrite."""

    spec: MoEBlockSpec
    router: RouterMatch
    experts: ExpertsMatch | None
    #: The nodes the rewrite replaces: up to the combine node, or (router
    #: only) up to the router's ids and weights.
    region: Region
    shared: tuple[SharedExpertSpec, ...] = ()
    #: Router only: how the route op writes a dropped slot for the code that consumes the ids —
    #: "sentinel" (every consumer in this graph skips id E: dropped slots cost nothing) or
    #: "model_ids" (consumers this graph does not show: the model's ids unchanged, weight 0).
    empty_slots: str = "sentinel"
    #: Router only: why an adaptive policy cannot be applied safely ("" when it can).
    adaptive_unsafe: str = ""
    #: Router only, ids read where this graph does not show: whether the top-k is recognisably an
    #: expert router from the graph alone (E ≤ H and a router-like module name); the backend may
    #: confirm it from the block it runs in.
    router_recognised: bool = True
    #: Values outside the region that read its router nodes and stay in the
    #: graph (a shared branch the router weighs): validation checks the rewrite
    #: leaves them unchanged.
    kept_readers: tuple[fx.Node, ...] = ()

    @property
    def path(self) -> str:
        """Module path of the block."""
        return self.spec.path


@dataclass
class BlockRejection:
    """An MoE-looking block the pass leaves exactly as it was, and why."""

    path: str
    reason: str
    router_kind: str = "?"
    dispatch: str = "?"
    num_experts: int | None = None
    top_k: int | None = None
    notes: list[str] = field(default_factory=list)
    #: The router's weight parameter, when known (names a block compiled in a frame of its own).
    anchor: fx.Node | None = None


def _block_path(*paths: str | None) -> str:
    return common_module_path(p for p in paths if p is not None)


def _parent(path: str | None) -> str | None:
    if path is None:
        return None
    return path.rsplit(".", 1)[0] if "." in path else ""


def _selection_anchors(graph: fx.Graph, flow: Dataflow) -> list[fx.Node]:
    """The expert-selecting topk per router linear (group-selection helpers dropped)."""
    by_linear: dict[fx.Node, list[fx.Node]] = {}
    loose = []
    for node in graph.nodes:
        if is_top1_selection(node) and _top1_over_router(node):
            by_linear.setdefault(find_router_linear(node.args[0])[0], []).append(node)
            continue
        if not is_topk(node) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        try:
            linear, _ = find_router_linear(node.args[0])
        except Mismatch:
            loose.append(node)
            continue
        by_linear.setdefault(linear, []).append(node)
    anchors = [max(group, key=flow.position.__getitem__) for group in by_linear.values()]
    # a topk over derived scores (DeepSeek's group selection) that feeds an
    # anchor of the same router is part of that router, not a selection
    helpers = {
        node
        for node in loose
        for linear, group in by_linear.items()
        if node in flow.descendants(linear) and any(node in flow.ancestors(a) for a in group)
    }
    return flow.sorted(anchors + [n for n in loose if n not in helpers])


def _top1_over_router(node: fx.Node) -> bool:
    """Whether an ``argmax`` / ``max(dim)`` picks among the outputs of a router-like linear ([E, H], E ≤ H).

    ``max`` is also how a group-limited router scores its groups and how a
    numerically stable softmax starts: only a pick over the last axis of a
    router's [.., E] scores, whose indices are used, is a selection.
    """
    try:
        linear, _ = find_router_linear(node.args[0])
    except Mismatch:
        return False
    weight = resolve_param(arg(linear, 1, "weight"))
    shape = tensor_shape(weight) if weight is not None else None
    scores = tensor_shape(node.args[0])
    if shape is None or len(shape) != 2 or not all(isinstance(s, int) for s in shape) or scores is None:
        return False
    return scores[-1] == shape[0] and shape[0] <= shape[1] and shape[0] > 1


def _has_expert_gemm(region: Region, router: RouterMatch) -> bool:
    """Whether the region multiplies by expert weights (stacked, or per-expert linears)."""
    for source in region.inputs:
        if source.op in ("placeholder", "get_attr") and source not in router.param_nodes and ndim(source) == 3:
            return True
    for node in region.nodes:
        if op_name(node) == "linear":
            weight = resolve_param(arg(node, 1, "weight"))
            if weight is not None and weight not in router.param_nodes:
                return True
    return False


_ROUTER_NAME = re.compile(r"(^|[._])(gate|router|gating|routing|switch)([._]|$)")


#: Ops that pass the selected ids on unchanged in value (their users are the consumers).
_IDS_PASS = {"to", "long", "int", "view", "reshape", "unsqueeze", "squeeze", "flatten", "contiguous", "type", "clone"}
#: Ops through which the routing weights reach the experts linearly (a dropped slot's weight 0 adds nothing).
_WEIGHTS_LINEAR = _IDS_PASS | {"float", "half", "bfloat16", "double", "type_as", "detach", "getitem", "mul", "mul_",
                                "imul", "__mul__", "expand", "expand_as", "permute", "transpose", "index_select",
                                "gather", "output"}


def _looks_like_router(router: RouterMatch) -> bool:
    """Whether a top-k whose experts are not in this graph selects experts (not tokens to sample, say).

    Its linear maps the hidden size to at most as many classes (E ≤ H), or its
    weight lives in a module named like a router.
    """
    num_experts, hidden = tensor_shape(router.weight)
    return router.spec.top_k < num_experts and (
        num_experts <= hidden or bool(_ROUTER_NAME.search(router.module_path or ""))
    )


def _ids_consumers(router: RouterMatch, inside: set[fx.Node]) -> set[str]:
    """How the selected ids are used outside the router's own nodes ``inside``.

    "skips": ``one_hot(ids, E + 1)`` or ``ids == e`` (never selects id E);
    "leaves": a graph output (what reads it runs where this graph does not
    show); "remapped": a ``where(mask, other, ids)`` that leaves the graph (the
    block rewrites some ids before its loop: LongCat-Flash from transformers
    5.25 spreads its identity slots over real experts); "other": anything else
    in the graph (``scatter_`` counts, sorts, ``one_hot(ids, E)``, gathers).
    """
    num_experts = router.spec.num_experts
    found: set[str] = set()
    frontier, seen = [router.ids], {router.ids}
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen or (user in inside and user is not router.ids):
                continue
            seen.add(user)
            name = op_name(user)
            if name == "one_hot" and arg(user, 1, "num_classes") == num_experts + 1:
                found.add("skips")
            elif name in ("eq", "__eq__") and any(isinstance(a, int) and not isinstance(a, bool) for a in user.args):
                found.add("skips")
            elif name == "output":
                found.add("leaves")
            elif name in _IDS_PASS:
                frontier.append(user)
            elif name == "where" and any(op_name(u) == "output" for u in user.users):
                found.add("remapped")
            else:
                found.add("other")
    return found


def _weights_reach_experts_linearly(router: RouterMatch, inside: set[fx.Node]) -> bool:
    """Whether every use of the routing weights outside the router is linear in them (or leaves the graph)."""
    frontier, seen = [router.weights_end], {router.weights_end}
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen or user in inside:
                continue
            seen.add(user)
            if op_name(user) not in _WEIGHTS_LINEAR:
                return False
            if op_name(user) in _IDS_PASS | {"float", "half", "bfloat16", "double", "type_as", "detach", "expand",
                                             "expand_as", "permute", "transpose"}:
                frontier.append(user)
    return True


def _router_block(module_path: str | None) -> str | None:
    """The block owning a router whose linear lives at ``module_path``.

    The linear is the router (``mlp.gate``) or sits inside a router module
    (``ffn.router.layer``, ``router.classifier``): the block is the parent of
    the innermost component named like a router, else the linear's parent.
    """
    if module_path is None:
        return None
    parts = module_path.split(".")
    for index in range(len(parts) - 1, -1, -1):
        if _ROUTER_NAME.search(parts[index]):
            return ".".join(parts[:index])
    return _parent(module_path)


def _find_combine(
    router: RouterMatch, flow: Dataflow
) -> tuple[fx.Node, Region, CoupledShared | None] | tuple[None, str | None, None]:
    """The combine node and its region, or (None, reason-if-an-MoE-was-seen, None).

    First with the router's input as the block input; failing that, with the
    router's logits as a second input (:func:`_find_combine_beside_router`).
    When the first combine is ``routed + shared`` with a shared branch that
    reads the router (Inkling), the combine is the routed output and the
    third value names the shared branch left in the graph.
    """
    combine, region_or_reason, coupled = _find_combine_from_router_input(router, flow)
    if combine is not None:
        return combine, region_or_reason, coupled
    beside, region = _find_combine_beside_router(router, flow)
    if beside is not None:
        return beside, region, None
    return None, region_or_reason, None


#: How many post-dominators of a selection the search beside the router looks at (a block ends within them).
_BESIDE_SEARCH = 200


def _find_combine_beside_router(router: RouterMatch, flow: Dataflow) -> tuple[fx.Node, Region] | tuple[None, None]:
    """The combine node of a block whose router computes its logits from more than the block input.

    ZAYA's router is an MLP of its own (down-projection, norm, two GELU
    layers) that also reads the previous layer's router state: no region from
    the router linear's input is closed.  The router's computation up to its
    logits then stays outside the block, and the block is ``f(x, logits)``
    with ``x`` the one other value it reads, the tokens the experts take.
    """
    logits = router.linear
    outside = flow.ancestors(logits) | {logits}
    for candidate in flow.post_dominators(router.anchor)[:_BESIDE_SEARCH]:
        if candidate.op in ("placeholder", "output") or tensor_shape(candidate) is None:
            continue
        needed = (flow.ancestors(candidate) | {candidate}) - outside
        reads = {a for n in needed if n.op not in ("placeholder", "get_attr") for a in n.all_input_nodes} - needed
        tokens = [
            a for a in reads
            if a is not logits and a.op not in ("placeholder", "get_attr") and tensor_shape(a) is not None
        ]
        if len(tokens) != 1 or not same_numel(candidate, tokens[0]):
            continue
        try:
            region = block_region(flow, candidate, tokens[0], boundary=(logits,))
        except Mismatch:
            continue
        if _has_expert_gemm(region, router):
            return candidate, region
    return None, None


def _find_combine_from_router_input(
    router: RouterMatch, flow: Dataflow
) -> tuple[fx.Node, Region, CoupledShared | None] | tuple[None, str | None, None]:
    """:func:`_find_combine` with the router linear's input as the block input."""
    x_base = router.x_base
    last_reason = None
    for candidate in flow.post_dominators(router.anchor):
        if candidate.op in ("placeholder", "output") or tensor_shape(written_value(candidate)) is None:
            continue
        written = written_value(candidate)
        if not same_numel(written, x_base) or tensor_shape(written)[-1] != tensor_shape(x_base)[-1]:
            continue  # (per-slot rows [T·k, W] can hold as many numbers as [T, H])
        try:
            region = _closed_region(flow, candidate, x_base)
        except Mismatch as error:
            last_reason = str(error)
            break
        if not _has_expert_gemm(region, router):
            continue
        coupled = _coupled_shared(candidate, region, router, flow)
        if coupled is not None:
            return coupled.routed, coupled.region, coupled
        return candidate, region, None
    return None, last_reason, None


def _coupled_shared(combine: fx.Node, region: Region, router: RouterMatch, flow: Dataflow) -> CoupledShared | None:
    """The split of ``combine`` into routed experts + a shared branch gated by the router, if it is one."""
    if op_name(combine) not in ("add", "add_", "iadd"):
        return None
    token_dims = tuple(tensor_shape(router.linear)[:-1])
    routing = routing_set(router.linear, router.x_base, flow, token_dims)
    return split_coupled_shared(
        flow, combine, region.x_base, routing, lambda r: _has_expert_gemm(r, router), router.zero_weight_classes
    )


def _closed_region(flow: Dataflow, combine: fx.Node, x_base: fx.Node) -> Region:
    """The region of ``combine``, starting at the router's input or at an earlier common source.

    The router and the experts may each transform a shared input first (Gemma 4
    normalises and scales the router's input, and normalises the experts'
    separately): the block then starts at that shared input, an ancestor of the
    router's input of the same size, and both transforms are inside it.
    """
    for _ in range(4):
        try:
            return block_region(flow, combine, x_base)
        except ForeignInputs as error:
            earlier = [
                n for n in error.nodes
                if n in flow.ancestors(x_base) and tensor_shape(n) is not None and same_numel(n, x_base)
            ]
            if len(earlier) != 1 or len(error.nodes) != 1:
                raise
            if any(op_name(n) == "linear" for n in flow.descendants(earlier[0]) & flow.ancestors(x_base)):
                raise  # a router with layers of its own (an MLP): it stays outside the block
            x_base = earlier[0]
    return block_region(flow, combine, x_base)


def _latent_block(
    router: RouterMatch, flow: Dataflow, combine: fx.Node, region: Region, error: Mismatch
) -> tuple[fx.Node, Region, ExpertsMatch] | None:
    """The block cut at its experts' own width, when they run between projections from and back to hidden.

    Muse Spark projects the block input to a narrower width (and normalises
    it) before its experts and projects their combined output back: no value
    of the block input's size holds the experts' weighted sum, so the first
    combine (after the projection back) has weights that are not the
    experts'.  The block then ends at the latest value before that combine
    with the tokens' rows at another width whose region holds the experts:
    the router still reads the block input, the experts read the projected
    tokens, and both projections stay the model's own ops.  None when no
    such cut matches (``error`` then stands).
    """
    hidden = tensor_shape(router.weight)[1]
    candidates = [
        n for n in flow.post_dominators(router.anchor)
        if flow.position[n] < flow.position[combine] and n.op not in ("placeholder", "output")
        and tensor_shape(n) is not None and len(tensor_shape(n)) >= 2 and isinstance(tensor_shape(n)[-1], int)
        and tensor_shape(n)[-1] != hidden and same_tokens(n, region.x_base)
    ]
    for candidate in reversed(candidates):
        try:
            latent = _closed_region(flow, candidate, region.x_base)
            if not _has_expert_gemm(latent, router):
                continue
            experts = match_experts(latent, router, flow, width=int(tensor_shape(candidate)[-1]))
        except Mismatch:
            continue
        logger.debug("%s: experts at width %s (%s)", router.module_path, tensor_shape(candidate)[-1], error)
        return candidate, latent, experts
    return None


def _combine_shape_ok(combine: fx.Node, x_base: fx.Node, hidden: int) -> bool:
    shape = tensor_shape(written_value(combine))
    if shape is None:
        return False
    if len(shape) == 2 and shape[-1] == hidden:
        return True
    return tensor_shape(x_base) == shape


def find_moe_blocks(gm: fx.GraphModule, flow: Dataflow | None = None) -> list[BlockMatch | BlockRejection]:
    """Every MoE block of ``gm``: matches to rewrite and rejections to report."""
    flow = flow or Dataflow(gm.graph)
    results: list[BlockMatch | BlockRejection] = []
    claimed: set[fx.Node] = set()
    #: why the router of a block (by path) did not match, for blocks found later by their weights
    router_failures: dict[str, str] = {}
    #: router-like selections whose router did not match, by block (reported if nothing says more)
    unmatched: dict[str, BlockRejection] = {}
    for anchor in _selection_anchors(gm.graph, flow):
        try:
            _read_selection(anchor, flow, results, claimed, router_failures, unmatched)
        except Exception as error:  # a graph form this code does not expect: the block stays as it was
            results.append(BlockRejection(path=_safe_block_of(anchor), reason=internal_error_reason("reading", error)))

    try:
        results.extend(_argmax_routers(gm.graph, flow, {r.path for r in results}))
    except Exception as error:  # only reports; nothing to leave unchanged
        logger.warning("moepass: %s", internal_error_reason("looking for more blocks in", error))
    try:
        results.extend(_unclaimed_experts(gm.graph, claimed, results, router_failures, flow))
    except Exception as error:  # only reports; nothing to leave unchanged
        logger.warning("moepass: %s", internal_error_reason("looking for more blocks in", error))
    known = {r.path for r in results}
    results.extend(rejection for path, rejection in unmatched.items() if path not in known)  # never silent
    return results


def _read_selection(
    anchor: fx.Node,
    flow: Dataflow,
    results: list,
    claimed: set[fx.Node],
    router_failures: dict[str, str],
    unmatched: dict[str, BlockRejection],
) -> None:
    """Match the block around one selection; append its match or rejection to ``results``."""
    try:
        router = _match_any_router(anchor, flow)
    except Mismatch as error:
        reason = str(error) if str(error).startswith("no top-k expert selection") else f"router not supported: {error}"
        evidence = _expert_evidence(anchor, flow)
        if evidence is not None:
            results.append(BlockRejection(path=evidence, reason=reason))
            return
        block = _router_block_of(anchor)
        if block is None:
            return
        router_failures.setdefault(block, reason)
        weight = _router_like_weight(anchor)
        owner = _router_block(module_path_of_param(weight)) if weight is not None else None
        if owner is not None:  # a router-like selection: reported unless a more precise reason comes later
            unmatched.setdefault(owner, BlockRejection(
                path=owner, reason=reason, router_kind=op_name(anchor), num_experts=tensor_shape(weight)[0],
                anchor=weight,
            ))
        return
    combine, region_or_reason, coupled = _find_combine(router, flow)
    router_block = _router_block(router.module_path)
    if combine is None:
        evidence = _expert_evidence(anchor, flow)
        if region_or_reason is not None and evidence is not None:
            results.append(
                BlockRejection(
                    path=router_block or "",
                    reason=region_or_reason,
                    router_kind=router.spec.kind,
                    num_experts=router.spec.num_experts,
                    top_k=router.spec.top_k,
                    anchor=router.weight,
                )
            )
        elif _looks_like_router(router):
            results.append(_router_only(router, flow))
            claimed |= router.param_nodes
        elif region_or_reason is not None or evidence is not None:
            results.append(
                BlockRejection(
                    path=router_block or "",
                    reason=region_or_reason or "could not find where the experts' outputs are combined",
                    router_kind=router.spec.kind,
                    num_experts=router.spec.num_experts,
                    top_k=router.spec.top_k,
                    anchor=router.weight,
                )
            )
        return
    region = region_or_reason
    if coupled is not None and coupled.spec is None and coupled.combine is not None:
        # the block's own term for the slots it zeroes: identity experts (LongCat-Flash from 5.25)
        # become zero-computation experts of the whole block, with the router's true selection
        identity = match_identity_term(coupled.shared, region.x_base, router, flow)
        if identity is not None:
            router = dataclasses.replace(
                router, weights_start=identity.weights, weights_end=identity.weights,
                identity_classes=identity.classes,
            )
            combine, region, coupled = coupled.combine, block_region(flow, coupled.combine, region.x_base), None
    hidden = tensor_shape(region.x_base)[-1] if region.free_inputs else tensor_shape(router.weight)[1]
    try:
        if not _combine_shape_ok(combine, region.x_base, hidden):
            _explain_per_expert_output(region, router, flow)
            raise Mismatch(f"the block's output {combine.name} has shape {tensor_shape(combine)}")
        try:
            experts = match_experts(region, router, flow)
        except Mismatch as error:
            latent = _latent_block(router, flow, combine, region, error)
            if latent is None:
                if not str(error).startswith("per-expert output function"):
                    # a row norm after the experts that was not even reached: say so
                    _explain_per_expert_output(region, router, flow)
                raise
            combine, region, experts = latent
    except Mismatch as error:
        results.append(
            BlockRejection(
                path=router_block or "",
                reason=str(error),
                router_kind=router.spec.kind,
                num_experts=router.spec.num_experts,
                top_k=router.spec.top_k,
            )
        )
        return
    path = _block_path(router_block, _parent(experts.module_path) if not experts.spec.stacked_from_modules else experts.module_path)
    if coupled is not None:
        shared = (coupled.spec,) if coupled.spec is not None else ()
    else:
        shared = match_shared_experts(flow, combine, region.x_base)
    spec = MoEBlockSpec(
        path=path,
        router=router.spec,
        experts=experts.spec,
        shared_experts=shared,
        layer_index=layer_index_of(path),
    )
    kept = (coupled.shared,) if coupled is not None else ()
    results.append(
        BlockMatch(spec=spec, router=router, experts=experts, region=region, shared=shared, kept_readers=kept)
    )
    claimed |= {n for n in region.inputs if n.op in ("placeholder", "get_attr")} | router.param_nodes


def _safe_block_of(anchor: fx.Node) -> str:
    try:
        return _router_block_of(anchor) or ""
    except Exception:  # the graph is what could not be read
        return ""


def internal_error_reason(stage: str, error: BaseException) -> str:
    """The reason of a block left as it was because moepass raised (code ``internal_error``)."""
    return (
        f"moepass failed while {stage} this block ({type(error).__name__}: {error}); the block runs as it was — "
        "please report it with moepass.report()"
    )


#: Ops that reduce a row over its features (a norm's mean square, its root).
_ROW_REDUCTIONS = {"mean", "rsqrt", "norm", "var", "var_mean", "layer_norm", "rms_norm", "linalg_vector_norm"}


def _explain_per_expert_output(region: Region, router: RouterMatch, flow: Dataflow) -> None:
    """Raise the precise reason when each expert's output rows pass through a row norm before their weight.

    Ergo and Muse Spark normalise every expert's output (``post_expert_norm``)
    before the routing weight multiplies it; the experts matcher lifts such a
    function (``ExpertsSpec.output``).  This names the norm when the block
    failed before that could be tried (its weights did not match), and whether
    the experts run at a width of their own.
    """
    experts_params = {
        n for n in region.inputs
        if n.op in ("placeholder", "get_attr") and n not in router.param_nodes and ndim(n) == 3
    }
    gemms = [
        n for n in region.nodes
        if len(n.all_input_nodes) > 1 and any(p in flow.ancestors(n) | {n} for p in experts_params)
        and op_name(n) in _EXPERT_GEMMS
    ]
    if len(gemms) < 2:
        return
    last = max(gemms, key=flow.position.__getitem__)
    weights = router.weights_end or router.weights_start
    after = flow.descendants(last) & region.nodes
    reductions = sorted(n.name for n in after if op_name(n) in _ROW_REDUCTIONS and weights not in flow.ancestors(n))
    if not reductions:
        return
    width = tensor_shape(last)[-1]
    hidden = tensor_shape(router.weight)[1]
    latent = f"; the experts run at width {width}, between projections from and back to hidden {hidden}" if (
        width != hidden
    ) else ""
    raise Mismatch(
        f"per-expert output norm: each expert's output rows are normalised ({', '.join(reductions[:3])}: a row "
        f"norm over their {width} features, e.g. post_expert_norm) before the routing weight multiplies them, in a "
        f"form moepass could not lift as a per-slot output function{latent}"
    )


def _match_any_router(anchor: fx.Node, flow: Dataflow) -> RouterMatch:
    """A named router kind when the router is one (fused fast paths), else the lifted general case."""
    if is_top1_selection(anchor):
        return match_top1_router(anchor, flow)
    try:
        return match_router(anchor, flow)
    except Mismatch as named:
        try:
            return match_lifted_router(anchor, flow)
        except Mismatch as general:
            raise Mismatch(f"{general} (as a named kind: {named})") from None


#: What a user can do about a block whose experts did not reach the backend with its router.
GRAPH_BREAK_REMEDY = (
    "moepass.make_traceable(model) before torch.compile (it replaces the experts loop by moepass ops), or "
    "torch.compile(..., fullgraph=True) / torch._dynamo.config.capture_dynamic_output_shape_ops = True "
    "when the loop can be captured"
)


def _router_only(router: RouterMatch, flow: Dataflow) -> BlockMatch | BlockRejection:
    """The router of a block whose experts are not in this graph: rewritten alone where that is safe.

    The ids' consumers decide how a dropped slot is written: every consumer in
    this graph skips id E (``ids == e``, ``one_hot(ids, E + 1)``): the sentinel,
    and a dropped slot costs nothing.  Otherwise (consumers outside the graph,
    or ones that count slots): the model's own ids, unchanged — any consumer
    sees what it always saw — with weight 0 on a dropped slot, which needs
    every use of the weights to be linear in them (the experts' outputs times
    their weights); where that is not seen, an adaptive policy does not apply.
    """
    path = _router_block(router.module_path) or ""

    def rejected(reason: str) -> BlockRejection:
        return BlockRejection(
            path=path,
            reason=reason,
            router_kind=router.spec.kind,
            dispatch="eager_loop",
            num_experts=router.spec.num_experts,
            top_k=router.spec.top_k,
            anchor=router.weight,
        )

    if router.weights_end is None:
        return rejected(
            "the experts graph-broke away from their router and this router's weights are dense scores; "
            f"nothing to rewrite alone ({GRAPH_BREAK_REMEDY})"
        )
    try:
        region = block_region(flow, router.weights_end, router.x_base, router.ids)
    except Mismatch as error:
        return rejected(f"the experts graph-broke away from their router, and the router cannot be rewritten alone: {error}")
    consumers = _ids_consumers(router, region.nodes)
    if not consumers:
        return rejected(
            "the experts graph-broke away from their router, and nothing in or out of this graph reads the selected "
            f"expert ids ({GRAPH_BREAK_REMEDY})"
        )
    if "remapped" in consumers and "leaves" not in consumers:
        return rejected(
            "the experts graph-broke after the block remapped some of its expert ids (its experts loop runs "
            "outside this graph on ids the router-only rewrite cannot keep consistent): to rewrite it, run the "
            "experts with experts_implementation='grouped_mm' or call moepass.make_traceable(model) before "
            "torch.compile"
        )
    consumers.discard("remapped")  # beside the ids themselves: the remap reads the model's ids, left unchanged
    if "other" in consumers:  # sorted or counted here, the experts run elsewhere on what is derived from them
        return rejected(
            "the experts graph-broke away from their router: this graph sorts or counts the selected expert ids "
            f"and the experts run in another graph or in eager Python on what it derives ({GRAPH_BREAK_REMEDY})"
        )
    empty_slots = "sentinel" if consumers == {"skips"} else "model_ids"
    unsafe = ""
    if empty_slots == "model_ids" and not _weights_reach_experts_linearly(router, region.nodes):
        unsafe = "the routing weights are used in this graph by more than a product with the experts' outputs"
    recognised = empty_slots == "sentinel" or bool(
        _ROUTER_NAME.search(router.module_path or "") and router.spec.num_experts <= tensor_shape(router.weight)[1]
    )
    spec = MoEBlockSpec(path=path, router=router.spec, experts=None, layer_index=layer_index_of(path))
    return BlockMatch(
        spec=spec, router=router, experts=None, region=region, empty_slots=empty_slots, adaptive_unsafe=unsafe,
        router_recognised=recognised,
    )


def _expert_evidence(anchor: fx.Node, flow: Dataflow) -> str | None:
    """Module path of expert-like weights the anchor's ids reach, if any (else it is not an MoE)."""
    ids = [u for u in anchor.users if op_name(u) == "getitem" and u.args[1] == 1]
    scores = tensor_shape(anchor.args[0]) if anchor.args and isinstance(anchor.args[0], fx.Node) else None
    if not ids or not scores:
        return None
    candidates = scores[-1]  # what the top-k picks among: experts have one weight slice each
    seen = 0
    for node in flow.sorted(flow.descendants(ids[0])):
        seen += 1
        if seen > 200:
            break
        for source in node.all_input_nodes:
            if source.op in ("placeholder", "get_attr") and ndim(source) == 3 and tensor_shape(source)[0] == candidates:
                return _parent(module_path_of_param(source)) or ""
    return None


_SPARSEMIXER_OPS = {"max", "masked_fill", "softmax", "gather", "abs", "clamp"}


def _router_like_weight(anchor: fx.Node) -> fx.Node | None:
    """The [E, H] weight of the linear behind a selection, when it looks like a router's (E ≤ H, or named like one)."""
    try:
        linear, _ = find_router_linear(anchor.args[0])
    except Mismatch:
        return None
    weight = resolve_param(arg(linear, 1, "weight"))
    shape = tensor_shape(weight) if weight is not None else None
    if shape is None or len(shape) != 2 or not all(isinstance(s, int) for s in shape):
        return None
    scores = tensor_shape(anchor.args[0]) or ()
    if not scores or scores[-1] != shape[0]:
        return None  # the selection is not over this linear's classes (a product of two key sets, say)
    named = bool(_ROUTER_NAME.search(module_path_of_param(weight) or ""))
    return weight if shape[0] <= shape[1] or named else None


def _router_block_of(anchor: fx.Node) -> str | None:
    """The block path of the router linear behind ``anchor``, when one is found."""
    try:
        linear, _ = find_router_linear(anchor.args[0])
    except Mismatch:
        return None
    weight = resolve_param(arg(linear, 1, "weight"))
    return _parent(module_path_of_param(weight)) if weight is not None else None


def _argmax_routers(graph: fx.Graph, flow: Dataflow, known: set[str]) -> list[BlockRejection]:
    """Routers that pick experts by argmax (Switch Transformers, NLLB-MoE: top-1/top-2 with a capacity)."""
    found = []
    for node in graph.nodes:
        if op_name(node) != "argmax" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        try:
            linear, _ = find_router_linear(node.args[0])
        except Mismatch:
            continue
        weight = resolve_param(arg(linear, 1, "weight"))
        shape = tensor_shape(weight) if weight is not None else None
        module = module_path_of_param(weight) if weight is not None else None
        if shape is None or len(shape) != 2 or shape[0] > shape[1] or not _ROUTER_NAME.search(module or ""):
            continue
        path = _router_block(module) or ""
        if path in known or any(r.path == path for r in found) or not feeds_capacity(node, flow):
            continue
        found.append(
            BlockRejection(
                path=path,
                reason="no top-k expert selection: the router picks experts by argmax with an expert capacity "
                "(tokens over capacity skip the experts); only top-k routers are supported",
                router_kind="argmax",
                num_experts=int(shape[0]),
                anchor=weight,
            )
        )
    return found


def _lookup_table(params: list[fx.Node], flow: Dataflow) -> fx.Node | None:
    """An integer [V, k] buffer the experts' dispatch reads (DeepSeek-V4's token-id → experts table), if any."""
    for param in params:
        gemms = [n for n in flow.sorted(flow.descendants(param))[:8] if len(n.all_input_nodes) > 1]
        for gemm in gemms:
            for source in flow.ancestors(gemm):
                value = example_value(source)
                if (
                    source.op in ("placeholder", "get_attr")
                    and isinstance(value, torch.Tensor)
                    and not value.dtype.is_floating_point
                    and value.dim() == 2
                    and "." in (source_path(source) or "")  # a module's buffer, not the model's input ids
                ):
                    return source
    return None


def _unclaimed_experts(
    graph: fx.Graph,
    claimed: set[fx.Node],
    results: list[BlockMatch | BlockRejection],
    router_failures: dict[str, str],
    flow: Dataflow,
) -> list[BlockRejection]:
    """Stacked expert weights no matched router reached: blocks left alone."""
    known = {r.path for r in results}
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op not in ("placeholder", "get_attr") or node in claimed or ndim(node) != 3:
            continue
        path = module_path_of_param(node)
        if path is None or not (re.search(r"expert", path) or _split_loop_gemm(node)):
            continue
        groups.setdefault(_parent(path) or "", []).append(node)
    rejections = []
    for path, params in groups.items():
        if path in known:
            continue
        num_experts = tensor_shape(params[0])[0]
        ops = set()
        for p in params:
            for node in p.users:
                ops.add(op_name(node))
        router_ops = _router_ops_near(graph, path, num_experts)
        table = _lookup_table(params, flow)
        if table is not None:
            reason = (
                f"no top-k expert selection: the experts are chosen by a table lookup ({source_path(table)}, hash routing "
                "by token id); only top-k routers are supported"
            )
        elif {"max", "masked_fill"} <= router_ops and "topk" not in router_ops:
            reason = (
                "no top-k expert selection: the router is a sparsemixer "
                f"({', '.join(sorted(router_ops & _SPARSEMIXER_OPS))}); only top-k routers are supported"
            )
        elif path in router_failures:
            reason = router_failures[path]
        elif any(_split_loop_gemm(p) for p in params):
            reason = _SPLIT_LOOP_REASON
            if len(params) == 1:
                reason += (
                    "; only one of the experts' projections is in this graph (in a mixture-of-attention layer the "
                    "query and output projections are the experts, with attention between them, so they are never "
                    "one block)"
                )
            else:
                reason += (
                    "; moepass.make_traceable(model) captures JetMoE's MLP mixture (JetMoeMoE) whole, other blocks "
                    "need a model-side change that keeps the counts a tensor"
                )
        else:
            reason = "no supported top-k router reaches these stacked experts"
        rejections.append(BlockRejection(path=path, reason=reason, num_experts=int(num_experts), anchor=params[0]))
    return rejections


_SPLIT_LOOP_REASON = (
    "the experts graph-broke away from their router: they run in a graph of their own over rows grouped by "
    "per-expert counts that arrive as Python ints (x.split(expert_size) with expert_size from a .tolist(), "
    "JetMoE's ParallelExperts), so the router's top-k and the expert GEMMs never reach the backend together "
    "(and every new set of counts recompiles)"
)


def _split_loop_gemm(param: fx.Node) -> bool:
    """Whether ``param`` [E, ., .] is sliced per expert (``param[e]``) into a linear over a ``split`` piece.

    JetMoE's experts: ``[F.linear(x_e, W[e]) for x_e in x.split(sizes)]``
    with ``sizes`` Python ints taken from a tensor by ``.tolist()``.
    """
    for user in param.users:
        if op_name(user) != "getitem" or not isinstance(user.args[1], int):
            continue
        for linear in user.users:
            data = arg(linear, 0, "input") if op_name(linear) == "linear" else None
            if isinstance(data, fx.Node) and op_name(data) == "getitem" and op_name(data.args[0]) == "split":
                return True
    return False


def _router_ops_near(graph: fx.Graph, block_path: str, num_experts: int) -> set[str]:
    """Op names applied to the output of an [E, H] linear inside ``block_path``."""
    ops: set[str] = set()
    for node in graph.nodes:
        if op_name(node) != "linear":
            continue
        weight = node.args[1] if len(node.args) > 1 else None
        if not isinstance(weight, fx.Node) or weight.op not in ("placeholder", "get_attr"):
            continue
        shape = tensor_shape(weight)
        path = module_path_of_param(weight) or ""
        if shape and shape[0] == num_experts and path.startswith(block_path):
            frontier = list(node.users)
            for _ in range(3):
                next_frontier = []
                for user in frontier:
                    ops.add(op_name(user))
                    next_frontier.extend(user.users)
                frontier = next_frontier
    return ops
