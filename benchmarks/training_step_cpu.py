"""A training step (forward + backward) of a Mixtral-shaped MoE block on CPU.

Block: hidden 1024, intermediate 2816, 8 experts, top-2, float32 (the
transformers class, its default ``grouped_mm`` experts).  Per token count, in
one run and interleaved (A, B, C, A, B, C … medians), it times
``loss = block(x).pow(2).mean(); loss.backward()`` for

* transformers ``grouped_mm`` experts (eager),
* moepass static: ``torch.compile(block, backend="adaptive_moe")`` in grad
  mode (the experts' split form with its backward),
* moepass adaptive: top-p calibrated to an average k of about 1.4 of 2,

and prints each ratio against transformers and the adaptive step against the
static one beside its ideal (k_avg / 2).

Usage: python benchmarks/training_step_cpu.py [--tokens 512] [--inner inductor] [--no-write]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import interleaved_medians, machine_description, markdown_table, today, write_section
from moe_block_cpu import HIDDEN, INTER, TOP_K, compiled, make_block

import moepass
import moepass.runtime.stats


def step(block, x):
    """One forward + backward; gradients are cleared first so each step does the same work."""

    def run():
        for param in block.parameters():
            param.grad = None
        block(x).pow(2).mean().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--target-k", type=float, default=1.4)
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine_description()}")

    grouped = make_block("grouped_mm").train()
    calibration = [torch.randn(1, 512, HIDDEN, generator=torch.Generator().manual_seed(1))]
    policy = moepass.calibrate(grouped, calibration, "top_p", target_avg_k=args.target_k, show_progress=False)
    static = compiled(copy.deepcopy(grouped), "static", backend="adaptive_moe", options={"inner": args.inner})
    adaptive = compiled(
        copy.deepcopy(grouped), "adaptive", backend="adaptive_moe", options={"policy": policy, "stats": True, "inner": args.inner}
    )
    rows, adaptive_rows = [], []
    for tokens in args.tokens:
        x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
        variants = {
            "transformers grouped_mm": step(grouped, x),
            "moepass static": step(static, x),
            "moepass adaptive": step(adaptive, x),
        }
        moepass.runtime.stats.reset_stats()
        times = interleaved_medians(variants, rounds=args.rounds, warmup=1)
        average_k = list(moepass.runtime.stats.routing_stats().values())[0].average_k
        base = times["transformers grouped_mm"]
        for name, seconds in times.items():
            rows.append([str(tokens), name, f"{seconds * 1e3:.1f}", f"{base / seconds:.2f}×"])
            print(f"{tokens:5d} tokens  {name:26s} {seconds * 1e3:9.1f} ms  {base / seconds:.2f}× transformers")
        ratio = times["moepass adaptive"] / times["moepass static"]
        ideal = average_k / TOP_K
        adaptive_rows.append([str(tokens), f"{average_k:.2f}", f"{ratio:.3f}", f"{ideal:.3f}", f"{100 * (ratio / ideal - 1):+.1f}%"])
        print(f"{tokens:5d} tokens: adaptive (k_avg {average_k:.2f}) ÷ static = {ratio:.3f}, ideal {ideal:.3f}")
    body = (
        "## Training step on CPU (`benchmarks/training_step_cpu.py`)\n\n"
        f"{today()} — {machine_description()}.\n"
        f"Mixtral-shaped block (hidden {HIDDEN}, intermediate {INTER}, 8 experts, top-{TOP_K}), float32, batch 1, "
        f"forward + backward of `block(x).pow(2).mean()`; moepass compiled in grad mode with inner "
        f"`{args.inner}`; interleaved medians of {args.rounds} rounds.\n\n"
        + markdown_table(["tokens", "implementation", "ms / step", "speed vs transformers"], rows)
        + f"\n\nAdaptive ({policy.describe()}) against static:\n\n"
        + markdown_table(["tokens", "average k", "adaptive ÷ static", "ideal", "from ideal"], adaptive_rows)
        + "\n"
    )
    print(body)
    if not args.no_write:
        write_section("training_step_cpu", body)


if __name__ == "__main__":
    main()
