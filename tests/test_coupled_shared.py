"""Shared experts the router weighs jointly with the routed ones (Inkling).

Inkling's router has one row per shared expert beside the E routed rows; the
weights are ``sigmoid(l_j) / (Σ_selected sigmoid + Σ_shared sigmoid) × scale``
over the k picks *and* the shared rows, so the shared branch reads the
router.  The routed experts become moepass ops, the shared branch stays in
the graph as the model's own ops, and the routing weights still come from the
model's own formula (lifted router).  The per-token reference below is
written from transformers' ``InklingTopkRouter`` / ``InklingSharedExperts``
with Python floats, independently of moepass.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder, rel_err, token_ids
from reference_routing import choose_k, sigmoid

import moepass
from moepass.zoo.discovery import tiny_family_model

pytest.importorskip("transformers.models.inkling")


def _inkling(**overrides):
    return tiny_family_model("inkling_text", **overrides)


def test_routed_experts_rewritten_and_router_weighed_shared_experts_kept():
    model = _inkling()
    rec = Recorder()
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        for length in (8, 13):
            ids = token_ids(2, length, seed=length)
            assert rel_err(compiled(ids).logits, model(ids).logits) <= 1e-5, f"length {length}"
    layers = model.config.num_hidden_layers
    for blocks in rec.reports:
        assert len(blocks) == layers
        assert all(b.rewritten for b in blocks), [b.reason for b in blocks]
        assert all(b.spec.router.kind == "lifted" for b in blocks)
        assert all(b.shared_experts == ["shared MLP (I=32, router-gated)"] for b in blocks)
        assert all(b.validation_error is not None and b.validation_error <= 1e-5 for b in blocks)
    ops = rec.ops()
    assert ops.count("moepass::route") == ops.count("moepass::experts") == layers * len(rec.graphs)
    assert "grouped_mm_fallback" not in ops  # the routed experts' dispatch is gone
    # the shared experts (gate, up, down as bmm over [S, ., .] weights) are the model's own ops still
    assert ops.count("bmm") == 3 * layers * len(rec.graphs)
    # and their gammas still come from the router's joint normalisation
    assert ops.count("logsumexp") == layers * len(rec.graphs)


@torch.no_grad()
def _reference_block(block, x: torch.Tensor, rule: str, params: dict) -> tuple[torch.Tensor, list[int], float]:
    """(output, k per token, smallest decision margin) of an Inkling MoE block, token by token."""
    gate, experts, shared = block.gate, block.experts, block.shared_experts
    E, S, k = gate.num_experts, gate.n_shared_experts, gate.top_k
    scale = gate.route_scale * float(gate.global_scale.detach())
    bias = gate.e_score_correction_bias.tolist()
    rows = x.reshape(-1, x.shape[-1]).double()
    out, ks, margin = torch.zeros_like(rows), [], math.inf
    for t, row in enumerate(rows):
        logits = (gate.weight.double() @ row).tolist()
        biased = [sigmoid(logits[e]) + bias[e] for e in range(E)]
        order = sorted(range(E), key=lambda e: -biased[e])[:k]
        denominator = sum(sigmoid(logits[e]) for e in order) + sum(sigmoid(logits[E + s]) for s in range(S))
        weights = [sigmoid(logits[e]) / denominator * scale for e in order]
        gammas = [sigmoid(logits[E + s]) / denominator * scale for s in range(S)]
        probs = [w / sum(weights) for w in weights]
        kept, margins = choose_k(rule, params, probs, logits, None, (), k)
        margin = min([margin, *(abs(m) for m in margins), biased[order[-1]] - sorted(biased)[-k - 1]])
        ks.append(kept)
        for slot in range(kept):
            g, u = (experts.gate_up_proj[order[slot]].double() @ row).chunk(2)
            out[t] += weights[slot] * (experts.down_proj[order[slot]].double() @ (F.silu(g) * u))
        for s in range(S):
            h = F.silu(shared.gate_proj[s].double() @ row) * (shared.up_proj[s].double() @ row)
            out[t] += gammas[s] * (shared.down_proj[s].double() @ h)
    return out.reshape(x.shape), ks, margin


@pytest.mark.parametrize("rule,options,params", [
    ("static", {}, {}),
    ("threshold", {"policy": "threshold", "T": 0.1}, {"T": 0.1}),
])
def test_block_matches_a_per_token_reference(rule, options, params):
    """The policy acts on the model's own ranking and weights; the shared gammas are the model's."""
    block = _inkling().model.layers[0].mlp
    x = torch.randn(1, 24, block.config.hidden_size, generator=torch.Generator().manual_seed(5))
    expected, ks, margin = _reference_block(block, x, rule, params)
    assert margin > 1e-5  # no token sits on a decision boundary (float32 and float64 could disagree)
    if rule != "static":
        assert 1 in ks and 2 in ks  # the policy keeps one expert for some tokens, two for others
    compiled = torch.compile(block, backend="adaptive_moe", options={**options, "inner": "eager"})
    with torch.no_grad():
        actual = compiled(x)
    assert rel_err(actual.detach(), expected) <= 1e-5
    report = moepass.report(compiled)
    assert [b.rewritten for b in report.blocks] == [True]


def _gate_shared_by_first_pick(block) -> None:
    """Scale the block's shared expert by the weight of its router's *first* pick instead.

    The first pick of an unsorted top-k is often not the best one, so the
    rewrite (which sorts a lifted router's selection) would change the shared
    branch: validation must see it and leave the block as it was.
    """
    original = block.gate.forward

    def forward(hidden_states):
        logits, weights, ids, _ = original(hidden_states)
        return logits, weights, ids, weights[..., :1].contiguous()

    block.gate.forward = forward


def test_shared_branch_that_reads_the_selection_order_is_left_alone():
    # top-3: CPU's unsorted top-2 of 8 comes out best first anyway, its top-3 mostly not
    block = _inkling(num_experts_per_tok=3, n_shared_experts=1).model.layers[0].mlp  # one gamma: the first pick's
    _gate_shared_by_first_pick(block)
    x = torch.randn(1, 24, block.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        shared = block.gate.n_shared_experts
        scores = F.linear(x.reshape(24, -1), block.gate.weight)[:, :-shared].sigmoid() + block.gate.e_score_correction_bias
        unsorted = torch.topk(scores, block.gate.top_k, dim=-1, sorted=False)[1]
    assert not torch.equal(unsorted, scores.topk(block.gate.top_k, dim=-1)[1])  # the premise: the order differs
    rec = Recorder()
    with torch.no_grad():
        expected = block(x)
        actual = torch.compile(block, backend=rec)(x)
    assert torch.equal(actual, expected)
    (entry,) = rec.reports[0]
    assert not entry.rewritten
    assert "does not reproduce the block" in entry.reason
    assert "moepass::route" not in rec.ops()
