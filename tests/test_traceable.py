"""moepass.make_traceable: graph-breaking experts loops replaced by moepass ops, only where it is exact."""

from __future__ import annotations

import logging

import torch
from conftest import rel_err

import moepass
from moepass.compiler import traceable
from moepass.zoo.discovery import tiny_family_model
from moepass.zoo.survey import family_inputs


def _experts_of(model, class_name):
    return [(path, m) for path, m in model.named_modules() if type(m).__name__ == class_name]


def test_step37_experts_loop_is_made_traceable_and_rewritten_whole():
    reference = tiny_family_model("step3p7")
    model = tiny_family_model("step3p7")
    changed = moepass.make_traceable(model)
    assert changed == [path for path, _ in _experts_of(model, "Step3p7Experts")] and len(changed) == 2
    inputs = family_inputs(model, 9)
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "policy": "top_p", "p": 0.1})
    with torch.no_grad():
        expected = reference(**inputs).logits
        static = model(**inputs).logits
        adaptive = compiled(**inputs).logits
    assert rel_err(static, expected) <= 1e-5
    assert rel_err(adaptive, expected) > 1e-4  # the policy dropped slots: the experts are the backend's now
    report = moepass.report(compiled)
    assert [b.dispatch for b in report.blocks] == ["moepass_op", "moepass_op"]
    assert all(b.rewritten for b in report.blocks)


def test_a_clamped_step37_layer_is_left_as_it_was(caplog):
    model = tiny_family_model("step3p7")
    (first, clamped), (second, _) = _experts_of(model, "Step3p7Experts")
    clamped.limit = 7.0  # Step 3.7 clamps the experts of two layers: not a plain gated activation
    with caplog.at_level(logging.WARNING, logger="moepass.compiler.traceable"):
        assert moepass.make_traceable(model) == [second]
    assert "forward" not in vars(clamped) and f"left {first}" in caplog.text and "clamped at 7.0" in caplog.text


def test_a_module_whose_moepass_form_differs_is_left_as_it_was(monkeypatch, caplog):
    """The check make_traceable runs on every module: a wrong adapter cannot change the model."""
    model = tiny_family_model("longcat_flash")
    inputs = family_inputs(model, 7)
    with torch.no_grad():
        expected = model(**inputs).logits
    monkeypatch.setattr(traceable, "_activation_name", lambda act_fn: "relu")  # the model's experts use silu
    with caplog.at_level(logging.WARNING, logger="moepass.compiler.traceable"):
        assert moepass.make_traceable(model) == []
    assert "differs from its own forward" in caplog.text
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
