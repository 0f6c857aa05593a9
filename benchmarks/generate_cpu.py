"""Prefill and decode speed of ``generate()`` on whole models: eager transformers against moepass.

Models: random-weight causal LMs whose MoE blocks have the three real shapes
of ``moe_block_cpu.py`` (Mixtral-shaped, OLMoE, Qwen3-30B-A3B; 2 layers by
default, bfloat16, a 32000-token vocabulary so the MoE layers weigh in the
model about as they do in the full-depth model), and the bundled trained
Mixtral (4 layers, hidden 128, float32).  Per model, three variants that share
the same weight tensors:

* eager transformers (``grouped_mm`` experts),
* moepass static: ``model.forward = torch.compile(model.forward, backend="adaptive_moe")``,
* moepass adaptive: the same with top-p calibrated to an average k of 0.65 ×
  native k (the bundled model: its calibrated ``sensitivity`` artefact).

Each round times, per variant and interleaved, ``generate(prompt,
max_new_tokens=1)`` (prefill: the prompt's forward and one token) and
``generate(prompt, max_new_tokens=1 + N)``; prefill tokens/s is the prompt
length over the first, decode latency per token the difference over N
(medians over rounds).  Greedy decoding with a fixed length; whether the static
variant's tokens equal eager's is reported (bfloat16 round-off may tip a
near-tie on random weights).

Usage::

    python benchmarks/generate_cpu.py [--models bundled mixtral olmoe qwen3_moe] [--layers 2]
        [--prompt 128] [--new-tokens 32] [--rounds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import statistics
import time

import torch
from _common import machine_description, markdown_table, today, write_section
from moe_block_cpu import ADAPTIVE_FRACTION, SHAPES
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import moepass
import moepass.runtime.stats
from moepass import bundled

VOCAB = 32000


def shape_model(name: str, layers: int, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight causal LM whose MoE blocks have shape ``name`` (N(0, 0.02) weights, as transformers inits)."""
    shape = SHAPES[name]
    common = dict(
        hidden_size=shape.hidden,
        num_hidden_layers=layers,
        num_experts_per_tok=shape.top_k,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        experts_implementation="grouped_mm",
    )
    if name == "mixtral":
        config = MixtralConfig(
            intermediate_size=shape.inter, num_local_experts=shape.experts, num_attention_heads=8, num_key_value_heads=8, **common
        )
        cls = MixtralForCausalLM
    elif name == "olmoe":
        config = OlmoeConfig(
            intermediate_size=shape.inter, num_experts=shape.experts, num_attention_heads=16, num_key_value_heads=16, **common
        )
        cls = OlmoeForCausalLM
    else:
        config = Qwen3MoeConfig(
            moe_intermediate_size=shape.inter,
            num_experts=shape.experts,
            norm_topk_prob=True,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            **common,
        )
        cls = Qwen3MoeForCausalLM
    torch.manual_seed(0)
    return cls(config).to(dtype).eval()


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose parameters are ``model``'s own tensors (no weight is copied)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def compile_forward(model: torch.nn.Module, tag: str, **options) -> torch.nn.Module:
    """``model.forward = torch.compile(model.forward, ...)``, with a forward whose code object is its own.

    Dynamo caches compiled code per code object: variants compiled from the
    same class's ``forward`` would evaluate each other's guards on every call.
    The model becomes an instance of a subclass whose ``forward`` (compiled
    from its own source) calls the class's.
    """
    cls = type(model)
    namespace: dict = {"base_forward": cls.forward}
    source = "def forward(self, *args, **kwargs):\n    return base_forward(self, *args, **kwargs)\n"
    exec(compile(source, f"<generate variant {tag}>", "exec"), namespace)
    # the class's signature: generate() passes logits_to_keep only to a forward that declares it
    forward = functools.wraps(cls.forward)(namespace["forward"])
    model.__class__ = type(f"{cls.__name__}_{tag}", (cls,), {"forward": forward})
    model.forward = torch.compile(model.forward, **options)
    return model


def generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )


def adaptive_policy(name: str, model, prompt_length: int):
    """The adaptive policy of a model: top-p calibrated to 0.65 × native k, or the bundled sensitivity artefact."""
    if name == "bundled":
        return bundled.load_policy("sensitivity")
    top_k = SHAPES[name].top_k
    batches = [torch.randint(1, VOCAB, (1, prompt_length), generator=torch.Generator().manual_seed(1))]
    return moepass.calibrate(model, batches, "top_p", target_avg_k=ADAPTIVE_FRACTION * top_k, show_progress=False)


def load_average() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bundled", "mixtral", "olmoe", "qwen3_moe"])
    parser.add_argument("--layers", type=int, default=2, help="layers of the random-weight models")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    started, load_before = time.time(), load_average()
    print(f"machine: {machine_description()}; load average {load_before}")

    rows, notes = [], []
    for name in args.models:
        if name == "bundled":
            model = bundled.load_model()
            text = bundled.encode("import os\nimport sys\n\n\ndef main(argv):\n    ")
            prompt = text.repeat(args.prompt // len(text) + 1)[: args.prompt].unsqueeze(0)
            label = "bundled Mixtral (4 layers, hidden 128, 8 experts, top-2), float32"
        else:
            model = shape_model(name, args.layers, torch.bfloat16)
            prompt = torch.randint(1, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(0))
            label = f"{SHAPES[name].label}, {args.layers} layers, bfloat16"
        policy = adaptive_policy(name, model, args.prompt)
        variants = {
            "eager": model,
            "static": compile_forward(twin(model), f"{name}_static", backend="adaptive_moe"),
            "adaptive": compile_forward(
                twin(model), f"{name}_adaptive", backend="adaptive_moe", options={"policy": policy, "stats": True}
            ),
        }
        outputs = {}
        with torch.no_grad():
            for variant, m in variants.items():  # compiles the prefill and decode graphs
                t0 = time.perf_counter()
                outputs[variant] = generate(m, prompt, 1 + args.new_tokens)
                print(f"{name} {variant}: first generate {time.perf_counter() - t0:.1f} s", flush=True)
            moepass.runtime.stats.reset_stats()
            generate(variants["adaptive"], prompt, 1 + args.new_tokens)
            stats = moepass.report(variants["adaptive"]).stats()
            k_avg = statistics.mean(s.average_k for s in stats.values()) if stats else float("nan")
            same = float((outputs["static"] == outputs["eager"]).float().mean())
            prefill: dict[str, list[float]] = {v: [] for v in variants}
            full: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(args.rounds):
                for variant, m in variants.items():
                    t0 = time.perf_counter()
                    generate(m, prompt, 1)
                    prefill[variant].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    generate(m, prompt, 1 + args.new_tokens)
                    full[variant].append(time.perf_counter() - t0)
        times = {}
        for variant in variants:
            p, f = statistics.median(prefill[variant]), statistics.median(full[variant])
            times[variant] = (p, (f - p) / args.new_tokens)
        eager_prefill, eager_decode = times["eager"]
        for variant, (p, d) in times.items():
            rows.append(
                [
                    label if variant == "eager" else "",
                    variant + (f" (k_avg {k_avg:.2f})" if variant == "adaptive" else ""),
                    f"{args.prompt / p:.0f}",
                    f"{eager_prefill / p:.2f}×",
                    f"{d * 1e3:.2f}",
                    f"{eager_decode / d:.2f}×",
                ]
            )
            print(
                f"{name:10s} {variant:9s} prefill {args.prompt / p:8.0f} tok/s ({eager_prefill / p:.2f}×)  "
                f"decode {d * 1e3:7.2f} ms/token ({eager_decode / d:.2f}×)",
                flush=True,
            )
        notes.append(f"{name}: static's greedy tokens equal eager's for {100 * same:.0f}% of positions; adaptive: {policy.describe()}")
        del variants, model
        torch._dynamo.reset()
        gc.collect()

    minutes = (time.time() - started) / 60
    body = (
        "## generate() on CPU (`benchmarks/generate_cpu.py`)\n\n"
        f"{today()} — {machine_description()}; load average {load_before} before, {load_average()} after; "
        f"{minutes:.1f} min in all.  Prompt of {args.prompt} tokens, {args.new_tokens} decoded tokens (greedy, fixed "
        "length), batch 1; interleaved medians of "
        f"{args.rounds} rounds.  Prefill: `generate(max_new_tokens=1)`; decode: the extra time of "
        f"`max_new_tokens=1+{args.new_tokens}` per token.  moepass compiles the model's forward "
        "(`model.forward = torch.compile(model.forward, backend=\"adaptive_moe\")`, Inductor for the rest of the graph); "
        "speed-ups are against eager transformers (`grouped_mm` experts).  Random-weight models use a "
        f"{VOCAB}-token vocabulary.\n\n"
        + markdown_table(
            ["model", "variant", "prefill tokens/s", "prefill vs eager", "decode ms/token", "decode vs eager"], rows
        )
        + "\n\n"
        + "\n".join(f"- {n}" for n in notes)
        + "\n"
    )
    print(body)
    if not args.no_write:
        write_section("generate_cpu", body)


if __name__ == "__main__":
    main()
