"""moepass: adaptive-k routing for Mixture-of-Experts models, as a torch.compile pass.

::

    fast = torch.compile(model, backend="adaptive_moe", options={"policy": "top_p", "p": 0.4})
    fast(input_ids)
    report = moepass.report(fast)                      # str(report) is a table
    moepass.inspect(model, example, policy="top_p", p=0.4).save("report/")   # HTML, text, JSON
    moepass.export_onnx(model, (input_ids,), "model.onnx", policy="top_p", p=0.4)  # ONNX Runtime
    moepass.export_mlir(model, (input_ids,), "model.mlir", policy="top_p", p=0.4)  # torch-mlir, run in IREE
    moepass.export_genai(model, "model-genai/", policy="top_p", p=0.4)  # onnxruntime-genai, with the KV cache
    moepass.make_traceable(model)   # before compiling: experts loops that graph-break (LongCat-Flash) become moepass ops
    moepass.adapt_quantized_experts(model)   # before compiling: experts stored quantized (torchao, GPTQ/AWQ, MXFP4) run as stored

Importing this package registers the ``torch.ops.moepass`` operators; the
backend itself is found by torch through the ``torch_dynamo_backends`` entry
point, so ``backend="adaptive_moe"`` works without importing moepass.
"""

from moepass import policies
from moepass._version import __version__ as __version__
from moepass.compiler.options import BackendOptions, OptionsError
from moepass.compiler.quantized_checkpoints import AdaptedExperts, adapt_quantized_experts
from moepass.compiler.spec import ExpertsSpec, MoEBlockSpec, RouterSpec, SharedExpertSpec
from moepass.compiler.traceable import TraceableError, make_traceable
from moepass.exports.genai import GenaiExport, export_genai
from moepass.exports.mlir import MlirExport, MlirExportError, MlirExportOptions, export_mlir
from moepass.exports.onnx import OnnxExport, OnnxExportError, OnnxExportOptions, export_onnx
from moepass.policies import Policy, PolicyError
from moepass.reports.inspection import InspectionReport, inspect
from moepass.runtime import ops as _ops  # noqa: F401  (registers torch.ops.moepass.*)
from moepass.runtime import quantized_ops as _quantized_ops  # noqa: F401  (registers torch.ops.moepass.quantized_experts)
from moepass.runtime.calibrate import calibrate
from moepass.runtime.expert_parallel.transformers_ep import register_when_imported as _register_expert_parallel
from moepass.runtime.report import BlockReport, Report, last_report, report

__all__ = [
    "AdaptedExperts",
    "adapt_quantized_experts",
    "BackendOptions",
    "calibrate",
    "export_genai",
    "export_onnx",
    "export_mlir",
    "MlirExport",
    "MlirExportError",
    "MlirExportOptions",
    "GenaiExport",
    "OnnxExport",
    "OnnxExportError",
    "OnnxExportOptions",
    "BlockReport",
    "ExpertsSpec",
    "InspectionReport",
    "MoEBlockSpec",
    "OptionsError",
    "Policy",
    "PolicyError",
    "Report",
    "RouterSpec",
    "SharedExpertSpec",
    "inspect",
    "last_report",
    "make_traceable",
    "TraceableError",
    "policies",
    "report",
]

# DistributedConfig(ep_implementation="moepass"): registered when transformers' EP module is imported
_register_expert_parallel()

#: Subpackages reached as attributes without their own import (``moepass.bundled.load_model()``
#: after ``import moepass``), imported on first use: the bundled model's data and the zoo are
#: not needed to compile a model.
_LAZY_SUBPACKAGES = ("bundled", "zoo")


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        import importlib

        return importlib.import_module(f"moepass.{name}")
    raise AttributeError(f"module 'moepass' has no attribute {name!r}")
