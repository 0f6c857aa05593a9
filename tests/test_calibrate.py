"""Calibration fits each training-free policy to a compute target."""

from __future__ import annotations

import pytest
import torch

import moepass
from moepass.policies import PolicyError
from moepass.runtime.calibrate import average_k, record_router_logits
from moepass.zoo import tiny_model


@pytest.fixture(scope="module")
def model_and_batches():
    model = tiny_model("mixtral")
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return model, batches


@pytest.mark.parametrize("policy", ["threshold", "top_p", "skip_ratio", "sensitivity"])
def test_calibration_hits_the_target(model_and_batches, policy):
    model, batches = model_and_batches
    fitted = moepass.calibrate(model, batches, policy, target_avg_k=1.5, show_progress=False)
    assert fitted.name == policy
    records = record_router_logits(model, batches, show_progress=False)
    assert set(records) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert average_k(fitted, records) == pytest.approx(1.5, abs=0.05)


def test_flops_budget_and_defaults(model_and_batches):
    model, batches = model_and_batches
    records = record_router_logits(model, batches, show_progress=False)
    fitted = moepass.calibrate(model, batches, "top_p", flops_budget=0.8, show_progress=False)
    assert average_k(fitted, records) == pytest.approx(1.6, abs=0.05)
    median = moepass.calibrate(model, batches, "skip_ratio", show_progress=False)
    # the per-layer median drops the second expert of about half the tokens
    assert average_k(median, records) == pytest.approx(1.5, abs=0.05)
    sens = moepass.calibrate(model, batches, "sensitivity", show_progress=False)
    assert set(sens.sensitivity) == set(records) and all(v > 0 for v in sens.sensitivity.values())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"policy": "allocator"}, "calibrate() fits"),
        ({"policy": "top_p", "target_avg_k": 3.0}, "target_avg_k must be in (0, 2]"),
        ({"policy": "top_p", "flops_budget": 1.5}, "flops_budget must be in (0, 1]"),
        ({"policy": "top_p", "target_avg_k": 1.5, "flops_budget": 0.7}, "not both"),
    ],
)
def test_calibration_errors(model_and_batches, kwargs, message):
    model, batches = model_and_batches
    with pytest.raises(PolicyError) as info:
        moepass.calibrate(model, batches, show_progress=False, **kwargs)
    assert message in str(info.value)


def test_calibration_needs_an_moe():
    with pytest.raises(PolicyError, match="no MoE block"):
        moepass.calibrate(tiny_model("llama"), [torch.randint(0, 128, (1, 8))], "top_p", show_progress=False)


def test_calibrate_command_writes_a_loadable_policy(tmp_path):
    from moepass.cli.main import main
    from moepass.policies import load_policy

    out = tmp_path / "calib"
    code = main(["calibrate", "--model", "zoo:mixtral", "--policy", "skip_ratio", "--target-avg-k", "1.6",
                 "--out", str(out), "--batches", "2", "--tokens", "16", "--k-max", "2"])
    assert code == 0
    policy = load_policy(out)
    assert policy.name == "skip_ratio" and policy.k_max == 2 and set(policy.beta) == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_calibrate_command_rejects_bad_input(tmp_path, capsys):
    from moepass.cli.main import main

    assert main(["calibrate", "--model", "zoo:mixtral", "--policy", "allocator", "--out", str(tmp_path)]) == 2
    assert "--policy must be one of threshold, top_p, sensitivity, skip_ratio" in capsys.readouterr().err
    assert main(["calibrate", "--model", "nope.json", "--policy", "top_p", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
