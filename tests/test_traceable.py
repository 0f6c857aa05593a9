"""moepass.make_traceable: graph-breaking experts loops replaced by moepass ops, only where it is exact."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import rel_err

import moepass
from moepass.compiler import traceable
from moepass.zoo.discovery import tiny_family_model
from moepass.zoo.survey import family_inputs


def _experts_of(model, class_name):
    return [(path, m) for path, m in model.named_modules() if type(m).__name__ == class_name]


def _step37(**overrides):
    """A tiny Step 3.7 whose experts are transformers' Python loop (``experts_implementation="eager"``)."""
    return tiny_family_model("step3p7", experts_implementation="eager", **overrides)


@pytest.mark.parametrize("clamped", [False, True], ids=["plain", "clamped"])
def test_step37_experts_loop_is_made_traceable_and_rewritten_whole(clamped):
    """Both of Step 3.7's layer forms: plain, and clamped (stepfun-ai/Step-3.7-Flash's layers 43-44), whose
    activation make_traceable carries as a lifted program."""
    overrides = {"text_config.swiglu_limits": [0.0, 7.0]} if clamped else {}
    reference, model = _step37(**overrides), _step37(**overrides)
    changed = moepass.make_traceable(model)
    assert changed == [path for path, _ in _experts_of(model, "Step3p7Experts")] and len(changed) == 2
    assert not changed.left
    specs = [getattr(m, traceable.MARK) for _, m in _experts_of(model, "Step3p7Experts")]
    assert [s.activation for s in specs] == (["silu", "lifted"] if clamped else ["silu", "silu"])
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


def test_make_traceable_is_a_no_op_where_the_experts_are_already_traceable():
    """transformers >= 5.25 dispatches Step 3.7's experts through experts_implementation (grouped_mm by default)."""
    model = tiny_family_model("step3p7")
    if traceable._experts_implementation(_experts_of(model, "Step3p7Experts")[0][1]) is None:
        pytest.skip("this transformers' Step 3.7 experts are always a Python loop")
    result = moepass.make_traceable(model)
    assert result == [] and len(result.already) == 2 and not result.left


def _swap_class(module, **members):
    """Give ``module`` a class of the same name with ``members`` changed (a new transformers release)."""
    module.__class__ = type(type(module).__name__, (type(module),), members)


def _longcat_loop():
    overrides = {}
    from transformers.models.longcat_flash import modeling_longcat_flash

    if hasattr(modeling_longcat_flash.LongcatFlashExperts.forward, "__wrapped__"):
        overrides["experts_implementation"] = "eager"
    return tiny_family_model("longcat_flash", **overrides)


def _output(result):
    """A causal LM's logits, or an encoder's last hidden state."""
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state


def _left_alone(model, path, caplog, expected_reason):
    inputs = family_inputs(model, 7)
    with torch.no_grad():
        expected = _output(model(**inputs))
        with caplog.at_level(logging.WARNING, logger="moepass.compiler.traceable"):
            result = moepass.make_traceable(model)
        assert rel_err(_output(model(**inputs)), expected) <= 1e-5  # the other layers may be made traceable
    assert "forward" not in vars(model.get_submodule(path))  # this one is exactly as it was
    assert path not in result and expected_reason in result.left[path], result.left
    assert f"left {path}" in caplog.text and expected_reason in caplog.text
    return result


def test_a_renamed_attribute_leaves_the_module_as_it_was(caplog):
    model = _longcat_loop()
    experts = model.model.layers[1].mlp.experts
    original = type(experts).forward

    def forward(self, hidden_states, top_k_index, top_k_weights):  # the same function, reading gate_up
        self.gate_up_proj = self.gate_up
        try:
            return original(self, hidden_states, top_k_index, top_k_weights)
        finally:
            del self.gate_up_proj

    experts.gate_up = experts.gate_up_proj
    del experts.gate_up_proj
    _swap_class(experts, forward=forward)
    result = _left_alone(model, "model.layers.1.mlp.experts", caplog, "no attribute 'gate_up_proj'")
    assert result == ["model.layers.0.mlp.experts"]  # the other layer is unaffected


def test_an_extra_forward_argument_leaves_the_module_as_it_was(caplog):
    model = _longcat_loop()
    experts = model.model.layers[0].mlp.experts
    original = type(experts).forward

    def forward(self, hidden_states, top_k_index, top_k_weights, expert_scale=None):
        return original(self, hidden_states, top_k_index, top_k_weights)

    _swap_class(experts, forward=forward)
    _left_alone(model, "model.layers.0.mlp.experts", caplog, "its forward takes (hidden_states, top_k_index, "
                "top_k_weights, expert_scale)")


def test_ids_remapped_inside_the_experts_leave_the_module_as_it_was(caplog):
    """An experts module that remaps its ids (as LongCat's block does from 5.25) computes another function."""
    model = _longcat_loop()
    experts = model.model.layers[0].mlp.experts
    original = type(experts).forward
    num_experts = experts.gate_up_proj.shape[0]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return original(self, hidden_states, (top_k_index + 1) % num_experts, top_k_weights)

    _swap_class(experts, forward=forward)
    _left_alone(model, "model.layers.0.mlp.experts", caplog, "differs from its own forward")


def test_a_module_whose_moepass_form_differs_is_left_as_it_was(monkeypatch, caplog):
    """The check make_traceable runs on every module: a wrong adapter cannot change the model."""
    model = _longcat_loop()
    inputs = family_inputs(model, 7)
    with torch.no_grad():
        expected = model(**inputs).logits
    monkeypatch.setattr(traceable, "_activation_name", lambda act_fn: "relu")  # the model's experts use silu
    with caplog.at_level(logging.WARNING, logger="moepass.compiler.traceable"):
        assert moepass.make_traceable(model) == []
    assert "differs from its own forward" in caplog.text
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def _privacy_filter():
    """A tiny OpenAI Privacy Filter (its encoder): its experts default to transformers' eager loop (the model picks it)."""
    return tiny_family_model("openai_privacy_filter")


def test_privacy_filter_experts_loop_is_made_traceable_and_rewritten_whole():
    """The model runs its experts in float32 in a Python loop that graph-breaks (its own default); made
    traceable, each block is one graph and rewritten whole, exact under static and adaptive under top-p."""
    reference, model = _privacy_filter(), _privacy_filter()
    changed = moepass.make_traceable(model)
    assert changed == [path for path, _ in _experts_of(model, "OpenAIPrivacyFilterExperts")] and len(changed) == 2
    assert not changed.left
    spec = getattr(model.get_submodule(changed[0]), traceable.MARK)
    assert (spec.activation, spec.gate_up_layout, spec.transposed, spec.has_bias) == ("swiglu_clamp", "concat", True, True)
    inputs = family_inputs(model, 9)
    with torch.no_grad():
        expected = reference(**inputs).last_hidden_state
        assert rel_err(model(**inputs).last_hidden_state, expected) <= 1e-5
        for policy in ({"policy": "static"}, {"policy": "top_p", "p": 0.3}):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", **policy})
            actual = compiled(**inputs).last_hidden_state
            report = moepass.report(compiled)
            assert report.graphs == 1 and [b.rewritten for b in report.blocks] == [True, True]
            assert [b.dispatch for b in report.blocks] == ["moepass_op", "moepass_op"]
            if policy["policy"] == "static":
                assert rel_err(actual, expected) <= 1e-5
            else:
                assert rel_err(actual, expected) > 1e-4  # the policy dropped slots: the experts are moepass's


def test_privacy_filter_experts_with_a_renamed_bias_are_left_as_they_were(caplog):
    model = _privacy_filter()
    experts = model.layers[1].mlp.experts
    original = type(experts).forward

    def forward(self, hidden_states, router_indices=None, routing_weights=None):  # the same function, renamed bias
        self.down_proj_bias = self.down_bias
        try:
            return original(self, hidden_states, router_indices, routing_weights)
        finally:
            del self.down_proj_bias

    experts.down_bias = experts.down_proj_bias
    del experts.down_proj_bias
    _swap_class(experts, forward=forward)
    result = _left_alone(model, "layers.1.mlp.experts", caplog, "no attribute 'down_proj_bias'")
    assert result == ["layers.0.mlp.experts"]
