"""Quality against compute of every routing policy on the bundled model.

    python benchmarks/quality.py            # full table + sweeps (~10-15 min on 2 busy cores)
    python benchmarks/quality.py --quick    # fewer tokens and sweep points
    python benchmarks/quality.py --quantized [--quick]   # bf16 / int8 / int4 experts × static and adaptive

Every policy runs through the compiled model (backend="adaptive_moe", inner
eager) on the held-out split of the stdlib corpus; average k comes from the
backend's run-time counters.  Writes the "quality" section of RESULTS.md and
the Pareto plot benchmarks/quality_pareto.png.

``--quantized`` runs the quantized-experts table instead: the experts as
trained (bfloat16 weights; computed in float32), int8 per channel and int4 in
groups of 32 / 64 / 128 (``options={"experts_dtype": ..., "group_size": ...}``,
round-to-nearest at compile time), each under static routing and the adaptive
policies, with the expert bytes a one-token decode reads (Σ over layers of the
layer's average k × one expert's bytes; int4 counts its bfloat16 scales and
zero offsets) — the "quality_quantized" section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from _common import machine_description, markdown_table, today, write_section  # noqa: E402

from moepass import bundled  # noqa: E402
from moepass.bundled.evaluate import (  # noqa: E402
    PolicyRun,
    evaluate_eager,
    evaluate_policies,
    format_table,
    pareto_plot,
    relative_to,
    sweep,
)
from moepass.policies import Sensitivity, SkipRatio, Static  # noqa: E402

PLOT = HERE / "quality_pareto.png"

SWEEPS_FULL = {
    "threshold": [0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7],
    "top_p": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    "sensitivity": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],  # × the calibrated T
    "skip_ratio": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0],  # × the calibrated β_l
}
SWEEPS_QUICK = {
    "threshold": [0.05, 0.2, 0.5],
    "top_p": [0.3, 0.5, 0.7],
    "sensitivity": [0.1, 1.0, 10.0],
    "skip_ratio": [0.5, 1.0, 1.5],
}


def best_within(results, max_ppl_increase: float = 0.01):
    """The result with the fewest expert FLOPs whose perplexity rose at most ``max_ppl_increase``."""
    ok = [r for r in results if r.perplexity_change is not None and r.perplexity_change <= max_ppl_increase]
    return min(ok, key=lambda r: r.flops_ratio) if ok else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072, help="held-out tokens per policy")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="32k tokens, 3 points per sweep")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the plot alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also dump every result to this JSON file")
    parser.add_argument("--quantized", action="store_true", help="the quantized-experts table (bf16 / int8 / int4)")
    args = parser.parse_args(argv)
    if args.quantized:
        return quantized_table(args)
    if args.quick:
        args.tokens = min(args.tokens, 32768)
    sweeps = SWEEPS_QUICK if args.quick else SWEEPS_FULL
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MOEPASS_PROGRESS", "0")

    started = time.time()
    load_before = os.getloadavg()
    model = bundled.load_model()
    batches = bundled.heldout_batches(seq_len=args.seq_len, max_tokens=args.tokens)
    tokens = sum(b.numel() for b in batches)
    print(f"bundled model on {tokens} held-out tokens ({len(batches)} batches of {batches[0].shape[0]}x{args.seq_len})")

    runs = bundled.policy_runs()
    overlay_models = [r.model for r in runs if r.model is not None]
    if overlay_models:
        runs.append(PolicyRun("static", Static(), "AdaMoE's fine-tuned weights", overlay_models[0]))
    main_results = evaluate_policies(model, runs, batches)
    static = main_results[0]
    eager = evaluate_eager(model, batches)
    header, rows = format_table(main_results)
    print(markdown_table(header, rows))
    print(f"static compiled vs eager transformers: nll {static.nll:.8f} vs {eager.nll:.8f}, accuracy {static.accuracy:.6f} vs {eager.accuracy:.6f}")

    sweep_results = {}
    names = bundled.policy_names()
    for name, values in sweeps.items():
        if name == "sensitivity":
            if "sensitivity" not in names:
                continue
            calibrated = bundled.load_policy("sensitivity")
            make = lambda scale, c=calibrated: Sensitivity(T=c.T * scale, sensitivity=c.sensitivity)  # noqa: E731
            label_values = values
        elif name == "skip_ratio":
            if "skip_ratio" not in names:
                continue
            calibrated = bundled.load_policy("skip_ratio")
            make = lambda scale, c=calibrated: SkipRatio(beta={p: min(1.0, b * scale) for p, b in c.beta.items()})  # noqa: E731
            label_values = values
        else:
            make, label_values = None, values
        print(f"sweep {name}: {label_values}")
        sweep_results[name] = relative_to(sweep(model, name, label_values, batches, make=make, show_progress=False), static)
        if name in ("sensitivity", "skip_ratio"):
            for r in sweep_results[name]:
                r.setting = f"{r.setting}× calibrated"
    everything = main_results + [r for rs in sweep_results.values() for r in rs]
    best = best_within(everything)
    seconds = time.time() - started
    load_after = os.getloadavg()

    sweep_rows = []
    for results in sweep_results.values():
        for r in sorted(results, key=lambda r: r.flops_ratio):
            sweep_rows.append(format_table([r])[1][0])
    summary = (
        f"Best policy within +1% perplexity: **{best.label} ({best.setting})**, average k {best.average_k:.3f}, "
        f"expert FLOPs {best.flops_ratio * 100:.1f}% of static ({(1 - best.flops_ratio) * 100:.1f}% fewer), "
        f"perplexity {best.perplexity_change * 100:+.2f}%, accuracy {best.accuracy_change * 100:+.2f}%."
        if best
        else "No policy stays within +1% perplexity."
    )
    tuned_static = next((r for r in main_results if r.label == "static" and r is not static), None)
    null = next((r for r in main_results if r.label == "null_experts"), None)
    if tuned_static is not None and null is not None:
        summary += (
            f" AdaMoE's fine-tune also trains the experts (LoRA) on more train bytes, which alone lowers the static "
            f"perplexity by {-tuned_static.perplexity_change * 100:.2f}%: against its own fine-tuned static model "
            f"null_experts is {(null.perplexity / tuned_static.perplexity - 1) * 100:+.2f}% in perplexity at "
            f"{null.flops_ratio * 100:.1f}% expert FLOPs."
        )
    print(summary)
    print(f"done in {seconds / 60:.1f} min (load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)")

    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in everything], indent=2) + "\n")
    if args.no_write:
        return 0
    series = {name: [static] + results for name, results in sweep_results.items()}
    points = [r for r in main_results if r.label in ("ada_k", "null_experts", "sensitivity", "skip_ratio")]
    points += [r for r in main_results if r.label == "static" and r is not static]
    pareto_plot(series, PLOT, baseline=static, points=points, title="bundled Mixtral (stdlib bytes): perplexity vs expert FLOPs")
    info = bundled.training_info()
    body = "\n".join(
        [
            "## Quality against compute on the bundled model (`benchmarks/quality.py`)",
            "",
            f"{today()}, {machine_description()}; load average {load_before[0]:.2f} before, "
            f"{load_after[0]:.2f} after (the machine is shared); {seconds / 60:.1f} min in all.",
            f"Model: the bundled Mixtral (4 layers, 8 experts, top-2, hidden 128) trained by "
            f"`{info['command']}`; held-out: {tokens} bytes in {len(batches) * batches[0].shape[0]} windows of "
            f"{args.seq_len}, evenly spaced over the held-out stdlib files. Every row ran through "
            "`torch.compile(backend=\"adaptive_moe\", options={\"policy\": ..., \"stats\": True, \"inner\": \"eager\"})`; "
            "average k is the backend's run-time count; expert FLOPs = average k / 2; perplexity is per byte; "
            "Δ are relative to the compiled static row. Static compiled reproduces eager transformers: "
            f"nll {static.nll:.6f} vs {eager.nll:.6f}.",
            "",
            markdown_table(header, rows),
            "",
            summary,
            "",
            "Sweeps of the training-free policies (sensitivity: T × the calibrated T with the calibrated F_l; "
            "skip_ratio: the calibrated per-layer β_l × a scale):",
            "",
            markdown_table(header, sweep_rows),
            "",
            f"![perplexity against expert FLOPs]({PLOT.name})",
        ]
    )
    write_section("quality", body, machine="")  # quality does not depend on the machine
    print(f"wrote {PLOT} and the 'quality' section of benchmarks/RESULTS.md")
    return 0


#: (label, backend options) of each experts dtype in the quantized table.
EXPERTS_DTYPES = (
    ("bf16", {}),
    ("int8", {"experts_dtype": "int8"}),
    ("int4 g32", {"experts_dtype": "int4", "group_size": 32}),
    ("int4 g64", {"experts_dtype": "int4", "group_size": 64}),
    ("int4 g128", {"experts_dtype": "int4", "group_size": 128}),
)


def expert_bytes(model, options: dict) -> int:
    """Bytes of one expert (both projections) of the bundled model under ``options``."""
    from moepass.quantize.scheme import parse_scheme, projection_bytes

    config = model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    scheme = parse_scheme(options.get("experts_dtype"), options.get("group_size"))
    return projection_bytes(2 * inter, hidden, scheme) + projection_bytes(hidden, inter, scheme)


def quantized_table(args) -> int:
    """bf16 / int8 / int4 experts × static and the adaptive policies: perplexity, accuracy, bytes read per token."""
    from moepass.bundled.evaluate import evaluate_policy

    tokens_wanted = min(args.tokens, 16384) if args.quick else args.tokens
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MOEPASS_PROGRESS", "0")
    started, load_before = time.time(), os.getloadavg()
    model = bundled.load_model()
    batches = bundled.heldout_batches(seq_len=args.seq_len, max_tokens=tokens_wanted)
    tokens = sum(b.numel() for b in batches)
    policies = [("static", Static(), "native top-2")]
    names = bundled.policy_names()
    for name in ("sensitivity", "skip_ratio", "ada_k"):
        if name in names and not (args.quick and name != "sensitivity"):
            policies.append((name, bundled.load_policy(name), "calibrated" if name != "ada_k" else "PPO-trained W_l"))
    policies.append(("top_p", "top_p", "p=0.65"))
    print(f"bundled model on {tokens} held-out tokens; experts {', '.join(n for n, _ in EXPERTS_DTYPES)}")
    header = ["experts", "policy", "setting", "avg k", "ppl/byte", "Δ ppl", "next-byte acc", "Δ acc",
              "expert KB read / token", "× fewer than bf16 static"]
    rows, records, baseline = [], [], None
    for dtype_label, options in EXPERTS_DTYPES:
        per_expert = expert_bytes(model, options)
        for label, policy, setting in policies:
            if isinstance(policy, str):
                from moepass.policies import make_policy

                policy = make_policy(policy, p=0.65)
            result = evaluate_policy(model, policy, batches, label=label, setting=setting, options=options)
            read = sum(k * per_expert for k in result.layer_k.values())
            if baseline is None:
                baseline = (result, read)
            base, base_read = baseline
            ppl_change = result.perplexity / base.perplexity - 1
            acc_change = result.accuracy / base.accuracy - 1
            rows.append([
                dtype_label, label, setting, f"{result.average_k:.3f}", f"{result.perplexity:.4f}",
                "—" if result is base else f"{ppl_change * 100:+.2f}%", f"{result.accuracy * 100:.2f}%",
                "—" if result is base else f"{acc_change * 100:+.2f}%", f"{read / 1024:.0f}",
                f"{base_read / read:.2f}×",
            ])
            records.append({**result.to_dict(), "experts": dtype_label, "bytes_per_token": read,
                            "perplexity_change_vs_bf16_static": ppl_change})
            print(" | ".join(rows[-1]), flush=True)
    seconds, load_after = time.time() - started, os.getloadavg()
    table = markdown_table(header, rows)
    print(table)
    print(f"done in {seconds / 60:.1f} min (load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    if args.no_write:
        return 0
    body = "\n".join([
        "## Quantized experts on the bundled model (`benchmarks/quality.py --quantized`)",
        "",
        f"{today()}, {machine_description()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{seconds / 60:.1f} min in all. {tokens} held-out bytes. Every row ran through "
        "`torch.compile(backend=\"adaptive_moe\", options={\"policy\": ..., \"experts_dtype\": ..., "
        "\"group_size\": ..., \"stats\": True, \"inner\": \"eager\"})`: the experts quantized once at compile "
        "time by round-to-nearest (int8 per output channel; int4 per group, asymmetric), activations in float32. "
        "Bytes read per token: Σ over the 4 layers of the layer's average k × one expert's bytes (bf16 2 bytes a "
        "weight; int8 1 + a bfloat16 scale per channel; int4 0.5 + a bfloat16 scale and zero offset per group); "
        "Δ against bf16 static.",
        "",
        table,
    ])
    write_section("quality_quantized", body)
    print("wrote the 'quality_quantized' section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
