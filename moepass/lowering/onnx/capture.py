"""Capture a model as one torch-level FX graph that the moepass passes can rewrite and torch.export can trace.

::

    model, example inputs ──► _Entry (tensors in, a flat tuple of tensors out; use_cache=False for LMs)
                          ──► torch._dynamo.export(aten_graph=False)   one graph or a clear error
                          ──► GraphModule whose get_attr nodes carry the model's own parameter names
                              (``model.layers.0.mlp.gate.weight``), so block paths match what
                              torch.compile sees (per-layer policies, calibrated values) and the
                              ONNX initializers keep the model's names

Dynamic axes: by default the first axis of every input (``batch``) and the
second axis of token-id inputs and of inputs with three or more axes
(``sequence``) are dynamic.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import fx

from moepass.exports.errors import OnnxExportError

__all__ = ["CapturedModel", "capture_model", "default_dynamic_shapes"]

logger = logging.getLogger(__name__)


@dataclass
class CapturedModel:
    """A model captured for export."""

    #: torch-level graph; parameters are get_attr nodes named as in the model.
    gm: fx.GraphModule
    #: The example tensors, in the graph's input order.
    args: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    #: One entry per input (dim → torch.export.Dim), as torch.export takes them.
    dynamic_shapes: tuple[dict[int, Any] | None, ...]


class _Entry(torch.nn.Module):
    """Calls the model with tensors given positionally; returns a flat tuple of tensors."""

    def __init__(self, model: torch.nn.Module, names: list[str], positional: bool, constants: dict[str, Any],
                 output_keys: list[Any]):
        super().__init__()
        self.model = model
        self.names = names
        self.positional = positional
        self.constants = constants
        self.output_keys = output_keys

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.positional:
            out = self.model(*tensors, **self.constants)
        else:
            out = self.model(**dict(zip(self.names, tensors)), **self.constants)
        return tuple(_select(out, key) for key in self.output_keys)


def _select(out: Any, key: Any) -> torch.Tensor:
    if key is None:
        return out
    return out[key]


def _output_keys(out: Any) -> tuple[list[Any], list[str]]:
    """Which parts of a model's output are exported, and their names."""
    if isinstance(out, torch.Tensor):
        return [None], ["output"]
    if isinstance(out, Mapping):  # dicts and transformers ModelOutput
        keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        skipped = [k for k, v in out.items() if v is not None and not isinstance(v, torch.Tensor)]
        if skipped:
            logger.info("not exported (not tensors): %s", ", ".join(map(str, skipped)))
        if keys:
            return keys, [str(k) for k in keys]
    elif isinstance(out, (tuple, list)) and out and all(isinstance(v, torch.Tensor) for v in out):
        return list(range(len(out))), [f"output_{i}" for i in range(len(out))]
    raise OnnxExportError(
        f"the model returns {type(out).__name__}; export needs a tensor, a tuple of tensors or a dict/ModelOutput "
        "with tensor values"
    )


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters


def _split_inputs(model: torch.nn.Module, example_inputs: Any) -> tuple[list[str], list[torch.Tensor], bool, dict[str, Any]]:
    """(input names, tensors, positional?, constant keyword arguments)."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        names = [k for k, v in example_inputs.items() if isinstance(v, torch.Tensor)]
        tensors = [example_inputs[k] for k in names]
        constants = {k: v for k, v in example_inputs.items() if not isinstance(v, torch.Tensor)}
        positional = False
    elif isinstance(example_inputs, (tuple, list)):
        bad = [i for i, v in enumerate(example_inputs) if not isinstance(v, torch.Tensor)]
        if bad:
            raise OnnxExportError(
                f"example input {bad[0]} is a {type(example_inputs[bad[0]]).__name__}: give positional inputs as "
                "tensors, or pass a dict of keyword arguments (non-tensor values are fixed at export)"
            )
        tensors = list(example_inputs)
        names = _positional_names(model, len(tensors))
        constants = {}
        positional = True
    else:
        raise OnnxExportError(
            f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword arguments, "
            f"got {type(example_inputs).__name__}"
        )
    if not tensors:
        raise OnnxExportError("example_inputs has no tensor to export as a model input")
    # a strided view (a slice of a batch) would make torch.export guard on its base's sizes;
    # ONNX inputs are dense anyway
    tensors = [t.contiguous() for t in tensors]
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not None and "use_cache" not in constants and _accepts(model, "use_cache"):
        constants["use_cache"] = False  # a KV cache object cannot be an ONNX output
    return names, tensors, positional, constants


def _positional_names(model: torch.nn.Module, count: int) -> list[str]:
    try:
        parameters = [
            p.name
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        parameters = []
    return [parameters[i] if i < len(parameters) else f"input_{i}" for i in range(count)]


def default_dynamic_shapes(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[dict[int, str]]:
    """Dynamic ``batch`` (axis 0) and ``sequence`` (axis 1 of token ids and of 3+-D inputs) per input."""
    shapes = []
    for tensor in tensors:
        dims: dict[int, str] = {}
        if tensor.ndim >= 1:
            dims[0] = "batch"
        if tensor.ndim >= 3 or (tensor.ndim == 2 and not tensor.is_floating_point()):
            dims[1] = "sequence"
        shapes.append(dims)
    return shapes


def _normalise_dynamic_shapes(
    dynamic_shapes: Any, names: list[str], tensors: list[torch.Tensor]
) -> tuple[dict[int, Any] | None, ...]:
    """Per input: {axis: torch.export.Dim}; names given as strings become shared Dims."""
    if dynamic_shapes is None:
        given: list[Any] = default_dynamic_shapes(names, tensors)
        defaulted = True
    elif isinstance(dynamic_shapes, Mapping):
        unknown = sorted(set(dynamic_shapes) - set(names))
        if unknown:
            raise OnnxExportError(f"dynamic_shapes names {', '.join(unknown)}, which are not inputs ({', '.join(names)})")
        given = [dynamic_shapes.get(name) for name in names]
        defaulted = False
    elif isinstance(dynamic_shapes, (tuple, list)):
        if len(dynamic_shapes) != len(tensors):
            raise OnnxExportError(f"dynamic_shapes has {len(dynamic_shapes)} entries for {len(tensors)} inputs")
        given = list(dynamic_shapes)
        defaulted = False
    else:
        raise OnnxExportError(f"dynamic_shapes must be a dict, a tuple or None, got {type(dynamic_shapes).__name__}")
    dims: dict[str, Any] = {}
    result = []
    for name, tensor, spec in zip(names, tensors, given):
        if not spec:
            result.append(None)
            continue
        if not isinstance(spec, Mapping):
            raise OnnxExportError(f"dynamic_shapes for {name!r} must be a dict axis → Dim or name, got {spec!r}")
        entry = {}
        for axis, dim in spec.items():
            if not isinstance(axis, int) or not -tensor.ndim <= axis < tensor.ndim:
                raise OnnxExportError(f"dynamic_shapes for {name!r}: axis {axis!r} is not an axis of a {tensor.ndim}-D input")
            axis %= tensor.ndim
            if isinstance(dim, str):
                dim = dims.setdefault(dim, torch.export.Dim(dim))
            if dim is None:
                continue
            if tensor.shape[axis] < 2:
                hint = "" if not defaulted else ", or pass dynamic_shapes"
                raise OnnxExportError(
                    f"example input {name!r} has size {tensor.shape[axis]} on its dynamic axis {axis}: give an "
                    f"example of size at least 2 there (torch.export specialises sizes 0 and 1){hint}"
                )
            entry[axis] = dim
        result.append(entry or None)
    return tuple(result)


def _named_tensors(model: torch.nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(tensor), name)
    for name, tensor in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(tensor), name)
    return names


def _with_model_names(gm: fx.GraphModule, model: torch.nn.Module) -> fx.GraphModule:
    """The same graph, with get_attr targets renamed to the model's own dotted names."""
    names = _named_tensors(model)
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(gm, str(node.target))
        name = names.get(id(value)) if isinstance(value, torch.Tensor) else None
        if name is not None:
            node.target = name
        root[str(node.target)] = value
    renamed = fx.GraphModule(root, gm.graph, class_name="CapturedModel")
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            setattr(renamed, attr, getattr(gm, attr))
    renamed.recompile()
    return renamed


def _first_lines(error: BaseException, count: int = 3) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return " ".join(lines[:count]) or type(error).__name__


def capture_model(model: torch.nn.Module, example_inputs: Any, dynamic_shapes: Any = None) -> CapturedModel:
    """Capture ``model`` as one torch-level graph for export.

    Args:
        model: the model (in eval mode).
        example_inputs: a tensor, a tuple of tensors (positional), or a dict of
            keyword arguments (tensors become ONNX inputs, other values are fixed).
        dynamic_shapes: per input {axis: Dim or name}, as a tuple or a dict by
            input name; None for dynamic batch and sequence axes.

    Raises:
        OnnxExportError: the inputs are unusable, or the model does not capture as one graph.
    """
    if model.training:
        logger.warning("moepass: %s is in training mode; the export traces what it does now (call .eval())",
                       type(model).__name__)
    names, tensors, positional, constants = _split_inputs(model, example_inputs)
    shapes = _normalise_dynamic_shapes(dynamic_shapes, names, tensors)
    with torch.no_grad():
        probe = model(*tensors, **constants) if positional else model(**dict(zip(names, tensors)), **constants)
    output_keys, output_names = _output_keys(probe)
    entry = _Entry(model, names, positional, constants, output_keys).eval()
    try:
        with torch.no_grad():
            result = torch._dynamo.export(
                entry, aten_graph=False, dynamic_shapes=(shapes,), assume_static_by_default=True
            )(*tensors)
    except Exception as error:  # dynamo raises many types: Unsupported, UserError, constraint violations
        raise OnnxExportError(f"the model does not capture as one graph for export: {_first_lines(error)}") from error
    finally:
        torch._dynamo.reset()
    gm = _with_model_names(result.graph_module, model)
    logger.info("captured %s: %d graph nodes, inputs %s, outputs %s", type(model).__name__, len(gm.graph.nodes),
                names, output_names)
    return CapturedModel(gm, tuple(tensors), names, output_names, shapes)
