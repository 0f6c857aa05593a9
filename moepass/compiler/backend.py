"""The ``adaptive_moe`` dynamo backend.

::

    torch.compile(model, backend="adaptive_moe", options={"policy": "top_p", "p": 0.4})

For each graph dynamo hands over, the stages of :data:`STAGES` run in this
order (:func:`optimize_graph`; the state they share is
:class:`moepass.compiler.stages.GraphState`):

1. ``detect``   — find MoE blocks (:func:`moepass.compiler.detect.find_moe_blocks`);
2. ``resolve``  — bind the policy to each block and plan its replacement (errors name the block);
3. ``validate`` — run each planned replacement against the original block;
4. ``rewrite``  — replace validated blocks by ``moepass.route`` + ``moepass.experts``;
5. plan stages  — change how rewritten blocks' experts run (:mod:`moepass.compiler.plan`):
   ``quantize`` (int8 / int4 experts; its ``quantize_inputs`` stage runs before validation,
   to give it weights an earlier compile released); ``offload`` (weights in an expert store;
   its ``offload_inputs`` stage likewise); ``expert_parallel``
   (experts split over ranks, only kept slots exchanged; its ``expert_parallel_inputs``
   stage runs before validation, which then runs each rank's experts alone);
   ``cpu_kernels`` (what the CPU lowering runs for each block on this machine, measured
   where no table holds it);
6. ``finish``   — lint and recompile the graph;

then the report records what was found and done (:mod:`moepass.runtime.report`)
and the graph goes to the inner compiler (Inductor by default).  A graph
without MoE blocks is passed on unchanged.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

from moepass.compiler.options import BackendOptions
from moepass.compiler.plan.expert_parallel import expert_parallel_inputs_stage, expert_parallel_stage
from moepass.compiler.plan.cpu_kernels import KERNEL_CHOICES, cpu_kernels_stage
from moepass.compiler.plan.offload import offload_inputs_stage, offload_stage
from moepass.compiler.plan.quantize import has_standins, quantize_inputs_stage, quantize_stage
from moepass.compiler.stages import (
    GraphState,
    Stage,
    detect_stage,
    finish_stage,
    resolve_stage,
    rewrite_stage,
    run_stages,
    validate_stage,
)
from moepass.runtime.expert_parallel import without_communication
from moepass.runtime.report import BlockReport, Report, record_graph

__all__ = ["adaptive_moe", "optimize_graph", "compile_inner", "graph_needs_gradients", "STAGES"]

logger = logging.getLogger(__name__)


def _offloading(options: BackendOptions) -> bool:
    return options.offload is not None


def _quantizing(options: BackendOptions) -> bool:
    """``experts_dtype`` given, or quantized checkpoints' experts adapted (stand-ins exist); in memory only:
    with offloading, the store holds the quantized experts (the offload stage)."""
    return (options.quantize is not None or has_standins()) and options.offload is None


#: The backend's stages, in order (see the module docstring).
STAGES: tuple[Stage, ...] = (
    Stage("detect", detect_stage),
    Stage("resolve", resolve_stage),
    Stage("quantize_inputs", quantize_inputs_stage, enabled=_quantizing),
    Stage("offload_inputs", offload_inputs_stage, enabled=_offloading),
    Stage("expert_parallel_inputs", expert_parallel_inputs_stage),
    Stage("validate", validate_stage, enabled=lambda options: options.validate),
    Stage("rewrite", rewrite_stage),
    Stage("quantize", quantize_stage, enabled=_quantizing),
    Stage("offload", offload_stage, enabled=_offloading),
    Stage("expert_parallel", expert_parallel_stage),
    Stage("cpu_kernels", cpu_kernels_stage, enabled=lambda options: not _offloading(options)),
    Stage("finish", finish_stage),
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
    kernel_choices: bool = True,
) -> tuple[fx.GraphModule, list[BlockReport]]:
    """Run :data:`STAGES` over one dynamo graph, in place; returns it and its blocks' reports.

    ``differentiable`` chooses the experts' form: the split form with autograd
    formulas (True) or the fused op (False); None decides from the grad mode
    and the inputs (:func:`graph_needs_gradients`).  ``kernel_choices``: run
    the ``cpu_kernels`` stage (look up, or measure, what the CPU lowering runs
    for each block); exporters, whose experts run elsewhere, say False.
    """
    if differentiable is None:
        differentiable = graph_needs_gradients(example_inputs)
    state = GraphState(gm=gm, example_inputs=example_inputs, options=options, differentiable=differentiable)
    state.scratch[KERNEL_CHOICES] = kernel_choices
    with without_communication():  # nothing the stages run may wait on another rank
        run_stages(state, STAGES)
    return state.gm, [block.report for block in state.blocks]


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
