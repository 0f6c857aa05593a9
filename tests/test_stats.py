"""Run-time routing statistics count the tokens the model ran, and nothing else."""

from __future__ import annotations

import torch
from conftest import token_ids

from moepass.runtime.stats import reset_stats, routing_stats
from moepass.zoo import tiny_model


def test_stats_count_only_the_tokens_run():
    # compiling validates each rewrite on random tokens; those must not be counted
    model = tiny_model("mixtral")
    fast = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "stats": True})
    reset_stats()
    with torch.no_grad():
        fast(token_ids(2, 7), use_cache=False)
    stats = routing_stats()
    assert sorted(stats) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for entry in stats.values():
        assert entry.tokens == 14
        assert entry.tokens_per_k == [0, 0, 14]  # static policy: native k = 2 for every token
