"""The packed layout of quantized experts, and round-to-nearest quantization into it.

One stacked projection, ``[E, out, in]`` as the experts compute it (a model's
``[E, in, out]`` weights are transposed once, when quantized)::

    codes    int8  [E, out, in]        8 bits: signed codes (round-to-nearest writes [−127, 127])
             uint8 [E, out, in/2]      4 bits: two codes per byte, low nibble first
                                       (column 2j in the low nibble, 2j+1 in the high)
    scales   float32 [E, out, in/G]    one per group of G input features (G = in: per channel)
    zeros    uint8 [E, out, in/G]      4 bits only, optional: the group's integer zero point
                                       (None: 8, symmetric); 8 bits are always symmetric

    weight[e, n, k] = (q[e, n, k] − z[e, n, k // G]) · s[e, n, k // G]

The layout is the portable one: what the expert store writes, what the ONNX
exports turn into QMoE / MatMulNBits / DequantizeLinear operands, what the
adapters read checkpoints into.  A lowering may run it in a form of its own
(the CPU lowering's ATen operands, :mod:`moepass.lowering.cpu_quantized`),
derived from it once.

Round-to-nearest (:func:`quantize_rtn`): 8 bits per channel, symmetric
(s = max|w| / 127); 4 bits per group, asymmetric (s = (max − min) / 15,
z = round(−min / s) clamped to [0, 15]) or symmetric (s = max|w| / 7, z = 8).
A group of zeros gets s = 1 (its codes dequantize to exact zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moepass.quantize.scheme import QuantizeError, QuantScheme

__all__ = [
    "QuantizedWeight", "quantize_rtn", "dequantize", "pack_int4", "unpack_int4", "pack_int4_row_blocks",
    "unpack_int4_row_blocks",
]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in/2] from codes 0…15 in any integer dtype [..., in] (low nibble = even column)."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0…15 [..., in] from :func:`pack_int4`'s bytes [..., in/2]."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def pack_int4_row_blocks(codes: torch.Tensor, block: int) -> torch.Tensor:
    """uint8 [..., N, K/2] from codes 0…15 [..., N, K] in *row-block* order (ATen's CPU int4 operand order).

    Rows go in blocks of ``block``; the byte at (b, k, j) of ``[..., N / block, K, block / 2]`` holds
    row b·block + j in its low nibble and row b·block + block/2 + j in its high nibble, both at column k
    (found on the AVX-512 and AVX2 builds of torch 2.13 with block 64; checked on real codes wherever
    it is used, see :mod:`moepass.lowering.cpu_quantized`).
    """
    *lead, rows, columns = codes.shape
    half = block // 2
    grid = codes.to(torch.uint8).reshape(*lead, rows // block, block, columns)
    packed = grid[..., :half, :] | (grid[..., half:, :] << 4)  # [..., N/block, block/2, K]
    return packed.transpose(-1, -2).contiguous().reshape(*lead, rows, columns // 2)


def unpack_int4_row_blocks(packed: torch.Tensor, block: int) -> torch.Tensor:
    """Codes 0…15 [..., N, K] from :func:`pack_int4_row_blocks`'s bytes [..., N, K/2]."""
    *lead, rows, half_columns = packed.shape
    columns = 2 * half_columns
    grid = packed.reshape(*lead, rows // block, columns, block // 2)
    both = torch.cat([grid & 0x0F, grid >> 4], dim=-1)  # [..., N/block, K, block]
    return both.transpose(-1, -2).reshape(*lead, rows, columns)


@dataclass
class QuantizedWeight:
    """One stacked projection in the packed layout (see the module docstring)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    scheme: QuantScheme
    #: (E, out, in): the logical shape.
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        experts, out_features, in_features = self.shape
        groups = self.scheme.groups(in_features)
        width = in_features if self.scheme.bits == 8 else in_features // 2
        expected = {
            "codes": ((experts, out_features, width), torch.int8 if self.scheme.bits == 8 else torch.uint8),
            "scales": ((experts, out_features, groups), torch.float32),
        }
        if self.zeros is not None:
            if self.scheme.bits == 8:
                raise QuantizeError("int8 codes are symmetric: no zero points")
            expected["zeros"] = ((experts, out_features, groups), torch.uint8)
        for name, (shape, dtype) in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise QuantizeError(
                    f"{self.scheme.describe()} {name} must be {list(shape)} {str(dtype).removeprefix('torch.')}, "
                    f"got {list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
                )

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def group(self) -> int:
        """Input features per scale."""
        return self.scheme.group_of(self.shape[2])

    def nbytes(self) -> int:
        """Bytes of codes, scales and zero points (the layout as stored)."""
        tensors = [self.codes, self.scales] + ([self.zeros] if self.zeros is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def expert(self, index: int) -> "QuantizedWeight":
        """Expert ``index`` alone, as a stack of one (views, no copy)."""
        zeros = None if self.zeros is None else self.zeros[index : index + 1]
        return QuantizedWeight(
            self.codes[index : index + 1], self.scales[index : index + 1], zeros, self.scheme, (1, *self.shape[1:])
        )

    def integer_codes(self) -> torch.Tensor:
        """The codes one per element, int16 [E, out, in] (signed for 8 bits, 0…15 for 4 bits)."""
        if self.scheme.bits == 8:
            return self.codes.to(torch.int16)
        return unpack_int4(self.codes).to(torch.int16)

    def zero_points(self) -> torch.Tensor:
        """Zero point per group, int16 [E, out, in/G] (0 for int8, 8 for symmetric int4)."""
        if self.zeros is not None:
            return self.zeros.to(torch.int16)
        fill = 0 if self.scheme.bits == 8 else 8
        return torch.full(self.scales.shape, fill, dtype=torch.int16, device=self.scales.device)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (``codes``, ``scales`` and, if present, ``zeros``)."""
        found = {"codes": self.codes, "scales": self.scales}
        if self.zeros is not None:
            found["zeros"] = self.zeros
        return found


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weights [E, out, in] the codes stand for, computed in float32 then cast to ``dtype``."""
    group = weight.group
    codes = weight.integer_codes().float()
    zeros = weight.zero_points().float().repeat_interleave(group, dim=-1)
    scales = weight.scales.repeat_interleave(group, dim=-1)
    return ((codes - zeros) * scales).to(dtype)


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme, transposed: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of stacked expert weights ``[E, out, in]`` (``[E, in, out]`` if ``transposed``).

    Computed in float32 on ``weight``'s device, one expert at a time (peak
    memory: one expert in float32); returns the packed layout on the CPU.
    """
    if weight.dim() != 3:
        raise QuantizeError(f"stacked expert weights are 3-D [E, out, in], got shape {list(weight.shape)}")
    experts = weight.shape[0]
    out_features, in_features = (weight.shape[2], weight.shape[1]) if transposed else weight.shape[1:]
    scheme.check_shape(in_features)
    group, groups = scheme.group_of(in_features), scheme.groups(in_features)
    width = in_features if scheme.bits == 8 else in_features // 2
    codes = torch.empty(experts, out_features, width, dtype=torch.int8 if scheme.bits == 8 else torch.uint8)
    scales = torch.empty(experts, out_features, groups, dtype=torch.float32)
    zeros = None if scheme.symmetric or scheme.bits == 8 else torch.empty(experts, out_features, groups, dtype=torch.uint8)
    with torch.no_grad():
        for expert in range(experts):
            matrix = weight[expert].detach().float()
            if transposed:
                matrix = matrix.t()
            q, s, z = _rtn_matrix(matrix.reshape(out_features, groups, group), scheme)
            codes[expert] = (q.reshape(out_features, in_features) if scheme.bits == 8 else pack_int4(q.reshape(out_features, in_features))).cpu()
            scales[expert] = s.cpu()
            if zeros is not None:
                zeros[expert] = z.cpu()
    return QuantizedWeight(codes, scales, zeros, scheme, (experts, out_features, in_features))


def _rtn_matrix(grouped: torch.Tensor, scheme: QuantScheme):
    """Codes [out, groups, G], scales [out, groups], zero points [out, groups] (or None) of one matrix."""
    if scheme.bits == 8 or scheme.symmetric:
        top = 127 if scheme.bits == 8 else 7
        absmax = grouped.abs().amax(dim=-1)
        scales = torch.where(absmax > 0, absmax / top, torch.ones_like(absmax))
        q = torch.round(grouped / scales.unsqueeze(-1)).clamp(-top - (scheme.bits == 4), top)
        if scheme.bits == 8:
            return q.to(torch.int8), scales, None
        return (q + 8).to(torch.uint8), scales, None
    low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    low, high = low.clamp(max=0), high.clamp(min=0)  # the range holds 0, so 0 is a code: zero weights stay exact
    span = high - low
    scales = torch.where(span > 0, span / 15, torch.ones_like(span))
    zeros = torch.round(-low / scales).clamp(0, 15)
    q = (torch.round(grouped / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, 15)
    return q.to(torch.uint8), scales, zeros.to(torch.uint8)
