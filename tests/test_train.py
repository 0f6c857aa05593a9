"""The training code on tiny budgets: LM training, the routed forward, Ada-K PPO, AdaMoE."""

from __future__ import annotations

import pytest
import torch

from moepass.bundled import corpus
from moepass.bundled.train.adak import AdaKConfig, ppo, pseudo_labels, warm_start
from moepass.bundled.train.adamoe import AdaMoEConfig, finetune_null_experts, null_balance_loss, tiled_null_rows
from moepass.bundled.train.lm import ModelShape, TrainConfig, build_model, next_byte_loss, train_lm, unigram_nats
from moepass.bundled.train.routed import moe_layers, routed, routed_policy
from moepass.policies import Allocator, NullExperts, TopP

TINY = ModelShape(hidden=32, intermediate=32, layers=2, heads=2, kv_heads=2, experts=4, top_k=2, max_positions=128)


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    """A small, repetitive byte stream: tiny models learn it in a few steps."""
    text = b"def add(a, b):\n    return a + b\n\n" * 40 + b"class Point:\n    x: int = 0\n" * 40
    return torch.cat([torch.tensor([corpus.BOUNDARY]), corpus.encode(text)])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(TINY, seed=0).eval()


def test_corpus_split_is_by_file_and_disjoint():
    files = corpus.split_files()
    train = {f.path for f in files["train"]}
    heldout = {f.path for f in files["heldout"]}
    assert train and heldout and not train & heldout
    assert all(corpus.is_heldout(p) for p in heldout) and not any(corpus.is_heldout(p) for p in train)
    assert not any("/test/" in f"/{p}" or "site-packages" in p for p in train | heldout)
    # about HELDOUT_PERCENT of the files, by path hash
    assert 0.05 < len(heldout) / (len(train) + len(heldout)) < 0.15


def test_windows_are_deterministic_and_in_range(stream):
    spaced = corpus.spaced_windows(stream, 16, 160)
    assert spaced.shape == (10, 16) and torch.equal(spaced, corpus.spaced_windows(stream, 16, 160))
    assert torch.equal(spaced[0], stream[:16])
    a = corpus.random_windows(stream, 16, 4, torch.Generator().manual_seed(3))
    b = corpus.random_windows(stream, 16, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and int(a.max()) <= corpus.BOUNDARY
    assert corpus.decode(corpus.encode("héllo")) == "héllo"


def test_next_byte_loss_skips_boundary_targets():
    ids = torch.tensor([[corpus.BOUNDARY, 65, corpus.BOUNDARY, 66]])
    logits = torch.zeros(1, 4, corpus.VOCAB_SIZE)
    per_position = next_byte_loss(logits, ids, reduction="none")
    assert per_position[0, 1] == 0  # target BOUNDARY is not scored
    assert torch.allclose(next_byte_loss(logits, ids), torch.log(torch.tensor(float(corpus.VOCAB_SIZE))))


def test_train_lm_loss_goes_down_and_beats_unigram(stream):
    config = TrainConfig(shape=TINY, steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup=4, eval_tokens=512, eval_every=10)
    result = train_lm(config, train_stream=stream, heldout_stream=stream, show_progress=False)
    first, last = result.curve[0][1], result.curve[-1][1]
    assert last < first * 0.7, result.curve
    assert result.heldout_nats < unigram_nats(stream, stream)
    assert not result.model.training


def test_train_lm_is_deterministic(stream):
    config = TrainConfig(shape=TINY, steps=3, batch_size=2, seq_len=16, warmup=1, eval_tokens=64, eval_every=0)
    a = train_lm(config, train_stream=stream, heldout_stream=stream, show_progress=False).model.state_dict()
    b = train_lm(config, train_stream=stream, heldout_stream=stream, show_progress=False).model.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_routed_static_is_the_model(tiny_model, stream):
    ids = corpus.spaced_windows(stream, 24, 72)
    with torch.no_grad():
        expected = tiny_model(input_ids=ids, use_cache=False).logits
        with routed(tiny_model):
            actual = tiny_model(input_ids=ids, use_cache=False).logits
        one = lambda ctx: torch.ones(ctx.logits.shape[0], dtype=torch.long)  # noqa: E731
        with routed(tiny_model, [one, one], k_min=1, k_max=2):
            top1 = tiny_model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(top1, expected, atol=1e-4)
    # the original forward is back
    assert "forward" not in moe_layers(tiny_model)[0].module.__dict__


def test_routed_policy_matches_the_compiled_policy(tiny_model, stream):
    ids = corpus.spaced_windows(stream, 24, 48)
    policy = TopP(p=0.5)
    with torch.no_grad():
        with routed_policy(tiny_model, policy):
            eager = tiny_model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(tiny_model, backend="adaptive_moe", options={"policy": policy, "inner": "eager"})
        actual = compiled(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(actual, eager, rtol=1e-4, atol=1e-5)


def test_ada_k_warm_start_and_ppo_reduce_their_losses(tiny_model, stream):
    batches = [corpus.random_windows(stream, 32, 4, torch.Generator().manual_seed(i)) for i in range(2)]
    config = AdaKConfig(max_k=3, warm_p=0.4, warm_steps=40, warm_lr=5e-2, iterations=12, lr=5e-2, flops_penalty=0.5, epochs=2)
    labels = pseudo_labels(tiny_model, batches, config.warm_p, config.max_k)
    assert set(labels) == {layer.path for layer in moe_layers(tiny_model)}
    weights, warm_curve = warm_start(tiny_model, batches, config, show_progress=False)
    assert warm_curve[-1][1] < warm_curve[0][1], warm_curve  # cross-entropy to the pseudo-labels
    assert all(w.shape == (TINY.hidden, 3) for w in weights.values())

    generator = torch.Generator().manual_seed(5)
    windows = (corpus.random_windows(stream, 32, 4, generator) for _ in range(config.iterations))
    trained, curve = ppo(tiny_model, weights, windows, config, show_progress=False)
    assert len(curve) == config.iterations
    # with a large FLOPs penalty the PPO loss must bring the expected k down
    assert curve[-1][2] < curve[0][2] - 0.05, curve
    # the result is a working Allocator policy: the compiled model runs it
    policy = Allocator(weights=trained)
    with torch.no_grad():
        with routed_policy(tiny_model, policy):
            tiny_model(input_ids=batches[0], use_cache=False)


def test_null_balance_loss_is_minimal_when_balanced():
    uniform = [torch.zeros(64, 8)]
    # uniform probabilities over E+m = 8 columns: N * sum(f_i * P_i) = 8 * k * (1/8) ... = k
    assert float(null_balance_loss(uniform, num_experts=4, k=2)) == pytest.approx(2.0)
    skewed = torch.zeros(64, 8)
    skewed[:, 0] = 5.0
    assert float(null_balance_loss([skewed], num_experts=4, k=2)) > 2.0


@pytest.mark.parametrize("trainable", ["lora", "moe"])
def test_adamoe_finetune_lowers_the_loss_and_saves_only_changes(stream, trainable):
    from moepass.bundled import _apply_overlay

    model = build_model(TINY, seed=1)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    rows = tiled_null_rows(moe_layers(model)[0].module.gate.weight, 6, generator)
    assert rows.shape == (6, TINY.hidden)
    config = AdaMoEConfig(null_experts=4, k=3, steps=30, lr=1e-2, null_lr=1e-2, warmup=2, batch_size=8, seq_len=32, trainable=trainable)
    result = finetune_null_experts(model, config, train_stream=stream, show_progress=False)
    assert result.curve[-1][1] < result.curve[0][1], result.curve  # CE goes down
    assert 0.0 < result.curve[-1][3] <= 3.0  # average real k
    bases = {n.rsplit(".", 1)[0] if n.endswith((".lora_A", ".lora_B")) else n for n in result.changed}
    assert bases <= {n for n in original if ".mlp." in n}
    if trainable == "lora":
        assert any(n.endswith(".lora_B") for n in result.changed)
    # the overlay applied to the original weights gives the fine-tuned model
    state = dict(original)
    _apply_overlay(state, result.changed, "test", torch.float32)
    for name, param in model.named_parameters():
        torch.testing.assert_close(state[name], param.detach(), rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(state[n], original[n]) for n in bases)
    policy = result.policy()
    assert isinstance(policy, NullExperts) and policy.k == 3
    ids = corpus.spaced_windows(stream, 24, 48)
    with torch.no_grad():
        with routed_policy(model, policy):
            eager = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, backend="adaptive_moe", options={"policy": policy, "inner": "eager"})
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, eager, rtol=1e-4, atol=1e-5)
