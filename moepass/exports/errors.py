"""The errors of the exports, in a leaf module: the lowerings (``moepass.lowering.onnx``,
``moepass.lowering.mlir``) raise them without importing the export modules that import them."""


class OnnxExportError(ValueError):
    """The model cannot be exported faithfully; the message names the block (if any) and why."""


class MlirExportError(ValueError):
    """The model cannot be exported to MLIR faithfully; the message names the block (if any) and why."""
