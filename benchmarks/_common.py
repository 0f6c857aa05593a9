"""Shared helpers of the benchmark scripts: timing, machine rates, RESULTS.md sections."""

from __future__ import annotations

import datetime
import re
import statistics
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


def interleaved_samples(
    fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1, min_seconds: float = 0.0
) -> dict[str, list[float]]:
    """Every wall time of each ``fn`` in seconds, timed A, B, C, A, B, C, ... (see :func:`interleaved_medians`)."""
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
    return samples


def interleaved_medians(
    fns: dict[str, Callable[[], object]], rounds: int = 7, warmup: int = 1, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median wall time of each ``fn`` in seconds, timed A, B, C, A, B, C, ...

    A shared machine drifts by tens of percent within a minute; timing the
    variants in turns puts the same drift on each, so their ratios hold even
    when absolute times do not.  Rounds continue until ``rounds`` are done and
    ``min_seconds`` have passed.
    """
    samples = interleaved_samples(fns, rounds, warmup, min_seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine_description() -> str:
    """CPU model, ISA features (AMX, AVX-512 BF16/VNNI, AVX2, NEON/SVE …), cores, torch version, threads:
    what moepass keys its kernel tables by (:class:`moepass.runtime.machine.Machine`)."""
    from moepass.runtime.machine import current_machine

    return current_machine().describe().replace(f"torch {current_machine().torch}", f"torch {torch.__version__}")


def machine_kind() -> str:
    """The kind of machine a result belongs to: CPU model and ISA features (RESULTS.md has a part per kind)."""
    from moepass.runtime.machine import current_machine

    return current_machine().kind


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


_INTRO = (
    "# Benchmark results\n\n"
    "Each section is written by the script it names; numbers come from one run.  CPU speed depends on the machine "
    "(bfloat16 GEMM rates differ by an order of magnitude between CPUs with AMX, AVX-512 BF16, AVX2 or NEON), so "
    "every timed section sits in the part of the machine kind it was measured on (CPU model and ISA features), and "
    "a run on another kind of machine adds a part of its own instead of replacing these.\n"
)


def _slug(text: str) -> str:
    """A marker name for a machine kind: its first words and a hash of all of it."""
    import hashlib

    words = re.sub(r"[^a-z0-9]+", "-", text.split("(")[0].lower()).strip("-")[:32]
    return f"{words}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _replace_block(text: str, start: str, end: str, block: str, before: str | None = None) -> str:
    """``text`` with the block between the markers replaced (or inserted before ``before``, else appended)."""
    if start in text and end in text:
        return text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    if before is not None and before in text:
        at = text.index(before)
        return text[:at] + block + "\n\n" + text[at:]
    return text.rstrip() + "\n\n" + block + "\n"


def write_section(name: str, body: str, machine: str | None = None) -> None:
    """Replace (or add) the section ``name`` of RESULTS.md in the part of ``machine`` (default: this
    machine's kind, :func:`machine_kind`; "" for results that do not depend on the machine, such as
    quality).  Headings of a body inside a machine part move down one level (## → ###)."""
    machine = machine_kind() if machine is None else machine
    text = RESULTS.read_text() if RESULTS.exists() else _INTRO
    if not machine:
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        first_part = re.search(r"<!-- machine:[^ ]+:start -->", text)
        block = f"{start}\n{body.rstrip()}\n{end}"
        RESULTS.write_text(_replace_block(text, start, end, block, first_part.group(0) if first_part else None))
        return
    slug = _slug(machine)
    part_start, part_end = f"<!-- machine:{slug}:start -->", f"<!-- machine:{slug}:end -->"
    if part_start in text and part_end in text:
        part = text[text.index(part_start) + len(part_start) : text.index(part_end)]
    else:
        part = f"\n## Machine: {machine}\n"
    start, end = f"<!-- {name}@{slug}:start -->", f"<!-- {name}@{slug}:end -->"
    demoted = re.sub(r"^(#+) ", r"#\1 ", body.rstrip(), flags=re.MULTILINE)
    part = _replace_block(part, start, end, f"{start}\n{demoted}\n{end}").rstrip() + "\n"
    RESULTS.write_text(_replace_block(text, part_start, part_end, f"{part_start}{part}{part_end}"))


def today() -> str:
    return datetime.date.today().isoformat()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
