"""Exports of a model with adaptive-k routing: ONNX, onnxruntime-genai, MLIR."""
