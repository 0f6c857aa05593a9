"""Shared helpers of the benchmark scripts: timing, machine rates, RESULTS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def time_it(fn: Callable[[], object], repeat: int = 10, warmup: int = 2, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    samples = []
    started = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median wall time of each ``fn`` in seconds, timed A, B, C, A, B, C, ...

    A shared machine drifts by tens of percent within a minute; timing the
    variants in turns puts the same drift on each, so their ratios hold even
    when absolute times do not.  Rounds continue until ``rounds`` are done and
    ``min_seconds`` have passed.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    while min(len(s) for s in samples.values()) < rounds or time.perf_counter() - started < min_seconds:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine_description() -> str:
    """CPU model, cores, torch version."""
    model = platform.processor() or "cpu"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"Model name:\s*(.+)", lscpu)
        if found:
            model = found.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def gemm_rate(m: int = 1024, k: int = 1024, n: int = 5632, dtype: torch.dtype = torch.float32) -> float:
    """Measured GEMM rate in FLOP/s for [m, k] @ [k, n] in ``dtype`` (float32 by default).

    The best of ``torch.mm`` (MKL for float32, oneDNN for bfloat16) and
    oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``): on the AMD CI
    machine MKL's float32 GEMM reaches about half of oneDNN's, so ``torch.mm``
    alone would understate what the hardware does.
    """
    return max(gemm_rates(m, k, n, dtype).values())


def gemm_rates(m: int = 1024, k: int = 1024, n: int = 5632, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """FLOP/s of [m, k] @ [k, n] in ``dtype`` through ``torch.mm`` and (where available) oneDNN's linear."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    rates = {"torch.mm": 2 * m * k * n / time_it(lambda: torch.mm(a, b, out=out), repeat=10)}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        weight = b.t().contiguous()  # [n, k]: the linear's layout
        seconds = time_it(lambda: torch.ops.mkldnn._linear_pointwise(a, weight, None, "none", [], ""), repeat=10)
        rates["oneDNN linear"] = 2 * m * k * n / seconds
    return rates


def memory_bandwidths(size_bytes: int = 1 << 30) -> dict[str, float]:
    """Bytes per second: ``copy`` (bytes copied / time), ``copy_rw`` (read + write,
    the STREAM convention) and ``read`` (a reduction over the buffer)."""
    src = torch.empty(size_bytes // 4).normal_()
    dst = torch.empty_like(src)
    copy_seconds = time_it(lambda: dst.copy_(src), repeat=5)
    read_seconds = time_it(lambda: src.sum(), repeat=5)
    return {"copy": size_bytes / copy_seconds, "copy_rw": 2 * size_bytes / copy_seconds, "read": size_bytes / read_seconds}


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nEach section is written by the script it names; numbers come from one run.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def today() -> str:
    return datetime.date.today().isoformat()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
