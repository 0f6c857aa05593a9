"""The bundled checkpoint, its policy artefacts and the evaluation harness on a small slice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moepass import bundled
from moepass.bundled import corpus
from moepass.bundled.evaluate import evaluate_eager, evaluate_policies, evaluate_policy, format_table
from moepass.bundled.train.routed import routed_policy
from moepass.policies import Allocator, NullExperts, Sensitivity, SkipRatio, Static, TopP

DATA = Path(bundled.__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def model():
    return bundled.load_model()


@pytest.fixture(scope="module")
def info():
    return bundled.training_info()


@pytest.fixture(scope="module")
def batches(info):
    if info["corpus"]["heldout"]["python"].rsplit(".", 1)[0] != bundled.python_version().rsplit(".", 1)[0]:
        pytest.skip(f"the bundled split was recorded on Python {info['corpus']['heldout']['python']}")
    # 2 batches of 4 windows of 128 bytes, evenly spaced over the held-out files
    return bundled.heldout_batches(seq_len=128, max_tokens=1024, batch_size=4)


def test_checkpoint_loads_as_a_transformers_mixtral(model, info):
    from transformers import MixtralForCausalLM

    assert isinstance(model, MixtralForCausalLM) and not model.training
    config = model.config
    assert (config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok) == (4, 8, 2)
    assert config.vocab_size == corpus.VOCAB_SIZE
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the recorded command reproduces it; the model beats the unigram baseline clearly
    results = info["results"]
    assert info["command"].startswith("python examples/train_bundled.py")
    assert results["heldout_nats_per_byte"] < 0.75 * results["unigram_nats_per_byte"]


def test_bundled_data_stays_small():
    total = sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file())
    assert total < 15 * 2**20, f"moepass/bundled/data holds {total / 2**20:.1f} MiB"
    assert (bundled.BUNDLED_DIR / "model.safetensors").stat().st_size < 10.5 * 2**20


def test_tokenizer_files_encode_bytes_as_the_model_reads_them(model):
    """tokenizer.json gives id = byte value (and 256 for the boundary), as moepass.bundled.corpus.encode does."""
    import json

    from tokenizers import Tokenizer

    from moepass.bundled.train.tokenizer import tokenizer_files

    for name, content in tokenizer_files().items():  # the shipped files are what the recipe writes
        assert json.loads((bundled.BUNDLED_DIR / name).read_text(encoding="utf-8")) == content
    tokenizer = Tokenizer.from_file(str(bundled.BUNDLED_DIR / "tokenizer.json"))
    text = "def f(x):\n\treturn x  # é, 中, \x00\x7f"
    ids = tokenizer.encode(text).ids
    assert ids == bundled.encode(text).tolist() and len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.token_to_id("<|file|>") == corpus.BOUNDARY == model.config.eos_token_id
    assert model.name_or_path == str(bundled.BUNDLED_DIR)  # tools find the files beside the checkpoint


def test_heldout_split_matches_the_recorded_fingerprint(info):
    recorded = info["corpus"]["heldout"]
    if recorded["python"] != bundled.python_version():
        pytest.skip(f"fingerprint recorded on Python {recorded['python']}")
    current = bundled.check_corpus("heldout")
    assert (current.files, current.bytes, current.sha256) == (recorded["files"], recorded["bytes"], recorded["sha256"])


def test_a_different_stdlib_is_a_clear_error(monkeypatch, info):
    changed = dict(info)
    changed["corpus"] = {"heldout": dict(info["corpus"]["heldout"], sha256="0" * 64, python="3.99.0")}
    monkeypatch.setattr(bundled, "training_info", lambda directory=None: changed)
    with pytest.raises(bundled.CorpusDriftError, match="differs from the one the bundled model was trained on"):
        bundled.check_corpus("heldout")


def test_batches_are_deterministic(batches):
    again = bundled.heldout_batches(seq_len=128, max_tokens=1024, batch_size=4)
    assert len(batches) == 2 and all(torch.equal(a, b) for a, b in zip(batches, again))
    assert batches[0].shape == (4, 128) and batches[0].dtype == torch.int64
    train = bundled.train_batches(seq_len=64, max_batches=2, batch_size=3, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(train, bundled.train_batches(seq_len=64, max_batches=2, batch_size=3, seed=7)))


@pytest.mark.parametrize(
    "name, cls",
    [("ada_k", Allocator), ("null_experts", NullExperts), ("sensitivity", Sensitivity), ("skip_ratio", SkipRatio)],
)
def test_bundled_policies_load_and_fit_the_model(model, name, cls):
    assert name in bundled.policy_names()
    policy = bundled.load_policy(name)
    assert isinstance(policy, cls)
    paths = {f"model.layers.{i}.mlp" for i in range(4)}
    if cls is Allocator:
        assert set(policy.weights) == paths
        assert all(w.shape[0] == model.config.hidden_size and w.shape[1] >= 2 for w in policy.weights.values())
    if cls is NullExperts:
        assert set(policy.router_rows) == paths and policy.k > model.config.num_experts_per_tok
        overlay = bundled.overlay_path(name)
        assert overlay is not None
        from safetensors.torch import load_file

        changed = load_file(str(overlay))
        names = dict(model.named_parameters())
        bases = {n.rsplit(".", 1)[0] if n.endswith((".lora_A", ".lora_B")) else n for n in changed}
        assert bases and bases <= set(names)
        assert any(n.endswith(".lora_B") for n in changed)  # experts: low-rank factors, not full weights
        assert overlay.stat().st_size < 0.1 * (bundled.BUNDLED_DIR / "model.safetensors").stat().st_size
        tuned = dict(bundled.load_model(overlay=overlay).named_parameters())
        for base in bases:
            assert not torch.equal(tuned[base], names[base]), base
    if cls is Sensitivity:
        assert set(policy.sensitivity) == paths and all(v > 0 for v in policy.sensitivity.values())
    if cls is SkipRatio:
        assert set(policy.beta) == paths and all(0 < v < 1 for v in policy.beta.values())


def test_static_policy_reproduces_eager_perplexity(model, batches):
    eager = evaluate_eager(model, batches)
    static = evaluate_policy(model, Static(), batches)
    assert static.average_k == 2.0 and static.flops_ratio == 1.0
    assert static.tokens == eager.tokens > 1000
    assert static.nll == pytest.approx(eager.nll, rel=1e-6, abs=1e-7)
    assert static.accuracy == eager.accuracy
    assert math.isfinite(static.perplexity) and 1.0 < static.perplexity < corpus.VOCAB_SIZE


def test_adaptive_policies_use_fewer_experts(model, batches):
    runs = [("top_p", TopP(p=0.4)), bundled.policy_run("ada_k")]
    results = evaluate_policies(model, runs, batches, show_progress=False)
    static, top_p, ada_k = results
    assert static.label == "static" and static.perplexity_change == 0.0
    for r in (top_p, ada_k):
        assert r.average_k < 2.0 and r.flops_ratio < 1.0
        assert math.isfinite(r.nll) and 0.0 <= r.accuracy <= 1.0
        assert set(r.layer_k) == {f"model.layers.{i}.mlp" for i in range(4)}
    header, rows = format_table(results)
    assert len(rows) == 3 and len(rows[0]) == len(header)


def test_eager_routed_allocator_matches_compiled(model, batches):
    policy = bundled.load_policy("ada_k")
    ids = batches[0][:2, :64]
    with torch.no_grad():
        with routed_policy(model, policy):
            eager = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, backend="adaptive_moe", options={"policy": policy, "inner": "eager"})
        torch.testing.assert_close(compiled(input_ids=ids, use_cache=False).logits, eager, rtol=1e-4, atol=1e-4)


def test_eval_command(capsys, batches):
    from moepass.cli.main import main

    assert main(["eval", "static", "threshold:T=0.2", "--tokens", "512", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "threshold | T=0.2" in out and "static" in out
