"""Measure this machine's CPU kernel table for the benchmark shapes and ship it with the package.

The CPU lowering's choices (which kernel runs each expert projection at each
row count; which path — moepass's or the model's own ``grouped_mm`` GEMMs —
each block shape takes at each row count) are measured on the machine that
runs them (:mod:`moepass.lowering.cpu_tuning`): a first compile measures a
missing shape within a short budget, ``moepass tune --cpu`` ahead of time.
This script measures the shapes of ``moe_block_cpu.py`` (Mixtral-, OLMoE- and
Qwen3-30B-A3B-shaped experts at their real sizes) and the bundled model's, in
float32 and bfloat16 (bfloat16 with and without pre-packed weights), with a
generous budget, into ``moepass/lowering/tables/cpu_experts/<machine>.json``:
the table shipped for this kind of machine (CPU model, ISA features, cores,
torch version and thread count must all match for a user to get it).  Run it
on a quiet machine.

Usage::

    python benchmarks/cpu_kernels.py [--shapes mixtral olmoe qwen3_moe bundled] [--dtypes float32 bfloat16]
        [--seconds 300] [--quick] [--out moepass/lowering/tables/cpu_experts]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from _common import machine_description
from moe_block_cpu import SHAPES

from moepass.lowering import cpu_choice, cpu_tuning

#: (experts, top-k, hidden, intermediate) of shapes beyond moe_block_cpu's: the bundled model.
EXTRA_SHAPES = {"bundled": (8, 2, 128, 256)}


def shape_of(name: str) -> tuple[int, int, int, int]:
    """(E, k, H, I) of a shape name."""
    if name in EXTRA_SHAPES:
        return EXTRA_SHAPES[name]
    shape = SHAPES[name]
    return shape.experts, shape.top_k, shape.hidden, shape.inter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[*SHAPES, *EXTRA_SHAPES], choices=[*SHAPES, *EXTRA_SHAPES])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--seconds", type=float, default=300.0, help="budget per block shape and packing")
    parser.add_argument("--quick", action="store_true", help="fewer row counts (a smoke run)")
    parser.add_argument("--out", type=Path, default=cpu_choice.FAMILY.shipped)
    args = parser.parse_args()
    load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine_description()}; load average {load}")
    rows = cpu_tuning.QUICK_ROWS if args.quick else cpu_tuning.FULL_ROWS
    started = time.time()
    for name in args.shapes:
        experts, top_k, hidden, inter = shape_of(name)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for prepack in ("on", "off") if dtype == torch.bfloat16 else ("off",):
                result = cpu_tuning.tune_shape(experts, hidden, inter, top_k, dtype, args.seconds, rows,
                                               cpu_tuning.TOKEN_POINTS, out=args.out, prepack=prepack)
                print(f"\n{name} {result.key}:")
                for line in result.lines():
                    print(f"  {line}")
    after = "/".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n{(time.time() - started) / 60:.1f} min; load average {load} before, {after} after; wrote {args.out}")


if __name__ == "__main__":
    main()
