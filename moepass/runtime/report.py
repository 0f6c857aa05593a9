"""What the backend found and did, per compiled model.

Every graph the backend compiles adds its blocks to the report of the model it
belongs to (graphs of one model share its parameters; a recompile for new
shapes replaces the entries of the blocks it covers).  ``moepass.last_report()``
is the report most recently added to; ``moepass.report(model)`` finds the one
of a given (compiled or original) model.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from moepass.compiler.spec import MoEBlockSpec
from moepass.runtime.stats import BlockStats, routing_stats

__all__ = ["BlockReport", "Report", "REASON_CODES", "classify_reason", "last_report", "report", "record_graph"]

#: Why a block was left as it was, one code per cause a user can act on:
#:
#: - ``not_topk_routing``: the router selects experts without a top-k
#:   (phimoe's sparsemixer, product-key lookups); only top-k routers are rewritten.
#: - ``unsupported_router``: a top-k router whose scoring, weights or
#:   selection (group limits, gathers, renormalisation) is not one moepass models.
#: - ``unsupported_activation``: the ops between the two expert GEMMs are not a
#:   supported activation.
#: - ``unsupported_experts``: the expert weights' layout, biases or per-expert
#:   arrangement is not one moepass models.
#: - ``region_not_closed``: the block's output depends on values computed
#:   outside it, or it mutates or aliases outside state, so it cannot be
#:   replaced as a unit.
#: - ``graph_break``: the block reached the backend in pieces (its experts
#:   loop graph-broke), and the piece seen cannot be rewritten alone.
#: - ``validation_failed``: the planned rewrite did not reproduce the block on
#:   a random input (or could not be run), so the block was kept.
#: - ``random_in_training``: the block draws random numbers inside (router
#:   noise, dropout) in training mode; it is rewritten in eval mode.
#: - ``internal_error``: moepass raised while reading or rewriting the block
#:   (code that reads another library's graph met a form it did not expect);
#:   the block ran unchanged — a bug to report, never a wrong answer.
#: - ``unclassified``: a reason :func:`classify_reason` does not know yet (a bug
#:   to fix there: every reason must map to one of the codes above).
REASON_CODES = (
    "not_topk_routing",
    "unsupported_router",
    "unsupported_activation",
    "unsupported_experts",
    "region_not_closed",
    "graph_break",
    "validation_failed",
    "random_in_training",
    "internal_error",
    "unclassified",
)

# (code, pattern over the reason text), first match wins.  Interim: the
# detectors produce free text today; this one table maps it to a code until
# the producers set the code themselves.
_REASON_PATTERNS = (
    ("internal_error", r"^moepass failed while"),
    ("validation_failed", r"^rewrite does not reproduce|^validation could not run|^could not run the block"),
    ("random_in_training", r"draws random numbers"),
    ("not_topk_routing", r"no top-k expert selection|sparsemixer|not an expert selection"),
    ("graph_break", r"graph-broke|could not find where the experts' outputs are combined"),
    ("region_not_closed", r"computed outside it|lives outside the block|view made before|the block's output \S+ has shape"),
    ("unsupported_activation", r"unsupported expert activation|uses \S+, others|some experts are gated"),
    (
        "unsupported_router",
        r"^router not supported|no supported top-k router|routing weights|topk with a non-constant k|"
        r"not the expert dim|router weight|router bias|router input|group-limited|selected (expert ids|logits)|"
        r"not passed through sigmoid|not a router linear|no router linear",
    ),
    (
        "unsupported_experts",
        r"expert weight|expert linear|expert bias|stacked expert|expert projections|experts of different|"
        r"per-expert|projection has|GEMM does not consume|orientations|cannot tell|per-expert output norm|"
        r"sets some slots. weight to 0",
    ),
)


def classify_reason(reason: str) -> str:
    """The code (one of :data:`REASON_CODES`) of a not-rewritten block's reason text."""
    for code, pattern in _REASON_PATTERNS:
        if re.search(pattern, reason):
            return code
    return "unclassified"


@dataclass
class BlockReport:
    """One MoE block: what was found and whether it was rewritten."""

    path: str
    router: str
    dispatch: str
    num_experts: int | None
    top_k: int | None
    rewritten: bool
    reason: str = ""
    #: Human description of the router (``softmax→top2→renorm``).
    router_description: str = ""
    shared_experts: list[str] = field(default_factory=list)
    policy: str = ""
    spec: MoEBlockSpec | None = None
    #: Max relative error of the rewrite against the original block (static
    #: routing, random inputs), when validated.
    validation_error: float | None = None
    notes: list[str] = field(default_factory=list)
    #: The block's region as found (a standalone graph; see :mod:`moepass.compiler.subgraph`).
    graph_before: Any = field(default=None, repr=False)
    #: The nodes that replaced it, when rewritten.
    graph_after: Any = field(default=None, repr=False)
    #: A weak reference to one of the block's parameters (its router weight)
    #: and that parameter's path as the graph named it: a block compiled in a
    #: frame of its own (the model graph-broke around it) is named relative to
    #: that frame, and :func:`report` recovers its full path from the model.
    anchor: Any = field(default=None, repr=False, compare=False)
    anchor_name: str = ""
    #: Seen only around a graph that holds its experts (its router ran outside every graph the
    #: backend saw): an entry of the same block from a graph that holds its router takes precedence.
    in_pieces: bool = False
    #: What the CPU lowering runs for this block on this machine and why
    #: (:class:`moepass.lowering.cpu_tuning.BlockKernels`: the path per row-count
    #: range with the measured times), None off the CPU lowering.
    cpu_kernels: Any = field(default=None, repr=False, compare=False)

    @property
    def reason_code(self) -> str:
        """Why the block was left alone, as one of :data:`REASON_CODES` ("" when rewritten).

        Derived from :attr:`reason` by :func:`classify_reason` for now.
        """
        return "" if self.rewritten else classify_reason(self.reason)

    @property
    def display_path(self) -> str:
        """The path, or ``<root>`` for a block compiled on its own."""
        return self.path or "<root>"


@dataclass
class Report:
    """The blocks of one compiled model."""

    blocks: list[BlockReport] = field(default_factory=list)
    policy: str = "static"
    inner: str = "inductor"
    lowering: str = "auto"
    graphs: int = 0
    #: The expert offloading session (:class:`moepass.runtime.offload.OffloadSession`) when offloading.
    offload: Any = field(default=None, repr=False)
    #: The model's parameters (weakly held), to find the report of a model.
    _params: "weakref.WeakValueDictionary[int, torch.Tensor]" = field(
        default_factory=weakref.WeakValueDictionary, repr=False
    )

    @property
    def rewritten(self) -> list[BlockReport]:
        """Blocks that now run through moepass ops."""
        return [b for b in self.blocks if b.rewritten]

    @property
    def not_rewritten(self) -> list[BlockReport]:
        """Blocks left exactly as they were."""
        return [b for b in self.blocks if not b.rewritten]

    def stats(self) -> dict[str, BlockStats]:
        """Run-time routing statistics of this model's blocks (needs ``stats=True``)."""
        paths = {b.path for b in self.blocks}
        return {path: s for path, s in routing_stats().items() if path in paths}

    def block(self, path: str) -> BlockReport:
        """The entry for ``path``."""
        for entry in self.blocks:
            if entry.path == path:
                return entry
        raise KeyError(f"no MoE block {path!r}; blocks: {[b.path for b in self.blocks]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "policy": self.policy,
            "inner": self.inner,
            "lowering": self.lowering,
            "graphs": self.graphs,
            "blocks": [
                {
                    "path": b.path,
                    "router": b.router,
                    "router_description": b.router_description,
                    "dispatch": b.dispatch,
                    "num_experts": b.num_experts,
                    "top_k": b.top_k,
                    "rewritten": b.rewritten,
                    "reason": b.reason,
                    "reason_code": b.reason_code,
                    "shared_experts": b.shared_experts,
                    "policy": b.policy,
                    "validation_error": b.validation_error,
                    "notes": b.notes,
                    "cpu_kernels": b.cpu_kernels.to_dict() if b.cpu_kernels is not None else None,
                }
                for b in self.blocks
            ],
            "offload": self.offload.to_dict() if self.offload is not None else None,
        }

    def __str__(self) -> str:
        header = ("block", "router", "dispatch", "E", "k", "rewritten", "why not / notes")
        stats = self.stats()
        rows = []
        for b in self.blocks:
            why = b.reason if not b.rewritten else "; ".join(b.notes)
            if b.path in stats and stats[b.path].tokens:
                s = stats[b.path]
                per_k = "/".join(str(n) for n in s.tokens_per_k)
                flops = f", expert FLOPs {100 * s.average_k / b.top_k:.0f}% of static" if b.top_k else ""
                why = (why + "; " if why else "") + f"avg k {s.average_k:.2f} (tokens per k {per_k}){flops}"
                if s.zero_compute_slots:
                    why += f"; {s.zero_compute_slots} slots went to zero-computation experts (no GEMM row)"
            rows.append(
                (
                    b.display_path,
                    b.router_description or b.router,
                    b.dispatch,
                    "" if b.num_experts is None else str(b.num_experts),
                    "" if b.top_k is None else str(b.top_k),
                    "yes" if b.rewritten else "no",
                    why,
                )
            )
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header) - 1)]
        lines = [
            f"moepass report: {len(self.rewritten)}/{len(self.blocks)} MoE blocks rewritten, "
            f"policy {self.policy}, lowering {self.lowering}, inner {self.inner}, {self.graphs} graph(s)"
        ]
        if not self.blocks:
            lines.append("(no MoE block found: the graph was passed on unchanged)")
            return "\n".join(lines)

        def fmt(row):
            cells = [str(c).ljust(w) for c, w in zip(row, widths)]
            return "  ".join(cells + [str(row[-1])]).rstrip()

        lines.append(fmt(header))
        lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 16)
        lines.extend(fmt(r) for r in rows)
        paths = [b for b in self.blocks if b.cpu_kernels is not None]
        if paths:
            lines.extend(["", f"CPU lowering on {paths[0].cpu_kernels.machine}:"])
            for b in paths:
                lines.append(f"{b.display_path}: " + "\n  ".join(b.cpu_kernels.lines()))
        if self.offload is not None:
            lines.extend(["", *self.offload.report_lines()])
        return "\n".join(lines)


_lock = threading.Lock()
_reports: list[Report] = []
_latest: list[Report] = []
#: id(torch.compile wrapper) → (weak reference to it, its report)
_by_session: dict[int, tuple[weakref.ref, Report]] = {}


def _session_report(session: object) -> Report | None:
    entry = _by_session.get(id(session))
    if entry is not None and entry[0]() is session:
        return entry[1]
    return None


def _shares_params(report_: Report, params: list[torch.Tensor]) -> bool:
    held = report_._params
    return any(held.get(id(p)) is p for p in params)


def _compile_session() -> object | None:
    """The ``torch.compile`` wrapper whose backend call we are in, if any.

    Every graph of one ``torch.compile(model, backend=...)`` (graph breaks,
    recompiles) is compiled through the same wrapper object, which calls the
    backend; finding it on the stack groups those graphs into one report.
    """
    wrapper_type = getattr(torch, "_TorchCompileWrapper", None)
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if wrapper_type is not None and isinstance(candidate, wrapper_type):
            return candidate
        frame = frame.f_back
    return None


def record_graph(blocks: list[BlockReport], params: list[torch.Tensor], policy: str, inner: str, lowering: str) -> Report:
    """Add one compiled graph's blocks to the report of the model it belongs to.

    Graphs compiled by the same ``torch.compile`` call share a report; without
    one on the stack (the backend called directly), a graph joins the report
    that already holds one of its parameters.
    """
    session = _compile_session()
    with _lock:
        target = _session_report(session) if session is not None else None
        if target is None and session is None and params:
            for existing in reversed(_reports):
                if existing.policy == policy and _shares_params(existing, params):
                    target = existing
                    break
        if target is None:
            target = Report(policy=policy, inner=inner, lowering=lowering)
            _reports.append(target)
            del _reports[:-64]  # keep memory bounded in long sessions
            if session is not None:
                for key in [k for k, (ref, _) in _by_session.items() if ref() is None]:
                    del _by_session[key]
                _by_session[id(session)] = (weakref.ref(session), target)
        for p in params:
            target._params[id(p)] = p
        target.graphs += 1
        for entry in blocks:
            same = [b for b in target.blocks if _identity(b) == _identity(entry)]
            if entry.in_pieces and any(not b.in_pieces for b in same):
                continue  # the graph that holds its router said more
            target.blocks = [b for b in target.blocks if _identity(b) != _identity(entry)]
            target.blocks.append(entry)
        target.blocks.sort(key=lambda b: _natural_key(b.path))
        _latest[:] = [target]
        return target


def _identity(entry: BlockReport) -> tuple:
    """What makes two entries the same block: its path and, when known, its router's weight."""
    anchor = entry.anchor() if entry.anchor is not None else None
    return (entry.path, id(anchor) if anchor is not None else None)


def _resolve_paths(report_: Report, module: torch.nn.Module) -> None:
    """Give entries named relative to a frame of their own the full module path in ``module``."""
    names = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
    changed = False
    for entry in report_.blocks:
        anchor = entry.anchor() if entry.anchor is not None else None
        full = names.get(id(anchor)) if anchor is not None else None
        if not full or not entry.anchor_name or full == entry.anchor_name or not full.endswith("." + entry.anchor_name):
            continue
        prefix = full[: -len(entry.anchor_name) - 1]
        relative = entry.path
        entry.path = f"{prefix}.{relative}" if relative else prefix
        entry.anchor_name = full
        changed = True
        # the frame was compiled once and serves every module of its class: list them all
        try:
            owner = module.get_submodule(prefix)
        except AttributeError:
            continue
        known = {b.path for b in report_.blocks}
        for name, other in module.named_modules():
            path = f"{name}.{relative}" if relative else name
            if other is not owner and type(other) is type(owner) and path not in known:
                twin = dataclasses.replace(entry, path=path, anchor=None, anchor_name="")
                twin.notes = [*entry.notes, f"runs the graph compiled for {entry.path}" if not entry.in_pieces else
                              f"a block of the class of {entry.path}: its experts loop breaks the same way"]
                report_.blocks.append(twin)
    if changed:
        unique: dict[str, BlockReport] = {}
        for entry in report_.blocks:  # two frames may name one block: keep its first entry, rewritten first
            kept = unique.get(entry.path)
            if kept is None or (entry.rewritten and not kept.rewritten):
                unique[entry.path] = entry
        # a router compiled in a frame of its own names its block by the router's path: the block's own entry says it
        for path in [p for p in unique if _ROUTER_PART.search(p.rsplit(".", 1)[-1]) and "." in p]:
            if path.rsplit(".", 1)[0] in unique and not unique[path].rewritten:
                del unique[path]
        report_.blocks = sorted(unique.values(), key=lambda b: _natural_key(b.path))


#: A module named like a router (``gate``, ``router``, ``gating``).
_ROUTER_PART = re.compile(r"^(gate|router|gating|routing|switch)$")


def _natural_key(path: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def last_report() -> Report | None:
    """The report of the model the backend compiled most recently (None before any compile)."""
    with _lock:
        return _latest[0] if _latest else None


def report(model: Any) -> Report:
    """The report of ``model`` (a module compiled with the backend, or its original).

    Raises:
        LookupError: the model was not compiled with ``backend="adaptive_moe"``
            or has not run yet (dynamo compiles on the first call).
    """
    module = getattr(model, "_orig_mod", model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"report() takes a torch.nn.Module, got {type(model).__name__}")
    params = list(module.parameters())
    with _lock:
        for existing in reversed(_reports):
            if _shares_params(existing, params):
                _resolve_paths(existing, module)
                return existing
    raise LookupError(
        "no moepass report for this model: compile it with torch.compile(model, backend='adaptive_moe') "
        "and call it once (compilation happens on the first call)"
    )
