"""The documentation site builds in strict mode, and every page is reachable.

``mkdocs build --strict`` (what ``make docs`` runs) fails on any warning: a link to a page
or an anchor that does not exist, a page missing from the navigation, an API reference
(``::: moepass.x``) that does not resolve, an include (tools/mkdocs_hooks.py) of a file or
section that is not there.  The Python examples of the pages run in tests/test_readme.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None,
    reason="mkdocs / mkdocstrings[python] are not installed (they are in the test extra: make install)",
)


@needs_mkdocs
def test_the_site_builds_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    pages = {page.stem for page in (ROOT / "docs").glob("*.md")}
    built = {page.stem for page in site.glob("*.html")}
    assert pages <= built, f"pages not built: {sorted(pages - built)}"
    # the home page is the README, the benchmarks page holds RESULTS.md, the API reference its docstrings
    assert "Three examples" in (site / "index.html").read_text()
    assert "Benchmark results" in (site / "benchmarks.html").read_text()
    api = (site / "api.html").read_text()
    for name in ("moepass.calibrate", "moepass.export_onnx", "moepass.policies.Policy"):
        assert f'id="{name}"' in api, f"the API reference has no entry for {name}"


def test_the_hook_refuses_a_link_the_site_does_not_have(tmp_path):
    """An included file's link to a source file (not a page) fails the build instead of 404ing."""
    pytest.importorskip("mkdocs")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(ROOT / "tools"))
    from mkdocs.exceptions import PluginError

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# page\n")
    (tmp_path / "src.py").write_text("")
    mkdocs_hooks.on_config({"docs_dir": str(tmp_path / "docs")})
    assert mkdocs_hooks._rewrite_links("[p](docs/page.md#x)", "README.md", "index.md") == "[p](page.md#x)"
    with pytest.raises(PluginError, match="outside docs/"):
        mkdocs_hooks._rewrite_links("[s](src.py)", "README.md", "index.md")


def test_the_zoo_table_is_written_into_the_coverage_page(tmp_path, monkeypatch):
    """benchmarks/zoo_table.py --docs writes between the markers of docs/coverage.md, and only there."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import zoo_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert Path(zoo_table.COVERAGE_PAGE).resolve() == ROOT / "docs" / "coverage.md"
    page = (ROOT / "docs" / "coverage.md").read_text()
    assert page.count(zoo_table.START) == 1 and page.count(zoo_table.END) == 1
    assert zoo_table.START not in README_TEXT() and zoo_table.END not in README_TEXT()

    copy = tmp_path / "coverage.md"
    copy.write_text(page)
    zoo_table.write_table("| family |\n|---|\n| new |", "1 rewritten", "9.9.9", page=str(copy))
    written = copy.read_text()
    assert "| new |" in written and "transformers 9.9.9" in written and "| afmoe |" not in written
    assert written.split(zoo_table.START)[0] == page.split(zoo_table.START)[0]  # the prose around it is kept
    assert written.split(zoo_table.END)[1] == page.split(zoo_table.END)[1]

    copy.write_text("# a page without markers\n")
    with pytest.raises(SystemExit, match="zoo-table:start"):
        zoo_table.write_table("| t |", "s", "1", page=str(copy))
    assert copy.read_text() == "# a page without markers\n"  # nothing half-written


def README_TEXT() -> str:
    return (ROOT / "README.md").read_text()


def test_the_site_configuration_turns_every_broken_link_into_a_failure():
    """What makes the strict build catch broken links and anchors (a warning each; strict fails on any)."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True
    links = config["validation"]["links"]
    assert links["not_found"] == links["anchors"] == links["unrecognized_links"] == "warn"
    assert config["validation"]["nav"]["omitted_files"] == "warn"  # a page left out of the navigation
    assert "tools/mkdocs_hooks.py" in config["hooks"]
