"""Property tests: every policy on random router scores, against the per-token reference."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference_routing import Router, route_token

from moepass.compiler.spec import RouterSpec
from moepass.policies.rules import get_rule
from moepass.runtime.routing import num_candidates, route

RULES = ("static", "threshold", "top_p", "sensitivity", "skip_ratio", "null_experts", "allocator")
HIDDEN = 3


@st.composite
def routing_problems(draw):
    kind = draw(st.sampled_from(["softmax_topk", "topk_softmax", "sigmoid_group_topk", "topk_sigmoid"]))
    n_group = 1
    if kind == "sigmoid_group_topk":
        n_group = draw(st.sampled_from([1, 2, 4]))
        num_experts = n_group * draw(st.integers(2, 3))
        topk_group = draw(st.integers(1, n_group))
    else:
        num_experts = draw(st.integers(2, 8))
        topk_group = 1
    candidates = num_experts // n_group * topk_group
    top_k = draw(st.integers(1, min(4, candidates)))
    spec = RouterSpec(
        kind=kind,
        num_experts=num_experts,
        top_k=top_k,
        renormalize=True if kind == "topk_softmax" else draw(st.booleans()),
        renormalize_eps=1e-20 if kind == "sigmoid_group_topk" else 0.0,
        scaling_factor=draw(st.sampled_from([1.0, 2.5])) if kind == "sigmoid_group_topk" else 1.0,
        has_correction_bias=kind == "sigmoid_group_topk",
        n_group=n_group,
        topk_group=topk_group,
        hidden_size=HIDDEN,
    )
    tokens = draw(st.integers(1, 5))
    floats = st.floats(-4, 4, allow_nan=False, width=32)
    logits = draw(st.lists(st.lists(floats, min_size=num_experts, max_size=num_experts), min_size=tokens, max_size=tokens))
    bias = draw(st.lists(st.floats(-0.5, 0.5, width=32), min_size=num_experts, max_size=num_experts))
    x = draw(st.lists(st.lists(floats, min_size=HIDDEN, max_size=HIDDEN), min_size=tokens, max_size=tokens))
    rule = draw(st.sampled_from(RULES if kind in ("softmax_topk", "topk_softmax") else RULES[:5] + ("allocator",)))
    params, tensors = {}, []
    if rule == "threshold":
        params = {"T": draw(st.floats(0.0, 0.6))}
    elif rule == "top_p":
        params = {"p": draw(st.floats(0.05, 1.0))}
    elif rule == "sensitivity":
        params = {"threshold": draw(st.floats(0.0, 0.7))}
    elif rule == "skip_ratio":
        params = {"beta": draw(st.floats(0.0, 1.0))}
    elif rule == "null_experts":
        m = draw(st.integers(1, 3))
        params = {"k": draw(st.integers(1, num_experts + m))}
        tensors = [draw(st.lists(st.lists(floats, min_size=HIDDEN, max_size=HIDDEN), min_size=m, max_size=m))]
    elif rule == "allocator":
        n = draw(st.integers(1, candidates))
        tensors = [draw(st.lists(st.lists(floats, min_size=n, max_size=n), min_size=HIDDEN, max_size=HIDDEN))]
    if rule == "static":
        k_min = k_max = None
    else:
        k_max = draw(st.integers(1, candidates))
        k_min = draw(st.integers(0, k_max))
    renormalize = draw(st.sampled_from([None, True, False])) if rule == "top_p" else None
    return spec, logits, bias, x, rule, params, tensors, k_min, k_max, renormalize


def _run(problem):
    spec, logits, bias, x, rule, params, tensors, k_min, k_max, renormalize = problem
    rule_fn = None if rule == "static" else get_rule(rule, params)
    ids, weights = route(
        torch.tensor(logits, dtype=torch.float32),
        spec,
        rule_fn,
        k_min=k_min,
        k_max=k_max,
        x=torch.tensor(x, dtype=torch.float32),
        correction_bias=torch.tensor(bias, dtype=torch.float32) if spec.has_correction_bias else None,
        tensors=[torch.tensor(t, dtype=torch.float32) for t in tensors],
        renormalize=renormalize,
    )
    return ids, weights


@settings(max_examples=300, deadline=None)
@given(routing_problems())
def test_invariants(problem):
    spec, logits, *_ , k_min, k_max, _ = problem
    ids, weights = _run(problem)
    E = spec.num_experts
    k_max = spec.top_k if k_max is None else k_max
    k_min = spec.top_k if problem[4] == "static" else k_min
    assert ids.shape == weights.shape == (len(logits), k_max)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    empty = ids == E
    assert bool(((ids >= 0) & (ids <= E)).all())
    k = (~empty).sum(1)
    assert bool((k >= k_min).all()) and bool((k <= k_max).all())
    # kept slots form a prefix, empty slots carry weight 0, no expert twice
    assert torch.equal(empty, torch.arange(k_max) >= k.unsqueeze(1))
    assert bool((weights[empty] == 0).all()) and bool((weights >= 0).all()) and bool(torch.isfinite(weights).all())
    for row in ids.tolist():
        kept = [e for e in row if e != E]
        assert len(set(kept)) == len(kept)
    # group-limited routers only pick experts from the groups they keep
    assert bool((ids[~empty] < num_candidates(spec) * spec.n_group // spec.topk_group).all())


@settings(max_examples=300, deadline=None)
@given(routing_problems())
def test_matches_per_token_reference(problem):
    spec, logits, bias, x, rule, params, tensors, k_min, k_max, renormalize = problem
    router = Router(
        spec.kind, spec.num_experts, spec.top_k, spec.renormalize, spec.renormalize_eps, spec.scaling_factor,
        spec.n_group, spec.topk_group, bias if spec.has_correction_bias else [],
    )
    # work on the float32 values the op sees
    logits32 = torch.tensor(logits, dtype=torch.float32).tolist()
    x32 = torch.tensor(x, dtype=torch.float32).tolist()
    tensors32 = [torch.tensor(t, dtype=torch.float32).tolist() for t in tensors]
    router.correction_bias = torch.tensor(bias, dtype=torch.float32).tolist() if spec.has_correction_bias else []
    expected = [
        route_token(row, router, rule, params, k_min, k_max, xr, tensors32, renormalize) for row, xr in zip(logits32, x32)
    ]
    # skip inputs that sit on a decision boundary (ties, or a margin below float32 precision)
    assume(all(abs(m) > 1e-4 for _, _, margins in expected for m in margins))
    ids, weights = _run(problem)
    for t, (ref_ids, ref_weights, _) in enumerate(expected):
        assert ids[t].tolist() == ref_ids, (t, ids[t].tolist(), ref_ids)
        for got, want in zip(weights[t].tolist(), ref_weights):
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (t, weights[t].tolist(), ref_weights)


@settings(max_examples=100, deadline=None)
@given(routing_problems())
def test_static_is_the_models_top_k(problem):
    spec, logits, bias, *_ = problem
    logits_t = torch.tensor(logits, dtype=torch.float32)
    ids, weights = route(logits_t, spec, correction_bias=torch.tensor(bias) if spec.has_correction_bias else None)
    assert not bool((ids == spec.num_experts).any())
    if spec.kind == "softmax_topk":
        probs = torch.softmax(logits_t, dim=-1)
        values, expected = torch.topk(probs, spec.top_k, dim=-1)
        if spec.renormalize:
            values = values / values.sum(-1, keepdim=True)
        assert torch.equal(ids, expected)
        torch.testing.assert_close(weights, values)
    elif spec.kind == "topk_softmax":
        values, expected = torch.topk(logits_t, spec.top_k, dim=-1)
        assert torch.equal(ids, expected)
        torch.testing.assert_close(weights, torch.softmax(values, dim=-1))
