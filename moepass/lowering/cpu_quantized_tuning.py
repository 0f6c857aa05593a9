"""Which form a quantized block's operands take, and which kernel each projection runs per row count, measured
on the machine (family ``cpu_quantized``).

An entry of :mod:`moepass.runtime.tuning`'s machine-keyed tables per
quantized projection shape (`` +gemv`` when the native kernel was among the candidates)::

    quantized <int8|int4 gG> <dtype> <out>x<in>[ +gemv]
        {"kernels": {"aten_cpu": {"1": "aten", "16": "dequant", …},      the best kernel of each form
                     "native":   {"1": "gemv", "16": "dequant", …}},     per row count
         "microseconds": {"1": {"aten_cpu:aten": 81.0, "aten_cpu:dequant": 940.0,
                                "native:gemv": 45.0, "native:dequant": 600.0}, …}}

The candidates, on one expert of the block's own weights at :data:`ROWS`, each call
after that expert's bytes were flushed from the caches (with the native
library's ``clflush``: decode reads its experts from memory, and on a
cache-resident expert a compute-bound kernel wins that loses in the model):
``aten_cpu:aten`` (ATen's weight-only kernel on its own operands),
``aten_cpu:dequant`` (those operands dequantized + a float GEMM),
``native:gemv`` (moepass's native kernel on the portable layout,
:mod:`moepass.lowering.cpu_qgemv`) and ``native:dequant``.  The ATen form is a
candidate for 16-bit activations and the schemes ATen takes; the native form
only when measuring is allowed (tuning on: the library is built then, ~3 s
once per machine, into the cache folder) and the kernel builds, loads, passes
its check and takes the scheme.  A block with neither runs the ``plain`` form
(dequantize + GEMM: nothing to choose).

The backend's quantize stage calls :func:`choose_form` for each block it
quantizes: the two projections' entries are looked up (the user's cache) or
measured there and then, within the budget of ``options={"cpu_tuning": ...}``
/ ``$MOEPASS_TUNING`` (:data:`DEFAULT_BUDGET` seconds per shape by default),
and stored; the block takes the form whose best kernels cost less over the
row counts (geometric mean of the two projections' summed times, so decode and
prefill weigh alike; ``plain`` must win by :data:`MARGIN` to replace ATen's
form).  Where the native form runs a few-token call as one native call
(:func:`moepass.lowering.cpu_quantized.fused_decode_usable`), the Python the
op spends around its projections is gone too: one more entry per scheme and
dtype, ``quantized op overhead …``, times the whole op on a tiny problem both
ways, and the difference is taken off the native form's times at the row
counts it runs fused.  :func:`moepass.lowering.cpu_quantized_choice.chosen_kernel` reads the
kernel columns back at run time.  With tuning off, or no complete entry, the
native form is never chosen and nothing is built: ATen's form (else
``plain``) with the heuristics of :mod:`moepass.lowering.cpu_quantized` —
the same choice on every machine with the same shapes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from moepass.lowering.cpu_quantized import (
    ATEN_DTYPES,
    FORM_KERNELS,
    _project_quantized,
    aten_cpu_supported,
    native_gemv_usable,
    to_aten_cpu,
)
from moepass.lowering.cpu_quantized_choice import FAMILY, _column, _shape_column, projection_key
from moepass.quantize.layout import QuantizedWeight
from moepass.quantize.scheme import QuantScheme
from moepass.runtime import tuning

__all__ = ["DEFAULT_BUDGET", "ROWS", "MARGIN", "candidate_forms", "prepare_projection", "choose_form", "block_form", "fused_rows", "fused_saving", "overhead_key",
           "decode_op_times"]

logger = logging.getLogger(__name__)

#: Rows per expert the kernels are compared at.
ROWS = (1, 4, 16, 64, 256)
#: Seconds a first compile may spend measuring one projection shape.
DEFAULT_BUDGET = 4.0
#: A kernel (or form) must beat ATen's by this much to be chosen over it (noise does not pick).
MARGIN = 0.10


def candidate_forms(scheme: QuantScheme, layouts: list[QuantizedWeight], dtype: torch.dtype,
                    native: bool) -> list[str]:
    """The operand forms a block of ``layouts`` may take on this machine for activations of ``dtype``
    (``native``: whether the native kernel may be asked for — building it if need be)."""
    forms = []
    if dtype in ATEN_DTYPES and all(aten_cpu_supported(scheme, lay.shape[2]) for lay in layouts):
        forms.append("aten_cpu")
    if native and all(native_gemv_usable(scheme, lay.shape[2], dtype) for lay in layouts):
        forms.append("native")
    return forms or ["plain"]


def prepare_projection(scheme: QuantScheme, layout: QuantizedWeight, dtype: torch.dtype, forms: list[str],
                       setting: Any, description: str) -> tuple[dict | None, str]:
    """Look up, or measure within the budget ``setting`` gives, the kernel table of one quantized projection;
    returns (its entry or None, how it was found — for the report)."""
    _, out_features, in_features = layout.shape
    native = "native" in forms
    key = projection_key(scheme, dtype, out_features, in_features, native)
    budget = tuning.tuning_budget(setting, DEFAULT_BUDGET)
    one = layout.expert(0)  # one expert: what a row count costs does not depend on which
    operands = {"native": list(one.tensors().values())}
    if "aten_cpu" in forms:
        operands["aten_cpu"] = to_aten_cpu(one, dtype)
    candidates = [(form, kernel) for form in forms for kernel in FORM_KERNELS[form]]
    weights = [tensor for form_operands in operands.values() for tensor in form_operands]

    def evict() -> None:
        """The expert's operands out of the caches before each call (with the native library, which has the
        instruction; the native form is only a candidate with it): decode reads its experts from memory, and
        on cache-resident weights a compute-bound kernel wins that loses in the model."""
        if native:
            from moepass.lowering import cpu_qgemv

            cpu_qgemv.flush_caches(weights)

    def measure(measurement: tuning.Measurement) -> dict:
        kernels: dict[str, dict[str, str]] = {form: {} for form in forms}
        times: dict[str, dict[str, float]] = {}
        for rows in ROWS:
            x = torch.randn(rows, in_features).to(dtype)
            out = torch.empty(rows, out_features, dtype=dtype)

            def run(form: str, kernel: str):
                return lambda: _project_quantized(x, out, [rows], operands[form], None, scheme, form, note=False,
                                                  kernel=kernel)

            samples = measurement.compare(
                f"{key} rows {rows}", {f"{form}:{kernel}": run(form, kernel) for form, kernel in candidates},
                cost_hint=rows * out_features * in_features + out_features * in_features, before=evict)
            if samples is None:
                continue
            best = {name: tuning.best(values) for name, values in samples.items()}
            times[str(rows)] = {name: round(seconds * 1e6, 1) for name, seconds in best.items()}
            for form in forms:
                kernels[form][str(rows)] = _best_kernel(form, best)
        return {"kernels": kernels, "microseconds": times}

    try:
        with torch.no_grad():
            found = tuning.obtain(FAMILY, key, measure, budget, description)
    except (RuntimeError, ValueError, OSError) as failure:  # a lost choice, not a wrong answer
        logger.warning("moepass: could not measure %s (%s): the heuristic choice runs", key, failure)
        return None, "heuristic (measurement failed)"
    _column.cache_clear()
    _shape_column.cache_clear()
    if not found:
        return None, "heuristic (not measured: tuning off)"
    how = {"measured": "measured now", "process": "measured earlier in this process"}.get(found.source,
                                                                                          f"{found.source} table")
    return found.entry, how


def _best_kernel(form: str, seconds: dict[str, float]) -> str:
    """The kernel of ``form`` to run, from one row count's best times (ATen's own kernel keeps its place unless
    dequantizing beats it by :data:`MARGIN`)."""
    timed = {kernel: seconds[f"{form}:{kernel}"] for kernel in FORM_KERNELS[form] if f"{form}:{kernel}" in seconds}
    if form == "aten_cpu":
        return "dequant" if timed["dequant"] < timed["aten"] * (1 - MARGIN) else "aten"
    return min(timed, key=timed.get)


def _form_seconds(entry: dict, form: str, rows: str) -> float | None:
    timed = entry.get("microseconds", {}).get(rows, {})
    values = [seconds for name, seconds in timed.items() if name.startswith(f"{form}:")]
    return min(values) if values else None


def fused_rows(entries: list[dict]) -> int:
    """The largest measured row count up to which the native form runs every row count fused (``gemv`` in
    both projections and within :data:`moepass.lowering.cpu_quantized.FUSED_UP_TO_TOKENS`); 0 for none."""
    from moepass.lowering.cpu_quantized import FUSED_UP_TO_TOKENS

    fused = 0
    for rows in ROWS:
        kernels = [entry.get("kernels", {}).get("native", {}).get(str(rows)) for entry in entries]
        if rows > FUSED_UP_TO_TOKENS or any(kernel != "gemv" for kernel in kernels):
            break
        fused = rows
    return fused


def block_form(entries: list[dict], forms: list[str], fused_saving: float = 0.0,
               decode: dict[str, float] | None = None) -> str:
    """The form a block runs, from its projections' entries: the lowest geometric mean over the row counts all
    entries measured of the summed best times (``native`` replaces ``aten_cpu`` only when :data:`MARGIN` faster).
    ``fused_saving`` (µs per call): what the native form saves at the row counts it runs fused
    (:func:`fused_rows`), taken off its summed time there (never below a tenth of it).  ``decode`` (µs per
    form): the whole op at one token (:func:`decode_op_times`), which replaces the one-row sums where it has
    every form."""
    if len(forms) == 1:
        return forms[0]
    scores = {form: 0.0 for form in forms}
    counted = 0
    fused = fused_rows(entries) if fused_saving > 0 else 0
    for rows in map(str, ROWS):
        totals = {}
        for form in forms:
            parts = [_form_seconds(entry, form, rows) for entry in entries]
            if any(part is None for part in parts):
                break
            totals[form] = sum(parts)
            if rows == "1" and decode and all(f in decode for f in forms):
                totals[form] = decode[form]
            elif form == "native" and int(rows) <= fused:
                totals[form] = max(totals[form] - fused_saving, totals[form] / 10)
        else:
            for form in forms:
                scores[form] += math.log(totals[form])
            counted += 1
    if not counted:
        return "aten_cpu" if "aten_cpu" in forms else forms[0]
    if "aten_cpu" in forms and "native" in forms:
        return "native" if scores["native"] / counted < scores["aten_cpu"] / counted + math.log(1 - MARGIN) else "aten_cpu"
    return min(forms, key=scores.get)


def overhead_key(scheme: QuantScheme, dtype: torch.dtype) -> str:
    """The entry key of the op-overhead measurement (one per scheme and activation dtype)."""
    return f"quantized op overhead {scheme.describe()} {str(dtype).removeprefix('torch.')}"


def fused_saving(scheme: QuantScheme, dtype: torch.dtype, setting: Any) -> float:
    """Microseconds per call the native form's fused few-token path saves against ATen's form, beyond the
    kernels: the whole op on a tiny block (2 experts of 2·group × 2·group, one token, top-2, SwiGLU) in both
    forms, looked up or measured like the kernel entries; 0.0 when unknown or not positive."""
    from moepass.compiler.spec import ExpertsSpec
    from moepass.lowering.cpu_quantized import experts_forward, fused_decode_usable
    from moepass.quantize.layout import quantize_rtn

    width = 2 * max(scheme.group_of(256), 32) if scheme.bits == 4 else 64
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=2, hidden_size=width, intermediate_size=width,
                       activation="silu", gated=True, gate_up_layout="concat")
    generator = torch.Generator().manual_seed(0)
    layouts = [quantize_rtn(torch.randn(2, 2 * width, width, generator=generator), scheme),
               quantize_rtn(torch.randn(2, width, width, generator=generator), scheme)]
    x = torch.randn(1, width, generator=generator).to(dtype)
    ids, weights = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]).to(dtype)
    operands = {"native": [list(lay.tensors().values()) for lay in layouts],
                "aten_cpu": [to_aten_cpu(lay, dtype) for lay in layouts]}
    if not fused_decode_usable(x, ids, weights, *operands["native"], None, None, spec, scheme, "native"):
        return 0.0

    def measure(measurement: tuning.Measurement) -> dict:
        samples = measurement.compare(overhead_key(scheme, dtype), {
            form: (lambda form=form: experts_forward(x, ids, weights, *operands[form], None, None, spec, scheme, form))
            for form in ("aten_cpu", "native")})
        if samples is None:
            return {}
        return {"microseconds": {form: round(tuning.best(values) * 1e6, 1) for form, values in samples.items()}}

    try:
        with torch.no_grad():
            found = tuning.obtain(FAMILY, overhead_key(scheme, dtype), measure, tuning.tuning_budget(setting, 1.0),
                                  "quantized op overhead")
    except (RuntimeError, ValueError, OSError) as failure:
        logger.warning("moepass: could not measure the quantized op's overhead (%s)", failure)
        return 0.0
    timed = (found.entry or {}).get("microseconds", {}) if found else {}
    if "aten_cpu" not in timed or "native" not in timed:
        return 0.0
    return max(timed["aten_cpu"] - timed["native"], 0.0)


def decode_op_times(scheme: QuantScheme, layouts: list[QuantizedWeight], dtype: torch.dtype, spec,
                    forms: list[str], setting: Any) -> dict[str, float] | None:
    """Microseconds of the whole quantized op for one decode token in each form, on expert 0 of the block's
    own weights with the block's MLP (``spec``), that expert flushed from the caches before each call; looked
    up or measured like the kernel entries.  None when not measured (tuning off, no native library)."""
    import dataclasses

    from moepass.lowering import cpu_qgemv
    from moepass.lowering.cpu_quantized import experts_forward

    if "native" not in forms or len(forms) < 2:
        return None
    ones = [layout.expert(0) for layout in layouts]
    shapes = " ".join(f"{lay.shape[1]}x{lay.shape[2]}" for lay in ones)
    key = (f"quantized op {scheme.describe()} {str(dtype).removeprefix('torch.')} {shapes} "
           f"{spec.activation}/{spec.gate_up_layout}{'/weight-on-input' if spec.weight_on_input else ''}")
    one_spec = dataclasses.replace(spec, num_experts=1, transposed=False)
    operands = {form: [list(lay.tensors().values()) if form != "aten_cpu" else to_aten_cpu(lay, dtype) for lay in ones]
                for form in forms}
    weights = [tensor for pair in operands.values() for projection in pair for tensor in projection]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, ones[0].shape[2], generator=generator).to(dtype)
    ids, routing = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=dtype)

    def measure(measurement: tuning.Measurement) -> dict:
        samples = measurement.compare(key, {
            form: (lambda form=form: experts_forward(x, ids, routing, *operands[form], None, None, one_spec, scheme,
                                                     form))
            for form in forms}, before=lambda: cpu_qgemv.flush_caches(weights))
        if samples is None:
            return {}
        return {"microseconds": {form: round(tuning.best(values) * 1e6, 1) for form, values in samples.items()}}

    try:
        with torch.no_grad():
            found = tuning.obtain(FAMILY, key, measure, tuning.tuning_budget(setting, 2.0), "quantized decode op")
    except (RuntimeError, ValueError, OSError) as failure:
        logger.warning("moepass: could not measure the quantized op at one token (%s)", failure)
        return None
    timed = (found.entry or {}).get("microseconds") if found else None
    return dict(timed) if timed and all(form in timed for form in forms) else None


def choose_form(scheme: QuantScheme, layouts: list[QuantizedWeight], dtype: torch.dtype, setting: Any,
                description: str, spec=None) -> tuple[str, str]:
    """The operand form of a block's quantized experts on this machine and the report's words on how the
    kernels were chosen (see the module docstring).  With tuning off nothing is built and ``native`` is never
    chosen."""
    measuring = tuning.tuning_budget(setting, DEFAULT_BUDGET) is not None
    forms = candidate_forms(scheme, layouts, dtype, native=measuring)
    if forms == ["plain"]:
        return "plain", ""  # dequantize + GEMM is all the plain form has: nothing to choose
    found = [prepare_projection(scheme, layout, dtype, forms, setting, f"{description} {name}")
             for name, layout in zip(("w1", "w2"), layouts)]
    entries = [entry for entry, _ in found]
    hows = sorted({how for _, how in found})
    saving = 0.0
    if all(entry is not None for entry in entries):
        saving = fused_saving(scheme, dtype, setting) if {"native", "aten_cpu"} <= set(forms) and fused_rows(entries) else 0.0
        decode = decode_op_times(scheme, layouts, dtype, spec, forms, setting) if spec is not None else None
        form = block_form(entries, forms, saving, decode)
    else:  # not measured (completely): never the native kernel, which is a candidate only where it measured faster
        form = forms[0] if forms[0] != "native" else "plain"
    fused = (f"; calls of up to {fused_rows(entries)} rows per expert run as one native call ({saving:.0f} µs a call "
             f"less around the kernels than ATen's form)" if form == "native" and saving > 0 else "")
    return form, f"form {form}; kernels by row count: {', '.join(hows)}{fused}"
