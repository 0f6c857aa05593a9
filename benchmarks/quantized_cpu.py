"""Quantized experts on CPU: int8 / int4 against bfloat16 moepass and transformers, against the memory floor.

Parts (``--parts``; each prints its table and, unless ``--no-write``, writes
its section of RESULTS.md):

``decode``
    the experts op alone at 1, 2, 4 and 8 tokens (``--decode-tokens``),
    bfloat16 activations, Mixtral / OLMoE / Qwen3 shapes: moepass bf16 (the
    float lowering's GEMV), ATen int8 / int4 (g64), and moepass's native
    kernel on int8 / int4 (the ``native`` form, kernels pinned), interleaved
    (A, B, C, … medians and bests), each call routed to experts the previous
    calls did not read; each variant checked against its dequantized
    reference first.  Prints × bf16 and × the int4 memory floor.
``block``
    transformers' own Mixtral-shaped (8, top-2, 1024, 2816 — the scaled
    Mixtral of the other CPU benchmarks), OLMoE (64, top-8, 2048, 1024) and
    Qwen3-30B-A3B (128, top-8, 2048, 768) blocks in bfloat16, at one token
    (decode) and 512 tokens (prefill): transformers ``grouped_mm``, moepass
    bf16 static, moepass int8 and int4 (g64) static
    (``options={"experts_dtype": ...}``) and int4 with top-p at 0.65 × native
    k, interleaved.  Each quantized variant is checked against the dequantized
    reference first.  Decode also shows the memory floor: bytes of the hit
    experts' operands as the kernels read them (int4: half a byte a weight +
    bfloat16 scale and offset per group; int8: a byte + a scale per row) ÷
    the read bandwidth measured in the same run.
``ort``
    ONNX Runtime (CPU, float32 activations) on the Mixtral-shaped block:
    ``com.microsoft.MoE`` static top-2 (what onnxruntime-genai writes) against
    moepass's int4 exports — ``com.microsoft.QMoE`` static and adaptive (top-p,
    exact per-slot weights through ``router_weights``) — at 1 and 512 tokens,
    with adaptive's ideal (static × k_avg / k).
``offload``
    decode tokens/s of a random Mixtral-shaped bfloat16 model whose experts
    live on disk (``moepass offload``), from a bf16 store against an int4
    store, no cache (every expert hit is read): bytes read per token and
    tokens/s.
``hobbit``
    the bundled model decoding held-out text from an int8 store with int4
    copies, a cache of 2 experts per layer, ``low_precision_below`` 0 (off),
    0.1, 0.2, 0.3: perplexity, low-precision loads and bytes read per token —
    HOBBIT's quality cost.
``llama``
    llama.cpp (llama-cpp-python + gguf): reports whether they are installed.
    Not a comparison yet: llama-cpp-python is a source distribution on the
    registry here (its build did not finish in 50 minutes on the 2-core
    machine) and the GGUF conversion of the random model is not written.

``--quick`` shrinks every part (fewer rounds, smaller offload model, fewer
decode steps) to check the script runs; its numbers mean nothing.

Usage::

    python benchmarks/quantized_cpu.py [--parts decode block ort offload hobbit llama] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import interleaved_medians, interleaved_samples, machine_description, markdown_table, memory_bandwidths, today, write_section
from moe_block_cpu import SHAPES, compiled, experts_hit, make_shape_block

import moepass
import moepass.runtime.stats
from moepass.quantize.scheme import parse_scheme, projection_bytes

PARTS = ("decode", "block", "ort", "offload", "hobbit", "llama")
INT4_GROUP = 64


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]




def _rel(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return float((actual - expected).abs().max() / expected.abs().max())


def _output(value):
    return value[0] if isinstance(value, tuple) else value


def _operand_bytes(shape, scheme) -> int:
    """Bytes one expert's projections occupy as the CPU kernels read them (bfloat16 scales)."""
    return projection_bytes(2 * shape.inter, shape.hidden, scheme) + projection_bytes(shape.hidden, shape.inter, scheme)


def _dequantized_block(block, shape, scheme):
    """The block with its expert weights replaced by their dequantized codes (the reference)."""
    from moepass.quantize import dequantize, quantize_rtn

    twin = make_shape_block(shape, "grouped_mm", torch.bfloat16)
    twin.load_state_dict(block.state_dict())
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(twin.experts, name)
            weight.copy_(dequantize(quantize_rtn(weight, scheme)).to(weight.dtype))
    return twin


def part_block(args, read_bandwidth: float) -> str:
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        block = make_shape_block(shape, "grouped_mm", torch.bfloat16)
        policy = moepass.calibrate(block, [torch.randn(1, 256, shape.hidden, dtype=torch.bfloat16)], "top_p",
                                   target_avg_k=0.65 * shape.top_k, show_progress=False)
        variants = {
            "transformers grouped_mm": block,
            "moepass bf16": compiled(block, f"{shape_name}_bf16", backend="adaptive_moe"),
            "moepass int8": compiled(block, f"{shape_name}_int8", backend="adaptive_moe",
                                     options={"experts_dtype": "int8"}),
            "moepass int4": compiled(block, f"{shape_name}_int4", backend="adaptive_moe",
                                     options={"experts_dtype": "int4", "group_size": INT4_GROUP}),
            "moepass int4 + top-p": compiled(block, f"{shape_name}_int4_topp", backend="adaptive_moe",
                                             options={"experts_dtype": "int4", "group_size": INT4_GROUP,
                                                      "policy": policy}),
        }
        references = {"moepass int8": _dequantized_block(block, shape, parse_scheme("int8")),
                      "moepass int4": _dequantized_block(block, shape, parse_scheme("int4", INT4_GROUP))}
        for tokens in args.tokens:
            x = torch.randn(1, tokens, shape.hidden, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                for name, reference in references.items():
                    error = _rel(_output(variants[name](x)), _output(reference(x)))
                    assert error < 3e-2, (shape_name, name, error)  # bfloat16 against the dequantized reference
                times = interleaved_medians({n: (lambda v=v: v(x)) for n, v in variants.items()}, rounds=args.rounds,
                                            min_seconds=args.min_seconds)
            hit = experts_hit(block, x)
            floors = {
                "moepass bf16": hit * _operand_bytes(shape, None) / read_bandwidth,
                "moepass int8": hit * _operand_bytes(shape, parse_scheme("int8")) / read_bandwidth,
                "moepass int4": hit * _operand_bytes(shape, parse_scheme("int4", INT4_GROUP)) / read_bandwidth,
            }
            base = times["moepass bf16"]
            for name, seconds in times.items():
                floor = floors.get(name)
                rows.append([shape.label, str(tokens), name, f"{seconds * 1e3:.3f}", f"{base / seconds:.2f}×",
                             f"{floor * 1e3:.3f} ({seconds / floor:.2f}×)" if floor and tokens == 1 else "—"])
                print(" | ".join(rows[-1]), flush=True)
        del block, variants, references
        torch._dynamo.reset()
    header = ["shape", "tokens", "variant", "ms", "× vs moepass bf16", "memory floor ms (× floor)"]
    return "\n".join([
        "## Quantized experts: MoE blocks on CPU (`benchmarks/quantized_cpu.py --parts block`)", "",
        f"{today()}, {machine_description()}; read bandwidth {read_bandwidth / 1e9:.1f} GB/s; bfloat16 activations; "
        f"int4 groups of {INT4_GROUP}; interleaved medians of {args.rounds}+ rounds; top-p calibrated to 0.65 × native k.",
        "", markdown_table(header, rows),
    ])


# --- decode: the experts op alone ---------------------------------------------------------------------


def _forced_kernels(shape, dtype, kernel_by_form: dict[str, str]) -> dict[str, dict]:
    """Tuning entries (family cpu_quantized) that make every row count of ``shape``'s projections run
    ``kernel_by_form[form]`` (the op-level comparison pins kernels instead of reading the machine's table)."""
    from moepass.lowering.cpu_quantized_choice import projection_key
    from moepass.lowering.cpu_quantized_tuning import ROWS

    entries = {}
    for scheme in (parse_scheme("int8"), parse_scheme("int4", INT4_GROUP)):
        for out_features, in_features in ((2 * shape.inter, shape.hidden), (shape.hidden, shape.inter)):
            for native in (False, True):
                key = projection_key(scheme, dtype, out_features, in_features, native)
                entries[key] = {"kernels": {form: {str(r): kernel for r in ROWS} for form, kernel in kernel_by_form.items()}}
    return entries


def _routings(shape, tokens: int, count: int, generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` routings of ``tokens`` tokens, each token top-k distinct experts, cycling through all experts
    so that consecutive calls read other experts (a real model's next layer does: no cache reuse)."""
    order = torch.randperm(shape.experts, generator=generator).tolist()
    routings, cursor = [], 0
    for _ in range(count):
        ids = []
        for _ in range(tokens):
            ids.append([order[(cursor + j) % shape.experts] for j in range(shape.top_k)])
            cursor += shape.top_k
        weights = torch.softmax(torch.randn(tokens, shape.top_k, generator=generator), dim=-1)
        routings.append((torch.tensor(ids, dtype=torch.int64), weights.to(torch.bfloat16)))
    return routings


def read_bandwidths(quick: bool) -> dict[str, float]:
    """Bytes per second two streaming kernels read on this machine: ``torch.sum`` over a float32 buffer and a
    bfloat16 GEMV (F.linear of one row) over a matrix, both far larger than the caches."""
    import torch.nn.functional as F
    from _common import time_it

    size = (1 << 26) if quick else (1 << 28)  # bytes of the GEMV's matrix
    matrix = torch.empty(size // 2 // 4096, 4096, dtype=torch.bfloat16).normal_()
    row = torch.randn(1, 4096, dtype=torch.bfloat16)
    gemv = size / time_it(lambda: F.linear(row, matrix), repeat=10)
    summed = memory_bandwidths((1 << 28) if quick else (1 << 30))["read"]
    return {"sum": summed, "bf16 gemv": gemv}


def part_decode(args, bandwidths: dict[str, float]) -> str:
    """One- and few-token calls of the experts op alone: bf16 moepass, ATen int8/int4, the native kernel."""
    from moepass.compiler.spec import ExpertsSpec
    from moepass.lowering.cpu_quantized import to_aten_cpu
    from moepass.quantize import dequantize, quantize_rtn
    from moepass.runtime import tuning
    from moepass.runtime.ops import ExpertsConfig
    from moepass.runtime.quantized_ops import QuantizedExpertsConfig

    read = max(bandwidths.values())
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        generator = torch.Generator().manual_seed(0)
        spec = ExpertsSpec(dispatch="grouped_mm", num_experts=shape.experts, hidden_size=shape.hidden,
                           intermediate_size=shape.inter, activation="silu", gated=True, gate_up_layout="concat")
        w1 = (torch.randn(shape.experts, 2 * shape.inter, shape.hidden, generator=generator) * 0.02).to(torch.bfloat16)
        w2 = (torch.randn(shape.experts, shape.hidden, shape.inter, generator=generator) * 0.02).to(torch.bfloat16)
        float_config = ExpertsConfig(spec=spec, lowering="cpu").to_json()
        variants = {"moepass bf16": (w1, w2, float_config)}
        references = {}
        for bits, scheme in (("int8", parse_scheme("int8")), ("int4", parse_scheme("int4", INT4_GROUP))):
            layouts = [quantize_rtn(w, scheme) for w in (w1, w2)]
            references[bits] = [dequantize(layout) for layout in layouts]
            for form, label in (("aten_cpu", "ATen"), ("native", "native")):
                operands = [list(lay.tensors().values()) if form == "native" else to_aten_cpu(lay, torch.bfloat16)
                            for lay in layouts]
                config = QuantizedExpertsConfig(ExpertsConfig(spec=spec, lowering="cpu"), scheme, form).to_json()
                variants[f"{bits} {label}"] = (*operands, config)
        del w1, w2
        for tokens in args.decode_tokens:
            routings = _routings(shape, tokens, args.rotations, generator)
            xs = [torch.randn(tokens, shape.hidden, generator=generator).to(torch.bfloat16) for _ in routings]
            state = {"i": 0}

            def call(first, second, config, state=state, routings=routings, xs=xs):
                i = state["i"] = (state["i"] + 1) % len(routings)
                ids, weights = routings[i]
                if isinstance(first, torch.Tensor):
                    return torch.ops.moepass.experts(xs[i], ids, weights, first, second, None, None, config)
                return torch.ops.moepass.quantized_experts(xs[i], ids, weights, first, second, None, None, config)

            with tuning.override_entries("cpu_quantized", _forced_kernels(shape, torch.bfloat16,
                                                                          {"aten_cpu": "aten", "native": "gemv"})), \
                    torch.no_grad():
                ids, weights = routings[0]
                for name, (first, second, config) in variants.items():  # each against its dequantized reference
                    if name == "moepass bf16":
                        continue
                    deq = references[name.split()[0]]
                    expected = torch.ops.moepass.experts(xs[0].float(), ids, weights.float(), *deq, None, None,
                                                         ExpertsConfig(spec=spec, lowering="reference").to_json())
                    got = torch.ops.moepass.quantized_experts(xs[0], ids, weights, first, second, None, None, config)
                    error = _rel(got, expected)
                    assert error < 3e-2, (shape_name, name, tokens, error)  # bfloat16 rounding of h and the output
                samples = interleaved_samples({n: (lambda v=v: call(*v)) for n, v in variants.items()},
                                              rounds=args.rounds, min_seconds=args.min_seconds, warmup=2)
            hit = len({int(e) for e in routings[0][0].flatten()})
            floor = hit * _operand_bytes(shape, parse_scheme("int4", INT4_GROUP)) / read
            median_bf16, best_bf16 = _median(samples["moepass bf16"]), min(samples["moepass bf16"])
            for name, values in samples.items():
                median, best = _median(values), min(values)
                rows.append([shape.label, str(tokens), name, f"{median * 1e3:.3f}", f"{best * 1e3:.3f}",
                             f"{median_bf16 / median:.2f}× / {best_bf16 / best:.2f}×",
                             f"{median / floor:.2f}× / {best / floor:.2f}×" if name.startswith("int4") else "—"])
                print(" | ".join(rows[-1]), flush=True)
            rows.append([shape.label, str(tokens), "int4 memory floor", f"{floor * 1e3:.3f}", "", "", ""])
            print(" | ".join(rows[-1]), flush=True)
        del variants, references
    header = ["shape", "tokens", "variant", "median ms", "best ms", "× bf16 (median / best)", "× int4 floor (median / best)"]
    from moepass.lowering import cpu_qgemv

    native = (f"native kernel path {cpu_qgemv.PATHS.get(cpu_qgemv.best_path())}" if cpu_qgemv.available()
              else f"native kernel unavailable ({cpu_qgemv.unavailable_reason()})")
    return "\n".join([
        "## Quantized experts: one- and few-token decode, the experts op alone (`benchmarks/quantized_cpu.py --parts decode`)",
        "",
        f"{today()}, {machine_description()}; bfloat16 activations; int4 groups of {INT4_GROUP}; {native}. "
        f"Each call routes its tokens to experts the previous {args.rotations - 1} calls did not use (cycling through "
        f"all experts: no cache reuse from call to call, as in a model whose layers each read their own experts). "
        f"Interleaved rounds (≥ {args.rounds}): median and best. The int4 memory floor is the hit experts' int4 bytes "
        f"(half a byte per weight + a bfloat16 scale and offset per group) ÷ the faster of two streaming reads "
        f"measured in this run ({', '.join(f'{k} {v / 1e9:.1f} GB/s' for k, v in bandwidths.items())}).",
        "", markdown_table(header, rows),
    ])


def part_ort(args, directory: Path) -> str:
    import onnxruntime as ort
    from moe_block_cpu import HIDDEN, make_block
    from onnx_cpu import BlockOutput, average_k, genai_block, session

    block = make_block("grouped_mm").eval()  # float32
    module = BlockOutput(block).eval()
    policy = moepass.calibrate(block, [torch.randn(1, 512, HIDDEN, generator=torch.Generator().manual_seed(1))],
                               "top_p", target_avg_k=1.4, show_progress=False)
    example = (torch.randn(2, 8, HIDDEN, generator=torch.Generator().manual_seed(2)),)
    paths = {"MoE static top-2 (genai)": directory / "genai.onnx", "QMoE int4 static": directory / "q_static.onnx",
             "QMoE int4 adaptive": directory / "q_adaptive.onnx"}
    genai_block(block, paths["MoE static top-2 (genai)"])
    quantized = {"experts_dtype": "int4", "group_size": INT4_GROUP}
    moepass.export_onnx(module, example, paths["QMoE int4 static"], **quantized)
    moepass.export_onnx(module, example, paths["QMoE int4 adaptive"], policy=policy, **quantized)
    sessions = {name: session(path) for name, path in paths.items()}
    rows = []
    for tokens in args.ort_tokens:
        x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(4))
        k_avg = average_k(module, policy, (x,), {})
        feeds = {name: {s.get_inputs()[0].name: x.numpy()} for name, s in sessions.items()}
        runs = {name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()}
        times = interleaved_medians(runs, rounds=args.rounds, warmup=2, min_seconds=args.min_seconds)
        static = times["QMoE int4 static"]
        for name, seconds in times.items():
            ideal = ""
            if name == "QMoE int4 adaptive":
                ideal = f"ideal {static * k_avg / 2 * 1e3:.2f} ms (k_avg {k_avg:.2f}): {seconds / (static * k_avg / 2):.2f}× ideal"
            rows.append([str(tokens), name, f"{seconds * 1e3:.2f}", f"{times['MoE static top-2 (genai)'] / seconds:.2f}×",
                         f"{static / seconds:.2f}×", ideal])
            print(" | ".join(rows[-1]), flush=True)
    del ort
    header = ["tokens", "variant", "ms", "× vs MoE static", "× vs QMoE static", "adaptive against its ideal"]
    return "\n".join([
        "## Quantized experts in ONNX Runtime (`benchmarks/quantized_cpu.py --parts ort`)", "",
        f"{today()}, {machine_description()}; the Mixtral-shaped block, float32 activations, int4 g{INT4_GROUP} "
        "experts; top-p calibrated to k_avg ≈ 1.4; interleaved medians.", "", markdown_table(header, rows),
    ])


def part_offload(args, directory: Path) -> str:
    from offload import decode, random_config, token_stream
    from transformers import MixtralForCausalLM

    from moepass.exports.expert_store import write_model_store
    from moepass.runtime.offload import close_all

    config_args = argparse.Namespace(hidden=args.offload_hidden, intermediate=args.offload_intermediate,
                                     layers=args.offload_layers, experts=8)
    config = random_config(config_args)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    example = {"input_ids": torch.randint(0, 1024, (1, 8)), "use_cache": False}
    stores = {}
    for name, options in (("bf16", {}), ("int4", {"experts_dtype": "int4", "group_size": INT4_GROUP})):
        stores[name] = directory / f"store_{name}"
        manifest, _ = write_model_store(model, example, stores[name], **options)
        print(f"{name} store: {manifest.nbytes / 1e9:.2f} GB, {manifest.blocks[0].stride / 1e6:.1f} MB per expert read")
    state = model.state_dict()
    tokens = token_stream("random", 16 + args.offload_steps + 4)
    rows = []
    results = {}
    for _ in range(2):  # alternate the stores twice: the disk and the machine drift
        for name, store in stores.items():
            torch._dynamo.reset()
            close_all()
            fresh = MixtralForCausalLM(config).to(torch.bfloat16).eval()
            fresh.load_state_dict(state)
            options = {"offload": {"store": str(store), "cache": "none", "prefetch": False}}
            rate, compiled_model = decode(fresh, options, tokens, prompt=16, warmup=2, steps=args.offload_steps)
            stats = moepass.report(compiled_model).offload.stats()
            read = sum(s.bytes_read for s in stats) / args.offload_steps
            results.setdefault(name, []).append((rate, read))
            close_all()
    for name, samples in results.items():
        rate = sorted(r for r, _ in samples)[len(samples) // 2]
        read = samples[-1][1]
        rows.append([name, f"{rate:.2f}", f"{read / 1e6:.1f}", f"{rate / sorted(r for r, _ in results['bf16'])[len(samples) // 2]:.2f}×"])
        print(" | ".join(rows[-1]), flush=True)
    header = ["store", "decode tokens/s", "MB read per token", "× bf16 store"]
    return "\n".join([
        "## Quantized expert stores: offloaded decode (`benchmarks/quantized_cpu.py --parts offload`)", "",
        f"{today()}, {machine_description()}; a random Mixtral-shaped bfloat16 model (hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size}, {config.num_hidden_layers} layers × 8 experts, top-2), experts "
        f"read from disk on every use (no cache, no prefetch), {args.offload_steps} teacher-forced decode steps.",
        "", markdown_table(header, rows),
    ])


def part_hobbit(args, directory: Path) -> str:
    from transformers import DynamicCache

    from moepass import bundled
    from moepass.bundled.corpus import BOUNDARY
    from moepass.exports.expert_store import write_model_store
    from moepass.runtime.offload import close_all

    store = directory / "hobbit"
    prompt = bundled.heldout_batches(seq_len=16, max_tokens=16, batch_size=1, check=False)[0]
    write_model_store(bundled.load_model(), {"input_ids": prompt, "use_cache": False}, store, experts_dtype="int8",
                      low_dtype="int4", low_group_size=INT4_GROUP)
    text = bundled.heldout_batches(seq_len=args.hobbit_tokens, max_tokens=args.hobbit_tokens, batch_size=1)[0]
    rows = []
    baseline = None
    for below in (0.0, 0.1, 0.2, 0.3):
        torch._dynamo.reset()
        close_all()
        model = bundled.load_model()
        options = {"inner": "eager", "offload": {"store": str(store), "cache": "lru", "allocation": [2] * 4,
                                                 "prefetch": False, "low_precision_below": below}}
        compiled_model = torch.compile(model, backend="adaptive_moe", options=options)
        nll, count = 0.0, 0
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            for step in range(text.shape[1] - 1):
                out = compiled_model(text[:, step : step + 1], cache=cache, use_cache=True)
                cache = out.past_key_values
                target = text[0, step + 1]
                if int(target) != BOUNDARY:  # the file-boundary id is not a byte: not scored
                    nll += float(torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), target[None]))
                    count += 1
        stats = moepass.report(compiled_model).offload.stats()
        stride = sum(s.bytes_read + s.low_bytes_read for s in stats) / (text.shape[1] - 1)
        low = sum(s.low_loads for s in stats)
        misses = sum(s.misses for s in stats)
        perplexity = math.exp(nll / max(count, 1))
        baseline = baseline or perplexity
        rows.append([f"{below:g}" if below else "off", f"{perplexity:.4f}", f"{(perplexity / baseline - 1) * 100:+.2f}%",
                     str(low), str(misses), f"{stride / 1e3:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
        close_all()
    header = ["low_precision_below", "ppl/byte", "Δ ppl", "int4 copies read", "int8 experts read", "KB read / token"]
    return "\n".join([
        "## HOBBIT on the bundled model (`benchmarks/quantized_cpu.py --parts hobbit`)", "",
        f"{today()}, {machine_description()}; an int8 store with int4 g{INT4_GROUP} copies; 2 cached experts per "
        f"layer (LRU), no prefetch; {args.hobbit_tokens} held-out bytes decoded one at a time (teacher forcing). A miss "
        "of an expert whose routing weight is below the bar reads its int4 copy instead (not cached).",
        "", markdown_table(header, rows),
    ])


def part_llama(args, directory: Path) -> str:
    found = {name: importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gguf")}
    line = ", ".join(f"{name}: {'installed' if ok else 'not installed'}" for name, ok in found.items())
    print(f"llama.cpp comparison: {line}; not run (the GGUF conversion of the random model is not written yet)")
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--decode-tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rotations", type=int, default=16, help="decode: routings cycled through (distinct experts)")
    parser.add_argument("--ort-tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--offload-hidden", type=int, default=2048)
    parser.add_argument("--offload-intermediate", type=int, default=5632)
    parser.add_argument("--offload-layers", type=int, default=4)
    parser.add_argument("--offload-steps", type=int, default=24)
    parser.add_argument("--hobbit-tokens", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds: checks the script runs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if args.quick:
        args.shapes = args.shapes[:1] if args.shapes == list(SHAPES) else args.shapes
        args.tokens, args.ort_tokens, args.rounds, args.min_seconds = [1, 32], [1, 32], 3, 0.0
        args.decode_tokens, args.rotations = [1, 3], 4
        args.offload_hidden, args.offload_intermediate, args.offload_layers, args.offload_steps = 256, 512, 2, 4
        args.hobbit_tokens = 64
    os.environ.setdefault("MOEPASS_PROGRESS", "0")
    bandwidths = read_bandwidths(args.quick)
    read = bandwidths["sum"]
    print(f"machine: {machine_description()}; read bandwidth {', '.join(f'{k} {v / 1e9:.1f} GB/s' for k, v in bandwidths.items())}")
    directory = Path(tempfile.mkdtemp(prefix="moepass-quantized-"))
    try:
        sections = {}
        for part in args.parts:
            started = time.perf_counter()
            body = {
                "decode": lambda: part_decode(args, bandwidths),
                "block": lambda: part_block(args, read),
                "ort": lambda: part_ort(args, directory),
                "offload": lambda: part_offload(args, directory),
                "hobbit": lambda: part_hobbit(args, directory),
                "llama": lambda: part_llama(args, directory),
            }[part]()
            print(f"[{part}: {time.perf_counter() - started:.0f} s]")
            if body:
                sections[f"quantized_{part}"] = body
        if not args.no_write and not args.quick:
            for name, body in sections.items():
                write_section(name, body)
            print(f"wrote {', '.join(sections)} to benchmarks/RESULTS.md")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
