"""MLIR export of rewritten MoE models through torch-mlir, verified by running the result in IREE.

::

    model ─► capture + rewrite + fuse   shared with the ONNX export (moepass.exports.onnx.rewrite_for_export):
                                        one moepass.moe_block per block, tagged with its path
          ─► torch.export + decompose   moe_block → moepass.route's aten ops + the experts in aten
                                        ("grouped": rows per expert, dropped slots cost nothing;
                                         "dense": every expert on every token, static shapes)
          ─► torch-mlir import          linalg-on-tensors | stablehlo | tosa | torch;
                                        each block's ops at loc("moepass:<block path>"(...))
          ─► IREE (llvm-cpu)            compiled and run against the torch model before writing

The public entry point is :func:`moepass.export_mlir`.
"""

from moepass.lowering.mlir.decompose import FORMS, decomposition_table, experts_dense, experts_grouped, moe_block_aten
from moepass.lowering.mlir.importer import (
    BLOCK_KEY,
    OUTPUT_TYPES,
    LoweringFailure,
    block_of_location,
    import_program,
    prepare_program,
)
from moepass.lowering.mlir.iree import IREE_INPUT_TYPES, IreeCompileError, IreeModule, compile_for_cpu
from moepass.lowering.mlir.pipeline import tag_blocks, to_mlir

__all__ = [
    "BLOCK_KEY",
    "FORMS",
    "IREE_INPUT_TYPES",
    "OUTPUT_TYPES",
    "IreeCompileError",
    "IreeModule",
    "LoweringFailure",
    "block_of_location",
    "compile_for_cpu",
    "decomposition_table",
    "experts_dense",
    "experts_grouped",
    "import_program",
    "moe_block_aten",
    "prepare_program",
    "tag_blocks",
    "to_mlir",
]
