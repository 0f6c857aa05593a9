"""MoE blocks written outside transformers on CPU: the remote-code DeepSeek-V2 block and a dense gate-matrix block.

Two blocks from ``tests/moe_styles.py`` (written for the tests, no model's code) at a useful size, random
weights (router N(0, 0.05), the rest N(0, 0.02)), timed in one run, interleaved (A, B, C, A, B, C … medians):

* **DeepSeek-V2 remote-code style** — a gate module (softmax, greedy top-6 of 64), experts sorted by id
  with per-expert counts by ``scatter_`` moved to the host, a Python loop over the experts' rows, two
  shared experts; hidden 1024, expert intermediate 704.  ``eager``: the block's own code (under
  ``torch.compile`` without moepass it graph-breaks into the same loop); ``static`` and ``top_p``:
  ``moepass.make_traceable`` + ``torch.compile(backend="adaptive_moe")`` (policy ``top_p``, p = 0.5).
* **Dense gate matrix** — every one of 8 experts runs on every token and a [T, E] gate matrix, zero
  outside the top-2, combines them; hidden 1024, intermediate 2816.  ``eager``: the block as written;
  ``static``: ``torch.compile(backend="adaptive_moe")`` (the graph is rewritten: only the top-2 run, so
  the ideal is E / k = 4× at any size).

Every variant is checked against the block's own output first (``top_p`` against nothing: it drops
slots on purpose; its average k is printed).  Inner compiler eager: what is timed is the MoE block.

Usage::

    python benchmarks/outside_styles_cpu.py [--dtypes float32 bfloat16] [--tokens 1 64 512] [--rounds 7] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from _common import interleaved_medians, machine_description, markdown_table, today, write_section

import moepass
from moepass.runtime.stats import reset_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from moe_styles import DenseGateMoE, RemoteDeepseekV2MoE  # noqa: E402

HIDDEN = 1024


def _scaled(block: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """N(0, 0.02) weights; the router's N(0, 0.05), so its logits spread (std ≈ 1.6 on N(0, 1) tokens)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in block.named_parameters():
            scale = 0.05 if name.startswith(("gate.", "router.")) else 0.02
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return block.to(dtype).eval()


def deepseek(dtype: torch.dtype) -> torch.nn.Module:
    return _scaled(RemoteDeepseekV2MoE(dim=HIDDEN, inter=704, num_experts=64, top_k=6, shared=2), dtype)


def dense(dtype: torch.dtype) -> torch.nn.Module:
    return _scaled(DenseGateMoE(dim=HIDDEN, inter=2816, num_experts=8, top_k=2), dtype)


def _variants(name: str, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    options = {"inner": "eager"}
    if name == "deepseek_v2_remote":
        reference, static, adaptive = deepseek(dtype), deepseek(dtype), deepseek(dtype)
        moepass.make_traceable(static)
        moepass.make_traceable(adaptive)
        return reference, {
            "static": torch.compile(static, backend="adaptive_moe", options=options),
            "top_p": torch.compile(adaptive, backend="adaptive_moe",
                                   options={**options, "policy": "top_p", "p": 0.5, "stats": True}),
        }
    reference, static = dense(dtype), dense(dtype)
    return reference, {"static": torch.compile(static, backend="adaptive_moe", options=options)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 512])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for block_name in ("deepseek_v2_remote", "dense_gate"):
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            reference, compiled = _variants(block_name, dtype)
            for tokens in args.tokens:
                x = (torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))).to(dtype)
                variants = {"eager": lambda x=x: reference(x), **{n: (lambda x=x, m=m: m(x)) for n, m in compiled.items()}}
                with torch.inference_mode():
                    expected = reference(x).float()
                    for name, fn in variants.items():
                        out = fn().float()
                        error = float((out - expected).abs().max() / expected.abs().max())
                        limit = 1e-4 if dtype == torch.float32 else 3e-2
                        if name != "top_p" and error > limit:
                            raise SystemExit(f"{block_name} {name} differs from eager at {dtype_name} {tokens}: {error:.1e}")
                    reset_stats()
                    times = interleaved_medians(variants, rounds=args.rounds, min_seconds=args.min_seconds)
                average_k = ""
                if "top_p" in compiled:
                    stats = moepass.report(compiled["top_p"]).stats()
                    average_k = f"{next(iter(stats.values())).average_k:.2f}" if stats else "?"
                rows.append([
                    block_name, dtype_name, str(tokens), f"{times['eager'] * 1e3:.2f}",
                    f"{times['static'] * 1e3:.2f}", f"{times['eager'] / times['static']:.2f}×",
                    f"{times['eager'] / times['top_p']:.2f}× (k {average_k})" if "top_p" in times else "—",
                ])
                print(" | ".join(rows[-1]), flush=True)
    header = ["block", "dtype", "tokens", "eager ms", "moepass static ms", "static vs eager", "top_p vs eager"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_write:
        body = (
            f"## MoE blocks written outside transformers — {today()}\n\n"
            f"`python benchmarks/outside_styles_cpu.py` on {machine_description()}. The remote-code DeepSeek-V2 "
            "block (64 experts, top-6, 2 shared, hidden 1024, intermediate 704) through moepass.make_traceable, "
            "and a dense gate-matrix block (8 experts on every token, top-2 gates, hidden 1024, intermediate 2816) "
            "rewritten in the graph; random weights; medians of interleaved rounds from one run. Ratios: eager "
            "time ÷ moepass time (above 1: moepass faster).\n\n" + table
        )
        write_section("outside_styles_cpu", body)


if __name__ == "__main__":
    main()
