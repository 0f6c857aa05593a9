"""What the pass must leave alone: dense models, top-k used for sampling, unsupported MoEs."""

from __future__ import annotations

import torch
import torch.nn as nn
from conftest import Recorder, rel_err, token_ids

from moepass.compiler.backend import optimize_graph
from moepass.compiler.dataflow import op_name
from moepass.compiler.options import BackendOptions
from moepass.zoo import tiny_model


def _graph_ops(gm):
    return [(n.op, op_name(n)) for n in gm.graph.nodes]


class _Snapshot:
    """Records each graph's op list before and after the pass."""

    def __init__(self):
        self.before, self.after, self.blocks = [], [], []

    def __call__(self, gm, example_inputs):
        self.before.append(_graph_ops(gm))
        gm, blocks = optimize_graph(gm, example_inputs, BackendOptions.parse({"inner": "eager"}))
        self.after.append(_graph_ops(gm))
        self.blocks.append(blocks)
        return gm.forward


def test_dense_llama_is_untouched():
    model = tiny_model("llama")
    snap = _Snapshot()
    ids = token_ids(2, 7)
    with torch.no_grad():
        out = torch.compile(model, backend=snap)(ids, use_cache=False).logits
        assert torch.equal(out, model(ids, use_cache=False).logits)
    assert snap.before == snap.after
    assert snap.blocks == [[]]


class Sampler(nn.Module):
    """A dense LM head followed by top-k sampling: topk, but no experts."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)

    def forward(self, x):
        logits = self.head(torch.relu(self.proj(x)))[:, -1]
        values, indices = torch.topk(logits, 5, dim=-1)
        probs = torch.softmax(values, dim=-1)
        return indices, probs


def test_topk_for_sampling_is_untouched():
    model = Sampler().eval()
    snap = _Snapshot()
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        indices, probs = torch.compile(model, backend=snap)(x)
        ref_indices, ref_probs = model(x)
    assert torch.equal(indices, ref_indices) and torch.equal(probs, ref_probs)
    assert snap.before == snap.after
    assert snap.blocks == [[]]


def test_phimoe_is_reported_with_its_reason_and_left_alone():
    model = tiny_model("phimoe")
    snap = _Snapshot()
    ids = token_ids(1, 9)
    with torch.no_grad():
        out = torch.compile(model, backend=snap)(ids, use_cache=False).logits
        assert torch.equal(out, model(ids, use_cache=False).logits)
    assert snap.before == snap.after
    blocks = snap.blocks[0]
    assert [b.path for b in blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert not any(b.rewritten for b in blocks)
    assert all("sparsemixer" in b.reason for b in blocks)


def test_failed_validation_leaves_the_block_exactly_as_it_was(monkeypatch):
    """A rewrite that would change the numbers is not applied, and says why."""
    import moepass.compiler.stages as stages

    monkeypatch.setattr(stages, "validate_rewrite", lambda *args: 0.5)
    model = tiny_model("mixtral")
    snap = _Snapshot()
    ids = token_ids(1, 5)
    with torch.no_grad():
        out = torch.compile(model, backend=snap)(ids, use_cache=False).logits
        assert torch.equal(out, model(ids, use_cache=False).logits)
    assert snap.before == snap.after
    assert all(not b.rewritten and "relative error 5.00e-01" in b.reason for b in snap.blocks[0])


class MixingExperts(nn.Module):
    """A stacked-experts MoE whose activation mixes features (a softmax over them): not elementwise."""

    def __init__(self, dim=16, inner=24, experts=4):
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(experts, inner, dim) * 0.1)
        self.w2 = nn.Parameter(torch.randn(experts, dim, inner) * 0.1)

    def forward(self, x):
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, ids = torch.topk(probs, 2, dim=-1)
        h = torch.bmm(self.w1[ids.reshape(-1)], x.repeat_interleave(2, 0).unsqueeze(-1)).squeeze(-1).softmax(-1)
        y = torch.bmm(self.w2[ids.reshape(-1)], h.unsqueeze(-1)).squeeze(-1)
        return (y * weights.reshape(-1, 1)).view(x.shape[0], 2, -1).sum(1)


def test_unsupported_activation_is_reported_not_rewritten():
    model = MixingExperts().eval()
    rec = Recorder()
    x = torch.randn(6, 16)
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(x)
        assert rel_err(out, model(x)) == 0.0
    (block,) = rec.reports[0]
    assert not block.rewritten
    assert "unsupported expert activation" in block.reason and "softmax" in block.reason
    assert "moepass::experts" not in rec.ops()


def test_dynamic_float_scaling_factor_stays_a_run_time_value():
    """dynamic=True makes DeepSeek's routed_scaling_factor a run-time value: the named router kind cannot bake
    it in, so the lifted router keeps the model's own weight formula (scale included) in the graph."""
    model = tiny_model("deepseek_v3")
    snap = _Snapshot()
    ids = token_ids(1, 6)
    with torch.no_grad():
        out = torch.compile(model, backend=snap, dynamic=True)(ids, use_cache=False).logits
        assert rel_err(out, model(ids, use_cache=False).logits) <= 1e-5
    blocks = snap.blocks[0]
    assert all(b.rewritten and b.spec.router.kind == "lifted" for b in blocks), [b.reason for b in blocks]
    assert snap.after[0].count(("call_function", "moepass::route")) == len(blocks)
