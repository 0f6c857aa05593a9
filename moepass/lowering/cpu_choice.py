"""Which kernel and which path the CPU lowering takes, read from this machine's tables (family ``cpu_experts``).

Two kinds of entries, in :mod:`moepass.runtime.tuning`'s machine-keyed tables
(:mod:`moepass.lowering.cpu_tuning` measures them and says what they mean)::

    projection <dtype> <out>x<in> <plain|packed>   → the kernel per rows per expert (:func:`choose_kernel`)
    block <dtype> E=.. H=.. N1=.. I=.. <layout>[ bias] <plain|packed>
                                                   → the path per live rows (:func:`choose_path`)

Both are read once per process and table change (``lru_cache`` keyed by the
thread count and :func:`moepass.runtime.tuning.generation`): a call pays a
dictionary lookup, not a file read.  With no entry for this machine a
projection takes the nearest shape measured on this machine, else on another
machine (logged once, with what to run), else token-major; a block takes the
``moepass`` path.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
from pathlib import Path

import torch

from moepass.compiler.spec import ExpertsSpec
from moepass.lowering.cpu_kernels import onednn_available
from moepass.runtime import tuning
from moepass.runtime.machine import current_machine

__all__ = [
    "FAMILY",
    "PATHS",
    "TUNED_DTYPES",
    "block_key",
    "choose_kernel",
    "choose_path",
    "projection_choices",
    "projection_key",
]

logger = logging.getLogger(__name__)

FAMILY = tuning.Family("cpu_experts", version=1, shipped=Path(__file__).with_name("tables") / "cpu_experts")
#: The paths a block can take (see :mod:`moepass.lowering.cpu_tuning`).
PATHS = ("moepass", "grouped_mm")
#: dtypes the tables cover (others run token-major on the moepass path).
TUNED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def projection_key(dtype: torch.dtype, out_features: int, in_features: int, packed: bool) -> str:
    """The entry key of one projection shape ([out, in] weights)."""
    return f"projection {_dtype_name(dtype)} {out_features}x{in_features} {'packed' if packed else 'plain'}"


@functools.lru_cache(maxsize=256)
def block_key(spec: ExpertsSpec, dtype: torch.dtype, n1: int, packed: bool) -> str:
    """The entry key of a block shape: what its path choice depends on besides the machine."""
    layout = "[E,in,out]" if spec.transposed else "[E,out,in]"
    bias = " bias" if spec.has_bias else ""
    return (f"block {_dtype_name(dtype)} E={spec.num_experts} H={spec.hidden_size} N1={n1} "
            f"I={spec.intermediate_size} {layout}{bias} {'packed' if packed else 'plain'}")


# --- choosing a kernel per projection ---------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _warn_other_machine(where: str) -> None:
    logger.warning(
        "no CPU kernel table for this machine (%s): projection kernels come from the table of %s. "
        "Let the first compile measure (options={'cpu_tuning': 'auto'}, $MOEPASS_TUNING) or run "
        "`moepass tune --cpu <model>`", current_machine().describe(), where,
    )


def _column(entry: dict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    rows = sorted((int(r), k) for r, k in entry["kernels"].items())
    return tuple(r for r, _ in rows), tuple(k for _, k in rows)


def _parse_projection(key: str) -> tuple[str, int, int, bool] | None:
    parts = key.split()
    if len(parts) != 4 or parts[0] != "projection":
        return None
    out_features, _, in_features = parts[2].partition("x")
    return parts[1], int(out_features), int(in_features), parts[3] == "packed"


def _nearest(entries: dict[str, dict], dtype: str, out_features: int, in_features: int, packed: bool):
    """The projection entry of ``entries`` nearest in shape (same dtype and packing, not empty), or None."""
    best, best_distance = None, math.inf
    for key, entry in entries.items():
        parsed = _parse_projection(key)
        if parsed is None or parsed[0] != dtype or parsed[3] != packed or not entry.get("kernels"):
            continue
        distance = abs(math.log(parsed[1] / out_features)) + abs(math.log(parsed[2] / in_features))
        if distance < best_distance:
            best, best_distance = entry, distance
    return best


@functools.lru_cache(maxsize=512)
def _projection_choices(dtype: torch.dtype, out_features: int, in_features: int, packed: bool,
                        threads: int, generation: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(row counts, kernel at each) for a projection shape: this machine's entry, else the nearest shape
    measured on this machine, else on another machine, else token-major everywhere."""
    del threads, generation  # cache keys: the machine's thread count and the tables' state
    found = tuning.lookup(FAMILY, projection_key(dtype, out_features, in_features, packed))
    if found and found.entry.get("kernels"):  # an entry a budget left empty falls through to the nearest shape
        return _column(found.entry)
    name = _dtype_name(dtype)
    own = tuning.machine_entries(FAMILY)
    entry = _nearest(own, name, out_features, in_features, packed)
    if entry is None:
        for other, entries, path in tuning.other_machine_tables(FAMILY):
            entry = _nearest(entries, name, out_features, in_features, packed)
            if entry is not None:
                _warn_other_machine(f"{other.describe()} ({path.name})")
                break
    return _column(entry) if entry is not None else ((1,), ("token_major",))


def projection_choices(dtype: torch.dtype, out_features: int, in_features: int, packed: bool):
    """(row counts, kernel at each) the lowering uses for this projection shape now."""
    return _projection_choices(dtype, out_features, in_features, packed, torch.get_num_threads(), tuning.generation())


def choose_kernel(rows: int, weight_shape, dtype: torch.dtype, transposed: bool, packed: bool = False) -> str:
    """The kernel for a projection of ``rows`` rows by one expert's weight (shape as stored).

    Beyond the largest row count measured the GEMMs are compute-bound: token-major, or packed if
    packed won there.  [in, out] weights run token-major (the kernels that differ need [out, in]).
    """
    if transposed or dtype not in TUNED_DTYPES:
        return "token_major"
    counts, kernels = projection_choices(dtype, weight_shape[0], weight_shape[1], packed)
    if rows > counts[-1]:
        return "packed" if kernels[-1] == "packed" and packed and onednn_available() else "token_major"
    kernel = kernels[max(bisect.bisect_right(counts, rows) - 1, 0)]
    if (kernel == "gemv" and rows != 1) or (kernel in ("onednn", "packed") and not onednn_available()):
        return "token_major"
    if kernel == "packed" and not packed:
        return "token_major"
    return kernel


# --- choosing a path per row count ------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _path_points(key: str, threads: int, generation: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    del threads, generation
    found = tuning.lookup(FAMILY, key)
    if not found:
        return (), ()
    points = sorted((int(p["rows"]), p["path"]) for p in found.entry.get("points", []) if p.get("path") in PATHS)
    return tuple(r for r, _ in points), tuple(p for _, p in points)


def choose_path(key: str, live_rows: int) -> str:
    """The path for a call with ``live_rows`` non-empty slots: the choice at the largest measured row
    count not above them (the smallest one's below it); ``moepass`` when nothing was measured."""
    rows, paths = _path_points(key, torch.get_num_threads(), tuning.generation())
    if not rows:
        return "moepass"
    return paths[max(bisect.bisect_right(rows, live_rows) - 1, 0)]
