"""Which kernel a quantized projection runs at each row count, read from this machine's tables (family
``cpu_quantized``; :mod:`moepass.lowering.cpu_quantized_tuning` measures them and says what they hold).

Read once per process and table change (``lru_cache`` keyed by
:func:`moepass.runtime.tuning.generation`): a call pays a dictionary lookup.
"""

from __future__ import annotations

import functools

import torch

from moepass.quantize.scheme import QuantScheme
from moepass.runtime import tuning

__all__ = ["FAMILY", "chosen_kernel", "projection_key"]

#: Version 2: entries hold a kernel column per operand form (``native`` with the native ``gemv``, ``aten_cpu``).
#: Version 4: kernels timed on weights read from memory (caches evicted before each call), the fused few-token
#: path's saving an entry of its own.
FAMILY = tuning.Family("cpu_quantized", version=4, shipped=None)


def projection_key(scheme: QuantScheme, dtype: torch.dtype, out_features: int, in_features: int,
                   native: bool = False) -> str:
    """The entry key of one quantized projection shape (``native``: measured with the native kernel among the
    candidates — an entry measured without it does not answer for a process that has it)."""
    kind = "int8" if scheme.bits == 8 else f"int4 g{scheme.group_of(in_features)}"
    return f"quantized {kind} {str(dtype).removeprefix('torch.')} {out_features}x{in_features}" + (" +gemv" if native else "")


@functools.lru_cache(maxsize=512)
def _column(key: str, form: str, generation: int) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    del generation  # a cache key: the tables' state
    found = tuning.lookup(FAMILY, key)
    kernels = found.entry.get("kernels", {}).get(form) if found else None
    if not kernels:
        return None
    rows = sorted((int(r), k) for r, k in kernels.items())
    return tuple(r for r, _ in rows), tuple(k for _, k in rows)


@functools.lru_cache(maxsize=512)
def _shape_column(scheme: QuantScheme, dtype: torch.dtype, out_features: int, in_features: int, form: str,
                  native: bool, generation: int):
    return _column(projection_key(scheme, dtype, out_features, in_features, native), form, generation)


def chosen_kernel(scheme: QuantScheme, dtype: torch.dtype, out_features: int, in_features: int,
                  rows: int, form: str = "aten_cpu") -> str | None:
    """The measured kernel for ``rows`` rows of this projection in ``form`` on this machine, or None (no entry)."""
    generation = tuning.generation()
    # the native form's column is only in entries measured with the native kernel; ATen's is in either (never
    # asks for the native library: the run-time choice builds nothing)
    column = None
    for native in ((True,) if form == "native" else (False, True)):
        column = _shape_column(scheme, dtype, out_features, in_features, form, native, generation)
        if column is not None:
            break
    if column is None:
        return None
    counts, kernels = column
    position = max(i for i, count in enumerate(counts) if count <= rows) if rows >= counts[0] else 0
    return kernels[position]
