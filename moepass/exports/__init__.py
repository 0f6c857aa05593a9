"""Exports of a model with adaptive-k routing: ONNX, onnxruntime-genai, MLIR, an expert store.

:mod:`~moepass.exports.onnx` (``moepass.export_onnx``; its
``rewrite_for_export`` is the capture-and-rewrite step the others share),
:mod:`~moepass.exports.genai`, :mod:`~moepass.exports.mlir` and
:mod:`~moepass.exports.expert_store` (the files expert offloading reads).  The
graph-to-format translations live in ``moepass.lowering.onnx`` and
``moepass.lowering.mlir``; they raise the errors of :mod:`~moepass.exports.errors`.

May import: :mod:`moepass.compiler`, :mod:`moepass.runtime`, :mod:`moepass.policies`,
``moepass.lowering``, :mod:`moepass.quantize`.
"""
