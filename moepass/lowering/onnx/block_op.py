"""``moepass::moe_block``: one rewritten MoE block as a single opaque op, for export.

::

    moepass.moe_block(x, logits, route_tensors, w1, w2, b1, b2, route_config, experts_config)
        == moepass.experts(x, *moepass.route(logits, x?, route_tensors, route_config), w1, w2, b1, b2, experts_config)
           (+ moepass.zero_compute_experts(x, ids, weights, E, kinds, None) for a block with zero-computation experts)

``moepass.route`` is a composite op, so ``torch.export`` would decompose it
into a few dozen aten ops spread over the graph.  Fused into this opaque op
(with a fake implementation), each block survives ``torch.export`` as exactly
one node, which the ONNX translation turns into one ``moepass.AdaptiveMoE``
node.  Its eager implementation is the route op followed by the experts op,
so the fused graph still computes what the rewritten graph computes.
"""

from __future__ import annotations

from typing import Optional

import torch

from moepass.runtime.ops import parse_experts_config, parse_route_config

__all__ = ["moe_block", "quantized_moe_block", "zero_compute_term"]


@torch.library.custom_op("moepass::moe_block", mutates_args=())
def moe_block(
    x: torch.Tensor,
    logits: torch.Tensor,
    route_tensors: list[torch.Tensor],
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    route_config: str,
    experts_config: str,
) -> torch.Tensor:
    """Route the tokens of one block and run its experts.

    Args:
        x: [T, H] block input.
        logits: [T, E] router logits.
        route_tensors: the route op's tensors (correction bias, policy tensors).
        w1, w2, b1, b2: the experts' weights, as the experts op takes them.
        route_config: :class:`moepass.runtime.ops.RouteConfig` as JSON.
        experts_config: :class:`moepass.runtime.ops.ExpertsConfig` as JSON.

    Returns:
        [T, H] in ``x.dtype``.
    """
    uses_x = parse_route_config(route_config).uses_x
    ids, weights = torch.ops.moepass.route(logits, x if uses_x else None, route_tensors, route_config)
    out = torch.ops.moepass.experts(x, ids, weights, w1, w2, b1, b2, experts_config)
    if parse_experts_config(experts_config).spec.zero_compute:
        out = out + zero_compute_term(x, ids, weights, experts_config)
    return out


def zero_compute_term(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts_config: str) -> torch.Tensor:
    """What the block's zero-computation experts add (see ``moepass.zero_compute_experts``)."""
    spec = parse_experts_config(experts_config).spec
    return torch.ops.moepass.zero_compute_experts(x, ids, weights, spec.num_experts, ",".join(spec.zero_compute), None)


@moe_block.register_fake
def _moe_block_fake(x, logits, route_tensors, w1, w2, b1, b2, route_config, experts_config):
    return torch.empty_like(x)


@torch.library.custom_op("moepass::quantized_moe_block", mutates_args=())
def quantized_moe_block(
    x: torch.Tensor,
    logits: torch.Tensor,
    route_tensors: list[torch.Tensor],
    w1: list[torch.Tensor],
    w2: list[torch.Tensor],
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    route_config: str,
    quantized_config: str,
) -> torch.Tensor:
    """``moe_block`` for quantized experts: route, then ``moepass.quantized_experts`` (plain layout).

    ``w1`` / ``w2``: each projection's [codes, scales(, zeros)] (:mod:`moepass.quantize.layout`);
    ``quantized_config``: :class:`moepass.runtime.quantized_ops.QuantizedExpertsConfig` as JSON.
    """
    from moepass.runtime.quantized_ops import parse_quantized_config

    uses_x = parse_route_config(route_config).uses_x
    ids, weights = torch.ops.moepass.route(logits, x if uses_x else None, route_tensors, route_config)
    out = torch.ops.moepass.quantized_experts(x, ids, weights, w1, w2, b1, b2, quantized_config)
    experts_config = parse_quantized_config(quantized_config).experts.to_json()
    if parse_experts_config(experts_config).spec.zero_compute:
        out = out + zero_compute_term(x, ids, weights, experts_config)
    return out


@quantized_moe_block.register_fake
def _quantized_moe_block_fake(x, logits, route_tensors, w1, w2, b1, b2, route_config, quantized_config):
    return torch.empty_like(x)
