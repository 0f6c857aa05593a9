"""What a quantization of the experts is: bits and group size, and the checks on a user's choice.

``options={"experts_dtype": "int8"}`` quantizes each output channel of each
expert projection with one scale (per-channel, symmetric); ``"int4"`` each
group of :data:`DEFAULT_INT4_GROUP` input features (``"group_size": 32 | 64 |
128 | 256``), with a scale and an integer zero point per group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = [
    "EXPERTS_DTYPES",
    "INT4_GROUP_SIZES",
    "DEFAULT_INT4_GROUP",
    "QuantScheme",
    "QuantizeError",
    "parse_scheme",
    "projection_bytes",
]

#: What ``experts_dtype`` may be (None, or the float dtype the model has, means no quantization).
EXPERTS_DTYPES = ("int8", "int4")
#: int4 group sizes the CPU kernel (``_weight_int4pack_mm_for_cpu``) and ONNX Runtime's QMoE both take.
INT4_GROUP_SIZES = (32, 64, 128, 256)
#: The int4 default.  On the bundled model g32 / g64 / g128 cost +0.32% / +0.42% / +0.19% perplexity
#: (static, 131k held-out bytes: within round-off of each other; README, "Quantized experts"); 64 reads
#: 0.56 bytes per weight with bfloat16 scales and zero offsets (g32 0.63, g128 0.53) and is a group size
#: quantized checkpoints commonly use, where larger experts than the bundled model's lose more at g128.
DEFAULT_INT4_GROUP = 64


class QuantizeError(ValueError):
    """A quantization the experts cannot take (the message says what is valid)."""


@dataclass(frozen=True)
class QuantScheme:
    """One quantization of stacked expert weights [E, out, in].

    ``group_size`` input features share a scale (and, with ``symmetric``
    False, an integer zero point); 0 means one group per output channel (the
    whole row).  Codes are signed for 8 bits (dequantized ``q · s``) and
    unsigned for 4 bits (``(q − z) · s``, z = 8 when symmetric).
    """

    bits: int
    group_size: int = 0
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise QuantizeError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size < 0:
            raise QuantizeError(f"group_size must be positive (or 0: per channel), got {self.group_size}")

    @property
    def name(self) -> str:
        """``int8`` or ``int4``."""
        return f"int{self.bits}"

    def groups(self, in_features: int) -> int:
        """Scales per output channel for rows of ``in_features``."""
        return 1 if self.group_size == 0 else in_features // self.group_size

    def group_of(self, in_features: int) -> int:
        """Input features per scale for rows of ``in_features``."""
        return in_features if self.group_size == 0 else self.group_size

    def describe(self) -> str:
        """``int8 per-channel`` / ``int4 g64 asymmetric``."""
        group = "per-channel" if self.group_size == 0 else f"g{self.group_size}"
        kind = "" if self.symmetric else " asymmetric"
        return f"{self.name} {group}{kind}"

    def check_shape(self, in_features: int, what: str = "the experts") -> None:
        """Raise :class:`QuantizeError` unless rows of ``in_features`` split into whole groups (and bytes)."""
        if self.group_size and in_features % self.group_size:
            raise QuantizeError(
                f"{what}: {in_features} input features do not split into groups of {self.group_size}"
            )
        if self.bits == 4 and in_features % 2:
            raise QuantizeError(f"{what}: int4 packs two codes per byte; {in_features} input features is odd")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantScheme":
        return cls(**data)


def parse_scheme(experts_dtype: Any, group_size: Any = None) -> QuantScheme | None:
    """The scheme a user's ``experts_dtype`` / ``group_size`` name (None: the experts stay as they are).

    Raises:
        QuantizeError: an unknown dtype, a group size the kernels do not take,
            or a group size without a dtype.
    """
    if experts_dtype is None or experts_dtype in ("float", "none", "bfloat16", "float32", "float16"):
        if group_size is not None:
            raise QuantizeError(f"group_size={group_size!r} needs experts_dtype 'int8' or 'int4'")
        return None
    if experts_dtype not in EXPERTS_DTYPES:
        raise QuantizeError(
            f"unknown experts_dtype {experts_dtype!r}; valid: {', '.join(EXPERTS_DTYPES)} (or None: as the model has them)"
        )
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)):
        raise QuantizeError(f"group_size must be an integer, got {group_size!r}")
    if experts_dtype == "int8":
        if group_size not in (None, 0):
            raise QuantizeError(
                f"int8 experts are quantized per output channel (the layout torch._weight_int8pack_mm "
                f"and ONNX Runtime's 8-bit QMoE run); group_size={group_size} is for int4"
            )
        return QuantScheme(bits=8, group_size=0, symmetric=True)
    group = DEFAULT_INT4_GROUP if group_size is None else group_size
    if group not in INT4_GROUP_SIZES:
        raise QuantizeError(
            f"int4 group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} (what the CPU int4 kernel "
            f"and ONNX Runtime's QMoE take), got {group}"
        )
    return QuantScheme(bits=4, group_size=group, symmetric=False)


def projection_bytes(out_features: int, in_features: int, scheme: QuantScheme | None, element_bytes: int = 2,
                     scale_bytes: int = 2) -> int:
    """Bytes one expert's projection [out, in] occupies (and a one-token decode reads).

    Float (``scheme`` None): ``element_bytes`` per weight.  int8: a byte per
    weight and a scale per output channel.  int4: half a byte per weight and,
    per group, a scale and a zero offset — ``scale_bytes`` each, as the CPU
    kernels hold them (2: bfloat16 activations).
    """
    weights = out_features * in_features
    if scheme is None:
        return weights * element_bytes
    if scheme.bits == 8:
        return weights + out_features * scheme.groups(in_features) * scale_bytes
    return weights // 2 + out_features * scheme.groups(in_features) * 2 * scale_bytes
