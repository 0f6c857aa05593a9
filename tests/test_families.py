"""Every supported family: detected, rewritten, and equal to eager to float32 round-off."""

from __future__ import annotations

import pytest
import torch
from conftest import Recorder, rel_err, token_ids

from moepass.zoo import FAMILIES, tiny_model

#: op names the rewrite must remove, per original dispatch
DISPATCH_OPS = {
    "grouped_mm": {"transformers::grouped_mm_fallback", "_grouped_mm", "grouped_mm", "histc", "sort"},
    "batched_mm": {"bmm", "repeat_interleave"},
    "dense_bmm": {"bmm", "repeat"},
}


def _implementations(family: str) -> list[str | None]:
    # llama4 has no experts_implementation switch: it is always dense bmm
    return [None] if family == "llama4_text" else [None, "batched_mm"]


CASES = [(family, impl) for family in FAMILIES for impl in _implementations(family)]


@pytest.mark.parametrize("family,impl", CASES, ids=[f"{f}-{i or 'default'}" for f, i in CASES])
def test_family_rewritten_and_exact(family, impl):
    model = tiny_model(family, impl)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec)
    with torch.no_grad():
        for length in (8, 13):
            ids = token_ids(2, length, seed=length)
            expected = model(ids, use_cache=False).logits
            actual = compiled(ids, use_cache=False).logits
            assert rel_err(actual, expected) <= 1e-5, f"length {length}"
        # a third length reuses the dynamic graph: at most one recompile in all
        compiled(token_ids(2, 21), use_cache=False)
    assert len(rec.graphs) <= 2

    num_layers = model.config.num_hidden_layers
    for blocks in rec.reports:
        assert len(blocks) == num_layers
        assert all(b.rewritten for b in blocks), [b.reason for b in blocks]
    dispatch = rec.reports[0][0].dispatch
    expected_dispatch = "dense_bmm" if family == "llama4_text" else (impl or "grouped_mm")
    assert dispatch == expected_dispatch
    ops = rec.ops()
    assert ops.count("moepass::route") == num_layers * len(rec.graphs)
    assert ops.count("moepass::experts") == num_layers * len(rec.graphs)
    assert not DISPATCH_OPS[dispatch] & set(ops), DISPATCH_OPS[dispatch] & set(ops)
    assert "topk" not in ops


def test_shared_experts_are_reported_and_kept():
    rec = Recorder()
    model = tiny_model("qwen2_moe")
    with torch.no_grad():
        torch.compile(model, backend=rec)(token_ids(1, 6), use_cache=False)
    block = rec.reports[0][0]
    assert block.shared_experts == ["shared MLP (I=48, sigmoid-gated)"]
    # the shared expert's three projections and its gate are still plain linears
    linears = [
        n
        for n in rec.graphs[0].graph.nodes
        if n.op == "call_function" and "linear" in str(n.target) and "shared_expert" in str(n.args[1])
    ]
    assert len(linears) == 2 * 4  # 2 layers × (gate, up, down, shared_expert_gate)


def test_router_specs_read_from_the_graph():
    rec = Recorder()
    model = tiny_model("deepseek_v3")
    with torch.no_grad():
        torch.compile(model, backend=rec)(token_ids(1, 6), use_cache=False)
    router = rec.reports[0][0].spec.router
    assert (router.kind, router.n_group, router.topk_group, router.top_k) == ("sigmoid_group_topk", 4, 2, 2)
    assert router.has_correction_bias and router.renormalize
    assert router.scaling_factor == pytest.approx(2.5)
    assert router.renormalize_eps == pytest.approx(1e-20)

    rec = Recorder()
    model = tiny_model("gpt_oss")
    with torch.no_grad():
        torch.compile(model, backend=rec)(token_ids(1, 6), use_cache=False)
    spec = rec.reports[0][0].spec
    assert spec.router.kind == "topk_softmax" and spec.router.linear_has_bias
    assert spec.experts.activation == "swiglu_clamp" and spec.experts.gate_up_layout == "interleaved"
    assert spec.experts.transposed and spec.experts.has_bias
    assert spec.experts.swiglu_limit == pytest.approx(getattr(model.config, "swiglu_limit", 7.0))  # a constant before 5.18


def test_llama4_dense_dispatch_becomes_sparse():
    rec = Recorder()
    model = tiny_model("llama4_text")
    with torch.no_grad():
        torch.compile(model, backend=rec)(token_ids(1, 6), use_cache=False)
    spec = rec.reports[0][0].spec
    assert spec.experts.weight_on_input and spec.router.kind == "topk_sigmoid"
    assert "bmm" not in rec.ops()
