"""JetMoE's MLP mixture through ``moepass.make_traceable``.

``JetMoeTopKGating`` turns its per-expert counts into Python ints
(``.tolist()``) and ``JetMoeParallelExperts`` splits rows by them: dynamo
graph-breaks there, so the backend never sees router and experts together.
make_traceable replaces the MLP block's (and its router's) forward with the
same computation on ``moepass.experts``; the mixture of attention is left as it
was and stays reported as a graph break.
"""

from __future__ import annotations

import types

import torch
from conftest import gradients_after_backward, rel_err, traceable_and_reference
from reference_routing import Router, route_token

import moepass
from moepass.compiler.dataflow import op_name
from moepass.zoo.discovery import tiny_family_model
from moepass.zoo.survey import family_inputs

MLP_BLOCKS = ["model.layers.0.mlp", "model.layers.1.mlp"]


def _jetmoe(seed=0):
    return tiny_family_model("jetmoe", seed=seed)


def test_make_traceable_keeps_the_function_and_the_router_logits():
    reference = _jetmoe()
    model = _jetmoe()
    inputs = family_inputs(model, 9)
    with torch.no_grad():
        expected = reference(**inputs, output_router_logits=True)
        assert moepass.make_traceable(model) == MLP_BLOCKS
        assert moepass.make_traceable(model) == []
        actual = model(**inputs, output_router_logits=True)
    assert rel_err(actual.logits, expected.logits) <= 1e-5
    # router_logits are recorded from every JetMoeTopKGating (MoA and MoE): same count, same values
    assert len(actual.router_logits) == len(expected.router_logits) == 4
    assert all(rel_err(a, e) <= 1e-6 for a, e in zip(actual.router_logits, expected.router_logits))
    assert rel_err(actual.aux_loss, expected.aux_loss) <= 1e-6
    for layer in model.model.layers:  # the mixture of attention keeps its own code
        assert "forward" not in vars(layer.self_attention.experts.router)
        assert "forward" in vars(layer.mlp) and "forward" in vars(layer.mlp.router)


def test_jetmoe_mlp_blocks_are_rewritten_and_the_attention_mixture_is_reported():
    reference, model, compiled, inputs = traceable_and_reference(_jetmoe, 13)
    with torch.no_grad():
        actual = compiled(**inputs).logits
        expected = reference(**inputs).logits
    assert rel_err(actual, expected) <= 1e-5
    report = moepass.report(compiled)
    rewritten = {b.path: b for b in report.blocks if b.rewritten}
    assert sorted(rewritten) == MLP_BLOCKS
    for block in rewritten.values():
        assert block.dispatch == "moepass_op"
        assert block.spec.router.kind == "topk_softmax" and block.spec.router.top_k == 2
        assert block.spec.experts.gated and block.spec.experts.activation == "silu"
        ops = [op_name(n) for n in block.graph_after.nodes if n.op == "call_function"]
        assert {"moepass::route", "moepass::experts"} <= set(ops)
    attention = [b for b in report.blocks if not b.rewritten]
    assert [b.path for b in attention] == [f"model.layers.{i}.self_attention.experts" for i in (0, 1)]
    assert all(b.reason_code == "graph_break" and "mixture-of-attention" in b.reason for b in attention)


def _per_token_mlp(rule: str, params: dict):
    """JetMoeMoE's forward written per token: the reference rule picks experts, then the gated MLPs and the bias."""

    def forward(self, layer_input):
        batch, length, width = layer_input.shape
        x = layer_input.reshape(-1, width)
        logits = self.router.layer(x).float()
        router = Router("topk_softmax", self.router.num_experts, self.router.top_k)
        inter = self.hidden_size
        out = torch.zeros_like(x)
        for t, row in enumerate(logits.tolist()):
            ids, weights, _ = route_token(row, router, rule, params, k_min=1)
            for e, w in zip(ids, weights):
                if e >= router.num_experts:
                    continue
                h = self.input_linear.weight[e] @ x[t]
                h = self.activation(h[:inter]) * h[inter:]
                out[t] += w * (self.output_linear.weight[e] @ h)
        return out.view(batch, length, width) + self.bias

    return forward


def test_jetmoe_adaptive_policy_equals_a_per_token_reference():
    """top_p on the whole rewritten block against JetMoE's routing and experts written per token.

    The router-only rewrite does not apply to JetMoE (its router graph-breaks
    inside itself, after the sorting), so the reference is a plain loop.
    """
    inputs = family_inputs(_jetmoe(), 11)
    reference = _jetmoe()
    for layer in reference.model.layers:
        layer.mlp.forward = types.MethodType(_per_token_mlp("top_p", {"p": 0.5}), layer.mlp)
    model = _jetmoe()
    moepass.make_traceable(model)
    compiled = torch.compile(model, backend="adaptive_moe", options={"policy": "top_p", "p": 0.5, "inner": "eager"})
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = compiled(**inputs).logits
        static = model(**inputs).logits
    assert [b.dispatch for b in moepass.report(compiled).rewritten] == ["moepass_op", "moepass_op"]
    assert rel_err(actual, expected) <= 1e-5
    assert rel_err(actual, static) > 1e-4  # the policy did drop slots


def test_make_traceable_leaves_a_jetmoe_block_whose_weights_do_not_fit_as_it_was_and_says_why():
    model = _jetmoe()
    first = model.model.layers[1].mlp.input_linear
    first.weight = torch.nn.Parameter(first.weight[:, :-1].detach().clone())
    result = moepass.make_traceable(model)
    assert result == ["model.layers.0.mlp"]
    assert "input_linear.weight (8, 63, 64)" in result.left["model.layers.1.mlp"]
    assert "forward" not in vars(model.model.layers[1].mlp) and "forward" not in vars(model.model.layers[1].mlp.router)


def test_jetmoe_gradients_through_the_rewrite_equal_eager():
    reference, model, compiled, inputs = traceable_and_reference(_jetmoe, 7)
    checked = set()
    for name, grad, expected in gradients_after_backward(model, compiled, reference, inputs):
        assert rel_err(grad, expected) <= 1e-5, name
        if ".mlp." in name:
            checked.add(name.split(".mlp.")[1])
    # the experts' weights, the router's and the block's bias all get their gradients
    assert {"input_linear.weight", "output_linear.weight", "router.layer.weight", "bias"} <= checked
    assert [b.path for b in moepass.report(compiled).rewritten] == MLP_BLOCKS
