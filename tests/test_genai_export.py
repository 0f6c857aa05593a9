"""The onnxruntime-genai export: a folder with the KV cache in and out, run by the real client.

The bundled model is exported three times — static (weights forced into an
external data file), top-p through the CLI, and the bundled sensitivity
artefact — and each folder is checked three ways:

* structure: genai_config.json names exactly the graph's inputs and outputs,
  symbolic batch/sequence/past axes, one ``moepass.AdaptiveMoE`` node per block;
* plain ONNX Runtime: a prefill with an empty cache and decode steps fed the
  present tensors give the logits of the torch model (eager transformers with
  its DynamicCache for static; ``torch.compile(backend="adaptive_moe")`` with
  the same policy, run on the whole sequence without a cache, for adaptive);
* onnxruntime-genai: greedy generation from token ids gives the tokens of
  transformers' ``generate()`` (static) and of a greedy loop over the compiled
  model (adaptive).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's translator

from conftest import token_ids
from moepass.lowering.onnx import DEFAULT_ORT_LAYOUTS, DOMAIN, OP_TYPE, default_ort_layout
from moepass.lowering.onnx.kv_cache import cache_layout

import moepass
from moepass.cli.main import main
from moepass.exports.genai import _move_into_place, export_genai, genai_config
from moepass.exports.onnx import OnnxExportError, OnnxExportOptions, prepare_export
from moepass.zoo import tiny_model

try:
    import onnxruntime_genai as og
except ImportError:  # the tests that need the client skip, saying so
    og = None

needs_genai = pytest.mark.skipif(og is None, reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")

TOLERANCE = 1e-4
PROMPT = list(b"import os\n\n\ndef read_config(path):\n    ")
MAX_LENGTH = len(PROMPT) + 24
TOP_P = 0.65


def rel_err(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def bundled():
    from moepass import bundled

    try:
        return bundled, bundled.load_model()
    except FileNotFoundError as error:
        pytest.skip(f"the bundled checkpoint is missing: {error}")


def policy_options(bundled_module, name: str) -> dict:
    if name == "top_p":
        return {"policy": "top_p", "p": TOP_P}
    if name == "static":
        return {"policy": "static"}
    return {"policy": bundled_module.load_policy(name)}


@pytest.fixture(scope="module")
def exports(bundled, tmp_path_factory):
    """Export folders by policy name, made on first use: static, top_p (through the CLI), sensitivity."""
    bundled_module, model = bundled
    made: dict[str, tuple[Path, str]] = {}

    def get(name: str) -> tuple[Path, str]:
        if name not in made:
            folder = tmp_path_factory.mktemp(f"genai_{name}") / "out"
            printed = io.StringIO()
            if name == "top_p":  # the command line, as a user would run it
                with contextlib.redirect_stdout(printed):
                    code = main(["export", "--model", "bundled", "--policy", "top_p", "--p", str(TOP_P), "--format",
                                 "genai", "--out", str(folder)])
                assert code == 0
            else:
                options = OnnxExportOptions(external_data=name == "static")
                printed.write(str(export_genai(model, folder, options=options, **policy_options(bundled_module, name))))
            made[name] = (folder, printed.getvalue())
        return made[name]

    return get


def compiled_model(model, bundled_module, name: str):
    options = {"inner": "eager", **policy_options(bundled_module, name)}
    return torch.compile(model, backend="adaptive_moe", options=options)


def layer_names(kind: str, layers: int) -> list[str]:
    return [f"{kind}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def test_folder_holds_what_genai_config_names(bundled, exports):
    _, model = bundled
    folder, printed = exports("static")
    cfg = model.config
    assert sorted(p.name for p in folder.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data",
                                                        "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "model.onnx" and config["model"]["type"] == "decoder"
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], decoder["hidden_size"]) == (
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size)
    assert config["model"]["context_length"] == config["search"]["max_length"] == cfg.max_position_embeddings
    assert config["model"]["eos_token_id"] == cfg.eos_token_id and config["model"]["vocab_size"] == cfg.vocab_size
    assert config["search"]["past_present_share_buffer"] is False and decoder["session_options"]["provider_options"] == []

    loaded = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in loaded.graph.input}
    outputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in loaded.graph.output}
    layers = cfg.num_hidden_layers
    names = decoder["inputs"]
    expected_inputs = [names["input_ids"], names["attention_mask"], names["position_ids"]]
    expected_inputs += [names[f"past_{kv}_names"] % i for i in range(layers) for kv in ("key", "value")]
    assert list(inputs) == expected_inputs == ["input_ids", "attention_mask", "position_ids",
                                               *layer_names("past_key_values", layers)]
    assert list(outputs) == [decoder["outputs"]["logits"], *layer_names("present", layers)]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs["past_key_values.0.key"] == ["batch_size", 4, "past_sequence_length", 32]
    assert outputs["present.3.value"] == ["batch_size", 4, "total_sequence_length", 32]
    assert outputs["logits"] == ["batch_size", "sequence_length", cfg.vocab_size]
    # the MoE blocks are the same one-node-per-block export as without a cache
    blocks = [n.name for n in loaded.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    assert blocks == [f"model.layers.{i}.mlp" for i in range(layers)]
    assert any(n.op_type == "MoE" for f in loaded.functions for n in f.node)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in loaded.graph.initializer if t.name.endswith("proj"))
    assert "prefill" in printed and "decode" in printed


def run_plain(folder: Path, prompt: list[int], steps: list[int]) -> list[np.ndarray]:
    """Logits of a prefill on ``prompt`` (empty cache), then of one decode step per token of ``steps``."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    kv_heads, head = session.get_inputs()[3].shape[1], session.get_inputs()[3].shape[3]
    past = [np.zeros((1, kv_heads, 0, head), np.float32) for _ in names[3:]]
    logits, done = [], 0
    for tokens in [prompt, *[[t] for t in steps]]:
        feeds = {"input_ids": np.array([tokens], np.int64),
                 "attention_mask": np.ones((1, done + len(tokens)), np.int64),
                 "position_ids": np.arange(done, done + len(tokens), dtype=np.int64)[None]}
        feeds.update(zip(names[3:], past))
        out = session.run(None, feeds)
        logits.append(out[0])
        past, done = out[1:], done + len(tokens)
        assert past[0].shape[2] == done  # present = past + this call's tokens
    return logits


@pytest.mark.parametrize("name", ["static", "top_p", "sensitivity"])
def test_plain_onnxruntime_prefill_and_decode_match_torch(bundled, exports, name):
    bundled_module, model = bundled
    folder, _ = exports(name)
    steps = list(b"return ")
    actual = run_plain(folder, PROMPT, steps)
    sequence = torch.tensor([PROMPT + steps])
    with torch.no_grad():
        if name == "static":  # eager transformers, with its own KV cache
            out = model(sequence[:, : len(PROMPT)], use_cache=True)
            expected = [out.logits]
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            keyword = cache_layout(model).cache_keyword  # "cache" from transformers 5.24, else "past_key_values"
            for i, token in enumerate(steps):
                step = model(torch.tensor([[token]]), use_cache=True, position_ids=torch.tensor([[len(PROMPT) + i]]),
                             **{keyword: cache})
                expected.append(step.logits)
        else:  # the compiled model with the same policy, the whole sequence at once
            full = compiled_model(model, bundled_module, name)(sequence, use_cache=False).logits
            expected = [full[:, : len(PROMPT)]] + [full[:, len(PROMPT) + i : len(PROMPT) + i + 1] for i in range(len(steps))]
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert rel_err(a, e.numpy()) <= TOLERANCE, (name, "prefill" if step == 0 else f"decode {step}")
    if name != "static":  # the policy is really applied: the logits differ from the static export's
        static = run_plain(exports("static")[0], PROMPT, steps)
        assert max(rel_err(a, s) for a, s in zip(actual, static)) > 1e-3


def genai_greedy(folder: Path, prompt: list[int], max_length: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]


@needs_genai
def test_genai_greedy_matches_transformers_generate(bundled, exports):
    bundled_module, model = bundled
    folder, _ = exports("static")  # weights in model.onnx.data: the client loads them from beside the model
    tokens = genai_greedy(folder, PROMPT, MAX_LENGTH)
    with torch.no_grad():
        expected = model.generate(torch.tensor([PROMPT]), max_length=MAX_LENGTH, do_sample=False,
                                  pad_token_id=model.config.eos_token_id)
    assert tokens == expected[0].tolist()
    assert len(tokens) > len(PROMPT)
    # the folder's tokenizer (the bundled byte vocabulary) works in the client: text in, text out
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    text = bytes(PROMPT).decode()
    assert list(tokenizer.encode(text)) == PROMPT
    assert tokenizer.decode(tokens) == bundled_module.decode(tokens)


@needs_genai
@pytest.mark.parametrize("name", ["top_p", "sensitivity"])
def test_genai_greedy_matches_compiled_model(bundled, exports, name):
    bundled_module, model = bundled
    folder, _ = exports(name)
    tokens = genai_greedy(folder, PROMPT, MAX_LENGTH)
    compiled = compiled_model(model, bundled_module, name)
    sequence = torch.tensor([PROMPT])
    with torch.no_grad():
        while sequence.shape[1] < MAX_LENGTH:
            nxt = compiled(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, nxt], dim=1)
            if nxt.item() == model.config.eos_token_id:
                break
    assert tokens == sequence[0].tolist()


def test_cli_writes_the_folder(exports):
    folder, printed = exports("top_p")
    # 15 MB: the weights stay inside model.onnx; the bundled model's byte tokenizer comes along
    assert sorted(p.name for p in folder.iterdir()) == ["genai_config.json", "model.onnx", "tokenizer.json",
                                                        "tokenizer_config.json"]
    assert "onnxruntime-genai folder" in printed and f"top_p(p={TOP_P:g})" in printed
    assert "dropped slots masked" in printed and "decode" in printed


def test_refusals_leave_nothing_behind(tmp_path):
    windowed = tiny_model("mixtral", num_hidden_layers=1, sliding_window=4)
    with pytest.raises(OnnxExportError, match="sliding window 4"):
        export_genai(windowed, tmp_path / "windowed", "top_p", p=0.5)
    with pytest.raises(OnnxExportError, match="attention layers of kind sliding_attention"):
        export_genai(tiny_model("gpt_oss", num_hidden_layers=1), tmp_path / "gpt_oss")
    with pytest.raises(OnnxExportError, match="cached keys and values differ in shape"):  # MLA: K and V head sizes
        export_genai(tiny_model("deepseek_v3", num_hidden_layers=1), tmp_path / "deepseek")
    with pytest.raises(OnnxExportError, match="no eos_token_id"):
        export_genai(tiny_model("qwen3_moe", num_hidden_layers=1), tmp_path / "qwen3")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(OnnxExportError, match="not empty and holds no genai_config.json"):
        export_genai(tiny_model("mixtral", num_hidden_layers=1), occupied)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    assert main(["export", "--model", "zoo:mixtral", "--format", "genai", "--out", str(occupied)]) == 2


def test_another_family_with_shared_experts(tmp_path):
    """Qwen2-MoE (sigmoid-gated shared expert, unnormalised top-k weights): prefill and decode steps in plain
    ONNX Runtime give eager transformers' logits with its own cache."""
    model = tiny_model("qwen2_moe", num_hidden_layers=2, eos_token_id=1)
    result = export_genai(model, tmp_path / "qwen2", "static")
    assert [b.path for b in result.onnx.blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    prompt, steps = token_ids(1, 6, seed=3)[0].tolist(), [5, 9]
    actual = run_plain(tmp_path / "qwen2", prompt, steps)
    keyword = cache_layout(model).cache_keyword
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        expected, cache = [out.logits], getattr(out, keyword)
        for i, token in enumerate(steps):
            step = model(torch.tensor([[token]]), use_cache=True, position_ids=torch.tensor([[len(prompt) + i]]),
                         **{keyword: cache})
            expected.append(step.logits)
    for a, e in zip(actual, expected):
        assert rel_err(a, e.numpy()) <= TOLERANCE


def test_tokenizer_files_come_along(tmp_path):
    """A tokenizer folder's files are copied; one without tokenizer.json is refused before anything runs."""
    from moepass.bundled import BUNDLED_DIR

    model = tiny_model("mixtral", num_hidden_layers=1)
    with pytest.raises(OnnxExportError, match="has no tokenizer.json"):
        export_genai(model, tmp_path / "out", tokenizer=tmp_path)
    assert list(tmp_path.iterdir()) == []
    result = export_genai(model, tmp_path / "out", "top_p", p=0.5, tokenizer=BUNDLED_DIR,
                          options=OnnxExportOptions(ort_layout="gemm"))  # and the Gemm-pair layout in a cached model
    assert result.files == ["genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
    assert all(b.experts.startswith("Gemm pair") for b in result.onnx.blocks)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (BUNDLED_DIR / "tokenizer.json").read_bytes()
    config = result.config["model"]
    assert (config["decoder"]["num_key_value_heads"], config["vocab_size"]) == (model.config.num_key_value_heads,
                                                                                 model.config.vocab_size)
    assert result.errors["prefill"] <= TOLERANCE and result.errors["decode"] <= TOLERANCE
    if og is not None:
        assert len(genai_greedy(tmp_path / "out", [3, 1, 4, 1, 5], 12)) > 5  # it loads and generates


def test_reexport_replaces_a_previous_export(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "genai_config.json").write_text("{}")
    (folder / "model.onnx.data").write_text("stale")
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "genai_config.json").write_text('{"new": 1}')
    _move_into_place(staging, folder)
    assert [p.name for p in folder.iterdir()] == ["genai_config.json"]  # nothing stale left beside the new files
    assert json.loads((folder / "genai_config.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def moe_ks(model) -> list[int]:
    return sorted({a.i for f in model.functions for n in f.node if n.op_type == "MoE" for a in n.attribute
                   if a.name == "k"})


def test_default_layout_per_provider():
    """CPU: one k_max call, dropped slots at weight 0 (skipped by ORT's CPU kernel); CUDA: a k = 1 row per kept slot."""
    assert DEFAULT_ORT_LAYOUTS == {"cpu": "masked", "cuda": "slots"}
    assert default_ort_layout("cpu") == "masked" and default_ort_layout("cuda") == "slots"
    with pytest.raises(ValueError, match="unknown provider 'rocm'"):
        default_ort_layout("rocm")
    prepared = prepare_export(tiny_model("mixtral", num_hidden_layers=1), (token_ids(2, 8),), policy="top_p", p=0.4)
    cpu, cpu_blocks = prepared.lower("ort")
    cuda, cuda_blocks = prepared.lower("ort", provider="cuda")
    assert moe_ks(cpu) == [2] and cpu_blocks[0].experts == "com.microsoft.MoE (k=2, dropped slots masked)"
    assert moe_ks(cuda) == [1] and cuda_blocks[0].experts == "com.microsoft.MoE (k=1 per kept slot)"
    feeds = prepared.feeds()
    expected = prepared.reference()[0].numpy()
    for model in (cpu, cuda):  # the same numbers either way (run here on the CPU provider)
        actual = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        assert rel_err(actual, expected) <= TOLERANCE
    with pytest.raises(OnnxExportError, match="unknown provider 'tpu'"):
        prepared.lower("ort", provider="tpu")


def test_genai_config_provider_and_search(bundled):
    _, model = bundled
    layout = cache_layout(model)
    config = genai_config(model, layout, provider="cuda", context_length=256, search={"top_k": 5})
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]
    assert config["model"]["context_length"] == config["search"]["max_length"] == 256
    assert config["search"]["top_k"] == 5 and config["search"]["do_sample"] is False
    with pytest.raises(OnnxExportError, match="unknown search options beam_width"):
        genai_config(model, layout, search={"beam_width": 2})
    assert (layout.num_layers, layout.num_kv_heads, layout.head_size, layout.vocab_size) == (4, 4, 32, 257)
    assert moepass.export_genai is export_genai
