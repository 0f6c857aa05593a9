"""Policy objects: parameters, per-layer overrides, files, and errors that name the block."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import token_ids

import moepass
from moepass.compiler.options import BackendOptions, OptionsError
from moepass.compiler.spec import MoEBlockSpec, RouterSpec
from moepass.policies import (
    Allocator,
    NullExperts,
    PolicyError,
    Sensitivity,
    SkipRatio,
    Static,
    Threshold,
    TopP,
    load_policy,
)
from moepass.runtime.stats import reset_stats
from moepass.zoo import tiny_model


def _block(path="model.layers.1.mlp", kind="softmax_topk", experts=8, k=2, hidden=16, **router):
    spec = RouterSpec(kind=kind, num_experts=experts, top_k=k, renormalize=True, hidden_size=hidden, **router)
    return MoEBlockSpec(path=path, router=spec, experts=None, layer_index=1)


def test_resolve_gives_rule_params_and_bounds():
    resolved = TopP(p=0.3, k_max=3, renormalize=False).resolve(_block())
    assert (resolved.rule, resolved.params, resolved.k_min, resolved.k_max, resolved.renormalize) == (
        "top_p",
        {"p": 0.3},
        1,
        3,
        False,
    )
    resolved = Sensitivity(T=0.04, sensitivity={"model.layers.1.mlp": 4.0}).resolve(_block())
    assert resolved.params == {"threshold": pytest.approx(0.1)}
    assert Static().resolve(_block()).rule == "static"


def test_per_layer_overrides_by_path_and_index():
    policy = Threshold(T=0.1, layers={"model.layers.1.mlp": {"T": 0.3}, "0": {"k_max": 1}})
    assert policy.resolve(_block()).params == {"T": 0.3}
    other = MoEBlockSpec(path="model.layers.0.mlp", router=_block().router, experts=None, layer_index=0)
    resolved = policy.resolve(other)
    assert resolved.params == {"T": 0.1} and resolved.k_max == 1
    with pytest.raises(PolicyError, match="unknown per-layer field.*'p'"):
        Threshold(layers={"1": {"p": 0.3}}).resolve(_block())


@pytest.mark.parametrize(
    "policy,message",
    [
        (TopP(k_max=9), "block model.layers.1.mlp: k bounds k_min=1, k_max=9 must satisfy"),
        (TopP(k_min=3, k_max=2), "k_min=3, k_max=2"),
        (Static(k_max=1), "static policy keeps the model's k"),
        (NullExperts(k=3, router_rows={"model.layers.1.mlp": torch.zeros(2, 15)}), "null-expert router rows has shape (2, 15), expected ('?', 16)"),
        (NullExperts(k=3, router_rows={"model.layers.0.mlp": torch.zeros(2, 16)}), "block model.layers.1.mlp: no null-expert router rows for it"),
        (Allocator(weights={"model.layers.1.mlp": torch.zeros(8, 2)}), "allocator weights has shape (8, 2), expected (16, '?')"),
        (Allocator(), "needs trained per-layer weights"),
        (Sensitivity(), "run moepass calibrate"),
        (SkipRatio(beta={"model.layers.3.mlp": 0.5}), "no beta_l for it"),
    ],
)
def test_mismatches_name_the_block(policy, message):
    with pytest.raises(PolicyError) as info:
        policy.resolve(_block())
    assert message in str(info.value)


def test_null_experts_need_a_softmax_router():
    block = _block(kind="sigmoid_group_topk", n_group=2, topk_group=1)
    with pytest.raises(PolicyError, match="null experts extend a softmax router"):
        NullExperts(router_rows={"model.layers.1.mlp": torch.zeros(2, 16)}).resolve(block)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: TopP(p=0), "p must be in (0, 1]"),
        (lambda: Threshold(T=-1), "T must be >= 0"),
        (lambda: SkipRatio(beta=1.5), "beta must be in [0, 1]"),
        (lambda: NullExperts(k=0), "k must be >= 1"),
        (lambda: Sensitivity(sensitivity={"a": 0.0}), "must be > 0"),
    ],
)
def test_bad_parameters(make, message):
    with pytest.raises(PolicyError) as info:
        make()
    assert message in str(info.value)


POLICIES = [
    Threshold(T=0.2, k_max=2, layers={"0": {"T": 0.05}}),
    TopP(p=0.35, renormalize=False),
    Sensitivity(T=0.01, sensitivity={"model.layers.0.mlp": 3.5, "model.layers.1.mlp": 0.2}),
    SkipRatio(beta={"model.layers.0.mlp": 0.4, "model.layers.1.mlp": 0.6}),
    NullExperts(k=3, k_min=0, router_rows={"model.layers.0.mlp": torch.randn(2, 64), "model.layers.1.mlp": torch.randn(2, 64)}),
    Allocator(weights={"model.layers.0.mlp": torch.randn(64, 2), "model.layers.1.mlp": torch.randn(64, 2)}, sample=True),
]


@pytest.mark.parametrize("policy", POLICIES, ids=[p.name for p in POLICIES])
def test_save_and_load_round_trip(policy, tmp_path):
    policy.save(tmp_path / "p")
    loaded = load_policy(tmp_path / "p")
    assert type(loaded) is type(policy)
    for field in policy.__dataclass_fields__:
        a, b = getattr(policy, field), getattr(loaded, field)
        if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert a == b, field
    assert type(policy).load(tmp_path / "p").describe() == policy.describe()


def test_bad_policy_files(tmp_path):
    with pytest.raises(PolicyError, match="no policy.json"):
        load_policy(tmp_path)
    (tmp_path / "policy.json").write_text("{not json")
    with pytest.raises(PolicyError, match="does not parse"):
        load_policy(tmp_path)
    (tmp_path / "policy.json").write_text(json.dumps({"policy": "warp", "params": {}}))
    with pytest.raises(PolicyError, match="unknown policy 'warp'"):
        load_policy(tmp_path)
    (tmp_path / "policy.json").write_text(json.dumps({"policy": "allocator", "params": {}}))
    with pytest.raises(PolicyError, match="needs policy.safetensors"):
        load_policy(tmp_path)
    Threshold().save(tmp_path / "t")
    with pytest.raises(PolicyError, match="holds a 'threshold' policy, not 'top_p'"):
        TopP.load(tmp_path / "t")


def test_options_select_policies_by_name_and_parameters():
    assert BackendOptions.parse({"policy": "top_p", "p": 0.2}).policy == TopP(p=0.2)
    assert BackendOptions.parse({"policy": "threshold", "T": 0.3, "k_max": 2}).policy == Threshold(T=0.3, k_max=2)
    with pytest.raises(OptionsError, match="unknown option.*'q'.*'top_p'.*parameters.*p, renormalize"):
        BackendOptions.parse({"policy": "top_p", "q": 0.2})
    with pytest.raises(OptionsError, match="p must be in"):
        BackendOptions.parse({"policy": "top_p", "p": 2.0})


def test_policy_mismatch_fails_the_compile_naming_the_block():
    model = tiny_model("mixtral")
    rows = {"model.layers.0.mlp": torch.randn(2, 64), "model.layers.1.mlp": torch.randn(2, 32)}
    compiled = torch.compile(model, backend="adaptive_moe", options={"policy": NullExperts(k=3, router_rows=rows), "inner": "eager"})
    with pytest.raises(Exception, match=r"block model\.layers\.1\.mlp.*null-expert router rows has shape \(2, 32\)"):
        compiled(token_ids(1, 5), use_cache=False)


def test_learned_policies_run_end_to_end():
    model = tiny_model("mixtral")
    torch.manual_seed(0)
    allocator = Allocator(weights={f"model.layers.{i}.mlp": torch.randn(64, 2) for i in range(2)})
    null = NullExperts(k=2, router_rows={f"model.layers.{i}.mlp": torch.randn(3, 64) * 0.5 for i in range(2)})
    ids = token_ids(2, 11)
    for policy, reachable in ((allocator, {1, 2}), (null, {0, 1, 2})):
        torch._dynamo.reset()
        reset_stats()
        fast = torch.compile(model, backend="adaptive_moe", options={"policy": policy, "inner": "eager", "stats": True})
        with torch.no_grad():
            out = fast(ids, use_cache=False).logits
        assert torch.isfinite(out).all()
        stats = moepass.report(fast).stats()
        for block_stats in stats.values():
            used = {k for k, n in enumerate(block_stats.tokens_per_k) if n}
            assert used <= reachable and len(used) > 1


def test_a_layers_key_that_names_no_block_is_an_error_listing_the_blocks():
    from conftest import Recorder, token_ids

    from moepass.zoo import tiny_model

    typo = TopP(p=0.4, layers={"model.layer.0.mlp": {"p": 0.5}})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info, torch.no_grad():
        torch.compile(tiny_model("mixtral"), backend=Recorder(policy=typo))(token_ids(1, 5), use_cache=False)
    assert isinstance(info.value.inner_exception, PolicyError)
    message = str(info.value.inner_exception)
    assert "'model.layer.0.mlp'" in message and "model.layers.0.mlp, model.layers.1.mlp" in message
    # the right path, or a layer index, is accepted
    for key in ("model.layers.0.mlp", "1"):
        torch._dynamo.reset()
        rec = Recorder(policy=TopP(p=0.4, layers={key: {"p": 0.5}}))
        with torch.no_grad():
            torch.compile(tiny_model("mixtral"), backend=rec)(token_ids(1, 5), use_cache=False)
        assert all(b.rewritten for b in rec.reports[0])
