"""Token bucketing by k: stable groups, fixed-k problems, padding that changes nothing."""

from __future__ import annotations

import torch
from moepass.lowering import reference

from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.bucketing import bucket_by_k, compact_slots


def test_buckets_group_tokens_stably_by_k():
    E = 4
    ids = torch.tensor([[3, 1], [2, E], [E, E], [0, E], [1, 2]])
    weights = torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    plan = bucket_by_k(ids, weights, E)
    assert plan.tokens_per_k == [1, 2, 2]
    assert [b.k for b in plan.buckets] == [1, 2]
    assert plan.buckets[0].tokens.tolist() == [1, 3] and plan.buckets[0].ids.tolist() == [[2], [0]]
    assert plan.buckets[1].tokens.tolist() == [0, 4] and plan.buckets[1].ids.tolist() == [[3, 1], [1, 2]]
    assert plan.rows == 6


def test_compaction_moves_non_empty_slots_first():
    E = 5
    ids, weights = compact_slots(torch.tensor([[E, 3, E, 1]]), torch.tensor([[0.0, 0.7, 0.0, 0.3]]), E)
    assert ids.tolist() == [[3, 1, E, E]]
    torch.testing.assert_close(weights, torch.tensor([[0.7, 0.3, 0.0, 0.0]]))


def test_padding_never_changes_results():
    g = torch.Generator().manual_seed(0)
    E, T, K, H, I = 6, 23, 3, 8, 12
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=E, hidden_size=H, intermediate_size=I)
    w1, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    k = torch.randint(0, K + 1, (T,), generator=g)
    ids = torch.where(torch.arange(K) < k[:, None], ids, E)
    weights = torch.rand(T, K, generator=g) * (ids < E)
    expected = reference.experts_forward(x, ids, weights, w1, w2, None, None, spec)
    for pad_sizes in (None, [4, 8, 16, 32]):
        plan = bucket_by_k(ids, weights, E, pad_sizes=pad_sizes)
        out = torch.zeros(T, H)
        for bucket in plan.buckets:
            if pad_sizes:
                assert bucket.size in pad_sizes and bool((bucket.ids[bucket.tokens < 0] == E).all())
            real = bucket.tokens >= 0
            rows = torch.where(real, bucket.tokens, 0)
            part = reference.experts_forward(x[rows], bucket.ids, bucket.weights, w1, w2, None, None, spec)
            out.index_add_(0, bucket.tokens[real], part[real])
        torch.testing.assert_close(out, expected)
