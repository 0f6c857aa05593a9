"""Quantized experts: the packed layout, the CPU kernels against the dequantized reference, the backend stage.

The reference of a quantized block is the *dequantized reference*: the same
codes dequantized to float32 and run by the float experts op.  Every lowering
must match it to round-off (≤ 1e-5 relative in float32); and it must NOT match
the float model's own experts (the quantization error is real), or a stage
that silently kept the float weights would pass.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, token_ids
from transformers import MixtralConfig, MixtralForCausalLM

import moepass
from moepass.compiler.spec import ExpertsSpec
from moepass.lowering.cpu_quantized import dequantize_expert, to_aten_cpu
from moepass.quantize import QuantizeError, QuantScheme, dequantize, parse_scheme, quantize_rtn
from moepass.quantize.layout import pack_int4, unpack_int4
from moepass.runtime.ops import ExpertsConfig
from moepass.runtime.quantized_ops import QuantizedExpertsConfig
from moepass.runtime.stats import count_gemm_rows

SCHEMES = {
    "int8": QuantScheme(8, 0),
    "int4g32": QuantScheme(4, 32, symmetric=False),
    "int4g64sym": QuantScheme(4, 64, symmetric=True),
}


# --- the layout ------------------------------------------------------------------------------


def test_int4_packing_round_trips_and_puts_even_columns_in_the_low_nibble():
    codes = torch.randint(0, 16, (3, 5, 8), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, 4) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))
    assert int(packed[0, 0, 0]) == int(codes[0, 0, 0]) | (int(codes[0, 0, 1]) << 4)


@pytest.mark.parametrize("name", SCHEMES)
def test_round_to_nearest_is_within_half_a_step_and_keeps_zeros(name):
    scheme = SCHEMES[name]
    weight = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(1))
    weight[0, 3] = 0.0  # a row of zeros stays exactly zero
    layout = quantize_rtn(weight, scheme)
    back = dequantize(layout)
    step = layout.scales.repeat_interleave(layout.group, dim=-1)
    assert ((back - weight).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(back[0, 3], torch.zeros(128))
    codes = layout.integer_codes()
    low, high = (-127, 127) if scheme.bits == 8 else (0, 15)
    assert codes.min() >= low and codes.max() <= high
    assert layout.nbytes() < weight.numel() * 4 / (3 if scheme.bits == 8 else 6)


def test_transposed_weights_quantize_along_their_input_features():
    weight = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(2))  # [E, in, out]
    layout = quantize_rtn(weight, SCHEMES["int4g32"], transposed=True)
    assert layout.shape == (2, 32, 64)
    assert rel_err(dequantize(layout), weight.transpose(1, 2)) < 0.1


def test_scheme_choices_are_checked_with_clear_errors():
    assert parse_scheme(None) is None
    assert parse_scheme("int8") == QuantScheme(8, 0)
    assert parse_scheme("int4").group_size == 64
    assert parse_scheme("int4", 32) == QuantScheme(4, 32, symmetric=False)
    with pytest.raises(QuantizeError, match="unknown experts_dtype 'int3'"):
        parse_scheme("int3")
    with pytest.raises(QuantizeError, match="int4 group_size must be one of 32, 64, 128, 256"):
        parse_scheme("int4", 48)
    with pytest.raises(QuantizeError, match="per output channel"):
        parse_scheme("int8", 32)
    with pytest.raises(QuantizeError, match="needs experts_dtype"):
        parse_scheme(None, 32)
    with pytest.raises(QuantizeError, match="do not split into groups of 64"):
        quantize_rtn(torch.randn(1, 4, 96), QuantScheme(4, 64))


def test_backend_options_name_the_problem():
    parse = moepass.BackendOptions.parse
    assert parse({"experts_dtype": "int4", "group_size": 32}).quantize == QuantScheme(4, 32, symmetric=False)
    with pytest.raises(moepass.OptionsError, match="group_size must be one of"):
        parse({"experts_dtype": "int4", "group_size": 100})
    with pytest.raises(moepass.OptionsError, match="'experts_float' must be 'keep' or 'release'"):
        parse({"experts_dtype": "int8", "experts_float": "drop"})
    with pytest.raises(moepass.OptionsError, match="needs experts_dtype"):
        parse({"experts_float": "release"})
    with pytest.raises(moepass.OptionsError, match="cpu lowering"):
        parse({"experts_dtype": "int8", "lowering": "triton"})


# --- the op against the dequantized reference ----------------------------------------------------


def _spec(num_experts, hidden, inter, gated=True, bias=False):
    return ExpertsSpec(dispatch="grouped_mm", num_experts=num_experts, hidden_size=hidden, intermediate_size=inter,
                       activation="silu", gated=gated, gate_up_layout="concat" if gated else "none", has_bias=bias)


def _problem(tokens, num_experts=8, hidden=64, inter=64, depth=2, gated=True, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    n1 = 2 * inter if gated else inter
    w1 = torch.randn(num_experts, n1, hidden, generator=generator) * 0.1
    w2 = torch.randn(num_experts, hidden, inter, generator=generator) * 0.1
    b1 = torch.randn(num_experts, n1, generator=generator) if bias else None
    b2 = torch.randn(num_experts, hidden, generator=generator) if bias else None
    x = torch.randn(tokens, hidden, generator=generator)
    ids = torch.stack([torch.randperm(num_experts, generator=generator)[:depth] for _ in range(tokens)])
    weights = torch.rand(tokens, depth, generator=generator)
    ids[0, -1], weights[0, -1] = num_experts, 0.0  # an empty slot
    return _spec(num_experts, hidden, inter, gated, bias), x, ids, weights, w1, w2, b1, b2


def _operands(layout, form, dtype=torch.float32):
    return list(layout.tensors().values()) if form == "plain" else to_aten_cpu(layout, dtype)


@pytest.mark.parametrize("tokens", [1, 33])
@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("form", ["aten_cpu", "plain"])
def test_cpu_lowering_matches_the_dequantized_reference(tokens, name, form):
    scheme = SCHEMES[name]
    spec, x, ids, weights, w1, w2, b1, b2 = _problem(tokens, bias=(tokens == 33), gated=(name != "int8"))
    layouts = quantize_rtn(w1, scheme), quantize_rtn(w2, scheme)
    config = QuantizedExpertsConfig(ExpertsConfig(spec=spec, lowering="cpu"), scheme, form).to_json()
    with count_gemm_rows() as rows:
        out = torch.ops.moepass.quantized_experts(x, ids, weights, *(_operands(q, form) for q in layouts), b1, b2, config)
    reference_config = ExpertsConfig(spec=spec, lowering="reference").to_json()
    dequantized = torch.ops.moepass.experts(x, ids, weights, *(dequantize(q) for q in layouts), b1, b2, reference_config)
    float_out = torch.ops.moepass.experts(x, ids, weights, w1, w2, b1, b2, reference_config)
    assert rel_err(out, dequantized) <= 1e-5
    assert rel_err(out, float_out) > 1e-4  # the codes, not the float weights, ran
    assert sum(rows) == int((ids < spec.num_experts).sum())  # one row per kept slot, none for the empty one
    assert len(rows) == len(set(ids[ids < spec.num_experts].tolist()))  # one GEMM pair per expert hit


@pytest.mark.parametrize("name", ["int8", "int4g32"])
def test_aten_form_reads_back_to_the_plain_codes(name):
    scheme = SCHEMES[name]
    layout = quantize_rtn(torch.randn(3, 48, 64, generator=torch.Generator().manual_seed(3)), scheme)
    aten = to_aten_cpu(layout, torch.float32)
    for expert in range(3):
        assert rel_err(dequantize_expert(aten, "aten_cpu", scheme, expert, torch.float32), dequantize(layout)[expert]) <= 1e-6


def test_bfloat16_activations_match_the_reference_to_bfloat16_round_off():
    scheme = SCHEMES["int4g32"]
    spec, x, ids, weights, w1, w2, _, _ = _problem(17)
    layouts = quantize_rtn(w1, scheme), quantize_rtn(w2, scheme)
    config = QuantizedExpertsConfig(ExpertsConfig(spec=spec), scheme, "aten_cpu").to_json()
    out = torch.ops.moepass.quantized_experts(
        x.bfloat16(), ids, weights, *(to_aten_cpu(q, torch.bfloat16) for q in layouts), None, None, config
    )
    reference = torch.ops.moepass.experts(x, ids, weights, *(dequantize(q) for q in layouts), None, None,
                                          ExpertsConfig(spec=spec, lowering="reference").to_json())
    assert out.dtype == torch.bfloat16 and rel_err(out, reference) < 3e-2


def test_gradients_reach_tokens_routing_weights_and_biases_not_the_codes():
    scheme = SCHEMES["int4g32"]
    spec, x, ids, weights, w1, w2, b1, b2 = _problem(6, bias=True)
    layouts = quantize_rtn(w1, scheme), quantize_rtn(w2, scheme)
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, b1, b2)]
    config = QuantizedExpertsConfig(ExpertsConfig(spec=spec), scheme, "aten_cpu").to_json()
    out = torch.ops.moepass.quantized_experts(leaves[0], ids, leaves[1], *(to_aten_cpu(q, torch.float32) for q in layouts),
                                              leaves[2], leaves[3], config)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    reference_leaves = [t.clone().requires_grad_(True) for t in (x, weights, b1, b2)]
    expected_out = torch.ops.moepass.experts(
        reference_leaves[0], ids, reference_leaves[1], *(dequantize(q) for q in layouts), reference_leaves[2],
        reference_leaves[3], ExpertsConfig(spec=spec, lowering="reference").to_json(),
    )
    expected = torch.autograd.grad(expected_out, reference_leaves, grad_out)
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-5
    unused = sorted(set(range(8)) - set(ids.flatten().tolist()))
    assert unused and got[2][unused].abs().max() == 0  # experts no slot reached get no bias gradient


# --- the backend: quantize stage -------------------------------------------------------------------


def _tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


def _dequantized_copy(model, scheme):
    """The eager reference: the model with each expert weight replaced by its dequantized codes."""
    reference = _tiny_mixtral()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in reference.model.layers:
            experts = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(experts, name)
                weight.copy_(dequantize(quantize_rtn(weight, scheme)))
    return reference


def test_compiled_model_equals_the_eager_model_on_dequantized_experts(recorder):
    model, scheme = _tiny_mixtral(), parse_scheme("int4", 32)
    backend = recorder(experts_dtype="int4", group_size=32)
    compiled = torch.compile(model, backend=backend)
    reference = _dequantized_copy(model, scheme)
    with torch.no_grad():
        for length in (5, 9):  # a recompile for the new length reuses the codes
            ids = token_ids(2, length)
            out = compiled(ids).logits
            assert rel_err(out, reference(ids).logits) <= 1e-5
            assert rel_err(out, model(ids).logits) > 1e-4  # float experts would not differ
    ops = backend.ops()
    assert ops.count("moepass::quantized_experts") == 2 * len(backend.graphs) and "moepass::experts" not in ops
    notes = [note for block in backend.reports[0] for note in block.notes]
    # float32 activations run the plain layout (ATen's weight-only kernels are scalar in float32)
    assert sum(f"experts {scheme.describe()} (plain)" in n and "float weights kept" in n for n in notes) == 2
    assert model.model.layers[0].mlp.experts.gate_up_proj.untyped_storage().nbytes() > 0


def test_bfloat16_model_runs_the_aten_kernels(recorder):
    model, scheme = _tiny_mixtral().to(torch.bfloat16), parse_scheme("int8")
    backend = recorder(experts_dtype="int8")
    reference = _dequantized_copy(model.float(), scheme).to(torch.bfloat16)
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(token_ids(1, 6)).logits
        assert rel_err(out, reference(token_ids(1, 6)).logits) < 3e-2
    notes = [note for block in backend.reports[0] for note in block.notes]
    assert sum("experts int8 per-channel (aten_cpu)" in n for n in notes) == 2


def test_released_float_weights_free_their_memory_and_recompile():
    model = _tiny_mixtral()
    reference = _dequantized_copy(model, parse_scheme("int8"))
    compiled = torch.compile(model, backend="adaptive_moe",
                             options={"inner": "eager", "experts_dtype": "int8", "experts_float": "release"})
    with torch.no_grad():
        first = compiled(token_ids(1, 6)).logits
        experts = model.model.layers[1].mlp.experts
        assert experts.gate_up_proj.untyped_storage().nbytes() == 0 and experts.down_proj.shape == (8, 64, 64)
        second = compiled(token_ids(1, 11)).logits  # a recompile validates on the dequantized codes
        assert rel_err(first, reference(token_ids(1, 6)).logits) <= 1e-5
        assert rel_err(second, reference(token_ids(1, 11)).logits) <= 1e-5
    assert "float weights released" in " ".join(moepass.report(compiled).block("model.layers.0.mlp").notes)


def test_blocks_whose_widths_the_groups_do_not_divide_keep_float_experts(recorder):
    model = _tiny_mixtral()  # hidden 64: groups of 128 do not fit
    backend = recorder(experts_dtype="int4", group_size=128)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(token_ids(1, 5)).logits
        assert rel_err(out, model(token_ids(1, 5)).logits) <= 1e-5
    assert "moepass::quantized_experts" not in backend.ops()
    notes = [note for block in backend.reports[0] for note in block.notes]
    assert any("experts not quantized" in n and "groups of 128" in n for n in notes)


def test_grad_mode_trains_everything_but_the_frozen_experts():
    """In grad mode the router, attention and norms get the eager model's gradients (on dequantized experts);
    the experts' float weights get none."""
    model, scheme = _tiny_mixtral(), parse_scheme("int4", 32)
    reference = _dequantized_copy(model, scheme)
    compiled = torch.compile(model, backend="adaptive_moe",
                             options={"inner": "aot_eager", "experts_dtype": "int4", "group_size": 32})
    ids = token_ids(2, 7)
    compiled(ids).logits.square().mean().backward()
    reference(ids).logits.square().mean().backward()
    checked = 0
    for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
        if "experts" in name:
            assert param.grad is None, name
        else:
            assert rel_err(param.grad, ref.grad) <= 1e-5, name
            checked += 1
    assert checked > 10
    assert "frozen" in " ".join(moepass.report(compiled).block("model.layers.0.mlp").notes)


def test_kernel_choice_is_measured_per_machine_and_followed(tmp_path, monkeypatch):
    """On first use the quantize stage measures ATen's kernel against dequantize + GEMM per row count
    (family cpu_quantized of the machine-keyed tables); the op then runs what won, and a second lookup
    measures nothing."""
    from moepass.lowering import cpu_quantized
    from moepass.lowering.cpu_quantized_tuning import prepare_projection
    from moepass.runtime import tuning

    monkeypatch.setenv("MOEPASS_CACHE_DIR", str(tmp_path))
    tuning.forget_measured()
    scheme = SCHEMES["int4g32"]
    layout = quantize_rtn(torch.randn(2, 64, 64), scheme)
    timed = []

    def timer(label, names):  # ATen wins up to 4 rows, dequantizing from 16
        timed.append(label)
        assert sorted(names) == ["aten_cpu:aten", "aten_cpu:dequant"]  # the native kernel is not asked for
        rows = int(label.split()[-1])
        return {"aten_cpu:aten": 1e-3 * rows, "aten_cpu:dequant": 1e-3 * (8 + rows / 4)}

    with tuning.measurement_override(timer):
        assert prepare_projection(scheme, layout, torch.bfloat16, ["aten_cpu"], 30.0, "test")[1] == "measured now"
        assert prepare_projection(scheme, layout, torch.bfloat16, ["aten_cpu"], 30.0, "test")[1] != "measured now"
    assert len(timed) == 5  # the rows of one measurement; the second call found the table
    chosen = [cpu_quantized.choose_quantized_kernel(scheme, "aten_cpu", r, 64, 64, torch.bfloat16) for r in (1, 4, 15, 16, 999)]
    assert chosen == ["aten", "aten", "aten", "dequant", "dequant"]
    found = prepare_projection(scheme, layout, torch.bfloat16, ["aten_cpu"], "off", "test")
    assert found[1] == "measured earlier in this process"
    assert found[0]["kernels"] == {"aten_cpu": {"1": "aten", "4": "aten", "16": "dequant", "64": "dequant", "256": "dequant"}}
    tuning.forget_measured()
