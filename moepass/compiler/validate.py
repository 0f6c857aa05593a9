"""Translation validation: check a rewrite against the block it replaces.

Before a rewrite is committed, the original region is run on a random block
input with the model's real parameters (the graph's example inputs), and the
replacement — ``moepass.route`` with the *static* policy, then
``moepass.experts`` — is run on the same input.  A block whose results differ
by more than round-off is left exactly as it was and the report gives the
error.  This turns any detection mistake into "not rewritten, here is why"
instead of a silently different model.

Values outside the block that read its router and stay in the graph (a
shared branch weighed by the router, Inkling) are checked too: the rewrite
makes a lifted router's top-k return its picks best first, so they are
recomputed with the sorted selection and must equal what the model computed
(:func:`kept_readers_error`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, example_value, op_name
from moepass.compiler.detect.region import Region

__all__ = ["run_region", "relative_error", "tolerance_for", "concrete_shape", "example_env", "kept_readers_error"]

logger = logging.getLogger(__name__)


def tolerance_for(dtype: torch.dtype) -> float:
    """Max relative error accepted for a block computed in ``dtype``."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max(max |e|, tiny), in float64."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def _hint(size: Any) -> int:
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:
            raise ValueError(f"size {size} has no concrete hint (data-dependent)")
        return int(hint)
    return int(size)


def concrete_shape(node: fx.Node) -> list[int]:
    """The concrete sizes of a tensor node at the example inputs."""
    return [_hint(s) for s in example_value(node).shape]


def example_env(gm: fx.GraphModule, example_inputs: list[Any]) -> dict[fx.Node, Any]:
    """Placeholder → example input."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {
        node: _hint(value) if isinstance(value, torch.SymInt) else value
        for node, value in zip(placeholders, example_inputs)
    }


def run_region(
    gm: fx.GraphModule,
    flow: Dataflow,
    region: Region,
    env: dict[fx.Node, Any],
) -> dict[fx.Node, Any]:
    """Evaluate the region's nodes in graph order on ``env`` (which must hold its inputs).

    Symbolic-size inputs computed outside the region are filled in from their
    hints, and the region's free inputs (a router's logits computed outside
    the block) are drawn at random, seeded, like the block input.  Returns
    ``env`` extended with every region node's value.
    """
    interpreter = fx.Interpreter(gm)
    interpreter.env = env
    generator = torch.Generator().manual_seed(2)
    for source in region.inputs:
        if source not in env:
            value = example_value(source)
            if source in region.free_inputs and isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
                random = torch.randn(concrete_shape(source), generator=generator, dtype=torch.float32)
                env[source] = random.to(dtype=value.dtype, device=value.device)
            elif isinstance(value, (torch.SymInt, int)):
                env[source] = _hint(value)
            elif source.op == "get_attr":
                env[source] = interpreter.fetch_attr(source.target)
            else:
                raise ValueError(f"no value for region input {source.name}")
    with torch.no_grad():
        for node in flow.sorted(region.nodes):
            env[node] = interpreter.run_node(node)
    return env



def _sorted_selection(interpreter: fx.Interpreter, topk: fx.Node) -> Any:
    """``topk`` evaluated as the rewrite will leave it: the same picks, best first."""
    args, kwargs = interpreter.fetch_args_kwargs_from_env(topk)
    if len(args) > 4:
        args = (*args[:4], True, *args[5:])
    else:
        kwargs = {**kwargs, "sorted": True}
    if topk.op == "call_method":
        return getattr(args[0], topk.target)(*args[1:], **kwargs)
    return topk.target(*args, **kwargs)


def kept_readers_error(
    gm: fx.GraphModule,
    flow: Dataflow,
    region: Region,
    readers: tuple[fx.Node, ...],
    selection: fx.Node | None,
    env: dict[fx.Node, Any],
) -> float:
    """Max relative error of ``readers`` after the rewrite against before it (0.0 when there are none).

    ``readers`` are values outside ``region`` that read its router nodes and
    stay in the graph; ``env`` holds the region's values (:func:`run_region`
    ran on it).  The readers are computed from it, then again with the region's
    nodes downstream of ``selection`` (a lifted router's top-k, which the
    rewrite sorts; None when the rewrite leaves the router's nodes as they
    are) recomputed from the sorted selection.
    """
    if not readers or selection is None or op_name(selection) != "topk":
        return 0.0  # nothing outside reads the router, or the rewrite leaves its nodes as they were
    interpreter = fx.Interpreter(gm)
    x_base = region.x_base
    before_x = flow.ancestors(x_base) | {x_base}
    branch = {
        node
        for reader in readers
        for node in flow.ancestors(reader) | {reader}
        if node not in region.nodes and node not in before_x and node.op not in ("placeholder", "get_attr")
    }

    def run(values: dict[fx.Node, Any]) -> dict[fx.Node, Any]:
        interpreter.env = values
        with torch.no_grad():
            for node in flow.sorted(branch):
                values[node] = interpreter.run_node(node)
        return values

    before = run(dict(env))
    after = dict(env)
    interpreter.env = after
    with torch.no_grad():
        after[selection] = _sorted_selection(interpreter, selection)
        downstream = flow.descendants(selection) & region.nodes
        for node in flow.sorted(downstream):
            after[node] = interpreter.run_node(node)
    after = run(after)
    errors = [relative_error(after[r].float(), before[r].float()) for r in readers]
    return max(errors)
