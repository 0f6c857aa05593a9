"""onnxruntime-genai on CPU: prefill time and decode tokens/s of static and adaptive generation exports.

Each variant is a folder onnxruntime-genai loads (``moepass.export_genai``: KV cache in and out):

(b) ``MoE static top-k``   the static export with each block's function replaced
                           by router logits → ``com.microsoft.MoE`` (k = native,
                           renormalised): what onnxruntime-genai's builder emits
                           for Mixtral-style MoE;
(c) ``moepass static``     ``export_genai(policy="static")`` (default layout);
(d) ``moepass adaptive``   ``export_genai`` with top-p calibrated to an average k
                           of about 1.4 (``moepass.calibrate``);
(d') the same, layout ``masked`` (one ``com.microsoft.MoE`` call), where the
                           default is another;
(f) ``genai builder``      onnxruntime-genai's own model builder on the same
                           checkpoint saved locally, when it accepts it (its 0.18
                           has no Mixtral builder: the reason is printed).

Models: the bundled model (4 layers, hidden 128, 8 experts, top-2; a held-out
prompt) and a random-weight Mixtral-like model (``--layers`` 2, hidden 1024,
intermediate 2816, 8 experts, top-2, 8 heads / 2 KV heads, vocabulary 32000;
random prompt ids).  Greedy search from token ids, ``min_length`` set so that
every run decodes the same number of tokens.  Prefill: ``append_tokens`` of
the prompt; decode: ``--new-tokens`` calls of ``generate_next_token``.  The
variants run in turn, round after round (interleaved); times are medians.
(b) and (c) must produce the same tokens (both static), checked before timing.

Usage: python benchmarks/genai_cpu.py [--prompt 128] [--new-tokens 64] [--rounds 5] [--layers 2] [--no-write]
       python benchmarks/genai_cpu.py --small --no-write      (a quick check that it runs: ~5 min on 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from _common import machine_description, markdown_table, today, write_section
from onnx_cpu import genai_functions

import moepass
from moepass.exports.genai import MODEL_FILE, export_genai
from moepass.exports.onnx import OnnxExportOptions

try:
    import onnxruntime_genai as og
except ImportError:
    sys.exit("onnxruntime-genai is not installed: pip install onnxruntime-genai")

GENAI, STATIC, ADAPTIVE, MASKED, BUILDER = (
    "(b) MoE static top-k", "(c) moepass static", "(d) moepass adaptive", "(d') moepass adaptive, masked MoE",
    "(f) genai builder",
)


@dataclasses.dataclass
class Shape:
    """The random-weight model's shape."""

    layers: int = 2
    hidden: int = 1024
    intermediate: int = 2816
    experts: int = 8
    heads: int = 8
    kv_heads: int = 2
    vocab: int = 32000


def random_mixtral(shape: Shape, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_local_experts=shape.experts, num_experts_per_tok=2, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab, max_position_embeddings=4096,
        sliding_window=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.02)
    return model.eval()


def genai_variant(static_folder: Path, folder: Path) -> None:
    """(b): a copy of the static folder whose block functions call com.microsoft.MoE on the router logits."""
    folder.mkdir()
    model = onnx.load(str(static_folder / MODEL_FILE))
    onnx.save(genai_functions(model), str(folder / MODEL_FILE), save_as_external_data=True,
              location=f"{MODEL_FILE}.data")
    (folder / "genai_config.json").write_bytes((static_folder / "genai_config.json").read_bytes())


def try_builder(model, directory: Path) -> tuple[Path | None, str]:
    """onnxruntime-genai's builder on the checkpoint saved locally; (folder, "") or (None, why not)."""
    import onnxruntime_genai.models.builder as builder_module

    architecture = (model.config.architectures or [type(model).__name__])[0]
    if f'"{architecture}"' not in Path(builder_module.__file__).read_text():
        return None, f"onnxruntime-genai {og.__version__}'s builder has no {architecture} (not in its list of architectures)"
    checkpoint, out = directory / "checkpoint", directory / "builder"
    model.save_pretrained(str(checkpoint))
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "local", "-i", str(checkpoint),
               "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(directory / "cache")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    except subprocess.TimeoutExpired:
        return None, "the builder did not finish in 20 min"
    if done.returncode == 0 and (out / "genai_config.json").is_file():
        return out, ""
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "not currently supported" in line]
    return None, (errors or lines or ["no output"])[-1][:200]


def generate(model, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds, tokens) of one greedy run."""
    params = og.GeneratorParams(model)
    length = len(prompt) + new_tokens
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens([prompt])
    prefilled = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
    finished = time.perf_counter()
    return prefilled - started, finished - prefilled, [int(t) for t in generator.get_sequence(0)]


def bench(label: str, folders: dict[str, Path], prompt: list[int], new_tokens: int, rounds: int) -> list[list[str]]:
    models = {name: og.Model(str(folder)) for name, folder in folders.items()}
    tokens = {name: generate(model, prompt, new_tokens)[2] for name, model in models.items()}  # also a warm-up
    if GENAI in tokens and STATIC in tokens:
        assert tokens[GENAI] == tokens[STATIC], f"{label}: the two static exports generate different tokens"
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            samples[name].append(generate(model, prompt, new_tokens)[:2])
    prefill = {name: statistics.median(s[0] for s in runs) for name, runs in samples.items()}
    decode = {name: new_tokens / statistics.median(s[1] for s in runs) for name, runs in samples.items()}
    rows = []
    for name in models:
        rows.append([label, name, f"{prefill[name] * 1e3:.1f}", f"{prefill[GENAI] / prefill[name]:.2f}×",
                     f"{decode[name]:.1f}", f"{decode[name] / decode[GENAI]:.2f}×"])
        print(f"{label:9s} {name:34s} prefill {prefill[name] * 1e3:8.1f} ms ({prefill[GENAI] / prefill[name]:.2f}×)"
              f"   decode {decode[name]:7.1f} tok/s ({decode[name] / decode[GENAI]:.2f}×)", flush=True)
    return rows


def run_model(label: str, model, calibration: list[torch.Tensor], prompt: list[int], args, directory: Path):
    """Export every variant of ``model`` into ``directory`` and time them; returns (rows, notes)."""
    policy = moepass.calibrate(model, calibration, "top_p", target_avg_k=args.target_k, show_progress=False)
    folders = {STATIC: directory / "static", ADAPTIVE: directory / "adaptive"}
    static = export_genai(model, folders[STATIC], "static")
    adaptive = export_genai(model, folders[ADAPTIVE], policy)
    if not adaptive.onnx.blocks[0].experts.startswith("com.microsoft.MoE (k=2, dropped"):
        folders[MASKED] = directory / "masked"
        export_genai(model, folders[MASKED], policy, options=OnnxExportOptions(ort_layout="masked"))
    folders[GENAI] = directory / "genai"
    genai_variant(folders[STATIC], folders[GENAI])
    builder, why = try_builder(model, directory) if not args.no_builder else (None, "not tried (--no-builder)")
    if builder is not None:
        folders[BUILDER] = builder
    order = [GENAI, STATIC, ADAPTIVE, MASKED, BUILDER]
    rows = bench(label, {name: folders[name] for name in order if name in folders}, prompt, args.new_tokens,
                 args.rounds)
    notes = [f"{label}: adaptive policy {policy.describe()}; layouts: static {static.onnx.blocks[0].experts}, "
             f"adaptive {adaptive.onnx.blocks[0].experts}."]
    if builder is None:
        notes.append(f"{label}: onnxruntime-genai's builder: {why}")
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per variant (interleaved)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the random Mixtral-like model")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the random model")
    parser.add_argument("--target-k", type=float, default=1.4, help="average k the adaptive policy is calibrated to")
    parser.add_argument("--small", action="store_true", help="a quick check: short runs, a hidden-256 random model")
    parser.add_argument("--no-builder", action="store_true", help="do not try onnxruntime-genai's builder")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    shape = Shape(layers=args.layers, hidden=args.hidden, intermediate=args.hidden * 11 // 4)
    if args.small:
        args.prompt, args.new_tokens, args.rounds = 16, 8, 2
        shape = Shape(layers=2, hidden=256, intermediate=704, heads=4, kv_heads=2, vocab=1024)
    logging.basicConfig(level=logging.ERROR)
    load = os.getloadavg()
    print(f"machine: {machine_description()}; onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__}; "
          f"load average {load[0]:.2f}", flush=True)
    from moepass import bundled

    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = bundled.load_model()
        text = bundled.heldout_batches(seq_len=args.prompt, max_tokens=args.prompt, batch_size=1)[0]
        calibration = list(bundled.train_batches(seq_len=128, batch_size=4, max_batches=4))
        (Path(tmp) / "bundled").mkdir()
        found = run_model("bundled", model, calibration, text[0].tolist(), args, Path(tmp) / "bundled")
        rows, notes = rows + found[0], notes + found[1]
        del model
        model = random_mixtral(shape)
        generator = torch.Generator().manual_seed(1)
        calibration = [torch.randint(0, shape.vocab, (2, 128), generator=generator) for _ in range(2)]
        prompt = torch.randint(0, shape.vocab, (args.prompt,), generator=generator).tolist()
        label = f"random {shape.hidden}"
        (Path(tmp) / "random").mkdir()
        found = run_model(label, model, calibration, prompt, args, Path(tmp) / "random")
        rows, notes = rows + found[0], notes + found[1]
    load_after = os.getloadavg()
    table = markdown_table(["model", "export", "prefill ms", "prefill vs (b)", "decode tok/s", "decode vs (b)"], rows)
    body = (
        f"## onnxruntime-genai on CPU (`benchmarks/genai_cpu.py`)\n\n"
        f"{today()} — {machine_description()}; onnxruntime {ort.__version__}, onnxruntime-genai {og.__version__} "
        f"(CPU provider); load average {load[0]:.2f} before, {load_after[0]:.2f} after.  Greedy search from token "
        f"ids, a {args.prompt}-token prompt (prefill), then {args.new_tokens} decode steps; variants interleaved, "
        f"medians of {args.rounds} runs.  Random model: Mixtral-like, {shape.layers} layers, hidden {shape.hidden}, "
        f"intermediate {shape.intermediate}, {shape.experts} experts, top-2, {shape.heads} heads / {shape.kv_heads} KV "
        f"heads, vocabulary {shape.vocab}, float32.\n\n{table}\n\n" + "\n".join(notes) + "\n"
    )
    print(body)
    if not args.no_write:
        write_section("genai_cpu", body)


if __name__ == "__main__":
    main()
