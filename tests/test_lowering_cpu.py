"""The CPU experts lowering against the plain per-slot reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from moepass.lowering import cpu, reference

from moepass.spec import ExpertsSpec
from moepass.stats import count_gemm_rows


def _problem(tokens, experts, slots, hidden, inter, spec_kwargs, dtype, empty_fraction, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=experts, hidden_size=hidden, intermediate_size=inter, **spec_kwargs)
    n1 = 2 * inter if spec.gated else inter
    if spec.transposed:
        w1, w2 = torch.randn(experts, hidden, n1, generator=g), torch.randn(experts, inter, hidden, generator=g)
    else:
        w1, w2 = torch.randn(experts, n1, hidden, generator=g), torch.randn(experts, hidden, inter, generator=g)
    w1, w2 = (w1 * 0.2).to(dtype), (w2 * 0.2).to(dtype)
    b1 = (torch.randn(experts, n1, generator=g) * 0.1).to(dtype) if spec.has_bias else None
    b2 = (torch.randn(experts, hidden, generator=g) * 0.1).to(dtype) if spec.has_bias else None
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=g)[:slots] for _ in range(tokens)])
    empty = torch.rand(tokens, slots, generator=g) < empty_fraction
    ids = ids.masked_fill(empty, experts)
    weights = torch.rand(tokens, slots, generator=g).masked_fill(empty, 0.0)
    return spec, (x, ids, weights, w1, w2, b1, b2)


VARIANTS = {
    "silu-concat": dict(activation="silu"),
    "gelu": dict(activation="gelu"),
    "gelu-tanh": dict(activation="gelu_tanh"),
    "relu-plain": dict(activation="relu", gated=False, gate_up_layout="none"),
    "swiglu-oss": dict(activation="swiglu_clamp", gate_up_layout="interleaved", transposed=True, has_bias=True),
    "weight-on-input": dict(activation="silu", transposed=True, weight_on_input=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tokens,experts,slots", [(1, 4, 1), (7, 8, 2), (33, 8, 4), (20, 16, 2)])
def test_cpu_matches_reference(variant, tokens, experts, slots):
    spec, args = _problem(tokens, experts, slots, 16, 24, VARIANTS[variant], torch.float32, empty_fraction=0.3)
    expected = reference.experts_forward(*args, spec)
    actual = cpu.experts_forward(*args, spec)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision(dtype):
    spec, args = _problem(17, 8, 2, 32, 48, VARIANTS["silu-concat"], dtype, empty_fraction=0.2)
    expected = reference.experts_forward(*args, spec)
    actual = cpu.experts_forward(*args, spec)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), rtol=3e-2, atol=3e-2)


def test_empty_slots_cost_no_gemm_rows():
    spec, args = _problem(40, 8, 2, 16, 24, VARIANTS["silu-concat"], torch.float32, empty_fraction=0.45)
    ids = args[1]
    with count_gemm_rows() as rows:
        cpu.experts_forward(*args, spec)
    non_empty = int((ids < spec.num_experts).sum())
    assert sum(rows) == non_empty < ids.numel()
    # one GEMM pair per expert that received rows
    assert len(rows) == len(set(ids[ids < spec.num_experts].tolist()))


def test_all_slots_empty_gives_zeros():
    spec, (x, ids, weights, w1, w2, b1, b2) = _problem(5, 4, 2, 8, 12, VARIANTS["silu-concat"], torch.float32, 0.0)
    ids = torch.full_like(ids, 4)
    out = cpu.experts_forward(x, ids, torch.zeros_like(weights), w1, w2, b1, b2, spec)
    assert torch.equal(out, torch.zeros_like(x))


def test_all_tokens_on_one_expert():
    spec, (x, ids, weights, w1, w2, b1, b2) = _problem(9, 4, 1, 8, 12, VARIANTS["silu-concat"], torch.float32, 0.0)
    ids = torch.full_like(ids, 3)
    expected = reference.experts_forward(x, ids, weights, w1, w2, b1, b2, spec)
    torch.testing.assert_close(cpu.experts_forward(x, ids, weights, w1, w2, b1, b2, spec), expected)


def test_experts_op_dispatches_to_lowerings():
    from moepass.ops import ExpertsConfig

    spec, args = _problem(6, 4, 2, 8, 12, VARIANTS["silu-concat"], torch.float32, 0.3)
    results = [
        torch.ops.moepass.experts(*args, ExpertsConfig(spec=spec, lowering=lowering).to_json())
        for lowering in ("auto", "cpu", "reference")
    ]
    for a, b in itertools.pairwise(results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tokens,slots", [(1, 2), (3, 8), (40, 8)])
def test_slot_plan_in_lists_equals_the_tensor_plan(tokens, slots, monkeypatch):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, 9, (tokens, slots), generator=g)  # 8 = E: empty slots
    ids[0, -1] = -1  # out of range: empty too
    small = cpu.plan_slots(ids, 8)
    monkeypatch.setattr(cpu, "_LIST_PLAN_MAX_SLOTS", 0)
    large = cpu.plan_slots(ids, 8)
    assert small.counts == large.counts
    for name in ("row_token", "row_slot", "slot_row"):
        assert torch.equal(getattr(small, name), getattr(large, name)), name
    live = ids.flatten()
    live = live[(live >= 0) & (live < 8)]
    assert small.counts == torch.bincount(live, minlength=8).tolist()

