"""Quantized checkpoints' stored formats, read into the packed layout without a second rounding.

Each function takes one projection of every expert as a format stores it and
returns a :class:`~moepass.quantize.layout.QuantizedWeight` ``[E, out, in]``
whose dequantized values are exactly the format's:

=================== ============================================ ==========================================
format              stored (per expert)                          packed layout
=================== ============================================ ==========================================
torchao int8        ``Int8Tensor``: qdata int8 [N, K], scale     int8 per channel: the same codes and scales
(per row)           float32 [N, 1] (block_size [1, K])
MXFP4 (gpt-oss)     blocks uint8 [N, K/32, 16]: two e2m1 codes   int8 in groups of 32: q = 2·e2m1 (an
                    a byte, low nibble first; scales uint8 E8M0  integer in [−12, 12]), s = 2^(e − 128)
                    [N, K/32] (exponent e − 127)
GPTQ (int4)         qweight int32 [K/8, N] (eight codes along    int4 in groups of G with zero points
                    K per word, low bits first), qzeros int32    z (+ 1 for the v1 checkpoint format),
                    [K/G, N/8] (along N), scales [K/G, N];       s = scales
                    w = (q − z)·s; g_idx trivial
AWQ (int4, GEMM)    qweight int32 [K, N/8] (eight codes along    int4 in groups of G with zero points
                    N per word in the order 0 2 4 6 1 3 5 7),
                    qzeros int32 [K/G, N/8] (same), scales
                    [K/G, N]; w = (q − z)·s
=================== ============================================ ==========================================

A format that does not fit (act-order GPTQ, whose ``g_idx`` regroups the
input features; 2/3/8-bit GPTQ; torchao int8 in groups) raises
:class:`~moepass.quantize.QuantizeError` saying so.
"""

from __future__ import annotations

import torch

from moepass.quantize.layout import QuantizedWeight, pack_int4
from moepass.quantize.scheme import QuantizeError, QuantScheme

__all__ = [
    "FP4_VALUES",
    "AWQ_ORDER",
    "from_torchao_int8",
    "from_mxfp4",
    "from_gptq",
    "from_awq",
    "unpack_columns",
    "unpack_rows",
]

#: e2m1 code → value (sign in bit 3): the OCP Microscaling FP4 table.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: AWQ's GEMM packing: nibble i of a word holds column 8j + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def from_torchao_int8(qdata: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
    """torchao ``Int8Tensor`` per row: qdata int8 [E, N, K], scale [E, N, 1] (symmetric)."""
    if qdata.dim() != 3 or qdata.dtype != torch.int8:
        raise QuantizeError(f"torchao int8 qdata must be int8 [E, N, K], got {qdata.dtype} {list(qdata.shape)}")
    experts, out_features, in_features = qdata.shape
    if tuple(scale.shape) not in ((experts, out_features, 1), (experts, out_features)):
        raise QuantizeError(
            f"torchao int8 scale {list(scale.shape)} is not one per row of [{experts}, {out_features}, "
            f"{in_features}] (grouped int8 is not the per-channel layout)"
        )
    scales = scale.reshape(experts, out_features, 1).float().contiguous()
    return QuantizedWeight(qdata.contiguous(), scales, None, QuantScheme(8, 0), (experts, out_features, in_features))


def from_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
    """gpt-oss MXFP4 as stored: blocks uint8 [E, N, K/32, 16], scales uint8 (E8M0) [E, N, K/32]."""
    if blocks.dim() != 4 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise QuantizeError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} are not [E, N, K/32, 16] and [E, N, K/32]"
        )
    experts, out_features, groups, _ = blocks.shape
    exponents = scales.to(torch.int32)
    if (exponents == 255).any():
        raise QuantizeError("MXFP4 scales hold 255 (E8M0 NaN)")
    table = torch.tensor([int(2 * v) for v in FP4_VALUES], dtype=torch.int8)
    raw = blocks.to(torch.uint8)
    codes = torch.stack([table[(raw & 0x0F).long()], table[(raw >> 4).long()]], dim=-1)  # low nibble first
    codes = codes.reshape(experts, out_features, groups * 32)
    float_scales = torch.ldexp(torch.full(exponents.shape, 0.5), exponents - 127)  # 2^(e − 127) / 2: q = 2·e2m1
    return QuantizedWeight(codes.contiguous(), float_scales.float(), None, QuantScheme(8, 32),
                           (experts, out_features, groups * 32))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] with 32/bits codes along the rows per word (low bits first) → codes [R·32/bits, C]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.to(torch.int32).unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0] * per_word, packed.shape[1])


def unpack_columns(packed: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """int32 [R, C] with 32/bits codes along the columns per word → codes [R, C·32/bits]; nibble i of word j
    is column j·(32/bits) + order[i] (default: i)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C, per_word]
    if order is not None:
        placed = torch.empty_like(values)
        placed[..., list(order)] = values
        values = placed
    return values.reshape(packed.shape[0], packed.shape[1] * per_word)


def _group_layout(codes_kn: list[torch.Tensor], zeros_gn: list[torch.Tensor], scales_gn: list[torch.Tensor],
                  group: int) -> QuantizedWeight:
    """Stack per-expert codes [K, N], zero points and scales [K/G, N] into the int4 layout [E, N, K]."""
    codes = torch.stack([c.t() for c in codes_kn])  # [E, N, K]
    zeros = torch.stack([z.t() for z in zeros_gn]).to(torch.uint8).contiguous()
    scales = torch.stack([s.t() for s in scales_gn]).float().contiguous()
    experts, out_features, in_features = codes.shape
    if zeros.max() > 15 or zeros.min() < 0:
        raise QuantizeError("int4 zero points outside [0, 15]")
    return QuantizedWeight(pack_int4(codes), scales, zeros, QuantScheme(4, group, symmetric=False),
                           (experts, out_features, in_features))


def _check_group(in_features: int, scales: torch.Tensor, g_idx: torch.Tensor | None) -> int:
    groups = scales.shape[0]
    if in_features % groups:
        raise QuantizeError(f"{groups} scale rows do not split {in_features} input features into groups")
    group = in_features // groups
    if g_idx is not None:
        expected = torch.arange(in_features, dtype=torch.int64) // group
        if not torch.equal(g_idx.to(torch.int64).reshape(-1), expected):
            raise QuantizeError(
                "act-order GPTQ (desc_act): g_idx regroups the input features, so a group is not a contiguous "
                "run of them as the packed layout needs"
            )
    if group not in (32, 64, 128, 256):
        raise QuantizeError(f"group size {group}: the int4 kernels take 32, 64, 128 or 256")
    return group


def from_gptq(experts: list[dict[str, torch.Tensor]], bits: int = 4, zero_format: str = "v2") -> QuantizedWeight:
    """GPTQ linears, one per expert (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``) → int4 layout.

    ``zero_format``: ``v2`` stores the zero point itself (gptqmodel in memory),
    ``v1`` the zero point minus one (the original GPTQ checkpoint format).
    """
    if bits != 4:
        raise QuantizeError(f"{bits}-bit GPTQ: the packed layout holds int4 with zero points (and symmetric int8)")
    if zero_format not in ("v1", "v2"):
        raise QuantizeError(f"unknown GPTQ zero format {zero_format!r}; expected v1 or v2")
    codes, zeros, scales, group = [], [], [], 0
    for linear in experts:
        qweight, qzeros, scale = linear["qweight"], linear["qzeros"], linear["scales"]
        values = unpack_rows(qweight, bits)  # [K, N]
        group = _check_group(values.shape[0], scale, linear.get("g_idx"))
        zero = unpack_columns(qzeros, bits)[:, : scale.shape[1]]
        codes.append(values)
        zeros.append(zero + 1 if zero_format == "v1" else zero)
        scales.append(scale)
    return _group_layout(codes, zeros, scales, group)


def from_awq(experts: list[dict[str, torch.Tensor]], bits: int = 4) -> QuantizedWeight:
    """AWQ GEMM linears, one per expert (``qweight`` [K, N/8], ``qzeros``, ``scales``) → int4 layout."""
    if bits != 4:
        raise QuantizeError(f"{bits}-bit AWQ: the packed layout holds int4")
    codes, zeros, scales, group = [], [], [], 0
    for linear in experts:
        values = unpack_columns(linear["qweight"], bits, AWQ_ORDER)  # [K, N]
        group = _check_group(values.shape[0], linear["scales"], None)
        codes.append(values)
        zeros.append(unpack_columns(linear["qzeros"], bits, AWQ_ORDER))
        scales.append(linear["scales"])
    return _group_layout(codes, zeros, scales, group)
