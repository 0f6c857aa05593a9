"""First compile on a machine with no kernel table: what measuring the CPU kernels adds, and what a second
process adds.

Three fresh processes, each loading the bundled model and running its first
call through ``torch.compile(model, backend="adaptive_moe")`` (static policy,
Inductor, under ``torch.no_grad()``), with an empty cache folder and the
shipped tables ignored (``MOEPASS_SHIPPED_TABLES=off``: a machine moepass has
no table for):

1. ``MOEPASS_TUNING=off`` — the compile without any measurement (baseline);
2. ``MOEPASS_TUNING=auto`` — the first compile, which measures what is missing
   (the projection kernels and both paths of each block shape) and caches it;
3. ``MOEPASS_TUNING=auto`` again, same cache — a second process, which should
   find everything and measure nothing.

A fourth, untimed process runs first so that Inductor's own caches are warm
for all three.  For each it records the wall time of the first call (compile + run), the
seconds the backend spent measuring (the report's per-block figure) and where
each block's table came from.  Targets: measuring adds at most 15 s to the
first compile; the second process measures nothing.  ``--model`` takes any
``moepass`` model spec (``zoo:mixtral``, a ``config.json``).

Usage::

    python benchmarks/tuning_cpu.py [--model bundled] [--tokens 64] [--repeats 1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import machine_description, markdown_table, today, write_section

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    import moepass
    from moepass.cli.modelspec import example_for, load_model
    spec, tokens = sys.argv[1], int(sys.argv[2])
    loaded = load_model(spec, seed=0)
    model = loaded.model.eval()
    example = example_for(spec, loaded, tokens, 1, 0)
    fast = torch.compile(model, backend="adaptive_moe")
    started = time.perf_counter()
    with torch.no_grad():
        fast(**example) if isinstance(example, dict) else fast(*example)
    first_call = time.perf_counter() - started
    blocks = [b for b in moepass.report(fast).blocks if b.cpu_kernels is not None]
    print("RESULT " + json.dumps({
        "first_call": first_call,
        "measuring": sum(b.cpu_kernels.seconds for b in blocks),
        "sources": sorted({b.cpu_kernels.source for b in blocks}),
        "blocks": len(blocks),
    }))
""")


def run(model: str, tokens: int, cache: Path, tuning: str) -> dict:
    """One fresh process; its RESULT line."""
    env = {**os.environ, "MOEPASS_CACHE_DIR": str(cache), "MOEPASS_TUNING": tuning, "MOEPASS_SHIPPED_TABLES": "off",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
    done = subprocess.run([sys.executable, "-c", _CHILD, model, str(tokens)], env=env, capture_output=True, text=True,
                          timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"the child process failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--tokens", type=int, default=64, help="tokens of the example the first call runs")
    parser.add_argument("--repeats", type=int, default=1, help="independent repeats (each with a fresh cache)")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine_description()}; load average {load}")
    rows, added, second = [], [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="moepass-tuning-bench-") as folder:
            cache = Path(folder)
            if repeat == 0:  # Inductor's own caches warm up here, so the three timed processes compare
                run(args.model, args.tokens, cache / "warm-up", "off")
            off = run(args.model, args.tokens, cache / "unused", "off")
            first = run(args.model, args.tokens, cache, "auto")
            again = run(args.model, args.tokens, cache, "auto")
        for name, result in (("tuning off", off), ("first process (measures)", first), ("second process", again)):
            rows.append([str(repeat + 1), name, f"{result['first_call']:.1f}", f"{result['measuring']:.1f}",
                         ", ".join(result["sources"]), str(result["blocks"])])
            print(f"  {name:26s} first call {result['first_call']:6.1f} s, measuring {result['measuring']:5.1f} s, "
                  f"tables: {', '.join(result['sources'])}")
        added.append(first["measuring"])
        second.append(again["measuring"] == 0 and again["sources"] == ["cache"])
    worst = max(added)
    verdict = (f"measuring added at most {worst:.1f} s to the first compile (target ≤ 15 s: "
               f"{'met' if worst <= 15 else 'NOT met'}); the second process measured "
               f"{'nothing' if all(second) else 'SOMETHING'} (target: nothing)")
    print(verdict)
    body = (
        f"## First compile with no kernel table (`benchmarks/tuning_cpu.py`)\n\n"
        f"{today()} — {machine_description()}; load average {load} before.  Model {args.model}, first call on "
        f"{args.tokens} tokens under `torch.no_grad()`, static policy, Inductor; each row a fresh process, with an "
        f"empty cache and the shipped tables ignored (`MOEPASS_SHIPPED_TABLES=off`).  \"measuring\" is what the "
        f"backend reports it spent measuring CPU kernels (all blocks).\n\n"
        + markdown_table(["repeat", "process", "first call (s)", "measuring (s)", "tables from", "blocks"], rows)
        + f"\n\n{verdict[0].upper() + verdict[1:]}.\n"
    )
    print(body)
    if not args.no_write:
        write_section("tuning_cpu", body)


if __name__ == "__main__":
    main()
