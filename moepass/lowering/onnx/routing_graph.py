"""The routing half of a block's ONNX function, exported from the routing code itself.

::

    RouteConfig (router kind, rule, params, k bounds)
        │  torch.export of  torch.ops.moepass.route(logits, x?, tensors, config)   (dynamic T)
        │  torch.onnx  →  a small ONNX graph: logits [T,E] (, x [T,H], tensors) → ids [T,k_max], weights [T,k_max]
        ▼  renamed under a prefix, initializers → Constant nodes
    nodes spliced into the AdaptiveMoE function body

Exporting the very code the compiled model runs (``moepass.runtime.routing.route``
with the block's k-rule) keeps ONNX routing identical to torch routing for
every router kind × rule, instead of a second hand-written copy that could
drift.  Graphs are cached per configuration: the blocks of a model usually
share one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import onnx
import torch
from moepass.lowering.onnx.translate import root_cause
from onnx import helper

from moepass.exports.errors import OnnxExportError
from moepass.runtime.ops import parse_route_config

__all__ = ["RoutingGraph", "routing_graph", "splice"]

logger = logging.getLogger(__name__)

#: Example token count for tracing (>= 2, so the axis stays symbolic).
_EXAMPLE_TOKENS = 3


@dataclass(frozen=True)
class RoutingGraph:
    """An exported routing graph: its nodes and the names of its inputs and outputs."""

    nodes: tuple[onnx.NodeProto, ...]
    #: logits, then x (if the rule reads it), then the route tensors.
    inputs: tuple[str, ...]
    #: ids [T, k_max] int64, weights [T, k_max] float32.
    outputs: tuple[str, str]


class _Route(torch.nn.Module):
    def __init__(self, config: str, uses_x: bool):
        super().__init__()
        self.config = config
        self.uses_x = uses_x

    def forward(self, logits: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, tensors = (rest[0], list(rest[1:])) if self.uses_x else (None, list(rest))
        return torch.ops.moepass.route(logits, x, tensors, self.config)


_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.BOOL: torch.bool,
}


def _torch_dtype(elem_type: int) -> torch.dtype:
    try:
        return _TORCH_DTYPES[elem_type]
    except KeyError:
        raise OnnxExportError(f"unsupported element type {onnx.TensorProto.DataType.Name(elem_type)} for routing") from None


@lru_cache(maxsize=64)
def _export(config: str, logits_type: int, x_type: int, hidden: int, tensor_specs: tuple, opset: int) -> bytes:
    cfg = parse_route_config(config)
    tokens = _EXAMPLE_TOKENS
    args = [torch.randn(tokens, cfg.router.num_experts).to(_torch_dtype(logits_type))]
    names = ["logits"]
    shapes: list = [{0: torch.export.Dim("tokens")}]
    if cfg.uses_x:
        args.append(torch.randn(tokens, hidden).to(_torch_dtype(x_type)))
        names.append("x")
        shapes.append({0: shapes[0][0]})
    for index, (shape, elem_type) in enumerate(tensor_specs):
        per_token = bool(shape) and shape[0] == -1  # a lifted router's own selection: [tokens, k]
        concrete = (tokens, *shape[1:]) if per_token else shape
        args.append(torch.zeros(concrete, dtype=_torch_dtype(elem_type)))
        names.append(f"tensor{index}")
        shapes.append({0: shapes[0][0]} if per_token else None)
    module = _Route(config, cfg.uses_x)
    try:
        # *rest takes one nested entry, and none when empty
        dynamic = (shapes[0], tuple(shapes[1:])) if len(shapes) > 1 else (shapes[0],)
        program = torch.export.export(module, tuple(args), dynamic_shapes=dynamic)
        onnx_program = torch.onnx.export(
            program, opset_version=opset, input_names=names, output_names=["ids", "weights"],
            dynamo=True, verbose=False, optimize=True,
        )
    except Exception as error:
        raise OnnxExportError(
            f"the routing of {cfg.rule} on a {cfg.router.kind} router does not export: {root_cause(error)}"
        ) from error
    model = onnx_program.model_proto
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    return model.SerializeToString()


def routing_graph(config: str, logits_type: int, x_type: int, hidden: int,
                  tensor_specs: tuple[tuple[tuple[int, ...], int], ...], opset: int) -> onnx.GraphProto:
    """The exported routing graph of ``config`` (without a block path) as an ONNX graph.

    Args:
        config: a RouteConfig JSON.
        logits_type, x_type: ONNX element types of the logits and the block input.
        hidden: H (for rules that read x).
        tensor_specs: (shape, element type) of each route tensor.
        opset: the default-domain opset of the model it goes into.
    """
    model = onnx.load_from_string(_export(config, logits_type, x_type, hidden, tensor_specs, opset))
    foreign = [o.domain for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    if foreign:
        raise OnnxExportError(f"the exported routing uses operator domains {foreign}; only standard ops are expected")
    return model.graph


def splice(graph: onnx.GraphProto, prefix: str, inputs: list[str]) -> RoutingGraph:
    """The graph's nodes with values renamed under ``prefix`` and inputs bound to ``inputs``.

    Initializers become Constant nodes (function bodies cannot hold initializers).
    """
    if len(inputs) != len(graph.input):
        raise OnnxExportError(f"routing graph takes {len(graph.input)} inputs, got {len(inputs)}")
    rename = {g.name: name for g, name in zip(graph.input, inputs)}

    def name(value: str) -> str:
        if not value:
            return value
        if value not in rename:
            rename[value] = f"{prefix}/{value}"
        return rename[value]

    nodes = []
    for tensor in graph.initializer:
        constant = onnx.TensorProto()
        constant.CopyFrom(tensor)
        constant.name = ""
        nodes.append(helper.make_node("Constant", [], [name(tensor.name)], name=f"{prefix}/const_{tensor.name}", value=constant))
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise OnnxExportError(f"the exported routing has a {node.op_type} with a subgraph; it cannot be spliced")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}/{node.name or node.op_type}"
        copy.ClearField("metadata_props")
        copy.ClearField("doc_string")
        del copy.input[:]
        copy.input.extend(name(i) for i in node.input)
        del copy.output[:]
        copy.output.extend(name(o) for o in node.output)
        nodes.append(copy)
    outputs = tuple(name(o.name) for o in graph.output)
    return RoutingGraph(tuple(nodes), tuple(inputs), (outputs[0], outputs[1]))
