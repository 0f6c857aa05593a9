"""MoE blocks of three real shapes on CPU: transformers' experts against moepass, float32 and bfloat16.

The grid: Mixtral-shaped (8 experts, top-2, hidden 1024, intermediate 2816),
OLMoE (64, top-8, 2048, 1024) and Qwen3-30B-A3B (128, top-8, 2048, 768) blocks,
built from transformers' own classes with N(0, 0.02) weights, in float32 and
bfloat16 (the dtype the three models ship in), at 1, 8, 64, 512 and 2048
tokens (batch 1).  Per cell, in one run and interleaved (A, B, C, A, B, C …
medians, so a shared machine's drift falls on every variant alike), it times

* transformers ``grouped_mm`` experts (the default) and, where its per-slot
  weight gather fits in memory, ``batched_mm``,
* moepass static: ``torch.compile(block, backend="adaptive_moe")``,
* moepass adaptive: top-p calibrated to an average k of 0.65 × native k,

and measures, in the same run, each dtype's GEMM rate and the memory read
bandwidth, so each cell also shows the fraction of the GEMM rate reached and
the multiple of the memory floor (bytes of the experts the tokens hit ÷ read
bandwidth).  Every variant is checked against transformers' output first, and
the moepass variants are checked to run moepass's experts op.

The CPU lowering's choices are made on this machine (:mod:`moepass.lowering.cpu_tuning`): the first
compile of each shape measures what the tables shipped for this machine lack (outside the timed part;
its time is printed), and the run prints which path — moepass's or the model's own ``grouped_mm``
GEMMs — the static block takes at each row count, and why.  The results go to this machine kind's part
of RESULTS.md, with the targets checked at the end (static ≥ 1.00× ``grouped_mm`` in every cell;
adaptive within 10% of its ideal at 512 tokens and more).

Usage::

    python benchmarks/moe_block_cpu.py [--shapes mixtral olmoe qwen3_moe] [--dtypes float32 bfloat16]
        [--tokens 1 8 64 512 2048] [--rounds 5] [--min-seconds 2] [--no-write] [--quick]

``--quick``: 1 and 64 tokens, 2 rounds, 0.2 s per cell, no ``batched_mm``, nothing written — a check
that the script runs (minutes), not numbers to keep.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from dataclasses import dataclass

import torch
from _common import (
    gemm_rates,
    interleaved_medians,
    machine_description,
    markdown_table,
    memory_bandwidths,
    today,
    write_section,
)
from transformers import MixtralConfig, OlmoeConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moepass
import moepass.runtime.stats

# The Mixtral-shaped block of the other CPU benchmarks (onnx_cpu, mlir_cpu, training_step_cpu).
HIDDEN, INTER, EXPERTS, TOP_K = 1024, 2816, 8, 2

#: An adaptive policy is calibrated to this fraction of the native k.
ADAPTIVE_FRACTION = 0.65
#: batched_mm gathers each slot's expert weights; skip it when that copy exceeds this.
BATCHED_MM_MAX_BYTES = 2 << 30


@dataclass(frozen=True)
class Shape:
    """One block shape of a real model."""

    name: str
    label: str
    experts: int
    top_k: int
    hidden: int
    inter: int

    def config(self, impl: str, dtype: torch.dtype):
        common = dict(hidden_size=self.hidden, num_experts_per_tok=self.top_k, experts_implementation=impl, dtype=dtype)
        if self.name == "mixtral":
            return MixtralConfig(intermediate_size=self.inter, num_local_experts=self.experts, **common)
        if self.name == "olmoe":
            return OlmoeConfig(intermediate_size=self.inter, num_experts=self.experts, norm_topk_prob=False, **common)
        return Qwen3MoeConfig(moe_intermediate_size=self.inter, num_experts=self.experts, norm_topk_prob=True, **common)

    @property
    def block_class(self):
        return {"mixtral": MixtralSparseMoeBlock, "olmoe": OlmoeSparseMoeBlock, "qwen3_moe": Qwen3MoeSparseMoeBlock}[
            self.name
        ]

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's three matrices."""
        return 3 * self.hidden * self.inter * torch.finfo(dtype).bits // 8

    def flops(self, tokens: int, k: float) -> float:
        """Expert FLOPs of ``tokens`` tokens at ``k`` experts each."""
        return 2 * tokens * k * 3 * self.hidden * self.inter


SHAPES = {
    "mixtral": Shape("mixtral", "Mixtral (8, top-2, 1024, 2816)", 8, 2, 1024, 2816),
    "olmoe": Shape("olmoe", "OLMoE (64, top-8, 2048, 1024)", 64, 8, 2048, 1024),
    "qwen3_moe": Shape("qwen3_moe", "Qwen3-30B-A3B (128, top-8, 2048, 768)", 128, 8, 2048, 768),
}


def make_shape_block(shape: Shape, impl: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A transformers MoE block of ``shape`` in ``dtype`` with N(0, 0.02) weights."""
    torch.manual_seed(seed)
    block = shape.block_class(shape.config(impl, dtype)).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.data = torch.empty(param.shape, dtype=dtype).normal_(0.0, 0.02)
    return block


def sharing_block(block: torch.nn.Module, shape: Shape, impl: str, dtype: torch.dtype) -> torch.nn.Module:
    """Another module of the same class whose parameters are ``block``'s tensors (no copy)."""
    with torch.device("meta"):
        twin = shape.block_class(shape.config(impl, dtype)).eval()
    twin.load_state_dict(block.state_dict(), assign=True)
    return twin


def compiled(block: torch.nn.Module, tag: str, **options) -> torch.nn.Module:
    """``torch.compile`` of ``block`` behind a forward of its own.

    Dynamo keeps compiled code per Python code object: variants compiled from
    the same class's ``forward`` would share one cache, and each call would
    first evaluate (and fail) the other variants' guards — time no real model
    (one compiled frame per model) spends.  A forward compiled from its own
    source gives each variant its own code object and cache.
    """
    namespace: dict = {}
    exec(compile("def forward(self, x):\n    return self.block(x)\n", f"<variant {tag}>", "exec"), namespace)
    wrapper_class = type(f"Variant_{tag}", (torch.nn.Module,), {"forward": namespace["forward"]})
    wrapper = wrapper_class()
    wrapper.block = block
    return torch.compile(wrapper, **options)


def make_block(impl: str, seed: int = 0) -> MixtralSparseMoeBlock:
    """The float32 Mixtral-shaped block the other CPU benchmarks use."""
    return make_shape_block(SHAPES["mixtral"], impl, torch.float32, seed)


def experts_hit(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Distinct experts the tokens of ``x`` are routed to (native top-k)."""
    with torch.no_grad():
        _, _, ids = block.gate(x.reshape(-1, x.shape[-1]))
    return len(set(ids.flatten().tolist()))


def average_k(block_with_stats: torch.nn.Module, x: torch.Tensor) -> float:
    """Average k of the adaptive policy on ``x`` (one call of the stats-collecting twin)."""
    moepass.runtime.stats.reset_stats()
    with torch.no_grad():
        block_with_stats(x)
    stats = list(moepass.runtime.stats.routing_stats().values())
    return stats[0].average_k if stats else float("nan")


def ran_moepass(block: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether a call of ``block`` went through moepass's experts lowering."""
    with moepass.runtime.stats.count_gemm_rows() as rows, torch.no_grad():
        block(x)
    return sum(rows) > 0


def load_average() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 2048])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per cell (at least)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time per cell (at least)")
    parser.add_argument("--no-batched", action="store_true", help="skip transformers batched_mm")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="1 and 64 tokens, 2 rounds, 0.2 s a cell, no writing")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds, args.min_seconds, args.no_batched, args.no_write = [1, 64], 2, 0.2, True, True
    torch._dynamo.config.cache_size_limit = 64
    started, load_before = time.time(), load_average()

    print(f"machine: {machine_description()}; load average {load_before}")
    rate_detail = {name: gemm_rates(dtype=getattr(torch, name)) for name in args.dtypes}
    rates = {name: max(found.values()) for name, found in rate_detail.items()}
    rate_text = "; ".join(
        f"{name} {rates[name] / 1e9:.0f} GFLOP/s ("
        + ", ".join(f"{how} {r / 1e9:.0f}" for how, r in found.items())
        + ")"
        for name, found in rate_detail.items()
    )
    read = memory_bandwidths()["read"]
    print(f"GEMM rate {rate_text}; read {read / 1e9:.1f} GB/s")

    ratio_rows, measured, path_notes = [], [], []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            grouped = make_shape_block(shape, "grouped_mm", dtype)
            batched = sharing_block(grouped, shape, "batched_mm", dtype)
            target_k = ADAPTIVE_FRACTION * shape.top_k
            calibration = [torch.randn(1, 512, shape.hidden, generator=torch.Generator().manual_seed(1)).to(dtype)]
            policy = moepass.calibrate(grouped, calibration, "top_p", target_avg_k=target_k, show_progress=False)
            twin = sharing_block(grouped, shape, "grouped_mm", dtype)
            static = compiled(twin, f"{shape_name}_{dtype_name}_static", backend="adaptive_moe")
            adaptive = compiled(
                twin, f"{shape_name}_{dtype_name}_adaptive", backend="adaptive_moe", options={"policy": policy}
            )
            counted = compiled(
                twin, f"{shape_name}_{dtype_name}_stats", backend="adaptive_moe", options={"policy": policy, "stats": True}
            )
            print(f"{shape.label} {dtype_name}: {policy.describe()} (calibrated to average k {target_k:.2f})")
            x0 = torch.randn(1, 4, shape.hidden).to(dtype)
            tuning_started = time.perf_counter()
            with torch.no_grad():
                static(x0)  # compiles: the CPU lowering's choices are looked up, or measured where missing
            kernels = moepass.report(static).blocks[0].cpu_kernels
            compile_seconds = time.perf_counter() - tuning_started
            if kernels is not None:
                print(f"  first compile {compile_seconds:.1f} s, of which measuring CPU kernels {kernels.seconds:.1f} s; "
                      + "\n  ".join(kernels.lines()))
                path_notes.append(f"{shape.name} {dtype_name}: " + "; ".join(
                    f"rows {b['rows'][0]}{'+' if b['rows'][1] is None else '–' + str(b['rows'][1])} {b['path']}"
                    for b in kernels.buckets()) + f" ({kernels.source})")
            cells = []
            for tokens in args.tokens:
                x = torch.randn(1, tokens, shape.hidden, generator=torch.Generator().manual_seed(tokens)).to(dtype)
                variants = {"grouped_mm": grouped}
                if not args.no_batched and tokens * shape.top_k * shape.expert_bytes(dtype) <= BATCHED_MM_MAX_BYTES:
                    variants["batched_mm"] = batched
                variants.update({"static": static, "adaptive": adaptive})
                with torch.no_grad():
                    reference = grouped(x).float()
                    for name, block in variants.items():
                        out = block(x).float()  # compiles on the first call
                        if name != "adaptive":
                            error = float((out - reference).abs().max() / reference.abs().max())
                            tolerance = 1e-4 if dtype == torch.float32 else 3e-2
                            if error > tolerance:
                                raise RuntimeError(f"{shape.name} {dtype_name} {tokens}: {name} differs by {error:.1e}")
                for name in ("static", "adaptive"):
                    if not ran_moepass(variants[name], x):
                        raise RuntimeError(f"{shape.name} {dtype_name} {tokens}: {name} did not run moepass's experts")
                k_avg = average_k(counted, x)
                calls = {name: (lambda block=block, x=x: block(x)) for name, block in variants.items()}
                with torch.no_grad():
                    times = interleaved_medians(calls, rounds=args.rounds, warmup=1, min_seconds=args.min_seconds)
                hit = experts_hit(grouped, x)
                floor = hit * shape.expert_bytes(dtype) / read
                cells.append((tokens, times, k_avg, floor))
                static_rate = shape.flops(tokens, shape.top_k) / times["static"] / rates[dtype_name]
                ideal = k_avg / shape.top_k
                print(
                    f"  {tokens:5d} tokens: "
                    + "  ".join(f"{n} {t * 1e3:.2f} ms" for n, t in times.items())
                    + f" | grouped/static {times['grouped_mm'] / times['static']:.2f}×"
                    + f", static {100 * static_rate:.0f}% of GEMM rate, {times['static'] / floor:.2f}× memory floor"
                    + f", adaptive k {k_avg:.2f}: {times['adaptive'] / (ideal * times['static']):.3f}× ideal",
                    flush=True,
                )
                measured.append((shape, dtype_name, tokens, times, k_avg, floor))
            ratio_rows.append(
                [
                    shape.label,
                    dtype_name,
                    *(
                        f"{t['grouped_mm'] / t['static']:.2f}"
                        + (f" / {t['batched_mm'] / t['static']:.2f}" if "batched_mm" in t else "")
                        for _, t, _, _ in cells
                    ),
                ]
            )
            ratio_rows.append(
                [
                    "",
                    "adaptive ÷ ideal",
                    *(f"{t['adaptive'] / (k / shape.top_k * t['static']):.2f} (k {k:.1f})" for _, t, k, _ in cells),
                ]
            )
            del grouped, batched, twin, static, adaptive, counted
            torch._dynamo.reset()
            gc.collect()

    # The GEMM rate again at the end: a shared machine's load can depress one
    # measurement; the fraction of the rate is taken against the better one.
    for name in args.dtypes:
        again = max(gemm_rates(dtype=getattr(torch, name)).values())
        if again > rates[name]:
            rates[name] = again
            rate_text += f"; {name} {again / 1e9:.0f} GFLOP/s at the end (used)"
    detail_rows = []
    for shape, dtype_name, tokens, times, k_avg, floor in measured:
        static_rate = shape.flops(tokens, shape.top_k) / times["static"] / rates[dtype_name]
        detail_rows.append(
            [
                shape.name,
                dtype_name,
                str(tokens),
                *(f"{times[n] * 1e3:.2f}" if n in times else "—" for n in ("grouped_mm", "batched_mm", "static", "adaptive")),
                f"{k_avg:.2f}",
                f"{100 * static_rate:.0f}%",
                # the memory floor bounds decode-sized calls; larger ones are compute-bound
                f"{times['static'] / floor:.2f}×" if tokens <= 8 else "—",
            ]
        )
    worst_static = min((t["grouped_mm"] / t["static"], s.name, d, n) for s, d, n, t, _, _ in measured)
    adaptive_large = [(t["adaptive"] / (k / s.top_k * t["static"]), s.name, d, n) for s, d, n, t, k, _ in measured if n >= 512]
    target_lines = [
        f"static ÷ grouped_mm, worst cell: {worst_static[0]:.2f}× ({worst_static[1]} {worst_static[2]}, {worst_static[3]} "
        f"tokens) — target ≥ 1.00 in every cell: {'met' if worst_static[0] >= 1.0 else 'NOT met'}",
    ]
    if adaptive_large:
        worst_adaptive = max(adaptive_large)
        target_lines.append(
            f"adaptive ÷ ideal at ≥ 512 tokens, worst cell: {worst_adaptive[0]:.2f} ({worst_adaptive[1]} {worst_adaptive[2]}, "
            f"{worst_adaptive[3]} tokens) — target ≤ 1.10: {'met' if worst_adaptive[0] <= 1.10 else 'NOT met'}")
    print("\n".join(target_lines))
    minutes = (time.time() - started) / 60
    header = ["shape (E, top-k, hidden, intermediate)", "dtype", *(f"{t} tokens" for t in args.tokens)]
    body = (
        "## MoE blocks on CPU (`benchmarks/moe_block_cpu.py`)\n\n"
        f"{today()} — {machine_description()}; load average {load_before} before, {load_average()} after "
        f"(1/5/15 min; the machine is shared); {minutes:.1f} min in all.  Measured in the same run: GEMM rate "
        f"{rate_text} ([1024, 1024] @ [1024, 5632], the best of `torch.mm` and oneDNN's linear); read bandwidth "
        f"{read / 1e9:.1f} GB/s (a sum over 1 GiB).\n\n"
        "Blocks are transformers' own classes with N(0, 0.02) weights in the given dtype, batch 1.  Each cell is "
        "transformers' `grouped_mm` time ÷ moepass static time (and ÷ `batched_mm` where its per-slot weight gather "
        "fits in 2 GiB), from interleaved medians of one run — higher is better for moepass, ≥ 1.00 means moepass "
        "is not slower.  The second row of each shape is moepass adaptive (top-p calibrated to an average k of "
        f"{ADAPTIVE_FRACTION} × native k) ÷ its ideal, k_avg ÷ k × the static time (≤ 1.10 is the target).\n\n"
        + markdown_table(header, ratio_rows)
        + "\n\nTargets: " + "; ".join(target_lines)
        + ".\n\nThe path the static block took per row count on this machine (moepass's own kernels, or the model's "
        "`grouped_mm` GEMMs where moepass's were not faster; how the choice was made):\n\n"
        + "\n".join(f"- {note}" for note in path_notes)
        + "\n\nTimes (ms), the static rewrite's fraction of the dtype's GEMM rate and its multiple of the memory "
        "floor (bytes of the experts hit ÷ read bandwidth):\n\n"
        + markdown_table(
            [
                "shape",
                "dtype",
                "tokens",
                "grouped_mm",
                "batched_mm",
                "moepass static",
                "moepass adaptive",
                "adaptive k_avg",
                "static % of GEMM rate",
                "static × memory floor",
            ],
            detail_rows,
        )
        + "\n"
    )
    print(body)
    if not args.no_write:
        write_section("moe_block_cpu", body)


if __name__ == "__main__":
    main()
