"""Zero-computation experts on CPU: a LongCat-Flash-shaped block, three ways.

LongCat-Flash routes each token to k of E GEMM experts *and* Z identity
experts ("zero-computation experts": the expert returns its input).  The
block is transformers' own ``LongcatFlashMoE`` at a scaled-down shape (hidden
1024, expert intermediate 512, E = 64 GEMM experts + Z = 32 identity experts,
top-12, random router: about a third of the slots land on identity experts),
in float32 and bfloat16, at 1, 64 and 512 tokens.  Timed in one run,
interleaved (A, B, C, A, B, C … medians):

* ``transformers``: the model's own experts loop (eager; it graph-breaks
  under torch.compile, so this is what a compiled model runs too);
* ``full rows``: what serving engines do today with zero-computation
  experts: every slot is a GEMM row (the identity experts become rows of an
  all-zero expert at routing weight 0) plus the identity term — moepass's
  experts op with E + Z experts;
* ``moepass``: ``moepass.make_traceable`` + ``torch.compile(backend="adaptive_moe")``,
  static policy: identity slots cost no GEMM row.

Every variant is checked against transformers' output first.  The GEMM rows
each variant runs are counted (moepass's row counter) and shown.

Usage::

    python benchmarks/zero_compute_cpu.py [--dtypes float32 bfloat16] [--tokens 1 64 512] [--rounds 7] [--no-write]
"""

from __future__ import annotations

import argparse
import os

import torch
from _common import interleaved_medians, machine_description, markdown_table, today, write_section
from transformers import LongcatFlashConfig
from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

import moepass
from moepass.compiler.spec import ExpertsSpec
from moepass.runtime import stats
from moepass.runtime.ops import ExpertsConfig

HIDDEN, INTER, EXPERTS, ZERO, TOP_K = 1024, 512, 64, 32, 12


def build_block(dtype: torch.dtype, seed: int = 0) -> LongcatFlashMoE:
    """transformers' LongCat-Flash MoE block at the benchmark's shape, N(0, 0.02) weights."""
    config = LongcatFlashConfig(
        hidden_size=HIDDEN, expert_ffn_hidden_size=INTER, n_routed_experts=EXPERTS, zero_expert_num=ZERO,
        moe_topk=TOP_K, num_experts_per_tok=TOP_K, hidden_act="silu", routed_scaling_factor=1.0,
        experts_implementation="eager",  # transformers >= 5.25 would run grouped_mm: the baseline is its loop
    )
    block = LongcatFlashMoE(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        block.router.e_score_correction_bias.zero_()
    return block.to(dtype).eval()


def full_rows_variant(block: LongcatFlashMoE):
    """Engines' way: identity experts as rows of a zero expert (weight 0) + the identity term."""
    experts = block.experts
    spec = ExpertsSpec(dispatch="moepass_op", num_experts=EXPERTS + ZERO, hidden_size=HIDDEN, intermediate_size=INTER)
    config = ExpertsConfig(spec=spec).to_json()
    # [E+Z, 2I, H]: the Z extra rows stand for the identity experts (transformers < 5.25 stores them, unused)
    w1 = torch.cat([experts.gate_up_proj.detach()[:EXPERTS], experts.gate_up_proj.new_zeros(ZERO, 2 * INTER, HIDDEN)])
    w2 = torch.cat([experts.down_proj.detach(), experts.down_proj.new_zeros(ZERO, HIDDEN, INTER)])
    kinds = ",".join(["identity"] * ZERO)

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, HIDDEN)
        _, weights, ids = block.router(flat)
        gemm_weights = torch.where(ids < EXPERTS, weights, 0.0)  # the identity slots' rows at weight 0
        out = torch.ops.moepass.experts(flat, ids, gemm_weights.float(), w1, w2, None, None, config)
        out = out + torch.ops.moepass.zero_compute_experts(flat, ids, weights, EXPERTS, kinds, None)
        return out.view(x.shape)

    return run


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
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        reference = build_block(dtype)
        model = build_block(dtype)
        moepass.make_traceable(model)
        compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
        full_rows = full_rows_variant(build_block(dtype))
        for tokens in args.tokens:
            x = (torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens)) * 0.5).to(dtype)
            variants = {"transformers": lambda x=x: reference(x), "full rows": lambda x=x: full_rows(x),
                        "moepass": lambda x=x: compiled(x)}
            with torch.inference_mode():
                expected = reference(x).float()
                gemm_rows = {}
                for name, fn in variants.items():
                    fn()  # compile
                    with stats.count_gemm_rows() as counted:
                        out = fn().float()
                    error = float((out - expected).abs().max() / expected.abs().max())
                    limit = 1e-4 if dtype == torch.float32 else 3e-2
                    if error > limit:
                        raise SystemExit(f"{name} differs from transformers at {dtype_name} {tokens} tokens: {error:.1e}")
                    gemm_rows[name] = sum(counted)
                times = interleaved_medians(variants, rounds=args.rounds, min_seconds=args.min_seconds)
            slots = tokens * TOP_K
            rows.append([
                dtype_name, str(tokens), f"{slots - gemm_rows['moepass']}/{slots}",
                f"{times['transformers'] * 1e3:.2f}", f"{times['full rows'] * 1e3:.2f}", f"{times['moepass'] * 1e3:.2f}",
                f"{times['transformers'] / times['moepass']:.2f}×", f"{times['full rows'] / times['moepass']:.2f}×",
            ])
            print(" | ".join(rows[-1]), flush=True)
    header = ["dtype", "tokens", "identity slots", "transformers ms", "full rows ms", "moepass ms",
              "moepass vs transformers", "moepass vs full rows"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_write:
        body = (
            f"## Zero-computation experts (LongCat-Flash-shaped block) — {today()}\n\n"
            f"`python benchmarks/zero_compute_cpu.py` on {machine_description()}. transformers' "
            f"LongcatFlashMoE, hidden {HIDDEN}, intermediate {INTER}, {EXPERTS} GEMM experts + {ZERO} identity "
            f"experts, top-{TOP_K}, random weights; medians of interleaved rounds from one run. \"full rows\" runs "
            "every slot as a GEMM row (identity experts as a zero expert at weight 0, as serving engines do); "
            "moepass skips them (\"identity slots\": slots that cost no GEMM row). Ratios: time of the other ÷ "
            "moepass (above 1: moepass faster).\n\n" + table
        )
        write_section("zero_compute_cpu", body)


if __name__ == "__main__":
    main()
