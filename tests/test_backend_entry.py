"""backend="adaptive_moe" works by name, without importing moepass; reports are reachable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import rel_err, token_ids

import moepass
from moepass.zoo import tiny_model


def test_backend_by_name_without_import():
    script = textwrap.dedent(
        """
        import sys, torch
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.for_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   vocab_size=64, num_attention_heads=2, num_key_value_heads=1,
                                   num_local_experts=4, num_experts_per_tok=2)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        ids = torch.randint(0, 64, (1, 6))
        with torch.no_grad():
            out = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})(ids, use_cache=False)
        assert "moepass" in sys.modules, "the entry point did not load moepass"
        import moepass
        report = moepass.last_report()
        print(len(report.rewritten), len(report.blocks))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["1", "1"]


def test_report_per_model_and_last():
    first, second = tiny_model("mixtral"), tiny_model("olmoe", num_hidden_layers=1)
    fast_first = torch.compile(first, backend="adaptive_moe", options={"inner": "eager"})
    fast_second = torch.compile(second, backend="adaptive_moe", options={"inner": "eager"})
    with torch.no_grad():
        fast_first(token_ids(1, 5), use_cache=False)
        fast_second(token_ids(1, 5), use_cache=False)
    assert [b.path for b in moepass.last_report().blocks] == ["model.layers.0.mlp"]
    report = moepass.report(fast_first)
    assert report is moepass.report(first)
    assert [b.path for b in report.blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    entry = report.block("model.layers.1.mlp")
    assert (entry.router, entry.dispatch, entry.num_experts, entry.top_k, entry.rewritten, entry.reason) == (
        "softmax_topk",
        "grouped_mm",
        4,
        2,
        True,
        "",
    )
    text = str(report)
    assert "2/2 MoE blocks rewritten" in text and "softmax→top2→renorm" in text
    with pytest.raises(LookupError, match="compile it with torch.compile"):
        moepass.report(tiny_model("mixtral", num_hidden_layers=1))


@pytest.mark.inductor
def test_inductor_inner_compiler_end_to_end():
    model = tiny_model("qwen2_moe")
    fast = torch.compile(model, backend="adaptive_moe")
    with torch.no_grad():
        for length in (6, 10):
            ids = token_ids(2, length, seed=length)
            assert rel_err(fast(ids, use_cache=False).logits, model(ids, use_cache=False).logits) <= 1e-5
    report = moepass.report(fast)
    assert report.inner == "inductor" and len(report.rewritten) == 2
    assert torch._dynamo.utils.counters["moepass"]["blocks_rewritten"] == 4  # 2 blocks × 2 graphs


@pytest.mark.inductor
def test_dense_model_under_inductor_behaves_as_inductor():
    model = tiny_model("llama")
    ids = token_ids(2, 6)
    with torch.no_grad():
        ours = torch.compile(model, backend="adaptive_moe")(ids, use_cache=False).logits
        torch._dynamo.reset()
        plain = torch.compile(model, backend="inductor")(ids, use_cache=False).logits
    assert torch.equal(ours, plain)
    assert moepass.last_report().blocks == []
