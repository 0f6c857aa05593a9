"""The demo's steps on the bundled model, at small sizes."""

from __future__ import annotations

import pytest
import torch

from moepass import bundled
from moepass.bundled import demo
from moepass.policies import Static


@pytest.fixture(scope="module")
def model_and_batch():
    model = bundled.load_model()
    batch = bundled.heldout_batches(seq_len=64, max_tokens=128, batch_size=2)[0]
    return model, batch


def test_compile_and_report(model_and_batch):
    model, batch = model_and_batch
    report, error = demo.compile_and_report(model, batch)
    assert error <= 1e-5
    assert [b.path for b in report.rewritten] == [f"model.layers.{i}.mlp" for i in range(4)]


def test_quality_table(model_and_batch):
    model, _ = model_and_batch
    config = demo.DemoConfig(eval_tokens=512, seq_len=64, batch_size=4, policies=("static", "sensitivity"))
    header, rows, results = demo.quality_table(model, config)
    assert header[0] == "policy" and [r[0] for r in rows] == ["static", "sensitivity"]
    static, adaptive = results
    assert static.average_k == 2.0 and adaptive.average_k < 2.0
    assert adaptive.flops_ratio < 1.0 and torch.isfinite(torch.tensor(adaptive.nll))


def test_write_inspection(model_and_batch, tmp_path):
    model, batch = model_and_batch
    target = demo.write_inspection(model, batch[:1], bundled.load_policy("skip_ratio"), tmp_path / "out")
    page = (target / "index.html").read_text()
    assert "model.layers.3.mlp" in page and "skip_ratio" in page


@pytest.mark.inductor
def test_speed_table(model_and_batch):
    model, batch = model_and_batch
    rows = demo.speed_table(model, batch, Static())
    assert [r[0] for r in rows][0].startswith("transformers eager") and len(rows) == 3
    assert all(float(r[1]) > 0 for r in rows)
