"""A fused, rewritten model → an MLIR module: torch.export, decomposition, torch-mlir import.

::

    fused GraphModule (one moepass.moe_block per block, meta["custom"]["moepass_block"] = path)
        ─► torch.export.export                 (the captured dynamic axes, if any)
        ─► run_decompositions(table)           moe_block → route composite + experts form (aten)
        ─► prepare_program                     sorted top-k; the block's own size asserts dropped
        ─► import_program(output_type)         torch-mlir; block ops at loc("moepass:<path>"(...))
"""

from __future__ import annotations

import logging
import time

import torch
from moepass.lowering.mlir.decompose import decomposition_table
from moepass.lowering.mlir.importer import BLOCK_KEY, LoweringFailure, import_program, prepare_program

from moepass.exports.errors import MlirExportError
from moepass.runtime.ops import parse_route_config

__all__ = ["tag_blocks", "to_mlir"]

logger = logging.getLogger(__name__)


def tag_blocks(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """Mark every ``moe_block`` node with its block path (survives torch.export); returns (path, route config)."""
    blocks = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.moepass.moe_block.default:
            route_config = node.args[7]
            path = parse_route_config(route_config).block
            node.meta.setdefault("custom", {})[BLOCK_KEY] = path or "<root>"
            blocks.append((path, route_config))
    return blocks


def _first_lines(error: BaseException, count: int = 3) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:count]) or type(error).__name__


def to_mlir(captured, output_type: str, form: str, func_name: str = "main"):
    """Export, decompose and import a captured, fused model; returns (MLIR module, [(path, route config)]).

    Raises:
        MlirExportError: torch.export fails, or an op does not lower (naming the op and its block).
    """
    blocks = tag_blocks(captured.gm)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(captured.gm, captured.args, dynamic_shapes=captured.dynamic_shapes)
            program = program.run_decompositions(decomposition_table(form, output_type))
    except Exception as error:  # guards, data-dependent code, constraint violations
        raise MlirExportError(f"torch.export failed on the rewritten model: {_first_lines(error, 4)}") from error
    prepare_program(program)
    try:
        module = import_program(program, output_type, func_name)
    except LoweringFailure as failure:
        if not failure.diagnostics or not failure.diagnostics[0][0]:
            raise MlirExportError(f"the model did not lower to {output_type} ({failure}; no op was named)") from None
        where = f"block {failure.block}" if failure.block else "outside the MoE blocks"
        op = f"op {failure.op}" if failure.op else "an op"
        raise MlirExportError(f"{where}: {op} did not lower to {output_type} ({failure})") from None
    logger.info("imported with torch-mlir to %s in %.1f s (experts form %s, %d blocks)", output_type,
                time.perf_counter() - started, form, len(blocks))
    return module, blocks
