"""torch.export → ONNX, with each ``moepass.moe_block`` as one ``moepass.AdaptiveMoE`` node.

::

    fused GraphModule ──torch.export (dynamic axes)──► ExportedProgram
        ──torch.onnx (dynamo, custom translation)──► ModelProto
           moepass.moe_block(x, logits, tensors, w1, w2, b1, b2, route_config, experts_config)
             ↦  moepass.AdaptiveMoE(x, logits, *tensors, w1, w2, b1?, b2?)
                   route_config, experts_config: the op's JSON configs (string attributes)
                   input_roles: "x,logits,<tensor roles>,w1,w2[,b1][,b2]"
           moepass.quantized_moe_block(x, logits, tensors, [codes, scales, zeros?] × 2, b1, b2, ...)
             ↦  moepass.AdaptiveMoE(x, logits, *tensors, w1.codes, w1.scales[, w1.zeros], w2..., b1?, b2?)
                   quantization: the scheme's JSON (bits, group size)

The node has no definition yet: :mod:`moepass.lowering.onnx.functions` turns
its attributes into a local function for the chosen target.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import onnx
import onnxscript
import torch
from onnx.defs import OpSchema

from moepass.exports.errors import OnnxExportError
from moepass.runtime.ops import parse_route_config

__all__ = ["DOMAIN", "OP_TYPE", "root_cause", "to_onnx"]

logger = logging.getLogger(__name__)

#: Domain and op type of the block nodes.
DOMAIN = "moepass"
OP_TYPE = "AdaptiveMoE"

_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)", "tensor(int64)"]
_SCHEMA = OpSchema(
    OP_TYPE,
    DOMAIN,
    1,
    doc="One routed MoE block (adaptive routing + experts); defined by a model-local function.",
    inputs=[OpSchema.FormalParameter("inputs", "T", param_option=OpSchema.FormalParameterOption.Variadic,
                                     is_homogeneous=False)],
    outputs=[OpSchema.FormalParameter("output", "T")],
    type_constraints=[("T", _TYPES, "")],
    attributes=[
        OpSchema.Attribute("route_config", OpSchema.AttrType.STRING, "RouteConfig JSON"),
        OpSchema.Attribute("experts_config", OpSchema.AttrType.STRING, "ExpertsConfig JSON"),
        OpSchema.Attribute("input_roles", OpSchema.AttrType.STRING, "comma-separated role of each input"),
        OpSchema.Attribute("quantization", OpSchema.AttrType.STRING, "QuantScheme JSON (quantized experts)",
                           required=False),
    ],
)
_ADAPTIVE_MOE = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), OP_TYPE, _SCHEMA)


def _translate_block(x, logits, route_tensors, w1, w2, b1, b2, route_config: str, experts_config: str):
    roles = ["x", "logits", *parse_route_config(route_config).tensor_roles, "w1", "w2"]
    inputs = [x, logits, *route_tensors, w1, w2]
    for role, value in (("b1", b1), ("b2", b2)):
        if value is not None:
            roles.append(role)
            inputs.append(value)
    return _ADAPTIVE_MOE(
        *inputs, route_config=route_config, experts_config=experts_config, input_roles=",".join(roles)
    )


def _translate_quantized_block(x, logits, route_tensors, w1, w2, b1, b2, route_config: str, quantized_config: str):
    """A quantized block: inputs ``w1.codes``, ``w1.scales`` (, ``w1.zeros``), the same for w2."""
    import json

    from moepass.runtime.quantized_ops import parse_quantized_config

    config = parse_quantized_config(quantized_config)
    names = ("codes", "scales", "zeros")
    roles = ["x", "logits", *parse_route_config(route_config).tensor_roles]
    roles += [f"w1.{names[i]}" for i in range(len(w1))] + [f"w2.{names[i]}" for i in range(len(w2))]
    inputs = [x, logits, *route_tensors, *w1, *w2]
    for role, value in (("b1", b1), ("b2", b2)):
        if value is not None:
            roles.append(role)
            inputs.append(value)
    return _ADAPTIVE_MOE(
        *inputs, route_config=route_config, experts_config=config.experts.to_json(), input_roles=",".join(roles),
        quantization=json.dumps(config.scheme.to_dict(), sort_keys=True),
    )


def to_onnx(
    gm: torch.fx.GraphModule,
    args: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[Any, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
) -> onnx.ModelProto:
    """Export a fused graph to ONNX; every ``moe_block`` becomes one ``moepass.AdaptiveMoE`` node."""
    try:
        with torch.no_grad():
            program = torch.export.export(gm, args, dynamic_shapes=dynamic_shapes)
    except Exception as error:  # guards, data-dependent code, constraint violations
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        raise OnnxExportError(f"torch.export failed on the rewritten model: {' '.join(lines[:4])}") from error
    try:
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            verbose=False,
            optimize=True,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            custom_translation_table={
                torch.ops.moepass.moe_block.default: _translate_block,
                torch.ops.moepass.quantized_moe_block.default: _translate_quantized_block,
            },
        )
    except Exception as error:
        raise OnnxExportError(f"torch.onnx could not translate the rewritten model: {root_cause(error)}") from error
    return onnx_program.model_proto


def root_cause(error: BaseException) -> str:
    """The innermost failure torch.onnx reports (its "Exception summary"), on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("<class ")]
    picked = causes[:2] if causes else lines[:2]
    text = " ← ".join(line.split(">: ", 1)[-1] for line in picked)
    return text[:600] or type(error).__name__
