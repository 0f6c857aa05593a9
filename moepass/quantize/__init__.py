"""Quantized experts: the one packed layout moepass runs, makes and adapts.

::

    float experts [E, out, in] ──► quantize_rtn (once, at compile time) ─┐
    quantized checkpoints  ──► adapters (torchao int8, MXFP4, GPTQ/AWQ) ─┴─► QuantizedWeight
                                                                              │ codes, scales, zero points
            lowering/cpu_quantized (ATen int8/int4 kernels) ◄─────────────────┤
            exports (QMoE, MatMulNBits, DequantizeLinear) ◄───────────────────┤
            runtime/offload (the expert store holds the codes) ◄──────────────┘

:mod:`~moepass.quantize.scheme` names a quantization (``int8`` per channel,
``int4`` in groups) and checks a user's choice; :mod:`~moepass.quantize.layout`
is the packed layout and round-to-nearest quantization into it;
:mod:`~moepass.quantize.adapters` reads quantized checkpoints' stored formats
into it.

May import: nothing of moepass but the compiler's contract
(``moepass.compiler.spec``); everyone else may import it (``tests/test_layout.py``).
"""

from moepass.quantize.layout import QuantizedWeight, dequantize, quantize_rtn
from moepass.quantize.scheme import EXPERTS_DTYPES, QuantizeError, QuantScheme, parse_scheme

__all__ = [
    "EXPERTS_DTYPES",
    "QuantScheme",
    "QuantizeError",
    "QuantizedWeight",
    "dequantize",
    "parse_scheme",
    "quantize_rtn",
]
