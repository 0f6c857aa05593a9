"""moepass.inspect, its HTML/text/JSON report, and `moepass inspect` on good and bad input.

Structural checks (which blocks, which ops before and after) pair with the
numbers (tokens per k, FLOPs relative to static).  The browser test renders
the page in headless Chromium where it is installed and skips, saying why,
where it is not.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import token_ids

import moepass
from moepass.cli.main import main, parse_policy_params
from moepass.reports import charts, graphview
from moepass.reports.graphview import draw, readable_code, to_networkx
from moepass.reports.html_report import REPORT_FILES, render_html, write_report
from moepass.reports.inspection import BlockRun, InspectionReport
from moepass.runtime.report import Report
from moepass.zoo import tiny_config, tiny_model

TOKENS = (2, 12)
ARTIFACTS = Path(os.environ.get("MOEPASS_TEST_ARTIFACTS", "")) if os.environ.get("MOEPASS_TEST_ARTIFACTS") else None


def _example(batch: int = TOKENS[0], length: int = TOKENS[1]) -> dict:
    return {"input_ids": token_ids(batch, length), "use_cache": False}


POLICY = {"policy": "top_p", "p": 0.4}


@pytest.fixture(scope="module")
def mixtral() -> tuple[torch.nn.Module, InspectionReport]:
    """A 2-layer tiny Mixtral (grouped_mm experts) inspected once under top_p(p=0.4)."""
    torch._dynamo.reset()
    model = tiny_model("mixtral")
    return model, moepass.inspect(model, _example(), **POLICY)


@pytest.fixture(scope="module")
def mixtral_html(mixtral, tmp_path_factory) -> Path:
    """The fixture's report written to disk."""
    return write_report(mixtral[1], tmp_path_factory.mktemp("report") / "report", show_progress=False)


# --- the report: blocks and numbers ------------------------------------------------------------


def test_lists_the_same_blocks_as_the_backends_own_report(mixtral):
    model, inspection = mixtral
    fast = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", **POLICY})
    with torch.no_grad():
        fast(**_example())
    own = moepass.report(fast)
    assert own is not inspection.report  # compiled independently
    key = lambda b: (b.path, b.router, b.router_description, b.dispatch, b.num_experts, b.top_k, b.rewritten)  # noqa: E731
    assert [key(b) for b in inspection.blocks] == [key(b) for b in own.blocks]
    assert [b.path for b in inspection.blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    text = str(inspection)
    for block in own.blocks:
        assert f"{block.path}: rewritten" in text
    assert text.count("softmax_topk (softmax→top2→renorm)") == 2
    assert text.count("dispatch  grouped_mm → moepass.route + moepass.experts") == 2
    assert "4 routed (gated silu, [E,out,in]); native k 2" in text
    assert "shared    none" in text and "policy top_p(p=0.4" in text


def _first_block_tokens_per_k(model: torch.nn.Module, p: float) -> list[int]:
    """Tokens per k of top_p in the first block, from eager router logits and the plain-Python reference.

    Only the first block: its input is the same with and without the pass;
    later blocks see what the adaptive layers before them computed.
    """
    from reference_routing import Router, route_token

    mlp = model.model.layers[0].mlp
    seen: list[torch.Tensor] = []
    hook = mlp.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(**_example())
    finally:
        hook.remove()
    x = seen[0].reshape(-1, seen[0].shape[-1])
    logits = (x.double() @ mlp.gate.weight.double().T).tolist()
    router = Router("softmax_topk", num_experts=4, top_k=2, renormalize=True)
    counts = [0, 0, 0]
    for row in logits:
        ids, _, margins = route_token(row, router, "top_p", {"p": p})
        assert min(abs(m) for m in margins) > 1e-5, "a token sits on the threshold: pick another seed"
        counts[sum(1 for e in ids if e < 4)] += 1
    return counts


def test_numbers_follow_the_routing(mixtral):
    model, inspection = mixtral
    tokens = TOKENS[0] * TOKENS[1]
    assert inspection.runs["model.layers.0.mlp"].tokens_per_k == _first_block_tokens_per_k(model, POLICY["p"])
    assert sorted(inspection.runs) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for run in inspection.runs.values():
        assert run.tokens == tokens and 0 < run.tokens_per_k[1] < tokens  # adaptive: some tokens kept one expert
        assert run.average_k == pytest.approx((run.tokens_per_k[1] + 2 * run.tokens_per_k[2]) / tokens)
        assert run.relative_flops == pytest.approx(run.average_k / 2) and run.saved > 0
        assert run.expert_flops == run.slots * 6 * 64 * 128  # gated: 6·H·I per token and expert
    text = str(inspection)
    for run in inspection.runs.values():
        assert f"{tokens} tokens, average k {run.average_k:.2f} (native 2)" in text
        counts = run.tokens_per_k
        assert f"k=0: {counts[0]}  k=1: {counts[1]}  k=2: {counts[2]}" in text
        assert f"{run.relative_flops:.1%} of static expert FLOPs ({run.saved:.1%} saved)" in text
    assert f"expert FLOPs: {inspection.relative_flops:.1%} of static" in text


def test_block_numbers_from_counts():
    run = BlockRun("a", native_k=2, num_experts=4, tokens_per_k=[2, 3, 5], flops_per_slot=10)
    assert (run.tokens, run.slots) == (10, 13)
    assert run.average_k == pytest.approx(1.3)
    assert run.relative_flops == pytest.approx(0.65) and run.saved == pytest.approx(0.35)
    assert (run.expert_flops, run.static_expert_flops) == (130, 200)
    # the model's total weights each block by its expert size (FLOPs, not slots)
    big = BlockRun("b", native_k=2, num_experts=4, tokens_per_k=[0, 10, 0], flops_per_slot=100)
    inspection = InspectionReport(report=Report(), runs={"a": run, "b": big})
    assert inspection.relative_flops == pytest.approx((130 + 1000) / (200 + 2000))
    assert BlockRun("c", 2, 4, [0, 0, 0]).relative_flops == 1.0  # no tokens: nothing saved


def test_block_left_alone_is_listed_with_its_reason():
    torch._dynamo.reset()
    inspection = moepass.inspect(tiny_model("phimoe", num_hidden_layers=1), _example(1, 6))
    (block,) = inspection.blocks
    assert not block.rewritten and block.reason and block.graph_after is None
    assert inspection.runs == {}
    text = str(inspection)
    assert "model.layers.0.mlp: left as it was" in text and f"why not   {block.reason}" in text
    assert "not rewritten: the model's own code ran" in text
    page = render_html(inspection, show_progress=False)
    assert "left as it was" in page and "The block was not rewritten." in page


def test_bad_options_fail_with_the_backends_message():
    with pytest.raises(moepass.OptionsError, match="unknown option.*'q'.*policy 'static'"):
        moepass.inspect(torch.nn.Linear(2, 2), torch.randn(1, 2), q=1)


# --- before/after views ----------------------------------------------------------------------


def _ops(graph) -> set[str]:
    return {data["op"] for _, data in to_networkx(graph).nodes(data=True)}


def test_after_graph_has_the_moepass_ops_and_not_the_dispatch(mixtral):
    block = mixtral[1].blocks[0]
    before, after = _ops(block.graph_before), _ops(block.graph_after)
    assert "transformers::grouped_mm_fallback" in before and "topk" in before
    assert {"moepass::route", "moepass::experts"} <= after
    assert not after & graphview.DISPATCH_OPS and "topk" not in after and "sort" not in after
    kinds = {d["label"].split("\n")[0]: d["kind"] for _, d in to_networkx(block.graph_after).nodes(data=True)}
    assert kinds["moepass.experts"] == kinds["moepass.route"] == "moepass"
    # the picture says the same: the drawn labels
    drawn_after = draw(to_networkx(block.graph_after, block.path)).data.decode("latin-1")
    drawn_before = draw(to_networkx(block.graph_before, block.path)).data.decode("latin-1")
    if graphview.graphviz_available():  # SVG text carries the labels
        assert "moepass.experts" in drawn_after and "grouped_mm_fallback" not in drawn_after
        assert "grouped_mm_fallback" in drawn_before and "moepass" not in drawn_before


def test_batched_mm_dispatch_is_replaced_too():
    torch._dynamo.reset()
    model = tiny_model("mixtral", experts_implementation="batched_mm", num_hidden_layers=1)
    inspection = moepass.inspect(model, _example(1, 6))
    (block,) = inspection.blocks
    assert block.dispatch == "batched_mm" and block.rewritten
    assert inspection.runs[block.path].tokens_per_k == [0, 0, 6]  # static: native k for every token
    assert "bmm" in _ops(block.graph_before) and "bmm" not in _ops(block.graph_after)
    assert "moepass::experts" in _ops(block.graph_after)


def test_readable_code_names_parameters_after_their_module(mixtral):
    block = mixtral[1].blocks[0]
    before, after = readable_code(block.graph_before, block.path), readable_code(block.graph_after, block.path)
    assert before.startswith("def forward(self, ") and "gate_weight" in before and "experts_gate_up_proj" in before
    assert "torch.ops.transformers.grouped_mm_fallback(" in before
    assert "torch.ops.moepass.experts.default(" in after and "grouped_mm" not in after.replace('"grouped_mm"', "")
    assert "l_self_modules" not in before + after and not re.search(r"= None$", before + after, re.MULTILINE)
    compile(before, "before", "exec")  # still Python
    compile(after, "after", "exec")


def test_drawing_falls_back_to_matplotlib_without_graphviz(mixtral, monkeypatch):
    monkeypatch.setattr(graphview.shutil, "which", lambda name: None)
    block = mixtral[1].blocks[0]
    drawing = draw(to_networkx(block.graph_after, block.path))
    assert drawing.engine == "matplotlib" and drawing.mime == "image/png" and drawing.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Graphviz (dot) is not installed" in drawing.note
    page = render_html(mixtral[1], show_progress=False)
    assert "Graphviz (dot) is not installed: graphs are drawn with matplotlib instead." in page
    assert 'class="graph graph-after"' in page and "data:image/svg+xml" not in page


def test_report_without_graphviz_or_matplotlib_still_renders(mixtral, monkeypatch):
    monkeypatch.setattr(graphview.shutil, "which", lambda name: None)
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    assert not charts.matplotlib_available()
    page = render_html(mixtral[1], show_progress=False)
    assert "Neither Graphviz (dot) nor matplotlib is installed" in page
    assert "charts are shown as tables only" in page
    assert "<img" not in page and "torch.ops.moepass.experts.default(" in page
    assert page.count('class="block"') == 2


# --- the HTML page ---------------------------------------------------------------------------


def test_html_is_self_contained(mixtral, mixtral_html):
    page = (mixtral_html / "index.html").read_text(encoding="utf-8")
    references = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert references and all(r.startswith(("data:image/", "#")) for r in references), references
    assert not re.search(r"<(script|link|iframe|object|embed)\b", page)
    assert "@import" not in page and not re.search(r"url\(\s*['\"]?(https?:)?//", page)
    images = re.findall(r'<img [^>]*src="data:(image/[a-z+]+);base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 * 2 + 2 + 1  # before/after per block, a k chart per block, the layer chart
    for mime, data in images:
        raw = base64.b64decode(data, validate=True)
        assert raw.startswith(b"\x89PNG") if mime == "image/png" else b"<svg" in raw
    for block in ("model.layers.0.mlp", "model.layers.1.mlp"):
        assert f'data-path="{block}"' in page and f'class="chart k-chart" data-block="{block}"' in page
    written = json.loads((mixtral_html / "report.json").read_text())
    assert [b["path"] for b in written["blocks"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert written["blocks"][0]["run"]["tokens_per_k"] == mixtral[1].runs["model.layers.0.mlp"].tokens_per_k
    assert written["policy"].startswith("top_p(p=0.4") and written["relative_expert_flops"] < 1
    assert "moepass.experts" in written["blocks"][0]["code_after"]
    assert (mixtral_html / "report.txt").read_text().startswith("moepass inspection of MixtralForCausalLM")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


_COUNT_DECODED = """<script>addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length + "/" + images.length;
});</script>"""


def test_page_renders_in_headless_chromium(mixtral_html, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the page was not rendered")
    # a copy with a probe that counts the images the browser decoded (the report itself has no script)
    probe = tmp_path / "probe.html"
    probe.write_text((mixtral_html / "index.html").read_text().replace("</body>", _COUNT_DECODED + "</body>"))
    flags = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", "--window-size=1400,2200", f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    dom = subprocess.run(
        flags + ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-decoded="7/7"' in dom.stdout, re.findall(r"data-decoded=\"[^\"]*\"", dom.stdout)
    for block in ("model.layers.0.mlp", "model.layers.1.mlp"):
        assert f'data-path="{block}"' in dom.stdout
    assert dom.stdout.count('class="chart k-chart"') == 2 and 'class="chart layers-chart"' in dom.stdout
    shot_dir = ARTIFACTS or tmp_path
    shot_dir.mkdir(parents=True, exist_ok=True)
    shot = shot_dir / "inspect-report.png"
    taken = subprocess.run(
        flags + [f"--screenshot={shot}", (mixtral_html / "index.html").as_uri()], capture_output=True, text=True,
        timeout=120,
    )
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1400, 2200)
    histogram = image.histogram()
    non_white = sum(histogram[:240]) / sum(histogram)
    assert 0.02 < non_white < 0.9, non_white  # text, tables, charts: neither blank nor a solid block


# --- the command line ------------------------------------------------------------------------


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["inspect", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("moepass inspect: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _bad_model_specs(tmp_path: Path) -> list[tuple[str, str]]:
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "no_type.json").write_text('{"hidden_size": 8}')
    (tmp_path / "unknown_type.json").write_text('{"model_type": "no_such_model_type"}')
    huge = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=16, num_local_experts=16)
    (tmp_path / "huge.json").write_text(json.dumps({**tiny_config("mixtral").to_dict(), **huge}))  # ~720 GB
    (tmp_path / "models.py").write_text("def make():\n    raise RuntimeError('out of tea')\n\ndef not_a_model():\n    return 3\n")
    (tmp_path / "syntax.py").write_text("def make(:\n")
    return [
        (str(tmp_path / "missing.json"), "model config .*missing.json does not exist"),
        (str(tmp_path / "broken.json"), "broken.json is not valid JSON"),
        (str(tmp_path / "no_type.json"), 'no_type.json has no "model_type"'),
        (str(tmp_path / "unknown_type.json"), "unknown_type.json: .*no_such_model_type"),
        (str(tmp_path / "huge.json"), "huge.json describes .* GB of float32 weights, more than this machine can hold"),
        (f"{tmp_path / 'models.py'}:absent", "models.py has no function 'absent' \\(it has make, not_a_model\\)"),
        (f"{tmp_path / 'models.py'}:make", "make\\(\\) failed: RuntimeError: out of tea"),
        (f"{tmp_path / 'models.py'}:not_a_model", "returned int, not a torch.nn.Module"),
        (f"{tmp_path / 'syntax.py'}:make", "cannot import .*syntax.py: SyntaxError"),
        (f"{tmp_path / 'nowhere.py'}:make", "model file .*nowhere.py does not exist"),
        ("bundled", "^moepass inspect: error: the bundled model is not available in this build$"),
        ("zoo:nope", "unknown family 'nope'"),
        ("what-is-this", "cannot load model 'what-is-this': expected a transformers config.json"),
    ]


def test_cli_bad_model_specs(tmp_path, capsys):
    out = tmp_path / "out"
    for spec, message in _bad_model_specs(tmp_path):
        if spec == "bundled" and moepass_has_bundled():
            continue
        code, stdout, err = _run_cli(capsys, "--model", spec, "--out", str(out))
        assert code == 2, (spec, err)
        assert re.search(message, _one_error_line(err)), (spec, err)
        assert not out.exists() and stdout == ""


def moepass_has_bundled() -> bool:
    try:
        import moepass.bundled  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def test_cli_bad_policy_file(tmp_path, capsys):
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "policy.json").write_text("{this is not json")
    code, _, err = _run_cli(capsys, "--model", "zoo:mixtral", "--policy-file", str(folder), "--out", str(tmp_path / "o"))
    assert code == 2
    assert re.search(r"cannot load the policy file: .*policy\.json: does not parse", _one_error_line(err)), err
    moepass.policies.make_policy("top_p", p=0.5).save(folder)
    code, _, err = _run_cli(capsys, "--model", "zoo:mixtral", "--policy-file", str(folder), "--p", "0.3", "--out", str(tmp_path / "o"))
    assert code == 2 and "a saved policy carries its own parameters" in _one_error_line(err)
    code, _, err = _run_cli(capsys, "--model", "zoo:mixtral", "--policy-file", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and "policy file" in _one_error_line(err) and "nope does not exist" in err
    assert not (tmp_path / "o").exists()


def test_cli_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out, why in ((blocker / "report", "a-file is not a directory"), (blocker, "exists and is not a directory")):
        code, _, err = _run_cli(capsys, "--model", "zoo:mixtral", "--out", str(out))
        assert code == 2 and why in _one_error_line(err) and "cannot write the report to" in err
    assert _entries(tmp_path) == ["a-file"] and blocker.read_text() == ""


def test_cli_bad_policy_parameters(tmp_path, capsys):
    code, _, err = _run_cli(capsys, "--model", "zoo:mixtral", "--q", "0.4", "--out", str(tmp_path / "o"))
    assert code == 2 and re.search(r"unknown option\(s\) 'q' for policy 'static'", _one_error_line(err))
    code, _, err = _run_cli(capsys, "--model", "zoo:mixtral", "--policy", "nope", "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown policy 'nope'; valid policies:" in _one_error_line(err)
    code, _, err = _run_cli(capsys, "--model", "zoo:mixtral", "stray", "--out", str(tmp_path / "o"))
    assert code == 2 and "unexpected argument 'stray'" in _one_error_line(err)
    assert not (tmp_path / "o").exists()


def test_policy_parameters_are_parsed_as_numbers():
    assert parse_policy_params(["--p", "0.4", "--k-max=2", "--renormalize", "false", "--bias", "-1e-3"]) == {
        "p": 0.4,
        "k_max": 2,
        "renormalize": False,
        "bias": -1e-3,
    }
    with pytest.raises(ValueError, match="--p needs a value"):
        parse_policy_params(["--p"])


def test_cli_writes_the_report_from_a_config_json(tmp_path, capsys):
    torch._dynamo.reset()
    config = tmp_path / "config.json"
    tiny_config("olmoe", num_hidden_layers=1).to_json_file(config)
    out = tmp_path / "nested" / "report"
    code, stdout, err = _run_cli(capsys, "--model", str(config), "--out", str(out), "--tokens", "8")
    assert code == 0, err
    assert "model.layers.0.mlp: rewritten" in stdout and "8 tokens, average k 2.00" in stdout
    assert _entries(out) == sorted(REPORT_FILES)
    assert _entries(tmp_path / "nested") == ["report"]  # the staging folder was renamed, not left beside
    assert json.loads((out / "report.json").read_text())["model"] == "OlmoeForCausalLM"
    # writing again into the existing folder replaces the files and leaves nothing else
    (out / "keep.txt").write_text("mine")
    torch._dynamo.reset()
    code, _, err = _run_cli(capsys, "--model", str(config), "--out", str(out), "--tokens", "5")
    assert code == 0, err
    assert _entries(out) == sorted([*REPORT_FILES, "keep.txt"])
    assert "5 tokens" in (out / "report.txt").read_text()


def test_cli_factory_with_its_own_example_and_a_saved_policy(tmp_path, capsys):
    torch._dynamo.reset()
    moepass.policies.make_policy("top_p", p=0.5).save(tmp_path / "policy")
    (tmp_path / "mine.py").write_text(
        textwrap.dedent(
            """
            import torch
            from moepass.zoo import tiny_model

            def make():
                model = tiny_model("qwen3_moe", num_hidden_layers=1)
                return model, {"input_ids": torch.zeros(1, 3, dtype=torch.long), "use_cache": False}
            """
        )
    )
    code, stdout, err = _run_cli(
        capsys, "--model", f"{tmp_path / 'mine.py'}:make", "--policy-file", str(tmp_path / "policy"), "--out",
        str(tmp_path / "r"),
    )
    assert code == 0, err
    assert "policy    top_p(p=0.5" in stdout
    assert "example: input_ids [1, 3]" in stdout and "ran       3 tokens, average k" in stdout
    assert "Qwen3MoeForCausalLM" in (tmp_path / "r" / "index.html").read_text()
