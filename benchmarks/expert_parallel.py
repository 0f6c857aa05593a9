"""Expert parallelism on CPU (gloo, 2 ranks): bytes per token and time per step, moepass against transformers' EP.

One Mixtral-shaped model (hidden 1024, intermediate 2816, 8 experts, top-2,
2 layers, random weights, float32) is loaded on 2 spawned ranks with
transformers' distributed runtime, once per expert-parallel implementation:
transformers' ``all_to_all`` and ``all_reduce`` and moepass's (``ep_implementation="moepass"``,
compiled with ``backend="adaptive_moe"``).  The ranks share one batch
(``DistributedConfig(tp_size=2, tp_plan={}, ep_size=2)``, the layout
``all_reduce`` needs), so each rank handles half its tokens.

1. **Bytes per token per MoE layer** a rank sends (dispatch, combine, counts;
   ``all_reduce``'s ring all-reduce) against the average k: moepass static and
   a sweep of two policies (top-p, threshold), beside transformers' two
   implementations — and ``all_to_all`` under moepass's top-p router, whose
   dropped slots it still sends.  Every collective is counted where it is
   called (``torch.distributed`` wrapped for the run); moepass's own counters
   (:func:`moepass.runtime.expert_parallel.count_traffic`) must agree.  Also the
   rows each rank's experts ran per layer call (max and mean over ranks).
2. **Time per step** (interleaved medians, A, B, C, A, B, C …) at 16, 256 and
   2048 tokens per rank and a decode step (4 sequences per rank, one new token
   after 64): one process (transformers eager, moepass static and adaptive)
   against EP = 2 — the shared batch (transformers ``all_to_all`` and
   ``all_reduce``, moepass static and adaptive) and moepass with the mesh option
   (a batch per rank: the same tokens per rank as one process).  The adaptive
   policy is top-p calibrated to an average k of 0.65 × 2.
3. **On paper** (a model, not a measurement): bytes per token per layer at
   DeepSeek-V3 scale (256 experts, top-8, hidden 7168, bf16) for EP 8–64
   against the average k, one message per slot (moepass, transformers'
   ``all_to_all``) and one per destination rank (DeepEP's de-duplication).

Usage::

    python benchmarks/expert_parallel.py [--tokens 16 256 2048] [--rounds 5] [--inner inductor] [--no-write]
    python benchmarks/expert_parallel.py --quick     # tiny model, 2 rounds, inner eager: a smoke run (~2 min)
    python benchmarks/expert_parallel.py --paper     # the on-paper model only, no processes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import socket
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import interleaved_medians, machine_description, markdown_table, today, write_section

FULL = dict(hidden_size=1024, intermediate_size=2816, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=8, vocab_size=1024)
QUICK = dict(hidden_size=64, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
WORLD = 2
#: The adaptive policy of the timings is calibrated to this fraction of the native k.
ADAPTIVE_FRACTION = 0.65


# --- the on-paper model -----------------------------------------------------------------------------------


def _expected_destination_ranks(experts: int, ranks: int, k: int) -> float:
    """Expected number of *other* ranks a token's k distinct experts live on (experts drawn uniformly)."""
    per_rank = experts // ranks
    miss = math.comb(experts - per_rank, k) / math.comb(experts, k)  # no pick on a given rank
    return (ranks - 1) * (1 - miss)


def paper_model(tokens_per_rank: int = 4096) -> str:
    """Bytes per token per MoE layer at DeepSeek-V3 scale, per-slot against per-destination-rank messages."""
    experts, top_k, hidden, element = 256, 8, 7168, 2
    rows = []
    for ranks in (8, 16, 32, 64):
        counts = (ranks - 1) * (experts // ranks + 3) * 8 / tokens_per_rank  # moepass's count exchange, per token
        static_slot = 2 * top_k * (ranks - 1) / ranks * hidden * element
        static_rank = 2 * _expected_destination_ranks(experts, ranks, top_k) * hidden * element
        for k_avg in (8.0, 6.0, ADAPTIVE_FRACTION * top_k, 4.0, 2.0):
            per_slot = 2 * k_avg * (ranks - 1) / ranks * hidden * element + counts
            low, high = math.floor(k_avg), math.ceil(k_avg)  # per-rank dedup at a fractional k: linear between
            destinations = _expected_destination_ranks(experts, ranks, low) + (k_avg - low) * (
                _expected_destination_ranks(experts, ranks, high) - _expected_destination_ranks(experts, ranks, low)
            )
            per_rank = 2 * destinations * hidden * element
            rows.append([
                str(ranks), f"{k_avg:.1f}", f"{per_slot / 1e3:.1f}", f"{per_slot / static_slot:.2f}",
                f"{per_rank / 1e3:.1f}", f"{per_rank / static_rank:.2f}",
            ])
    return (
        "On paper (a model, not a measurement): DeepSeek-V3 scale — 256 experts, top-8, hidden 7168, bf16 rows, "
        f"{tokens_per_rank} tokens per rank; dispatch + combine of one row per kept slot on another rank (moepass, "
        "transformers' `all_to_all`) or one row per distinct other rank a token's experts live on (DeepEP), with "
        "experts drawn uniformly (DeepSeek-V3's node-limited routing is not modelled); counts are moepass's "
        "(E/R + 3 int64 per peer).  KB per token per MoE layer, and the fraction of the static (k = 8) bytes:\n\n"
        + markdown_table(["EP ranks", "average k", "per slot KB", "× static", "per rank KB", "× static"], rows)
    )


# --- counting what the collectives send ----------------------------------------------------------------------


class CollectiveBytes:
    """Wraps ``torch.distributed``'s collectives for a block: bytes this rank sends to the others, by kind.

    ``all_to_all``: rows to other ranks × row bytes (integer tensors are counts,
    floating ones alternate dispatch / combine per layer, in call order);
    ``all_reduce``: the ring algorithm's 2·(R−1)/R of the tensor.  (The output
    all-gather of a shared batch runs inside DTensor for transformers, where
    this does not see it: the report gives it from its formula.)
    """

    def __init__(self):
        self.bytes = {"dispatch": 0, "combine": 0, "counts": 0, "all_reduce": 0}
        #: Rows this rank's experts ran per layer call (received from every rank, its own included).
        self.rows_run: list[int] = []
        self._float_calls = 0

    def _all_to_all(self, tensor, input_splits, output_splits, group):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        rows = tensor.shape[0]
        splits = list(input_splits) if input_splits else [rows // size] * size
        row_bytes = tensor.element_size() * (tensor[0].numel() if rows else math.prod(tensor.shape[1:]))
        sent = sum(n for r, n in enumerate(splits) if r != rank) * row_bytes
        if not tensor.is_floating_point():
            self.bytes["counts"] += sent
            return
        kind = "dispatch" if self._float_calls % 2 == 0 else "combine"
        self._float_calls += 1
        self.bytes[kind] += sent
        if kind == "dispatch":
            received = list(output_splits) if output_splits else [rows // size] * size
            self.rows_run.append(int(sum(received)))

    @contextlib.contextmanager
    def counting(self):
        import torch.distributed._functional_collectives as functional

        import transformers.distributed.expert_parallel as transformers_ep

        originals = {
            (dist, "all_to_all_single"): dist.all_to_all_single,
            (dist, "all_reduce"): dist.all_reduce,
            (transformers_ep, "all_to_all_single"): transformers_ep.all_to_all_single,
            (transformers_ep, "all_to_all_single_autograd"): transformers_ep.all_to_all_single_autograd,
        }

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            self._all_to_all(input, input_split_sizes, output_split_sizes, group)
            return originals[(dist, "all_to_all_single")](output, input, output_split_sizes, input_split_sizes, group, **kw)

        def all_to_all_single_autograd(input, output_split_sizes, input_split_sizes, group):
            self._all_to_all(input, input_split_sizes, output_split_sizes, group)
            return originals[(transformers_ep, "all_to_all_single_autograd")](
                input, output_split_sizes, input_split_sizes, group)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, **kw):
            size = dist.get_world_size(group)
            self.bytes["all_reduce"] += int(tensor.numel() * tensor.element_size() * 2 * (size - 1) / size)
            return originals[(dist, "all_reduce")](tensor, op, group, **kw)

        replacements = {
            (dist, "all_to_all_single"): all_to_all_single, (dist, "all_reduce"): all_reduce,
            (transformers_ep, "all_to_all_single"): all_to_all_single,
            (transformers_ep, "all_to_all_single_autograd"): all_to_all_single_autograd,
        }
        for (module, name), function in replacements.items():
            setattr(module, name, function)
        try:
            yield self
        finally:
            for (module, name), function in originals.items():
                setattr(module, name, function)


class KeptSlots:
    """Average k over a run: GEMM slots kept per token, from every eager ``moepass.route`` call."""

    def __init__(self):
        self.kept = self.tokens = 0

    def __call__(self, config, logits, x):
        from moepass.runtime.ops import routes_not_captured

        with torch.no_grad(), routes_not_captured():
            ids, weights = torch.ops.moepass.route(logits, x, [], config.to_json())
        self.kept += int(((ids < config.router.num_experts) & (weights > 0)).sum())
        self.tokens += ids.shape[0]

    @property
    def average_k(self) -> float:
        return self.kept / max(self.tokens, 1)


# --- the ranks ------------------------------------------------------------------------------------------------


def _compiled(model, tag: str, **options):
    """``torch.compile`` of ``model`` behind a forward of its own code object (see moe_block_cpu.compiled)."""
    namespace: dict = {}
    source = "def forward(self, input_ids, **kwargs):\n    return self.model(input_ids, **kwargs).logits\n"
    exec(compile(source, f"<variant {tag}>", "exec"), namespace)
    wrapper = type(f"Variant_{tag.replace(' ', '_')}", (torch.nn.Module,), {"forward": namespace["forward"]})()
    wrapper.model = model
    return torch.compile(wrapper, backend="adaptive_moe", options=options)


def _eager(model):
    def run(input_ids, **kwargs):
        return model(input_ids, **kwargs).logits

    return run


def _tokens(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _shape(tokens: int) -> tuple[int, int]:
    """(sequences, length) of a batch of ``tokens`` tokens: sequences of at most 256 (attention stays small)."""
    length = min(tokens, 256)
    return max(tokens // length, 1), length


def _rank(rank: int, path: str, settings: dict, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(settings["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    try:
        result = _measure(rank, path, settings)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def _measure(rank: int, path: str, settings: dict) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import moepass
    from moepass.runtime.expert_parallel import count_traffic
    from moepass.runtime.ops import capture_routes

    def load(implementation: str | None):
        if implementation is None:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        config = DistributedConfig(tp_size=WORLD, tp_plan={}, ep_size=WORLD, ep_implementation=implementation)
        return AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.float32).eval()

    one = load(None)  # also the mesh option's model: every rank holds all experts and runs its share
    ep = {name: load(name) for name in ("all_to_all", "all_reduce", "moepass")}
    config = one.config
    layers, top_k, hidden, vocab = config.num_hidden_layers, config.num_experts_per_tok, config.hidden_size, config.vocab_size
    inner = {"inner": settings["inner"]}
    mesh = {"expert_parallel": {"mesh": init_device_mesh("cpu", (WORLD,))}}
    calibration = [_tokens(*_shape(settings["bytes_tokens"]), vocab, seed=99)]
    adaptive = moepass.calibrate(one, calibration, "top_p", target_avg_k=ADAPTIVE_FRACTION * top_k, show_progress=False)
    result: dict = {"adaptive": adaptive.describe()}

    # 1. bytes per token per layer against the average k (the shared batch: each rank handles half of it)
    batch = _tokens(*_shape(WORLD * settings["bytes_tokens"]), vocab, seed=0)
    per_rank_tokens = batch.numel() // WORLD
    variants = [
        ("transformers all_to_all", "all_to_all", None),
        ("transformers all_reduce", "all_reduce", None),
        ("transformers all_to_all + moepass top-p router", "all_to_all", {"policy": adaptive}),
        ("moepass static", "moepass", {}),
    ]
    variants += [(f"moepass top-p p={p}", "moepass", {"policy": "top_p", "p": p}) for p in settings["top_p"]]
    variants += [(f"moepass threshold T={t}", "moepass", {"policy": "threshold", "T": t}) for t in settings["threshold"]]
    rows = []
    for name, implementation, options in variants:  # bytes do not depend on the inner compiler: eager, quick
        torch._dynamo.reset()
        model = ep[implementation]
        run = _eager(model) if options is None else _compiled(model, name, inner="eager", **options)
        counter, kept = CollectiveBytes(), KeptSlots()
        with torch.no_grad():
            run(batch)  # compile and warm up outside the count
            with counter.counting(), count_traffic() as traffic, capture_routes(kept):
                run(batch)
        loads = [None] * WORLD
        dist.all_gather_object(loads, counter.rows_run)
        per_call = [max(calls) for calls in zip(*loads)], [statistics.mean(calls) for calls in zip(*loads)]
        own = traffic.dispatch_bytes + traffic.combine_bytes + traffic.counts_bytes
        rows.append({
            "variant": name, "average_k": kept.average_k if kept.tokens else float(top_k),
            **{kind: value / (per_rank_tokens * layers) for kind, value in counter.bytes.items()},
            "rows_max": statistics.mean(per_call[0]) if per_call[0] else None,
            "rows_mean": statistics.mean(per_call[1]) if per_call[1] else None,
            "moepass_counters_agree": own == counter.bytes["dispatch"] + counter.bytes["combine"] + counter.bytes["counts"]
            if implementation == "moepass" else None,
        })
    result["bytes"] = rows
    result["bytes_setting"] = {"tokens_per_rank": per_rank_tokens, "layers": layers, "hidden": hidden}

    # 2. time per step: each variant compiled once (a second shape recompiles it dynamic, then it is reused)
    torch._dynamo.reset()
    variants = {
        "one process: transformers eager": (_eager(one), False),
        "one process: moepass static": (_compiled(one, "one static", **inner), False),
        "one process: moepass adaptive": (_compiled(one, "one adaptive", **inner, policy=adaptive), False),
        "EP=2 shared batch: transformers all_to_all": (_eager(ep["all_to_all"]), True),
        "EP=2 shared batch: transformers all_reduce": (_eager(ep["all_reduce"]), True),
        "EP=2 shared batch: moepass static": (_compiled(ep["moepass"], "ep static", **inner), True),
        "EP=2 shared batch: moepass adaptive": (_compiled(ep["moepass"], "ep adaptive", **inner, policy=adaptive), True),
        "EP=2 mesh option: moepass static": (_compiled(one, "mesh static", **inner, **mesh), False),
        "EP=2 mesh option: moepass adaptive": (_compiled(one, "mesh adaptive", **inner, **mesh, policy=adaptive), False),
    }
    timing = []
    for tokens in settings["tokens"] + ["decode"]:
        if tokens == "decode":
            label, sequences, prompt = "decode (4 sequences, +1 token after 64)", 4, 64
            own_batch, shared_batch = _tokens(sequences, prompt, vocab, 10 + rank), _tokens(WORLD * sequences, prompt, vocab, 10)
        else:
            label = str(tokens)
            own_batch = _tokens(*_shape(tokens), vocab, seed=10 + rank)
            shared_batch = _tokens(*_shape(WORLD * tokens), vocab, seed=10)
        candidates = {name: (run, shared_batch if shared else own_batch) for name, (run, shared) in variants.items()}
        steps = {}
        for name, (run, inputs) in candidates.items():
            if tokens == "decode":
                steps[name] = _decode_step(run, inputs)
            else:
                steps[name] = (lambda run, inputs: lambda: run(inputs))(run, inputs)
                with torch.no_grad():
                    run(inputs)  # a new shape recompiles (once, then dynamic): not part of the timing
        with torch.no_grad():
            times = interleaved_medians(steps, rounds=settings["rounds"], warmup=1)
        timing.append({"tokens_per_rank": label, "ms": {name: seconds * 1e3 for name, seconds in times.items()}})
    result["timing"] = timing
    return result


def _decode_step(run, prompt: torch.Tensor):
    """One decode step after a prefill of ``prompt``: the cache is cropped back after each step."""
    from transformers import DynamicCache

    model_run = run
    cache = DynamicCache()
    with torch.no_grad():
        model_run(prompt, past_key_values=cache, use_cache=True)
    next_token = prompt[:, -1:]

    def step():
        model_run(next_token, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # back to the prompt (transformers 5.25: a negative count removes that many tokens)

    with torch.no_grad():
        for _ in range(3):  # a compiled forward recompiles twice (the decode shape, then dynamic) before it settles
            step()
    return step


# --- the report ------------------------------------------------------------------------------------------------


def _report(result: dict, settings: dict, paper: str) -> str:
    setting = result["bytes_setting"]
    bytes_rows, static = [], next(r for r in result["bytes"] if r["variant"] == "moepass static")
    reference = next(r for r in result["bytes"] if r["variant"] == "transformers all_to_all")
    static_sent = static["dispatch"] + static["combine"]
    top_k = settings["config"]["num_experts_per_tok"]
    gather = (WORLD - 1) * setting["hidden"] * 4  # each rank's output rows to the others (float32)
    for row in result["bytes"]:
        exchanged = row["dispatch"] + row["combine"] + row["counts"] + row["all_reduce"]
        proportional = ""
        if row["variant"].startswith("moepass") and row["average_k"]:
            proportional = f"{((row['dispatch'] + row['combine']) / static_sent) / (row['average_k'] / top_k):.3f}"
        bytes_rows.append([
            row["variant"], f"{row['average_k']:.2f}", f"{row['dispatch']:.0f}", f"{row['combine']:.0f}",
            f"{row['counts']:.1f}", f"{row['all_reduce']:.0f}", f"{exchanged:.0f}",
            f"{exchanged / (reference['dispatch'] + reference['combine'] + reference['counts']):.2f}", proportional,
            "0" if "all_reduce" in row["variant"] else f"{gather}",
            "—" if row["rows_max"] is None else f"{row['rows_max']:.0f} / {row['rows_mean']:.0f}",
            "" if row["moepass_counters_agree"] is None else ("yes" if row["moepass_counters_agree"] else "NO"),
        ])
    time_rows = []
    for entry in result["timing"]:
        ms = entry["ms"]
        base = ms["one process: moepass static"]
        a2a = ms["EP=2 shared batch: transformers all_to_all"]
        for name, value in ms.items():
            vs_a2a = f"{a2a / value:.2f}×" if name.startswith("EP=2 shared") else ""
            time_rows.append([entry["tokens_per_rank"], name, f"{value:.1f}", f"{base / value:.2f}×", vs_a2a])
    config = settings["config"]
    return (
        "## Expert parallelism on CPU (`benchmarks/expert_parallel.py`)\n\n"
        f"{today()} — {machine_description()}; 2 ranks (gloo on 127.0.0.1), {settings['threads']} thread(s) each.\n"
        f"Mixtral-shaped model: hidden {config['hidden_size']}, intermediate {config['intermediate_size']}, "
        f"{config['num_local_experts']} experts, top-{config['num_experts_per_tok']}, {config['num_hidden_layers']} "
        "layers, random weights, float32; transformers' `DistributedConfig(tp_size=2, tp_plan={}, ep_size=2)` "
        f"(the ranks share a batch); moepass compiled with inner `{settings['inner']}` for the timings, `eager` for "
        "the bytes.\n\n"
        f"**Bytes per token per MoE layer** each rank sends ({setting['tokens_per_rank']} tokens per rank; "
        "columns counted at the collectives; `× all_to_all` is the exchange against transformers' `all_to_all`; "
        "`∝ k` is (bytes ÷ static bytes) ÷ (k̄ ÷ k), 1.000 when the bytes fall with the average k; gather is the "
        "shared batch's output all-gather ((R−1)·H·4 per token, from its formula: DTensor runs transformers'), the same "
        "for every implementation but `all_reduce`; rows run is "
        "what each rank's experts ran per layer call, max / mean over the ranks):\n\n"
        + markdown_table(["variant", "k̄", "dispatch", "combine", "counts", "all-reduce", "exchanged", "× all_to_all",
                          "∝ k", "gather", "rows run max / mean", "moepass counters agree"], bytes_rows)
        + f"\n\n**Time per step** (ms, interleaved medians of {settings['rounds']} rounds; adaptive = "
        f"{result['adaptive']}; the shared batch holds 2 × the tokens per rank and runs the dense layers on all of "
        "them on both ranks, the mesh option a batch per rank):\n\n"
        + markdown_table(["tokens per rank", "variant", "ms / step", "× one-process moepass static",
                          "× transformers all_to_all"], time_rows)
        + "\n\n" + paper + "\n"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short sweep, 2 rounds, inner eager")
    parser.add_argument("--paper", action="store_true", help="the on-paper model only")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 2048], help="tokens per rank to time")
    parser.add_argument("--bytes-tokens", type=int, default=2048, help="tokens per rank of the bytes sweep")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    paper = paper_model()
    if args.paper:
        print(paper)
        return
    settings = {
        "config": QUICK if args.quick else FULL, "tokens": [16, 64] if args.quick else args.tokens,
        "bytes_tokens": 128 if args.quick else args.bytes_tokens, "rounds": 2 if args.quick else args.rounds,
        "inner": "eager" if args.quick else args.inner, "threads": args.threads,
        # random router weights spread the probabilities: these points span k̄ ≈ 1–2 of 2 (0.226 gives 0.65 k)
        "top_p": [0.1, 0.3] if args.quick else [0.1, 0.15, 0.2, 0.25, 0.3, 0.4],
        "threshold": [0.02] if args.quick else [0.01, 0.02, 0.05, 0.1, 0.2],
    }
    print(f"machine: {machine_description()}")
    from transformers import MixtralConfig, MixtralForCausalLM

    with tempfile.TemporaryDirectory(prefix="moepass-ep-bench-") as folder:
        torch.manual_seed(0)
        MixtralForCausalLM(MixtralConfig(**settings["config"])).save_pretrained(folder)
        out = str(Path(folder) / "result.json")
        mp.start_processes(_rank, args=(folder, settings, out, _free_port()), nprocs=WORLD, start_method="spawn")
        result = json.loads(Path(out).read_text())
    body = _report(result, settings, paper)
    print(body)
    if not (args.no_write or args.quick):
        write_section("expert_parallel", body)


if __name__ == "__main__":
    main()
