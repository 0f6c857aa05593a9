"""Views of a block's standalone graph: readable code, a networkx graph, a drawing.

::

    fx.Graph (BlockReport.graph_before / graph_after)
        │ readable_code   python_code with parameter inputs named after their
        │                 module (``gate_weight``) and the ``x = None`` frees dropped
        │ to_networkx     DiGraph: one node per fx node, labelled by op and shape,
        │                 kind ∈ input | op | dispatch | moepass | output
        ▼ draw            Graphviz ``dot`` → SVG; without it, matplotlib → PNG;
                          without either, no picture (and a note saying why)

Drawing never raises: a failure becomes a :class:`Drawing` without data and
a note, and the report says so.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from moepass.compiler.dataflow import op_name, tensor_shape
from moepass.compiler.subgraph import python_code

__all__ = ["DISPATCH_OPS", "Drawing", "readable_names", "readable_code", "to_networkx", "draw", "graphviz_available"]

logger = logging.getLogger(__name__)

#: Ops that dispatch tokens to experts or run their stacked GEMMs in the
#: model's own code (highlighted in "before" drawings).
DISPATCH_OPS = frozenset(
    {
        "transformers::grouped_mm_fallback",
        "_grouped_mm",
        "grouped_mm",
        "bmm",
        "baddbmm",
        "index_add_",
        "index_add",
    }
)

#: Fill colours by node kind (Graphviz and matplotlib alike).
COLORS = {
    "input": "#e8eef7",
    "output": "#e8eef7",
    "op": "#ffffff",
    "dispatch": "#fbd9a6",
    "moepass": "#9fd8a4",
}
_BORDERS = {"input": "#7b8da8", "output": "#7b8da8", "op": "#9a9a9a", "dispatch": "#c07a12", "moepass": "#2e7d32"}


def _module_path(name: str) -> str | None:
    """``l_self_modules_model_modules_gate_parameters_weight_`` → ``model.gate.weight`` (dynamo's naming)."""
    if not name.startswith("l_self_") or not re.search(r"(^|_)(parameters|buffers)_", name[len("l_self") :]):
        return None
    text = re.sub(r"^(modules|parameters|buffers)_", "", name[len("l_self_") :])
    text = re.sub(r"_(modules|parameters|buffers)_", ".", text)
    return text.rstrip("_") or None


def readable_names(graph: fx.Graph, block_path: str = "") -> dict[str, str]:
    """Short names for the parameter inputs of ``graph``, relative to ``block_path``.

    Returns ``{fx name: dotted name}``, e.g. ``{"l_self_..._gate_parameters_weight_": "gate.weight"}``;
    inputs that are not module parameters or buffers keep their names.
    """
    names = {}
    prefix = block_path + "." if block_path else ""
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        dotted = _module_path(node.name)
        if dotted is None:
            continue
        if prefix and dotted.startswith(prefix):
            dotted = dotted[len(prefix) :]
        names[node.name] = dotted
    return names


_FREES = re.compile(r";\s+(?:[A-Za-z_]\w*\s*=\s*)+None$", re.MULTILINE)


def readable_code(graph: fx.Graph, block_path: str = "") -> str:
    """``graph`` as Python, with short parameter names and without dynamo's ``x = None`` frees."""
    source = python_code(graph)
    taken = {node.name for node in graph.nodes}
    renames = {}
    for old, dotted in readable_names(graph, block_path).items():
        new = re.sub(r"\W", "_", dotted)
        if new[:1].isdigit():
            new = "p_" + new
        if new not in taken:
            renames[old] = new
            taken.add(new)
    if renames:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(renames, key=len, reverse=True))) + r")\b")
        source = pattern.sub(lambda m: renames[m.group(1)], source)
    return _FREES.sub("", source)


def node_kind(node: fx.Node) -> str:
    """``input``, ``output``, ``moepass`` (the pass's ops), ``dispatch`` (see DISPATCH_OPS) or ``op``."""
    if node.op in ("placeholder", "get_attr"):
        return "input"
    if node.op == "output":
        return "output"
    name = op_name(node)
    if name.startswith("moepass::"):
        return "moepass"
    if name in DISPATCH_OPS:
        return "dispatch"
    return "op"


def _shape_text(node: fx.Node) -> str:
    shape = tensor_shape(node)
    if shape is None:
        return ""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _label(node: fx.Node, names: dict[str, str]) -> str:
    if node.op in ("placeholder", "get_attr"):
        title = names.get(node.name, node.name)
    elif node.op == "output":
        title = "output"
    elif node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem" and len(node.args) > 1:
        title = f"[{node.args[1]}]"
    elif node.op == "call_method":
        title = f".{node.target}()"
    else:
        title = op_name(node).replace("::", ".")
    shape = _shape_text(node)
    return f"{title}\n{shape}" if shape else title


def to_networkx(graph: fx.Graph, block_path: str = "") -> nx.DiGraph:
    """A DiGraph of ``graph``: nodes keyed by fx name with ``label``, ``op`` and ``kind``; edges follow data."""
    names = readable_names(graph, block_path)
    result = nx.DiGraph()
    for node in graph.nodes:
        result.add_node(node.name, label=_label(node, names), op=op_name(node), kind=node_kind(node))
        for source in node.all_input_nodes:
            result.add_edge(source.name, node.name)
    return result


@dataclass
class Drawing:
    """A rendered graph: image bytes and their MIME type, or a note saying why there is none."""

    mime: str = ""
    data: bytes = b""
    #: "graphviz", "matplotlib" or "" (no picture).
    engine: str = ""
    note: str = ""

    @property
    def data_uri(self) -> str:
        """The image as a ``data:`` URI (empty when there is no picture)."""
        if not self.data:
            return ""
        return f"data:{self.mime};base64," + base64.b64encode(self.data).decode("ascii")


def graphviz_available() -> bool:
    """Whether Graphviz's ``dot`` is on the PATH."""
    return shutil.which("dot") is not None


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: nx.DiGraph, title: str = "") -> str:
    """Graphviz source for a graph made by :func:`to_networkx`."""
    ids = {name: f"n{i}" for i, name in enumerate(graph.nodes)}
    lines = [
        "digraph G {",
        '  graph [rankdir=TB, nodesep=0.25, ranksep=0.3, fontname="Helvetica", fontsize=11, bgcolor="white"'
        + (f", label={_dot_quote(title)}, labelloc=t" if title else "")
        + "];",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, margin="0.12,0.04", height=0.3];',
        '  edge [color="#8a8a8a", arrowsize=0.6];',
    ]
    for name, data in graph.nodes(data=True):
        kind = data.get("kind", "op")
        bold = ', penwidth=2, fontname="Helvetica-Bold"' if kind in ("moepass", "dispatch") else ""
        lines.append(
            f"  {ids[name]} [label={_dot_quote(data.get('label', name))}, fillcolor=\"{COLORS[kind]}\", "
            f"color=\"{_BORDERS[kind]}\"{bold}];"
        )
    for source, target in graph.edges:
        lines.append(f"  {ids[source]} -> {ids[target]};")
    lines.append("}")
    return "\n".join(lines)


def _draw_graphviz(graph: nx.DiGraph, title: str) -> Drawing:
    result = subprocess.run(
        ["dot", "-Tsvg"], input=to_dot(graph, title).encode(), capture_output=True, timeout=120, check=False
    )
    if result.returncode != 0 or b"<svg" not in result.stdout:
        raise RuntimeError(f"dot exited with {result.returncode}: {result.stderr.decode(errors='replace').strip()[:200]}")
    return Drawing("image/svg+xml", result.stdout, "graphviz")


def _layers(graph: nx.DiGraph) -> dict[str, int]:
    return {name: depth for depth, names in enumerate(nx.topological_generations(graph)) for name in names}


def _draw_matplotlib(graph: nx.DiGraph, title: str, note: str) -> Drawing:
    from matplotlib.figure import Figure

    layer = _layers(graph)
    depth = max(layer.values(), default=0) + 1
    width = max((sum(1 for v in layer.values() if v == d) for d in range(depth)), default=1)
    # top-down layers, nodes of a layer spread evenly
    positions = {}
    for d in range(depth):
        members = [n for n in graph.nodes if layer[n] == d]
        for i, name in enumerate(members):
            positions[name] = ((i + 0.5) / len(members) * width, -d)
    # about 1.5 in per node side by side and 0.55 in per layer keeps 8-pt labels legible at column width
    figure = Figure(figsize=(min(1.0 + 1.5 * width, 14), min(0.8 + 0.55 * depth, 40)), dpi=100)
    axes = figure.add_axes((0, 0, 1, 0.97 if title else 1))
    axes.set_axis_off()
    axes.set_xlim(-0.2, width + 0.2)
    axes.set_ylim(-depth + 0.4, 0.6)
    nx.draw_networkx_edges(graph, positions, ax=axes, edge_color="#8a8a8a", arrows=True, arrowsize=8, node_size=900)
    for name, data in graph.nodes(data=True):
        kind = data.get("kind", "op")
        x, y = positions[name]
        axes.text(
            x,
            y,
            data.get("label", name),
            ha="center",
            va="center",
            fontsize=8,
            fontweight="bold" if kind in ("moepass", "dispatch") else "normal",
            bbox=dict(boxstyle="round,pad=0.3", facecolor=COLORS[kind], edgecolor=_BORDERS[kind]),
        )
    if title:
        figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return Drawing("image/png", buffer.getvalue(), "matplotlib", note)


def draw(graph: nx.DiGraph, title: str = "") -> Drawing:
    """Render a graph made by :func:`to_networkx`: Graphviz SVG, else matplotlib PNG, else a note."""
    note = ""
    if graphviz_available():
        try:
            return _draw_graphviz(graph, title)
        except Exception as error:  # a drawing is never worth failing the report
            note = f"Graphviz failed ({error}); drawn with matplotlib instead"
            logger.warning("moepass: %s", note)
    else:
        note = "Graphviz (dot) is not installed; drawn with matplotlib instead"
    try:
        return _draw_matplotlib(graph, title, note)
    except ImportError:
        return Drawing(note="neither Graphviz (dot) nor matplotlib is installed: no drawing")
    except Exception as error:
        logger.warning("moepass: matplotlib could not draw %s: %s", title or "a graph", error)
        return Drawing(note=f"could not draw the graph: {type(error).__name__}: {error}")

