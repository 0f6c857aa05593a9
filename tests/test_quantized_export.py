"""Quantized experts in the exports: QMoE, MatMulNBits pairs, DequantizeLinear; onnxruntime-genai; MLIR refused.

Each export is run in ONNX Runtime against the torch model it was made from —
the experts quantized as the backend does — and against the eager model on the
dequantized codes (≤ 1e-5 relative), and must differ from the float model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import token_ids  # noqa: E402
from test_quantized import _dequantized_copy, _tiny_mixtral  # noqa: E402

import moepass  # noqa: E402
from moepass.exports.onnx import OnnxExportError, prepare_export  # noqa: E402
from moepass.quantize import parse_scheme  # noqa: E402


def _rel(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _ops(model) -> list[str]:
    names = [n.op_type for n in model.graph.node]
    for function in model.functions:
        names += [n.op_type for n in function.node]
        for node in function.node:  # the portable Loop's and gemm's If bodies
            for attr in node.attribute:
                for graph in [attr.g] if attr.HasField("g") else []:
                    names += [n.op_type for n in graph.node]
                    for inner in graph.node:
                        for a in inner.attribute:
                            if a.HasField("g"):
                                names += [n.op_type for n in a.g.node]
    return names


def _run(model, prepared) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, prepared.feeds())[0]


@pytest.fixture(scope="module")
def mixtral_int4():
    model = _tiny_mixtral()
    ids = token_ids(2, 8)
    prepared = prepare_export(model, (ids,), policy="top_p", p=0.5, experts_dtype="int4", group_size=32)
    reference = _dequantized_copy(model, parse_scheme("int4", 32))
    return model, ids, prepared, reference


@pytest.mark.parametrize("target,layout,op", [
    ("ort", "auto", "QMoE"), ("ort", "gemm", "MatMulNBits"), ("portable", "auto", "DequantizeLinear"),
])
def test_every_form_matches_the_quantized_torch_model(mixtral_int4, target, layout, op):
    model, ids, prepared, reference = mixtral_int4
    lowered, blocks = prepared.lower(target, ort_layout=layout)
    ops = _ops(lowered)
    assert op in ops and "MoE" not in ops
    assert all("int4 g32" in b.experts for b in blocks)
    metadata = {p.key: p.value for n in lowered.graph.node for p in n.metadata_props}
    assert '"bits": 4' in metadata["moepass.quantization"]
    out = _run(lowered, prepared)
    torch_out = prepared.reference()[0].numpy()
    assert _rel(out, torch_out) <= 1e-5
    with torch.no_grad():
        float_out = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "policy": "top_p", "p": 0.5})(ids).logits
    assert _rel(out, float_out.numpy()) > 1e-4  # quantized, not the float experts


def test_qmoe_gets_the_exact_slot_weights_through_router_weights(mixtral_int4):
    _, _, prepared, _ = mixtral_int4
    lowered, _ = prepared.lower("ort")
    qmoe = [n for f in lowered.functions for n in f.node if n.op_type == "QMoE"]
    assert qmoe and all(len(n.input) == 15 and n.input[14] for n in qmoe)  # input 14: router_weights
    attrs = {a.name: helper_value(a) for a in qmoe[0].attribute}
    assert attrs["expert_weight_bits"] == 4 and attrs["block_size"] == 32 and attrs["normalize_routing_weights"] == 0


def helper_value(attr):
    return onnx.helper.get_attribute_value(attr)


def test_static_int8_export_equals_the_eager_model_on_dequantized_experts(tmp_path):
    model = _tiny_mixtral()
    ids = token_ids(2, 8)
    result = moepass.export_onnx(model, (ids,), tmp_path / "int8.onnx", experts_dtype="int8")
    assert "QMoE int8 per-channel" in result.blocks[0].experts and result.max_error <= 1e-5
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    with torch.no_grad():
        expected = _dequantized_copy(model, parse_scheme("int8"))(ids).logits.numpy()
    assert _rel(out, expected) <= 1e-5


def test_quantized_exports_refuse_layouts_they_have_no_form_for(mixtral_int4):
    _, _, prepared, _ = mixtral_int4
    with pytest.raises(OnnxExportError, match="quantized experts export with ort_layout 'masked'"):
        prepared.lower("ort", ort_layout="slots")


def test_mlir_export_of_quantized_experts_is_refused_with_the_reason(tmp_path):
    with pytest.raises(moepass.MlirExportError, match="quantized experts"):
        moepass.export_mlir(_tiny_mixtral(), (token_ids(1, 4),), tmp_path / "m.mlir", experts_dtype="int4",
                            group_size=32)
    assert not (tmp_path / "m.mlir").exists()


try:
    import onnxruntime_genai as og
except ImportError:
    og = None

PROMPT = list(b"import os\n\n\ndef read_config(path):\n    ")


@pytest.mark.slow
@pytest.mark.skipif(og is None, reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")
def test_genai_folder_of_int4_experts_generates_what_the_compiled_model_does(tmp_path):
    """onnxruntime-genai loads the quantized folder and its greedy tokens are those of a greedy loop over
    torch.compile with the same experts_dtype and policy (int4, top-p)."""
    from moepass import bundled

    model = bundled.load_model()
    options = {"policy": "top_p", "p": 0.65, "experts_dtype": "int4", "group_size": 64}
    exported = moepass.export_genai(model, tmp_path / "genai", **options)
    assert all("QMoE int4 g64" in b.experts for b in exported.onnx.blocks)
    assert (tmp_path / "genai" / "model.onnx").stat().st_size < 6e6  # float32 experts alone are 12.6 MB
    generator_model = og.Model(str(tmp_path / "genai"))
    params = og.GeneratorParams(generator_model)
    max_length = len(PROMPT) + 8
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(generator_model, params)
    generator.append_tokens([PROMPT])
    while not generator.is_done():
        generator.generate_next_token()
    tokens = [int(t) for t in generator.get_sequence(0)]
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", **options})
    sequence = torch.tensor([PROMPT])
    with torch.no_grad():
        while sequence.shape[1] < max_length:
            nxt = compiled(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, nxt], dim=1)
    assert tokens == sequence[0].tolist() and len(tokens) > len(PROMPT)
