"""One expert projection on its rows, three ways, and the measured table that picks one.

::

    token_major   out = xs Wᵀ                       [rows, in] @ [in, out]
    weight_major  outᵀ = W xsᵀ, then transposed     [out, in] @ [in, rows]
    gemv          one row: out = W x, through ATen's own matrix-vector kernel
                  (oneDNN switched off around the call)
    onednn        out = xs Wᵀ through oneDNN's linear on W as stored (float32: ``torch.mm``
                  runs MKL, which on the AMD CI machine reaches about half oneDNN's rate)
    packed        out = xs Wᵀ on a copy of W pre-packed for oneDNN (bfloat16 inference,
                  lowering/cpu_packed.py: costs the weight's memory again)

All three compute the same rows; which is fastest depends on the rows, the
dtype and the projection's size, and not the same way for each.  On the
2-core CI machine (AMD EPYC, AVX-512 BF16), for example, a bfloat16
matrix-vector product through oneDNN (what ``torch.mm`` picks for bfloat16)
reorders the weights on every call and streams them at about 10 GB/s on one
thread, while ATen's own bfloat16 gemv streams them at about 20 GB/s; from two
rows on, oneDNN wins.  So the choice is data: ``cpu_kernels.json`` beside this
file holds, per dtype and projection shape measured (``python
benchmarks/cpu_kernels.py`` writes it), the fastest kernel at each row count;
:func:`choose_kernel` takes the entry of the nearest shape and the largest
measured row count not above the rows at hand; with pre-packed weights it
reads the ``kernels_packed`` column (the fastest of all four).  Dtypes the
table does not cover, row counts above its largest (where the GEMMs are
compute-bound and both unpacked forms reach the GEMM rate; packed stays packed
if it won at the largest), and [in, out] weights (the table measures [out, in]
ones) run token-major — the GEMM transformers' ``grouped_mm`` runs.

Every kernel writes ``out`` in token-major layout, so the activation between
the two projections runs on the same layout whichever kernels ran.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from moepass.lowering.activations import apply_activation, split_gate_up, unary_activation

from moepass.compiler.spec import ExpertsSpec

__all__ = ["KERNELS", "project", "choose_kernel", "kernel_table", "onednn_available", "TABLE_PATH", "activate_inplace"]

logger = logging.getLogger(__name__)

KERNELS = ("token_major", "weight_major", "gemv", "onednn", "packed")

#: The measured table (see the module docstring).
TABLE_PATH = Path(__file__).with_name("cpu_kernels.json")


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


@functools.lru_cache(maxsize=1)
def kernel_table() -> dict:
    """The measured table (empty when the file is missing or unreadable: everything runs token-major)."""
    try:
        return json.loads(TABLE_PATH.read_text())
    except (OSError, ValueError) as error:
        logger.warning("no CPU kernel table (%s): every expert runs token-major", error)
        return {}


@functools.lru_cache(maxsize=256)
def _choices(dtype: torch.dtype, out_features: int, in_features: int, packed: bool) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(row counts, kernel at each) of the table entry nearest to this projection shape."""
    name = str(dtype).removeprefix("torch.")
    entries = [e for e in kernel_table().get("entries", []) if e["dtype"] == name]
    if not entries:
        return (1,), ("token_major",)

    def distance(entry) -> float:
        return abs(math.log(entry["out"] / out_features)) + abs(math.log(entry["in"] / in_features))

    best = min(entries, key=distance)
    column = best.get("kernels_packed", best["kernels"]) if packed else best["kernels"]
    rows = sorted((int(r), k) for r, k in column.items())
    return tuple(r for r, _ in rows), tuple(k for _, k in rows)


def choose_kernel(rows: int, weight_shape, dtype: torch.dtype, transposed: bool, packed: bool = False) -> str:
    """The kernel the measured table gives for a projection of ``rows`` rows by one expert's weight.

    ``weight_shape`` is the expert's matrix shape as stored ([out, in], or
    [in, out] when ``transposed``); ``packed``: whether a pre-packed copy may
    be used (the table's ``kernels_packed`` column, else ``kernels``).
    """
    if transposed:  # the table measures [out, in] weights only
        return "token_major"
    counts, kernels = _choices(dtype, weight_shape[0], weight_shape[1], packed)
    if rows > counts[-1]:  # beyond the table the GEMMs are compute-bound: token-major, or packed if it won last
        return "packed" if kernels[-1] == "packed" and onednn_available() else "token_major"
    kernel = kernels[max(bisect.bisect_right(counts, rows) - 1, 0)]
    if (kernel == "gemv" and rows != 1) or (kernel in ("onednn", "packed") and not onednn_available()):
        return "token_major"
    return kernel
