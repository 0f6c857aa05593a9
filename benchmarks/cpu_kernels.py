"""Measure the CPU lowering's per-expert projection kernels and write the table that picks one.

For each dtype and projection shape (the first and second projections of the
Mixtral-, OLMoE- and Qwen3-30B-A3B-shaped experts of ``moe_block_cpu.py``, and
of the bundled model's tiny experts, where per-call overheads decide;
[out, in] weights) and each row count, it runs the projection with each
kernel of :mod:`moepass.lowering.cpu_kernels` (token-major, weight-major,
gemv at one row, and on pre-packed weights for bfloat16) expert after expert, over enough experts that their weights
come from memory, not cache (as in a real block, whose lowering runs all first
projections, then all second ones), and times the kernels interleaved (A, B,
C, A, B, C … medians).  The fastest at each row count goes into
``moepass/lowering/cpu_kernels.json``, which the lowering reads: column ``kernels``
without packed weights, ``kernels_packed`` with them.  A kernel must be
faster by ``--margin`` (default 10%), and faster in 80% of the rounds, to
displace token-major, the default (and what transformers' ``grouped_mm``
runs), so noise does not pick it.

Usage::

    python benchmarks/cpu_kernels.py [--dtypes float32 bfloat16] [--shapes mixtral olmoe qwen3_moe bundled]
        [--rows 1 2 3 4 6 8 12 16 24 32 48 64 128 256] [--rounds 5] [--out moepass/lowering/cpu_kernels.json]
        [--merge] [--dry-run]

``--merge`` replaces only the entries measured (dtype, projection) and keeps
the table's others; every entry carries the date it was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import machine_description, today
from moe_block_cpu import SHAPES
from moepass.lowering.cpu_kernels import KERNELS, TABLE_PATH, project
from moepass.lowering.cpu_packed import PACKED_DTYPES

#: Weights touched per timed pass: well past the last-level cache.
PASS_BYTES = 192 << 20
#: FLOPs per timed pass at most (at many rows).
PASS_FLOPS = 4e9


#: (hidden, intermediate, experts cycled through) of expert shapes beyond moe_block_cpu's: the bundled
#: model (gated; 8 experts × 4 layers, 12 MB in all: its weights stay in cache, as they do in the model).
EXTRA_SHAPES = {"bundled": (128, 256, 32)}


def projections(shape_names: list[str]) -> dict[str, tuple[int, int]]:
    """name → (out, in) of the first and second projection of each shape's experts."""
    result = {}
    for name in shape_names:
        hidden, inter = EXTRA_SHAPES[name][:2] if name in EXTRA_SHAPES else (SHAPES[name].hidden, SHAPES[name].inter)
        result[f"{name}.first"] = (2 * inter, hidden)
        result[f"{name}.second"] = (hidden, inter)
    return result


def measure(name: str, out_features: int, in_features: int, dtype: torch.dtype, rows_list, rounds: int,
            experts: int | None = None):
    """Seconds per expert of each kernel at each row count (over ``experts`` matrices; by default enough
    that their weights come from memory)."""
    matrix_bytes = out_features * in_features * dtype.itemsize
    experts = experts or max(4, PASS_BYTES // matrix_bytes)
    g = torch.Generator().manual_seed(0)
    weights = (torch.randn(experts, out_features, in_features, generator=g) * 0.02).to(dtype)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights] if dtype in PACKED_DTYPES else None
    results = {}
    for rows in rows_list:
        # each expert its own input and output rows, as in a block (rows sorted by expert)
        xs = torch.randn(experts, rows, in_features, generator=g).to(dtype)
        out = torch.empty(experts, rows, out_features, dtype=dtype)
        kernels = [k for k in KERNELS if (k != "gemv" or rows == 1) and (k != "packed" or packed is not None)]
        # past a few dozen rows the GEMMs are compute-bound: fewer experts keep a pass short
        passes = max(2, min(experts, int(PASS_FLOPS // (2 * rows * out_features * in_features))))

        def run_all(kernel):
            for e in range(passes):
                project(kernel, xs[e], out[e], weights[e], None, False, packed[e] if kernel == "packed" else None)

        samples = {k: [] for k in kernels}
        for k in kernels:
            run_all(k)
        for _ in range(rounds):
            for k in kernels:
                t0 = time.perf_counter()
                run_all(k)
                samples[k].append((time.perf_counter() - t0) / passes)
        results[rows] = {k: statistics.median(v) for k, v in samples.items()}
        # the fraction of rounds each kernel beat token-major in: a pick must win consistently
        results[rows]["wins"] = {
            k: sum(a < b for a, b in zip(v, samples["token_major"])) / len(v) for k, v in samples.items()
        }
        best = min(kernels, key=results[rows].get)
        print(
            f"{name:18s} {str(dtype):15s} rows {rows:4d}: "
            + "  ".join(f"{k} {results[rows][k] * 1e6:7.0f} µs ({matrix_bytes / results[rows][k] / 1e9:5.1f} GB/s)" for k in kernels)
            + f"  → {best}",
            flush=True,
        )
    return results


def pick(measured: dict, margin: float, with_packed: bool = False, min_wins: float = 0.8) -> str:
    """The fastest kernel (packed only ``with_packed``), unless token-major is within ``margin`` of it
    or the kernel beat token-major in fewer than ``min_wins`` of the rounds."""
    wins = measured["wins"]
    times = {k: t for k, t in measured.items() if k != "wins" and (with_packed or k != "packed")}
    best = min(times, key=times.get)
    if best != "token_major" and (times["token_major"] <= times[best] * (1 + margin) or wins[best] < min_wins):
        return "token_major"
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=[*SHAPES, *EXTRA_SHAPES], choices=[*SHAPES, *EXTRA_SHAPES])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--margin", type=float, default=0.10)
    parser.add_argument("--out", type=Path, default=TABLE_PATH)
    parser.add_argument("--merge", action="store_true", help="keep the table's entries that were not measured")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write the table")
    args = parser.parse_args()
    load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine_description()}; load average {load}")
    entries = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for name, (out_features, in_features) in projections(args.shapes).items():
            shape = name.split(".")[0]
            experts = EXTRA_SHAPES[shape][2] if shape in EXTRA_SHAPES else None
            times = measure(name, out_features, in_features, dtype, args.rows, args.rounds, experts)
            entries.append(
                {
                    "dtype": dtype_name,
                    "projection": name,
                    "out": out_features,
                    "in": in_features,
                    "date": today(),
                    "kernels": {str(r): pick(t, args.margin) for r, t in times.items()},
                    "kernels_packed": {str(r): pick(t, args.margin, with_packed=True) for r, t in times.items()},
                    "microseconds": {
                        str(r): {k: round(v * 1e6, 1) for k, v in t.items() if k != "wins"} for r, t in times.items()
                    },
                }
            )
    if args.merge and args.out.exists():
        measured = {(e["dtype"], e["projection"]) for e in entries}
        kept = [e for e in json.loads(args.out.read_text())["entries"] if (e["dtype"], e["projection"]) not in measured]
        entries = kept + entries
    table = {
        "about": "Fastest CPU kernel of one expert projection by dtype, shape and rows; written by benchmarks/cpu_kernels.py.",
        "machine": machine_description(),
        "date": today(),
        "load_average": load,
        "entries": entries,
    }
    text = json.dumps(table, indent=1) + "\n"
    if args.dry_run:
        print(text)
        return
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
