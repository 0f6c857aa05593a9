"""What the expert-parallel tests run on each rank (spawned processes, gloo on 127.0.0.1).

:func:`run_ranks` starts ``world`` processes, each of which initialises a gloo
process group with a short timeout (a collective that waits on a rank that is
not coming fails instead of hanging CI), runs one worker of this module and
writes what it measured; the tests assert on the measurements.  Several
checks share one group of processes: starting them (and importing torch and
transformers) is what costs.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: A collective that waits longer than this on another rank raises (gloo's process-group timeout).
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: str, world: int, timeout: float = 300, **kwargs) -> list[dict]:
    """Run ``worker(rank, world, **kwargs)`` in ``world`` spawned processes; their results, by rank.

    A rank that raises fails the call with its traceback; ranks still running
    after ``timeout`` seconds are killed and the call raises TimeoutError.
    """
    with tempfile.TemporaryDirectory(prefix="moepass-ep-") as out:
        context = mp.start_processes(
            _entry, args=(worker, world, free_port(), out, kwargs), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{worker} on {world} ranks did not finish in {timeout:.0f} s")
        return [json.loads((Path(out) / f"{rank}.json").read_text()) for rank in range(world)]


def _entry(rank: int, worker: str, world: int, port: int, out: str, kwargs: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        result = globals()[worker](rank, world, **kwargs)
    finally:
        dist.destroy_process_group()
    (Path(out) / f"{rank}.json").write_text(json.dumps(result))


# --- helpers the workers share ------------------------------------------------------------------


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max |e| in float64 (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def error_of(call) -> str:
    """The message of what ``call()`` raised ('' if nothing)."""
    try:
        call()
    except Exception as error:  # the tests assert on the message
        return f"{type(error).__name__}: {error}"
    return ""


class RemoteSlots:
    """Counts the kept slots on other ranks' experts from every eager ``moepass.route`` call.

    Recomputes each call's routing from the logits the route op saw (Mixtral's
    routers carry no route tensors) and counts, over this rank's tokens (its
    slice of a batch its group shares), the slots with a GEMM expert and a
    weight above 0 whose expert lives on another rank.
    """

    def __init__(self, rank: int, world: int, shared_batch: bool = False):
        self.rank, self.world, self.shared_batch = rank, world, shared_batch
        self.remote = self.kept = self.slots = 0

    def __call__(self, config, logits, x) -> None:
        from moepass.runtime.ops import routes_not_captured

        with torch.no_grad(), routes_not_captured():
            ids, weights = torch.ops.moepass.route(logits, x, [], config.to_json())
        if self.shared_batch:
            chunk = -(-ids.shape[0] // self.world)
            mine = slice(self.rank * chunk, (self.rank + 1) * chunk)
            ids, weights = ids[mine], weights[mine]
        experts = config.router.num_experts
        kept = (ids >= 0) & (ids < experts) & (weights > 0)
        self.slots += ids.numel()
        self.kept += int(kept.sum())
        self.remote += int((kept & (ids // (experts // self.world) != self.rank)).sum())


def compiled(model, **options):
    return torch.compile(model, backend="adaptive_moe", options={"inner": "eager", **options})


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def gradient_errors(model, reference, reduce: str | None) -> dict[str, float]:
    """Per parameter: relative error of ``model``'s gradient against ``reference``'s.

    ``reduce`` says how the ranks' gradients combine: None (the ranks share one
    batch: every rank's gradient is the whole one), "sum" (each rank its own
    batch; the objective is the sum of the ranks' losses: the reference's
    gradients are summed over ranks, and so are ``model``'s plain ones — a
    rank's experts gradient under the mesh option has its own experts' rows
    only — while a ``Shard(0)`` DTensor's local experts already sum every
    rank's tokens) or "mean" (FSDP averages over the ranks' batches).
    """
    from torch.distributed.tensor import DTensor

    errors = {}
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is None:
            continue
        expected = q.grad.clone()
        if isinstance(p.grad, DTensor):
            grad = p.grad.full_tensor()
        else:
            grad = p.grad.clone()
            if reduce == "sum":
                dist.all_reduce(grad)
        if reduce is not None:
            dist.all_reduce(expected)
            if reduce == "mean":
                expected /= dist.get_world_size()
        errors[name] = rel(grad, expected)
    return errors


def tiny_mixtral(path: str, experts: int = 4) -> str:
    """Save a tiny random Mixtral (2 layers, ``experts`` experts, top-2) to ``path``; returns it."""
    from moepass.zoo import tiny_model

    torch.manual_seed(0)
    tiny_model("mixtral", num_local_experts=experts).save_pretrained(path)
    return path


class CapturedGraph:
    """A model's dynamo graph captured once; the backend's stages then run on copies of it with any options.

    Tracing a model is most of a compile (3.5 s of the bundled model's 4 s on
    the CI machine); the stages take 0.1–0.3 s.  :meth:`run` does with the
    graph what ``torch.compile(model, backend="adaptive_moe", options=...)``
    does (the stages, then the ``eager`` inner compiler), minus the tracing.
    """

    def __init__(self, model, *args, **kwargs):
        import torch.fx as fx

        self.graphs = []

        def backend(gm, example_inputs):
            snapshot = fx.Graph()  # now, while placeholders still carry their sources (module paths)
            snapshot.output(snapshot.graph_copy(gm.graph, {}))
            self.graphs.append((gm, snapshot, list(example_inputs)))
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            output = torch.compile(model, backend=backend)(*args, **kwargs)
        #: What the model computed (the graph as dynamo captured it, without the backend's stages).
        self.eager = output if isinstance(output, torch.Tensor) else output.logits
        self.shape = self.eager.shape
        if len(self.graphs) != 1:
            raise AssertionError(f"expected one graph, dynamo made {len(self.graphs)}")

    def run(self, substitute: dict | None = None, **options) -> tuple[torch.Tensor, list]:
        """(the model's output — its logits —, the blocks' reports) with the backend's stages run under ``options``.

        ``substitute`` maps example inputs to other tensors of the same shape (other tokens).
        """
        import torch.fx as fx

        from moepass.compiler.backend import optimize_graph
        from moepass.compiler.options import BackendOptions

        gm, snapshot, inputs = self.graphs[0]
        graph = fx.Graph()
        graph.output(graph.graph_copy(snapshot, {}))
        with torch.no_grad():
            parsed = BackendOptions.parse({"inner": "eager", **options})
            rewritten, blocks = optimize_graph(fx.GraphModule(gm, graph), inputs, parsed)
            swap = {id(k): v for k, v in (substitute or {}).items()}
            outputs = rewritten(*[swap.get(id(value), value) for value in inputs])
        (logits,) = [o for o in outputs if isinstance(o, torch.Tensor) and o.shape == self.shape]
        return logits, blocks

    def gradients(self, **options) -> list[torch.Tensor]:
        """The parameters' gradients of mean(logits²) with the stages run under ``options`` in grad mode (the
        split form one process runs, the fused expert-parallel op where the experts are split)."""
        import torch.fx as fx

        from moepass.compiler.backend import optimize_graph
        from moepass.compiler.options import BackendOptions

        gm, snapshot, inputs = self.graphs[0]
        parameters = [value for value in inputs if isinstance(value, torch.nn.Parameter)]
        for parameter in parameters:
            parameter.grad = None
        graph = fx.Graph()
        graph.output(graph.graph_copy(snapshot, {}))
        with torch.enable_grad():
            parsed = BackendOptions.parse({"inner": "eager", **options})
            rewritten, _ = optimize_graph(fx.GraphModule(gm, graph), inputs, parsed)
            (logits,) = [o for o in rewritten(*inputs) if isinstance(o, torch.Tensor) and o.shape == self.shape]
            logits.square().mean().backward()
        return [parameter.grad.clone() for parameter in parameters]


# --- workers: each returns what the tests assert on ----------------------------------------------


def two_ranks(rank: int, world: int, path: str) -> dict:
    """Every 2-rank check, in one group of processes (starting them is what costs)."""
    import moepass  # noqa: F401  (registers ep_implementation="moepass")

    return {
        "shared": _transformers_shared_batch(rank, world, path),
        "fsdp": _transformers_fsdp(rank, world, path),
        "native": _torch_native(rank, world, path),
        "op": _op_cases(rank, world),
    }


def four_ranks(rank: int, world: int) -> dict:
    """Correctness on 4 ranks (a torch-native block, so no transformers to import): the mesh option and Shard(0)
    weights, static and adaptive, against one process; E not a multiple of 4 fails on every rank."""
    from torch.distributed.device_mesh import init_device_mesh

    from moepass.runtime.expert_parallel import count_traffic

    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(3 + 4 * rank, 16, generator=torch.Generator().manual_seed(rank))  # uneven tokens per rank
    plain = CapturedGraph(StackedMoE(experts=8), x)
    sharded = CapturedGraph(_shard_experts(StackedMoE(experts=8), mesh), x)
    with torch.no_grad():
        result: dict = {"eager_error": rel(sharded.eager, plain.eager)}
    for name, options in (("static", {}), ("top_p", {"policy": "top_p", "p": 0.5})):
        expected, _ = plain.run(**options)
        with count_traffic() as traffic:
            out, _ = plain.run(expert_parallel={"mesh": mesh}, **options)
        dtensor, _ = sharded.run(**options)
        result[name] = {
            "error": rel(out, expected), "dtensor_error": rel(dtensor, expected), "eager_error": rel(out, plain.eager),
            "rows_sent": traffic.rows_sent,
        }
    result["not_divisible"] = error_of(lambda: CapturedGraph(StackedMoE(experts=6), x).run(expert_parallel={"mesh": mesh}))
    result["op"] = _op_cases(rank, world)
    return result


def _transformers_shared_batch(rank: int, world: int, path: str) -> dict:
    """transformers' EP alone (``ep_size == tp_size``, ``tp_plan={}``: the group shares one batch)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import moepass
    from moepass.runtime.expert_parallel import count_traffic
    from moepass.runtime.ops import capture_routes

    config = DistributedConfig(tp_size=world, tp_plan={}, ep_size=world, ep_implementation="moepass")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))  # the batch the group shares
    other = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    result: dict = {}
    with torch.no_grad():
        expected = reference(tokens).logits
        result["eager_error"] = rel(model(tokens).logits, expected)
    one_process = CapturedGraph(reference, tokens)
    # an adaptive policy, compiled as a user does: one graph, no recompile as the routing changes
    torch._dynamo.reset()
    fast = compiled(model, policy="top_p", p=0.5)
    remote, remote_other = RemoteSlots(rank, world, shared_batch=True), RemoteSlots(rank, world, shared_batch=True)
    with torch.no_grad():
        before = graphs_compiled()
        with count_traffic() as traffic, capture_routes(remote):
            out = fast(tokens).logits
        graphs = graphs_compiled() - before
        with capture_routes(remote_other):
            out_other = fast(other).logits  # other tokens, other routing, same shapes
        recompiles = graphs_compiled() - before - graphs
    result["top_p"] = {
        "error": rel(out, one_process.run(policy="top_p", p=0.5)[0]),
        "error_other": rel(out_other, one_process.run(substitute={tokens: other}, policy="top_p", p=0.5)[0]),
        "eager_error": rel(out, expected), "graphs": graphs, "recompiles": recompiles, "rows_sent": traffic.rows_sent,
        "remote_kept": remote.remote, "kept": remote.kept, "slots": remote.slots, "rows_local": traffic.rows_local,
        "routing_differs": (remote_other.kept, remote_other.remote) != (remote.kept, remote.remote),
        "report": str(moepass.report(fast)),
    }
    # the static policy through generate(): a prefill, then decode steps of one token (one rank gets no rows)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="adaptive_moe", options={"inner": "eager"})
    arguments = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                     return_dict_in_generate=True)
    remote = RemoteSlots(rank, world, shared_batch=True)
    with count_traffic() as traffic, capture_routes(remote):
        generated = model.generate(tokens[:1], **arguments)
    reference_generated = reference.generate(tokens[:1], **arguments)
    result["static"] = {
        "scores_error": max(rel(a, b) for a, b in zip(generated.scores, reference_generated.scores, strict=True)),
        "rows_sent": traffic.rows_sent, "remote_kept": remote.remote, "kept": remote.kept, "slots": remote.slots,
        "rows_local": traffic.rows_local,
    }
    result["generated"] = generated.sequences.tolist()
    result["generated_reference"] = reference_generated.sequences.tolist()
    del model.forward
    # training: gradients through the exchange's backward (its tracing by AOT: the DTensor model's test)
    torch._dynamo.reset()
    model.train(), reference.train()
    compiled(model)(tokens, labels=tokens).loss.backward()
    reference(tokens, labels=tokens).loss.backward()
    result["gradient_errors"] = gradient_errors(model, reference, reduce=None)
    # ranks that compiled different policies: one clear error on every rank, at the first exchange
    torch._dynamo.reset()
    model.eval()
    mismatched = compiled(model, policy="top_p", p=0.5 + 0.1 * rank)
    with torch.no_grad():
        result["policy_mismatch"] = error_of(lambda: mismatched(tokens))
    return result


def _transformers_fsdp(rank: int, world: int, path: str) -> dict:
    """transformers' EP with FSDP (``fsdp_size == ep_size``): each rank its own batch, of its own length."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import moepass
    from moepass.runtime.expert_parallel import count_traffic
    from moepass.runtime.ops import capture_routes

    config = DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation="moepass")
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 100, (1, 5 + 6 * rank), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        result: dict = {"eager_error": rel(model(tokens).logits, reference(tokens).logits)}
    torch._dynamo.reset()
    fast = compiled(model, policy="top_p", p=0.5)
    remote = RemoteSlots(rank, world)
    with torch.no_grad():
        with count_traffic() as traffic, capture_routes(remote):
            out = fast(tokens).logits
        expected, _ = CapturedGraph(reference, tokens).run(policy="top_p", p=0.5)
    result["top_p"] = {
        "error": rel(out, expected), "rows_sent": traffic.rows_sent, "remote_kept": remote.remote,
        "kept": remote.kept, "rows_local": traffic.rows_local, "report": str(moepass.report(fast)),
        "slots": tokens.numel() * 2 * model.config.num_experts_per_tok,
    }
    # training, EP + FSDP as transformers runs it (eager: the op's own backward exchanges); FSDP averages the
    # gradients over the ranks' batches
    model.train(), reference.train()
    model(tokens, labels=tokens).loss.backward()
    reference(tokens, labels=tokens).loss.backward()
    result["gradient_errors"] = gradient_errors(model, reference, reduce="mean")
    return result


class StackedMoE(torch.nn.Module):
    """A torch-native MoE block with stacked expert weights, gathered whole when they are DTensors."""

    def __init__(self, experts: int = 4, hidden: int = 16, inter: int = 24, top_k: int = 2):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.router = torch.nn.Parameter(torch.randn(experts, hidden, generator=generator) * 0.5)
        self.w1 = torch.nn.Parameter(torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.2)
        self.w2 = torch.nn.Parameter(torch.randn(experts, hidden, inter, generator=generator) * 0.2)
        self.top_k = top_k

    def forward(self, x):
        from torch.distributed.tensor import DTensor

        w1 = self.w1.full_tensor() if isinstance(self.w1, DTensor) else self.w1
        w2 = self.w2.full_tensor() if isinstance(self.w2, DTensor) else self.w2
        probs = torch.softmax(torch.nn.functional.linear(x, self.router), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        rows = x.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, 1, x.shape[-1])
        gate, up = torch.bmm(rows, w1[ids.reshape(-1)].transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(torch.nn.functional.silu(gate) * up, w2[ids.reshape(-1)].transpose(1, 2))
        return (y.reshape(x.shape[0], self.top_k, -1) * weights.unsqueeze(-1)).sum(dim=1)


def _shard_experts(module: StackedMoE, mesh, mesh_dim: int = 0) -> StackedMoE:
    """The module with its expert weights as DTensors, ``Shard(0)`` on ``mesh_dim`` (``Replicate`` elsewhere)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placements = [Replicate()] * mesh.ndim
    placements[mesh_dim] = Shard(0)
    for name in ("w1", "w2"):
        setattr(module, name, torch.nn.Parameter(distribute_tensor(getattr(module, name).data, mesh, placements)))
    return module


def _torch_native(rank: int, world: int, path: str) -> dict:
    """Models without transformers' distributed runtime: the mesh option, Shard(0) DTensor weights."""
    from torch.distributed.device_mesh import init_device_mesh

    from moepass import bundled
    from moepass.compiler.dataflow import op_name
    from moepass.runtime.expert_parallel import count_traffic

    mesh = init_device_mesh("cpu", (world,))
    result: dict = {}
    # every policy on the bundled model: plain weights on every rank, split by the mesh option
    tokens = bundled.encode("def expert_parallel(rows):\n    return rows\n" * 2)[: 10 + 7 * rank].unsqueeze(0)
    policies = {
        "static": {}, "top_p": {"policy": "top_p", "p": 0.5}, "threshold": {"policy": "threshold", "T": 0.1},
        "sensitivity": {"policy": bundled.load_policy("sensitivity")},
        "skip_ratio": {"policy": bundled.load_policy("skip_ratio")},
        "ada_k": {"policy": bundled.load_policy("ada_k")},
        "null_experts": {"policy": bundled.load_policy("null_experts")},
    }
    graph = CapturedGraph(bundled.load_model(), tokens)
    for name, options in policies.items():
        if name == "null_experts":  # its router rows were fine-tuned with the policy
            graph = CapturedGraph(bundled.load_model(overlay=bundled.overlay_path(name)), tokens)
        with count_traffic() as traffic:
            out, blocks = graph.run(expert_parallel={"mesh": mesh}, **options)
        expected, _ = graph.run(**options)
        result[f"bundled_{name}"] = {
            "error": rel(out, expected), "rows_sent": traffic.rows_sent, "rows_local": traffic.rows_local,
            "expert_parallel_blocks": sum(any("expert parallel over" in n for n in b.notes) for b in blocks),
        }
    # training with an adaptive policy (the tiny Mixtral: float32 round-off grows through the bundled model's four
    # trained layers to ~8e-6 of the largest gradients): each rank's batch, the sum of the ranks' losses
    from transformers import AutoModelForCausalLM

    own = torch.randint(0, 100, (1, 9 + 6 * rank), generator=torch.Generator().manual_seed(rank))
    graph = CapturedGraph(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), own)
    one_process = graph.gradients(policy="top_p", p=0.5)
    split = graph.gradients(expert_parallel={"mesh": mesh}, policy="top_p", p=0.5)
    for grad in one_process + split:  # a rank's expert gradients hold its own experts' rows (every rank's tokens)
        dist.all_reduce(grad)
    result["training_top_p"] = {
        "gradient_error": max(rel(a, b) for a, b in zip(split, one_process, strict=True)), "gradients": len(split),
    }
    # Shard(0) DTensor weights: the model gathers them whole; compiled, tokens move instead of weights
    x = torch.randn(7 + 4 * rank, 16, generator=torch.Generator().manual_seed(rank))
    plain, sharded = StackedMoE(), _shard_experts(StackedMoE(), mesh)
    with torch.no_grad():
        dtensor = {"eager_error": rel(sharded(x), plain(x))}
    graph = CapturedGraph(sharded, x)
    out, blocks = graph.run(policy="top_p", p=0.7)
    expected, _ = CapturedGraph(plain, x).run(policy="top_p", p=0.7)
    dtensor["error"] = rel(out, expected)
    torch._dynamo.reset()
    recorded = []

    def recording(gm, example_inputs):
        from moepass.compiler.backend import optimize_graph
        from moepass.compiler.options import BackendOptions

        gm, _ = optimize_graph(gm, example_inputs, BackendOptions.parse({"inner": "eager"}))
        recorded.extend(op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    with torch.no_grad():
        dtensor["static_error"] = rel(torch.compile(sharded, backend=recording)(x), plain(x))
    dtensor.update(gathers=recorded.count("full_tensor"), to_local=recorded.count("to_local"),
                   experts_ops=recorded.count("moepass::experts"))
    torch._dynamo.reset()  # training: the static policy's gradients equal the plain model's
    compiled(sharded, inner="aot_eager")(x).square().sum().backward()
    plain(x).square().sum().backward()
    dtensor["gradient_errors"] = gradient_errors(sharded, plain, reduce="sum")
    result["dtensor"] = dtensor
    # a mesh the experts do not live on, and E not a multiple of the EP size: one clear error on every rank
    two_d = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ep", "other"))
    wrong = _shard_experts(StackedMoE(), two_d, 0)
    result["mesh_mismatch"] = error_of(lambda: CapturedGraph(wrong, x).run(expert_parallel={"mesh": two_d, "mesh_dim": "other"}))
    result["not_divisible"] = error_of(lambda: CapturedGraph(StackedMoE(experts=world + 1), x).run(expert_parallel={"mesh": mesh}))
    # zero-computation experts: identity experts beside the GEMM ones (LongCat-Flash's kind)
    zero = ZeroComputeMoE()
    graph = CapturedGraph(zero, x)
    with count_traffic() as traffic:
        out, blocks = graph.run(expert_parallel={"mesh": mesh}, policy="top_p", p=0.6)
    expected, _ = graph.run(policy="top_p", p=0.6)
    result["zero_compute"] = {
        "error": rel(out, expected), "rows_sent": traffic.rows_sent, "calls": traffic.calls,
        "expert_parallel_blocks": sum(any("expert parallel over" in n for n in b.notes) for b in blocks),
    }
    return result


class ZeroComputeMoE(StackedMoE):
    """GEMM experts and identity experts (ids E, E+1 add w·x), written with moepass's ops (as make_traceable does)."""

    def __init__(self, experts: int = 4, identity: int = 2, hidden: int = 16, inter: int = 24):
        super().__init__(experts=experts, hidden=hidden, inter=inter, top_k=3)
        generator = torch.Generator().manual_seed(1)
        self.router = torch.nn.Parameter(torch.randn(experts + identity, hidden, generator=generator) * 0.5)
        from moepass.compiler.spec import ExpertsSpec
        from moepass.runtime.ops import ExpertsConfig

        self.kinds = ",".join(["identity"] * identity)
        spec = ExpertsSpec(dispatch="moepass_op", num_experts=experts, hidden_size=hidden, intermediate_size=inter,
                           zero_compute=("identity",) * identity)
        self.config = ExpertsConfig(spec=spec).to_json()
        self.experts = experts

    def forward(self, x):
        probs = torch.softmax(torch.nn.functional.linear(x, self.router), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        out = torch.ops.moepass.experts(x, ids, weights, self.w1, self.w2, None, None, self.config)
        return out + torch.ops.moepass.zero_compute_experts(x, ids, weights, self.experts, self.kinds, None)


def _op_cases(rank: int, world: int) -> dict:
    """The experts op alone, forward and backward, against the one-process op, twice: rank 0 with no tokens and
    rank 1 with every slot dropped, then every rank with slots on GEMM experts, an identity expert (id E) and
    dropped ones (id E+1)."""
    from moepass.compiler.spec import ExpertsSpec
    from moepass.runtime.expert_parallel import count_traffic, register_group
    from moepass.runtime.ops import ExpertsConfig

    experts, hidden, inter, depth = 2 * world, 8, 12, 3
    generator = torch.Generator().manual_seed(0)
    w1 = torch.randn(experts, 2 * inter, hidden, generator=generator) * 0.3
    w2 = torch.randn(experts, hidden, inter, generator=generator) * 0.3
    local = slice(rank * 2, rank * 2 + 2)
    spec = ExpertsSpec(dispatch="moepass_op", num_experts=experts, hidden_size=hidden, intermediate_size=inter,
                       zero_compute=("identity",))
    one = ExpertsConfig(spec=spec).to_json()
    split = ExpertsConfig(spec=spec, expert_parallel=register_group(dist.group.WORLD).key).to_json()
    mine = torch.Generator().manual_seed(10 + rank)
    result = {}
    for case in ("edge", "mixed"):
        tokens = 0 if case == "edge" and rank == 0 else 5 + rank
        x = torch.randn(tokens, hidden, generator=mine)
        ids = torch.randint(0, experts + 2, (tokens, depth), generator=mine)
        if case == "edge" and rank == 1:
            ids[:] = experts + 1  # every slot of this rank dropped
        weights = torch.rand(tokens, depth, generator=mine)
        grad_out = torch.randn(tokens, hidden, generator=mine)
        leaves = [t.clone().requires_grad_(True) for t in (x, weights, w1[local], w2[local])]
        with count_traffic() as traffic:
            out = torch.ops.moepass.experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], None, None, split)
            (out * grad_out).sum().backward()
        full = [t.clone().requires_grad_(True) for t in (x, weights, w1, w2)]
        expected = torch.ops.moepass.experts(full[0], ids, full[1], full[2], full[3], None, None, one)
        (expected * grad_out).sum().backward()
        expert_grads = [full[i].grad.clone() for i in (2, 3)]
        for grad in expert_grads:  # each rank's experts see every rank's rows
            dist.all_reduce(grad)
        kept = ids < experts
        result[case] = {
            "tokens": tokens, "error": rel(out, expected), "rows_sent": traffic.rows_sent, "calls": traffic.calls,
            "gradient_error": max(
                rel(leaves[0].grad, full[0].grad), rel(leaves[1].grad, full[1].grad),
                rel(leaves[2].grad, expert_grads[0][local]), rel(leaves[3].grad, expert_grads[1][local]),
            ),
            "remote_kept": int((kept & (ids // 2 != rank)).sum()), "identity_slots": int((ids == experts).sum()),
        }
    return result
