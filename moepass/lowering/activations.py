"""The expert activations, shared by every torch-level lowering."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moepass.compiler.spec import ExpertsSpec

__all__ = ["split_gate_up", "apply_activation", "unary_activation", "lifted_program"]


@functools.lru_cache(maxsize=256)
def lifted_program(text: str):
    """The parsed :class:`~moepass.compiler.lifted.ElementwiseProgram` of a lifted activation (cached)."""
    from moepass.compiler.lifted import ElementwiseProgram

    return ElementwiseProgram.from_json(text)


def unary_activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` for the plain activations."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"{name!r} is not a unary activation")


def split_gate_up(h: torch.Tensor, spec: ExpertsSpec, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the gate and up halves of a gate+up projection output (features along ``dim``)."""
    if spec.gate_up_layout == "interleaved":
        gate_index = [slice(None)] * h.ndim
        up_index = list(gate_index)
        gate_index[dim], up_index[dim] = slice(0, None, 2), slice(1, None, 2)
        return h[tuple(gate_index)], h[tuple(up_index)]
    half = h.shape[dim] // 2
    return h.narrow(dim, 0, half), h.narrow(dim, half, half)


def apply_activation(h: torch.Tensor, spec: ExpertsSpec, dim: int = -1) -> torch.Tensor:
    """The expert's activation on the first projection's output ``h`` [S, N1] -> [S, I] (features along ``dim``)."""
    if spec.activation == "lifted":
        return lifted_program(spec.program)(h, dim)
    if dim not in (-1, h.ndim - 1):
        return apply_activation(h.movedim(dim, -1), spec).movedim(-1, dim)
    if not spec.gated:
        return unary_activation(spec.activation, h)
    gate, up = split_gate_up(h, spec)
    if spec.activation == "swiglu_clamp":
        limit = spec.swiglu_limit
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))
    return unary_activation(spec.activation, gate) * up
