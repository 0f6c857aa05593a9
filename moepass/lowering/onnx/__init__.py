"""ONNX export of rewritten MoE models: one ``moepass.AdaptiveMoE`` node per block.

::

    model ─► capture      one torch-level graph (torch._dynamo.export), the model's parameter names
          ─► rewrite      moepass.compiler.backend.optimize_graph: detect, validate, route + experts ops
          ─► fuse         route + experts → one opaque moepass.moe_block per block
          ─► translate    torch.export → torch.onnx; moe_block ↦ moepass.AdaptiveMoE node
          ─► functions    each node defined by a model-local function for the target:
                            routing  = torch.onnx export of moepass.route (same code as torch)
                            experts  = ort: com.microsoft.MoE, k per token | portable: standard ops

The public entry point is :func:`moepass.export_onnx`.
"""

from moepass.lowering.onnx.capture import CapturedModel, capture_model, default_dynamic_shapes
from moepass.lowering.onnx.functions import FALLBACKS, TARGETS, BlockFunction, block_nodes, define_blocks
from moepass.lowering.onnx.fuse import FusedBlock, fuse_blocks
from moepass.lowering.onnx.layouts import (
    DEFAULT_ORT_LAYOUTS,
    GEMM_MIN_EXPERT_BYTES,
    ORT_LAYOUTS,
    PROVIDERS,
    default_ort_layout,
)
from moepass.lowering.onnx.translate import DOMAIN, OP_TYPE, to_onnx

from moepass.exports.errors import OnnxExportError

__all__ = [
    "DEFAULT_ORT_LAYOUTS",
    "DOMAIN",
    "FALLBACKS",
    "GEMM_MIN_EXPERT_BYTES",
    "OP_TYPE",
    "ORT_LAYOUTS",
    "PROVIDERS",
    "TARGETS",
    "BlockFunction",
    "CapturedModel",
    "FusedBlock",
    "OnnxExportError",
    "block_nodes",
    "capture_model",
    "default_dynamic_shapes",
    "default_ort_layout",
    "define_blocks",
    "fuse_blocks",
    "to_onnx",
]
