"""Adaptive policies through the backend, against eager models whose router runs the
per-token reference rule.

The reference writes an empty slot as the token's first expert with weight 0:
transformers' eager experts before 5.18 (and gpt-oss's) build
``one_hot(ids, num_classes=E)`` and cannot take the sentinel id E.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, token_ids
from reference_routing import Router, route_token

import moepass
from moepass.runtime.stats import reset_stats
from moepass.zoo import tiny_model

#: the router each family's config defines, written out independently of detection
ROUTERS = {
    "mixtral": lambda c: Router("softmax_topk", c.num_local_experts, c.num_experts_per_tok, renormalize=True),
    "olmoe": lambda c: Router("softmax_topk", c.num_experts, c.num_experts_per_tok, renormalize=c.norm_topk_prob),
    "qwen2_moe": lambda c: Router("softmax_topk", c.num_experts, c.num_experts_per_tok, renormalize=c.norm_topk_prob),
    "granitemoe": lambda c: Router("topk_softmax", c.num_local_experts, c.num_experts_per_tok, renormalize=True),
    "deepseek_v3": lambda c: Router(
        "sigmoid_group_topk", c.n_routed_experts, c.num_experts_per_tok, renormalize=c.norm_topk_prob,
        eps=1e-20, scale=c.routed_scaling_factor, n_group=c.n_group, topk_group=c.topk_group,
    ),
}

CASES = [
    ("mixtral", {"policy": "threshold", "T": 0.08}, "threshold", {"T": 0.08}),
    ("mixtral", {"policy": "top_p", "p": 0.55}, "top_p", {"p": 0.55}),
    ("olmoe", {"policy": "top_p", "p": 0.5, "renormalize": True}, "top_p", {"p": 0.5}),
    ("qwen2_moe", {"policy": "skip_ratio", "beta": 0.8}, "skip_ratio", {"beta": 0.8}),
    ("granitemoe", {"policy": "threshold", "T": 0.1}, "threshold", {"T": 0.1}),
    ("deepseek_v3", {"policy": "top_p", "p": 0.3}, "top_p", {"p": 0.3}),
]


def _patch_routers(model, router: Router, rule: str, params: dict, renormalize):
    """Replace every router's forward by the per-token reference of ``rule``."""
    patched = 0
    for module in model.modules():
        if not type(module).__name__.lower().endswith(("topkrouter",)):
            continue
        # routers return (logits, weights, ids) — in that order or, in some
        # transformers versions, another: keep the original order
        with torch.no_grad():
            probe = module(torch.zeros(1, module.weight.shape[1]))
        order = ["ids" if t.dtype == torch.int64 else "logits" if t.shape[-1] == router.num_experts else "weights" for t in probe]

        def forward(self, hidden_states, order=order):
            x = hidden_states.reshape(-1, self.weight.shape[1])
            bias = getattr(self, "bias", None)
            logits = F.linear(x.float(), self.weight.float(), None if bias is None else bias.float())
            router.correction_bias = (
                self.e_score_correction_bias.float().tolist() if hasattr(self, "e_score_correction_bias") else []
            )
            rows = [route_token(row, router, rule, params, k_min=1, renormalize=renormalize) for row in logits.tolist()]
            ids = torch.tensor([[e if e < router.num_experts else r[0][0] for e in r[0]] for r in rows])
            weights = torch.tensor([r[1] for r in rows], dtype=x.dtype)
            values = {"logits": logits, "weights": weights, "ids": ids}
            return tuple(values[name] for name in order)

        module.forward = types.MethodType(forward, module)
        patched += 1
    assert patched == model.config.num_hidden_layers


@pytest.mark.parametrize("family,options,rule,params", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_adaptive_policy_matches_eager_reference(family, options, rule, params):
    compiled_model = tiny_model(family)  # default grouped_mm experts
    reference_model = tiny_model(family, "eager")
    router = ROUTERS[family](reference_model.config)
    _patch_routers(reference_model, router, rule, params, options.get("renormalize"))
    reset_stats()
    fast = torch.compile(compiled_model, backend="adaptive_moe", options={**options, "inner": "eager", "stats": True})
    ids = token_ids(2, 12, seed=3)
    with torch.no_grad():
        expected = reference_model(ids, use_cache=False).logits
        actual = fast(ids, use_cache=False).logits
    assert rel_err(actual, expected) <= 1e-5
    report = moepass.report(fast)
    assert len(report.rewritten) == compiled_model.config.num_hidden_layers
    stats = report.stats()
    assert set(stats) == {b.path for b in report.blocks}
    for path, block_stats in stats.items():
        assert block_stats.tokens == 24
        assert block_stats.average_k < router.top_k, path
    assert "avg k" in str(report)


def test_static_and_adaptive_compile_side_by_side():
    """Two compiles of one model with different policies keep separate reports."""
    model = tiny_model("mixtral")
    static = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
    adaptive = torch.compile(model, backend="adaptive_moe", options={"policy": "top_p", "p": 0.3, "inner": "eager"})
    ids = token_ids(1, 9)
    with torch.no_grad():
        static(ids, use_cache=False)
        torch._dynamo.reset()
        adaptive(ids, use_cache=False)
    assert moepass.last_report().policy.startswith("top_p")
