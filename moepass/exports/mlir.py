"""Export a model with its MoE blocks rewritten under a routing policy to MLIR (torch-mlir), verified in IREE.

::

    moepass.export_mlir(model, (input_ids,), "model.mlir", policy="top_p", p=0.4,
                        output_type="linalg-on-tensors")   # or "stablehlo", "tosa", "torch"

The model is captured and rewritten exactly as for the ONNX export (and as
``torch.compile(backend="adaptive_moe")`` does), each block fused into one
``moepass.moe_block`` op, then exported with ``torch.export`` and imported by
torch-mlir's FX importer with the blocks decomposed to aten ops
(:mod:`moepass.lowering.mlir`).  linalg-on-tensors and stablehlo modules are
compiled with IREE for the CPU and run on the example before anything is
written; tosa and torch modules are parsed back and checked by the MLIR
verifier.  Nothing is written when any step fails, and the error names the
block and the op that did not lower.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from moepass.exports.errors import MlirExportError, OnnxExportError
from moepass.exports.onnx import _relative_error, _staged, rewrite_for_export
from moepass.runtime.ops import parse_route_config

__all__ = ["MlirBlock", "MlirExport", "MlirExportError", "MlirExportOptions", "PreparedMlir", "export_mlir",
           "prepare_mlir"]

logger = logging.getLogger(__name__)

#: What :func:`export_mlir` can produce.
OUTPUT_TYPES = ("linalg-on-tensors", "stablehlo", "tosa", "torch")
#: Output types IREE compiles and runs (the others are parsed and verified).
EXECUTED = ("linalg-on-tensors", "stablehlo")


@dataclass
class MlirExportOptions:
    """Settings of :func:`export_mlir` beyond the output type and the policy.

    Attributes:
        experts_form: how each block's experts are written in aten ops
            (:mod:`moepass.lowering.mlir.decompose`): ``grouped`` (each expert's
            GEMMs on the rows routed to it, data-dependent row counts: dropped
            slots cost no work), ``dense`` (every expert on every token, static
            shapes: E / k_max times static routing's work), or ``auto``
            (``grouped`` for linalg-on-tensors and torch, ``dense`` for
            stablehlo and tosa, which have no data-dependent sizes in IREE).
        verify: compile with IREE and run on the example (linalg-on-tensors,
            stablehlo), or parse and verify (tosa, torch).
        tolerance: largest relative error ``verify`` accepts (float32).
        iree_cpu: ``--iree-llvmcpu-target-cpu`` for the verification compile.
        func_name: name of the module's entry function.
    """

    experts_form: str = "auto"
    verify: bool = True
    tolerance: float = 1e-4
    iree_cpu: str = "host"
    func_name: str = "main"


@dataclass
class MlirBlock:
    """How one MoE block was exported."""

    #: Module path; its ops carry the location ``loc("moepass:<path>"(...))``.
    path: str
    routing: str
    experts: str


@dataclass
class MlirExport:
    """What :func:`export_mlir` wrote."""

    path: Path
    output_type: str
    policy: str
    experts_form: str
    input_names: list[str]
    output_names: list[str]
    blocks: list[MlirBlock] = field(default_factory=list)
    #: Per input, its dynamic axes (empty: static shapes).
    dynamic_axes: dict[str, list[int]] = field(default_factory=dict)
    #: Max relative error of IREE against the torch model (None: not executed).
    max_error: float | None = None
    #: The IREE CPU bytecode the verification ran (None: not compiled).
    vmfb: bytes | None = field(default=None, repr=False)

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.output_type}, policy {self.policy}, experts {self.experts_form}, "
                 f"{len(self.blocks)} MoE blocks"]
        for block in self.blocks:
            lines.append(f"  {block.path or '<root>'}: {block.routing}; experts {block.experts}")
        if self.max_error is not None:
            lines.append(f"IREE (llvm-cpu) vs torch on the example: max relative error {self.max_error:.1e}")
        elif self.output_type not in EXECUTED:
            lines.append("parsed and verified by the MLIR verifier (IREE does not run this output type here)")
        return "\n".join(lines)


def _describe_rule(config: str) -> str:
    route = parse_route_config(config)
    if route.rule == "static":
        return f"static (k={route.depth})"
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(route.params.items()))
    return f"{route.rule}({params}) k≤{route.depth}"


_FORM_NOTES = {
    "grouped": "grouped (rows per expert, dropped slots skipped)",
    "dense": "dense (every expert on every token, masked)",
}


@contextlib.contextmanager
def _as_mlir_errors() -> Iterator[None]:
    """The shared capture and rewrite steps raise OnnxExportError; this export reports MlirExportError."""
    try:
        yield
    except OnnxExportError as error:
        raise MlirExportError(str(error)) from error


@dataclass
class PreparedMlir:
    """A model captured, rewritten and imported: the MLIR module before it is verified and written."""

    #: The MLIR module (torch-mlir's Python object).
    module: Any
    captured: Any
    blocks: list[MlirBlock]
    policy: str
    output_type: str
    experts_form: str
    func_name: str

    def text(self) -> str:
        """The module as MLIR text, with locations (block ops: ``loc("moepass:<path>"(...))``)."""
        return self.module.operation.get_asm(enable_debug_info=True, large_elements_limit=None)

    def reference(self, args: tuple[torch.Tensor, ...] | None = None) -> list[torch.Tensor]:
        """The rewritten torch model's outputs on ``args`` (default: the example)."""
        with torch.no_grad():
            outputs = self.captured.gm(*(self.captured.args if args is None else args))
        return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]

    def dynamic_axes(self) -> dict[str, list[int]]:
        """Per input name, its dynamic axes."""
        return {name: sorted(spec) for name, spec in zip(self.captured.input_names, self.captured.dynamic_shapes)
                if spec}

    def check_inputs(self) -> list[tuple[torch.Tensor, ...]]:
        """The example, and with dynamic axes also the example grown by one along each of them."""
        inputs = [tuple(self.captured.args)]
        if any(self.captured.dynamic_shapes):
            grown = []
            for tensor, spec in zip(self.captured.args, self.captured.dynamic_shapes):
                for axis in sorted(spec or {}):
                    tensor = torch.cat([tensor, tensor.narrow(axis, 0, 1)], dim=axis)
                grown.append(tensor)
            inputs.append(tuple(grown))
        return inputs


def _require_toolchain(output_type: str, verify: bool) -> None:
    """A clear error when the mlir extra is missing (before any long step)."""
    import importlib.util

    needed = ["torch_mlir"] + (["iree.compiler", "iree.runtime"] if verify and output_type in EXECUTED else [])
    missing = [name for name in needed if importlib.util.find_spec(name.split(".")[0]) is None
               or importlib.util.find_spec(name) is None]
    if missing:
        raise MlirExportError(f"{', '.join(missing)} not installed: pip install 'moepass[mlir]' (torch-mlir, "
                              "iree-base-compiler, iree-base-runtime)")


def _resolve_form(form: str, output_type: str) -> str:
    from moepass.lowering.mlir import FORMS

    if form == "auto":
        return "grouped" if output_type in ("linalg-on-tensors", "torch") else "dense"
    if form not in FORMS:
        raise MlirExportError(f"unknown experts_form {form!r}; expected auto or one of {', '.join(FORMS)}")
    return form


def prepare_mlir(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    output_type: str = "linalg-on-tensors",
    dynamic_shapes: Any = None,
    options: "MlirExportOptions | None" = None,
    **backend_options: Any,
) -> PreparedMlir:
    """Capture, rewrite, decompose and import ``model``: :func:`export_mlir` before verification and writing.

    Raises:
        MlirExportError: as :func:`export_mlir`.
    """
    from moepass.lowering.mlir import to_mlir

    options = options or MlirExportOptions()
    if output_type not in OUTPUT_TYPES:
        raise MlirExportError(f"unknown output_type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
    if backend_options.get("experts_dtype") not in (None, "float", "none"):
        raise MlirExportError(
            "quantized experts do not export to MLIR: torch-mlir has no lowering of ATen's weight-only int8/int4 "
            "kernels or of a dequantize-then-matmul that stays quantized in the module (the linalg form would carry "
            "float weights: no memory saved, and not the model that runs); export without experts_dtype, or use "
            "export_onnx (com.microsoft.QMoE, MatMulNBits, DequantizeLinear)"
        )
    form = _resolve_form(options.experts_form, output_type)
    _require_toolchain(output_type, options.verify)
    with _as_mlir_errors():
        captured, reports, policy = rewrite_for_export(
            model, example_inputs, {} if dynamic_shapes is None else dynamic_shapes, **backend_options
        )
    _refuse_random_routing(captured.gm)
    module, fused = to_mlir(captured, output_type, form, options.func_name)
    blocks = [MlirBlock(path, _describe_rule(route_config), _FORM_NOTES[form]) for path, route_config in fused]
    return PreparedMlir(module, captured, blocks, policy, output_type, form, options.func_name)


def _refuse_random_routing(gm: torch.fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.target is torch.ops.moepass.moe_block.default:
            route = parse_route_config(node.args[7])
            if route.rule == "allocator" and route.params.get("sample"):
                raise MlirExportError(
                    f"block {route.block or '<root>'}: the allocator policy samples k at random (sample=True); "
                    "IREE's random numbers are not torch's, so the export could not be verified: use sample=False"
                )


def _verify_by_execution(prepared: PreparedMlir, text: str, options: MlirExportOptions) -> tuple[float, bytes]:
    from moepass.lowering.mlir import IreeCompileError, IreeModule, compile_for_cpu

    try:
        vmfb = compile_for_cpu(text, prepared.output_type, cpu=options.iree_cpu)
    except IreeCompileError as error:
        raise MlirExportError(f"IREE cannot compile the {prepared.output_type} module: {error}") from None
    module = IreeModule(vmfb, prepared.func_name)
    worst = 0.0
    for args in prepared.check_inputs():
        shapes = ", ".join("×".join(map(str, a.shape)) for a in args)
        try:
            actual = module(*[a.detach().cpu().numpy() for a in args])
        except Exception as error:  # IREE raises ValueError/RuntimeError with its status text
            hint = ""
            if len(prepared.dynamic_axes()) and sum(map(len, prepared.dynamic_axes().values())) > 1:
                hint = (" (torch-mlir lowers a view that merges or splits two dynamic axes, batch × sequence, "
                        "to a wrong static size: llvm/torch-mlir#3852, #4743; make at most one axis dynamic)")
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise MlirExportError(f"IREE could not run the module on inputs of shape {shapes}: {first}{hint}") from None
        expected = prepared.reference(args)
        errors = [_relative_error(a, e.detach().float().cpu().numpy()) for a, e in zip(actual, expected)]
        error = max(errors, default=0.0)
        if len(actual) != len(expected) or not error <= options.tolerance:
            raise MlirExportError(
                f"IREE's output differs from the rewritten torch model on inputs of shape {shapes}: max relative "
                f"error {error:.2e} > {options.tolerance:.0e} (outputs {', '.join(prepared.captured.output_names)})"
            )
        worst = max(worst, error)
    return worst, vmfb


def _verify_by_parsing(text: str) -> None:
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d

    context = ir.Context()
    torch_d.register_dialect(context)  # tosa, tensor, arith, func... are registered with the context
    try:
        module = ir.Module.parse(text, context)
        if not module.operation.verify():
            raise MlirExportError("the module fails the MLIR verifier")
    except MlirExportError:
        raise
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MlirExportError(f"the written MLIR does not parse back: {first}") from None


def export_mlir(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    policy: Any = "static",
    *,
    output_type: str = "linalg-on-tensors",
    dynamic_shapes: Any = None,
    options: MlirExportOptions | None = None,
    **backend_options: Any,
) -> MlirExport:
    """Export ``model`` to MLIR with its MoE blocks routed by ``policy``, verified before it is written.

    Args:
        model: the model, untouched (eval mode; a transformers LM is called with ``use_cache=False``).
        example_inputs: a tensor, a tuple of tensors, or a dict of keyword arguments.
        path: the ``.mlir`` file to write (text, with locations).
        policy: a policy name or :class:`moepass.policies.Policy`, as for the backend.
        output_type: ``linalg-on-tensors`` or ``stablehlo`` (compiled with IREE
            for the CPU and run on the example), ``tosa`` or ``torch`` (parsed and verified).
        dynamic_shapes: None for static shapes (the example's); else per input
            {axis: Dim or name}, as for :func:`moepass.export_onnx`.  With
            torch-mlir 20261001 at most one axis may be dynamic (see docs/exports.md).
        options: :class:`MlirExportOptions` (experts form, verification).
        **backend_options: the policy's parameters (``p=0.4``) and backend options (``validate``).

    Returns:
        :class:`MlirExport`: the path, how each block was exported, the verification error.

    Raises:
        MlirExportError: the model does not capture as one graph, a block was
            not rewritten, an op did not lower (naming it and its block), IREE
            cannot compile or run the module, or its output differs from torch.
        moepass.OptionsError, moepass.PolicyError: bad policy or options.
    """
    options = options or MlirExportOptions()
    path = Path(path)
    prepared = prepare_mlir(model, example_inputs, output_type=output_type, dynamic_shapes=dynamic_shapes,
                            options=options, policy=policy, **backend_options)
    text = prepared.text()
    result = MlirExport(path, output_type, prepared.policy, prepared.experts_form, prepared.captured.input_names,
                        prepared.captured.output_names, prepared.blocks, prepared.dynamic_axes())
    if options.verify:
        if output_type in EXECUTED:
            result.max_error, result.vmfb = _verify_by_execution(prepared, text, options)
        else:
            _verify_by_parsing(text)
    with _staged(path) as staged:
        staged.write_text(text)
    logger.info("%s", result)
    return result
