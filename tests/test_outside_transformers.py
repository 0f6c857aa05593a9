"""MoE blocks written outside transformers (research code, remote code), found by what they compute.

Each style of :mod:`moe_styles` is compiled with ``backend="adaptive_moe"`` in
grad mode (no ``torch.no_grad()``): where dynamo captures the block, the graph
is rewritten (static: ≤ 1e-5 relative to eager; adaptive: equal to a per-token
reference written with Python loops); where it cannot (the loop graph-breaks),
the report says so with what broke and the remedy, and
``moepass.make_traceable`` makes the block whole.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import Recorder, rel_err
from moe_styles import (
    ArgmaxMoE,
    DenseEinsumMoE,
    DenseGateMoE,
    GatheredBmmMoE,
    GatheredEinsumMoE,
    PlainExpert,
    RemoteDeepseekV2MoE,
    WhereLoopMoE,
)
from reference_routing import Router, choose_k, route_token

import moepass
from moepass.runtime.report import REASON_CODES

H = 16


def _input(seed: int = 0, tokens: int = 7) -> torch.Tensor:
    return torch.randn(2, tokens, H, generator=torch.Generator().manual_seed(seed))


def _ops(graphs) -> list[str]:
    from moepass.compiler.dataflow import op_name

    return [op_name(n) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]


# --- per-token references: the routing rule in Python floats, the experts one token at a time -------------


def _experts_of(block):
    """expert(e, rows) for a block of any style."""
    if hasattr(block, "expert"):
        return block.expert
    return lambda e, rows: block.experts[e](rows)


def _logits(block, tokens):
    for name in ("router", "gate"):
        module = getattr(block, name, None)
        if isinstance(module, nn.Linear):
            return module(tokens)
    return torch.nn.functional.linear(tokens, block.gate.weight)


def _shared(block, tokens):
    shared = getattr(block, "shared_experts", None)
    return shared(tokens) if shared is not None else torch.zeros_like(tokens)


def per_token_reference(block, x, router: Router, rule: str, params: dict) -> torch.Tensor:
    """Σ_kept w · expert(x_t) (+ shared experts) token by token, routed by :func:`route_token`."""
    with torch.no_grad():
        tokens = x.reshape(-1, H)
        logits = _logits(block, tokens).double().tolist()
        expert = _experts_of(block)
        out = _shared(block, tokens).clone()
        for t, row in enumerate(logits):
            ids, weights, margins = route_token(row, router, rule, params, k_min=1)
            assert min((abs(m) for m in margins), default=1.0) > 1e-6, "a token sits on a decision boundary"
            for e, w in zip(ids, weights):
                if e < router.num_experts:
                    out[t] += w * expert(e, tokens[t:t + 1])[0]
    return out.reshape(x.shape)


def lifted_reference(block, x, rule: str, params: dict) -> torch.Tensor:
    """The same for a router moepass carries as a lifted formula: the rule sees the model's own top-k
    (ranked by weight, probabilities its weights normalised over them) and keeps the model's weights."""
    with torch.no_grad():
        ids, weights, _ = block.gate(x)
        tokens = x.reshape(-1, H)
        expert = _experts_of(block)
        out = _shared(block, tokens).clone()
        for t, (row_ids, row_w) in enumerate(zip(ids.tolist(), weights.tolist())):
            ranked = sorted(zip(row_w, row_ids), reverse=True)
            total = sum(w for w, _ in ranked)
            k, _ = choose_k(rule, params, [w / total for w, _ in ranked], None, None, (), len(ranked))
            for w, e in ranked[:max(1, k)]:
                out[t] += w * expert(e, tokens[t:t + 1])[0]
    return out.reshape(x.shape)


# --- styles dynamo captures: rewritten in the graph -----------------------------------------------------------

#: style → (constructor, dynamo flags it needs, dispatch in the report, its router written out for the reference)
CAPTURED = {
    "where_loop": (WhereLoopMoE, {"capture_dynamic_output_shape_ops": True}, "module_loop",
                   lambda b: Router("softmax_topk", 6, 2, renormalize=True)),
    "gathered_einsum": (GatheredEinsumMoE, {}, "batched_mm", lambda b: Router("topk_softmax", 6, 2)),
    "gathered_bmm": (GatheredBmmMoE, {}, "batched_mm", lambda b: Router("softmax_topk", 6, 2)),
    "argmax": (ArgmaxMoE, {"capture_dynamic_output_shape_ops": True}, "module_loop",
               lambda b: Router("softmax_topk", 6, 1)),
    "dense_gate": (DenseGateMoE, {}, "dense_modules", lambda b: Router("softmax_topk", 6, 2, renormalize=True)),
    "dense_einsum": (DenseEinsumMoE, {}, "dense_bmm", lambda b: Router("softmax_topk", 6, 2)),
}


@pytest.mark.parametrize("style", list(CAPTURED))
def test_captured_style_is_rewritten_exactly_with_gradients(style):
    build, flags, dispatch, _ = CAPTURED[style]
    block, reference = build(), build()
    rec = Recorder(inner="eager")
    x = _input()
    with torch._dynamo.config.patch(**flags):
        out = torch.compile(block, backend=rec, fullgraph=not flags)(x)
    expected = reference(x)
    assert rel_err(out.detach(), expected.detach()) <= 1e-5
    ((block_report,),) = [r for r in rec.reports if r]
    assert block_report.rewritten and block_report.dispatch == dispatch
    ops = _ops(rec.graphs)
    assert ops.count("moepass::route") == 1
    # grad mode: the experts in their differentiable split form; the loop, masks and gathers are gone
    assert "moepass::experts_up" in ops and "moepass::experts_down" in ops
    assert not {"nonzero", "index_add_", "einsum", "bmm", "index_put_", "setitem"} & set(ops)
    if style == "argmax":  # a lifted top-1: the route op reads the model's own pick and its weight
        assert block_report.spec.router.kind == "lifted" and block_report.spec.router.top_k == 1
    assert torch._dynamo.utils.counters["moepass"]["blocks_rewritten"] == 1
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(block.named_parameters(), reference.parameters()):
        assert p.grad is not None and rel_err(p.grad, q.grad) <= 1e-4, name


ADAPTIVE = {"top_p": {"p": 0.5}, "threshold": {"T": 0.15}}


@pytest.mark.parametrize("style,rule", [
    ("where_loop", "top_p"), ("gathered_einsum", "threshold"), ("gathered_bmm", "top_p"), ("argmax", "top_p"),
    ("dense_gate", "threshold"), ("dense_einsum", "top_p"),
])
def test_captured_style_adaptive_policy_equals_per_token_reference(style, rule):
    build, flags, _, router = CAPTURED[style]
    block = build()
    x = _input(1)
    with torch._dynamo.config.patch(**flags):
        compiled = torch.compile(block, backend="adaptive_moe", fullgraph=not flags,
                                 options={"policy": rule, **ADAPTIVE[rule], "inner": "eager"})
        out = compiled(x)
    expected = per_token_reference(block, x, router(block), rule, ADAPTIVE[rule])
    assert rel_err(out.detach(), expected) <= 1e-5
    (entry,) = moepass.report(compiled).blocks
    assert entry.rewritten and entry.policy.startswith(rule)
    if style != "argmax":  # top-1 keeps its one expert (k_min = 1 = native k): the policy equals static there
        assert rel_err(out.detach(), block(x).detach()) > 1e-3


# --- styles dynamo cannot capture: reported, then made traceable ---------------------------------------------


class TwoLayers(nn.Module):
    """A model around two MoE blocks (residual), so paths and per-layer entries can be checked."""

    def __init__(self, make):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(H), "moe": make(seed=i)}) for i in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["moe"](layer["norm"](x))
        return x


@pytest.mark.parametrize("make", [WhereLoopMoE, ArgmaxMoE], ids=["where_loop", "argmax"])
def test_a_loop_dynamo_skips_is_reported_with_what_broke_and_the_remedy(make):
    model = TwoLayers(make)
    x = _input()
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
    assert torch.equal(compiled(x), model(x))
    report = moepass.report(compiled)
    assert [b.path for b in report.blocks] == ["layers.0.moe", "layers.1.moe"]
    for block in report.blocks:
        assert not block.rewritten and block.reason_code == "graph_break" and block.num_experts == 6
        assert "nonzero" in block.reason and f"{make.__name__}.forward" in block.reason
        assert "moepass.make_traceable(model)" in block.reason and "fullgraph=True" in block.reason
    assert "no MoE block found" not in str(report)


def test_no_moe_block_found_only_where_there_is_none():
    """A top-k that selects from more classes than the hidden size (sampling) and a plain MLP: no block."""

    class Sampler(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(H, 4 * H), nn.GELU(), nn.Linear(4 * H, H))
            self.lm_head = nn.Linear(H, 100)

        def forward(self, x):
            logits = self.lm_head(self.mlp(x))
            values, ids = logits.topk(5, dim=-1)
            return ids, values.softmax(-1)

    model = Sampler()
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "policy": "top_p", "p": 0.3})
    ids, weights = compiled(_input())
    expected_ids, _ = model(_input())
    assert torch.equal(ids, expected_ids)
    report = moepass.report(compiled)
    assert report.blocks == [] and "no MoE block found" in str(report)


#: Blocks made traceable: constructor, its router written out for the reference (None: a lifted router).
TRACEABLE = {
    "where_loop": (WhereLoopMoE, lambda: Router("softmax_topk", 6, 2, renormalize=True)),
    "where_loop_plain_experts": (lambda seed=0: WhereLoopMoE(expert=PlainExpert, seed=seed),
                                 lambda: Router("softmax_topk", 6, 2, renormalize=True)),
    "argmax": (ArgmaxMoE, lambda: Router("softmax_topk", 6, 1)),
    "dense_gate": (DenseGateMoE, lambda: Router("softmax_topk", 6, 2, renormalize=True)),
    "remote_deepseek_v2": (RemoteDeepseekV2MoE, lambda: Router("softmax_topk", 8, 2)),
    "remote_deepseek_v2_grouped": (lambda seed=0: RemoteDeepseekV2MoE(top_k=3, n_group=4, topk_group=2, seed=seed),
                                   None),
}


@pytest.mark.parametrize("style", list(TRACEABLE))
def test_make_traceable_rewrites_the_block_whole(style):
    build, _ = TRACEABLE[style]
    reference, block = build(), build()
    assert moepass.make_traceable(block) == [""]
    assert moepass.make_traceable(block) == []  # twice changes nothing more
    rec = Recorder(inner="eager")
    x = _input(2)
    out = torch.compile(block, backend=rec)(x)
    assert rel_err(out.detach(), reference(x).detach()) <= 1e-5
    assert len(rec.graphs) == 1  # no graph break left
    ((entry,),) = rec.reports
    assert entry.rewritten and entry.dispatch == "moepass_op"
    assert entry.spec.router.kind == ("lifted" if style.endswith("grouped") else "softmax_topk")
    assert len(entry.spec.shared_experts) == (1 if "deepseek" in style else 0)
    ops = _ops(rec.graphs)
    assert ops.count("moepass::route") == 1 and "nonzero" not in ops and "argsort" not in ops


@pytest.mark.parametrize("style", list(TRACEABLE))
def test_make_traceable_adaptive_policy_equals_per_token_reference(style):
    build, router = TRACEABLE[style]
    block = build()
    moepass.make_traceable(block)
    x = _input(3)
    compiled = torch.compile(block, backend="adaptive_moe", options={"policy": "top_p", "p": 0.45, "inner": "eager"})
    out = compiled(x).detach()
    if router is None:
        expected = lifted_reference(block, x, "top_p", {"p": 0.45})
    else:
        expected = per_token_reference(block, x, router(), "top_p", {"p": 0.45})
    assert rel_err(out, expected) <= 1e-5
    assert moepass.report(compiled).blocks[0].rewritten


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_remote_deepseek_v2_without_make_traceable_rewrites_the_router_alone_and_never_crashes(training):
    """The loop reads the ids outside the graph (eval: counts them with ``scatter_`` and moves the counts
    to the host; train: boolean masks per expert): the route op hands it the model's own ids, a dropped
    slot at weight 0 — static bit for bit, top_p equal to its per-token reference."""
    block = RemoteDeepseekV2MoE().train(training)
    x = _input(4)
    expected_static = block(x).detach()
    rec = Recorder(inner="eager")
    static = torch.compile(block, backend=rec)(x).detach()
    assert torch.equal(static, expected_static)
    entry = next(b for r in rec.reports for b in r if b.router != "?")
    assert entry.rewritten and entry.dispatch == "eager_loop" and "router only" in entry.notes[0]
    # what broke, where
    assert ("Dynamic shape operator" if training else "Data-dependent branching") in entry.notes[0]
    assert training or "moe_styles.py" in entry.notes[0]
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="adaptive_moe", options={"policy": "top_p", "p": 0.45, "inner": "eager"})
    for tokens in (7, 11):  # two lengths: a new shape recompiles, the router is rewritten again
        x = _input(5, tokens)
        out = compiled(x).detach()
        assert rel_err(out, per_token_reference(block, x, Router("softmax_topk", 8, 2), "top_p", {"p": 0.45})) <= 1e-5
    (entry,) = moepass.report(compiled).blocks
    assert entry.rewritten and any("save no compute" in note for note in entry.notes)


def test_a_router_rewritten_alone_drops_a_slot_as_the_models_expert_at_negative_zero():
    """The ids stay the model's (any consumer sees what it always saw); -0.0 adds exactly nothing and tells
    moepass's expert-parallel exchange the slot needs no row."""
    from moepass.compiler.spec import RouterSpec
    from moepass.runtime.expert_parallel.exchange import kept_slots
    from moepass.runtime.ops import RouteConfig

    logits = torch.tensor([[2.0, 0.0, 1.9, -1.0], [5.0, 0.0, 0.5, -1.0]])  # top_p 0.5: keeps 2, then 1
    weights, ids = torch.softmax(logits, -1).topk(2, dim=-1, sorted=False)
    router = RouterSpec("softmax_topk", num_experts=4, top_k=2, hidden_size=8)
    config = RouteConfig(router, rule="top_p", params={"p": 0.5}, k_min=1, k_max=2,
                         tensor_roles=("model_ids", "model_weights"), empty_slots="model_ids")
    out_ids, out_weights = torch.ops.moepass.route(logits, None, [ids, weights], config.to_json())
    assert torch.equal(out_ids, ids)  # unchanged, in the model's order
    dropped = out_weights == 0
    assert dropped.tolist() == [[False, False], [False, True]] and torch.signbit(out_weights[dropped]).all()
    assert kept_slots(out_ids, out_weights, 4)[1].tolist() == [0, 4]


def test_a_router_whose_weights_feed_more_than_the_experts_is_left_alone_under_an_adaptive_policy():
    """Adaptive weights in model-id form are only right for code that multiplies them in; here the graph
    clamps them before the loop reads them: the block is left as it was, with the reason."""

    class Clamping(RemoteDeepseekV2MoE):
        def forward(self, hidden):
            ids, weight, _ = self.gate(hidden)
            weight = weight.clamp(min=0.05)  # a dropped slot's 0 would become 0.05
            return self.moe_infer(hidden.view(-1, H), ids, weight).view(hidden.shape)

    block = Clamping()
    x = _input(6)
    compiled = torch.compile(block, backend="adaptive_moe", options={"policy": "top_p", "p": 0.45, "inner": "eager"})
    assert torch.equal(compiled(x), block(x))
    (entry,) = moepass.report(compiled).blocks
    assert not entry.rewritten and entry.reason_code == "graph_break" and "top_p" in entry.reason


# --- make_traceable's experts: one copy, views into stacked storage -------------------------------------------


def _storage_bytes(module: nn.Module) -> int:
    storages = {}
    for t in [*module.parameters(), *module.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_make_traceable_keeps_one_copy_of_the_experts_and_their_parameters():
    block = RemoteDeepseekV2MoE()
    names = [n for n, _ in block.named_parameters()]
    params = list(block.parameters())
    state = {k: v.clone() for k, v in block.state_dict().items()}
    before = _storage_bytes(block)
    moepass.make_traceable(block)
    assert _storage_bytes(block) == before  # the experts moved into stacked buffers: no second copy
    assert [n for n, _ in block.named_parameters()] == names and list(block.parameters()) == params
    assert sorted(block.state_dict()) == sorted(state)  # the stacked buffers are not persistent
    w1 = block._moepass_experts_w1
    assert block.experts[3].up_proj.weight.data_ptr() == w1[3, 24:].data_ptr()
    x = _input(7)
    # load_state_dict copies into the views: the moepass form sees the new weights
    other = RemoteDeepseekV2MoE(seed=1)
    block.load_state_dict(other.state_dict())
    assert rel_err(block(x), other(x)) <= 1e-5
    # .to() converts parameters and buffers apart; the views are rebuilt, still one copy
    block.to(torch.float64)
    assert block._moepass_experts_w1.dtype == torch.float64 and _storage_bytes(block) == 2 * before
    assert block.experts[3].up_proj.weight.data_ptr() == block._moepass_experts_w1[3, 24:].data_ptr()
    assert rel_err(block(x.double()), other.double()(x.double())) <= 1e-7
    # load_state_dict(assign=True) puts new parameter objects in: the views are rebuilt around them
    third = RemoteDeepseekV2MoE(seed=2).double()
    block.load_state_dict({k: v.clone() for k, v in third.state_dict().items()}, assign=True)
    assert block.experts[5].down_proj.weight.data_ptr() == block._moepass_experts_w2[5].data_ptr()
    assert rel_err(block(x.double()), third(x.double())) <= 1e-7
    # a deep copy gets views of its own buffers
    twin = copy.deepcopy(block)
    assert twin.experts[3].up_proj.weight.data_ptr() == twin._moepass_experts_w1[3, 24:].data_ptr()
    assert twin._moepass_experts_w1.data_ptr() != block._moepass_experts_w1.data_ptr()


def test_an_optimizer_step_through_the_compiled_block_is_seen_by_the_next_call():
    reference, block = WhereLoopMoE(), WhereLoopMoE()
    moepass.make_traceable(block)
    compiled = torch.compile(block, backend="adaptive_moe", options={"inner": "aot_eager"})
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (block, reference)]
    x = _input(8)
    for step in range(2):
        outputs = [compiled(x), reference(x)]
        assert rel_err(outputs[0].detach(), outputs[1].detach()) <= 1e-5, step
        for out, optimizer in zip(outputs, optimizers):
            optimizer.zero_grad()
            out.square().mean().backward()
            optimizer.step()
    for p, q in zip(block.parameters(), reference.parameters()):
        assert rel_err(p.detach(), q.detach()) <= 1e-5
    assert block.experts[0].gate_proj.weight.data_ptr() == block._moepass_experts_w1[0].data_ptr()


def test_a_block_make_traceable_cannot_reproduce_is_left_as_it_was(caplog):
    """Experts with an activation the adapter does not model (tanh): nothing changes, the reason is logged."""

    class TanhExpert(nn.Module):
        def __init__(self, dim, inter):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, inter), nn.Linear(inter, dim)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    block = WhereLoopMoE(expert=TanhExpert)
    before = {n: p.data_ptr() for n, p in block.named_parameters()}
    with caplog.at_level("WARNING", logger="moepass.compiler.traceable_lists"):
        assert moepass.make_traceable(block) == []
    assert "left <root> (WhereLoopMoE) as it was" in caplog.text
    assert "forward" not in vars(block) and {n: p.data_ptr() for n, p in block.named_parameters()} == before


def test_training_keeps_the_blocks_own_forward_where_the_moepass_form_differs():
    """A block whose training forward adds router noise: eval() runs the moepass form, train() its own."""

    class Noisy(WhereLoopMoE):
        def forward(self, hidden):
            if self.training:
                hidden = hidden + 0.01 * torch.randn_like(hidden)
            return super().forward(hidden)

    block = Noisy()
    assert moepass.make_traceable(block) == [""]
    x = _input(9)
    torch.manual_seed(0)
    block.train()
    noisy = block(x)
    torch.manual_seed(0)
    assert torch.equal(noisy, Noisy.forward(block, x))  # its own forward, random numbers and all
    block.eval()
    assert rel_err(block(x), WhereLoopMoE.forward(block, x)) <= 1e-5
    block.train()
    compiled = torch.compile(block, backend="adaptive_moe", options={"inner": "eager"})
    compiled(x)
    (entry,) = moepass.report(compiled).blocks
    assert not entry.rewritten and entry.reason_code == "graph_break" and "own forward in train()" in entry.reason


@pytest.mark.inductor
def test_remote_deepseek_v2_made_traceable_through_inductor_with_an_adaptive_policy():
    block = RemoteDeepseekV2MoE(top_k=3, n_group=4, topk_group=2)
    moepass.make_traceable(block)
    x = _input(10)
    compiled = torch.compile(block, backend="adaptive_moe", options={"policy": "top_p", "p": 0.45})
    out = compiled(x)
    assert rel_err(out.detach(), lifted_reference(block, x, "top_p", {"p": 0.45})) <= 1e-5
    out.sum().backward()  # grad mode: the split form's backward through Inductor
    assert block.experts[0].gate_proj.weight.grad is not None
    (entry,) = moepass.report(compiled).blocks
    assert entry.rewritten and entry.reason_code == "" and set(REASON_CODES) >= {"graph_break"}
