"""The cpu_kernels stage: what the CPU lowering runs for each rewritten block on this machine, and why.

::

    detect ─► resolve ─► validate ─► rewrite ─► cpu_kernels ─► finish

For each block the rewrite stage wrote as the fused ``moepass.experts`` op
with CPU tensors (not offloaded, not the split form a graph that will be
differentiated gets), the stage asks :func:`moepass.lowering.cpu_tuning.prepare_block`
for the block shape's entries in this machine's tables — which kernel runs
each projection at each row count, and which path (moepass's kernels or the
model's own ``grouped_mm`` GEMMs) the block takes at each row count.  Where
no table holds them and tuning is allowed (``options={"cpu_tuning": ...}``,
``$MOEPASS_TUNING``), they are measured now on the block's own weights,
within a budget, and cached for later compiles and processes.  The graph is
not changed: the op reads the tables when it runs.  The block's report gets
the answer (:attr:`moepass.runtime.report.BlockReport.cpu_kernels`).  A
measurement that fails is a lost choice, not a wrong answer: the block takes
the moepass path, with a warning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from moepass.compiler.dataflow import example_value
from moepass.compiler.plan.expert_parallel import local_experts
from moepass.compiler.stages import BlockState, GraphState
from moepass.runtime.ops import parse_experts_config

__all__ = ["KERNEL_CHOICES", "cpu_kernels_stage"]

logger = logging.getLogger(__name__)

#: ``GraphState.scratch`` key: False skips the stage (exporters, whose experts run elsewhere).
KERNEL_CHOICES = "cpu_kernels.enabled"


def _weights(block: BlockState, env: dict[fx.Node, Any]) -> dict[str, Any] | None:
    """The block's expert weights as tensors (what validation resolved, else the graph's inputs)."""
    plan = block.plan
    weights = plan.weight_values or {k: env.get(v) if isinstance(v, fx.Node) else v for k, v in plan.weights.items()}
    if not all(isinstance(weights.get(k), torch.Tensor) for k in ("w1", "w2")):
        return None
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in weights.items()}


def cpu_kernels_stage(state: GraphState) -> None:
    """Look up (or measure) each fused CPU block's kernel and path choices; record them in its report."""
    if not state.scratch.get(KERNEL_CHOICES, True):
        return
    from moepass.lowering import resolve_lowering
    from moepass.lowering.cpu_tuning import prepare_block

    options = state.options
    for block in state.rewritten_blocks():
        if block.experts_node() is None:  # router only, or the split form (differentiated)
            continue
        item = block.item
        x = example_value(item.region.x_base)
        if not isinstance(x, torch.Tensor) or resolve_lowering(options.lowering, x.device) != "cpu":
            continue
        weights = _weights(block, state.env)
        if weights is None or weights["w1"].dtype != x.dtype:
            continue
        path = item.path or "<root>"
        spec, top_k = item.spec.experts, item.spec.top_k
        config = parse_experts_config(block.experts_node().args[7])
        if config.expert_parallel:  # this rank's experts, run top-1 on the rows it receives
            spec, weights = local_experts(config, weights)
            top_k = 1
        try:
            with torch.no_grad():
                block.report.cpu_kernels = prepare_block(spec, weights, top_k, options.cpu_prepack,
                                                         options.cpu_tuning, path)
        except (RuntimeError, ValueError, OSError) as failure:  # a lost choice, not a wrong answer
            logger.warning("moepass: could not measure the CPU kernels of %s (%s: %s): it takes the moepass path",
                           path, type(failure).__name__, failure)
