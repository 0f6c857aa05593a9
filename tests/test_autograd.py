"""The compiled model in every mode people run it: gradients, modes, generate().

Structure: in grad mode the experts are written in their split form
(``expert_rows`` → ``experts_up`` → ``expert_activation`` → ``experts_down``,
each differentiable); without grad the fused ``experts`` op.  Numbers:
outputs and the gradient of every parameter against eager transformers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import Recorder, rel_err, token_ids

import moepass
from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.ops import ExpertsConfig, split_experts
from moepass.runtime.stats import count_gemm_rows
from moepass.zoo import FAMILIES, tiny_model

SPLIT_OPS = {"moepass::expert_rows", "moepass::experts_up", "moepass::expert_activation", "moepass::experts_down"}


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().pow(2).mean()


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _eager_gradients(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids, use_cache=False).logits
    _loss(logits).backward()
    grads = _gradients(model)
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _assert_same_gradients(actual: dict, expected: dict, tolerance: float = 1e-5) -> None:
    assert set(actual) == set(expected), set(expected) ^ set(actual)
    worst = {name: rel_err(actual[name], expected[name]) for name in expected if expected[name].abs().max() > 0}
    bad = {name: err for name, err in worst.items() if err > tolerance}
    assert not bad, bad


# --- the README's first example, as written ---------------------------------


@pytest.mark.inductor
def test_readme_example_in_grad_mode_with_inductor_backpropagates():
    model = tiny_model("mixtral")
    input_ids = token_ids(2, 8, seed=1)
    expected_logits, expected_grads = _eager_gradients(model, input_ids)

    fast = torch.compile(model, backend="adaptive_moe")  # default options: Inductor, static policy
    logits = fast(input_ids).logits  # no torch.no_grad()
    assert logits.requires_grad
    assert rel_err(logits, expected_logits) <= 1e-5
    _loss(logits).backward()
    _assert_same_gradients(_gradients(model), expected_grads)
    report = moepass.report(fast)
    assert len(report.rewritten) == model.config.num_hidden_layers


# --- every family: gradients equal eager transformers' -----------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_static_gradients_equal_eager(family):
    model = tiny_model(family)
    input_ids = token_ids(2, 9, seed=2)
    expected_logits, expected_grads = _eager_gradients(model, input_ids)
    rec = Recorder()
    logits = torch.compile(model, backend=rec)(input_ids, use_cache=False).logits
    assert rel_err(logits, expected_logits) <= 1e-5
    _loss(logits).backward()
    _assert_same_gradients(_gradients(model), expected_grads)

    ops = rec.ops()
    layers = model.config.num_hidden_layers
    assert all(b.rewritten for blocks in rec.reports for b in blocks)
    for name in SPLIT_OPS:
        assert ops.count(name) == layers, name
    assert "moepass::experts" not in ops


# --- modes ------------------------------------------------------------------


MODES = ["grad", "no_grad", "inference_mode"]


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_mode_runs_and_matches_eager(inner, mode, train):
    model = tiny_model("qwen2_moe")  # shared experts with a sigmoid gate, no renormalisation
    model.train(train)
    input_ids = token_ids(1, 7, seed=3)
    with torch.no_grad():
        expected = model(input_ids, use_cache=False).logits
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return moepass.compiler.backend.adaptive_moe(gm, example_inputs, options={"inner": inner})

    fast = torch.compile(model, backend=backend)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        logits = fast(input_ids, use_cache=False).logits
    assert rel_err(logits, expected) <= 1e-5
    ops = {n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    split = torch.ops.moepass.experts_up.default in ops
    fused = torch.ops.moepass.experts.default in ops
    assert (split, fused) == ((True, False) if mode == "grad" else (False, True))
    if mode == "grad":
        _loss(logits).backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "experts" in n)


def test_router_noise_in_training_mode_is_left_alone_with_the_reason():
    class NoisyRouterMoE(moepass.zoo.ReferenceMoE):
        """Noise on the router logits only (not on the experts' input): not reproducible."""

        def forward(self, x):
            shape = x.shape
            x = x.view(-1, shape[-1])
            logits = F.dropout(self.gate(x), p=0.2, training=self.training)
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            weights, selected = torch.topk(probs, self.top_k, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            out = torch.zeros_like(x)
            for i, expert in enumerate(self.experts):
                token, nth = torch.where(selected == i)
                out.index_add_(0, token, expert(x[token]) * weights[token, nth, None])
            return out.view(shape)

    torch.manual_seed(0)
    block = NoisyRouterMoE().train()
    rec = Recorder()
    torch.compile(block, backend=rec, fullgraph=True)(torch.randn(2, 5, 32))
    (entry,) = rec.reports[0]
    assert not entry.rewritten
    assert "random numbers" in entry.reason and "eval" in entry.reason
    assert "moepass::experts" not in rec.ops() and "moepass::experts_up" not in rec.ops()

    torch._dynamo.reset()
    rec = Recorder()
    block.eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        out = torch.compile(block, backend=rec, fullgraph=True)(x)
        assert rel_err(out, block(x)) <= 1e-5
    assert rec.reports[0][0].rewritten


# --- the ops on their own ---------------------------------------------------

VARIANTS = [
    dict(gated=True),
    dict(gated=True, transposed=True, has_bias=True),
    dict(gated=False, activation="gelu", has_bias=True),
    dict(gated=True, weight_on_input=True),
    dict(gated=True, activation="swiglu_clamp", gate_up_layout="interleaved", transposed=True, has_bias=True,
         swiglu_limit=1.5),
]


def _problem(variant: dict, dtype=torch.float64, tokens: int = 6, seed: int = 0):
    hidden, inter, experts, slots = 5, 3, 3, 2
    spec = ExpertsSpec(
        dispatch="grouped_mm", num_experts=experts, hidden_size=hidden, intermediate_size=inter,
        gate_up_layout=variant.pop("gate_up_layout", "concat" if variant.get("gated", True) else "none"), **variant,
    )
    generator = torch.Generator().manual_seed(seed)
    n1 = 2 * inter if spec.gated else inter

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    ids = torch.randint(0, experts + 1, (tokens, slots), generator=generator)
    ids[0] = experts  # a token with no expert
    weights = torch.rand(tokens, slots, generator=generator, dtype=dtype).masked_fill(ids == experts, 0.0)
    w1 = rand(experts, hidden, n1) if spec.transposed else rand(experts, n1, hidden)
    w2 = rand(experts, inter, hidden) if spec.transposed else rand(experts, hidden, inter)
    b1, b2 = (rand(experts, n1), rand(experts, hidden)) if spec.has_bias else (None, None)
    args = (rand(tokens, hidden), ids, weights.requires_grad_(), w1, w2, b1, b2)
    return args, ExpertsConfig(spec=spec, lowering="cpu").to_json(), spec


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_gradcheck_fused_and_split(variant):
    args, config, _ = _problem(dict(variant))
    assert torch.autograd.gradcheck(lambda *a: torch.ops.moepass.experts(*a, config), args)
    assert torch.autograd.gradcheck(lambda *a: split_experts(*a, config), args)


def test_opcheck_including_autograd():
    args, config, spec = _problem(dict(VARIANTS[1]))
    x, ids, weights, w1, w2, b1, b2 = args
    torch.library.opcheck(torch.ops.moepass.experts.default, (*args, config))
    row_token, row_slot, offsets = torch.ops.moepass.expert_rows(ids, spec.num_experts)
    torch.library.opcheck(torch.ops.moepass.experts_up.default, (x, row_token, row_slot, offsets, weights, w1, b1, config))
    a = torch.randn(row_token.shape[0], spec.intermediate_size, dtype=x.dtype, requires_grad=True)
    torch.library.opcheck(
        torch.ops.moepass.experts_down.default, (a, row_token, row_slot, offsets, weights, w2, b2, config)
    )


def test_backward_does_no_gemm_work_for_empty_slots():
    args, config, spec = _problem(dict(gated=True), dtype=torch.float32, tokens=40, seed=4)
    ids = args[1]
    live = int(((ids >= 0) & (ids < spec.num_experts)).sum())
    assert live < ids.numel()
    with count_gemm_rows() as forward_rows:
        out = split_experts(*args, config)
    with count_gemm_rows() as backward_rows:
        out.pow(2).sum().backward()
    assert sum(forward_rows) == live
    assert sum(backward_rows) == 2 * live  # the up and the down projection's backward, empty slots skipped


# --- adaptive policies: gradients of the reference rule ---------------------


def _reference_router_forward(module, rule_k):
    """Mixtral's router with k per token chosen by ``rule_k(probs)`` and the model's renormalised weights."""

    def forward(hidden_states):
        x = hidden_states.reshape(-1, module.weight.shape[1])
        logits = F.linear(x, module.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        values, order = torch.topk(probs, module.top_k, dim=-1)
        k = rule_k(values.detach())
        keep = torch.arange(module.top_k).unsqueeze(0) < k.unsqueeze(1)
        kept = torch.where(keep, values, torch.zeros_like(values))
        weights = kept / kept.sum(dim=-1, keepdim=True)
        ids = torch.where(keep, order, order[:, :1])  # an empty slot: first expert at weight 0
        return logits, weights.to(x.dtype), ids

    return forward


def test_adaptive_policy_gradients_equal_the_reference_rule():
    threshold = 0.12

    def rule_k(values):  # top-2 unless p1 - p2 > T, written per token
        return torch.tensor([1 if float(v[0] - v[1]) > threshold else 2 for v in values])

    reference = tiny_model("mixtral", "eager")
    for module in reference.modules():
        if type(module).__name__ == "MixtralTopKRouter":
            module.forward = _reference_router_forward(module, rule_k)
    input_ids = token_ids(2, 11, seed=5)
    expected_logits, expected_grads = _eager_gradients(reference, input_ids)

    compiled_model = tiny_model("mixtral")  # grouped_mm experts, same weights
    fast = torch.compile(compiled_model, backend="adaptive_moe",
                         options={"policy": "threshold", "T": threshold, "inner": "eager", "stats": True})
    moepass.runtime.stats.reset_stats()
    logits = fast(input_ids, use_cache=False).logits
    assert rel_err(logits, expected_logits) <= 1e-5
    _loss(logits).backward()
    _assert_same_gradients(_gradients(compiled_model), expected_grads)
    assert all(s.average_k < 2 for s in moepass.report(fast).stats().values())


# --- generate() -------------------------------------------------------------


def test_generate_with_compiled_forward():
    model = tiny_model("mixtral")
    prompt = token_ids(1, 6, seed=6)
    expected = model.generate(prompt, max_new_tokens=64, do_sample=False, pad_token_id=0)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return moepass.compiler.backend.adaptive_moe(gm, example_inputs, options={"inner": "eager"})

    model.forward = torch.compile(model.forward, backend=backend)
    out = model.generate(prompt, max_new_tokens=64, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)
    assert len(graphs) <= 3  # prefill, first decode step, then one dynamic decode graph
    assert all(b.rewritten for b in moepass.report(model).blocks)

    torch._dynamo.reset()
    graphs.clear()
    adaptive = tiny_model("mixtral")
    adaptive.forward = torch.compile(
        adaptive.forward, backend="adaptive_moe", options={"policy": "top_p", "p": 0.4, "inner": "eager", "stats": True}
    )
    moepass.runtime.stats.reset_stats()
    out = adaptive.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6 + 32)
    assert all(s.average_k < 2 for s in moepass.report(adaptive).stats().values())


def test_generate_through_transformers_compile_config():
    """transformers' own compile path for generation (static cache) with this backend."""
    from transformers import CompileConfig

    model = tiny_model("mixtral")
    prompt = token_ids(1, 6, seed=7)
    expected = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    config = CompileConfig(backend="adaptive_moe", mode=None, options={"inner": "eager"})
    config._compile_all_devices = True  # transformers compiles on CUDA/XPU only unless told
    out = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0,
                         cache_implementation="static", compile_config=config)
    assert torch.equal(out, expected)
    report = moepass.report(model)
    assert report is not None and len(report.rewritten) == model.config.num_hidden_layers


def test_training_loop_through_the_pass_learns_with_the_gate_on():
    """A few optimizer steps through the compiled model with an adaptive policy active."""
    model = tiny_model("mixtral").train()
    fast = torch.compile(model, backend="adaptive_moe", options={"policy": "threshold", "T": 0.05, "inner": "eager"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    input_ids = token_ids(4, 16, seed=8)
    router = model.model.layers[0].mlp.gate.weight
    before = router.detach().clone()
    losses = []
    for _ in range(12):
        logits = fast(input_ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(router, before)  # the router learns through the routing weights
    assert all(b.rewritten for b in moepass.report(fast).blocks)
