"""Implementations of the ``moepass.experts`` op, one module per target.

``run_experts`` picks one from the op's config: ``cpu`` (torch ops, the
default off-GPU), ``triton`` (fused kernels, the default for CUDA tensors) or
``reference`` (a plain per-slot loop, the ground truth in tests).
``run_quantized_experts`` does the same for ``moepass.quantized_experts``:
``cpu_quantized`` (ATen's int8/int4 kernels) or the dequantized reference.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["run_experts", "run_quantized_experts", "resolve_lowering"]

logger = logging.getLogger(__name__)


def resolve_lowering(requested: str, device: torch.device) -> str:
    """The implementation to use for ``requested`` on ``device``."""
    if requested != "auto":
        return requested
    return "triton" if device.type == "cuda" else "cpu"


def run_experts(x, ids, weights, w1, w2, b1, b2, cfg):
    """Dispatch one experts call to the configured lowering."""
    if cfg.offload:  # weights in an expert store: read through its cache (CPU)
        from moepass.runtime.offload.experts import experts_forward as offloaded_forward

        return offloaded_forward(x, ids, weights, cfg.spec, cfg.offload)
    lowering = resolve_lowering(cfg.lowering, x.device)
    if lowering == "cpu":
        from moepass.lowering.cpu import experts_forward

        return experts_forward(x, ids, weights, w1, w2, b1, b2, cfg.spec, cfg.cpu_prepack)
    if lowering == "reference":
        from moepass.lowering.reference import experts_forward
    elif lowering == "triton":
        from moepass.lowering.triton import experts_forward
    else:  # guarded by ExpertsConfig, kept for a clear message
        raise ValueError(f"unknown lowering {lowering!r}")
    return experts_forward(x, ids, weights, w1, w2, b1, b2, cfg.spec)


def run_quantized_experts(x, ids, weights, w1, w2, b1, b2, cfg):
    """Dispatch one quantized experts call (:mod:`moepass.runtime.quantized_ops`): CPU or the reference.

    Quantized experts run on the CPU (ATen's weight-only kernels); the
    reference lowering computes the same codes dequantized in float32.
    """
    experts = cfg.experts
    if experts.offload:  # codes in an expert store: read through its cache (CPU)
        from moepass.runtime.offload.experts import quantized_experts_forward

        return quantized_experts_forward(x, ids, weights, experts.spec, cfg.scheme, experts.offload)
    lowering = resolve_lowering(experts.lowering, x.device)
    if lowering == "reference":
        from moepass.lowering.reference import quantized_experts_forward

        return quantized_experts_forward(x, ids, weights, w1, w2, b1, b2, experts.spec, cfg.scheme, cfg.form)
    if lowering != "cpu" or x.device.type != "cpu":
        raise ValueError(
            f"quantized experts run on the CPU lowering (ATen's int8/int4 kernels); got lowering {lowering!r} "
            f"on {x.device.type} tensors"
        )
    from moepass.lowering.cpu_quantized import experts_forward

    return experts_forward(x, ids, weights, w1, w2, b1, b2, experts.spec, cfg.scheme, cfg.form)
