"""Standalone copies of parts of a graph, for reports and pictures.

:func:`extract` copies a set of nodes into a new :class:`torch.fx.Graph` whose
placeholders are the values the set reads from outside; :func:`python_code`
renders such a graph as readable Python.  The backend keeps the region each
block replaced ("before") and the nodes that replaced it ("after").
"""

from __future__ import annotations

from typing import Iterable

import torch.fx as fx

__all__ = ["extract", "python_code"]


def extract(nodes: Iterable[fx.Node], outputs: Iterable[fx.Node]) -> fx.Graph:
    """A new graph computing ``outputs`` from ``nodes``; outside inputs become placeholders."""
    members = list(nodes)
    member_set = set(members)
    order = {n: i for i, n in enumerate(members[0].graph.nodes)} if members else {}
    members.sort(key=order.__getitem__)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            placeholder = graph.placeholder(node.name)
            placeholder.meta.update(node.meta)
            env[node] = placeholder
        return env[node]

    # placeholders first, in order of first use
    for node in members:
        for source in node.all_input_nodes:
            if source not in member_set:
                lookup(source)
    for node in members:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(env[o] for o in outputs) if not isinstance(outputs, fx.Node) else env[outputs])
    return graph


def python_code(graph: fx.Graph) -> str:
    """The graph as Python source."""
    return graph.python_code(root_module="self").src.strip()
