"""The backend's stages over one graph, and the state they hand each other.

The backend runs an ordered list of stages (:data:`moepass.compiler.backend.STAGES`)
over one dynamo graph, like Inductor's ordered pass list::

    detect ─► resolve ─► validate ─► rewrite ─► plan (offload, ...) ─► finish
      │          │          │           │              │
      └── GraphState.blocks: one BlockState per block found ─────────────┘

Each stage is a function ``GraphState -> None`` that reads and updates the
graph and the blocks' states; none calls another.  A block is *open* while it
is matched and nothing has left it as it was; a stage that leaves a block as
it was says why in the block's report (:meth:`BlockState.leave`) and later
stages skip it.  The plan stages act on the blocks the rewrite stage rewrote,
each on the moepass ops it inserted (:meth:`BlockState.experts_node`).

This module holds the state and the core stages (detect, resolve, validate,
rewrite, finish); the plan stages live in :mod:`moepass.compiler.plan`.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, example_value
from moepass.compiler.detect import (
    GRAPH_BREAK_REMEDY,
    BlockMatch,
    BlockRejection,
    find_moe_blocks,
    internal_error_reason,
    layer_index_of,
)
from moepass.compiler.detect.common import Mismatch, source_path
from moepass.compiler.graph_breaks import blocks_compiled_in_pieces, graph_break_here
from moepass.compiler.options import BackendOptions
from moepass.compiler.rewrite import BlockRewrite, apply_rewrite, plan_rewrite, probe_renormalisation, validate_rewrite
from moepass.compiler.subgraph import extract
from moepass.compiler.traceable import TRACEABLE_CLASSES
from moepass.compiler.validate import example_env, tolerance_for
from moepass.policies import PolicyError, ResolvedPolicy
from moepass.runtime.report import BlockReport

__all__ = [
    "BlockState", "GraphState", "Stage", "run_stages",
    "detect_stage", "resolve_stage", "validate_stage", "rewrite_stage", "finish_stage",
]

logger = logging.getLogger(__name__)

#: What makes a graph-broken experts loop traceable, as the report says it.
WHOLE_BLOCK_HINT = (
    "to rewrite the experts too: experts_implementation='grouped_mm' where the model offers it, "
    f"or moepass.make_traceable(model) before torch.compile for {', '.join(TRACEABLE_CLASSES)} and blocks whose "
    "experts are a ModuleList"
)
#: Blocks already warned about as compiled in pieces (each expert's graph would warn again).
_WARNED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


@dataclass
class BlockState:
    """One block as it moves through the stages."""

    item: BlockMatch | BlockRejection
    report: BlockReport
    resolved: ResolvedPolicy | None = None
    plan: BlockRewrite | None = None
    #: The nodes the rewrite stage inserted (empty until then).
    inserted: list[fx.Node] = field(default_factory=list)

    @property
    def open(self) -> bool:
        """Matched, not rewritten yet, and not left as it was by any stage."""
        return isinstance(self.item, BlockMatch) and not self.report.rewritten and not self.report.reason

    @property
    def rewritten(self) -> bool:
        return self.report.rewritten

    def leave(self, reason: str) -> None:
        """Leave the block as it was, saying why (report and log)."""
        self.report.reason = reason
        logger.warning("moepass: left %s as it was: %s", self.report.display_path, reason)

    def experts_node(self) -> fx.Node | None:
        """The fused ``moepass.experts`` node the rewrite inserted (None for the split form or router only)."""
        for node in self.inserted:
            if node.op == "call_function" and node.target is torch.ops.moepass.experts.default:
                return node
        return None


@dataclass
class GraphState:
    """One dynamo graph as the stages see it."""

    gm: fx.GraphModule
    example_inputs: list[Any]
    options: BackendOptions
    #: The experts' form: the split ops with autograd formulas (True) or the fused op (False).
    differentiable: bool
    flow: Dataflow | None = None
    #: Example values of the graph's nodes (real weights, random activations) for validation.
    env: dict[fx.Node, Any] = field(default_factory=dict)
    blocks: list[BlockState] = field(default_factory=list)
    #: Per-stage state that later stages of the same room read (e.g. the offload session).
    scratch: dict[str, Any] = field(default_factory=dict)

    def open_blocks(self) -> list[BlockState]:
        return [b for b in self.blocks if b.open]

    def rewritten_blocks(self) -> list[BlockState]:
        return [b for b in self.blocks if b.rewritten]


@dataclass(frozen=True)
class Stage:
    """A named stage; ``enabled`` decides from the options whether it runs for this compile."""

    name: str
    run: Callable[[GraphState], None]
    enabled: Callable[[BackendOptions], bool] = lambda options: True


def run_stages(state: GraphState, stages: tuple[Stage, ...]) -> GraphState:
    """Run ``stages`` in order over ``state``."""
    for stage in stages:
        if stage.enabled(state.options):
            logger.debug("moepass: stage %s", stage.name)
            stage.run(state)
    return state


def _block_report(item: BlockMatch | BlockRejection, policy: str, env: dict | None = None) -> BlockReport:
    if isinstance(item, BlockRejection):
        weight = (env or {}).get(item.anchor) if item.anchor is not None else None
        return BlockReport(
            anchor=weakref.ref(weight) if isinstance(weight, torch.Tensor) else None,
            anchor_name=source_path(item.anchor) or "" if item.anchor is not None else "",
            path=item.path,
            router=item.router_kind,
            dispatch=item.dispatch,
            num_experts=item.num_experts,
            top_k=item.top_k,
            rewritten=False,
            reason=item.reason,
            notes=list(item.notes),
        )
    spec = item.spec
    weight = (env or {}).get(item.router.weight)
    return BlockReport(
        anchor=weakref.ref(weight) if isinstance(weight, torch.Tensor) else None,
        anchor_name=source_path(item.router.weight) or "",
        path=spec.path,
        router=spec.router.kind,
        router_description=spec.router.description,
        dispatch=spec.experts.dispatch if spec.experts else "eager_loop",
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        rewritten=False,
        shared_experts=[s.description for s in spec.shared_experts],
        policy=policy,
        spec=spec,
    )


def detect_stage(state: GraphState) -> None:
    """Find the graph's MoE blocks (matches and rejections, each with its report).

    Also the MoE blocks running in eager Python around this graph, which
    holds their experts (dynamo left the block's frame: its router and experts
    never reach the backend together), so no block goes unreported; and a
    router compiled in a frame of its own is named by the block around it.
    """
    try:
        state.flow = Dataflow(state.gm.graph)
        found = find_moe_blocks(state.gm, state.flow)
    except Exception as error:  # a graph this code cannot read goes on unchanged, and the report says why
        found = [BlockRejection(path="", reason=internal_error_reason("reading the graph for", error))]
    state.env = example_env(state.gm, state.example_inputs)
    policy_name = state.options.policy.describe()
    state.blocks = [BlockState(item, _block_report(item, policy_name, state.env)) for item in found]
    around = {}
    try:  # reports only: a failure here says less, it changes nothing
        state.blocks.extend(_blocks_in_pieces(found, state.env, state.example_inputs))
        if any(isinstance(item, BlockMatch) and item.experts is None for item in found):
            around = {id(b.router_weight): b for b in blocks_compiled_in_pieces(state.example_inputs, router_too=True)}
    except Exception as error:
        logger.debug("moepass: blocks around this graph not read: %s", error)
    for block in state.blocks:
        item = block.item
        enclosing = around.get(id(state.env.get(item.router.weight))) if isinstance(item, BlockMatch) else None
        if enclosing is not None and not block.report.path:
            block.report.anchor_name = enclosing.router_weight_name
            item.router_recognised = True
        if isinstance(item, BlockRejection):
            logger.info("moepass: left %s as it was: %s", block.report.display_path, item.reason)


def _blocks_in_pieces(found: list, env: dict, example_inputs: list[Any]) -> list[BlockState]:
    """Blocks running in eager Python around this graph, which holds one of their experts (never silent).

    Named by the router's weight (its full path is found when the report is read).
    """
    known = {id(env.get(item.router.weight if isinstance(item, BlockMatch) else item.anchor)) for item in found}
    states = []
    for block in blocks_compiled_in_pieces(example_inputs):
        if id(block.router_weight) in known:
            continue
        where = f" ({block.reason})" if block.reason else ""
        if getattr(block.module, "_moepass_own_forward_in_training", False) and block.module.training:
            where += (
                "; moepass.make_traceable kept the block's own forward in train(), where its moepass form differs "
                "(router noise, dropout or an auxiliary loss): it is rewritten in eval()"
            )
        reason = (
            f"the experts loop graph-broke: dynamo left {type(block.module).__name__}.{block.method} to "
            f"eager Python{where}, so its router and its {block.shape.num_experts} experts "
            f"({block.shape.experts_name}) never reach the backend together — only each expert's MLP is "
            f"compiled, on its own; to rewrite the block: {GRAPH_BREAK_REMEDY}"
        )
        report = BlockReport(
            anchor=weakref.ref(block.router_weight), anchor_name=block.router_weight_name, path="", router="?",
            dispatch="eager_loop", num_experts=block.shape.num_experts, top_k=None, rewritten=False, reason=reason,
            in_pieces=True,
        )
        states.append(BlockState(BlockRejection(path="", reason=reason, dispatch="eager_loop"), report))
        if block.module not in _WARNED:
            _WARNED.add(block.module)
            logger.warning("moepass: left %s as it was: %s", type(block.module).__name__, reason)
    return states


def resolve_stage(state: GraphState) -> None:
    """Bind the policy to each block and plan its replacement (a policy that does not fit is an error)."""
    options = state.options
    policy_name = options.policy.describe()
    _check_layer_overrides(options.policy, [b.item for b in state.blocks])
    for block in state.open_blocks():
        try:
            item = probe_renormalisation(state.gm, state.flow, block.item, state.env)
        except Exception as failure:  # the block stays as it was; the report says why
            block.leave(f"could not run the block to read its router's weights: {type(failure).__name__}: {failure}")
            continue
        block.item = item
        block.report.spec = item.spec
        block.report.router_description = item.spec.router.description
        try:
            block.resolved = options.policy.resolve(item.spec)
        except PolicyError as error:
            raise PolicyError(f"policy {policy_name} does not fit block {block.report.display_path}: {error}") from None
        unsafe = _adaptive_router_only_unsafe(item, block.resolved)
        if unsafe:
            block.leave(
                f"the experts graph-broke away from their router, and policy {policy_name} cannot be applied to the "
                f"router alone: {unsafe}; to apply it: {GRAPH_BREAK_REMEDY}"
            )
            continue
        block.report.graph_before = _region_graph(item)
        try:
            block.plan = plan_rewrite(
                item, block.resolved, options.lowering, options.stats, state.env, state.differentiable,
                options.cpu_prepack,
            )
        except Exception as failure:  # nothing changed yet: the block stays as it was
            block.leave(internal_error_reason("planning the rewrite of", failure))


def validate_stage(state: GraphState) -> None:
    """Run each planned replacement against the original block on a random input; keep those that agree."""
    for block in state.open_blocks():
        try:
            error = validate_rewrite(state.gm, state.flow, block.plan, state.env)
        except Exception as failure:  # the block stays as it was; the report says why
            block.leave(f"validation could not run: {type(failure).__name__}: {failure}")
            continue
        block.report.validation_error = error
        dtype = example_value(block.item.region.x_base).dtype
        if not error <= tolerance_for(dtype):
            block.leave(
                f"rewrite does not reproduce the block: max relative error {error:.2e} "
                f"> {tolerance_for(dtype):.0e} on a random input"
            )


def rewrite_stage(state: GraphState) -> None:
    """Replace each validated block by ``moepass.route`` + ``moepass.experts``.

    Blocks' regions are disjoint, so the dataflow of the original graph stays
    valid for the blocks not rewritten yet.
    """
    for block in state.open_blocks():
        try:
            block.inserted = apply_rewrite(state.gm, state.flow, block.plan)
        except Mismatch as failure:
            block.leave(str(failure))
            continue
        entry, item = block.report, block.item
        entry.rewritten = True
        entry.graph_after = extract(block.inserted, [block.inserted[-1]])
        if item.experts is None:
            broke = graph_break_here() or next(
                (f"{type(b.module).__name__}.{b.method} ran in eager Python: {b.reason}"
                 for b in blocks_compiled_in_pieces(state.example_inputs, router_too=True) if b.reason), "")
            entry.notes.append(
                "router only: the experts loop graph-broke" + (f" ({broke})" if broke else "")
                + f", so its GEMMs run in eager PyTorch ({WHOLE_BLOCK_HINT})"
            )
            if item.empty_slots == "model_ids" and block.resolved.rule != "static":
                entry.notes.append(
                    "a dropped slot keeps the model's expert id at weight 0 (the code that reads the ids runs "
                    "outside this graph, or counts them): right numbers, but dropped slots save no compute"
                )
        elif item.spec.experts.stacked_from_modules and state.differentiable:
            entry.notes.append("expert weights stacked in the graph on every call (gradients reach each expert)")
        elif item.spec.experts.stacked_from_modules:
            entry.notes.append(
                "expert weights stacked at compile time (a snapshot: later changes to them are not seen; "
                "moepass.make_traceable(model) uses them in place)"
            )


def finish_stage(state: GraphState) -> None:
    """Check and recompile the graph."""
    state.gm.graph.lint()
    state.gm.recompile()


def _adaptive_router_only_unsafe(item: BlockMatch, resolved: ResolvedPolicy) -> str:
    """Why ``resolved`` (an adaptive rule) cannot be applied to a router whose experts are not in the graph ("" if it can)."""
    if item.experts is not None or item.empty_slots != "model_ids" or resolved.rule == "static":
        return ""
    if item.adaptive_unsafe:
        return item.adaptive_unsafe
    if not item.router_recognised:
        return (
            "its top-k is not recognisably an expert router from this graph (more classes than the hidden size, "
            "or no router-like module name), and no MoE block around it was found"
        )
    if resolved.k_max is not None and resolved.k_max > item.spec.top_k:
        return (
            f"k_max={resolved.k_max} is above the model's k={item.spec.top_k}, and the code that reads the ids "
            "expects that many slots"
        )
    return ""


def _check_layer_overrides(policy, found: list[BlockMatch | BlockRejection]) -> None:
    """A ``layers=`` key that names no block of this graph is an error (a typo would silently do nothing).

    Graphs of one block compiled on its own (path ``""``: the model graph-broke
    around it) cannot be matched by path and are not checked.
    """
    paths = [item.spec.path if isinstance(item, BlockMatch) else item.path for item in found]
    if not policy.layers or not paths or not all(paths):
        return
    indices = {str(layer_index_of(path)) for path in paths}
    unknown = sorted(key for key in policy.layers if key not in paths and key not in indices)
    if unknown:
        raise PolicyError(
            f"layers= names no MoE block of this model: {', '.join(map(repr, unknown))}; the blocks are "
            f"{', '.join(paths)} (keys are block paths or layer indices such as {sorted(indices, key=int)[0]!r})"
        )


def _region_graph(item: BlockMatch) -> fx.Graph:
    """The block's original nodes as a standalone graph (for reports)."""
    outputs = [item.region.combine] if item.experts is not None else [item.router.ids, item.router.weights_end]
    return extract(item.region.nodes, outputs)
