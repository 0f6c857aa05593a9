"""The inspection report as files: one self-contained HTML page, text, JSON.

::

    InspectionReport ──► render_html ──► index.html   (CSS inline, images as data: URIs,
                    │                                   no script, nothing fetched: works offline)
                    ├──► str()       ──► report.txt
                    └──► to_dict()   ──► report.json

:func:`write_report` renders everything in memory first, then writes into a
temporary folder beside (or, for an existing folder, inside) the target and
renames the files into place, so a failure leaves nothing half-written.
:func:`check_output_dir` finds an unwritable target before the long work.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from moepass._version import __version__
from moepass.reports.charts import k_distribution_png, layers_png, matplotlib_available
from moepass.reports.graphview import Drawing, draw, graphviz_available, readable_code, to_networkx
from moepass.runtime.progress import progress
from moepass.runtime.report import BlockReport

if TYPE_CHECKING:  # InspectionReport.save() imports this module, not the other way
    from moepass.reports.inspection import InspectionReport

__all__ = ["ReportWriteError", "REPORT_FILES", "check_output_dir", "render_html", "write_report"]

logger = logging.getLogger(__name__)

#: The files :func:`write_report` writes.
REPORT_FILES = ("index.html", "report.txt", "report.json")


class ReportWriteError(OSError):
    """The report's folder cannot be written; the message says which and why."""


def _png_uri(data: bytes | None) -> str:
    return Drawing("image/png", data or b"").data_uri


def block_anchor(path: str) -> str:
    """The HTML id of a block's section."""
    return "block-" + (re.sub(r"[^A-Za-z0-9_-]", "-", path) or "root")


_CSS = """
:root { --fg:#1d2430; --muted:#5c6675; --line:#d9dee6; --ok:#2e7d32; --okbg:#e3f4e4; --no:#a15c00; --nobg:#fff1dc;
        --code:#f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       background: #fff; }
main { max-width: 1400px; margin: 0 auto; padding: 20px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 6px; }
h2 { font-size: 18px; margin: 0; font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
h3 { font-size: 14px; margin: 0 0 8px; color: var(--muted); font-weight: 600; }
.summary { font-size: 15px; margin: 0 0 4px; }
.meta, .note { color: var(--muted); margin: 0 0 4px; }
.note { font-style: italic; }
table { border-collapse: collapse; }
table.blocks { margin: 16px 0; width: 100%; }
table.blocks th, table.blocks td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left;
       white-space: nowrap; }
table.blocks td.num, table.blocks th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.blocks td.why { white-space: normal; color: var(--muted); }
a { color: #1f5fa8; text-decoration: none; } a:hover { text-decoration: underline; }
.badge { display: inline-block; font: 600 12px/1 system-ui, sans-serif; padding: 4px 8px; border-radius: 10px;
         vertical-align: middle; margin-left: 8px; }
.badge.yes { color: var(--ok); background: var(--okbg); } .badge.no { color: var(--no); background: var(--nobg); }
section.block { border: 1px solid var(--line); border-radius: 8px; padding: 16px 18px; margin: 22px 0; }
.top { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; margin-top: 12px; }
table.facts th { text-align: left; color: var(--muted); font-weight: 500; padding: 2px 14px 2px 0; vertical-align: top;
       white-space: nowrap; }
table.facts td { padding: 2px 0; }
figure { margin: 0; } figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
img.chart { display: block; max-width: 100%; height: auto; }
.views { display: grid; grid-template-columns: 1fr 1fr; gap: 20px; margin-top: 16px; }
@media (max-width: 900px) { .views { grid-template-columns: 1fr; } }
.view { min-width: 0; }
.view .drawing { border: 1px solid var(--line); border-radius: 6px; padding: 8px; background: #fff; text-align: center; }
img.graph { max-width: 100%; height: auto; }
pre { background: var(--code); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; overflow: auto;
      max-height: 420px; font: 12px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; margin: 8px 0 0; }
details summary { cursor: pointer; color: var(--muted); margin-top: 8px; }
.legend span { display: inline-block; padding: 1px 8px; border-radius: 4px; margin-right: 8px; border: 1px solid; font-size: 12px; }
footer { color: var(--muted); font-size: 12px; margin-top: 28px; }
"""


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _summary_rows(inspection: InspectionReport) -> list[str]:
    rows = []
    for block in inspection.blocks:
        run = inspection.run(block.path)
        why = block.reason or "; ".join(block.notes)
        rows.append(
            "<tr>"
            f'<td><a href="#{block_anchor(block.path)}"><code>{html.escape(block.display_path)}</code></a></td>'
            f"<td>{html.escape(block.router_description or block.router)}</td>"
            f"<td>{html.escape(block.dispatch)}</td>"
            f'<td class="num">{"" if block.num_experts is None else block.num_experts}</td>'
            f'<td class="num">{"" if block.top_k is None else block.top_k}</td>'
            f"<td>{html.escape(', '.join(block.shared_experts) or '–')}</td>"
            f'<td><span class="badge {"yes" if block.rewritten else "no"}">{"yes" if block.rewritten else "no"}</span></td>'
            f'<td class="num">{"–" if run is None else f"{run.average_k:.2f}"}</td>'
            f'<td class="num">{"–" if run is None else _pct(run.relative_flops)}</td>'
            f'<td class="num">{"–" if run is None else _pct(run.saved)}</td>'
            f'<td class="why">{html.escape(why)}</td>'
            "</tr>"
        )
    return rows


def _facts(inspection: InspectionReport, block: BlockReport) -> str:
    facts: list[tuple[str, str]] = []
    facts.append(("router", f"{block.router}" + (f" — {block.router_description}" if block.router_description else "")))
    dispatch = block.dispatch
    if block.rewritten:
        dispatch += " → moepass.route" + (" + moepass.experts" if block.spec and block.spec.experts else "")
    facts.append(("dispatch", dispatch))
    experts = "?" if block.num_experts is None else str(block.num_experts)
    if block.spec is not None and block.spec.experts is not None:  # E GEMM experts (+ zero-computation ones)
        experts = f"{block.spec.experts.num_experts} routed ({block.spec.experts.description})"
    facts.append(("experts", experts))
    facts.append(("native k", "?" if block.top_k is None else str(block.top_k)))
    facts.append(("shared experts", ", ".join(block.shared_experts) or "none"))
    facts.append(("policy", block.policy or inspection.policy))
    if block.reason:
        facts.append(("why not rewritten", block.reason))
    for note in block.notes:
        facts.append(("note", note))
    if block.validation_error is not None:
        facts.append(("checked", f"max relative error {block.validation_error:.1e} against the original block"))
    if block.cpu_kernels is not None:
        facts.append(("CPU lowering", f"{block.cpu_kernels.machine}: " + "; ".join(
            line.strip() for line in block.cpu_kernels.lines())))
    run = inspection.run(block.path)
    if run is not None:
        facts.append(("tokens", str(run.tokens)))
        facts.append(("average k", f"{run.average_k:.2f} (native {run.native_k})"))
        facts.append(("tokens per k", ", ".join(f"k={k}: {n}" for k, n in enumerate(run.tokens_per_k))))
        facts.append(("expert FLOPs", f"{run.relative_flops:.1%} of static ({run.saved:.1%} saved)"))
        if run.zero_compute_slots:
            facts.append(("zero-computation slots", f"{run.zero_compute_slots} (no GEMM row, not in k)"))
    elif inspection.example:
        facts.append(("run", inspection.why_no_numbers(block)))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _view(side: str, block: BlockReport, graph, drawing: Drawing | None) -> str:
    title = "Before: the model's own code" if side == "before" else "After: the moepass ops"
    if graph is None:
        missing = (
            "The block was not rewritten." if side == "after" else "Detection stopped before the block's region was known."
        )
        return f'<div class="view {side}"><h3>{title}</h3><p class="note">{missing}</p></div>'
    ops = sum(1 for n in graph.nodes if n.op in ("call_function", "call_method", "call_module"))
    parts = [f'<div class="view {side}"><h3>{title} ({ops} ops)</h3>']
    if drawing is not None and drawing.data:
        parts.append(
            f'<figure class="drawing"><img class="graph graph-{side}" alt="{side} graph of '
            f'{html.escape(block.display_path)}" data-block="{html.escape(block.path)}" src="{drawing.data_uri}">'
            + (f"<figcaption>{html.escape(drawing.note)}</figcaption>" if drawing.note else "")
            + "</figure>"
        )
    elif drawing is not None:
        parts.append(f'<p class="note">{html.escape(drawing.note)}</p>')
    code = readable_code(graph, block.path)
    parts.append(f"<details open><summary>code</summary><pre>{html.escape(code)}</pre></details></div>")
    return "".join(parts)


def _block_section(inspection: InspectionReport, block: BlockReport, drawings: dict[str, Drawing]) -> str:
    badge = '<span class="badge yes">rewritten</span>' if block.rewritten else '<span class="badge no">left as it was</span>'
    run = inspection.run(block.path)
    chart = ""
    if run is not None:
        data = k_distribution_png(run)
        if data:
            chart = (
                f'<figure><img class="chart k-chart" data-block="{html.escape(block.path)}" '
                f'alt="tokens per k in {html.escape(block.display_path)}" src="{_png_uri(data)}"></figure>'
            )
    return (
        f'<section class="block" id="{block_anchor(block.path)}" data-path="{html.escape(block.path)}">'
        f"<h2>{html.escape(block.display_path)}{badge}</h2>"
        f'<div class="top">{_facts(inspection, block)}{chart}</div>'
        f'<div class="views">{_view("before", block, block.graph_before, drawings.get("before"))}'
        f'{_view("after", block, block.graph_after, drawings.get("after"))}</div>'
        "</section>"
    )


def _draw_block(block: BlockReport) -> dict[str, Drawing]:
    drawings = {}
    for side, graph in (("before", block.graph_before), ("after", block.graph_after)):
        if graph is not None:
            drawings[side] = draw(to_networkx(graph, block.path))
    return drawings


def render_html(inspection: InspectionReport, show_progress: bool = True) -> str:
    """The whole report as one HTML page with everything embedded."""
    title = f"moepass inspection: {inspection.model_name or 'model'}"
    report = inspection.report
    summary = (
        f"{len(report.rewritten)} of {len(report.blocks)} MoE blocks rewritten · policy "
        f"<code>{html.escape(report.policy)}</code>"
    )
    if inspection.example:
        summary += f" · example {html.escape(inspection.example)}"
    total = inspection.relative_flops
    if total is not None:
        summary += f" · expert FLOPs <b>{total:.1%}</b> of static ({1 - total:.1%} saved)"
    meta = f"lowering {report.lowering} · inner compiler {report.inner} · {report.graphs} graph(s)"
    if inspection.example:
        meta += f" · compiled and ran in {inspection.seconds:.1f} s"
    notes = []
    if not graphviz_available():
        notes.append(
            "Graphviz (dot) is not installed: graphs are drawn with matplotlib instead."
            if matplotlib_available()
            else "Neither Graphviz (dot) nor matplotlib is installed: graphs are shown as code only."
        )
    if not matplotlib_available():
        notes.append("matplotlib is not installed (pip install 'moepass[inspect]'): charts are shown as tables only.")

    sections = []
    for block in progress(inspection.blocks, "drawing MoE blocks", enabled=show_progress):
        sections.append(_block_section(inspection, block, _draw_block(block)))

    measured = [b for b in inspection.blocks if b.path in inspection.runs]
    overview = layers_png([b.display_path for b in measured], [inspection.runs[b.path] for b in measured])
    overview_html = (
        f'<figure class="overview"><img class="chart layers-chart" alt="average k per layer" '
        f'src="{_png_uri(overview)}"><figcaption>Bars: average experts per token in each layer; orange: the '
        "model's own k; labels: expert FLOPs against static (the model's k for every token).</figcaption></figure>"
        if overview
        else ""
    )
    header = (
        "<tr><th>block</th><th>router</th><th>dispatch</th><th class=num>E</th><th class=num>k</th>"
        "<th>shared</th><th>rewritten</th><th class=num>avg k</th><th class=num>FLOPs vs static</th>"
        "<th class=num>saved</th><th>why not / notes</th></tr>"
    )
    table = (
        f'<table class="blocks">{header}{"".join(_summary_rows(inspection))}</table>'
        if inspection.blocks
        else '<p class="note">No MoE block was found: the graphs were passed on unchanged.</p>'
    )
    legend = (
        '<p class="legend">In the drawings: <span style="background:#9fd8a4;border-color:#2e7d32">moepass op</span>'
        '<span style="background:#fbd9a6;border-color:#c07a12">original expert dispatch</span>'
        '<span style="background:#e8eef7;border-color:#7b8da8">input / output</span></p>'
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><main><h1>{html.escape(title)}</h1>"
        f'<p class="summary">{summary}</p><p class="meta">{html.escape(meta)}</p>'
        + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
        + table
        + overview_html
        + (legend if inspection.blocks else "")
        + "".join(sections)
        + f'<details><summary>text report</summary><pre class="text-report">{html.escape(str(inspection))}</pre></details>'
        + f"<footer>moepass {html.escape(__version__)}</footer></main></body></html>\n"
    )


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(directory: str | os.PathLike) -> Path:
    """The absolute target folder; raise :class:`ReportWriteError` if it cannot be written.

    Checked by really creating (and removing) a temporary folder, so it holds
    for root and read-only file systems alike.
    """
    target = Path(directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ReportWriteError(f"cannot write the report to {target}: it exists and is not a directory")
    probe_in = target if target.exists() else _nearest_existing(target.parent)
    if not probe_in.is_dir():
        raise ReportWriteError(f"cannot write the report to {target}: {probe_in} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".moepass-probe-", dir=probe_in))
    except OSError as error:
        raise ReportWriteError(f"cannot write the report to {target}: {error.strerror or error}") from None
    return target


def write_report(inspection: InspectionReport, directory: str | os.PathLike, show_progress: bool = True) -> Path:
    """Write ``index.html``, ``report.txt`` and ``report.json`` into ``directory``, all or nothing.

    Returns:
        The folder written.

    Raises:
        ReportWriteError: the folder cannot be written (nothing is left behind).
    """
    target = check_output_dir(directory)
    contents = {
        "index.html": render_html(inspection, show_progress),
        "report.txt": str(inspection) + "\n",
        "report.json": json.dumps(inspection.to_dict(), indent=2, default=str) + "\n",
    }
    created: list[Path] = []
    staging: Path | None = None
    try:
        if target.exists():
            staging = Path(tempfile.mkdtemp(prefix=".moepass-report-", dir=target))
        else:
            missing = target.parent
            while not missing.exists():
                created.append(missing)
                missing = missing.parent
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        for name, text in contents.items():
            (staging / name).write_text(text, encoding="utf-8")
        if target.exists():
            for name in contents:
                os.replace(staging / name, target / name)
            staging.rmdir()
        else:
            os.chmod(staging, 0o755)  # mkdtemp makes it private; a report folder is not
            os.rename(staging, target)
        staging = None
    except OSError as error:
        raise ReportWriteError(f"cannot write the report to {target}: {error.strerror or error}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            for folder in created:  # innermost first: only the ones this call made, and only if empty
                try:
                    folder.rmdir()
                except OSError:
                    break
    logger.info("moepass: wrote %s", ", ".join(str(target / name) for name in contents))
    return target
