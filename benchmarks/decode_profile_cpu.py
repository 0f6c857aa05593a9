"""Where one decode token's time goes in a moepass block on CPU, against the memory floor.

Issue 12's decode target is 1.3× the memory floor (bytes of the experts the
token hits ÷ read bandwidth).  This script shows what stands between the
static rewrite and that floor, for each shape and dtype at one token:

* the floor, from the read bandwidth measured in the same run (a sum over
  1 GiB) — and the rate one expert projection's own kernel streams its weights
  at (the kernel the CPU table picks for one row), which bounds what any
  lowering built from these kernels can reach;
* the block's time through ``torch.compile(block, backend="adaptive_moe")``
  and, from ``torch.profiler``, the part spent inside the expert kernels
  against everything else (the experts op's own Python, routing, dynamo's
  guards and the compiled graph's call).

Usage::

    python benchmarks/decode_profile_cpu.py [--shapes mixtral olmoe qwen3_moe] [--dtypes bfloat16 float32] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import machine_description, markdown_table, memory_bandwidths, time_it, today, write_section
from moe_block_cpu import SHAPES, compiled, experts_hit, make_shape_block
from moepass.lowering.cpu_kernels import project
from moepass.lowering.cpu_choice import choose_kernel
from torch.profiler import ProfilerActivity, profile

import moepass  # noqa: F401  (registers the ops)

#: ATen ops the CPU lowering's per-expert projections run as (the kernels the table picks).
KERNEL_OPS = ("aten::addmv", "aten::mv", "aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")


def kernel_stream_rate(shape, dtype: torch.dtype, copies: int = 8) -> tuple[str, float]:
    """(kernel, bytes/s) of one-row projections by the first (gate/up) weight of ``copies`` experts."""
    gated_out = 2 * shape.inter
    weights = [torch.empty(gated_out, shape.hidden, dtype=dtype).normal_(0, 0.02) for _ in range(copies)]
    x = torch.randn(1, shape.hidden, dtype=dtype)
    out = torch.empty(1, gated_out, dtype=dtype)
    kernel = choose_kernel(1, weights[0].shape, dtype, transposed=False)

    def run():
        for w in weights:
            project(kernel, x, out, w, None, False)

    seconds = time_it(run, repeat=15, warmup=3) / copies
    return kernel, weights[0].numel() * weights[0].element_size() / seconds


def profile_block(block, x: torch.Tensor, calls: int = 50) -> tuple[float, float]:
    """(median seconds per call, the part of it inside the expert kernels) of ``block(x)``."""
    with torch.no_grad():
        for _ in range(5):
            block(x)
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            block(x)
            samples.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                block(x)
            profiled = time.perf_counter() - t0
    # the profiler slows every op down a little: take the kernels' share of the
    # profiled wall time, applied to the unprofiled median
    share = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in KERNEL_OPS) / 1e6 / profiled
    median = statistics.median(samples)
    return median, min(share, 1.0) * median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()

    read = memory_bandwidths()["read"]
    print(f"machine: {machine_description()}; read bandwidth {read / 1e9:.1f} GB/s")
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            block = make_shape_block(shape, "grouped_mm", dtype)
            static = compiled(block, f"profile_{shape_name}_{dtype_name}", backend="adaptive_moe")
            x = torch.randn(1, 1, shape.hidden, dtype=dtype)
            hit = experts_hit(block, x)
            expert_bytes = hit * shape.expert_bytes(dtype)
            floor = expert_bytes / read
            kernel, rate = kernel_stream_rate(shape, dtype)
            total, in_kernels = profile_block(static, x)
            kernel_bound = expert_bytes / rate
            rows.append(
                [
                    shape.label,
                    dtype_name,
                    f"{floor * 1e3:.2f}",
                    f"{kernel} {rate / 1e9:.0f} GB/s",
                    f"{kernel_bound * 1e3:.2f} ({kernel_bound / floor:.2f}×)",
                    f"{in_kernels * 1e3:.2f}",
                    f"{(total - in_kernels) * 1e3:.2f}",
                    f"{total * 1e3:.2f} ({total / floor:.2f}×)",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
            del block, static
            torch._dynamo.reset()

    header = [
        "shape", "dtype", "memory floor (ms)", "one-row kernel streams at", "kernel bound (ms, × floor)",
        "in expert kernels (ms)", "everything else (ms)", "static block (ms, × floor)",
    ]
    body = (
        "## One decode token: the static block against the memory floor (`benchmarks/decode_profile_cpu.py`)\n\n"
        f"{today()} — {machine_description()}; read bandwidth {read / 1e9:.1f} GB/s (a sum over 1 GiB).  "
        "Memory floor = bytes of the experts the token hits ÷ read bandwidth; kernel bound = the same bytes ÷ the "
        "rate the CPU table's one-row kernel streams one expert's gate/up weight at (8 distinct experts, so no "
        "cache reuse); the block is `torch.compile(block, backend=\"adaptive_moe\")`, its split from "
        "`torch.profiler` (self time of the expert GEMM/GEMV ops against the rest: the experts op's Python, routing, "
        "dynamo's guards, the compiled graph's call).\n\n" + markdown_table(header, rows)
    )
    print(body)
    if not args.no_write:
        write_section("decode_profile_cpu", body)


if __name__ == "__main__":
    main()
