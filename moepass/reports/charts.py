"""Charts of the k distribution, as PNG bytes (matplotlib, no pyplot state).

* :func:`k_distribution_png` — one block: tokens per k, the native k marked.
* :func:`layers_png` — all measured blocks: average k per layer against the
  native k, with the expert FLOPs saved written on each bar.

Both return None when matplotlib is not installed (the report then shows the
numbers as tables only and says so).
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # a view of the report: inspection.py imports this module, not the other way
    from moepass.reports.inspection import BlockRun

__all__ = ["matplotlib_available", "k_distribution_png", "layers_png"]

logger = logging.getLogger(__name__)

_BAR = "#4c78a8"
_NATIVE = "#f58518"


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def k_distribution_png(run: BlockRun, title: str = "") -> bytes | None:
    """Bar chart of tokens per k for one block; the native k's bar in orange."""
    if not matplotlib_available():
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2, 2.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    ks = list(range(max(len(run.tokens_per_k), run.native_k + 1)))
    counts = [run.tokens_per_k[k] if k < len(run.tokens_per_k) else 0 for k in ks]
    colors = [_NATIVE if k == run.native_k else _BAR for k in ks]
    bars = axes.bar(ks, counts, color=colors, width=0.7)
    for bar, count in zip(bars, counts):
        if count:
            axes.annotate(str(count), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                          va="bottom", fontsize=8)
    axes.set_xticks(ks)
    axes.set_xlabel("experts per token (k)")
    axes.set_ylabel("tokens")
    axes.set_ylim(0, max(counts + [1]) * 1.18)
    axes.spines[["top", "right"]].set_visible(False)
    axes.set_title(
        title or f"average k {run.average_k:.2f} (native {run.native_k}), {run.saved:.0%} FLOPs saved", fontsize=9
    )
    return _png(figure)


def layers_png(paths: Sequence[str], runs: Sequence[BlockRun]) -> bytes | None:
    """Average k per layer (bars) against the native k (orange ticks), expert FLOPs change on each bar."""
    if not matplotlib_available() or not runs:
        return None
    from matplotlib.figure import Figure

    width = min(max(4.0, 0.45 * len(runs) + 2.5), 16)
    figure = Figure(figsize=(width, 3.0), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    xs = list(range(len(runs)))
    averages = [r.average_k for r in runs]
    axes.bar(xs, averages, color=_BAR, width=0.6 if len(runs) > 2 else 0.4, label="average k")
    axes.scatter(xs, [r.native_k for r in runs], marker="_", s=400, color=_NATIVE, linewidths=2.5, label="native k",
                 zorder=3)
    if len(runs) <= 32:
        for x, run in zip(xs, runs):
            label = f"{-run.saved:+.0%}" if run.saved else "±0%"
            axes.annotate(label, (x, run.average_k), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                          textcoords="offset points")
    crowded = len(runs) > 6
    axes.set_xticks(xs)
    axes.set_xticklabels([_short(p) for p in paths], rotation=45 if crowded else 0,
                         ha="right" if crowded else "center", fontsize=8)
    axes.set_ylabel("experts per token")
    axes.set_xlim(-0.6, len(runs) - 0.4)
    axes.set_ylim(0, max([r.native_k for r in runs] + averages) * 1.45)
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(fontsize=8, loc="upper right", ncols=2, frameon=False)
    axes.set_title("average k per layer", fontsize=9)
    return _png(figure)


def _short(path: str) -> str:
    """``model.layers.12.mlp`` → ``12.mlp``: the part that differs between layers."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i:])
    return path or "<root>"
