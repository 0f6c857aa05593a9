"""The region of an MoE block: the nodes a rewrite may replace.

Given the block's input ``x`` and its combine node ``C`` (the value the block
hands back to the model), the region is every node ``C`` depends on that ``x``
does not, parameters excluded::

    region(C) = (ancestors(C) ∪ {C}) \\ (ancestors(x) ∪ {x}) \\ graph inputs

with dependencies that include in-place mutations (see :mod:`moepass.compiler.dataflow`).
The region is *closed* when everything it reads from outside is ``x``, a
parameter/buffer, or a symbolic size; only a closed region can be replaced by
``f(x, params)``.  It is *safe* when it mutates nothing outside itself.

A router whose logits come from a computation of its own that reads more than
the block input (ZAYA's router MLP, fed the previous layer's router state)
stays outside the region: its logits are a second input, a *boundary*, and
the region is ``f(x, logits, params)``::

    region(C; x, L) = (ancestors(C) ∪ {C}) \\ (ancestors(x) ∪ {x} ∪ ancestors(L) ∪ {L}) \\ graph inputs

Validation then draws the logits at random like ``x``
(:func:`moepass.compiler.validate.run_region`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, alias_root, example_value, mutated_node, op_name
from moepass.compiler.detect.common import Mismatch

__all__ = ["Region", "ForeignInputs", "block_region", "satellites", "draws_random_numbers"]


class ForeignInputs(Mismatch):
    """The region reads values computed outside it; ``nodes`` are those values."""

    def __init__(self, message: str, nodes: list[fx.Node]):
        super().__init__(message)
        self.nodes = nodes


@dataclass
class Region:
    """A closed, safe set of nodes computing ``combine`` from ``x_base`` and parameters."""

    nodes: set[fx.Node]
    inputs: set[fx.Node]
    combine: fx.Node
    x_base: fx.Node
    #: Inputs besides ``x_base`` computed outside the block (a router's logits,
    #: when the router's own computation stays outside it); validation draws
    #: them at random.
    free_inputs: tuple[fx.Node, ...] = ()


def _is_scalar_value(node: fx.Node) -> bool:
    value = example_value(node)
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def block_region(
    flow: Dataflow, combine: fx.Node, x_base: fx.Node, *more_outputs: fx.Node, boundary: tuple[fx.Node, ...] = ()
) -> Region:
    """The region computing ``combine`` (and ``more_outputs``) from ``x_base`` (and the ``boundary`` nodes).

    Raises :class:`Mismatch` if the region is not closed or not safe.
    """
    before_x = flow.ancestors(x_base) | {x_base}
    for node in boundary:
        before_x = before_x | flow.ancestors(node) | {node}
    needed = {combine, *more_outputs}
    for output in (combine, *more_outputs):
        needed |= flow.ancestors(output)
    nodes = {n for n in needed if n not in before_x and n.op not in ("placeholder", "get_attr")}
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in nodes}
    foreign = [
        a
        for a in inputs
        if a is not x_base and a not in boundary and a.op not in ("placeholder", "get_attr") and not _is_scalar_value(a)
    ]
    if foreign:
        names = ", ".join(sorted(a.name for a in foreign)[:4])
        raise ForeignInputs(
            f"the block's output depends on values computed outside it ({names}), not only on its input", foreign
        )
    for node in nodes:
        target = mutated_node(node)
        if target is not None and alias_root(target) not in nodes:
            raise Mismatch(f"{node.name} mutates {alias_root(target).name}, which lives outside the block")
    random = sorted(n.name for n in nodes if draws_random_numbers(n))
    if random:
        raise Mismatch(
            f"the block draws random numbers inside ({', '.join(random[:3])}: router noise or dropout in training "
            "mode), which a rewrite cannot reproduce; it is rewritten in eval mode (model.eval())"
        )
    free = tuple(node for node in boundary if node in inputs)
    return Region(nodes=nodes, inputs=inputs, combine=combine, x_base=x_base, free_inputs=free)


#: Ops that draw random numbers whenever they run.
_RANDOM_OPS = {
    "rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "randperm", "bernoulli", "bernoulli_",
    "multinomial", "normal", "normal_", "uniform_", "exponential_", "geometric_", "cauchy_", "log_normal_",
    "random_", "poisson", "rrelu", "native_dropout",
}
#: Dropout spellings: random only with p > 0 and training on.
_DROPOUT_OPS = {"dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d",
                "dropout2d", "dropout3d"}


def draws_random_numbers(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (a dropout counts only with p > 0 in training mode)."""
    name = op_name(node)
    if name in _RANDOM_OPS:
        return True
    if name in _DROPOUT_OPS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return bool(training) and not (isinstance(p, (int, float)) and p == 0)
    return False


def satellites(flow: Dataflow, region: set[fx.Node]) -> set[fx.Node]:
    """Nodes outside ``region`` that only check or measure region values.

    Dynamo adds runtime assertions on the sizes of data-dependent results
    (``u0 >= 0`` for a ``nonzero``): nodes computed from region values alone
    that never reach the graph's output.  Once the region is replaced they
    check values that no longer exist and go with it.
    """
    reaches_output = flow.ancestors(flow.output)
    found: set[fx.Node] = set()
    for node in flow.nodes:
        if node in region or node in reaches_output or node.op in ("placeholder", "get_attr", "output"):
            continue
        sources = node.all_input_nodes
        if sources and all(s in region or s in found or s.op in ("placeholder", "get_attr") for s in sources):
            if any(s in region or s in found for s in sources):
                found.add(node)
    return found
