"""Bad backend options fail at compile time with a message that lists what is valid."""

from __future__ import annotations

import pytest
import torch
from conftest import token_ids

from moepass.compiler.options import BackendOptions, OptionsError
from moepass.policies import Static
from moepass.zoo import tiny_model


@pytest.mark.parametrize(
    "options,message",
    [
        ({"polcy": "static"}, "unknown option(s) 'polcy'"),
        ({"policy": "nope"}, "unknown policy 'nope'; valid policies: "),
        ({"inner": "tvm"}, "unknown inner compiler 'tvm'; valid: inductor, aot_eager, eager"),
        ({"lowering": "cuda"}, "unknown lowering 'cuda'; valid: auto, cpu, triton, reference"),
        ({"validate": "yes"}, "option 'validate' must be True or False"),
        ({"policy": 3}, "option 'policy' must be a policy name or a Policy object"),
        ({"policy": Static(), "p": 0.3}, "a policy object carries its own parameters"),
        ({"cpu_prepack": "always"}, "option 'cpu_prepack' must be one of auto, on, off (or True / False)"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(OptionsError) as info:
        BackendOptions.parse(options)
    assert message in str(info.value)


def test_valid_options_are_listed():
    with pytest.raises(OptionsError) as info:
        BackendOptions.parse({"typo": 1})
    for key in ("policy", "inner", "lowering", "validate", "stats"):
        assert key in str(info.value)


def test_defaults():
    options = BackendOptions.parse(None)
    assert (options.policy.name, options.inner, options.lowering, options.validate) == ("static", "inductor", "auto", True)


def test_bad_options_surface_through_torch_compile():
    model = tiny_model("mixtral")
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "nope"})
    with pytest.raises(Exception, match="unknown inner compiler 'nope'"):
        compiled(token_ids(1, 4), use_cache=False)


def test_cpu_prepack_reaches_the_experts_config():
    assert BackendOptions.parse({}).cpu_prepack == "auto"
    assert BackendOptions.parse({"cpu_prepack": False}).cpu_prepack == "off"
    assert BackendOptions.parse({"cpu_prepack": True}).cpu_prepack == "on"
    model = tiny_model("mixtral")
    fast = torch.compile(model, backend="adaptive_moe", options={"cpu_prepack": "off", "inner": "eager"})
    configs = []
    from moepass.runtime import ops

    original = ops.parse_experts_config

    def spy(text):
        configs.append(original(text))
        return configs[-1]

    ops.parse_experts_config = spy
    try:
        with torch.no_grad():
            fast(token_ids(1, 4, seed=0))
    finally:
        ops.parse_experts_config = original
    assert configs and all(c.cpu_prepack == "off" for c in configs)
