"""Every example of the README and of the documentation pages runs exactly as written.

The documents are README.md and then docs/*.md in the site's navigation order (mkdocs.yml).
Python blocks run one by one, each in a fresh namespace that holds what the
prose assumes a user has: ``torch``, ``moepass``, ``model`` (the
bundled model), ``input_ids`` and ``batches`` (held-out text), in a working
folder where the files earlier examples write (``calib/``, ``experts/``,
``bundled-genai/``) exist.  No block is edited: grad mode stays on, the
inner compiler stays Inductor where the block does not choose.  The shell
examples (``moepass ...`` commands) run in order, across the documents, in the slow test.
A block that is not meant to run on its own (a fragment of a larger program, a torchrun
script) is fenced ``py`` instead of ``python``: shown the same, not collected.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moepass
from moepass import bundled

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
_NAV_PAGE = re.compile(r"^\s*-\s.*?([\w./-]+\.md)\s*$", re.M)  # the page of a nav line, titled or not


def documents() -> list[Path]:
    """README.md, then every page of docs/ in mkdocs.yml's navigation order (any page not in it last)."""
    nav = [ROOT / "docs" / name for name in _NAV_PAGE.findall((ROOT / "mkdocs.yml").read_text())]
    rest = sorted(set((ROOT / "docs").glob("*.md")) - set(nav))
    return [README, *[page for page in nav if page.is_file()], *rest]


def _name(document: Path) -> str:
    return document.relative_to(ROOT).as_posix()


def blocks(language: str, document: Path) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of ``language`` in ``document``."""
    text = document.read_text()
    return [
        (text[: m.start()].count("\n") + 1, textwrap.dedent(m.group(2)))  # a block inside a list item is indented
        for m in _BLOCK.finditer(text)
        if m.group(1) == language
    ]


def readme_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of ``language`` in the README."""
    return blocks(language, README)


def all_blocks(language: str) -> list[tuple[str, int, str]]:
    """(document, line number, code) of every fenced block of ``language`` in README and docs."""
    return [(_name(doc), line, code) for doc in documents() for line, code in blocks(language, doc)]


def _cli_lines() -> list[tuple[str, int, str]]:
    """The ``moepass`` commands of README and docs, in order, comments stripped."""
    lines = []
    for document, line_number, code in all_blocks("bash"):
        for offset, line in enumerate(code.splitlines()):
            command = line.split("  #")[0].strip()
            if command.startswith("moepass "):
                lines.append((document, line_number + 1 + offset, command))
    return lines


def test_the_readme_and_docs_have_examples_to_run():
    assert len(readme_blocks("python")) >= 3
    assert any('backend="adaptive_moe"' in code for _, code in readme_blocks("python"))
    assert len(all_blocks("python")) >= 15
    assert len(_cli_lines()) >= 5
    named = {Path(document).name for document, _, _ in all_blocks("python")}
    assert {"README.md", "policies.md", "exports.md", "offloading.md"} <= named


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding what the README's earlier examples write, and the namespace its prose assumes."""
    folder = tmp_path_factory.mktemp("readme")
    model = bundled.load_model()
    batches = bundled.heldout_batches(seq_len=64, max_tokens=1024, batch_size=4)
    moepass.calibrate(model, batches, "sensitivity", target_avg_k=1.5, show_progress=False).save(folder / "calib")
    from moepass.cli.main import main as cli

    assert cli(["offload", "--model", "bundled", "--out", str(folder / "experts")]) == 0
    moepass.export_genai(bundled.load_model(), folder / "bundled-genai", policy="top_p", p=0.65)
    return folder


def _namespace() -> dict:
    return {
        "torch": torch,
        "moepass": moepass,
        "model": bundled.load_model(),
        "input_ids": bundled.heldout_batches(seq_len=32, max_tokens=64, batch_size=2)[0],
        "batches": bundled.heldout_batches(seq_len=64, max_tokens=1024, batch_size=4),
    }


@pytest.mark.inductor
@pytest.mark.parametrize(
    "document,line,code", all_blocks("python"), ids=[f"{d}:line{n}" for d, n, _ in all_blocks("python")]
)
def test_python_example_runs_as_written(workdir, monkeypatch, document, line, code):
    monkeypatch.chdir(workdir)
    torch._dynamo.reset()
    namespace = _namespace()
    exec(compile(code, f"{document}:{line}", "exec"), namespace)  # noqa: S102 - the documents' own code


@pytest.mark.slow
def test_shell_examples_run_as_written(tmp_path):
    """Every ``moepass`` command of README and docs, in order, in one folder (the CLI as a user runs it)."""
    executable = shutil.which("moepass")
    launcher = [executable] if executable else [sys.executable, "-m", "moepass.cli"]
    for document, line, command in _cli_lines():
        argv = shlex.split(command)
        result = subprocess.run([*launcher, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{document}:{line}: {command}\n{result.stderr[-2000:]}"
