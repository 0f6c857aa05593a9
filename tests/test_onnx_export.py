"""ONNX export: structure (one moepass node per block, com.microsoft.MoE inside for target ort),
the ONNX checker, and ONNX Runtime against the torch model with the same policy.

Each family is exported once per policy (``prepare_export``) and lowered to both targets.
Exports happen at batch 2 × 8 tokens; ONNX Runtime runs that example, compared with
``torch.compile(backend="adaptive_moe")`` (independent of the export's capture), and a
3 × 13 batch (dynamic axes), compared with the exported torch program at that shape.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's translator

from conftest import token_ids
from moepass.lowering.onnx import DOMAIN, OP_TYPE

import moepass
from moepass.cli.main import main
from moepass.exports.onnx import (
    OnnxExportError,
    export_onnx,
    prepare_export,
)
from moepass.policies import Allocator, NullExperts
from moepass.zoo import FAMILIES, tiny_model

TOLERANCE = 1e-4  # float32, relative to the output's largest magnitude
ORT_DOMAIN = "com.microsoft"

#: one adaptive policy per family, so every rule meets several router kinds
ADAPTIVE = {
    "mixtral": {"policy": "top_p", "p": 0.4},
    "qwen2_moe": {"policy": "skip_ratio", "beta": 0.5},
    "qwen3_moe": {"policy": "threshold", "T": 0.1},
    "olmoe": {"policy": "top_p", "p": 0.5},
    "deepseek_v3": {"policy": "top_p", "p": 0.3},
    "gpt_oss": {"policy": "threshold", "T": 0.1},
    "granitemoe": {"policy": "skip_ratio", "beta": 0.6},
    "llama4_text": {"policy": "top_p", "p": 0.4},
}
#: full models are one layer (a block each) to keep the suite fast; mixtral keeps two
LAYERS = {"mixtral": 2}


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def providers() -> list[str]:
    """CPU always; CUDA too when onnxruntime-gpu and a GPU are present."""
    return ["CPUExecutionProvider"] + (
        ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in ort.get_available_providers() else []
    )


def run_onnx(model, feeds: dict, provider: str = "CPUExecutionProvider") -> list[np.ndarray]:
    data = model.SerializeToString() if not isinstance(model, (str, Path)) else str(model)
    chosen = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(data, providers=chosen).run(None, feeds)


def moepass_nodes(model) -> list:
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def function_ops(model) -> list[tuple[str, str]]:
    """(domain, op_type) of every node of every local function, Loop bodies included."""
    found = []

    def walk(nodes):
        for node in nodes:
            found.append((node.domain, node.op_type))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g.node)

    for function in model.functions:
        walk(function.node)
    return found


def moe_ks(model) -> list[int]:
    """The k attributes of the com.microsoft.MoE nodes in the model's functions."""
    return sorted({a.i for f in model.functions for n in f.node if n.op_type == "MoE" for a in n.attribute
                   if a.name == "k"})


class Case:
    """A model exported once under one policy; a torch.compile of it under the same policy."""

    def __init__(self, family: str, options: dict, model=None, example=None, second=None):
        self.family = family
        self.options = options
        #: a transformers causal LM (called with use_cache=False, logits compared) or a plain module
        self.lm = model is None or hasattr(model, "generate")
        if model is None:
            model = tiny_model(family, num_hidden_layers=LAYERS.get(family, 1))
        if example is None:
            example, second = (token_ids(2, 8, seed=1),), (token_ids(3, 13, seed=2),)
        self.model, self.example, self.second = model, example, second
        self.prepared = prepare_export(model, example, **options)
        # the example against torch.compile (independent of the export's capture); the second
        # shape against the exported torch program itself (no recompile: the suite stays fast)
        compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", **options})
        with torch.no_grad():
            self.expected = [self._outputs(compiled, example), self._outputs(self.prepared.captured.gm, second)]

    def _outputs(self, module, args) -> list[np.ndarray]:
        if module is self.prepared.captured.gm:  # flat tensors in, the exported outputs out
            out = module(*args)
        elif self.lm:
            return [module(*args, use_cache=False).logits.numpy()]
        else:
            out = module(*args)
        return [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]

    def check(self, target: str, provider: str = "CPUExecutionProvider", layout: str = "masked"):
        model, blocks = self.prepared.lower(target, ort_layout=layout)
        onnx.checker.check_model(model, full_check=True)
        for args, expected in zip((self.example, self.second), self.expected):
            actual = run_onnx(model, self.prepared.feeds(args), provider)
            for a, e in zip(actual, expected):
                assert rel_err(a, e) <= TOLERANCE, (self.family, target, args[0].shape)
        return model, blocks


_CASES: dict[tuple, Case] = {}


def case(family: str, adaptive: bool) -> Case:
    key = (family, adaptive)
    if key not in _CASES:
        options = ADAPTIVE[family] if adaptive else {"policy": "static"}
        if family == "llama4_text":  # torch.onnx cannot export its complex-valued RoPE: the MoE block alone
            model = tiny_model(family, num_hidden_layers=1, num_experts_per_tok=2).model.layers[0].feed_forward
            torch.manual_seed(0)
            _CASES[key] = Case(family, options, model, (torch.randn(2, 8, 64),), (torch.randn(3, 13, 64),))
        else:
            _CASES[key] = Case(family, options)
    return _CASES[key]


@pytest.mark.parametrize("adaptive", [False, True], ids=["static", "adaptive"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_and_matches_torch(family, adaptive):
    exported = case(family, adaptive)
    blocks_in_torch = [b.path for b in exported.prepared.blocks]
    for target in ("ort", "portable"):
        model, blocks = exported.check(target)
        nodes = moepass_nodes(model)
        # one custom-domain node per MoE block, named by the block's path
        assert [n.name for n in nodes] == [p or "<root>" for p in blocks_in_torch]
        assert [b.path for b in blocks] == blocks_in_torch
        assert all(n.overload in {f.overload for f in model.functions} for n in nodes)
        ops = function_ops(model)
        if target == "ort":
            assert (ORT_DOMAIN, "MoE") in ops
            # weight on the expert input (Llama 4): every kept slot is a k=1 row; else one call, k = native
            native = 1 if family == "llama4_text" else exported.model.config.num_experts_per_tok
            assert moe_ks(model) == [native]
        else:
            assert not any(domain == ORT_DOMAIN for domain, _ in ops)
            assert ("", "Loop") in ops
        assert not any(n.domain == ORT_DOMAIN for n in model.graph.node)  # only inside the functions


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_static_export_lets_ort_route_from_the_logits_where_it_can(family):
    """Static policy on a softmax→top-k router: one MoE call on the model's own logits, no routing subgraph
    (what onnxruntime-genai's builder writes); routers MoE cannot compute keep moepass's routing."""
    exported = case(family, False)
    model, _ = exported.check("ort")
    moe_nodes = [n for f in model.functions for n in f.node if n.op_type == "MoE"]
    routing_ops = {op for _, op in function_ops(model)} & {"TopK", "Softmax", "ScatterElements", "Sigmoid"}
    router = exported.prepared.blocks[0].spec.router
    if family == "deepseek_v3":  # sigmoid scores, a correction bias and groups: moepass routes
        assert router.kind == "sigmoid_group_topk" and routing_ops
        return
    assert not routing_ops, routing_ops
    normalize = {a.i for n in moe_nodes for a in n.attribute if a.name == "normalize_routing_weights"}
    assert normalize == {int(router.renormalize or router.kind == "topk_softmax")}


def test_adaptive_export_differs_from_static():
    """The policy is really applied in ONNX: top-p and static give different logits."""
    static, adaptive = case("mixtral", False), case("mixtral", True)
    feeds = static.prepared.feeds()
    out_static = run_onnx(static.prepared.lower("ort")[0], feeds)[0]
    out_adaptive = run_onnx(adaptive.prepared.lower("ort")[0], feeds)[0]
    assert rel_err(out_adaptive, out_static) > 1e-2


def test_one_token_batches_run():
    """Decode-shaped inputs (one token, batch 1 or 4) run, though the export saw 2 × 8."""
    exported = case("mixtral", True)
    for target in ("ort", "portable"):
        model, _ = exported.prepared.lower(target)
        for shape in ((1, 1), (4, 1)):
            ids = token_ids(*shape, seed=7)
            with torch.no_grad():
                expected = exported.prepared.captured.gm(ids)[0].numpy()
            assert rel_err(run_onnx(model, exported.prepared.feeds((ids,)))[0], expected) <= TOLERANCE, (target, shape)


@pytest.mark.parametrize("layout,ks", [("buckets", [1, 2]), ("slots", [1])])
def test_ort_layouts_are_exact(layout, ks):
    """The other two ways of mapping variable k onto com.microsoft.MoE calls give the same numbers."""
    exported = case("mixtral", True)
    model, blocks = exported.check("ort", layout=layout)
    assert moe_ks(model) == ks
    assert all(layout[:-1] in b.experts for b in blocks), [b.experts for b in blocks]


def gemm_count(model) -> int:
    """Gemm nodes in the model's functions, If branches included."""
    return sum(op == "Gemm" for _, op in function_ops(model))


def if_count(model) -> int:
    return sum(op == "If" for _, op in function_ops(model))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text"])
def test_gemm_layout_is_exact(family):
    """One Gemm pair per expert, no com.microsoft op: concat and interleaved gate/up, [E,in,out] storage,
    biases and gpt-oss's clamped SwiGLU, and Llama 4's weight on the expert input."""
    exported = case(family, True)
    model, blocks = exported.check("ort", layout="gemm")
    experts = exported.prepared.blocks[0].spec.experts.num_experts
    assert gemm_count(model) == 2 * experts * len(model.functions)
    # each expert's pair runs only when a slot picked it (an If on its row count)
    assert if_count(model) == experts * len(model.functions)
    assert not any(domain == ORT_DOMAIN for domain, _ in function_ops(model))
    assert not any(o.domain == ORT_DOMAIN for f in model.functions for o in f.opset_import)
    assert all(b.experts == "Gemm pair per expert (weights pre-packed once)" and not b.fallback_reason for b in blocks)


def test_gemm_layout_runs_what_moe_cannot():
    """Gated gelu has no com.microsoft.MoE form; the Gemm pairs run it exactly, without a fallback."""
    model = tiny_model("mixtral", num_hidden_layers=1, hidden_act="gelu")
    exported = Case("mixtral", {"policy": "top_p", "p": 0.4}, model)
    _, blocks = exported.check("ort", layout="gemm")
    assert blocks[0].experts.startswith("Gemm pair") and not blocks[0].fallback_reason


def test_auto_layout_follows_expert_size_and_provider():
    """CPU: pre-packed Gemm pairs for experts of 2 MiB and more, the masked MoE call below; CUDA: slots."""
    from moepass.lowering.onnx import GEMM_MIN_EXPERT_BYTES
    from moepass.lowering.onnx.layouts import default_ort_layout, expert_bytes

    big = tiny_model("mixtral", num_hidden_layers=1, hidden_size=512, intermediate_size=512)
    prepared = prepare_export(big, (token_ids(2, 8),), policy="top_p", p=0.4)
    spec = prepared.blocks[0].spec.experts
    assert expert_bytes(spec) == 3 * 512 * 512 * 4 >= GEMM_MIN_EXPERT_BYTES
    small = case("mixtral", True).prepared.blocks[0].spec.experts
    assert expert_bytes(small) < GEMM_MIN_EXPERT_BYTES
    assert default_ort_layout("cpu", spec) == "gemm" and default_ort_layout("cpu", small) == "masked"
    assert default_ort_layout("cpu", spec, onnx.TensorProto.FLOAT16) == "masked"  # Gemm pairs are float32 only
    assert default_ort_layout("cuda", spec) == "slots"
    expected = prepared.reference()[0].numpy()
    for provider, described, ks in (("cpu", "Gemm pair per expert", []), ("cuda", "com.microsoft.MoE (k=1", [1])):
        model, blocks = prepared.lower("ort", provider=provider)
        assert blocks[0].experts.startswith(described) and moe_ks(model) == ks
        assert rel_err(run_onnx(model, prepared.feeds())[0], expected) <= TOLERANCE


@pytest.mark.parametrize("policy", ["null_experts", "allocator"])
def test_learned_policies_export(policy):
    model = tiny_model("olmoe", num_hidden_layers=1)
    generator = torch.Generator().manual_seed(5)
    hidden = model.config.hidden_size
    if policy == "null_experts":  # top-3 over 4 real + 3 null experts: tokens keep 0 to 3 experts
        chosen = NullExperts(k=3, router_rows={"0": torch.randn(3, hidden, generator=generator) * 0.4})
    else:
        chosen = Allocator(weights={"0": torch.randn(hidden, 2, generator=generator)})
    exported = Case("olmoe", {"policy": chosen}, model)
    moepass.runtime.stats.reset_stats()
    counted = torch.compile(model, backend="adaptive_moe", options={"policy": chosen, "inner": "eager", "stats": True})
    with torch.no_grad():
        counted(*exported.example, use_cache=False)
    (per_k,) = [s.tokens_per_k for s in moepass.report(counted).stats().values()]
    assert sum(n > 0 for n in per_k) >= 2, per_k  # k really varies per token
    if policy == "null_experts":
        assert per_k[0] > 0, per_k  # some tokens keep no routed expert at all
    for target, layout in (("ort", "masked"), ("ort", "buckets"), ("ort", "slots"), ("ort", "gemm"),
                           ("portable", "masked")):
        _, blocks = exported.check(target, layout=layout)  # null experts: tokens with k = 0 too
        assert blocks[0].routing.startswith(policy)


def test_public_api_writes_a_checked_model(tmp_path):
    model = tiny_model("mixtral")
    path = tmp_path / "out" / "model.onnx"
    example = token_ids(4, 16)[:2, :8]  # a strided view: its base's sizes must not leak into the export's guards
    result = moepass.export_onnx(model, (example,), path, "top_p", target="ort", p=0.4)
    assert result.path == path and path.is_file()
    assert result.max_error is not None and result.max_error <= TOLERANCE
    assert result.input_names == ["input_ids"] and result.output_names == ["logits"]
    assert [b.path for b in result.blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(b.experts == "com.microsoft.MoE (k=2, dropped slots masked)" for b in result.blocks)
    onnx.checker.check_model(str(path), full_check=True)
    loaded = onnx.load(str(path))
    assert len(moepass_nodes(loaded)) == 2 and len(loaded.functions) == 1
    assert {"input_ids"} == {i.name for i in loaded.graph.input}
    dims = [d.dim_param or d.dim_value for d in loaded.graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims), dims  # batch and sequence are symbolic
    assert sorted(p.name for p in loaded.graph.initializer if "experts" in p.name) == [
        f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("down_proj", "gate_up_proj")
    ]
    assert "model.layers.0.mlp" in str(result)


def test_unrewritten_block_fails_naming_it(tmp_path):
    model = tiny_model("phimoe", num_hidden_layers=1)
    path = tmp_path / "phimoe.onnx"
    with pytest.raises(OnnxExportError, match=r"without the policy: block model\.layers\.0\.mlp: .*the router is a sparsemixer"):
        export_onnx(model, (token_ids(2, 8),), path, "top_p", p=0.4)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_undetected_block_is_caught_by_the_backstop(monkeypatch):
    """Even if detection missed a block entirely, its expert weights still in the graph stop the export."""
    import moepass.compiler.stages

    monkeypatch.setattr(moepass.compiler.stages, "find_moe_blocks", lambda gm, flow: [])
    with pytest.raises(OnnxExportError, match=r"block model\.layers\.0\.mlp: its expert weights are still read"):
        prepare_export(tiny_model("olmoe", num_hidden_layers=1), (token_ids(2, 8),), policy="top_p", p=0.4)


def test_experts_ort_cannot_run_fall_back_or_fail():
    """Gated gelu is not a com.microsoft.MoE activation: standard ops in its function, or a clear error."""
    model = tiny_model("mixtral", num_hidden_layers=1, hidden_act="gelu")
    exported = Case("mixtral", {"policy": "top_p", "p": 0.4}, model)
    model_proto, blocks = exported.check("ort")
    assert blocks[0].experts == "standard ops" and "gated gelu" in blocks[0].fallback_reason
    assert not any(domain == ORT_DOMAIN for domain, _ in function_ops(model_proto))
    with pytest.raises(OnnxExportError, match=r"block model\.layers\.0\.mlp: com\.microsoft\.MoE cannot run .*gated gelu"):
        exported.prepared.lower("ort", ort_fallback="error")


def test_random_allocator_is_refused():
    model = tiny_model("olmoe", num_hidden_layers=1)
    policy = Allocator(weights={"0": torch.randn(model.config.hidden_size, 2)}, sample=True)
    prepared = prepare_export(model, (token_ids(2, 8),), policy=policy)
    with pytest.raises(OnnxExportError, match=r"block model\.layers\.0\.mlp: the allocator policy samples k"):
        prepared.lower("portable")


def test_graph_break_is_a_clear_error():
    model = tiny_model("mixtral", "eager", num_hidden_layers=1)  # transformers' eager experts loop graph-breaks
    with pytest.raises(OnnxExportError, match="does not capture as one graph"):
        prepare_export(model, (token_ids(2, 8),))


def test_bad_inputs_are_clear_errors(tmp_path):
    model = tiny_model("mixtral", num_hidden_layers=1)
    with pytest.raises(OnnxExportError, match="size 1 on its dynamic axis 0"):
        export_onnx(model, (token_ids(1, 8),), tmp_path / "m.onnx")
    with pytest.raises(OnnxExportError, match="unknown target"):
        export_onnx(model, (token_ids(2, 8),), tmp_path / "m.onnx", target="tensorrt")
    with pytest.raises(moepass.OptionsError, match="unknown option"):
        export_onnx(model, (token_ids(2, 8),), tmp_path / "m.onnx", "top_p", q=0.4)
    assert list(tmp_path.iterdir()) == []


def test_cli_export(tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    assert main(["export", "--model", "zoo:mixtral", "--policy", "top_p", "--p", "0.4", "--out", str(out),
                 "--target", "portable", "--tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "model.layers.1.mlp: top_p(p=0.4)" in printed and "standard ops" in printed
    assert main(["export", "--model", "zoo:nope", "--out", str(tmp_path / "x.onnx")]) == 2
    assert main(["export", "--model", "zoo:mixtral", "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.onnx"]


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="onnxruntime-gpu with a CUDA device is not available here")
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_cuda_provider(family):
    exported = case(family, True)
    exported.check("ort", "CUDAExecutionProvider")
    exported.check("portable", "CUDAExecutionProvider")


def _bundled():
    if importlib.util.find_spec("moepass.bundled") is None:
        pytest.skip("moepass.bundled is not in this build (the bundled model lands from the train branch)")
    from moepass import bundled

    try:
        return bundled, bundled.load_model()
    except FileNotFoundError as error:
        pytest.skip(f"the bundled checkpoint is missing: {error}")


@pytest.mark.parametrize("policy", ["static", "ada_k", "skip_ratio"])
def test_bundled_model(policy):
    """The trained checkpoint, static and under two of its own artefacts (trained Ada-K, per-layer beta)."""
    bundled, model = _bundled()
    chosen = policy if policy == "static" else bundled.load_policy(policy)
    vocab = model.config.vocab_size
    example = (torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)),)
    second = (torch.randint(0, vocab, (3, 24), generator=torch.Generator().manual_seed(1)),)
    exported = Case("bundled", {"policy": chosen}, model, example, second)
    for target in ("ort", "portable"):
        model_proto, blocks = exported.check(target)
        assert len(moepass_nodes(model_proto)) == model.config.num_hidden_layers
        assert [b.path for b in blocks] == [f"model.layers.{i}.mlp" for i in range(model.config.num_hidden_layers)]
    if policy == "skip_ratio":  # one beta per layer: one function per layer
        assert len(model_proto.functions) == model.config.num_hidden_layers


# --- the experts layout per token-count range, chosen on the exporting machine ------------------


def _layout_timer(label: str, names: list[str]) -> dict[str, float]:
    """A fake ORT timing: the masked MoE call fastest below 64 tokens, the Gemm pairs from 64."""
    tokens = int(label.rsplit("tokens", 1)[1])
    fastest = "masked" if tokens < 64 else "gemm"
    return {name: 1e-3 if name == fastest else 2e-3 for name in names}


def _check_at(prepared, model, shapes) -> None:
    for shape in shapes:
        ids = token_ids(*shape, seed=sum(shape))
        with torch.no_grad():
            expected = prepared.captured.gm(ids)[0].numpy()
        assert rel_err(run_onnx(model, prepared.feeds((ids,)))[0], expected) <= TOLERANCE, shape


def test_auto_layout_is_measured_per_token_range_and_cached(tmp_path, monkeypatch):
    from moepass.runtime import tuning

    monkeypatch.setenv("MOEPASS_CACHE_DIR", str(tmp_path))
    tuning.forget_measured()
    prepared = case("mixtral", True).prepared
    with tuning.measurement_override(_layout_timer):
        model, blocks = prepared.lower("ort", ort_tuning=30)
    assert "masked below 64 tokens, gemm from 64 (measured now" in blocks[0].layout
    assert all(".ranges." in b.overload for b in blocks)
    ops = function_ops(model)
    experts = prepared.blocks[0].spec.experts.num_experts
    assert (ORT_DOMAIN, "MoE") in ops and gemm_count(model) == 2 * experts * len(model.functions)
    onnx.checker.check_model(model, full_check=True)
    _check_at(prepared, model, [(1, 1), (2, 8), (2, 40)])  # 1, 16 tokens: masked; 80: the Gemm pairs

    def no_timer(label, names):
        raise AssertionError("measured again")

    with tuning.measurement_override(no_timer):
        assert "measured earlier in this process" in prepared.lower("ort", ort_tuning=30)[1][0].layout
        tuning.forget_measured()
        assert "measured earlier (cache)" in prepared.lower("ort", ort_tuning=30)[1][0].layout
    tuning.forget_measured()


def test_named_layout_ranges_and_the_fixed_default():
    prepared = case("mixtral", True).prepared
    model, blocks = prepared.lower("ort", ort_layout={1: "slots", 32: "gemm"})
    assert blocks[0].layout == "slots below 32 tokens, gemm from 32 (named by ort_layout)"
    assert "1–31 tokens: com.microsoft.MoE (k=1 per kept slot); 32+ tokens: Gemm pair" in blocks[0].experts
    _check_at(prepared, model, [(1, 1), (2, 40)])
    # three ranges: an If inside an If (whose value names once collided: the ONNX checker refused the model)
    model, blocks = prepared.lower("ort", ort_layout={1: "masked", 8: "slots", 32: "gemm"})
    assert blocks[0].layout == "masked below 8 tokens, slots from 8 to 31, gemm from 32 (named by ort_layout)"
    onnx.checker.check_model(model, full_check=True)
    _check_at(prepared, model, [(1, 1), (2, 6), (2, 40)])
    _, blocks = prepared.lower("ort")  # the suite's $MOEPASS_TUNING=off: not measured, and it says so
    assert blocks[0].layout.startswith("masked (the fixed default") and "tuning off" in blocks[0].layout
    for bad, message in (({2: "masked"}, "starting at 1"), ({1: "fast"}, "unknown ORT layout 'fast'"),
                         ("fastest", "unknown ORT layout 'fastest'")):
        with pytest.raises(OnnxExportError, match=message):
            prepared.lower("ort", ort_layout=bad)
    with pytest.raises(OnnxExportError, match="ort_tuning"):
        prepared.lower("ort", ort_tuning="sometimes")
