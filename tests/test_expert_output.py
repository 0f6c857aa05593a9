"""Per-slot output functions: a norm each expert applies to its output before the routing weight.

Ergo normalises every slot's expert output (an RMSNorm in float32 with a scale
per expert, ``ErgoExpertNorm``) and Muse Spark likewise (a shared scale, then
an RMSNorm), before the routing weight multiplies it; Muse Spark also runs its
experts at a width of their own, between projections from and back to hidden.
The function is lifted from the graph into the experts spec
(``ExpertsSpec.output``) and run by ``moepass.expert_output`` on the rows the
experts op computes per slot, so every lowering and the split (autograd) form
run it, and a dropped slot still costs no GEMM row.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import gradients_after_backward, rel_err, traceable_and_reference
from reference_routing import Router, choose_k, route_token

import moepass
from moepass.compiler.dataflow import op_name
from moepass.compiler.lifted import ElementwiseProgram
from moepass.compiler.spec import ExpertsSpec
from moepass.runtime import stats
from moepass.runtime.ops import ExpertsConfig, experts_with_output
from moepass.zoo.discovery import tiny_family_model
from moepass.zoo.survey import family_inputs


def _ergo(seed=0):
    return tiny_family_model("ergo", seed=seed)


def _muse(seed=0):
    """A tiny Muse Spark whose shared post-expert scale is not all zeros (1 + w: not all ones)."""
    model = tiny_family_model("muse_spark", seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            norm = layer.mlp.experts.post_expert_norm
            norm.weight.copy_(torch.randn(norm.weight.shape, generator=generator) * 0.5)
    return model


def _ergo_block_reference(block, x, rule, params):
    """Ergo's MoE block per token in float64: the router (sigmoid, bias-corrected selection, renormalised,
    scaled) under the rule, each kept slot's expert output RMS-normalised times its expert's scale, weighted;
    plus the shared expert.  Returns (out, slots kept, min decision margin)."""
    gate, experts = block.gate, block.experts
    router = Router(
        "sigmoid_group_topk", experts.up_proj.shape[0], gate.top_k, renormalize=True, eps=1e-20,
        scale=gate.routed_scaling_factor, correction_bias=gate.e_score_correction_bias.tolist(),
    )
    logits = x.double() @ gate.linear.weight.double().T
    out, kept, margin = torch.zeros_like(x, dtype=torch.float64), 0, float("inf")
    for t in range(x.shape[0]):
        ids, weights, margins = route_token(logits[t].tolist(), router, rule, params, k_min=1)
        margin = min([margin] + [abs(m) for m in margins])
        for e, w in zip(ids, weights):
            if e >= router.num_experts:
                continue
            y = torch.relu(x[t].double() @ experts.up_proj[e].double()).square() @ experts.down_proj[e].double()
            out[t] += w * F.rms_norm(y, (y.shape[-1],), eps=experts.post_expert_norm.eps) * experts.post_expert_norm.weight[e].double()
            kept += 1
    return out + block.shared_experts(x).double(), kept, margin


def _muse_block_reference(block, x, rule, params):
    """Muse Spark's MoE block per token in float64: a lifted router (the logits scaled, sigmoid, bias-corrected
    selection, renormalised: the rule sees the model's top-k weights normalised, survivors rescaled to the
    model's total), experts at their own width after the block's projection and centred RMSNorm, each kept
    slot's output scaled then RMS-normalised, weighted, projected back."""
    gate, experts = block.gate, block.experts
    logits = (x.double() @ gate.weight.double().T) * gate.output_multiplier
    scores = torch.sigmoid(logits)
    choice = scores + gate.e_score_correction_bias.double()
    projected = x.double() @ block.pre_expert_proj.weight.double().T
    norm = block.pre_expert_norm
    latent = projected * torch.rsqrt(projected.square().mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight.double())
    post = experts.post_expert_norm
    out, kept, margin = torch.zeros_like(latent), 0, float("inf")
    for t in range(x.shape[0]):
        ranked = sorted(range(scores.shape[1]), key=lambda e: -float(choice[t, e]))
        margin = min(margin, float(choice[t, ranked[gate.top_k - 1]] - choice[t, ranked[gate.top_k]]))
        order = ranked[: gate.top_k]
        values = [float(scores[t, e]) for e in order]
        values = [v / (sum(values) + gate.norm_topk_prob_eps) * gate.routed_scaling_factor for v in values]
        probs = [v / sum(values) for v in values]
        k, margins = choose_k(rule, params, probs, None, None, (), gate.top_k)
        k = max(1, min(k, gate.top_k))
        margin = min([margin] + [abs(m) for m in margins])
        rescale = sum(values) / sum(values[:k])
        for e, w in zip(order[:k], values):
            g, u = (experts.gate_up_proj[e].double() @ latent[t]).chunk(2)
            y = (experts.down_proj[e].double() @ (F.silu(g) * u)) * (1 + post.weight.double())
            out[t] += w * rescale * y * torch.rsqrt(y.square().mean() + post.eps)
            kept += 1
    return out @ block.post_expert_proj.weight.double().T, kept, margin


@pytest.mark.parametrize("family", ["ergo", "muse_spark"])
def test_rewritten_whole_and_exact_with_the_output_function_in_the_spec(family):
    build = _ergo if family == "ergo" else _muse
    reference, model = build(), build()
    inputs = family_inputs(model, 13)
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
    with torch.no_grad():
        assert rel_err(compiled(**inputs).logits, reference(**inputs).logits) <= 1e-5
    report = moepass.report(compiled)
    assert [b.rewritten for b in report.blocks] == [True, True]
    for block in report.blocks:
        program = ElementwiseProgram.from_json(block.spec.experts.output)
        names = {op[0] for op in program.ops}
        if family == "ergo":  # a scale per expert, after an RMSNorm in float32
            assert {"rms_norm", "expert_tensor"} <= names
        else:  # a shared scale, then the norm written out (pow, mean, rsqrt), at the experts' own width
            assert {"tensor", "mean", "rsqrt"} <= names and "expert_tensor" not in names
            assert block.spec.experts.hidden_size == model.config.text_config.moe_hidden_size
        ops = [op_name(n) for n in block.graph_after.nodes if n.op == "call_function"]
        assert {"moepass::route", "moepass::experts", "moepass::expert_output"} <= set(ops)
        assert "transformers::grouped_mm_fallback" not in ops
        assert "output" in block.spec.experts.description


@pytest.mark.parametrize(
    "family,rule,params",
    [  # parameters that keep some tokens' second slot and drop others' on these tiny blocks
        ("ergo", "top_p", {"p": 0.2}),
        ("ergo", "threshold", {"T": 0.05}),
        ("muse_spark", "top_p", {"p": 0.52}),
        ("muse_spark", "threshold", {"T": 0.05}),
    ],
)
def test_block_under_a_policy_equals_a_per_token_reference(family, rule, params):
    """Each kept slot's row goes through its own expert's output function before its weight; dropped slots
    cost no GEMM row; statistics count slots per token, not per row."""
    if family == "ergo":
        block, reference = _ergo(seed=2).model.layers[0].mlp, _ergo_block_reference
    else:
        block, reference = _muse(seed=2).model.language_model.layers[0].mlp, _muse_block_reference
    tokens = 20
    hidden = block.gate.weight.shape[1] if family == "muse_spark" else block.gate.linear.weight.shape[1]
    x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, kept, margin = reference(block, x[0], rule, params)
        assert margin > 1e-5  # no token on a decision boundary
        compiled = torch.compile(block, backend="adaptive_moe", options={"policy": rule, **params, "inner": "eager",
                                                                       "stats": True})
        compiled(x)
        stats.reset_stats()
        with stats.count_gemm_rows() as rows:
            actual = compiled(x)
        static = block(x)
    assert [b.rewritten for b in moepass.report(compiled).blocks] == [True]
    assert rel_err(actual[0], expected) <= 1e-5
    assert rel_err(actual, static) > 1e-4  # the policy dropped slots
    assert sum(rows) == kept < tokens * block.gate.top_k
    (counted,) = stats.routing_stats().values()
    assert counted.tokens == tokens and sum(k * n for k, n in enumerate(counted.tokens_per_k)) == kept


@pytest.mark.parametrize("family", ["ergo", "muse_spark"])
def test_gradients_through_the_output_function_equal_eager(family):
    """Grad mode writes the experts in their split form; the output function and the weighted sum are plain
    ops: every gradient equals eager, the output function's scales included."""
    reference, model, compiled, inputs = traceable_and_reference(_ergo if family == "ergo" else _muse, 7)
    checked = set()
    for name, grad, expected in gradients_after_backward(model, compiled, reference, inputs):
        assert rel_err(grad, expected) <= 1e-5, name
        checked |= {part for part in ("post_expert_norm", "gate_up_proj", "up_proj", "down_proj") if part in name}
    assert "post_expert_norm" in checked and "down_proj" in checked
    report = moepass.report(compiled)
    assert all(b.rewritten for b in report.blocks) and report.blocks
    ops = {op_name(n) for b in report.blocks for n in b.graph_after.nodes if n.op == "call_function"}
    assert {"moepass::experts_up", "moepass::experts_down", "moepass::expert_output"} <= ops


def test_an_output_function_reading_another_experts_scale_is_left_as_it_was():
    """Validation draws the scales an output function reads at random: with Ergo's scales all ones (as
    initialised before training) a function that read a neighbour's row would pass a check on the real
    weights; it must not pass this one."""
    from transformers.models.ergo import modeling_ergo

    class ShiftedNorm(modeling_ergo.ErgoExpertNorm):
        def forward(self, hidden_states, expert_ids):
            normalized = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.eps)
            return (normalized * self.weight[(expert_ids + 1) % self.weight.shape[0]]).to(hidden_states.dtype)

    model = _ergo()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.post_expert_norm.__class__ = ShiftedNorm
            layer.mlp.experts.post_expert_norm.weight.fill_(1.0)
    reference = _ergo()
    reference.load_state_dict(model.state_dict())
    for layer in reference.model.layers:
        layer.mlp.experts.post_expert_norm.__class__ = ShiftedNorm
    inputs = family_inputs(model, 9)
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
    with torch.no_grad():
        assert rel_err(compiled(**inputs).logits, reference(**inputs).logits) <= 1e-5
    blocks = moepass.report(compiled).blocks
    assert blocks and all(not b.rewritten and b.reason_code == "validation_failed" for b in blocks), [
        b.reason for b in blocks
    ]


def _loop_reference(x, ids, weights, w1, w2, scales, eps):
    """Σ_slots w · rms_norm(relu(x W1[e])² W2[e]) · s[e], per slot in float64 (empty slots: nothing)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= w1.shape[0]:
                continue
            y = torch.relu(x[t].double() @ w1[e].double()).square() @ w2[e].double()
            out[t] += float(weights[t, j]) * F.rms_norm(y, (y.shape[-1],), eps=eps) * scales[e].double()
    return out


def _ergo_like_spec(num_experts, hidden, inter, eps, accumulate="float32"):
    """Ergo's experts in spec form: ReLU², then each slot's row cast to ``accumulate``, RMS-normalised, scaled by
    its expert's row of tensor 0."""
    program = ElementwiseProgram((
        ("input",), ("relu", ("v", 0)), ("square", ("v", 1)),
    ))
    output = ElementwiseProgram((
        ("input",), ("cast", ("v", 0), accumulate), ("rms_norm", ("v", 1), eps), ("expert_tensor", 0),
        ("mul", ("v", 2), ("v", 3)),
    ))
    return ExpertsSpec(
        dispatch="grouped_mm", num_experts=num_experts, hidden_size=hidden, intermediate_size=inter,
        activation="lifted", gated=False, gate_up_layout="none", transposed=True, program=program.to_json(),
        output=output.to_json(),
    )


@pytest.mark.parametrize("lowering", ["reference", "cpu"])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_every_lowering_runs_the_output_function_and_empty_slots_add_nothing(lowering, eps):
    """With eps = 0 an empty slot's zero row would normalise to NaN: it must add exactly nothing."""
    generator = torch.Generator().manual_seed(0)
    num_experts, hidden, inter, tokens, depth = 5, 12, 7, 9, 3
    x = torch.randn(tokens, hidden, generator=generator)
    ids = torch.randint(0, num_experts + 1, (tokens, depth), generator=generator)  # id E: an empty slot
    weights = torch.where(ids < num_experts, torch.rand(tokens, depth, generator=generator), 0.0)
    w1 = torch.randn(num_experts, hidden, inter, generator=generator)
    w2 = torch.randn(num_experts, inter, hidden, generator=generator)
    scales = torch.rand(num_experts, hidden, generator=generator) + 0.5
    config = ExpertsConfig(_ergo_like_spec(num_experts, hidden, inter, eps), lowering=lowering).to_json()
    out = experts_with_output(x, ids, weights, w1, w2, None, None, [scales], config)
    assert (ids == num_experts).any() and torch.isfinite(out).all()
    assert rel_err(out, _loop_reference(x, ids, weights, w1, w2, scales, eps)) <= 1e-5
    with pytest.raises(ValueError, match="per-slot output function"):
        torch.ops.moepass.experts(x, ids, weights, w1, w2, None, None, config)  # the rows alone are not the block


def test_the_split_form_differentiates_the_output_function():
    """gradcheck in float64 (the norm's cast too: a float32 cast would break the finite differences)."""
    generator = torch.Generator().manual_seed(1)
    num_experts, hidden, inter, tokens, depth = 4, 6, 5, 7, 2
    ids = torch.randint(0, num_experts + 1, (tokens, depth), generator=generator)
    leaves = [
        torch.randn(tokens, hidden, generator=generator, dtype=torch.float64),
        torch.rand(tokens, depth, generator=generator, dtype=torch.float64),
        torch.randn(num_experts, hidden, inter, generator=generator, dtype=torch.float64),
        torch.randn(num_experts, inter, hidden, generator=generator, dtype=torch.float64),
        torch.rand(num_experts, hidden, generator=generator, dtype=torch.float64) + 0.5,
    ]
    config = ExpertsConfig(_ergo_like_spec(num_experts, hidden, inter, 1e-6, "float64"), lowering="reference").to_json()

    def block(x, w, w1, w2, s):
        return experts_with_output(x, ids, w, w1, w2, None, None, [s], config, differentiable=True)

    assert torch.autograd.gradcheck(block, [t.requires_grad_(True) for t in leaves])


def test_exports_refuse_a_block_with_an_output_function_and_say_why(tmp_path):
    pytest.importorskip("onnxruntime")
    from moepass.exports.errors import OnnxExportError

    model = _ergo()
    example = (family_inputs(model, 7)["input_ids"],)
    path = tmp_path / "ergo.onnx"
    with pytest.raises(OnnxExportError, match="each slot's output before the routing weight"):
        moepass.export_onnx(model, example, str(path))
    assert not path.exists()


def test_mlir_export_refuses_a_block_with_an_output_function_and_says_why(tmp_path):
    pytest.importorskip("torch_mlir")
    pytest.importorskip("onnxscript")
    from moepass.exports.mlir import MlirExportError, export_mlir

    model = _muse()
    path = tmp_path / "muse.mlir"
    with pytest.raises(MlirExportError, match="each slot's output before the routing weight"):
        export_mlir(model, (family_inputs(model, 7)["input_ids"],), str(path))
    assert not path.exists()


def test_experts_dtype_leaves_experts_with_an_output_function_in_float_and_says_why():
    """The quantized experts op was never checked on per-slot rows: the block stays rewritten, its experts float."""
    reference, model = _ergo(), _ergo()
    inputs = family_inputs(model, 7)
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "experts_dtype": "int8"})
    with torch.no_grad():
        assert rel_err(compiled(**inputs).logits, reference(**inputs).logits) <= 1e-5
    blocks = moepass.report(compiled).blocks
    assert blocks and all(b.rewritten for b in blocks)
    for block in blocks:
        assert any("experts not quantized" in n and "per-expert output norm" in n for n in block.notes), block.notes
        ops = {op_name(n) for n in block.graph_after.nodes if n.op == "call_function"}
        assert "moepass::quantized_experts" not in ops and "moepass::experts" in ops
