"""The ``moepass`` command line.

Subcommands print to the terminal (this module is the only one that prints);
each fails with one clear line and a non-zero exit code on bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import moepass
    from moepass import bundled
    from moepass.bundled import demo

    started = time.perf_counter()
    config = demo.DemoConfig(eval_tokens=args.eval_tokens, out=args.out)
    model = bundled.load_model()
    info = bundled.training_info()["results"]
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(
        f"moepass {moepass.__version__} demo — the bundled model: a transformers Mixtral, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_local_experts} experts, top-{cfg.num_experts_per_tok}, {params / 1e6:.2f} M parameters, trained on "
        f"the Python standard library (held-out {info['heldout_bits_per_byte']:.3f} bits/byte; unigram "
        f"{info['unigram_bits_per_byte']:.3f})"
    )
    batch = bundled.heldout_batches(seq_len=config.seq_len, max_tokens=config.seq_len * config.batch_size,
                                    batch_size=config.batch_size)[0]

    print("\n[1/4] torch.compile(model, backend='adaptive_moe'): what the pass found and rewrote")
    report, error = demo.compile_and_report(model, batch)
    print(report)
    print(f"static policy against eager transformers: max relative error {error:.1e}")

    print(f"\n[2/4] quality against expert compute, {config.eval_tokens} held-out bytes, through the compiled model")
    header, rows, _ = demo.quality_table(model, config)
    _print_table(header, rows)

    print(f"\n[3/4] speed on a [{config.batch_size}, {config.seq_len}] batch (median of 5 runs)")
    adaptive = bundled.load_policy(config.adaptive)
    _print_table(["model", "ms", "speed vs eager"], demo.speed_table(model, batch, adaptive))

    print(f"\n[4/4] inspection report of the {adaptive.name} policy")
    target = demo.write_inspection(model, batch[:2], adaptive, config.out)
    print(f"wrote {target / 'index.html'} (open it in a browser), report.txt and report.json")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    torch._dynamo.reset()
    return 0

def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from moepass import bundled
    from moepass.bundled import evaluate

    torch.set_num_threads(args.threads)
    model = bundled.load_model()
    batches = bundled.heldout_batches(seq_len=args.seq_len, max_tokens=args.tokens)
    runs = bundled.policy_runs(args.policies or None)
    print(f"bundled model, {sum(b.numel() for b in batches)} held-out tokens, {len(runs)} policies (compiled, inner {args.inner})")
    results = evaluate.evaluate_policies(model, runs, batches, inner=args.inner, options=_quantize_options(args))
    header, rows = evaluate.format_table(results)
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(row))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    if args.cpu:
        return _tune_cpu(args)
    from moepass.kernels.tune import tune_command_lines

    if args.seconds is not None:
        raise ValueError("--seconds is for --cpu (the Triton search is bounded by its config space)")
    for dtype in args.dtype or ["bfloat16"]:
        for line in tune_command_lines(args.model, args.tokens or [1, 16, 128, 1024, 4096], dtype, args.out, args.quick):
            print(line)
    return 0


def _tune_cpu(args: argparse.Namespace) -> int:
    """``moepass tune --cpu``: measure this machine's CPU kernel and path choices for a model's block shapes."""
    import re

    import torch

    from moepass.lowering import cpu_tuning
    from moepass.runtime.machine import current_machine
    from moepass.runtime.tuning import table_path

    if args.dtype and "float16" in args.dtype:
        raise ValueError("--cpu measures float32 and bfloat16 experts")
    seconds = args.seconds if args.seconds is not None else 120.0
    rows = cpu_tuning.QUICK_ROWS if args.quick else cpu_tuning.FULL_ROWS
    tokens = tuple(args.tokens or cpu_tuning.TOKEN_POINTS)
    out = Path(args.out) if args.out else None
    machine = current_machine()
    print(f"measuring CPU kernels on {machine.describe()}; at most {seconds:.0f} s per block shape")
    results = []
    if re.fullmatch(r"\d+,\d+,\d+,\d+", args.model):
        experts, hidden, inter, top_k = (int(v) for v in args.model.split(","))
        for dtype in args.dtype or ["float32", "bfloat16"]:
            results.append(cpu_tuning.tune_shape(experts, hidden, inter, top_k, getattr(torch, dtype), seconds, rows,
                                                 tokens, out))
    else:  # compile the model: exactly the shapes (dtype, layout, biases, packing) its compiles will look up
        from moepass.cli.modelspec import example_for, load_model

        loaded = load_model(args.model, seed=0)
        model = loaded.model.eval()
        example = example_for(args.model, loaded, 16, 1, 0)
        for dtype in args.dtype or [None]:
            if dtype is not None:
                model = model.to(getattr(torch, dtype))
            session = cpu_tuning.TuningSession(seconds, rows, tokens, out)
            torch._dynamo.reset()
            with cpu_tuning.tuning_session(session), torch.no_grad():
                compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
                compiled(*example) if isinstance(example, tuple) else compiled(**example) if isinstance(example, dict) \
                    else compiled(example)
            if not session.results:
                raise ValueError(f"no MoE block of {args.model} runs on the CPU lowering: nothing to measure")
            results.extend(session.results.values())
    for result in results:
        print(f"\n{result.key}:")
        for line in result.lines():
            print(f"  {line}")
    where = (out / f"{machine.file_stem}.json") if out else table_path(cpu_tuning.cpu_choice.FAMILY)
    print(f"\nwrote {where}")
    return 0


def _parse_value(text: str):
    """A policy parameter from the command line: int, float, bool, none, else the text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_policy_params(words: list[str]) -> dict:
    """``["--p", "0.4", "--k-max=2"]`` → ``{"p": 0.4, "k_max": 2}``; raise ValueError on anything else."""
    params = {}
    index = 0
    while index < len(words):
        word = words[index]
        if not word.startswith("--") or len(word) == 2:
            raise ValueError(f"unexpected argument {word!r}: policy parameters are given as --name value")
        name, equals, value = word[2:].partition("=")
        if not equals:
            if index + 1 >= len(words) or (words[index + 1].startswith("--") and not _is_number(words[index + 1])):
                raise ValueError(f"policy parameter --{name} needs a value")
            value = words[index + 1]
            index += 1
        params[name.replace("-", "_")] = _parse_value(value)
        index += 1
    return params


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_policy_file(directory: str):
    from moepass.policies import Policy

    path = Path(directory)
    if not path.exists():
        raise ValueError(f"policy file {path} does not exist")
    load = getattr(Policy, "load", None)
    if load is None:
        raise ValueError("loading a saved policy (--policy-file) is not available in this build")
    try:
        return load(path)
    except Exception as error:  # whatever the file holds, the user gets one line
        first = (str(error).strip().splitlines() or [""])[0] or type(error).__name__
        where = "" if str(path) in first else f" {path}"  # the policy's own errors name the file already
        raise ValueError(f"cannot load the policy file{where}: {first}") from None


def _policy_from_args(args: argparse.Namespace):
    """(policy name or loaded Policy, extra policy parameters) from --policy, --policy-file and --NAME VALUE."""
    params = parse_policy_params(args.policy_params)
    policy = _load_policy_file(args.policy_file) if args.policy_file else args.policy
    if args.policy_file and args.policy != "static" and policy.name != args.policy:
        raise ValueError(f"--policy {args.policy} does not match the policy file's {policy.name!r}; give one of them")
    if args.policy_file and params:
        raise ValueError(
            f"--{next(iter(params))}: a saved policy carries its own parameters; change them in {args.policy_file}"
        )
    return policy, params


def _cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from moepass.cli.modelspec import example_for, load_model
    from moepass.compiler.options import BackendOptions
    from moepass.reports.html_report import check_output_dir
    from moepass.reports.inspection import inspect

    out = check_output_dir(args.out)  # before the long part: a bad --out fails at once
    policy, params = _policy_from_args(args)
    params.update(_quantize_options(args))
    BackendOptions.parse({"policy": policy, "inner": args.inner, **params})  # bad options fail before loading
    started = time.perf_counter()
    loaded = load_model(args.model, seed=args.seed)
    example = example_for(args.model, loaded, args.tokens, args.batch, args.seed)
    print(f"loaded {loaded.source} in {time.perf_counter() - started:.1f} s; compiling and running the example",
          file=sys.stderr)
    torch.manual_seed(args.seed)
    inspection = inspect(loaded.model, example, policy, inner=args.inner, **params)
    print(inspection)
    target = inspection.save(out)
    print(f"\nwrote {target / 'index.html'} (open it in a browser), report.txt and report.json")
    return 0


def _export_format_options(args: argparse.Namespace) -> tuple[str, str]:
    """(what to print, the option value) for --format; a flag of the other format is an error."""
    if args.format in ("onnx", "genai"):
        if args.output_type is not None:
            raise ValueError("--output-type is for --format mlir; ONNX exports take --target ort|portable")
        target = args.target or "ort"
        kind = "ONNX" if args.format == "onnx" else "an onnxruntime-genai folder"
        return f"{kind} (target {target})", target
    if args.target is not None:
        raise ValueError("--target is for --format onnx; MLIR exports take --output-type")
    output_type = args.output_type or "linalg-on-tensors"
    return f"MLIR ({output_type}, verified in IREE)", output_type


def _parse_ort_layout(text: str):
    """``auto``, a layout name, or ranges ``masked,64=gemm`` (a layout from 1 token, then from each count)."""
    if "=" not in text and "," not in text:
        return text
    ranges = {}
    for index, part in enumerate(text.split(",")):
        start, equals, layout = part.partition("=")
        if not equals and index == 0:
            start, layout = "1", start
        if not start.strip().isdigit():
            raise ValueError(f"--ort-layout {text!r}: expected a layout, or ranges such as masked,64=gemm")
        ranges[int(start)] = layout.strip()
    return ranges


def _cmd_export(args: argparse.Namespace) -> int:
    from moepass.cli.modelspec import example_for, load_model
    from moepass.compiler.options import BackendOptions

    out = Path(args.out)
    if out.is_dir() and args.format != "genai":
        raise ValueError(f"--out {out} is a folder; give the path of the .{args.format} file to write")
    what, choice = _export_format_options(args)
    policy, params = _policy_from_args(args)
    params.update(_quantize_options(args))
    BackendOptions.parse({"policy": policy, **params})  # bad options fail before loading
    loaded = load_model(args.model, seed=args.seed)
    print(f"loaded {loaded.source}; exporting to {what}", file=sys.stderr)
    started = time.perf_counter()
    onnx_options = None
    if args.format in ("onnx", "genai"):
        from moepass.exports.onnx import OnnxExportOptions

        onnx_options = OnnxExportOptions(ort_layout=_parse_ort_layout(args.ort_layout))
    elif args.ort_layout != "auto":
        raise ValueError("--ort-layout is for --format onnx or genai")
    if args.format == "genai":
        from moepass.exports.genai import export_genai

        folder = Path(args.model)  # a model folder's tokenizer files go along
        tokenizer = folder if folder.is_dir() and (folder / "tokenizer.json").is_file() else None
        result = export_genai(loaded.model, out, policy, target=choice, tokenizer=tokenizer, options=onnx_options,
                              **params)
    elif args.format == "onnx":
        from moepass.exports.onnx import export_onnx

        example = example_for(args.model, loaded, args.tokens, args.batch, args.seed)
        result = export_onnx(loaded.model, example, out, policy, target=choice, options=onnx_options, **params)
    else:
        from moepass.exports.mlir import export_mlir

        example = example_for(args.model, loaded, args.tokens, args.batch, args.seed)
        result = export_mlir(loaded.model, example, out, policy, output_type=choice, **params)
    print(result)
    print(f"exported in {time.perf_counter() - started:.1f} s")
    return 0


def _calibration_batches(spec: str, model, count: int, tokens: int, batch: int, seed: int):
    """Token batches to calibrate on: the bundled training split, else random ids."""
    if spec == "bundled":
        from moepass import bundled

        return list(bundled.train_batches(seq_len=tokens, batch_size=batch, max_batches=count))
    from moepass.cli.modelspec import example_input_ids

    print("note: calibrating on random token ids (only the bundled model has calibration text)", file=sys.stderr)
    return [example_input_ids(model, tokens, batch, seed + i)["input_ids"] for i in range(count)]


def _save_policy(policy, out: Path) -> None:
    """Write the policy into a temporary folder beside ``out``, then move its files in."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        policy.save(staging)
        out.mkdir(exist_ok=True)
        for name in ("policy.json", "policy.safetensors"):
            if (staging / name).exists():
                os.replace(staging / name, out / name)
            elif (out / name).exists():
                (out / name).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from moepass.cli.modelspec import load_model
    from moepass.reports.html_report import check_output_dir
    from moepass.runtime.calibrate import CALIBRATABLE, calibrate

    if args.policy not in CALIBRATABLE:
        raise ValueError(f"--policy must be one of {', '.join(CALIBRATABLE)}, got {args.policy!r}")
    params = parse_policy_params(args.policy_params)
    out = check_output_dir(args.out)
    loaded = load_model(args.model, seed=args.seed)
    batches = _calibration_batches(args.model, loaded.model, args.batches, args.tokens, args.batch, args.seed)
    started = time.perf_counter()
    policy = calibrate(
        loaded.model, batches, args.policy, target_avg_k=args.target_avg_k, flops_budget=args.flops_budget, **params
    )
    _save_policy(policy, out)
    print(f"calibrated {policy.describe()} on {len(batches)} batches in {time.perf_counter() - started:.1f} s")
    print(f"wrote {out / 'policy.json'}; use it with options={{'policy': moepass.policies.load_policy({str(out)!r})}}")
    return 0


def _cmd_offload(args: argparse.Namespace) -> int:
    import json

    from moepass.cli.modelspec import example_for, load_model
    from moepass.exports.expert_store import write_model_store

    out = Path(args.out)
    if out.exists() and not args.overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists; remove it or pass --overwrite")
    loaded = load_model(args.model, seed=args.seed)
    example = example_for(args.model, loaded, args.tokens, args.batch, args.seed)
    started = time.perf_counter()
    from moepass.quantize.scheme import parse_scheme

    parse_scheme(args.experts_dtype, args.group_size)  # bad choices fail before loading
    parse_scheme(args.low_dtype, args.low_group_size)
    manifest, skipped = write_model_store(
        loaded.model, example, out, overwrite=args.overwrite, source=loaded.source, experts_dtype=args.experts_dtype,
        group_size=args.group_size, low_dtype=args.low_dtype, low_group_size=args.low_group_size,
    )
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    block = manifest.blocks[0]
    kind = f" {args.experts_dtype}" + (f" g{block.quant['group_size']}" if block.quant.get("group_size") else "") \
        if block.quant else ""
    low = f", with {args.low_dtype} copies ({sum(b.nbytes for b in manifest.low) / 1e6:.1f} MB)" if manifest.low else ""
    print(
        f"wrote {len(manifest.blocks)} blocks × {block.num_experts}{kind} experts ({manifest.nbytes / 1e6:.1f} MB, "
        f"{block.expert_nbytes / 1e6:.2f} MB per expert{low}) to {out} in {time.perf_counter() - started:.1f} s"
    )
    print(f'use it with options={{"offload": {{"store": {json.dumps(str(out))}, "cache_gb": ..., "prefetch": True}}}}')
    return 0


_MODEL_HELP = "a transformers config.json (random weights), module.py:factory, 'bundled', or zoo:<family>"


def _add_model_arguments(sub: argparse.ArgumentParser, tokens: int, batch: int, what: str = "example") -> None:
    """--model, --tokens, --batch and --seed, shared by the commands that load a model."""
    sub.add_argument("--model", required=True, help=_MODEL_HELP)
    sub.add_argument("--tokens", type=int, default=tokens, help=f"{what} tokens per sequence (default {tokens})")
    sub.add_argument("--batch", type=int, default=batch, help=f"{what} sequences (default {batch})")
    sub.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")


def _add_quantize_arguments(sub: argparse.ArgumentParser, low: bool = False) -> None:
    """--experts-dtype and --group-size (and, for offload, --low-dtype / --low-group-size)."""
    sub.add_argument("--experts-dtype", default=None, choices=["int8", "int4"],
                     help="quantize the routed experts: int8 per output channel, int4 per group (default: as the model)")
    sub.add_argument("--group-size", type=int, default=None, help="int4: input features per scale (32, 64, 128, 256)")
    if low:
        sub.add_argument("--low-dtype", default=None, choices=["int8", "int4"],
                         help="also store a lower-precision copy of every expert (HOBBIT: read on a miss of a "
                         "low-weight slot with offload low_precision_below)")
        sub.add_argument("--low-group-size", type=int, default=None, help="int4 low copies: input features per scale")


def _quantize_options(args: argparse.Namespace) -> dict:
    """The backend options --experts-dtype / --group-size give."""
    options = {}
    if args.experts_dtype is not None:
        options["experts_dtype"] = args.experts_dtype
    if args.group_size is not None:
        options["group_size"] = args.group_size
    return options


def _add_policy_arguments(sub: argparse.ArgumentParser) -> None:
    """--policy and --policy-file, shared by inspect and export."""
    sub.add_argument("--policy", default="static", help="routing policy name (default static)")
    sub.add_argument("--policy-file", metavar="DIR", help="a saved policy folder (policy.json beside its tensors)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``moepass`` command."""
    # no abbreviations: `--p 0.4` is top_p's parameter, not a prefix of --policy
    parser = argparse.ArgumentParser(prog="moepass", description="Adaptive-k routing for MoE models.", allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the pass does")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the bundled model: report, quality/FLOPs table, speed, inspection page")
    demo.add_argument("--out", default="moepass-demo", metavar="DIR", help="folder for the inspection report")
    demo.add_argument("--eval-tokens", type=int, default=16384, help="held-out bytes for the quality table")
    demo.set_defaults(run=_cmd_demo)
    ev = commands.add_parser("eval", help="held-out quality against expert FLOPs of routing policies, bundled model")
    ev.add_argument("policies", nargs="*", help="bundled artefact or policy name, or name:key=value,key=value (default: all)")
    ev.add_argument("--tokens", type=int, default=65536, help="held-out tokens")
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--inner", default="eager", choices=["inductor", "aot_eager", "eager"])
    ev.add_argument("--threads", type=int, default=1)
    _add_quantize_arguments(ev)
    ev.set_defaults(run=_cmd_eval)
    inspect = commands.add_parser(
        "inspect",
        allow_abbrev=False,
        help="show what the pass does to a model: text, JSON and an HTML report with graphs and charts",
        description="Compile a model with the adaptive_moe backend, run an example, and write a report. "
        "Further --name value pairs are the policy's parameters (e.g. --p 0.4).",
        usage="moepass inspect --model SPEC [--policy NAME] [--NAME VALUE ...] [--policy-file DIR] --out DIR "
        "[--tokens N]",
    )
    _add_model_arguments(inspect, tokens=64, batch=1)
    _add_policy_arguments(inspect)
    _add_quantize_arguments(inspect)
    inspect.add_argument("--out", required=True, metavar="DIR", help="folder for index.html, report.txt, report.json")
    inspect.add_argument("--inner", default="eager", choices=["inductor", "aot_eager", "eager"],
                         help="compiler for the rest of the graph (default eager: fast)")
    inspect.set_defaults(run=_cmd_inspect, allows_extra=True)
    export = commands.add_parser(
        "export",
        allow_abbrev=False,
        help="export a model with its MoE blocks under a routing policy to ONNX, onnxruntime-genai or MLIR",
        description="Rewrite the model's MoE blocks under the policy and write an ONNX model (one moepass.AdaptiveMoE "
        "node per block, defined by a local function), a folder onnxruntime-genai loads (the same ONNX with the KV "
        "cache, genai_config.json and tokenizer files) or an MLIR module (torch-mlir, each block's ops located by its "
        "path, compiled and run in IREE before it is written). Further --name value pairs are the policy's parameters.",
        usage="moepass export --model SPEC [--policy NAME] [--NAME VALUE ...] [--policy-file DIR] --out PATH "
        "[--format onnx|genai|mlir] [--target ort|portable] [--output-type linalg-on-tensors|stablehlo|tosa|torch]",
    )
    _add_model_arguments(export, tokens=16, batch=2)
    _add_policy_arguments(export)
    _add_quantize_arguments(export)
    export.add_argument("--out", required=True, metavar="PATH",
                        help="the .onnx or .mlir file to write (--format genai: the folder)")
    export.add_argument("--format", default="onnx", choices=["onnx", "genai", "mlir"],
                        help="onnx: one .onnx file (no KV cache); genai: a folder onnxruntime-genai loads, with the KV "
                        "cache and genai_config.json; mlir: an MLIR module verified in IREE (default onnx)")
    export.add_argument("--target", default=None, choices=["ort", "portable"],
                        help="ONNX and genai: ort (experts run by com.microsoft.MoE, k per token) or portable "
                        "(standard ONNX ops); default ort")
    export.add_argument("--ort-layout", default="auto", metavar="LAYOUT",
                        help="ONNX and genai target ort: how the experts run — auto (measured on this machine per "
                        "token count: re-export on another kind of CPU), masked, buckets, slots, gemm, or ranges "
                        "such as masked,64=gemm (masked below 64 tokens)")
    export.add_argument("--output-type", default=None, choices=["linalg-on-tensors", "stablehlo", "tosa", "torch"],
                        help="MLIR: the dialect to lower to (default linalg-on-tensors; linalg-on-tensors and "
                        "stablehlo are run in IREE, tosa and torch are parsed and verified)")
    export.set_defaults(run=_cmd_export, allows_extra=True)
    calibrate = commands.add_parser(
        "calibrate",
        allow_abbrev=False,
        help="fit a training-free policy's parameters to a target average k or FLOPs budget",
        description="Run the model on calibration batches and fit the policy (threshold T, top-p p, AdapMoE "
        "sensitivities F_l and T, or skip-ratio beta_l) to hit the target. Further --name value pairs are fixed "
        "policy parameters (e.g. --k-max 2).",
    )
    _add_model_arguments(calibrate, tokens=128, batch=4, what="calibration")
    calibrate.add_argument("--policy", required=True, help="threshold, top_p, sensitivity or skip_ratio")
    target = calibrate.add_mutually_exclusive_group()
    target.add_argument("--target-avg-k", type=float, help="average experts per token to aim for")
    target.add_argument("--flops-budget", type=float, help="expert FLOPs as a fraction of static (0.75 = 25%% fewer)")
    calibrate.add_argument("--out", required=True, metavar="DIR", help="folder for policy.json (+ tensors)")
    calibrate.add_argument("--batches", type=int, default=16, help="calibration batches (default 16)")
    calibrate.set_defaults(run=_cmd_calibrate, allows_extra=True)
    offload = commands.add_parser(
        "offload",
        help="write a model's expert weights to an expert store (for options={'offload': ...})",
        description="Find the model's MoE blocks as the backend does (one forward on an example) and write every "
        "expert's weights to DIR: one safetensors file per block, each expert one 4096-aligned range.",
    )
    _add_model_arguments(offload, tokens=16, batch=1)
    offload.add_argument("--out", required=True, metavar="DIR", help="the store folder to write")
    offload.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    _add_quantize_arguments(offload, low=True)
    offload.set_defaults(run=_cmd_offload)
    tune = commands.add_parser(
        "tune",
        help="measure kernel choices for a model's expert shapes: the Triton tiles (GPU), or with --cpu this "
        "machine's CPU kernels and paths",
        description="Without --cpu: tune the Triton experts kernels' tiles (GPU). With --cpu: measure, on this "
        "machine, which CPU kernel runs each expert projection and, per row count, whether moepass's path or the "
        "model's own grouped_mm GEMMs run the block, and cache it for every later compile (a first compile measures "
        "what is missing within a short budget; this measures everything, with a larger one).",
    )
    tune.add_argument("model", help="E,H,I,K; a transformers config.json or model folder; zoo:<family>; with --cpu "
                      "also bundled or module.py:factory")
    tune.add_argument("--cpu", action="store_true", help="measure this machine's CPU kernels instead of Triton tiles")
    tune.add_argument("--tokens", type=int, nargs="+", default=None,
                      help="token counts to tune at (default Triton 1 16 128 1024 4096; --cpu 1 8 64 512 2048)")
    tune.add_argument("--dtype", nargs="+", default=None, choices=["bfloat16", "float16", "float32"],
                      help="default: Triton bfloat16; --cpu with E,H,I,K float32 and bfloat16, with a model its own")
    tune.add_argument("--out", default=None, help="folder for the JSON (default: the package's kernels/configs; "
                      "--cpu: the user's cache, $MOEPASS_CACHE_DIR or $XDG_CACHE_HOME/moepass)")
    tune.add_argument("--seconds", type=float, default=None, help="--cpu: at most this long per block shape (default 120)")
    tune.add_argument("--quick", action="store_true", help="a few configs only (smoke runs)")
    tune.set_defaults(run=_cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moepass`` command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "allows_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.policy_params = extra
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError, LookupError) as error:  # QuantizeError, OptionsError are ValueErrors
        print(f"moepass {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
