"""Expert offloading end to end on the bundled model: same outputs as in memory, weights freed, errors named."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import moepass
from moepass import bundled
from moepass.exports.expert_store import write_model_store
from moepass.runtime.offload import OffloadError, close_all, is_released, release_experts
from moepass.runtime.offload.session import lookup
from moepass.runtime.offload.store import ExpertStoreError, open_store

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _close_sessions():
    yield
    close_all()


@pytest.fixture(scope="module")
def prompt():
    return bundled.heldout_batches(seq_len=16, max_tokens=16, batch_size=1, check=False)[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, prompt):
    out = tmp_path_factory.mktemp("offload") / "experts"
    manifest, skipped = write_model_store(bundled.load_model(), {"input_ids": prompt, "use_cache": False}, out)
    assert skipped == [] and manifest.paths == [f"model.layers.{i}.mlp" for i in range(4)]
    return out


def _policy(name):
    return bundled.load_policy("sensitivity") if name == "sensitivity" else name


def _decode(model, options, prompt, steps=4):
    """The prompt at once, then ``steps`` of its bytes one by one (two graphs); every call's logits.

    Single-token calls route like decode steps (one token, k experts per
    layer), which is where caching and prefetch matter.
    """
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", **options})
    with torch.no_grad():
        logits = [compiled(prompt, use_cache=False).logits]
        for step in range(steps):
            logits.append(compiled(prompt[:, step : step + 1], use_cache=False).logits)
    return logits, compiled


_references: dict[str, tuple[list[torch.Tensor], int]] = {}


def _reference(policy, prompt):
    if policy not in _references:
        torch._dynamo.utils.counters.clear()
        logits, _ = _decode(bundled.load_model(), {"policy": _policy(policy)}, prompt)
        _references[policy] = (logits, torch._dynamo.utils.counters["stats"]["unique_graphs"])
        torch._dynamo.reset()
    return _references[policy]


def _experts(model):
    return [getattr(layer.mlp.experts, name) for layer in model.model.layers for name in EXPERT_PARAMS]


@pytest.mark.parametrize(
    "policy, offload",
    [
        ("static", {"cache": "lru", "slots": 6, "prefetch": False}),
        ("static", {"cache": "allocated", "slots": 6, "prefetch": True, "profile_calls": 2}),
        ("sensitivity", {"cache": "allocated", "slots": 6, "prefetch": False, "profile_calls": 2}),
        ("sensitivity", {"cache": "lru", "slots": 6, "prefetch": True}),
    ],
    ids=["static-lru", "static-allocated-prefetch", "adaptive-allocated", "adaptive-lru-prefetch"],
)
def test_offloaded_decode_equals_in_memory_bit_for_bit(store, prompt, policy, offload):
    reference, reference_graphs = _reference(policy, prompt)
    stride = open_store(store)[1].blocks[0].stride
    options = dict(offload)
    slots = options.pop("slots")
    model = bundled.load_model()
    params = _experts(model)
    torch._dynamo.utils.counters.clear()
    logits, compiled = _decode(model, {"policy": _policy(policy), "offload": {"store": str(store), "cache_bytes": slots * stride, **options}}, prompt)
    assert len(logits) == len(reference)
    for step, (got, want) in enumerate(zip(logits, reference)):
        assert torch.equal(got, want), f"step {step}: max diff {(got - want).abs().max():.3g}"
    # the weights are gone from memory, the objects (and dynamo's guards on them) stay: no extra recompile
    assert _experts(model) == params and all(is_released(p) for p in params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == reference_graphs
    report = moepass.report(compiled)
    assert all("experts offloaded" in "; ".join(b.notes) for b in report.blocks)
    text = str(report)
    assert "expert offloading: store" in text and text.count("model.layers.") >= 8
    session = report.offload
    stats = session.stats()
    assert sum(s.slots for s in stats) <= slots
    if options["cache"] == "allocated":
        assert session.allocation_source.startswith("allocated (DP on 2 calls")
    assert all(s.calls == 1 + 4 and s.tokens == prompt.shape[1] + 4 for s in stats)
    assert all(s.accesses > s.hits for s in stats)  # 8 experts, ≤ 6 slots: some loads had to wait
    assert sum(s.bytes_read for s in stats) >= sum(s.misses for s in stats) * stride > 0
    assert report.to_dict()["offload"]["layers"][0]["path"] == "model.layers.0.mlp"
    if offload["prefetch"]:  # results equal the in-memory model's whatever the timing; the thread stops
        assert sum(s.prefetch_loads for s in stats) > 0
        thread = f"moepass-prefetch-{session.key}"
        assert session.prefetcher.alive and any(t.name == thread for t in threading.enumerate())
        key = f"{session.key}|model.layers.0.mlp"
        close_all()
        assert session.closed and not any(t.name == thread for t in threading.enumerate())
        with pytest.raises(OffloadError, match="is closed"):
            lookup(key)


def test_experts_released_before_compiling_no_cache(store, prompt):
    reference, _ = _reference("sensitivity", prompt)
    model = bundled.load_model()
    freed = release_experts(model, store)
    assert freed == open_store(store)[1].nbytes and all(is_released(p) for p in _experts(model))
    options = {"policy": _policy("sensitivity"), "offload": {"store": str(store), "cache": "none", "prefetch": True}}
    logits, compiled = _decode(model, options, prompt)
    assert all(torch.equal(a, b) for a, b in zip(logits, reference))
    report = moepass.report(compiled)
    # validation still ran, on weights read back from the store
    assert all(b.rewritten and b.validation_error is not None and b.validation_error < 1e-5 for b in report.blocks)
    # no cache: each layer keeps k = 2 slots for the experts prefetched for it
    stats = report.offload.stats()
    assert all(s.slots == 2 for s in stats) and sum(s.prefetch_loads for s in stats) > 0


def test_a_store_of_other_weights_is_refused(store, prompt):
    model = bundled.load_model()
    with torch.no_grad():
        model.model.layers[2].mlp.experts.down_proj[5, 0, 0] += 1e-3
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "offload": str(store)})
    with pytest.raises(Exception, match=r"model\.layers\.2\.mlp: expert 5's weights in memory differ from the store"):
        with torch.no_grad():
            compiled(prompt, use_cache=False)
    assert not any(is_released(p) for p in _experts(model))


def test_offloading_is_inference_only(store, prompt):
    compiled = torch.compile(bundled.load_model(), backend="adaptive_moe", options={"inner": "eager", "offload": str(store)})
    with pytest.raises(Exception, match="inference-only"):
        compiled(prompt, use_cache=False)


def test_a_store_file_truncated_while_running_fails_with_its_name(store, prompt, tmp_path):
    import shutil

    copy = tmp_path / "experts"
    shutil.copytree(store, copy)
    manifest = open_store(copy)[1]
    compiled = torch.compile(
        bundled.load_model(), backend="adaptive_moe",
        options={"inner": "eager", "offload": {"store": str(copy), "cache_bytes": 0, "prefetch": False}},
    )
    with torch.no_grad():
        compiled(prompt, use_cache=False)
        block = manifest.blocks[1]
        os.truncate(copy / block.file, block.expert_offset(1))
        with pytest.raises(ExpertStoreError, match=rf"expert [1-7] of block model\.layers\.1\.mlp: store file .*{block.file} is truncated"):
            compiled(prompt, use_cache=False)
        (copy / block.file).unlink()
    with pytest.raises(Exception, match=rf"expert 0 of block model\.layers\.1\.mlp: store file .*{block.file} is missing"):
        compiled2 = torch.compile(bundled.load_model(), backend="adaptive_moe", options={"inner": "eager", "offload": str(copy)})
        with torch.no_grad():
            compiled2(prompt, use_cache=False)


def test_cli_writes_a_store(tmp_path, capsys):
    from moepass.cli.main import main

    out = tmp_path / "experts"
    assert main(["offload", "--model", "bundled", "--out", str(out), "--tokens", "8"]) == 0
    assert "wrote 4 blocks × 8 experts" in capsys.readouterr().out
    assert open_store(out)[1].paths == [f"model.layers.{i}.mlp" for i in range(4)]
    assert main(["offload", "--model", "bundled", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_other_expert_layouts_and_routers(tmp_path, family):
    """Biases, [E, in, out] weights and gpt-oss's clamped SwiGLU; DeepSeek's biased group router in prefetch."""
    from moepass.zoo import tiny_model

    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    write_model_store(tiny_model(family), {"input_ids": ids, "use_cache": False}, tmp_path / "experts")
    manifest = open_store(tmp_path / "experts")[1]
    assert family != "gpt_oss" or {t.name for t in manifest.blocks[0].tensors} == {"w1", "w2", "b1", "b2"}
    policy = {"policy": "top_p", "p": 0.5}
    reference, _ = _decode(tiny_model(family), policy, ids, steps=3)
    torch._dynamo.reset()
    model = tiny_model(family)
    offload = {"store": str(tmp_path / "experts"), "cache_bytes": 3 * manifest.blocks[0].stride, "cache": "lru",
               "prefetch": True}
    logits, compiled = _decode(model, {**policy, "offload": offload}, ids, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(logits, reference))
    stats = moepass.report(compiled).offload.stats()
    assert sum(s.prefetch_loads for s in stats) > 0 and all(s.accesses > 0 for s in stats)
    released = [p for n, p in model.named_parameters() if is_released(p)]
    assert len(released) == sum(len(b.tensors) for b in manifest.blocks)
