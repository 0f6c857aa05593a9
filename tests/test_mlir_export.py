"""MLIR export (torch-mlir), verified by running the module in IREE on the CPU.

Structure: one ``loc("moepass:<block path>"(...))`` name per rewritten block, no
``torch.operator`` left, the expert GEMMs of the grouped form on data-dependent
row counts.  Numbers: IREE's output against ``torch.compile(backend="adaptive_moe")``
with the same policy (independent of the export's capture), ≤ 1e-4 relative in float32.

IREE compiles take 10–60 s each on 2 cores, so every export happens once per module (the
``export`` fixture) and its compiled bytecode (``MlirExport.vmfb``) is reused; the default run
covers mixtral (static and top-p), a learned-tensor policy, stablehlo, tosa, torch and one
dynamic axis; the other families and the bundled model are marked ``slow``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("torch_mlir", reason="torch-mlir is not installed (pip install 'moepass[mlir]')")
pytest.importorskip("iree.compiler", reason="iree-base-compiler is not installed (pip install 'moepass[mlir]')")
pytest.importorskip("iree.runtime", reason="iree-base-runtime is not installed (pip install 'moepass[mlir]')")
pytest.importorskip("onnxscript", reason="capture is shared with the ONNX export (pip install 'moepass[mlir]')")

from conftest import token_ids
from moepass.lowering.mlir import (
    IreeModule,
    block_of_location,
    compile_for_cpu,
    decomposition_table,
    experts_dense,
    experts_grouped,
    import_program,
    prepare_program,
)
from moepass.lowering.reference import experts_forward

import moepass
from moepass.cli.main import main
from moepass.compiler.spec import ExpertsSpec
from moepass.exports.mlir import MlirExportError, MlirExportOptions, export_mlir
from moepass.policies import Allocator, NullExperts
from moepass.zoo import FAMILIES, tiny_model

TOLERANCE = 1e-4
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


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# --- the decompositions themselves, in torch (fast) ----------------------------------------------

SPECS = {
    "gated silu": dict(),
    "weight on input": dict(weight_on_input=True),
    "gpt-oss": dict(has_bias=True, transposed=True, activation="swiglu_clamp", gate_up_layout="interleaved"),
    "plain gelu": dict(gated=False, activation="gelu", gate_up_layout="none"),
}


def _experts_case(kind: str, num_tokens: int = 9, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=4, hidden_size=8, intermediate_size=6, **SPECS[kind])
    first = 2 * spec.intermediate_size if spec.gated else spec.intermediate_size
    e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
    w1 = torch.randn((e, h, first) if spec.transposed else (e, first, h), generator=generator)
    w2 = torch.randn((e, i, h) if spec.transposed else (e, h, i), generator=generator)
    b1 = torch.randn(e, first, generator=generator) if spec.has_bias else None
    b2 = torch.randn(e, h, generator=generator) if spec.has_bias else None
    x = torch.randn(num_tokens, h, generator=generator)
    # 3 distinct experts or the sentinel per token; token 0 keeps none, expert 1 is never picked
    ids = torch.stack([torch.tensor([0, 2, 3, 4])[torch.randperm(4, generator=generator)[:3]] for _ in range(num_tokens)])
    ids[0] = e
    weights = torch.rand(num_tokens, 3, generator=generator) * (ids < e)
    return spec, (x, ids, weights, w1, w2, b1, b2)


@pytest.mark.parametrize("kind", SPECS)
def test_forms_match_the_reference(kind):
    spec, args = _experts_case(kind)
    expected = experts_forward(*args, spec)
    for form in (experts_grouped, experts_dense):
        actual = form(*args, spec)
        assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max(), (kind, form.__name__)
    assert expected[0].abs().max() == 0  # a token that keeps no expert gets nothing


# --- exports, each made once per module ----------------------------------------------------------

_EXPORTS: dict = {}


class Exported:
    """One export and what it is checked against."""

    def __init__(self, tmp, key, model, example, output_type="linalg-on-tensors", options=None, lm=True, **policy):
        self.model, self.example, self.lm = model, example, lm
        self.path = tmp / f"{'_'.join(map(str, key))}.mlir"
        self.result = export_mlir(model, example, self.path, output_type=output_type, options=options, **policy)
        self.text = self.path.read_text()
        compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", **policy})
        with torch.no_grad():
            out = compiled(*example, use_cache=False).logits if lm else compiled(*example)
        self.expected = [t.numpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]

    def run(self, *args) -> list[np.ndarray]:
        return IreeModule(self.result.vmfb)(*[a.numpy() for a in (args or self.example)])


def outputs_err(actual: list, expected: list) -> float:
    assert len(actual) == len(expected)
    return max(rel_err(a, e) for a, e in zip(actual, expected))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlir")

    def make(key, build, **kwargs):
        if key not in _EXPORTS:
            model, example, lm = build()
            _EXPORTS[key] = Exported(tmp, key, model, example, lm=lm, **kwargs)
        return _EXPORTS[key]

    yield make
    _EXPORTS.clear()


def _family(family: str):
    def build():
        if family == "llama4_text":  # torch-mlir cannot lower its complex-valued RoPE: the MoE block alone
            block = tiny_model(family, num_hidden_layers=1, num_experts_per_tok=2).model.layers[0].feed_forward
            return block, (torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3)),), False
        return tiny_model(family, num_hidden_layers=2 if family == "mixtral" else 1), (token_ids(2, 8, seed=1),), True

    return build


def block_names(text: str) -> list[str]:
    """Block paths named by the module's locations, in order of first appearance."""
    names = []
    for found in re.finditer(r'loc\("moepass:([^"]+)"', text):
        if found.group(1) not in names:
            names.append(found.group(1))
    return names


def _check_family(exported: Exported, family: str):
    result = exported.result
    assert result.max_error is not None and result.max_error <= TOLERANCE
    assert outputs_err(exported.run(), exported.expected) <= TOLERANCE, family
    paths = [b.path or "<root>" for b in result.blocks]
    assert paths and block_names(exported.text) == paths  # each block's ops carry its path
    assert all(block_of_location(f'loc("moepass:{p}"("x.py":1:0))') == p for p in paths)
    assert "torch.operator" not in exported.text and "linalg.matmul" in exported.text


def _slow_unless(cases):
    return [c if c in cases else pytest.param(*c, marks=pytest.mark.slow) for c in
            [(f, a) for f in FAMILIES for a in (False, True)]]


@pytest.mark.parametrize("family,adaptive", _slow_unless({("mixtral", False), ("mixtral", True)}))
def test_family_exports_and_runs_in_iree(export, family, adaptive):
    policy = ADAPTIVE[family] if adaptive else {"policy": "static"}
    exported = export((family, adaptive), _family(family), **policy)
    _check_family(exported, family)
    assert exported.result.experts_form == "grouped"
    if adaptive:
        assert all(b.routing.startswith(policy["policy"]) for b in exported.result.blocks)


def test_adaptive_differs_from_static(export):
    """The policy is really applied in the MLIR: top-p and static give different logits in IREE."""
    static = export(("mixtral", False), _family("mixtral"), policy="static")
    adaptive = export(("mixtral", True), _family("mixtral"), **ADAPTIVE["mixtral"])
    assert rel_err(adaptive.run()[0], static.run()[0]) > 1e-2


def test_learned_null_experts(export):
    """Learned tensors (null-expert router rows): tokens keep 0 to 3 experts, some none at all."""
    def build():
        model = tiny_model("olmoe", num_hidden_layers=1)
        return model, (token_ids(2, 8, seed=1),), True

    hidden = tiny_model("olmoe", num_hidden_layers=1).config.hidden_size
    rows = torch.randn(3, hidden, generator=torch.Generator().manual_seed(5)) * 0.4
    policy = NullExperts(k=3, router_rows={"0": rows})
    exported = export(("olmoe", "null_experts"), build, policy=policy)
    _check_family(exported, "olmoe")
    moepass.runtime.stats.reset_stats()
    counted = torch.compile(exported.model, backend="adaptive_moe",
                            options={"policy": policy, "inner": "eager", "stats": True})
    with torch.no_grad():
        counted(*exported.example, use_cache=False)
    (per_k,) = [s.tokens_per_k for s in moepass.report(counted).stats().values()]
    assert per_k[0] > 0 and sum(n > 0 for n in per_k) >= 2, per_k


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["static", "ada_k"])
def test_bundled_model(export, policy):
    """The trained checkpoint, static and with its trained Ada-K allocators (learned tensors)."""
    from moepass import bundled

    def build():
        model = bundled.load_model()
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        return model, (ids,), True

    chosen = policy if policy == "static" else bundled.load_policy(policy)
    exported = export(("bundled", policy), build, policy=chosen)
    _check_family(exported, "bundled")
    assert [b.path for b in exported.result.blocks] == [f"model.layers.{i}.mlp" for i in range(4)]


def test_stablehlo_runs_in_iree(export):
    exported = export(("mixtral", "stablehlo"), _family("mixtral"), output_type="stablehlo", **ADAPTIVE["mixtral"])
    assert exported.result.experts_form == "dense"  # auto: stablehlo has no data-dependent sizes in IREE
    assert "stablehlo." in exported.text and "chlo.top_k" not in exported.text
    assert block_names(exported.text) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert outputs_err(exported.run(), exported.expected) <= TOLERANCE


@pytest.mark.parametrize("output_type,marker", [("tosa", "tosa."), ("torch", "torch.aten.")])
def test_parsed_and_verified_outputs(tmp_path, output_type, marker):
    model = tiny_model("mixtral", num_hidden_layers=1)
    path = tmp_path / f"{output_type}.mlir"
    result = export_mlir(model, (token_ids(2, 8),), path, "top_p", output_type=output_type, p=0.4)
    text = path.read_text()
    assert result.max_error is None and result.vmfb is None  # not executed: parsed and verified
    assert marker in text and block_names(text) == ["model.layers.0.mlp"]
    assert "torch.operator" not in text
    assert "verified" in str(result)


def test_one_dynamic_axis(tmp_path):
    """A dynamic sequence axis: verified at the example's length and at one more."""
    model = tiny_model("mixtral", num_hidden_layers=1)
    path = tmp_path / "dynamic.mlir"
    result = export_mlir(model, (token_ids(2, 8),), path, "top_p", p=0.4,
                         dynamic_shapes={"input_ids": {1: "sequence"}})
    assert result.dynamic_axes == {"input_ids": [1]} and result.max_error <= TOLERANCE
    assert re.search(r"func.func @main\(%arg0: tensor<2x\?xi64>", path.read_text())
    ids = token_ids(2, 13, seed=4)
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "policy": "top_p", "p": 0.4})
    with torch.no_grad():
        expected = compiled(ids, use_cache=False).logits.numpy()
    assert rel_err(IreeModule(result.vmfb)(ids.numpy())[0], expected) <= TOLERANCE


@pytest.mark.slow
def test_batch_and_sequence_dynamic_is_a_clear_error(tmp_path):
    model = tiny_model("mixtral", num_hidden_layers=1)
    with pytest.raises(MlirExportError, match=r"torch-mlir#3852"):
        export_mlir(model, (token_ids(2, 8),), tmp_path / "m.mlir", dynamic_shapes={"input_ids": {0: "b", 1: "s"}})
    assert list(tmp_path.iterdir()) == []


# --- item 4: a dropped slot costs no work in the grouped form ------------------------------------


class _Experts(torch.nn.Module):
    def __init__(self, form, spec):
        super().__init__()
        self.form, self.spec = form, spec

    def forward(self, x, ids, weights, w1, w2):
        return self.form(x, ids, weights, w1, w2, None, None, self.spec)


def _compiled_experts(form, spec, args):
    program = torch.export.export(_Experts(form, spec), args).run_decompositions(decomposition_table())
    text = str(import_program(prepare_program(program), "linalg-on-tensors"))
    return text, IreeModule(compile_for_cpu(text, "linalg-on-tensors"))


def test_dropped_slots_cost_no_work_in_iree():
    """A token whose slots are all dropped has NaN inputs: any work on it would spread NaN (NaN · 0 = NaN).

    The dense form computes every expert on it and gets NaN (so the probe can tell); the grouped form
    never reads its row, so its output is exactly 0 and every other token is right.  Structurally, the
    grouped form's GEMMs run on data-dependent row counts, the dense form's on every token.
    """
    spec, (x, ids, weights, w1, w2, _, _) = _experts_case("gated silu", num_tokens=6)
    x[0] = float("nan")  # token 0 keeps no expert
    args = (x, ids, weights, w1, w2)
    expected = experts_forward(x[1:], ids[1:], weights[1:], w1, w2, None, None, spec).numpy()
    grouped_text, grouped = _compiled_experts(experts_grouped, spec, args)
    dense_text, dense = _compiled_experts(experts_dense, spec, args)
    out = grouped(*[a.numpy() for a in args])[0]
    assert np.isfinite(out).all() and (out[0] == 0).all()
    assert rel_err(out[1:], expected) <= TOLERANCE
    assert np.isnan(dense(*[a.numpy() for a in args])[0][0]).all()
    grouped_gemms = re.findall(r"linalg.matmul ins\(%\S+, %\S+ : tensor<([?\d]+)x", grouped_text)
    assert len(grouped_gemms) == 2 * spec.num_experts and set(grouped_gemms) == {"?"}
    dense_gemms = re.findall(r"linalg.batch_matmul ins\(%\S+, %\S+ : tensor<(\d+)x(\d+)x", dense_text)
    assert dense_gemms and all(rows == str(x.shape[0]) for _, rows in dense_gemms)


# --- failures: clear, naming the block, nothing written ------------------------------------------


def test_unrewritten_block_fails_naming_it(tmp_path):
    model = tiny_model("phimoe", num_hidden_layers=1)
    with pytest.raises(MlirExportError, match=r"block model\.layers\.0\.mlp: .*sparsemixer"):
        export_mlir(model, (token_ids(2, 8),), tmp_path / "phimoe.mlir", "top_p", p=0.4)
    assert list(tmp_path.iterdir()) == []


@torch.library.custom_op("moepass_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_opaque.register_fake
def _opaque_fake(x):
    return torch.empty_like(x)


def test_op_that_does_not_lower_names_block_and_op(tmp_path, monkeypatch):
    """An op torch-mlir does not know (it stays a torch.operator) fails the export, naming block and op."""
    from moepass.lowering.mlir import decompose

    real = decompose._EXPERTS["grouped"]
    monkeypatch.setitem(decompose._EXPERTS, "grouped", lambda x, *rest: real(torch.ops.moepass_test.opaque(x), *rest))
    model = tiny_model("mixtral", num_hidden_layers=1)
    with pytest.raises(MlirExportError, match=r"block model\.layers\.0\.mlp: op torch\.moepass_test\.opaque did not "
                                              r"lower"):
        export_mlir(model, (token_ids(2, 8),), tmp_path / "m.mlir", output_type="torch")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_clear_errors(tmp_path):
    model = tiny_model("mixtral", num_hidden_layers=1)
    with pytest.raises(MlirExportError, match="unknown output_type"):
        export_mlir(model, (token_ids(2, 8),), tmp_path / "m.mlir", output_type="spirv")
    with pytest.raises(MlirExportError, match="unknown experts_form"):
        export_mlir(model, (token_ids(2, 8),), tmp_path / "m.mlir", options=MlirExportOptions(experts_form="loop"))
    sampling = Allocator(weights={"0": torch.randn(model.config.hidden_size, 2)}, sample=True)
    with pytest.raises(MlirExportError, match=r"block model\.layers\.0\.mlp: the allocator policy samples k"):
        export_mlir(model, (token_ids(2, 8),), tmp_path / "m.mlir", sampling)
    with pytest.raises(moepass.OptionsError, match="unknown option"):
        export_mlir(model, (token_ids(2, 8),), tmp_path / "m.mlir", "top_p", q=0.4)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_mlir(tmp_path, capsys):
    out = tmp_path / "cli.mlir"
    assert main(["export", "--model", "zoo:mixtral", "--policy", "top_p", "--p", "0.4", "--format", "mlir",
                 "--output-type", "torch", "--out", str(out), "--tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp: top_p(p=0.4)" in printed and "experts grouped" in printed
    assert block_names(out.read_text()) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert main(["export", "--model", "zoo:mixtral", "--format", "mlir", "--target", "ort",
                 "--out", str(tmp_path / "x.mlir")]) == 2
    assert main(["export", "--model", "zoo:mixtral", "--output-type", "tosa", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--output-type is for --format mlir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.mlir"]
