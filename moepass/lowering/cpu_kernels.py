"""One expert projection on its rows, five ways.

::

    token_major   out = xs Wᵀ                       [rows, in] @ [in, out]
    weight_major  outᵀ = W xsᵀ, then transposed     [out, in] @ [in, rows]
    gemv          one row: out = W x, through ATen's own matrix-vector kernel
                  (oneDNN switched off around the call)
    onednn        out = xs Wᵀ through oneDNN's linear on W as stored (float32: ``torch.mm``
                  runs MKL, which on the AMD CI machine reaches about half oneDNN's rate)
    packed        out = xs Wᵀ on a copy of W pre-packed for oneDNN (bfloat16 inference,
                  lowering/cpu_packed.py: costs the weight's memory again)

All compute the same rows; which is fastest depends on the rows, the dtype,
the projection's size and — by an order of magnitude — the machine.  On the
2-core CI machine (AMD EPYC, AVX-512 BF16), for example, a bfloat16
matrix-vector product through oneDNN (what ``torch.mm`` picks for bfloat16)
reorders the weights on every call and streams them at about 10 GB/s on one
thread, while ATen's own bfloat16 gemv streams them at about 20 GB/s; from two
rows on, oneDNN wins; on a CPU with AMX, oneDNN's bfloat16 kernels run AMX
tiles and the balance moves again.  So the choice is data, measured on the
machine that runs it: :mod:`moepass.lowering.cpu_tuning` keeps it.

Every kernel writes ``out`` in token-major layout, so the activation between
the two projections runs on the same layout whichever kernels ran.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from moepass.compiler.spec import ExpertsSpec
from moepass.lowering.activations import apply_activation, split_gate_up, unary_activation

__all__ = ["KERNELS", "project", "onednn_available", "activate_inplace"]

logger = logging.getLogger(__name__)

KERNELS = ("token_major", "weight_major", "gemv", "onednn", "packed")

@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this torch has the oneDNN linear ops the ``onednn`` and ``packed`` kernels call."""
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(torch.ops.mkldnn, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
        )
    except (AttributeError, RuntimeError):
        return False


def activate_inplace(h: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """act(h) for h [rows, N1], reusing ``h``'s storage where the math allows."""
    if spec.activation == "lifted":
        return apply_activation(h, spec)
    if not spec.gated:
        if spec.activation == "silu":
            return F.silu(h, inplace=True)
        if spec.activation == "relu":
            return h.relu_()
        return unary_activation(spec.activation, h)
    gate, up = split_gate_up(h, spec)
    if spec.activation == "swiglu_clamp":
        limit = spec.swiglu_limit
        gate = gate.clamp(max=limit)
        glu = gate * torch.sigmoid(gate * spec.swiglu_alpha)
        return up.clamp_(min=-limit, max=limit).add_(1).mul_(glu)
    if spec.activation == "silu":
        return F.silu(gate, inplace=True).mul_(up)
    return unary_activation(spec.activation, gate).mul_(up)


def project(kernel: str, xs: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, bias, transposed: bool,
            packed: torch.Tensor | None = None) -> None:
    """``out`` [rows, out_features] = xs Wᵀ + bias with ``kernel``.

    ``weight`` is one expert's matrix as stored: [out, in], or [in, out] when
    ``transposed``; ``packed`` its pre-packed copy (kernel ``packed`` only).
    """
    if kernel == "token_major":
        operand = weight if transposed else weight.t()
        if bias is None:
            torch.mm(xs, operand, out=out)
        else:
            torch.addmm(bias, xs, operand, out=out)
    elif kernel == "weight_major":
        matrix = weight.t() if transposed else weight
        result_t = torch.mm(matrix, xs.t()) if bias is None else torch.addmm(bias.unsqueeze(1), matrix, xs.t())
        out.copy_(result_t.t())
    elif kernel == "gemv":
        matrix = weight.t() if transposed else weight
        enabled = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            if bias is None:
                torch.mv(matrix, xs[0], out=out[0])
            else:
                torch.addmv(bias, matrix, xs[0], out=out[0])
        finally:
            torch._C._set_mkldnn_enabled(enabled)
    elif kernel == "onednn":  # [out, in] weights only (the table's scope)
        out.copy_(torch.ops.mkldnn._linear_pointwise(xs, weight, bias, "none", [], ""))
    elif kernel == "packed":
        out.copy_(torch.ops.mkldnn._linear_pointwise(xs, packed, bias, "none", [], ""))
    else:
        raise ValueError(f"unknown CPU kernel {kernel!r}; expected one of {KERNELS}")
