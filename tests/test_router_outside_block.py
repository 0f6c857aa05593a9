"""Routers whose logits come from a computation of their own, and selection classes that add nothing.

ZAYA's router is an MLP (down-projection, norm, two GELU layers, out-projection)
that also reads the previous layer's router state, and it selects among E + 1
classes of which the last, the skip class, gets weight 0 and no expert.  The
block is rewritten as ``f(x, logits)`` (the router's MLP stays in the graph as
the model wrote it) and the skip class becomes an empty slot of the experts op,
which costs no GEMM row.
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import rel_err, token_ids
from reference_routing import choose_k

import moepass
from moepass.runtime.stats import reset_stats
from moepass.zoo import tiny_model

#: router width ≠ hidden width (64)
_ZAYA = {"router_hidden_size": 32}


def _zaya(seed: int = 0):
    """A tiny ZAYA choosing 2 of 8 experts + the skip class, a class like the others (its balancing bias -1 → 0).

    ZAYA's config allows top-1 only; its router and experts compute any k,
    and top-2 leaves an adaptive policy something to choose.
    """
    model = tiny_model("zaya", seed=seed, **_ZAYA)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.top_k = 2
            layer.mlp.gate.balancing_biases[-1] = 0.0
            layer.mlp.gate.router_mlp.out_proj.weight.mul_(8)  # peaked scores: clear decisions for the policies
    return model


def _skip_slots(model, ids) -> int:
    """How many slots pick the skip class in an eager forward."""
    picked = []

    def hook(module, args, output):
        probs = torch.softmax(module.router_mlp(module.down_proj(args[0])), dim=-1)
        top = torch.topk(probs + module.balancing_biases, module.top_k, dim=-1)[1]
        picked.append(int((top == module.num_experts).sum()))

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sum(picked)


def test_router_mlp_and_skip_class_are_rewritten_exactly():
    model = _zaya()
    ids = token_ids(2, 12, seed=1)
    skipped = _skip_slots(model, ids)
    assert skipped > 0  # the skip class is exercised, not only possible
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        fast = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "stats": True})
        reset_stats()
        actual = fast(ids, use_cache=False).logits
    assert rel_err(actual, expected) <= 1e-5
    report = moepass.report(fast)
    assert len(report.rewritten) == 2 and len(report.blocks) == 2
    for block in report.blocks:
        spec = block.spec
        assert spec.router.kind == "lifted" and spec.router.num_experts == 9  # 8 experts + the skip class
        assert spec.experts.num_experts == 8 and spec.experts.dispatch == "grouped_mm"
        assert spec.experts.zero_compute == ("zero",)  # the skip class: a zero expert, counted by the stats
        assert spec.experts.hidden_size == 64 and spec.router.hidden_size == 32
        ops = [n.target for n in block.graph_after.nodes if n.op == "call_function"]
        assert torch.ops.moepass.route.default in ops and torch.ops.moepass.experts.default in ops
    # a slot sent to the skip class is an empty slot: no GEMM row
    stats = report.stats()
    rows = sum(round(s.average_k * s.tokens) for s in stats.values())
    assert rows == 2 * 24 * 2 - skipped


def _reference_router(rule: str, params: dict):
    """ZayaRouter.forward with the per-token rule in plain Python (ids of empty and skip slots → 0, weight 0)."""

    def forward(self, hidden_states, router_states=None):
        seq_length = hidden_states.shape[1]
        router_hidden = self.down_proj(hidden_states)
        if self.use_eda and router_states is not None:
            router_hidden = router_hidden + router_states * self.router_states_scale
        following = router_hidden[:, -seq_length:].clone()
        logits = self.router_mlp(router_hidden)
        probs = torch.softmax(logits, dim=-1).reshape(-1, self.num_router_classes)
        skip, bias = self.num_experts, self.balancing_biases.tolist()
        all_ids, all_weights = [], []
        for row in probs.tolist():
            order = sorted(range(len(row)), key=lambda c: -(row[c] + bias[c]))[: self.top_k]
            values = [0.0 if c == skip else row[c] for c in order]
            total = sum(values)
            shares = [v / total for v in values] if total > 0 else values
            k, _ = choose_k(rule, params, shares, None, None, (), self.top_k)
            k = max(1, min(self.top_k, k))
            all_ids.append([c if j < k and c != skip else 0 for j, c in enumerate(order)])
            all_weights.append([v if j < k else 0.0 for j, v in enumerate(values)])
        weights = torch.tensor(all_weights, dtype=hidden_states.dtype)
        return logits.reshape(-1, self.num_router_classes), weights, torch.tensor(all_ids), following

    return forward


@pytest.mark.parametrize("rule,params", [("top_p", {"p": 0.5})])
def test_adaptive_policy_on_a_router_mlp_matches_the_per_token_reference(rule, params):
    model, reference = _zaya(), _zaya()
    for layer in reference.model.layers:
        layer.mlp.gate.forward = types.MethodType(_reference_router(rule, params), layer.mlp.gate)
    ids = token_ids(2, 12, seed=2)
    reset_stats()
    fast = torch.compile(model, backend="adaptive_moe", options={"policy": rule, **params, "inner": "eager", "stats": True})
    with torch.no_grad():
        static = model(ids, use_cache=False).logits
        expected = reference(ids, use_cache=False).logits
        actual = fast(ids, use_cache=False).logits
    assert rel_err(actual, expected) <= 1e-5
    assert rel_err(actual, static) > 1e-3  # the policy changed the model's answer
    report = moepass.report(fast)
    assert len(report.rewritten) == 2
    assert all(s.average_k < 2 for s in report.stats().values())  # the policy dropped slots
