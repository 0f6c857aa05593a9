"""Which ONNX Runtime experts layout a block gets per token-count range, measured on the exporting machine.

::

    export_onnx(..., target="ort")      options.ort_layout = "auto" (default), provider "cpu"
      for each block variant (routing, experts shape, dtype):
        lookup(family "ort_experts", key)                      this machine's table (runtime.tuning)
        else: one small model per candidate layout — the block's own AdaptiveMoE node, its own
              weights, its function defined for that layout — run in ONNX Runtime at 1, 8, 64 and 512
              tokens (interleaved, best of the rounds; outputs cross-checked between layouts), within a
              budget, and cached
        plan = the fastest layout at each measured token count, consecutive equal ones merged:
               ((1, "masked"), (64, "gemm"))  =  masked below 64 tokens, gemm from 64
      one plan → one layout; several → the function's experts are an If chain on the token count

Candidates: ``masked``, ``slots``, ``buckets`` (``com.microsoft.MoE`` with k per
token, :mod:`.experts_ort`) and, for float32, ``gemm`` (pre-packed Gemm pairs,
:mod:`.experts_gemm`).  A static block whose router ORT's MoE computes itself
is one MoE call whatever the MoE layout — ORT's own MoE, what
onnxruntime-genai's builder writes — so its candidates are that call and
``gemm``: the export is never slower than ORT's own MoE at a measured token
count (up to the noise of the measurement).

The choice is the exporting machine's: another CPU may rank the layouts
differently, so re-export there (or name the layout: ``ort_layout="gemm"``, or
ranges ``ort_layout={1: "masked", 64: "gemm"}``).  With tuning off
(``OnnxExportOptions(ort_tuning="off")``, ``$MOEPASS_TUNING=off``), for a CUDA
provider (no GPU to measure on), for non-float32 inputs (ONNX Runtime's Python
API cannot feed bfloat16) and for blocks whose inputs beyond x and the logits
are not initializers, ``auto`` is the fixed default of
:func:`.layouts.default_ort_layout`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from moepass.lowering.onnx.builder import FLOAT
from moepass.runtime import tuning
from moepass.runtime.machine import current_machine
from moepass.runtime.progress import progress

__all__ = ["DEFAULT_BUDGET", "FAMILY", "TOKEN_POINTS", "LayoutChoice", "choose_layouts", "describe_plan"]

logger = logging.getLogger(__name__)

FAMILY = tuning.Family("ort_experts", version=1, shipped=None)
#: Seconds an export may spend measuring one block variant (``ort_tuning="auto"``).
DEFAULT_BUDGET = 60.0
#: Token counts the layouts are timed at.
TOKEN_POINTS = (1, 8, 64, 512)
#: Layouts whose outputs differ from the first candidate's by more than this are dropped (not exact).
AGREEMENT = 1e-4

Plan = tuple[tuple[int, str], ...]


def describe_plan(plan: Plan) -> str:
    """``masked below 64 tokens, gemm from 64`` (or the one layout's name)."""
    if len(plan) == 1:
        return plan[0][1]
    parts = []
    for index, (start, layout) in enumerate(plan):
        end = plan[index + 1][0] if index + 1 < len(plan) else None
        if index == 0:
            parts.append(f"{layout} below {end} tokens")
        elif end is None:
            parts.append(f"{layout} from {start}")
        else:
            parts.append(f"{layout} from {start} to {end - 1}")
    return ", ".join(parts)


@dataclass
class LayoutChoice:
    """The layouts of one block variant and why."""

    plan: Plan
    #: ``measured`` | ``cache`` | ``process`` (measured earlier in this export's process) | ``option``
    #: (named by the caller) | ``default`` (not measured: the fixed default) | ``override``
    source: str
    points: list[dict] = field(default_factory=list)
    machine: str = ""
    reason: str = ""

    def describe(self) -> str:
        """One line: the plan, where it came from, and the times that decided it."""
        text = describe_plan(self.plan)
        if self.source in ("measured", "cache", "process", "override"):
            times = "; ".join(
                f"{p['tokens']} tok: " + ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(p["ms"].items(), key=lambda i: i[1]))
                for p in self.points
            )
            origin = {"measured": "measured now", "cache": "measured earlier (cache)",
                      "process": "measured earlier in this process", "override": "override"}[self.source]
            return f"{text} ({origin} on {self.machine}: {times})"
        return f"{text} ({self.reason or self.source})"


def _plan_from_points(points: list[dict]) -> Plan:
    plan: list[tuple[int, str]] = []
    for point in sorted(points, key=lambda p: p["tokens"]):
        if not plan or plan[-1][1] != point["layout"]:
            plan.append((1 if not plan else point["tokens"], point["layout"]))
    return tuple(plan)


def _block_model(model: onnx.ModelProto, node: onnx.NodeProto, x_type: int, logits_type: int, hidden: int,
                 experts: int) -> onnx.ModelProto | None:
    """A model of the block node alone: inputs x [T, H] and logits [T, E], its other inputs as the
    model's initializers (None when one is not an initializer: nothing fixed to time it with)."""
    initializers = {init.name: init for init in model.graph.initializer}
    inputs = list(node.input)
    if len(inputs) < 2 or any(name and name not in initializers for name in inputs[2:]):
        return None
    block = copy.deepcopy(node)
    block.input[0], block.input[1] = "x", "logits"
    block.ClearField("output")
    block.output.append("y")
    graph = helper.make_graph(
        [block], "block",
        [helper.make_tensor_value_info("x", x_type, ["T", hidden]),
         helper.make_tensor_value_info("logits", logits_type, ["T", experts])],
        [helper.make_tensor_value_info("y", x_type, ["T", hidden])],
        [initializers[name] for name in dict.fromkeys(inputs[2:]) if name],
    )
    mini = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return mini


def _session(mini: onnx.ModelProto, layout: str, fallback: str, folder: Path, define: Callable):
    """An ONNX Runtime session of the block model with its function defined for ``layout`` by ``define``
    (:func:`.functions.define_blocks`)."""
    import onnxruntime

    model = copy.deepcopy(mini)
    define(model, "ort", fallback, layout, "cpu")
    path = folder / f"{layout}.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{layout}.data", size_threshold=1024)
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-30)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0) / scale)


def measure_layouts(measurement: tuning.Measurement, mini: onnx.ModelProto, candidates: list[str], fallback: str,
                    hidden: int, experts: int, label: str, define: Callable, token_points=TOKEN_POINTS) -> dict:
    """Time each candidate layout of the block model at each token count; the entry with the fastest at each."""
    points, dropped = [], {}
    with tempfile.TemporaryDirectory(prefix="moepass-ort-layouts-") as folder:
        sessions = {}
        for layout in candidates:
            if measurement.remaining() <= 0:
                measurement.skipped.append(f"{label} session {layout}")
                continue
            sessions[layout] = _session(mini, layout, fallback, Path(folder), define)
        rng = np.random.default_rng(0)
        for tokens in progress(token_points, f"measuring ONNX Runtime layouts {candidates} for {label}"):
            feeds = {"x": rng.standard_normal((tokens, hidden), dtype=np.float32),
                     "logits": rng.standard_normal((tokens, experts), dtype=np.float32)}
            live = {name: s for name, s in sessions.items() if name not in dropped}
            if not live:
                break
            if measurement.remaining() <= 0:
                measurement.skipped.append(f"{label} tokens {tokens}")
                continue
            outputs = {name: s.run(None, feeds)[0] for name, s in live.items()}
            first = next(iter(outputs))
            for name, out in outputs.items():  # every layout computes the same function: check they agree
                error = _relative(out, outputs[first])
                if not error <= AGREEMENT:
                    dropped[name] = f"differs from {first} by {error:.1e} at {tokens} tokens"
                    logger.warning("ORT layout %s of %s dropped: %s", name, label, dropped[name])
            live = {name: s for name, s in live.items() if name not in dropped}
            samples = measurement.compare(
                f"{label} tokens {tokens}",
                {name: functools.partial(s.run, None, feeds) for name, s in live.items()},
                cost_hint=tokens + 8,
            )
            if samples is None:
                continue
            times = {name: tuning.best(v) for name, v in samples.items()}
            points.append({"tokens": tokens, "layout": min(times, key=times.get),
                           "ms": {name: round(t * 1e3, 4) for name, t in times.items()}})
    return {"points": points, "dropped": dropped, "candidates": list(candidates)}


def _key(variant: str, candidates: list[str], description: str) -> str:
    import onnxruntime

    digest = hashlib.sha1(json.dumps([variant, candidates]).encode()).hexdigest()[:12]
    return f"ort {onnxruntime.__version__} {description} [{','.join(candidates)}] {digest}"


def choose_layouts(model: onnx.ModelProto, node: onnx.NodeProto, variant: str, candidates: list[str], fallback: str,
                   x_type: int, logits_type: int, hidden: int, experts: int, budget: float | None,
                   description: str, define: Callable) -> LayoutChoice | None:
    """The measured plan of a block variant for this machine (looked up, or measured within ``budget``);
    None when it cannot be measured (the caller uses the fixed default and says why)."""
    if x_type != FLOAT or logits_type != FLOAT or len(candidates) < 2:
        return None
    try:
        key = _key(variant, candidates, description)
    except ImportError:
        return None
    found = tuning.lookup(FAMILY, key)
    if not found and budget is not None:
        mini = _block_model(model, node, x_type, logits_type, hidden, experts)
        if mini is None:
            return None
        measure = functools.partial(measure_layouts, mini=mini, candidates=candidates, fallback=fallback,
                                    hidden=hidden, experts=experts, label=description, define=define)
        logger.info("measuring ONNX Runtime experts layouts %s for %s (at most %.0f s)", candidates, description, budget)
        found = tuning.measure_and_store(FAMILY, key, measure, budget, description)
    if not found or not found.entry.get("points"):
        return None
    return LayoutChoice(_plan_from_points(found.entry["points"]), found.source, list(found.entry["points"]),
                        current_machine().describe())
