"""Export a model with its MoE blocks rewritten under a routing policy to ONNX.

::

    moepass.export_onnx(model, (input_ids,), "model.onnx", policy="top_p", p=0.4, target="ort")

The model is captured as one graph, every MoE block is detected, validated
and rewritten exactly as ``torch.compile(backend="adaptive_moe")`` would, and
each block becomes one ``moepass.AdaptiveMoE`` node defined by a model-local
ONNX function (see :mod:`moepass.lowering.onnx`).  Target ``ort`` runs the
experts with ONNX Runtime's ``com.microsoft.MoE``, k per token; target
``portable`` uses standard ONNX ops only.  A block that cannot be exported
exactly fails the export with an :class:`OnnxExportError` naming it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from moepass.compiler.backend import optimize_graph
from moepass.compiler.options import BackendOptions
from moepass.exports.errors import OnnxExportError
from moepass.runtime.report import BlockReport

__all__ = [
    "OnnxExport",
    "OnnxExportError",
    "OnnxExportOptions",
    "PreparedExport",
    "export_onnx",
    "prepare_export",
    "rewrite_for_export",
]

logger = logging.getLogger(__name__)


#: Protobuf cannot serialise a model of 2 GiB or more: keep weights beside it.
_EXTERNAL_DATA_BYTES = 1 << 30


@dataclass
class OnnxExportOptions:
    """Settings of :func:`export_onnx` beyond the target and the policy.

    Attributes:
        opset: the default-domain ONNX opset (ScatterND with reduction needs 16+).
        ort_fallback: for target ``ort``, what a block whose experts
            ``com.microsoft.MoE`` cannot run exactly does (gated gelu, gelu):
            ``portable`` (standard ops inside its function) or ``error``.
        ort_layout: for target ``ort``, how the experts run: ``masked`` (one
            ``com.microsoft.MoE`` call with k = k_max, dropped slots at weight
            0, which ORT's CPU kernel skips), ``buckets`` (one call per k),
            ``slots`` (k = 1 per kept slot: no work for dropped slots on any
            provider), ``gemm`` (one Gemm pair per expert, weights pre-packed
            once by ONNX Runtime; float32), ranges of them by token count
            (``{1: "masked", 64: "gemm"}``: the function switches on the
            token count), or ``auto``: for the CPU provider, the fastest layout
            per token-count range measured in ONNX Runtime on *this* machine
            (:mod:`moepass.lowering.onnx.layout_tuning`; cached per machine),
            else the fixed default for the provider and each block's expert
            size (:func:`moepass.lowering.onnx.default_ort_layout`).  The
            choice is the exporting machine's: re-export on (or name the
            layout for) another kind of CPU.
        ort_tuning: how long ``auto`` may measure each block variant's layouts:
            ``auto`` (:data:`moepass.lowering.onnx.layout_tuning.DEFAULT_BUDGET`
            seconds, or what ``$MOEPASS_TUNING`` says), ``off`` (the fixed
            default), or seconds.
        provider: the ONNX Runtime execution provider the model is meant
            for, ``cpu`` or ``cuda``: it picks the ``auto`` layout (and, for
            :func:`moepass.export_genai`, the genai_config's provider).  The
            export is verified on the CPU provider either way.
        check: run ``onnx.checker.check_model(full_check=True)``.
        verify: run the exported model in ONNX Runtime (CPU) on the example
            inputs and compare with the rewritten torch model.
        tolerance: largest relative error ``verify`` accepts (float32).
        external_data: write the weights to ``<file>.data`` beside the model:
            None does so when the model is 1 GiB or more (protobuf's limit is 2 GiB).
    """

    opset: int = 18
    ort_fallback: str = "portable"
    ort_layout: Any = "auto"
    ort_tuning: Any = "auto"
    provider: str = "cpu"
    check: bool = True
    verify: bool = True
    tolerance: float = 1e-4
    external_data: bool | None = None


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    target: str
    policy: str
    input_names: list[str]
    output_names: list[str]
    #: How each MoE block was exported.
    blocks: list[Any] = field(default_factory=list)
    #: Max relative error of ONNX Runtime against the torch model (None: not verified).
    max_error: float | None = None

    def __str__(self) -> str:
        lines = [f"{self.path}: target {self.target}, policy {self.policy}, {len(self.blocks)} MoE blocks"]
        for block in self.blocks:
            note = f"  [{block.fallback_reason}]" if block.fallback_reason else ""
            lines.append(f"  {block.path or '<root>'}: {block.routing}; experts via {block.experts}{note}")
            if getattr(block, "layout", ""):
                lines.append(f"    layout: {block.layout}")
        if self.max_error is not None:
            lines.append(f"ONNX Runtime vs torch on the example: max relative error {self.max_error:.1e}")
        return "\n".join(lines)


@dataclass
class PreparedExport:
    """A model captured, rewritten and translated, before its blocks get a target."""

    #: ONNX model whose AdaptiveMoE nodes have no function yet.
    model: Any
    captured: Any
    blocks: list[BlockReport]
    policy: str

    def lower(self, target: str = "ort", ort_fallback: str = "portable", ort_layout: Any = "auto",
              in_place: bool = False, provider: str = "cpu", ort_tuning: Any = "off"):
        """The model with every block defined for ``target``; returns (ModelProto, blocks).

        A copy unless ``in_place`` (which saves a copy of the weights, and can be done once).
        ``ort_tuning`` (``auto`` | ``off`` | seconds): whether ``ort_layout="auto"``
        measures the layouts on this machine (:class:`OnnxExportOptions`).
        """
        from moepass.lowering.onnx import define_blocks
        from moepass.lowering.onnx.layout_tuning import DEFAULT_BUDGET
        from moepass.runtime.tuning import TuningError, tuning_budget

        try:
            budget = tuning_budget(ort_tuning, DEFAULT_BUDGET)
        except TuningError as error:
            raise OnnxExportError(f"ort_tuning: {error}") from None
        model = self.model if in_place else copy.deepcopy(self.model)
        blocks = define_blocks(model, target, ort_fallback, ort_layout, provider, budget)
        return model, blocks

    def reference(self) -> list[torch.Tensor]:
        """The rewritten torch model's outputs on the example inputs."""
        with torch.no_grad():
            outputs = self.captured.gm(*self.captured.args)
        return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]

    def feeds(self, args: tuple[torch.Tensor, ...] | None = None) -> dict[str, Any]:
        """ONNX Runtime inputs for ``args`` (default: the example)."""
        args = self.captured.args if args is None else args
        return {name: t.detach().cpu().numpy() for name, t in zip(self.captured.input_names, args)}


def _check_rewritten(reports: list[BlockReport]) -> None:
    left = [r for r in reports if not r.rewritten]
    if left:
        details = "; ".join(f"block {r.display_path}: {r.reason or 'not rewritten'}" for r in left)
        raise OnnxExportError(f"not rewritten, so the export would run it without the policy: {details}")
    router_only = [r for r in reports if r.spec is not None and r.spec.experts is None]
    if router_only:
        raise OnnxExportError(f"block {router_only[0].display_path}: only its router was found (its experts loop is "
                              "outside the graph)")


@contextlib.contextmanager
def failing_closed(step: str) -> Iterator[None]:
    """Turn an unexpected exception of a step that reads other libraries' internals into one clear export error.

    torch.export, onnxscript and ONNX Runtime change between releases; what
    they raise that this module does not expect becomes :class:`OnnxExportError`
    naming the step, before anything is written (moepass's own errors and bad
    options pass through as they are).
    """
    from moepass.compiler.options import OptionsError
    from moepass.policies import PolicyError

    try:
        yield
    except (OnnxExportError, OptionsError, PolicyError):
        raise
    except Exception as error:
        raise OnnxExportError(
            f"the export failed while {step} ({type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}); "
            "nothing was written"
        ) from error


def prepare_export(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic_shapes: Any = None,
    opset: int = 18,
    **backend_options: Any,
) -> PreparedExport:
    """Capture, rewrite and translate ``model``; the first half of :func:`export_onnx`.

    ``backend_options`` are the backend's (``policy``, its parameters, ``validate``).
    """
    from moepass.lowering.onnx import to_onnx

    captured, reports, policy = rewrite_for_export(model, example_inputs, dynamic_shapes, **backend_options)
    onnx_model = to_onnx(captured.gm, captured.args, captured.dynamic_shapes, captured.input_names,
                         captured.output_names, opset)
    return PreparedExport(onnx_model, captured, reports, policy)


def rewrite_for_export(
    model: torch.nn.Module, example_inputs: Any, dynamic_shapes: Any = None, **backend_options: Any
) -> tuple[Any, list[BlockReport], str]:
    """Capture ``model`` as one graph and rewrite its MoE blocks as the backend does; one op per block.

    The steps every exporter shares (ONNX, MLIR): capture (:func:`moepass.lowering.onnx.capture_model`),
    detection, validation and rewrite under the policy (:func:`moepass.compiler.backend.optimize_graph`), a check
    that every block was rewritten, and the fusion of each block's route and experts ops into one
    ``moepass.moe_block`` node.

    Returns:
        (the captured model, its graph now fused; the block reports; the policy's description).

    Raises:
        OnnxExportError: the model does not capture, or a block was not rewritten (naming it).
    """
    from moepass.lowering.onnx import capture_model

    options = BackendOptions.parse({"inner": "eager", **backend_options})
    captured = capture_model(model, example_inputs, dynamic_shapes)
    return _rewrite_captured(captured, type(model).__name__, options)


def _rewrite_captured(captured, model_name: str, options: BackendOptions) -> tuple[Any, list[BlockReport], str]:
    """Rewrite a captured graph's MoE blocks (every one must be) and fuse each into one op."""
    from moepass.lowering.onnx import fuse_blocks

    options = dataclasses.replace(options, quantized_form="plain")  # quantized experts keep the portable layout
    gm, reports = optimize_graph(captured.gm, list(captured.args), options, differentiable=False, kernel_choices=False)
    if not reports:
        logger.warning("moepass: no MoE block found in %s; exporting it as it is", model_name)
    _check_rewritten(reports)
    fuse_blocks(gm)
    captured.gm = gm
    return captured, reports, options.policy.describe()


def prepare_generation_export(model: torch.nn.Module, *, opset: int = 18, layout: Any = None, **backend_options: Any):
    """:func:`prepare_export` of a causal LM with its KV cache as inputs and outputs.

    The inputs and outputs are named as onnxruntime-genai expects (``input_ids``,
    ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key``/``.value``
    → ``logits``, ``present.{i}.key``/``.value``), with dynamic batch, sequence
    and past-sequence axes (:mod:`moepass.lowering.onnx.kv_cache`).

    ``layout``: the model's :class:`moepass.lowering.onnx.kv_cache.CacheLayout`
    when already probed (default: probed here).

    Returns:
        (:class:`PreparedExport`, :class:`moepass.lowering.onnx.kv_cache.CacheLayout`).
    """
    from moepass.lowering.onnx import to_onnx
    from moepass.lowering.onnx.kv_cache import capture_with_cache

    options = BackendOptions.parse({"inner": "eager", **backend_options})
    captured, layout = capture_with_cache(model, layout)
    captured, reports, policy = _rewrite_captured(captured, type(model).__name__, options)
    onnx_model = to_onnx(captured.gm, captured.args, captured.dynamic_shapes, captured.input_names,
                         captured.output_names, opset)
    return PreparedExport(onnx_model, captured, reports, policy), layout


def _fits(model) -> bool:
    """Whether ``model`` is small enough to keep its weights inside the .onnx file."""
    try:
        return model.ByteSize() < _EXTERNAL_DATA_BYTES
    except ValueError:  # protobuf refuses to size a message of 2 GiB or more
        return False


@contextlib.contextmanager
def _staged(path: Path) -> Iterator[Path]:
    """Yield a path in a staging folder beside ``path``; on success move it (and its .data) into place.

    A failure leaves nothing at ``path``: no half-written or unverified model.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        yield staged
        data = staging / f"{path.name}.data"
        if data.exists():
            os.replace(data, path.parent / data.name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(model, staged: Path, external_data: bool | None = None) -> bool:
    """Save ``model`` at ``staged`` (weights in ``<name>.data`` when external); returns whether they are."""
    import onnx

    external = not _fits(model) if external_data is None else external_data
    onnx.save_model(model, staged, save_as_external_data=external, location=f"{staged.name}.data",
                    all_tensors_to_one_file=True)
    return external


def _check(model, staged: Path, external: bool = False) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(staged) if external or not _fits(model) else model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise OnnxExportError(f"the exported model fails the ONNX checker: {error}") from error


def _relative_error(actual, expected) -> float:
    import numpy as np

    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(actual - expected).max(initial=0.0) / scale)


def _verify(path: Path, prepared: PreparedExport, tolerance: float) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run(None, prepared.feeds())
    expected = prepared.reference()
    errors = [_relative_error(a, e.detach().float().cpu().numpy()) for a, e in zip(actual, expected)]
    error = max(errors, default=0.0)
    floating = all(e.dtype in (torch.float32, torch.float64) for e in expected if e.is_floating_point())
    limit = tolerance if floating else max(tolerance, 3e-2)
    if not error <= limit:
        raise OnnxExportError(
            f"ONNX Runtime's output differs from the rewritten torch model on the example: max relative error "
            f"{error:.2e} > {limit:.0e} (outputs {', '.join(prepared.captured.output_names)})"
        )
    return error


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    policy: Any = "static",
    *,
    target: str = "ort",
    dynamic_shapes: Any = None,
    options: OnnxExportOptions | None = None,
    **backend_options: Any,
) -> OnnxExport:
    """Export ``model`` to ONNX with its MoE blocks routed by ``policy``.

    Args:
        model: the model, untouched (eval mode; a transformers LM is called with ``use_cache=False``).
        example_inputs: a tensor, a tuple of tensors, or a dict of keyword
            arguments (tensors become ONNX inputs named by their keys).
        path: the ``.onnx`` file to write (weights of models over 1 GiB go to ``<path>.data``).
        policy: a policy name or :class:`moepass.policies.Policy`, as for the backend.
        target: ``ort`` (experts laid out for ONNX Runtime: ``com.microsoft.MoE``
            with k per token, or pre-packed Gemm pairs; ``options.ort_layout``)
            or ``portable`` (standard ONNX ops only, a Loop over experts).
        dynamic_shapes: per input {axis: Dim or name}, as a tuple or a dict by
            input name; None makes the batch axis and the sequence axis of
            token ids dynamic.
        options: :class:`OnnxExportOptions` (opset, checks, fallback).
        **backend_options: the policy's parameters (``p=0.4``) and backend
            options (``validate``).

    Returns:
        :class:`OnnxExport`: the path, and how each block was exported.

    Raises:
        OnnxExportError: the model does not capture as one graph, a block was
            not rewritten or cannot be exported exactly (the message names
            it), or ONNX Runtime disagrees with torch on the example.
        moepass.OptionsError, moepass.PolicyError: bad policy or options.
    """
    from moepass.lowering.onnx import TARGETS

    options = options or OnnxExportOptions()
    if target not in TARGETS:
        raise OnnxExportError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    path = Path(path)
    with failing_closed("capturing the model"):
        prepared = prepare_export(
            model, example_inputs, dynamic_shapes=dynamic_shapes, opset=options.opset, policy=policy, **backend_options
        )
    with failing_closed("lowering the blocks to ONNX"):
        onnx_model, blocks = prepared.lower(target, options.ort_fallback, options.ort_layout, in_place=True,
                                            provider=options.provider, ort_tuning=options.ort_tuning)
    result = OnnxExport(path, target, prepared.policy, prepared.captured.input_names, prepared.captured.output_names,
                        blocks)
    with _staged(path) as staged:
        external = _write(onnx_model, staged, options.external_data)
        if options.check:
            _check(onnx_model, staged, external)
        if options.verify:
            result.max_error = _verify(staged, prepared, options.tolerance)
    logger.info("%s", result)
    return result
