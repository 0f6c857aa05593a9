"""The ``adaptive_moe`` dynamo backend.

::

    torch.compile(model, backend="adaptive_moe", options={"policy": "top_p", "p": 0.4})

For each graph dynamo hands over, the passes run in this order (the whole
pipeline is :func:`optimize_graph`):

1. ``detect``   — find MoE blocks (:func:`moepass.compiler.detect.find_moe_blocks`);
2. ``resolve``  — bind the policy to each block (errors name the block);
3. ``validate`` — run each planned rewrite against the original block;
4. ``rewrite``  — replace validated blocks by ``moepass.route`` + ``moepass.experts``;
5. ``report``   — record what was found and done (:mod:`moepass.runtime.report`);

then the graph goes to the inner compiler (Inductor by default).  A graph
without MoE blocks is passed on unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, example_value
from moepass.compiler.detect import GRAPH_BREAK_REMEDY, BlockMatch, BlockRejection, find_moe_blocks, layer_index_of
from moepass.compiler.graph_breaks import blocks_compiled_in_pieces, graph_break_here
from moepass.compiler.detect.common import Mismatch, source_path
from moepass.compiler.options import BackendOptions
from moepass.compiler.rewrite import apply_rewrite, plan_rewrite, probe_renormalisation, validate_rewrite
from moepass.compiler.subgraph import extract
from moepass.compiler.traceable import TRACEABLE_CLASSES
from moepass.compiler.validate import example_env, tolerance_for
from moepass.policies import PolicyError
from moepass.runtime.report import BlockReport, Report, record_graph

__all__ = ["adaptive_moe", "optimize_graph", "compile_inner", "graph_needs_gradients"]


#: What makes a graph-broken experts loop traceable, as the report says it.
_WHOLE_BLOCK_HINT = (
    "to rewrite the experts too: experts_implementation='grouped_mm' where the model offers it, "
    f"or moepass.make_traceable(model) before torch.compile for {', '.join(TRACEABLE_CLASSES)} and blocks whose "
    "experts are a ModuleList"
)
#: Blocks already warned about as compiled in pieces (each expert's graph would warn again).
_WARNED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()

logger = logging.getLogger(__name__)


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


def graph_needs_gradients(example_inputs: list[Any]) -> bool:
    """Whether a graph compiled now will be differentiated.

    Dynamo guards on grad mode, so the mode at compile time is the mode of
    every call of this graph; with it on and any input requiring grad
    (a trainable parameter, say), autograd will run through the graph.
    """
    return torch.is_grad_enabled() and any(
        isinstance(value, torch.Tensor) and value.requires_grad for value in example_inputs
    )


def optimize_graph(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: BackendOptions,
    differentiable: bool | None = None,
) -> tuple[fx.GraphModule, list[BlockReport]]:
    """Detect, validate and rewrite the MoE blocks of one dynamo graph in place.

    ``differentiable`` chooses the experts' form: the split form with autograd
    formulas (True) or the fused op (False); None decides from the grad mode
    and the inputs (:func:`graph_needs_gradients`).
    """
    if differentiable is None:
        differentiable = graph_needs_gradients(example_inputs)
    flow = Dataflow(gm.graph)
    found = find_moe_blocks(gm, flow)
    policy_name = options.policy.describe()
    reports = []
    env = example_env(gm, example_inputs)
    offload = None
    if options.offload is not None:  # expert weights in a store (moepass.runtime.offload)
        from moepass.runtime.offload.graph import GraphOffload

        offload = GraphOffload.start(options.offload)
    _check_layer_overrides(options.policy, found)
    reports.extend(_blocks_in_pieces(found, env, example_inputs))
    # a router compiled in a frame of its own (its block runs in eager Python around it): the block names it
    around = {id(b.router_weight): b for b in blocks_compiled_in_pieces(example_inputs, router_too=True)} if any(
        isinstance(item, BlockMatch) and item.experts is None for item in found) else {}
    for item in found:
        entry = _block_report(item, policy_name, env)
        reports.append(entry)
        enclosing = around.get(id(env.get(item.router.weight))) if isinstance(item, BlockMatch) else None
        if enclosing is not None and not entry.path:
            entry.anchor_name = enclosing.router_weight_name
            item.router_recognised = True
        if isinstance(item, BlockRejection):
            logger.info("moepass: left %s as it was: %s", entry.display_path, item.reason)
            continue
        try:
            item = probe_renormalisation(gm, flow, item, env)
        except Exception as failure:  # the block stays as it was; the report says why
            entry.reason = f"could not run the block to read its router's weights: {type(failure).__name__}: {failure}"
            logger.warning("moepass: left %s as it was: %s", entry.display_path, entry.reason)
            continue
        entry.spec = item.spec
        entry.router_description = item.spec.router.description
        try:
            resolved = options.policy.resolve(item.spec)
        except PolicyError as error:
            raise PolicyError(f"policy {policy_name} does not fit block {entry.display_path}: {error}") from None
        unsafe = _adaptive_router_only_unsafe(item, resolved)
        if unsafe:
            entry.reason = (
                f"the experts graph-broke away from their router, and policy {policy_name} cannot be applied to the "
                f"router alone: {unsafe}; to apply it: {GRAPH_BREAK_REMEDY}"
            )
            logger.warning("moepass: left %s as it was: %s", entry.display_path, entry.reason)
            continue
        entry.graph_before = _region_graph(item)
        plan = plan_rewrite(item, resolved, options.lowering, options.stats, env, differentiable, options.cpu_prepack)
        if offload is not None:
            plan = offload.plan(item, plan, env, entry)
        if options.validate:
            try:
                with offload.validating(item, env) if offload is not None else contextlib.nullcontext():
                    error = validate_rewrite(gm, flow, plan, env)
            except Exception as failure:  # the block stays as it was; the report says why
                entry.reason = f"validation could not run: {type(failure).__name__}: {failure}"
                logger.warning("moepass: left %s as it was: %s", entry.display_path, entry.reason)
                continue
            entry.validation_error = error
            dtype = example_value(item.region.x_base).dtype
            if not error <= tolerance_for(dtype):
                entry.reason = (
                    f"rewrite does not reproduce the block: max relative error {error:.2e} "
                    f"> {tolerance_for(dtype):.0e} on a random input"
                )
                logger.warning("moepass: left %s as it was: %s", entry.display_path, entry.reason)
                continue
        try:
            inserted = apply_rewrite(gm, flow, plan)
        except Mismatch as failure:
            entry.reason = str(failure)
            continue
        entry.rewritten = True
        entry.graph_after = extract(inserted, [inserted[-1]])
        if item.experts is None:
            broke = graph_break_here() or next(
                (f"{type(b.module).__name__}.{b.method} ran in eager Python: {b.reason}"
                 for b in blocks_compiled_in_pieces(example_inputs, router_too=True) if b.reason), "")
            entry.notes.append(
                "router only: the experts loop graph-broke" + (f" ({broke})" if broke else "")
                + f", so its GEMMs run in eager PyTorch ({_WHOLE_BLOCK_HINT})"
            )
            if item.empty_slots == "model_ids" and resolved.rule != "static":
                entry.notes.append(
                    "a dropped slot keeps the model's expert id at weight 0 (the code that reads the ids runs "
                    "outside this graph, or counts them): right numbers, but dropped slots save no compute"
                )
        elif item.spec.experts.stacked_from_modules and differentiable:
            entry.notes.append("expert weights stacked in the graph on every call (gradients reach each expert)")
        elif item.spec.experts.stacked_from_modules:
            entry.notes.append(
                "expert weights stacked at compile time (a snapshot: later changes to them are not seen; "
                "moepass.make_traceable(model) uses them in place)"
            )
        # blocks' regions are disjoint: the dataflow of the original graph
        # stays valid for the blocks not rewritten yet
    if offload is not None:
        offload.finish(gm, example_inputs, reports)
    gm.graph.lint()
    gm.recompile()
    return gm, reports


def _blocks_in_pieces(found: list, env: dict, example_inputs: list[Any]) -> list[BlockReport]:
    """Reports for MoE blocks running in eager Python around this graph, which holds one of their experts.

    Dynamo skipped the block's frame (a graph break inside its experts loop)
    or broke it apart: its router and its experts never reach the backend
    together.  Named by the router's weight (its full path is found when the
    report is read); never silent.
    """
    known = {id(env.get(item.router.weight if isinstance(item, BlockMatch) else item.anchor)) for item in found}
    reports = []
    for block in blocks_compiled_in_pieces(example_inputs):
        if id(block.router_weight) in known:
            continue
        where = f" ({block.reason})" if block.reason else ""
        if getattr(block.module, "_moepass_own_forward_in_training", False) and block.module.training:
            where += (
                "; moepass.make_traceable kept the block's own forward in train(), where its moepass form differs "
                "(router noise, dropout or an auxiliary loss): it is rewritten in eval()"
            )
        reports.append(
            BlockReport(
                anchor=weakref.ref(block.router_weight),
                anchor_name=block.router_weight_name,
                path="",
                router="?",
                dispatch="eager_loop",
                num_experts=block.shape.num_experts,
                top_k=None,
                rewritten=False,
                reason=(
                    f"the experts loop graph-broke: dynamo left {type(block.module).__name__}.{block.method} to "
                    f"eager Python{where}, so its router and its {block.shape.num_experts} experts "
                    f"({block.shape.experts_name}) never reach the backend together — only each expert's MLP is "
                    f"compiled, on its own; to rewrite the block: {GRAPH_BREAK_REMEDY}"
                ),
                in_pieces=True,
            )
        )
        if block.module not in _WARNED:
            _WARNED.add(block.module)
            logger.warning("moepass: left %s as it was: %s", type(block.module).__name__, reports[-1].reason)
    return reports


def _adaptive_router_only_unsafe(item: BlockMatch, resolved) -> str:
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


def compile_inner(gm: fx.GraphModule, example_inputs: list[Any], options: BackendOptions) -> Callable:
    """Hand the (rewritten) graph to the inner compiler."""
    if options.inner == "eager":
        return gm.forward
    if options.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    if options.mode and options.mode != "default":
        patches = torch._inductor.list_mode_options(options.mode)
    return compile_fx(gm, example_inputs, config_patches=patches)


def adaptive_moe(gm: fx.GraphModule, example_inputs: list[Any], options: dict | None = None, mode: str | None = None, **unused: Any) -> Callable:
    """The ``adaptive_moe`` backend: rewrite MoE blocks, then compile with the inner compiler.

    Args:
        gm: the torch-level graph dynamo captured.
        example_inputs: its example inputs (real tensors, SymInts' hints).
        options: see :mod:`moepass.compiler.options`.
        mode: torch.compile's mode, forwarded to Inductor.
    """
    if unused:
        raise TypeError(f"adaptive_moe got unexpected arguments {sorted(unused)}")
    parsed = BackendOptions.parse(options, mode=mode)
    gm, blocks = optimize_graph(gm, example_inputs, parsed)
    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    report: Report = record_graph(blocks, params, parsed.policy.describe(), parsed.inner, parsed.lowering)
    if parsed.offload is not None:
        from moepass.runtime.offload.session import session_for

        report.offload = session_for(parsed.offload)
    logger.info("%s", report)
    return compile_inner(gm, example_inputs, parsed)
