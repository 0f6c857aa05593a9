"""Every example of the README runs exactly as written.

Python blocks run one by one, each in a fresh namespace that holds what the
README's prose assumes a user has: ``torch``, ``moepass``, ``model`` (the
bundled model), ``input_ids`` and ``batches`` (held-out text), in a working
folder where the files earlier examples write (``calib/``, ``experts/``,
``bundled-genai/``) exist.  No block is edited: grad mode stays on, the
inner compiler stays Inductor where the block does not choose.  The shell
examples (``moepass ...`` commands) run in order in the slow test.
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

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def readme_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of ``language`` in the README."""
    text = README.read_text()
    return [
        (text[: m.start()].count("\n") + 1, textwrap.dedent(m.group(2)))  # a block inside a list item is indented
        for m in _BLOCK.finditer(text)
        if m.group(1) == language
    ]


def _cli_lines() -> list[tuple[int, str]]:
    """The README's ``moepass`` commands, comments stripped."""
    lines = []
    for line_number, code in readme_blocks("bash"):
        for offset, line in enumerate(code.splitlines()):
            command = line.split("  #")[0].strip()
            if command.startswith("moepass "):
                lines.append((line_number + 1 + offset, command))
    return lines


def test_the_readme_has_examples_to_run():
    assert len(readme_blocks("python")) >= 6
    assert any("backend=\"adaptive_moe\"" in code for _, code in readme_blocks("python"))
    assert len(_cli_lines()) >= 5


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
@pytest.mark.parametrize("line,code", readme_blocks("python"), ids=[f"line{n}" for n, _ in readme_blocks("python")])
def test_python_example_runs_as_written(workdir, monkeypatch, line, code):
    monkeypatch.chdir(workdir)
    torch._dynamo.reset()
    namespace = _namespace()
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code


@pytest.mark.slow
def test_shell_examples_run_as_written(tmp_path):
    """Every ``moepass`` command of the README, in order, in one folder (the CLI as a user runs it)."""
    executable = shutil.which("moepass")
    launcher = [executable] if executable else [sys.executable, "-m", "moepass.cli"]
    for line, command in _cli_lines():
        argv = shlex.split(command)
        result = subprocess.run([*launcher, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"README.md:{line}: {command}\n{result.stderr[-2000:]}"
