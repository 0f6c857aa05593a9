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

**Quantized stores** (``experts_dtype="int8" | "int4"``): each block's two
projections are quantized by round-to-nearest, exactly as the backend's
quantize stage does (:func:`moepass.quantize.quantize_rtn`), and stored in the
packed layout — ``w1.codes`` / ``w1.scales`` / ``w1.zeros`` per expert, 2× (int8)
or ~3.6× (int4 g64) fewer bytes per expert read on a miss than bfloat16; int4
codes in the row-block order of this machine's ATen CPU kernels, so a load is
used as read.  ``low_dtype`` adds a lower-precision copy of every expert in a
file of its own (HOBBIT: read instead of the full expert on a cache miss of a
slot of low routing weight, ``options={"offload": {..., "low_precision_below": w}}``).
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

__all__ = ["capture_expert_weights", "quantized_block_weights", "write_model_store"]

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


def quantized_block_weights(weights: BlockWeights, scheme) -> BlockWeights:
    """``weights`` with its two projections in the packed layout of ``scheme`` (biases as they are)."""
    from moepass.lowering.cpu_quantized import aten_int4_row_block
    from moepass.quantize.layout import pack_int4_row_blocks, quantize_rtn

    spec = dict(weights.spec)
    transposed = bool(spec.get("transposed", False))
    tensors: dict[str, torch.Tensor | None] = {}
    row_block = 0
    for name in ("w1", "w2"):
        layout = quantize_rtn(weights.tensors[name], scheme, transposed)
        codes = layout.codes
        if scheme.bits == 4:
            block = aten_int4_row_block(*layout.shape[1:])
            row_block = block or 0
            if block:
                codes = pack_int4_row_blocks(layout.integer_codes(), block)
        tensors[f"{name}.codes"] = codes
        tensors[f"{name}.scales"] = layout.scales
        if layout.zeros is not None:
            tensors[f"{name}.zeros"] = layout.zeros
    tensors["b1"], tensors["b2"] = weights.tensors.get("b1"), weights.tensors.get("b2")
    spec["transposed"] = False  # the packed layout is [E, out, in]
    params = {f"{name}.codes": weights.params.get(name, "") for name in ("w1", "w2")}
    params.update({name: weights.params.get(name, "") for name in ("b1", "b2")})
    return BlockWeights(weights.path, tensors, params, spec, {**scheme.to_dict(), "row_block": row_block})


def write_model_store(
    model: torch.nn.Module, example_inputs: Any, out: str | Path, overwrite: bool = False, source: str = "",
    experts_dtype: str | None = None, group_size: int | None = None, low_dtype: str | None = None,
    low_group_size: int | None = None,
) -> tuple[StoreManifest, list[str]]:
    """Write the expert store of ``model`` to ``out`` (see the module docstring).

    Args:
        experts_dtype, group_size: quantize the stored experts (``int8`` | ``int4``), as the backend option.
        low_dtype, low_group_size: also store a lower-precision copy of every expert (HOBBIT).

    Returns (the manifest, notes on blocks that were skipped).

    Raises:
        ExpertStoreError: no block could be offloaded, or ``out`` exists (without ``overwrite``).
        moepass.quantize.QuantizeError: a dtype or group size the experts cannot take.
    """
    from moepass.quantize.scheme import QuantizeError, parse_scheme

    scheme = parse_scheme(experts_dtype, group_size)
    low_scheme = parse_scheme(low_dtype, low_group_size)
    if low_dtype is not None and low_scheme is None:
        raise QuantizeError(f"low_dtype must be 'int8' or 'int4', got {low_dtype!r}")
    blocks, notes = capture_expert_weights(model, example_inputs)
    for note in notes:
        logger.warning("moepass offload: skipped %s", note)
    low = [quantized_block_weights(b, low_scheme) for b in blocks] if low_scheme is not None else []
    if scheme is not None:
        blocks = [quantized_block_weights(b, scheme) for b in blocks]
    manifest = write_store(blocks, out, source=source or type(model).__name__, overwrite=overwrite, low=low)
    return manifest, notes
