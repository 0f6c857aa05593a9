"""Which kernel a quantized projection runs at each row count, measured on the machine (family ``cpu_quantized``).

An entry of :mod:`moepass.runtime.tuning`'s machine-keyed tables per
quantized projection shape::

    quantized <int8|int4 gG> <dtype> <out>x<in>
        {"kernels": {"1": "aten", "4": "aten", "16": "dequant", …},
         "microseconds": {"1": {"aten": 81.0, "dequant": 940.0}, …}}

``aten`` is ATen's weight-only kernel on the block's operands
(``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``), ``dequant`` the
expert dequantized into the activations' dtype and a float GEMM
(:mod:`moepass.lowering.cpu_quantized`).  The backend's quantize stage calls
:func:`prepare_projection` for each projection it quantizes into ATen's form:
the entry is looked up (the user's cache) or measured there and then on one
expert of the block's own operands, at :data:`ROWS`, within the budget of
``options={"cpu_tuning": ...}`` / ``$MOEPASS_TUNING``
(:data:`DEFAULT_BUDGET` seconds per shape by default), and stored for later
compiles and processes.  :func:`moepass.lowering.cpu_quantized_choice.chosen_kernel`
reads it back at run time (cached per process and table generation); a shape with no entry takes the
heuristic of :data:`moepass.lowering.cpu_quantized.ATEN_UP_TO_ROWS`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from moepass.lowering.cpu_quantized import _project_quantized, operand_shape
from moepass.lowering.cpu_quantized_choice import FAMILY, _column, _shape_column, projection_key
from moepass.quantize.scheme import QuantScheme
from moepass.runtime import tuning

__all__ = ["DEFAULT_BUDGET", "ROWS", "prepare_projection"]

logger = logging.getLogger(__name__)

#: Rows per expert the two kernels are compared at.
ROWS = (1, 4, 16, 64, 256)
#: Seconds a first compile may spend measuring one projection shape.
DEFAULT_BUDGET = 4.0
#: A kernel must beat the other by this much to be chosen over ``aten`` (noise does not pick).
MARGIN = 0.10


def prepare_projection(scheme: QuantScheme, operands: list[torch.Tensor], dtype: torch.dtype, setting: Any,
                       description: str) -> str:
    """Look up, or measure within the budget ``setting`` gives, the kernel table of one quantized projection
    in ATen's form; returns how it was found (for the report)."""
    experts, out_features, in_features = operand_shape(operands, "aten_cpu", scheme)
    key = projection_key(scheme, dtype, out_features, in_features)
    budget = tuning.tuning_budget(setting, DEFAULT_BUDGET)
    one = [t[:1] for t in operands]  # one expert: what a row count costs does not depend on which

    def measure(measurement: tuning.Measurement) -> dict:
        kernels, times = {}, {}
        for rows in ROWS:
            x = torch.randn(rows, in_features).to(dtype)
            out = torch.empty(rows, out_features, dtype=dtype)

            def run(kernel: str):
                return lambda: _project_quantized(x, out, [rows], one, None, scheme, "aten_cpu", note=False,
                                                  kernel=kernel)

            samples = measurement.compare(f"{key} rows {rows}", {"aten": run("aten"), "dequant": run("dequant")},
                                          cost_hint=rows * out_features * in_features + out_features * in_features)
            if samples is None:
                continue
            aten, dequant = tuning.best(samples["aten"]), tuning.best(samples["dequant"])
            kernels[str(rows)] = "dequant" if dequant < aten * (1 - MARGIN) else "aten"
            times[str(rows)] = {"aten": round(aten * 1e6, 1), "dequant": round(dequant * 1e6, 1)}
        return {"kernels": kernels, "microseconds": times}

    try:
        with torch.no_grad():
            found = tuning.obtain(FAMILY, key, measure, budget, description)
    except (RuntimeError, ValueError, OSError) as failure:  # a lost choice, not a wrong answer
        logger.warning("moepass: could not measure %s (%s): the heuristic choice runs", key, failure)
        return "heuristic (measurement failed)"
    _column.cache_clear()
    _shape_column.cache_clear()
    if not found:
        return "heuristic (not measured: tuning off)"
    return {"measured": "measured now", "process": "measured earlier in this process"}.get(
        found.source, f"{found.source} table")
