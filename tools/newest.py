"""``make test-newest``: the newest releases, checked on purpose.

    python tools/newest.py [--venv .newest/venv] [--torch torch==2.14.1] [--workers 2]

1. builds (or reuses) a virtual environment of its own — never the one
   ``make install`` fills — with torch pinned (``--torch``: an unpinned torch
   pulls GBs of CUDA wheels) and the newest release of every other
   distribution moepass names (its dependencies and extras, by name, no
   ranges, no constraints file);
2. runs the zoo, make_traceable, autograd and export tests there;
3. writes ``notes/compat-newest.md``: the versions, each test file's counts,
   and the compatibility table — every MoE family of that transformers with
   its outcome (from the zoo test, which records one line per family when
   ``MOEPASS_ZOO_OUTCOMES`` names a file).

Exits with pytest's status, after writing the table either way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "notes", "compat-newest.md")
TESTS = [
    "tests/test_zoo.py",
    "tests/test_traceable.py",
    "tests/test_traceable_jetmoe.py",
    "tests/test_zero_compute.py",
    "tests/test_autograd.py",
    "tests/test_onnx_export.py",
    "tests/test_genai_export.py",
    "tests/test_mlir_export.py",
]
#: Versions named in the table's header (the rest are in the full list below it).
KEY_PACKAGES = (
    "torch", "transformers", "kernels", "onnx", "onnxruntime", "onnxruntime-genai", "onnxscript",
    "torch-mlir", "iree-base-compiler", "iree-base-runtime", "triton", "numpy", "scipy",
)


def _run(command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def _requirement_names() -> list[str]:
    """Every distribution moepass names (dependencies and extras), without their ranges, torch excluded."""
    import tomllib

    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    texts = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        texts += extra
    names = {Requirement(t).name for t in texts}
    names.discard("torch")
    return sorted(names, key=str.lower)


def build_venv(venv: str, torch_pin: str) -> str:
    """The venv's python, with ``torch_pin`` and the newest of everything else installed."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        _run([sys.executable, "-m", "venv", venv])
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        pin.write(torch_pin + "\n")  # nothing below may move torch
    try:
        _run([python, "-m", "pip", "install", "-q", "-c", pin.name, torch_pin])
        # torch named again: the resolver then honours its own requirements (torch 2.14.1 needs triton 3.8)
        _run([python, "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager", "-c", pin.name,
              torch_pin, *_requirement_names()])
        subprocess.run([python, "-m", "pip", "check"])  # printed for the log; the table lists the versions
        _run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT])
    finally:
        os.unlink(pin.name)
    return python


def _installed(python: str) -> dict[str, str]:
    listing = subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
    return {p["name"].lower(): p["version"] for p in json.loads(listing.stdout)}


def _file_counts(junit: str) -> dict[str, dict[str, int]]:
    """{test file: {passed, failed, skipped, xfailed}} from a JUnit XML report."""
    counts: dict[str, dict[str, int]] = {}
    if not os.path.exists(junit):
        return counts
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("classname", "").split(".")
        where = "/".join(name[:2]) + ".py" if len(name) >= 2 else case.get("file", "?")
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            result = "failed"
        elif "skipped" in kinds:
            result = "xfailed" if kinds["skipped"].get("type") == "pytest.xfail" else "skipped"
        else:
            result = "passed"
        bucket = counts.setdefault(where, {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0})
        bucket[result] += 1
    return counts


def _read_outcomes(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return sorted(records, key=lambda r: r["id"])


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(versions: dict[str, str], counts: dict, outcomes: list[dict], status: int, seconds: float, python_version: str) -> str:
    """notes/compat-newest.md."""
    today = datetime.date.today().isoformat()
    head = ", ".join(f"{name} {versions[name]}" for name in KEY_PACKAGES if name in versions)
    lines = [
        "# Compatibility with the newest releases (`make test-newest`)",
        "",
        f"Last run {today} by `make test-newest` (tools/newest.py) on {platform.machine()} Linux, Python "
        f"{python_version}, in a separate environment: {head}.  pytest exit status {status}, {seconds / 60:.1f} min.",
        "",
        "## Test files",
        "",
        "| file | passed | failed | skipped | expected failures |",
        "|---|---|---|---|---|",
    ]
    for where in sorted(counts):
        c = counts[where]
        lines.append(f"| {where} | {c['passed']} | {c['failed']} | {c['skipped']} | {c['xfailed']} |")
    tally: dict[str, int] = {}
    for record in outcomes:
        tally[record["outcome"]] = tally.get(record["outcome"], 0) + 1
    lines += [
        "",
        f"## MoE families of transformers {versions.get('transformers', '?')} ({len(outcomes)} tested: "
        + ", ".join(f"{n} {k}" for k, n in sorted(tally.items())) + ")",
        "",
        "Each built tiny from its config class's own defaults (tests/test_zoo.py), compiled with "
        "`backend=\"adaptive_moe\"` (static policy), logits against eager.  *test*: `pass`; `known gap` (listed in "
        "the test's `KNOWN_GAPS` for this transformers version, expected to fail); `fixed upstream?` (a known gap "
        "that passed); `FAIL`.",
        "",
        "| family | kind | outcome | rewritten / found / ran | max rel. error | test | why not |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in outcomes:
        error = "" if r.get("max_error") is None else f"{r['max_error']:.1e}"
        why = r.get("reason", "") if r["outcome"] != "rewritten" else ""
        if r.get("problems"):
            why = "; ".join(r["problems"])
        lines.append(
            f"| {r['id']} | {r['kind']} | {r['outcome']} | {r['counts']} | {error} | {r['test']} | {_cell(why)} |"
        )
    lines += ["", "## Every distribution in the environment", "", ", ".join(f"{n} {v}" for n, v in sorted(versions.items())), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=os.path.join(ROOT, ".newest", "venv"))
    parser.add_argument("--torch", default="torch==2.14.1", help="the torch to pin (never left unpinned)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-install", action="store_true", help="reuse the venv as it is")
    args = parser.parse_args(argv)
    if "==" not in args.torch:
        parser.error(f"--torch {args.torch!r} must pin a version (torch==X.Y.Z): an unpinned torch pulls CUDA wheels")
    venv = os.path.abspath(args.venv)
    python = os.path.join(venv, "bin", "python") if args.skip_install else build_venv(venv, args.torch)
    versions = _installed(python)
    python_version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                                    check=True, capture_output=True, text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="moepass-newest-")
    junit, outcomes = os.path.join(work, "junit.xml"), os.path.join(work, "zoo.jsonl")
    env = {**os.environ, "MOEPASS_ZOO_OUTCOMES": outcomes, "PYTHONPATH": ROOT}
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rxXf", f"--junitxml={junit}", *TESTS]
    if args.workers > 1:
        command[4:4] = ["-n", str(args.workers), "--dist", "loadfile"]
    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    status = subprocess.run(command, cwd=ROOT, env=env).returncode
    seconds = time.perf_counter() - started
    text = render(versions, _file_counts(junit), _read_outcomes(outcomes), status, seconds, python_version)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(OUT), delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, OUT)
    print(f"wrote {OUT}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
