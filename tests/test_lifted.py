"""Lifted activations: whatever elementwise math sits between the expert GEMMs is carried as a program.

Structure: the rewritten graph holds the moepass ops, the block's spec says
``lifted`` with the program (or the named form when the program computes
exactly that), and the original dispatch is gone.  Numbers: logits and
gradients against eager, on every lowering.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder, rel_err, token_ids

import moepass
from moepass.compiler.lifted import ElementwiseProgram, LiftError
from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.ops import ExpertsConfig
from moepass.zoo import tiny_model


def clamped_swiglu(self, gate_up):  # HY-V4: clamps on the concatenated layout, plain SiLU
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate.clamp(min=None, max=0.2)) * up.clamp(min=-0.2, max=0.2)


def softcapped_swiglu(self, gate_up):  # Inkling-2: tanh soft caps, computed in float32
    gate, up = gate_up.chunk(2, dim=-1)
    dtype = gate.dtype
    gate, up = gate.float(), up.float()
    return (0.5 * torch.tanh(gate / 0.5) * torch.sigmoid(gate) * (0.3 * torch.tanh(up / 0.3))).to(dtype)


def squared_relu_times_up(self, gate_up):  # ReLU² on the gate
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.relu(gate).pow(2) * up


def plain_silu(self, gate_up):  # the model's own form: must stay the fused named activation
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATIONS = {
    "clamped_swiglu": clamped_swiglu,
    "softcapped_swiglu": softcapped_swiglu,
    "squared_relu": squared_relu_times_up,
}


def _model(apply_gate, impl=None, dtype=torch.float32):
    model = tiny_model("mixtral", impl, dtype=dtype)
    for layer in model.model.layers:
        layer.mlp.experts._apply_gate = types.MethodType(apply_gate, layer.mlp.experts)
    return model


@pytest.mark.parametrize("impl", [None, "batched_mm"], ids=["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_lifted_activation_is_rewritten_exactly(name, impl):
    model = _model(ACTIVATIONS[name], impl)
    ids = token_ids(2, 9, seed=1)
    rec = Recorder()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        actual = torch.compile(model, backend=rec)(ids, use_cache=False).logits
    assert rel_err(actual, expected) <= 1e-5
    blocks = rec.reports[0]
    assert len(blocks) == 2 and all(b.rewritten for b in blocks), [b.reason for b in blocks]
    assert all(b.spec.experts.activation == "lifted" for b in blocks)
    ops = rec.ops()
    assert ops.count("moepass::experts") == 2
    assert not {"transformers::grouped_mm_fallback", "bmm", "chunk", "tanh"} & set(ops)


def test_the_models_own_form_stays_the_named_fused_activation():
    model = _model(plain_silu)
    rec = Recorder()
    with torch.no_grad():
        torch.compile(model, backend=rec)(token_ids(1, 5), use_cache=False)
    spec = rec.reports[0][0].spec.experts
    assert (spec.activation, spec.gated, spec.program) == ("silu", True, "")


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_lifted_activation_gradients_equal_eager(name):
    model = _model(ACTIVATIONS[name])
    ids = token_ids(2, 7, seed=2)
    model.zero_grad()
    model(ids, use_cache=False).logits.pow(2).mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    rec = Recorder()
    torch.compile(model, backend=rec)(ids, use_cache=False).logits.pow(2).mean().backward()
    assert "moepass::experts_up" in rec.ops()
    for n, p in model.named_parameters():
        if n in expected and expected[n].abs().max() > 0:
            assert rel_err(p.grad, expected[n]) <= 1e-5, n


def test_lifted_activation_in_bfloat16_keeps_the_models_float32_math():
    model = _model(softcapped_swiglu, dtype=torch.bfloat16)
    ids = token_ids(1, 8, seed=3)
    rec = Recorder()
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits.float()
        actual = torch.compile(model, backend=rec)(ids, use_cache=False).logits.float()
    assert all(b.rewritten for b in rec.reports[0])
    program = ElementwiseProgram.from_json(rec.reports[0][0].spec.experts.program)
    assert any(op[0] == "cast" and op[2] == "float32" for op in program.ops)
    assert rel_err(actual, expected) <= 2e-2


# --- the program itself -------------------------------------------------------


def test_program_round_trips_and_rejects_unknown_ops():
    program = ElementwiseProgram((("input",), ("slice", ("v", 0), 0, 4, 1), ("tanh", ("v", 1)), ("mul", ("v", 2), 3.0)))
    again = ElementwiseProgram.from_json(program.to_json())
    assert again == program
    x = torch.randn(3, 8)
    assert torch.allclose(again(x), torch.tanh(x[:, :4]) * 3.0)
    assert torch.allclose(again(x.t().contiguous(), dim=0), (torch.tanh(x[:, :4]) * 3.0).t())
    with pytest.raises(LiftError, match="unknown op 'cumsum'"):
        ElementwiseProgram.from_json('[["input"],["cumsum",["v",0]]]')
    with pytest.raises(LiftError, match="bad operand"):
        ElementwiseProgram.from_json('[["input"],["tanh",["v",3]]]')


@pytest.mark.parametrize("lowering", ["cpu", "reference"])
def test_lifted_experts_op_on_every_torch_lowering(lowering):
    program = ElementwiseProgram(
        (("input",), ("slice", ("v", 0), 0, 3, 1), ("slice", ("v", 0), 3, 6, 1), ("relu", ("v", 1)),
         ("pow", ("v", 3), 2), ("mul", ("v", 4), ("v", 2)))
    )
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=3, hidden_size=5, intermediate_size=3,
                       activation="lifted", gated=False, gate_up_layout="none", program=program.to_json())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=generator)
    ids = torch.randint(0, 4, (7, 2), generator=generator)
    weights = torch.rand(7, 2, generator=generator).masked_fill(ids == 3, 0)
    w1, w2 = torch.randn(3, 6, 5, generator=generator), torch.randn(3, 5, 3, generator=generator)
    out = torch.ops.moepass.experts(x, ids, weights, w1, w2, None, None, ExpertsConfig(spec, lowering=lowering).to_json())
    expected = torch.zeros(7, 5)
    for t in range(7):
        for j in range(2):
            e = int(ids[t, j])
            if e < 3:
                h = w1[e] @ x[t]
                expected[t] += weights[t, j] * (w2[e] @ (torch.relu(h[:3]) ** 2 * h[3:]))
    assert rel_err(out, expected) <= 1e-5
    assert "lifted" in spec.description and "relu" in spec.description
    assert moepass.MoEBlockSpec.from_json(
        moepass.MoEBlockSpec(path="p", router=moepass.RouterSpec("softmax_topk", 3, 2), experts=spec).to_json()
    ).experts == spec


@pytest.mark.parametrize("name,target", [("clamped_swiglu", "ort"), ("softcapped_swiglu", "portable")])
def test_lifted_activation_exports_to_onnx_inside_the_block_function(tmp_path, name, target):
    pytest.importorskip("onnxruntime")
    import onnx

    model = _model(ACTIVATIONS[name]).eval()
    exported = moepass.export_onnx(model, (token_ids(2, 7, seed=4),), tmp_path / "model.onnx", target=target)
    assert exported.max_error <= 1e-4  # run in ONNX Runtime against the rewritten torch model before writing
    proto = onnx.load(str(tmp_path / "model.onnx"))
    assert [n.op_type for n in proto.graph.node].count("AdaptiveMoE") == 2
    body_ops = {n.op_type for f in proto.functions for n in _all_nodes(f.node)}
    assert "Tanh" in body_ops or "Max" in body_ops  # the lifted math, in the block's function


def _all_nodes(nodes):
    """Nodes and the nodes of their subgraphs (Loop and If bodies), recursively."""
    for node in nodes:
        yield node
        for attribute in node.attribute:
            if attribute.g is not None:
                yield from _all_nodes(attribute.g.node)
            for graph in attribute.graphs:
                yield from _all_nodes(graph.node)
