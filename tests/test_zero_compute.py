"""Zero-computation experts (LongCat-Flash's identity experts; MoE++ zero/constant experts).

A slot routed to one costs no GEMM row: the experts op skips every id ≥ E and
``moepass.zero_compute_experts`` adds w·x (identity), nothing (zero) or w·c
(constant).  LongCat-Flash's experts loop graph-breaks; ``moepass.make_traceable``
replaces it with moepass ops so the backend sees (and rewrites) the block whole.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import gradients_after_backward, rel_err, traceable_and_reference
from reference_routing import choose_k

import moepass
from moepass.compiler.dataflow import op_name
from moepass.runtime import stats
from moepass.zoo.discovery import tiny_family_model
from moepass.zoo.survey import family_inputs


def _per_slot_reference(x, ids, weights, first, kinds, constants):
    """Plain loops: Σ over slots on zero-computation experts of their output."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - first
            if not 0 <= e < len(kinds):
                continue
            w = float(weights[t, j])
            if kinds[e] == "identity":
                out[t] += w * x[t].double()
            elif kinds[e] == "constant":
                out[t] += w * constants[e].double()
    return out


@pytest.mark.parametrize("kinds", [("identity",), ("identity", "zero", "constant", "identity")])
def test_zero_compute_op_matches_per_slot_reference_and_gradcheck(kinds):
    generator = torch.Generator().manual_seed(0)
    first, num_tokens, depth, hidden = 5, 11, 3, 6
    x = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64)
    # ids over GEMM experts, zero-computation ones and the empty sentinel
    ids = torch.randint(0, first + len(kinds) + 1, (num_tokens, depth), generator=generator)
    weights = torch.rand(num_tokens, depth, generator=generator, dtype=torch.float64)
    constants = torch.randn(len(kinds), hidden, generator=generator, dtype=torch.float64)
    text = ",".join(kinds)
    out = torch.ops.moepass.zero_compute_experts(x, ids, weights, first, text, constants)
    expected = _per_slot_reference(x, ids, weights, first, kinds, constants)
    assert (ids >= first).any() and torch.allclose(out.double(), expected, atol=1e-6)
    leaves = [t.clone().requires_grad_(True) for t in (x, weights, constants)]

    def function(a, w, c):
        return torch.ops.moepass.zero_compute_experts(a, ids, w, first, text, c)

    assert torch.autograd.gradcheck(function, leaves)


def _longcat(seed=0, eager=False):
    """A tiny LongCat-Flash; ``eager``: its experts as transformers' Python loop (the 5.24 form always is one)."""
    overrides = {"experts_implementation": "eager"} if eager and _dispatches_experts() else {}
    return tiny_family_model("longcat_flash", seed=seed, **overrides)


def _dispatches_experts() -> bool:
    """transformers >= 5.25: LongCat's experts go through ``experts_implementation`` (grouped_mm by default),
    and the block remaps its identity slots onto real experts at weight 0 and adds their term itself."""
    from transformers.models.longcat_flash import modeling_longcat_flash

    return hasattr(modeling_longcat_flash.LongcatFlashExperts.forward, "__wrapped__")


def test_make_traceable_keeps_the_function_and_is_idempotent():
    model = _longcat(eager=True)
    inputs = family_inputs(model, 9)
    with torch.no_grad():
        expected = model(**inputs).logits
        changed = moepass.make_traceable(model)
        assert changed == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"] and not changed.left
        again = moepass.make_traceable(model)
        assert again == [] and again.already == changed
        actual = model(**inputs).logits
    assert rel_err(actual, expected) <= 1e-5


def test_make_traceable_leaves_experts_that_are_already_traceable_alone():
    """transformers >= 5.25 runs LongCat's experts through grouped_mm: the backend sees the block whole."""
    if not _dispatches_experts():
        pytest.skip("this transformers' LongCat experts are always a Python loop")
    model = _longcat()
    result = moepass.make_traceable(model)
    assert result == [] and result.already == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all("forward" not in vars(layer.mlp.experts) for layer in model.model.layers)


@pytest.mark.parametrize("form", ["as_loaded", "made_traceable", "eager_made_traceable"])
def test_longcat_is_rewritten_whole_and_identity_slots_cost_no_gemm_row(form):
    """With and without make_traceable (a no-op where the experts are already traceable): every block whole,
    exact, and GEMM rows only for slots on GEMM experts — identity slots cost none.  transformers >= 5.25
    remaps them onto real experts at weight 0 and adds their term in the block: the rewrite takes the
    router's true selection and writes that term as moepass.zero_compute_experts, as for 5.24's form."""
    build = functools.partial(_longcat, eager=form == "eager_made_traceable")
    config = build().config
    num_gemm, num_zero = config.n_routed_experts, config.zero_expert_num
    reference, model = build(), build()
    if form != "as_loaded":
        moepass.make_traceable(model)
    inputs = family_inputs(model, 13)
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "stats": True})
    with torch.no_grad():
        compiled(**inputs)  # compile (validation runs the experts on random inputs)
        expected = reference(**inputs).logits
        stats.reset_stats()
        with stats.count_gemm_rows() as rows:
            actual = compiled(**inputs).logits
    assert rel_err(actual, expected) <= 1e-5
    report = moepass.report(compiled)
    assert report.graphs == 1  # no graph break left
    assert [b.rewritten for b in report.blocks] == [True, True]
    for block in report.blocks:
        kinds = block.spec.experts.zero_compute
        assert block.spec.experts.num_experts == num_gemm and kinds == ("identity",) * num_zero
        ops = [op_name(n) for n in block.graph_after.nodes if n.op == "call_function"]
        assert {"moepass::route", "moepass::experts", "moepass::zero_compute_experts"} <= set(ops)
        assert "where" not in ops and "masked_fill" not in ops  # the remap and the model's own term are gone
    counted = stats.routing_stats()
    gemm_slots = sum(k * n for s in counted.values() for k, n in enumerate(s.tokens_per_k))
    zero_slots = sum(s.zero_compute_slots for s in counted.values())
    tokens = inputs["input_ids"].numel()
    assert zero_slots > 0 and gemm_slots + zero_slots == 2 * tokens * config.num_experts_per_tok
    assert sum(rows) == gemm_slots  # every GEMM row is a slot on a GEMM expert, none for identity slots
    assert all(s.num_experts == num_gemm for s in counted.values())
    assert "slots went to zero-computation experts" in str(report)


def test_a_zeroed_slots_term_that_is_not_split_off_keeps_the_block_as_it_was(monkeypatch):
    """transformers >= 5.25: without the split that keeps the identity term beside the experts, the block is
    left as it was with the reason — never rewritten into experts that drop the term."""
    if not _dispatches_experts():
        pytest.skip("the identity term is the experts module's own before transformers 5.25")
    import moepass.compiler.detect as detect

    monkeypatch.setattr(detect, "split_coupled_shared", lambda *args, **kwargs: None)
    reference, model = _longcat(), _longcat()
    inputs = family_inputs(model, 13)
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
    with torch.no_grad():
        assert rel_err(compiled(**inputs).logits, reference(**inputs).logits) <= 1e-5
    blocks = moepass.report(compiled).blocks
    assert blocks and not any(b.rewritten for b in blocks)
    assert all("reads their weights elsewhere" in b.reason and b.reason_code == "unsupported_experts" for b in blocks), [
        b.reason for b in blocks
    ]


def test_longcat_adaptive_policy_is_the_same_whichever_form_its_experts_take():
    """The full rewrite made from LongCat's experts loop (make_traceable) against the model's other form.

    transformers >= 5.25: against the block as loaded (grouped_mm experts, already whole); both remap
    their identity slots in the block, and both are rewritten with the router's true selection and
    identity experts.  Before: against the router-only rewrite, where LongCat's own eager loop (identity
    experts included) runs the slots the policy kept — the model's own semantics under the same routing.
    """
    options = {"policy": "top_p", "p": 0.5, "inner": "eager"}
    inputs = family_inputs(_longcat(), 11)
    with torch.no_grad():
        other = torch.compile(_longcat(), backend="adaptive_moe", options=options)
        expected = other(**inputs).logits
        blocks = moepass.report(other).blocks
        expected_dispatch = "grouped_mm" if _dispatches_experts() else "eager_loop"
        assert [b.dispatch for b in blocks] == [expected_dispatch] * 2 and all(b.rewritten for b in blocks)
        torch._dynamo.reset()
        model = _longcat(eager=True)
        assert len(moepass.make_traceable(model)) == 2
        whole = torch.compile(model, backend="adaptive_moe", options=options)
        actual = whole(**inputs).logits
        static = model(**inputs).logits
    assert [b.dispatch for b in moepass.report(whole).blocks] == ["moepass_op", "moepass_op"]
    assert rel_err(actual, expected) <= 1e-5
    assert rel_err(actual, static) > 1e-4  # the policy did drop slots


def _longcat_block_reference(block, x, rule, params):
    """LongCat's block under a policy, per token in float64: the router's selection (ids over E GEMM and Z
    identity experts, best first, their true weights), k by the rule over that selection's weights
    normalised (a lifted router: mass within the model's top-k), then Σ_j w_j · expert_j(x) with identity
    experts adding w_j · x.  Returns (out [T, H], slots kept on GEMM experts, min decision margin)."""
    router, experts = block.router, block.experts
    num_gemm = experts.gate_up_proj.shape[0]
    logits = x.double() @ router.classifier.weight.double().T
    scores = torch.softmax(logits, dim=-1)
    choice = scores + router.e_score_correction_bias.double()
    out, gemm_slots, margin = torch.zeros_like(x, dtype=torch.float64), 0, float("inf")
    for t in range(x.shape[0]):
        ranked = sorted(range(scores.shape[1]), key=lambda e: -float(choice[t, e]))
        margin = min(margin, float(choice[t, ranked[router.top_k - 1]] - choice[t, ranked[router.top_k]]))
        order = ranked[: router.top_k]
        values = [float(scores[t, e]) * router.routed_scaling_factor for e in order]
        probs = [v / sum(values) for v in values]
        k, margins = choose_k(rule, params, probs, None, None, (), router.top_k)
        margin = min([margin] + [abs(m) for m in margins])
        for e, w in zip(order[: max(1, min(k, router.top_k))], values):
            if e >= num_gemm:
                out[t] += w * x[t].double()
                continue
            gate, up = (experts.gate_up_proj[e].double() @ x[t].double()).chunk(2)
            out[t] += w * (experts.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up))
            gemm_slots += 1
    return out, gemm_slots, margin


class _Longcat524Form(torch.nn.Module):
    """transformers 5.24's LongCat block as moepass.make_traceable writes it: the router's selection goes to
    moepass.experts (ids ≥ E cost no GEMM row) and moepass.zero_compute_experts adds the identity term."""

    def __init__(self, block):
        from moepass.compiler import traceable

        super().__init__()
        self.router, self.experts = block.router, block.experts
        num_gemm, hidden, width = block.experts.gate_up_proj.shape
        spec = traceable._gated_spec(num_gemm, hidden, width // 2, block.experts.act_fn, ("identity",) * block.zero_expert_num)
        self.run = traceable._runner(spec)

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, ids = self.router(x)
        return self.run(x, ids, weights, self.experts.gate_up_proj, self.experts.down_proj).reshape(hidden_states.shape)


@pytest.mark.parametrize("rule,params", [("top_p", {"p": 0.5}), ("threshold", {"T": 0.05})])
def test_longcat_block_under_a_policy_equals_the_per_token_reference_and_the_make_traceable_form(rule, params):
    """Every LongCat form gets one semantics: the route op sees the router's true selection (identity slots
    included, with their weights), the policy decides over all of it, identity experts add w·x and cost
    no GEMM row.  transformers 5.25's block (remap in the block) equals a per-token reference and the
    5.24 / make_traceable form of the same weights, and its GEMM rows are its kept slots on real experts."""
    block = _longcat(seed=3).model.layers[0].mlp
    tokens = 24
    x = torch.randn(1, tokens, block.experts.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(5))
    options = {"policy": rule, **params, "inner": "eager"}
    with torch.no_grad():
        expected, gemm_slots, margin = _longcat_block_reference(block, x[0], rule, params)
        assert margin > 1e-5  # no token on a decision boundary (float32 against float64)
        compiled = torch.compile(block, backend="adaptive_moe", options=options)
        compiled(x)
        with stats.count_gemm_rows() as rows:
            actual = compiled(x)[0]
        report = moepass.report(compiled)
        torch._dynamo.reset()
        other = torch.compile(_Longcat524Form(block), backend="adaptive_moe", options=options)(x)[0]
        static = block(x)[0]
    assert [b.rewritten for b in report.blocks] == [True]
    assert report.blocks[0].spec.experts.zero_compute == ("identity",) * block.zero_expert_num
    assert rel_err(actual, expected) <= 1e-5 and rel_err(other, expected) <= 1e-5
    assert rel_err(actual, other) <= 1e-5
    assert rel_err(actual, static) > 1e-3  # the policy dropped slots
    assert sum(rows) == gemm_slots < tokens * block.router.top_k


def test_longcat_eager_loop_after_the_remap_is_reported_not_rewritten():
    """transformers >= 5.25 with experts_implementation="eager" and no make_traceable: the block remaps
    ids before a loop outside the graph — left as it was (never a half-rewritten remap), and said why."""
    if not _dispatches_experts():
        pytest.skip("the identity slots reach the experts loop unremapped before transformers 5.25")
    reference, model = _longcat(eager=True), _longcat(eager=True)
    inputs = family_inputs(model, 9)
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "policy": "top_p", "p": 0.5})
    with torch.no_grad():
        assert rel_err(compiled(**inputs).logits, reference(**inputs).logits) <= 1e-6
    blocks = moepass.report(compiled).blocks
    assert blocks and not any(b.rewritten for b in blocks)
    assert all(b.reason_code == "graph_break" and "make_traceable" in b.reason for b in blocks)


def test_longcat_gradients_through_the_rewrite_equal_eager():
    reference, model, compiled, inputs = traceable_and_reference(_longcat, 7)
    checked = 0
    for name, grad, expected in gradients_after_backward(model, compiled, reference, inputs):
        assert rel_err(grad, expected) <= 1e-5, name
        checked += "experts" in name
    assert checked >= 4  # both layers' gate_up_proj and down_proj
    ops = [b.graph_after for b in moepass.report(compiled).blocks]
    assert all(b.rewritten for b in moepass.report(compiled).blocks) and ops


def test_make_traceable_leaves_a_module_whose_weights_do_not_fit_as_it_was_and_says_why():
    model = _longcat(eager=True)
    experts = model.model.layers[1].mlp.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj[:, :, :-1].detach().clone())
    result = moepass.make_traceable(model)
    assert result == ["model.layers.0.mlp.experts"]
    assert "down_proj (8, 64, 31)" in result.left["model.layers.1.mlp.experts"]
    assert "forward" not in vars(experts)


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_longcat_exports_to_onnx_with_its_identity_experts(tmp_path, target):
    """export_onnx checks ONNX Runtime against the rewritten torch model on the example itself."""
    pytest.importorskip("onnxruntime")
    import onnx

    model = _longcat()
    moepass.make_traceable(model)
    example = (family_inputs(model, 9)["input_ids"],)
    for policy in ({"policy": "static"}, {"policy": "top_p", "p": 0.5}):
        path = tmp_path / f"{policy['policy']}.onnx"
        exported = moepass.export_onnx(model, example, str(path), target=target, **policy)
        assert [b.path for b in exported.blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert exported.max_error is not None and exported.max_error <= 1e-4
        loaded = onnx.load(str(path))
        ops = {node.op_type for function in loaded.functions for node in function.node}
        ops |= {node.op_type for node in loaded.graph.node}
        assert "GreaterOrEqual" in ops  # the identity experts' masked term, not a Gemm row
        if target == "ort":
            assert "MoE" in ops


def test_longcat_exports_to_mlir_and_runs_in_iree(tmp_path):
    pytest.importorskip("torch_mlir")
    pytest.importorskip("iree.runtime")
    model = _longcat()
    moepass.make_traceable(model)
    example = (family_inputs(model, 9)["input_ids"],)
    exported = moepass.export_mlir(model, example, str(tmp_path / "m.mlir"), policy="top_p", p=0.5)
    assert len(exported.blocks) == 2 and exported.max_error <= 1e-4
