"""Inspect what the pass does to a model: compile, run one example, count.

::

    model, example ──► torch.compile(backend=adaptive_moe, stats on, inner eager)
                              │ first call: detect / validate / rewrite → Report
                              ▼ the same call runs the example → tokens per k per block
                       InspectionReport(report, runs)
                              │ str()        the text report
                              │ to_dict()    report.json
                              ▼ save(dir)    index.html + report.txt + report.json

Expert FLOPs are counted per token and expert (2 FLOPs a multiply-add): a
gated expert costs ``2·H·2I + 2·I·H = 6·H·I``, a plain one ``4·H·I``.  "Static"
is the model's own k for every token, so a block's FLOPs relative to static
is ``average k / native k``; the model's total weights each block by its
expert size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from moepass.compiler.options import BackendOptions
from moepass.compiler.spec import ExpertsSpec
from moepass.policies import Policy
from moepass.runtime.report import BlockReport, Report, last_report
from moepass.runtime.stats import BlockStats, reset_stats, routing_stats

__all__ = ["BlockRun", "InspectionReport", "inspect", "expert_flops_per_slot"]

logger = logging.getLogger(__name__)


def expert_flops_per_slot(experts: ExpertsSpec) -> int:
    """FLOPs of one token through one routed expert (2 per multiply-add)."""
    h, i = experts.hidden_size, experts.intermediate_size
    up = 2 * h * (2 * i if experts.gated else i)
    return up + 2 * i * h


@dataclass
class BlockRun:
    """What one MoE block did while the example ran."""

    path: str
    native_k: int
    num_experts: int
    #: tokens_per_k[k] = tokens that kept k experts.
    tokens_per_k: list[int]
    #: FLOPs of one token through one expert; None when the experts are unknown.
    flops_per_slot: int | None = None
    #: Slots that went to zero-computation experts (no GEMM row; not counted in k).
    zero_compute_slots: int = 0

    @classmethod
    def from_stats(cls, block: BlockReport, stats: BlockStats) -> "BlockRun":
        """Numbers of ``block`` from its run-time counters."""
        experts = block.spec.experts if block.spec is not None else None
        return cls(
            path=block.path,
            native_k=int(block.top_k or 0),
            num_experts=stats.num_experts,
            tokens_per_k=list(stats.tokens_per_k),
            flops_per_slot=expert_flops_per_slot(experts) if experts is not None else None,
            zero_compute_slots=stats.zero_compute_slots,
        )

    @property
    def tokens(self) -> int:
        """Tokens that went through the block."""
        return sum(self.tokens_per_k)

    @property
    def slots(self) -> int:
        """Expert evaluations: Σ_tokens k."""
        return sum(k * n for k, n in enumerate(self.tokens_per_k))

    @property
    def average_k(self) -> float:
        """Mean experts per token."""
        return self.slots / max(self.tokens, 1)

    @property
    def relative_flops(self) -> float:
        """Expert FLOPs of this run ÷ those of the model's own k for every token."""
        static = self.tokens * self.native_k
        return self.slots / static if static else 1.0

    @property
    def saved(self) -> float:
        """Fraction of the static expert FLOPs not spent (negative: more than static)."""
        return 1.0 - self.relative_flops

    @property
    def expert_flops(self) -> int | None:
        """Expert FLOPs of this run, when the expert size is known."""
        return None if self.flops_per_slot is None else self.slots * self.flops_per_slot

    @property
    def static_expert_flops(self) -> int | None:
        """Expert FLOPs with the model's own k for every token."""
        return None if self.flops_per_slot is None else self.tokens * self.native_k * self.flops_per_slot

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "tokens": self.tokens,
            "tokens_per_k": self.tokens_per_k,
            "average_k": self.average_k,
            "native_k": self.native_k,
            "expert_flops": self.expert_flops,
            "static_expert_flops": self.static_expert_flops,
            "relative_flops": self.relative_flops,
            "saved": self.saved,
            "zero_compute_slots": self.zero_compute_slots,
        }


@dataclass
class InspectionReport:
    """The backend's report of one model plus what each block did on the example."""

    report: Report
    #: Run-time numbers by block path (blocks whose experts op ran with stats).
    runs: dict[str, BlockRun] = field(default_factory=dict)
    #: The model's class name.
    model_name: str = ""
    #: Shapes of the example's tensors, e.g. ``input_ids [1, 64]``.
    example: str = ""
    #: Backend options used (JSON-ready; a policy object appears as its description).
    options: dict[str, Any] = field(default_factory=dict)
    #: Seconds spent compiling and running the example.
    seconds: float = 0.0

    @property
    def blocks(self) -> list[BlockReport]:
        """The MoE blocks found, in layer order."""
        return self.report.blocks

    @property
    def policy(self) -> str:
        """The policy, as described by the backend (``top_p(p=0.4)``)."""
        return self.report.policy

    def run(self, path: str) -> BlockRun | None:
        """Run-time numbers of block ``path`` (None when it recorded none)."""
        return self.runs.get(path)

    def why_no_numbers(self, block: BlockReport) -> str:
        """Why ``block`` has no run-time numbers (empty when it has some)."""
        if block.path in self.runs:
            return ""
        if not block.rewritten:
            return "not rewritten: the model's own code ran (native k for every token)"
        if block.spec is not None and block.spec.experts is None:
            return "router only: the experts ran in the model's own loop, which records no counts"
        return "no tokens reached the block while the example ran"

    @property
    def relative_flops(self) -> float | None:
        """Expert FLOPs of all measured blocks ÷ static, weighted by expert size."""
        used = static = 0
        for run in self.runs.values():
            if run.expert_flops is not None and run.static_expert_flops:
                used += run.expert_flops
                static += run.static_expert_flops
        return used / static if static else None

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-ready data."""
        from moepass.compiler.subgraph import python_code

        blocks = []
        for entry, summary in zip(self.report.blocks, self.report.to_dict()["blocks"]):
            run = self.runs.get(entry.path)
            summary = dict(summary)
            summary["spec"] = entry.spec.to_dict() if entry.spec is not None else None
            summary["run"] = run.to_dict() if run is not None else None
            summary["no_run_reason"] = self.why_no_numbers(entry) or None
            summary["code_before"] = python_code(entry.graph_before) if entry.graph_before is not None else None
            summary["code_after"] = python_code(entry.graph_after) if entry.graph_after is not None else None
            blocks.append(summary)
        report = self.report.to_dict()
        report.pop("blocks")
        return {
            "model": self.model_name,
            "example": self.example,
            "options": self.options,
            "seconds": round(self.seconds, 3),
            **report,
            "relative_expert_flops": self.relative_flops,
            "blocks": blocks,
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``index.html``, ``report.txt`` and ``report.json`` to ``directory`` (all or nothing)."""
        from moepass.reports.html_report import write_report

        return write_report(self, directory)

    def __str__(self) -> str:
        return format_text(self)


def format_text(inspection: InspectionReport) -> str:
    """The text report: a header, one paragraph per block, a per-layer table."""
    report = inspection.report
    lines = [
        f"moepass inspection of {inspection.model_name or 'the model'}: "
        f"{len(report.rewritten)}/{len(report.blocks)} MoE blocks rewritten",
        f"policy {report.policy}; lowering {report.lowering}; inner {report.inner}; {report.graphs} graph(s)",
    ]
    if inspection.example:
        lines.append(f"example: {inspection.example}; compiled and ran in {inspection.seconds:.1f} s")
    total = inspection.relative_flops
    if total is not None:
        lines.append(f"expert FLOPs: {total:.1%} of static ({1 - total:.1%} saved) over the measured blocks")
    if not report.blocks:
        lines.append("")
        lines.append("no MoE block found: the graphs were passed on unchanged")
        return "\n".join(lines)
    for block in report.blocks:
        lines.append("")
        lines.extend(_block_text(inspection, block))
    if inspection.runs:
        lines.append("")
        lines.extend(_layer_table(inspection))
    return "\n".join(lines)


def _block_text(inspection: InspectionReport, block: BlockReport) -> list[str]:
    state = "rewritten" if block.rewritten else "left as it was"
    lines = [f"{block.display_path}: {state}"]

    def fact(name: str, value: str) -> None:
        lines.append(f"  {name:<9} {value}")

    router = block.router + (f" ({block.router_description})" if block.router_description else "")
    fact("router", router)
    dispatch = block.dispatch
    if block.rewritten:
        dispatch += " → moepass.route" + (" + moepass.experts" if block.spec and block.spec.experts else "")
    fact("dispatch", dispatch)
    experts = "?" if block.num_experts is None else str(block.num_experts)
    if block.spec is not None and block.spec.experts is not None:  # E GEMM experts (+ zero-computation ones)
        experts = f"{block.spec.experts.num_experts} routed ({block.spec.experts.description})"
    fact("experts", experts + ("" if block.top_k is None else f"; native k {block.top_k}"))
    fact("shared", ", ".join(block.shared_experts) or "none")
    if block.policy:
        fact("policy", block.policy)
    if block.reason:
        fact("why not", block.reason)
    for note in block.notes:
        fact("note", note)
    if block.validation_error is not None:
        fact("checked", f"max relative error {block.validation_error:.1e} against the original block")
    if block.cpu_kernels is not None:
        first, *rest = block.cpu_kernels.lines()
        fact("CPU", f"{first} ({block.cpu_kernels.machine})")
        for line in rest:
            fact("", line.strip())
    run = inspection.run(block.path)
    if run is None:
        if inspection.example:
            fact("ran", inspection.why_no_numbers(block))
        return lines
    per_k = "  ".join(f"k={k}: {n}" for k, n in enumerate(run.tokens_per_k))
    fact("ran", f"{run.tokens} tokens, average k {run.average_k:.2f} (native {run.native_k})")
    fact("per k", per_k)
    fact("FLOPs", f"{run.relative_flops:.1%} of static expert FLOPs ({run.saved:.1%} saved)")
    if run.zero_compute_slots:
        fact("zero-comp", f"{run.zero_compute_slots} slots went to zero-computation experts (no GEMM row, not in k)")
    return lines


def _layer_table(inspection: InspectionReport) -> list[str]:
    depth = max(len(r.tokens_per_k) for r in inspection.runs.values())
    header = ["layer", "avg k", "native"] + [f"k={k}" for k in range(depth)] + ["FLOPs", "saved"]
    rows = []
    for block in inspection.report.blocks:
        run = inspection.run(block.path)
        if run is None:
            continue
        counts = run.tokens_per_k + [0] * (depth - len(run.tokens_per_k))
        rows.append(
            [block.display_path, f"{run.average_k:.2f}", str(run.native_k)]
            + [str(n) for n in counts]
            + [f"{run.relative_flops:.1%}", f"{run.saved:.1%}"]
        )
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    return ["per layer (expert FLOPs relative to static):", fmt(header), "  ".join("-" * w for w in widths)] + [
        fmt(r) for r in rows
    ]


def _split_example(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments, "
        f"got {type(example_inputs).__name__}"
    )


def _describe_example(args: tuple, kwargs: dict) -> str:
    parts = []
    for name, value in [(f"arg{i}", v) for i, v in enumerate(args)] + list(kwargs.items()):
        if isinstance(value, torch.Tensor):
            parts.append(f"{name} {list(value.shape)}")
    return ", ".join(parts)


def _json_ready(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.describe() if isinstance(v, Policy) else v) for k, v in options.items()}


def inspect(
    model: torch.nn.Module,
    example_inputs: Any,
    policy: str | Policy = "static",
    *,
    inner: str = "eager",
    fullgraph: bool = False,
    **backend_options: Any,
) -> InspectionReport:
    """Compile ``model`` with the ``adaptive_moe`` backend, run the example, and report.

    The routing counters are reset first, so the numbers are this example's
    only.  The model itself is not changed.

    Args:
        model: any module; transformers models are called as given, so pass
            ``{"input_ids": ids, "use_cache": False}`` for a causal LM.
        example_inputs: a tensor, a tuple of positional arguments or a dict
            of keyword arguments.
        policy: a policy name or a :class:`~moepass.policies.Policy`.
        inner: the compiler for the rest of the graph (default ``"eager"``:
            inspection is about the rewrite, not the speed of the rest).
        fullgraph: passed to ``torch.compile`` (hand-written MoE loops need
            it to stay in one graph).
        **backend_options: further backend options or the named policy's
            parameters (``p=0.4``), as in ``torch.compile(options=...)``.

    Returns:
        An :class:`InspectionReport`; ``str()`` of it is the text report and
        ``.save(dir)`` writes the HTML report.

    Raises:
        moepass.OptionsError: invalid options or policy parameters.
        moepass.PolicyError: the policy does not fit one of the blocks.
    """
    from moepass.compiler.backend import adaptive_moe

    if backend_options.get("stats") is False:
        logger.warning("moepass.inspect: ignoring stats=False; inspection needs the routing counts")
    options = {**backend_options, "policy": policy, "inner": inner, "stats": True}
    BackendOptions.parse(options)  # fail with the backend's own message before compiling
    args, kwargs = _split_example(example_inputs)
    compiled = torch.compile(model, backend=adaptive_moe, options=options, fullgraph=fullgraph)
    previous = last_report()
    reset_stats()
    started = time.perf_counter()
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as failure:
        inner_error = getattr(failure, "inner_exception", None)
        if isinstance(inner_error, ValueError):  # OptionsError, PolicyError: the user's to fix
            raise inner_error from None
        raise
    seconds = time.perf_counter() - started
    report = last_report()
    if report is None or report is previous:
        raise RuntimeError(
            "torch.compile did not hand any graph to the adaptive_moe backend (was the recompile limit "
            "reached? torch._dynamo.reset() clears it)"
        )
    stats = routing_stats()
    runs = {b.path: BlockRun.from_stats(b, stats[b.path]) for b in report.blocks if b.path in stats}
    logger.info("moepass.inspect: %d block(s), %d with run-time numbers, %.1f s", len(report.blocks), len(runs), seconds)
    return InspectionReport(
        report=report,
        runs=runs,
        model_name=type(model).__name__,
        example=_describe_example(args, kwargs),
        options=_json_ready(options),
        seconds=seconds,
    )
