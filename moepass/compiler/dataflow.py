"""A mutation-aware view of a torch-level FX graph, for region analysis.

Dynamo graphs are not functional: ``router_top_value /= s``, ``inv[perm] = r``,
``out.add_(bias)`` and ``out.index_add_(0, idx, y)`` mutate tensors in place,
and later nodes read the mutated tensor through its *old* node.  Data edges
alone therefore miss dependencies.  :class:`Dataflow` adds an edge from every
in-place node to every later reader of the mutated tensor (or of any view of
it), so ancestors, descendants and post-dominators mean what they should.

Helpers here also normalise op names across the spellings dynamo emits
(``torch.topk``, ``Tensor.topk``, ``torch.ops.aten.topk.default``...).
"""

from __future__ import annotations

import operator
from functools import cached_property
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx

__all__ = [
    "op_name",
    "is_inplace",
    "mutated_node",
    "written_value",
    "example_value",
    "tensor_shape",
    "is_param_like",
    "is_view_like",
    "alias_parent",
    "alias_root",
    "Dataflow",
]

_INPLACE_OPERATORS = {
    operator.setitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
}

_VIEW_OPS = {
    "view",
    "reshape",
    "view_as",
    "reshape_as",
    "transpose",
    "permute",
    "t",
    "expand",
    "expand_as",
    "unsqueeze",
    "squeeze",
    "narrow",
    "select",
    "as_strided",
    "unflatten",
    "flatten",
    "contiguous",
    "chunk",
    "split",
    "unbind",
    "detach",
    "movedim",
    "diagonal",
    "unfold",
}


def op_name(node: fx.Node) -> str:
    """A short, spelling-independent name for what ``node`` computes.

    ``torch.topk``, ``Tensor.topk`` and ``aten.topk.default`` are all
    ``"topk"``; custom ops of other namespaces keep theirs
    (``"transformers::grouped_mm_fallback"``); placeholders and outputs give
    their ``op``.
    """
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        return "module"
    if node.op != "call_function":
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        qualified = target._schema.name
    elif isinstance(target, torch._ops.OpOverloadPacket):
        qualified = target._qualified_op_name
    else:
        qualified = None
    if qualified is not None:
        namespace, _, name = qualified.partition("::")
        return name if namespace == "aten" else f"{namespace}::{name}"
    name = getattr(target, "__name__", None) or str(target)
    return name


def example_value(node: Any) -> Any:
    """The (fake) value dynamo recorded for ``node``, or None."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_shape(node: Any) -> tuple | None:
    """The recorded shape of a tensor-valued node (may hold SymInts), or None."""
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def is_param_like(node: Any) -> bool:
    """A graph input or attribute that holds a tensor (parameter, buffer, input)."""
    return (
        isinstance(node, fx.Node)
        and node.op in ("placeholder", "get_attr")
        and isinstance(example_value(node), torch.Tensor)
    ) or (isinstance(node, fx.Node) and node.op == "get_attr")


def is_inplace(node: fx.Node) -> bool:
    """Whether ``node`` mutates one of its tensor arguments in place."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_") and name != "requires_grad_"
    if node.op != "call_function":
        return False
    target = node.target
    if target in _INPLACE_OPERATORS:
        return isinstance(example_value(node.args[0]), torch.Tensor)
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    if "out" in node.kwargs:
        return True
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_") and bool(node.args)


def mutated_node(node: fx.Node) -> fx.Node | None:
    """The node whose tensor ``node`` mutates, if ``node`` is in-place."""
    if not is_inplace(node):
        return None
    if node.op == "call_function" and "out" in node.kwargs:
        out = node.kwargs["out"]
        return out if isinstance(out, fx.Node) else None
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None


def written_value(node: fx.Node) -> fx.Node:
    """The node whose recorded value is what ``node`` leaves behind.

    ``out[mask] = y`` (``operator.setitem``) returns nothing: the value it
    leaves is ``out``'s tensor after the write.  Every other node is its own.
    """
    if not isinstance(example_value(node), torch.Tensor):
        target = mutated_node(node)
        if target is not None and isinstance(example_value(target), torch.Tensor):
            return target
    return node


_MULTI_VIEW_OPS = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}


def alias_parent(node: fx.Node) -> fx.Node | None:
    """The node whose storage ``node`` may view, or None if ``node`` owns its storage.

    ``x.view(...)``, ``x[:, :4]`` and ``x.chunk(2)[0]`` view ``x``;
    ``torch.topk(x, k)[0]`` and ``x[idx_tensor]`` do not.
    """
    name = op_name(node)
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    if name == "getitem":
        if isinstance(example_value(source), (tuple, list)):
            # an element of a multi-output op: a view only for chunk/split
            if op_name(source) in _MULTI_VIEW_OPS and source.args and isinstance(source.args[0], fx.Node):
                return source.args[0]
            return None
        index = node.args[1]
        indices = index if isinstance(index, tuple) else (index,)
        # basic indexing (ints, slices, None, Ellipsis) makes a view; tensors copy
        if any(isinstance(i, fx.Node) and isinstance(example_value(i), torch.Tensor) for i in indices):
            return None
        return source
    if name in _VIEW_OPS and name not in _MULTI_VIEW_OPS:
        return source
    return None


def is_view_like(node: fx.Node) -> bool:
    """Whether ``node`` may return a view sharing storage with another node."""
    return alias_parent(node) is not None


def alias_root(node: fx.Node) -> fx.Node:
    """Follow view-like ops back to the node that owns the storage."""
    for _ in range(64):
        parent = alias_parent(node)
        if parent is None:
            break
        node = parent
    return node


class Dataflow:
    """Data and mutation dependencies of an FX graph as a networkx DiGraph.

    Edges: ``a → b`` when ``b`` reads ``a``; and ``m → r`` when ``m`` is the
    latest in-place write to a tensor before ``r`` reads it (or a view of it).

    The view describes the graph as it was built; passes that edit the graph
    keep using it only for nodes they did not touch.
    """

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.nodes: list[fx.Node] = list(graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.dag = nx.DiGraph()
        self.dag.add_nodes_from(self.nodes)
        # SSA-style versions: a reader of a tensor depends on the latest in-place
        # write to it (through any view) that precedes the reader.
        latest_write: dict[fx.Node, fx.Node] = {}
        for node in self.nodes:
            for source in node.all_input_nodes:
                self.dag.add_edge(source, node)
                writer = latest_write.get(alias_root(source))
                if writer is not None and writer is not node:
                    self.dag.add_edge(writer, node)
            target = mutated_node(node)
            if target is not None:
                latest_write[alias_root(target)] = node
        self.output = next(n for n in reversed(self.nodes) if n.op == "output")
        self._ancestors: dict[fx.Node, frozenset[fx.Node]] = {}
        self._descendants: dict[fx.Node, frozenset[fx.Node]] = {}

    def ancestors(self, node: fx.Node) -> frozenset[fx.Node]:
        """Every node ``node`` depends on (data or mutation), excluding itself (memoised)."""
        found = self._ancestors.get(node)
        if found is None:
            found = self._ancestors[node] = frozenset(nx.ancestors(self.dag, node))
        return found

    def descendants(self, node: fx.Node) -> frozenset[fx.Node]:
        """Every node that depends on ``node``, excluding itself (memoised)."""
        found = self._descendants.get(node)
        if found is None:
            found = self._descendants[node] = frozenset(nx.descendants(self.dag, node))
        return found

    @cached_property
    def _immediate_post_dominators(self) -> dict[fx.Node, fx.Node]:
        return nx.immediate_dominators(self.dag.reverse(copy=False), self.output)

    def post_dominators(self, node: fx.Node) -> list[fx.Node]:
        """Nodes every path from ``node`` to the output passes through, nearest first.

        Empty when ``node`` does not reach the output.
        """
        idom = self._immediate_post_dominators
        if node not in idom:
            return []
        chain = []
        current = node
        while current != self.output:
            current = idom[current]
            chain.append(current)
        return chain[:-1]  # drop the output node itself

    def readers_after(self, node: fx.Node) -> list[fx.Node]:
        """Nodes that read the value ``node`` stands for, after ``node`` runs.

        For an ordinary node these are its users.  For an in-place node they
        also include later readers of the mutated tensor (through any view).
        """
        readers = set(node.users)
        target = mutated_node(node)
        if target is not None:
            root = alias_root(target)
            for reader in self.dag.successors(node):
                if any(alias_root(src) is root for src in reader.all_input_nodes):
                    readers.add(reader)
        return sorted(readers, key=self.position.__getitem__)

    def sorted(self, nodes: Iterable[fx.Node]) -> list[fx.Node]:
        """``nodes`` in graph order."""
        return sorted(nodes, key=self.position.__getitem__)
