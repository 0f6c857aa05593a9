"""Quantized expert stores: int4 experts read from disk run bit for bit as in memory, for a fraction of the bytes;
HOBBIT's lower-precision copies on low-weight misses; mismatched stores refused."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

import moepass
from moepass import bundled
from moepass.cli.main import main
from moepass.exports.expert_store import write_model_store
from moepass.runtime.offload import close_all


@pytest.fixture(autouse=True)
def _close_sessions():
    yield
    close_all()


@pytest.fixture(scope="module")
def prompt():
    return bundled.heldout_batches(seq_len=12, max_tokens=12, batch_size=1, check=False)[0]


@pytest.fixture(scope="module")
def int4_store(tmp_path_factory):
    """An int4 g64 store with int4 g128 low-precision copies, written by the command line."""
    out = tmp_path_factory.mktemp("quantized") / "experts"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["offload", "--model", "bundled", "--out", str(out), "--experts-dtype", "int4", "--group-size", "64",
                     "--low-dtype", "int4", "--low-group-size", "128"])
    assert code == 0 and "int4 g64 experts" in printed.getvalue() and "with int4 copies" in printed.getvalue()
    return out


_in_memory: dict[int, list[torch.Tensor]] = {}


def _in_memory_int4(group: int, prompt) -> list[torch.Tensor]:
    if group not in _in_memory:
        _in_memory[group] = _run({"experts_dtype": "int4", "group_size": group}, prompt)[0]
    return _in_memory[group]


def _run(options, prompt, steps=2):
    compiled = torch.compile(bundled.load_model(), backend="adaptive_moe", options={"inner": "eager", **options})
    with torch.no_grad():
        logits = [compiled(prompt, use_cache=False).logits]
        logits += [compiled(prompt[:, i : i + 1], use_cache=False).logits for i in range(steps)]
    return logits, compiled


def test_int4_store_runs_as_the_in_memory_int4_model_reading_a_fraction_of_the_bytes(int4_store, prompt, tmp_path):
    expected = _in_memory_int4(64, prompt)
    got, compiled = _run({"offload": {"store": str(int4_store), "cache": "none", "prefetch": False}}, prompt)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    report = moepass.report(compiled)
    assert all("experts int4 g64 asymmetric from the store" in " ".join(b.notes) for b in report.rewritten)
    stats = report.offload.stats()
    per_miss = sum(s.bytes_read for s in stats) / sum(s.misses for s in stats)
    float_store = tmp_path / "float"
    manifest, _ = write_model_store(bundled.load_model(), {"input_ids": prompt, "use_cache": False}, float_store)
    assert manifest.blocks[0].stride / per_miss >= 6  # float32 experts: 8 bytes per int4 byte, minus scales
    assert sum(s.low_loads for s in stats) == 0  # HOBBIT is off unless asked


def test_low_weight_misses_read_the_lower_precision_copy(int4_store, prompt):
    """With every routing weight below the bar and no cache, every expert comes from the int4 g128 copy:
    the model is then the in-memory int4 g128 one."""
    options = {"offload": {"store": str(int4_store), "cache": "none", "prefetch": False, "low_precision_below": 1.0}}
    got, compiled = _run(options, prompt)
    expected = _in_memory_int4(128, prompt)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max())) for a, b in zip(got, expected))
    stats = moepass.report(compiled).offload.stats()
    assert sum(s.low_loads for s in stats) > 0 and sum(s.misses for s in stats) == 0
    g64 = _in_memory_int4(64, prompt)
    assert not torch.allclose(got[0], g64[0], rtol=0, atol=1e-4 * float(g64[0].abs().max()))


def test_mismatched_quantization_is_refused_naming_both(int4_store, prompt, tmp_path):
    failed = torch._dynamo.exc.BackendCompilerFailed  # the backend's OffloadError, as torch.compile raises it
    with pytest.raises(failed, match="int8 per-channel experts and the store .* int4 g64"):
        _run({"experts_dtype": "int8", "offload": str(int4_store)}, prompt)
    float_store = tmp_path / "float"
    write_model_store(bundled.load_model(), {"input_ids": prompt, "use_cache": False}, float_store)
    with pytest.raises(failed, match="has none: write it with `moepass offload --low-dtype int4`"):
        _run({"offload": {"store": str(float_store), "low_precision_below": 0.2}}, prompt)
