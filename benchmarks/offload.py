"""Expert offloading on CPU: decode speed with the experts on disk, static vs adaptive routing.

For each model, the experts are written to an expert store on disk and the
model decodes greedily (batch 1, KV cache) through
``torch.compile(model, backend="adaptive_moe", options={"policy": ..., "offload": ...})``
with every combination of

* policy: ``static`` (native top-2) and an adaptive one (the bundled model: its
  calibrated AdapMoE ``sensitivity`` artefact; the random model: ``threshold``
  calibrated on its own router logits to an average k of 1.5),
* cache: ``none`` (every needed expert read from disk), ``lru`` (the budget
  split evenly over layers), ``allocated`` (split by the DP on measured miss
  costs after ``--profile-calls`` decode steps),
* prefetch off / on (layer l+1's experts predicted from layer l's input and
  read by a worker thread),

all at the same cache budget (``--cache-experts`` experts in total).  Per run:
decode tokens/s (timed after ``--warmup`` steps), the speed-up against static
+ LRU without prefetch... and static + LRU with prefetch, the hit rate, MB
read from the store per token against the ideal (every needed expert not kept
from an earlier use, read once), and the time the compute thread waited for
loads per token.  The bundled model also runs with every expert in memory,
and its policies' held-out perplexity is measured (the offloaded outputs are
bit for bit the in-memory ones, so offloading does not change it).

Models: ``bundled`` (4 layers × 8 experts of 0.39 MB, float32) and ``random``
(a Mixtral-shaped random-weight model, default hidden 2048, intermediate 5632,
4 layers × 8 experts of 138 MB = 4.4 GB on disk; built without ever holding
its experts in memory: ``no_init_weights``, the store written block by block,
the expert parameters released before compiling).

Usage::

    python benchmarks/offload.py                                    # both models, writes RESULTS.md
    python benchmarks/offload.py --models bundled --no-write
    python benchmarks/offload.py --smoke                            # tiny sizes, few steps, writes nothing
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import machine_description, markdown_table, today, write_section

import moepass
import moepass.runtime.stats
from moepass import bundled
from moepass.exports.expert_store import write_model_store
from moepass.runtime.offload import close_all, release_experts, write_store
from moepass.runtime.offload.release import release_tensor
from moepass.runtime.offload.store import BlockWeights, ExpertReader, aligned_buffer, open_store

CACHES = ("none", "lru", "allocated")


@dataclass
class Run:
    """One decode run's measurements."""

    policy: str
    cache: str
    prefetch: bool
    tokens_per_s: float
    hit_rate: float = 0.0
    read_mb: float = 0.0
    ideal_mb: float = 0.0
    wait_ms: float = 0.0
    average_k: float = 0.0
    slots: str = ""


# --- models and stores -----------------------------------------------------------------------


def bundled_model_and_store(directory: Path):
    """The bundled model (fresh, experts in memory) and its store."""
    prompt = bundled.heldout_batches(seq_len=64, max_tokens=64, batch_size=1)[0]
    store = directory / "bundled"
    write_model_store(bundled.load_model(), {"input_ids": prompt, "use_cache": False}, store)
    return bundled.load_model, store


def random_config(args):
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 256),
        vocab_size=1024,
        max_position_embeddings=4096,
        experts_implementation="grouped_mm",
    )


def random_model_and_store(directory: Path, args):
    """A Mixtral-shaped random model whose experts only ever exist on disk, and its store."""
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    config = random_config(args)
    store = directory / "random"
    generator = torch.Generator().manual_seed(0)
    std = config.initializer_range

    def blocks():
        for layer in range(config.num_hidden_layers):
            experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
            prefix = f"model.layers.{layer}.mlp.experts"
            w1 = torch.empty(experts, 2 * inter, hidden).normal_(0.0, std, generator=generator)
            w2 = torch.empty(experts, hidden, inter).normal_(0.0, std, generator=generator)
            yield BlockWeights(f"model.layers.{layer}.mlp", {"w1": w1, "w2": w2, "b1": None, "b2": None},
                               {"w1": f"{prefix}.gate_up_proj", "w2": f"{prefix}.down_proj"})

    started = time.perf_counter()
    manifest = write_store(blocks(), store, source="random Mixtral-shaped model")
    print(f"wrote the random model's store ({manifest.nbytes / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s")

    def make():
        with no_init_weights():  # parameters are allocated, never touched: no memory used yet
            model = MixtralForCausalLM(config)
        for layer, block in zip(model.model.layers, manifest.blocks):
            for name, attribute in (("w1", "gate_up_proj"), ("w2", "down_proj")):
                release_tensor(getattr(layer.mlp.experts, attribute), store, block.path, name)
        init = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(("gate_up_proj", "down_proj")):
                    continue
                if "norm" in name:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std, generator=init)
        release_experts(model, store)  # checks every expert parameter against the store
        return model.eval()

    return make, store


# --- runs -------------------------------------------------------------------------------------


def token_stream(name: str, length: int) -> torch.Tensor:
    """[1, length] ids: held-out text for the bundled model, seeded random ids for the random one."""
    if name == "bundled":
        return bundled.heldout_batches(seq_len=length, max_tokens=length, batch_size=1)[0]
    return torch.randint(0, 1024, (1, length), generator=torch.Generator().manual_seed(0))


def decode(model, options: dict, tokens: torch.Tensor, prompt: int, warmup: int, steps: int):
    """Prefill ``prompt`` tokens, then feed the next ones one per step with the KV cache (teacher forcing:
    real text keeps the bundled model's routing realistic; greedy decoding of a random model loops on a few
    tokens, which would flatter every cache).  Returns (tokens/s over the timed steps, the compiled model)."""
    from transformers import DynamicCache

    compiled = torch.compile(model, backend="adaptive_moe", options=options)
    with torch.no_grad():
        out = compiled(tokens[:, :prompt], cache=DynamicCache(config=model.config), use_cache=True)
        for step in range(warmup + steps):
            if step == warmup:
                session = moepass.report(compiled).offload
                if session is not None:
                    session.reset_stats()
                moepass.runtime.stats.reset_stats()
                started = time.perf_counter()
            out = compiled(tokens[:, prompt + step : prompt + step + 1], cache=out.past_key_values, use_cache=True)
        elapsed = time.perf_counter() - started
    return steps / elapsed, compiled


def measure(name, make_model, store, policy_name, policy, cache, prefetch, args, budget) -> Run:
    torch._dynamo.reset()
    close_all()
    gc.collect()
    offload = None
    if cache is not None:
        offload = {"store": str(store), "cache": cache, "cache_bytes": budget if cache != "none" else 0,
                   "prefetch": prefetch, "profile_calls": args.profile_calls}
    validate = not args.no_validate and name == "bundled"
    options = {"policy": policy, "inner": args.inner, "stats": True, "validate": validate}
    if offload:
        options["offload"] = offload
    tokens = token_stream(name, args.prompt + args.warmup + args.steps)
    tokens_per_s, compiled = decode(make_model(), options, tokens, args.prompt, args.warmup, args.steps)
    report = moepass.report(compiled)
    block_stats = report.stats()
    average_k = statistics.fmean(s.average_k for s in block_stats.values()) if block_stats else 0.0
    run = Run(policy_name, cache or "in memory", prefetch, tokens_per_s, average_k=average_k)
    if report.offload is not None:
        stats = report.offload.stats()
        tokens = max(s.tokens for s in stats)
        accesses = sum(s.accesses for s in stats)
        run.hit_rate = sum(s.hits for s in stats) / accesses if accesses else 0.0
        run.read_mb = sum(s.bytes_read for s in stats) / tokens / 1e6
        run.ideal_mb = sum(s.ideal_bytes for s in stats) / tokens / 1e6
        run.wait_ms = 1e3 * sum(s.load_wait_s for s in stats) / tokens
        run.slots = "/".join(str(s.slots) for s in stats)
    close_all()
    label = f"{policy_name:>11} {run.cache:>9} prefetch {'on ' if prefetch else 'off'}"
    print(f"  {label}: {tokens_per_s:7.2f} tok/s, hit {100 * run.hit_rate:5.1f}%, read {run.read_mb:8.2f} MB/tok "
          f"(ideal {run.ideal_mb:8.2f}), wait {run.wait_ms:8.2f} ms/tok, k {average_k:.2f}, slots {run.slots}",
          flush=True)
    return run


def adaptive_policy(name: str, make_model, store, args):
    """The bundled sensitivity artefact, or threshold calibrated on the random model's router logits."""
    if name == "bundled":
        return "sensitivity", bundled.load_policy("sensitivity")
    from moepass.policies import make_policy
    from moepass.runtime.calibrate import RouterRecord, _bisect
    from moepass.runtime.ops import capture_routes

    records: dict[str, RouterRecord] = {}

    def hook(config, logits, x):
        records.setdefault(config.block, RouterRecord(config.router)).logits.append(logits.detach().float())

    torch._dynamo.reset()
    compiled = torch.compile(make_model(), backend="adaptive_moe",
                             options={"inner": "eager", "validate": False,
                                      "offload": {"store": str(store), "prefetch": False}})
    tokens = torch.randint(0, 1024, (1, args.calibration_tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_routes(hook):
        compiled(tokens, use_cache=False)
    close_all()
    policy = _bisect(lambda t: make_policy("threshold", T=t), records, args.target_k, 0.0, 1.0, increasing=True)
    return f"threshold T={policy.T:.3f}", policy


def perplexities(args) -> dict[str, float]:
    """Held-out perplexity per byte of the bundled model's static and sensitivity policies (in memory)."""
    from moepass.bundled.evaluate import evaluate_policy
    from moepass.policies import Static

    batches = bundled.heldout_batches(seq_len=256, max_tokens=args.ppl_tokens, batch_size=16)
    model = bundled.load_model()
    static = evaluate_policy(model, Static(), batches)
    adaptive = evaluate_policy(model, bundled.load_policy("sensitivity"), batches)
    torch._dynamo.reset()
    return {"static": static.perplexity, "adaptive": adaptive.perplexity, "tokens": static.tokens}


def read_latency(store: Path) -> float:
    """Median seconds of one expert read from the store (the way the caches read)."""
    root, manifest = open_store(store)
    reader = ExpertReader(root, manifest)
    block = manifest.blocks[-1]
    buffer = aligned_buffer(block.stride)
    samples = []
    for _ in range(3):
        for expert in range(block.num_experts):
            started = time.perf_counter()
            reader.read(block, expert, buffer)
            samples.append(time.perf_counter() - started)
    io = reader.io
    reader.close()
    return statistics.median(samples), io


# --- tables -----------------------------------------------------------------------------------


def table(runs: list[Run]) -> str:
    def find(policy, cache, prefetch):
        return next((r for r in runs if r.policy == policy and r.cache == cache and r.prefetch == prefetch), None)

    static_name = "static"
    baseline = find(static_name, "lru", False)
    baseline_prefetch = find(static_name, "lru", True)
    header = ["policy", "cache", "prefetch", "tok/s", "× static+LRU", "× static+LRU+prefetch", "hit rate",
              "read MB/tok", "ideal MB/tok", "wait ms/tok", "avg k", "slots per layer"]
    rows = []
    for r in runs:
        rows.append([
            r.policy, r.cache, "on" if r.prefetch else "off", f"{r.tokens_per_s:.2f}",
            f"{r.tokens_per_s / baseline.tokens_per_s:.2f}×" if baseline else "—",
            f"{r.tokens_per_s / baseline_prefetch.tokens_per_s:.2f}×" if baseline_prefetch else "—",
            f"{100 * r.hit_rate:.1f}%" if r.cache != "in memory" else "—",
            f"{r.read_mb:.2f}" if r.cache != "in memory" else "—",
            f"{r.ideal_mb:.2f}" if r.cache != "in memory" else "—",
            f"{r.wait_ms:.2f}" if r.cache != "in memory" else "—",
            f"{r.average_k:.2f}", r.slots or "—",
        ])
    return markdown_table(header, rows)


#: Per model: (warm-up steps, timed steps, steps before the DP allocation).
STEPS = {"bundled": (40, 64, 32), "random": (24, 32, 16)}


def run_model(name: str, directory: Path, args) -> str:
    started = time.perf_counter()
    args = argparse.Namespace(**vars(args))
    defaults = STEPS[name] if not args.smoke else (6, 6, 3)
    for field, default in zip(("warmup", "steps", "profile_calls"), defaults):
        if getattr(args, field) is None:
            setattr(args, field, default)
    if name == "bundled":
        make_model, store = bundled_model_and_store(directory)
    else:
        make_model, store = random_model_and_store(directory, args)
    manifest = open_store(store)[1]
    block = manifest.blocks[0]
    budget = args.cache_experts * block.stride
    latency, io = read_latency(store)
    experts = sum(b.num_experts for b in manifest.blocks)
    print(f"{name}: {len(manifest.blocks)} blocks × {block.num_experts} experts of {block.expert_nbytes / 1e6:.2f} MB "
          f"({manifest.nbytes / 1e9:.2f} GB); cache budget {args.cache_experts} of {experts} experts "
          f"({budget / 1e6:.1f} MB); one expert read {1e3 * latency:.2f} ms ({io})", flush=True)
    adaptive_name, adaptive = adaptive_policy(name, make_model, store, args)
    policies = [("static", "static"), (adaptive_name, adaptive)]
    runs = []
    if name == "bundled":
        for policy_name, policy in policies:
            runs.append(measure(name, make_model, store, policy_name, policy, None, False, args, budget))
    for policy_name, policy in policies:
        for cache in args.caches:
            for prefetch in (False, True):
                runs.append(measure(name, make_model, store, policy_name, policy, cache, prefetch, args, budget))
    ppl = ""
    if name == "bundled" and args.ppl_tokens:
        p = perplexities(args)
        change = 100 * (p["adaptive"] / p["static"] - 1)
        ppl = (f"Perplexity per byte on {p['tokens']} held-out bytes: static {p['static']:.4f}, {adaptive_name} "
               f"{p['adaptive']:.4f} ({change:+.2f}%); offloaded outputs are bit for bit the in-memory ones.\n\n")
    elif name != "bundled":
        ppl = "Random weights: the adaptive policy's perplexity change means nothing here (see the bundled model).\n\n"
    body = (
        f"**{name}** — {len(manifest.blocks)} blocks × {block.num_experts} experts, {block.expert_nbytes / 1e6:.2f} MB "
        f"per expert ({manifest.nbytes / 1e9:.2f} GB on disk); cache budget {args.cache_experts} experts "
        f"({budget / 1e6:.1f} MB) in every cached run; reads with {io}, one expert read {1e3 * latency:.2f} ms; "
        f"prompt {args.prompt}, {args.warmup} warm-up + {args.steps} timed decode steps (teacher-forced), inner "
        f"{args.inner}; allocation after {args.profile_calls} steps.\n\n{ppl}{table(runs)}\n"
    )
    print(f"{name} done in {time.perf_counter() - started:.0f} s", flush=True)
    if not args.keep_store:
        shutil.rmtree(store, ignore_errors=True)
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bundled", "random"], choices=["bundled", "random"])
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=list(CACHES))
    parser.add_argument("--cache-experts", type=int, default=12, help="cache budget in experts, all layers (default 12 of 32)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--warmup", type=int, default=None, help="untimed decode steps (default: bundled 40, random 24)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default: bundled 64, random 32)")
    parser.add_argument("--profile-calls", type=int, default=None,
                        help="decode steps before the DP allocation (default: bundled 32, random 16)")
    parser.add_argument("--target-k", type=float, default=1.5, help="average k of the random model's adaptive policy")
    parser.add_argument("--calibration-tokens", type=int, default=256, help="random tokens its threshold is fitted on")
    parser.add_argument("--ppl-tokens", type=int, default=32768, help="held-out bytes for the perplexity (0: skip)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--inner", default="eager", choices=["eager", "aot_eager", "inductor"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the backend's validation on the bundled model too (the random model never "
                        "validates: it would read its 4.4 GB store back for every compile)")
    parser.add_argument("--store-dir", default=None, help="where to write the stores (default: a temporary folder)")
    parser.add_argument("--keep-store", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps; writes nothing")
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.intermediate, args.prompt, args.ppl_tokens = 256, 512, 8, 0
        args.no_write, args.no_validate, args.calibration_tokens = True, True, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = Path(tempfile.mkdtemp(prefix="moepass-offload-", dir=args.store_dir))
    try:
        bodies = [run_model(name, directory, args) for name in args.models]
    finally:
        if not args.keep_store:
            shutil.rmtree(directory, ignore_errors=True)
    body = (f"Machine: {machine_description()}; {today()}.  Decode, batch 1, float32, experts offloaded to the "
            f"local disk.\n\n" + "\n".join(bodies))
    print()
    print(body)
    if not args.no_write:
        write_section("offload_cpu", body)


if __name__ == "__main__":
    main()
