"""The demo behind ``moepass demo`` (the README's first command), on the bundled model.

Steps, each returning what the command line shows:

1. :func:`compile_and_report` — compile the bundled Mixtral with the backend,
   check it against eager, and return the report of the blocks found;
2. :func:`quality_table` — a few policies through the compiled model on a
   held-out slice: average k, expert FLOPs, perplexity, accuracy;
3. :func:`speed_table` — eager transformers against the compiled model
   (Inductor) with the static and an adaptive policy;
4. :func:`write_inspection` — the HTML inspection report of the adaptive policy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DemoConfig", "compile_and_report", "quality_table", "speed_table", "write_inspection"]

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Sizes of the demo (defaults finish in a few minutes on 2 cores)."""

    #: held-out bytes for the quality table
    eval_tokens: int = 16384
    seq_len: int = 256
    batch_size: int = 8
    #: policies of the quality table (bundled artefacts or ``name:key=value``)
    policies: tuple[str, ...] = ("static", "sensitivity", "skip_ratio", "ada_k", "top_p:p=0.65")
    #: the adaptive policy timed and inspected
    adaptive: str = "sensitivity"
    out: str = "moepass-demo"


def compile_and_report(model: torch.nn.Module, batch: torch.Tensor) -> tuple[Any, float]:
    """Compile with the static policy, run ``batch``, and return (report, max relative error vs eager)."""
    import moepass

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
    with torch.no_grad():
        expected = model(batch, use_cache=False).logits
        actual = compiled(batch, use_cache=False).logits
    error = float((actual - expected).abs().max() / expected.abs().max())
    return moepass.report(compiled), error


def quality_table(model: torch.nn.Module, config: DemoConfig) -> tuple[list[str], list[list[str]], list]:
    """(header, rows, results) of the policies of ``config`` on a held-out slice."""
    from moepass import bundled
    from moepass.bundled.evaluate import evaluate_policies, format_table

    batches = bundled.heldout_batches(seq_len=config.seq_len, max_tokens=config.eval_tokens, batch_size=config.batch_size)
    runs = [bundled.policy_run(spec) for spec in config.policies]
    results = evaluate_policies(model, runs, batches)
    header, rows = format_table(results)
    return header, rows, results


def _time(fn, repeat: int = 5) -> float:
    fn()
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return sorted(samples)[len(samples) // 2]


def speed_table(model: torch.nn.Module, batch: torch.Tensor, adaptive_policy) -> list[list[str]]:
    """Median forward time of eager transformers and of the compiled model (Inductor), static and adaptive."""
    rows = []
    with torch.no_grad():
        eager = _time(lambda: model(batch, use_cache=False))
        rows.append(["transformers eager (grouped_mm experts)", f"{eager * 1e3:.1f}", "1.00×"])
        for label, policy in (("moepass static + Inductor", "static"), (f"moepass {adaptive_policy.name} + Inductor", adaptive_policy)):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="adaptive_moe", options={"policy": policy})
            seconds = _time(lambda compiled=compiled: compiled(batch, use_cache=False))
            rows.append([label, f"{seconds * 1e3:.1f}", f"{eager / seconds:.2f}×"])
    return rows


def write_inspection(model: torch.nn.Module, batch: torch.Tensor, policy, out: str | Path) -> Path:
    """The inspection report (HTML, text, JSON) of ``policy`` on ``batch``, written to ``out``."""
    import moepass

    torch._dynamo.reset()
    inspection = moepass.inspect(model, {"input_ids": batch, "use_cache": False}, policy)
    return inspection.save(out)
