"""A Mixtral-shaped MoE block on CPU: transformers' experts implementations against moepass.

Block: hidden 1024, intermediate 2816, 8 experts, top-2, float32.  At 8 and
512 tokens, in one run, it times

* transformers ``eager`` experts (a Python loop over the experts hit),
* transformers ``grouped_mm`` experts, eager and under torch.compile (Inductor),
* moepass: ``torch.compile(block, backend="adaptive_moe")`` (static policy),
* moepass with an adaptive policy (top-p calibrated to an average k of about
  1.4 of 2), beside the ideal ratio k_avg / 2 against the static rewrite,

and measures the machine's float32 GEMM rate and memory bandwidth, so each
time is also shown as a fraction of the GEMM roofline (512 tokens) and as a
multiple of the memory floor (8 tokens: bytes of the experts hit ÷ bandwidth).

Usage: python benchmarks/moe_block_cpu.py [--tokens 8 512] [--no-write]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import gemm_rate, machine_description, markdown_table, memory_bandwidths, time_it, today, write_section
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import moepass
import moepass.stats

HIDDEN, INTER, EXPERTS, TOP_K = 1024, 2816, 8, 2
ADAPTIVE = "moepass (adaptive top_p)"


def make_block(impl: str, seed: int = 0) -> MixtralSparseMoeBlock:
    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        experts_implementation=impl,
    )
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    return block


def expert_bytes() -> int:
    return (2 * INTER * HIDDEN + HIDDEN * INTER) * 4


def flops(tokens: int, k: float = TOP_K) -> float:
    return 2 * tokens * k * 3 * HIDDEN * INTER


def experts_hit(block: MixtralSparseMoeBlock, x: torch.Tensor) -> int:
    with torch.no_grad():
        _, _, ids = block.gate(x.reshape(-1, HIDDEN))
    return len(set(ids.flatten().tolist()))


def _average_k() -> float:
    """Average k the adaptive block recorded (all calls of this token count)."""
    stats = list(moepass.stats.routing_stats().values())
    return stats[0].average_k if stats else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 512])
    parser.add_argument("--target-k", type=float, default=1.4, help="average k the adaptive policy is calibrated to")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    rate = gemm_rate()
    bandwidth = memory_bandwidths()
    print(f"machine: {machine_description()}")
    print(
        f"float32 GEMM rate {rate / 1e9:.1f} GFLOP/s; memory: copy {bandwidth['copy'] / 1e9:.1f} GB/s "
        f"(bytes copied), {bandwidth['copy_rw'] / 1e9:.1f} GB/s (read+write), read {bandwidth['read'] / 1e9:.1f} GB/s"
    )

    grouped = make_block("grouped_mm")
    calibration = [torch.randn(1, 512, HIDDEN, generator=torch.Generator().manual_seed(1))]
    adaptive_policy = moepass.calibrate(grouped, calibration, "top_p", target_avg_k=args.target_k, show_progress=False)
    print(f"adaptive policy: {adaptive_policy.describe()} (calibrated to average k {args.target_k})")
    variants = {
        "transformers eager experts": make_block("eager"),
        "transformers grouped_mm": grouped,
        "transformers grouped_mm + Inductor": torch.compile(copy.deepcopy(grouped), backend="inductor"),
        "moepass (static)": torch.compile(copy.deepcopy(grouped), backend="adaptive_moe"),
        ADAPTIVE: torch.compile(
            copy.deepcopy(grouped), backend="adaptive_moe", options={"policy": adaptive_policy, "stats": True}
        ),
    }
    rows, adaptive_rows = [], []
    for tokens in args.tokens:
        x = torch.randn(1, tokens, HIDDEN)
        hit = experts_hit(grouped, x)
        floor = hit * expert_bytes() / bandwidth["copy"]
        floor_rw = hit * expert_bytes() / bandwidth["copy_rw"]
        times = {}
        moepass.stats.reset_stats()
        with torch.no_grad():
            reference = grouped(x)
            for name, block in variants.items():
                out = block(x)  # compiles on first call
                error = float((out - reference).abs().max() / reference.abs().max())
                times[name] = time_it(lambda block=block, x=x: block(x), repeat=10 if tokens <= 64 else 5, min_seconds=1.0)
                print(f"{tokens:5d} tokens  {name:36s} {times[name] * 1e3:9.2f} ms  (max rel err vs grouped_mm {error:.1e})")
        base = times["transformers grouped_mm"]
        average_k = _average_k()
        for name, seconds in times.items():
            k = average_k if name == ADAPTIVE else TOP_K
            gflops = flops(tokens, k) / seconds / 1e9
            rows.append(
                [
                    str(tokens),
                    name,
                    f"{seconds * 1e3:.2f}",
                    f"{base / seconds:.2f}×",
                    f"{gflops:.0f} ({100 * gflops * 1e9 / rate:.0f}%)",
                    f"{seconds / floor:.2f}× / {seconds / floor_rw:.2f}×",
                ]
            )
        print(
            f"{tokens:5d} tokens: moepass is {base / times['moepass (static)']:.2f}× transformers grouped_mm, "
            f"{100 * flops(tokens) / times['moepass (static)'] / rate:.0f}% of the GEMM rate, "
            f"{times['moepass (static)'] / floor:.2f}× the memory floor ({hit} experts hit, copy bandwidth) "
            f"or {times['moepass (static)'] / floor_rw:.2f}× (read+write convention)"
        )
        ratio = times[ADAPTIVE] / times["moepass (static)"]
        ideal = average_k / TOP_K
        adaptive_rows.append([str(tokens), f"{average_k:.2f}", f"{ratio:.3f}", f"{ideal:.3f}", f"{ratio / ideal:.3f}"])
        print(
            f"{tokens:5d} tokens: adaptive (average k {average_k:.2f}) takes {ratio:.3f}× the static rewrite's time; "
            f"ideal {ideal:.3f}; {100 * (ratio / ideal - 1):+.1f}% from ideal"
        )
    table = markdown_table(
        ["tokens", "implementation", "ms", "speed vs grouped_mm", "GFLOP/s (% of GEMM rate)", "× memory floor (copy / read+write)"],
        rows,
    )
    adaptive_table = markdown_table(
        ["tokens", "average k", "adaptive ÷ static time", "ideal (k_avg / 2)", "÷ ideal"], adaptive_rows
    )
    body = (
        f"## MoE block on CPU (`benchmarks/moe_block_cpu.py`)\n\n"
        f"{today()} — {machine_description()}.\n"
        f"Mixtral-shaped block: hidden {HIDDEN}, intermediate {INTER}, {EXPERTS} experts, top-{TOP_K}, float32, batch 1.\n"
        f"Measured in the same run: float32 GEMM {rate / 1e9:.1f} GFLOP/s; copy bandwidth "
        f"{bandwidth['copy'] / 1e9:.1f} GB/s counted as bytes copied ({bandwidth['copy_rw'] / 1e9:.1f} GB/s counting "
        f"read + write); read bandwidth {bandwidth['read'] / 1e9:.1f} GB/s.  The memory floor is the bytes of the "
        f"experts the tokens hit divided by the copy bandwidth, under each convention.  GFLOP/s counts the "
        f"expert FLOPs actually needed (k_avg experts per token for the adaptive policy).\n\n{table}\n\n"
        f"Adaptive routing ({adaptive_policy.describe()}, calibrated to an average k of {args.target_k}) "
        f"against the static rewrite:\n\n{adaptive_table}\n"
    )
    print(body)
    if not args.no_write:
        write_section("moe_block_cpu", body)


if __name__ == "__main__":
    main()
