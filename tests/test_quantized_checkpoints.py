"""Experts that arrive quantized: gpt-oss MXFP4 as stored, defused GPTQ/AWQ linears, torchao int8.

No checkpoint can be downloaded here, so each stored format is built from its
documented layout (``moepass/quantize/adapters.py``); where an independent
decoder exists (transformers' own MXFP4 dequantization) the reference comes
from it.  Each adapted model must match the model it came from (the float
model holding exactly the stored values, or the module's own quantized
forward) to round-off, eagerly and compiled.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import rel_err, token_ids
from transformers import GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM

import moepass
from moepass.quantize.adapters import AWQ_ORDER, from_torchao_int8
from moepass.quantize.layout import dequantize

# --- gpt-oss MXFP4 -------------------------------------------------------------------------------


def _mxfp4(experts, rows, columns, generator):
    blocks = torch.randint(0, 256, (experts, rows, columns // 32, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(118, 124, (experts, rows, columns // 32), dtype=torch.uint8, generator=generator)
    return blocks, scales


@pytest.fixture(scope="module")
def gpt_oss_mxfp4():
    """A tiny gpt-oss whose float experts are transformers' own dequantization of random MXFP4 blocks."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["full_attention"] * 2, max_position_embeddings=64)
    model = GptOssForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    checkpoint = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            experts, prefix = layer.mlp.experts, f"model.layers.{i}.mlp.experts"
            for name, rows, columns in (("gate_up_proj", 128, 64), ("down_proj", 64, 64)):
                blocks, scales = _mxfp4(4, rows, columns, generator)
                checkpoint[f"{prefix}.{name}_blocks"], checkpoint[f"{prefix}.{name}_scales"] = blocks, scales
                getattr(experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    return model, checkpoint


def test_mxfp4_blocks_run_exactly_as_stored(gpt_oss_mxfp4):
    float_model, checkpoint = gpt_oss_mxfp4
    model = GptOssForCausalLM(float_model.config).eval()
    model.load_state_dict(float_model.state_dict())
    model.config.quantization_config = {"quant_method": "mxfp4"}
    assert "config says mxfp4; the experts are float32" in str(moepass.adapt_quantized_experts(model)[0])
    results = moepass.adapt_quantized_experts(model, checkpoint=checkpoint)
    assert len(results) == 2 and all(r.adapted for r in results), results
    assert "MXFP4 blocks + E8M0 scales as stored" in results[0].found and "int8 g32" in results[0].action
    assert model.model.layers[0].mlp.experts.gate_up_proj.untyped_storage().nbytes() == 0  # the float copy is freed
    ids = token_ids(1, 7)
    with torch.no_grad():
        expected = float_model(ids).logits
        assert rel_err(model(ids).logits, expected) <= 1e-5  # eager: the codes through moepass.quantized_experts
        compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
        assert rel_err(compiled(ids).logits, expected) <= 1e-5
    notes = " ".join(n for b in moepass.report(compiled).rewritten for n in b.notes)
    assert "experts int8 g32 (plain) as the checkpoint stores them" in notes


def test_a_checkpoint_without_the_blocks_leaves_the_experts_and_says_why(gpt_oss_mxfp4):
    float_model, _ = gpt_oss_mxfp4
    model = GptOssForCausalLM(float_model.config).eval()
    results = moepass.adapt_quantized_experts(model, checkpoint={})
    assert results and not any(r.adapted for r in results)
    assert "the checkpoint given has no model.layers.0.mlp.experts.gate_up_proj_blocks" in results[0].action


# --- GPTQ / AWQ linears per expert (gptqmodel's defused experts) --------------------------------


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """[K, N] codes → int32 [K/8, N], eight along K per word, low bits first (GPTQ qweight)."""
    rows = codes.reshape(-1, 8, codes.shape[1]).to(torch.int64)
    return _int32(sum(rows[:, i] << (4 * i) for i in range(8)))


def _int32(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def _pack_columns(codes: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, C] codes → int32 [R, C/8]: nibble i of word j holds column 8j + order[i]."""
    grouped = codes.reshape(codes.shape[0], -1, 8).to(torch.int64)
    return _int32(sum(grouped[..., order[i]] << (4 * i) for i in range(8)))


class FakeQuantLinear(nn.Module):
    """A GPTQ (or AWQ) linear as gptqmodel / AutoAWQ store it, with a reference forward."""

    def __init__(self, in_features, out_features, group, generator, awq=False, v1=False, act_order=False):
        super().__init__()
        self.bits, self.group_size, self.awq, self.v1 = 4, group, awq, v1
        codes = torch.randint(0, 16, (in_features, out_features), generator=generator)
        zeros = torch.randint(1, 15, (in_features // group, out_features), generator=generator)
        self.register_buffer("scales", (torch.rand(in_features // group, out_features, generator=generator) * 0.02)
                             .to(torch.float16))
        if awq:
            self.register_buffer("qweight", _pack_columns(codes, AWQ_ORDER))
            self.register_buffer("qzeros", _pack_columns(zeros, AWQ_ORDER))
        else:
            self.register_buffer("qweight", _pack_rows(codes))
            self.register_buffer("qzeros", _pack_columns(zeros - 1 if v1 else zeros))
            g_idx = torch.arange(in_features) // group
            self.register_buffer("g_idx", g_idx[torch.randperm(in_features, generator=generator)] if act_order else g_idx)
        self._codes, self._zeros = codes, zeros

    def forward(self, x):
        weight = (self._codes - self._zeros.repeat_interleave(self.group_size, 0)) * \
            self.scales.float().repeat_interleave(self.group_size, 0)
        return F.linear(x, weight.t().to(x.dtype))


class FakeExpert(nn.Module):
    def __init__(self, hidden, inter, group, generator, **kind):
        super().__init__()
        self.gate_proj = FakeQuantLinear(hidden, inter, group, generator, **kind)
        self.up_proj = FakeQuantLinear(hidden, inter, group, generator, **kind)
        self.down_proj = FakeQuantLinear(inter, hidden, group, generator, **kind)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DefusedExperts(nn.ModuleList):
    """One module per expert, called like transformers' experts: (hidden_states, top_k_index, top_k_weights)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():  # the Python loop (and .tolist()) of a defused block
            token, slot = torch.where(top_k_index == expert)
            out.index_add_(0, token, self[expert](hidden_states[token]) * top_k_weights[token, slot, None])
        return out


def _mixtral_with_defused_experts(**kind):
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    model = MixtralForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        layer.mlp.experts = DefusedExperts([FakeExpert(64, 64, 32, generator, **kind) for _ in range(4)])
    return model


@pytest.mark.parametrize("kind", [{}, {"v1": True}, {"awq": True}], ids=["gptq", "gptq-v1-zeros", "awq"])
def test_defused_gptq_and_awq_experts_run_as_stored(kind):
    model = _mixtral_with_defused_experts(**kind)
    ids = token_ids(1, 6)
    with torch.no_grad():
        expected = model(ids).logits
    results = moepass.adapt_quantized_experts(model)
    assert len(results) == 2 and all(r.adapted for r in results), results
    assert ("AWQ" if kind.get("awq") else "GPTQ") + " 4-bit g32" in results[0].found
    assert "int4 g32 asymmetric" in results[0].action
    with torch.no_grad():
        assert rel_err(model(ids).logits, expected) <= 1e-5
        backend_options = {"inner": "eager", "policy": "static"}
        assert rel_err(torch.compile(model, backend="adaptive_moe", options=backend_options)(ids).logits, expected) <= 1e-5
    assert model.model.layers[0].mlp.experts[0].gate_proj.qweight.untyped_storage().nbytes() == 0  # released


def test_act_order_gptq_is_left_as_it_was_with_the_reason():
    model = _mixtral_with_defused_experts(act_order=True)
    results = moepass.adapt_quantized_experts(model)
    assert results and not any(r.adapted for r in results)
    assert "act-order GPTQ" in results[0].action
    assert model.model.layers[0].mlp.experts[0].gate_proj.qweight.untyped_storage().nbytes() > 0


# --- torchao int8 --------------------------------------------------------------------------------


def test_torchao_int8_format_reads_exactly():
    qdata = torch.randint(-127, 128, (2, 8, 32), dtype=torch.int8)
    scale = torch.rand(2, 8, 1)
    layout = from_torchao_int8(qdata, scale)
    assert torch.equal(dequantize(layout), qdata.float() * scale)
    with pytest.raises(moepass.quantize.QuantizeError, match="one per row"):
        from_torchao_int8(qdata, torch.rand(2, 8, 4))


def test_torchao_quantized_experts_run_as_stored():
    torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)
    model = MixtralForCausalLM(config).eval()
    names = {f"model.layers.0.mlp.experts.{n}": Int8WeightOnlyConfig() for n in ("gate_up_proj", "down_proj")}
    quantize_(model, FqnToConfig(names), filter_fn=None)
    experts = model.model.layers[0].mlp.experts
    reference = MixtralForCausalLM(config).eval()
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "experts" not in k}, strict=False)
    with torch.no_grad():
        reference.model.layers[0].mlp.experts.gate_up_proj.copy_(experts.gate_up_proj.dequantize())
        reference.model.layers[0].mlp.experts.down_proj.copy_(experts.down_proj.dequantize())
    results = moepass.adapt_quantized_experts(model)
    assert [r.adapted for r in results] == [True] and "torchao Int8Tensor" in results[0].found, results
    ids = token_ids(1, 6)
    with torch.no_grad():
        compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
        assert rel_err(compiled(ids).logits, reference(ids).logits) <= 1e-5
    del torchao
