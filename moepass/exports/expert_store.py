"""Writing a model's expert store: find its MoE blocks the way the backend does, save their experts.

An export (it runs the compiler's detection on a model and writes files), so it
lives here rather than in :mod:`moepass.runtime.offload`, which reads the store
back at run time and never imports the compiler.

::

    model, example ──► torch.compile(model, backend=<capture>)(example)   (one forward, nothing rewritten)
                          detect MoE blocks (moepass.compiler.detect) in every graph
                          each block's w1/w2/b1/b2 = the tensors moepass.experts would receive
                   ──► write_store(blocks, out)                            (moepass.runtime.offload.store)

Using the backend's own detection means the store holds exactly the blocks
(and the exact tensors) that ``options={"offload": ...}`` will read back.
Blocks whose experts are separate modules, or whose experts loop graph-broke,
are reported and skipped: offloading needs stacked expert parameters.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from moepass.runtime.offload.store import BlockWeights, StoreManifest, write_store

__all__ = ["capture_expert_weights", "write_model_store"]

logger = logging.getLogger(__name__)


def _call(model: Any, example_inputs: Any) -> Any:
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    raise TypeError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments, "
        f"got {type(example_inputs).__name__}"
    )


def _weight_value(node: fx.Node | None, env: dict[fx.Node, Any]) -> Any:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op not in ("placeholder", "get_attr"):
        return False
    if node.op == "placeholder":
        return env.get(node)
    target: Any = node.graph.owning_module
    for part in node.target.split("."):
        target = getattr(target, part, None)
    return target


def capture_expert_weights(model: torch.nn.Module, example_inputs: Any) -> tuple[list[BlockWeights], list[str]]:
    """Each MoE block's stacked expert weights, found by running ``model`` once on ``example_inputs``.

    Returns (blocks in layer order, one note per block that cannot be offloaded and why).
    """
    from moepass.compiler.dataflow import Dataflow
    from moepass.compiler.detect import BlockRejection, find_moe_blocks
    from moepass.compiler.validate import example_env
    from moepass.runtime.report import _natural_key

    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    captured: dict[str, BlockWeights] = {}
    skipped: dict[str, str] = {}

    def backend(gm: fx.GraphModule, example: list[Any]):
        env = example_env(gm, example)
        for item in find_moe_blocks(gm, Dataflow(gm.graph)):
            if isinstance(item, BlockRejection):
                skipped[item.path] = f"not an MoE block the backend rewrites: {item.reason}"
                continue
            path = item.path
            if item.experts is None:
                skipped[path] = "its experts loop graph-broke (router only): use experts_implementation='grouped_mm'"
                continue
            if item.spec.experts.stacked_from_modules:
                skipped[path] = "its experts are separate modules: offloading needs stacked expert parameters"
                continue
            tensors, params = {}, {}
            for name in ("w1", "w2", "b1", "b2"):
                value = _weight_value(getattr(item.experts, name), env)
                if value is False or (value is not None and not isinstance(value, torch.Tensor)):
                    skipped[path] = f"its {name} is computed in the graph, not a parameter"
                    break
                tensors[name] = value.detach() if value is not None else None
                params[name] = names.get(id(value), "") if value is not None else ""
            else:
                captured[path] = BlockWeights(path, tensors, params, dataclasses.asdict(item.spec.experts))
                skipped.pop(path, None)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        _call(compiled, example_inputs)
    notes = [f"{path or '<root>'}: {why}" for path, why in sorted(skipped.items()) if path not in captured]
    blocks = sorted(captured.values(), key=lambda b: _natural_key(b.path))
    return blocks, notes


def write_model_store(
    model: torch.nn.Module, example_inputs: Any, out: str | Path, overwrite: bool = False, source: str = ""
) -> tuple[StoreManifest, list[str]]:
    """Write the expert store of ``model`` to ``out`` (see the module docstring).

    Returns (the manifest, notes on blocks that were skipped).

    Raises:
        ExpertStoreError: no block could be offloaded, or ``out`` exists (without ``overwrite``).
    """
    blocks, notes = capture_expert_weights(model, example_inputs)
    for note in notes:
        logger.warning("moepass offload: skipped %s", note)
    manifest = write_store(blocks, out, source=source or type(model).__name__, overwrite=overwrite)
    return manifest, notes
