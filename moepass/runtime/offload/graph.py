"""Offloading inside the backend: which blocks, their validation, and freeing their weights.

The backend (:func:`moepass.compiler.backend.optimize_graph`) calls, for a graph
compiled with ``options={"offload": ...}``::

    offload = GraphOffload.start(options.offload, gm, example_inputs)
    for each matched block:
        plan = offload.plan(match, plan, env, entry)     # the experts op reads through the store
        with offload.validating(match, env):            # validation reads from the store too
            validate_rewrite(...)
    offload.finish(gm, reports)                          # free the offloaded weights

``plan`` checks the store holds this block's experts with the model's shapes
and dtypes and — when the weights are still in memory — the same bytes
(CRC-32 per expert), registers the block's gate and routing for prefetch, and
puts the session key in the experts op's config.  ``finish`` releases each
offloaded weight (see :mod:`moepass.runtime.offload.release`) once nothing in the
graph reads it but offloaded experts ops, and refuses a graph that would read
a released weight anywhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator

import torch
import torch.fx as fx

from moepass.runtime.offload.options import OffloadOptions
from moepass.runtime.offload.release import check_resident_weights, is_released, release_tensor, released_from
from moepass.runtime.offload.session import NextRouter, OffloadError, OffloadSession, session_for
from moepass.runtime.ops import parse_experts_config

__all__ = ["GraphOffload"]

logger = logging.getLogger(__name__)


def _value(item: Any, env: dict[fx.Node, Any]) -> Any:
    if isinstance(item, fx.Node):
        return env.get(item)
    return item


@dataclasses.dataclass
class _Offloaded:
    path: str
    nodes: dict[str, fx.Node]
    values: dict[str, torch.Tensor]


class GraphOffload:
    """Offloading of one graph's blocks (see the module docstring)."""

    def __init__(self, session: OffloadSession):
        self.session = session
        self.blocks: dict[str, _Offloaded] = {}

    @classmethod
    def start(cls, options: OffloadOptions) -> GraphOffload:
        """The offloading of the graph being compiled, in its compile call's session."""
        if torch.is_grad_enabled():
            raise OffloadError(
                "offloaded experts are inference-only: call the compiled model under torch.no_grad() or "
                "torch.inference_mode()"
            )
        return cls(session_for(options))

    def plan(self, match, plan, env: dict[fx.Node, Any], entry) -> Any:
        """Point ``plan``'s experts op at the store (or say in ``entry.notes`` why the block stays in memory)."""
        session = self.session
        stored = session.manifest.block(match.path)
        if match.experts is None:
            return plan
        if stored is None:
            entry.notes.append(f"not offloaded: the store {session.root} has no block {match.path or '<root>'}")
            return plan
        if match.spec.experts.stacked_from_modules:
            entry.notes.append("not offloaded: its experts are separate modules (offloading needs stacked weights)")
            return plan
        nodes, values = {}, {}
        for name, item in plan.weights.items():
            if item is None:
                continue
            if not isinstance(item, fx.Node) or item.op not in ("placeholder", "get_attr"):
                entry.notes.append(f"not offloaded: its {name} is computed in the graph, not a parameter")
                return plan
            value = _value(item, env)
            if item.op == "get_attr" and value is None:
                value = _fetch_attr(item)
            if not isinstance(value, torch.Tensor):
                entry.notes.append(f"not offloaded: no value for its {name}")
                return plan
            nodes[name], values[name] = item, value
        released = [n for n, v in values.items() if is_released(v)]
        if released and len(released) != len(values):
            raise OffloadError(f"block {match.path}: only some of its expert weights ({', '.join(released)}) are released")
        try:
            if released:
                self._check_released(stored, values)
            else:
                check_resident_weights(stored, values, session.root)
        except ValueError as error:
            raise OffloadError(f"{error}; write the store again with `moepass offload`") from None
        session.register_block(match.path, self._next_router(match, plan, env))
        config = dataclasses.replace(plan.experts_config, offload=f"{session.key}|{match.path}")
        self.blocks[match.path] = _Offloaded(match.path, nodes, values)
        entry.notes.append(f"experts offloaded to {session.root}")
        return dataclasses.replace(plan, experts_config=config)

    def _check_released(self, stored, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            origin = released_from(value)
            stored_tensor = stored.tensor(name)
            if stored_tensor is None or tuple(value.shape) != stored.stacked_shape(name):
                raise ValueError(f"block {stored.path}: {name} does not match the store {self.session.root}")
            if origin is None:
                continue  # released by someone else: shapes and dtypes are all we can check
            if origin[0] != str(self.session.root) or origin[1] != stored.path or origin[2] != name:
                raise ValueError(
                    f"block {stored.path}: its {name} was released to the store {origin[0]} (block {origin[1]}), "
                    f"not to {self.session.root}"
                )

    @staticmethod
    def _next_router(match, plan, env: dict[fx.Node, Any]) -> NextRouter:
        router = match.router
        weight = _value(router.weight, env)
        bias = _value(router.bias, env) if router.bias is not None else None
        tensors = [_value(t, env) for t in plan.route_tensors]
        return NextRouter(
            weight=weight.detach(),
            bias=bias.detach() if bias is not None else None,
            route_config=plan.route_config.to_json(),
            route_tensors=[t.detach() if isinstance(t, torch.Tensor) else t for t in tensors],
            uses_x=plan.route_config.uses_x,
            depth=plan.route_config.depth,
        )

    @contextlib.contextmanager
    def validating(self, match, env: dict[fx.Node, Any]) -> Iterator[None]:
        """Validate ``match`` with released weights read back from the store, and the op reading the store."""
        offloaded = self.blocks.get(match.path)
        if offloaded is None:
            yield
            return
        saved = {}
        released = [n for n, v in offloaded.values.items() if is_released(v)]
        if released:
            stacked = self.session.reader.read_stacked(self.session.manifest.block(match.path))
            for name, node in offloaded.nodes.items():
                saved[node] = env.get(node)
                env[node] = stacked[name]
        try:
            with self.session.validating():
                yield
        finally:
            for node, value in saved.items():
                env[node] = value

    def finish(self, gm: fx.GraphModule, example_inputs: list[Any], reports: list) -> None:
        """Release the offloaded blocks' weights; refuse a graph that reads released weights elsewhere."""
        rewritten = {r.path for r in reports if r.rewritten}
        for report in reports:
            offloaded = self.blocks.get(report.path)
            if offloaded is None or report.rewritten:
                continue
            if any(is_released(v) for v in offloaded.values.values()):
                raise OffloadError(
                    f"block {report.display_path} could not be rewritten ({report.reason}) and its expert weights "
                    f"are only in the store {self.session.root}: the original block cannot run"
                )
            report.notes = [n for n in report.notes if not n.startswith("experts offloaded")]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        offload_users = {
            n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.moepass.experts.default
            and parse_experts_config(n.args[7]).offload.startswith(self.session.key + "|")
        }
        for node, value in zip(placeholders, example_inputs):
            if not isinstance(value, torch.Tensor) or not is_released(value):
                continue
            outside = [u for u in node.users if u not in offload_users]
            if outside:
                raise OffloadError(
                    f"graph input {node.name} has no data (its expert weights live in an expert store) but "
                    f"{outside[0].name} reads it outside an offloaded experts op"
                )
        freed = 0
        for path, offloaded in self.blocks.items():
            if path not in rewritten:
                continue
            for name, node in offloaded.nodes.items():
                value = offloaded.values[name]
                if is_released(value):
                    continue
                if any(u not in offload_users for u in node.users):
                    logger.info("moepass: %s of %s stays in memory: the graph reads it elsewhere", name, path)
                    continue
                freed += value.numel() * value.element_size()
                release_tensor(value, self.session.root, path, name)
        if freed:
            logger.info("moepass: released %.1f MB of expert weights to %s", freed / 1e6, self.session.root)


def _fetch_attr(node: fx.Node) -> Any:
    gm = node.graph.owning_module
    target = gm
    for part in node.target.split("."):
        target = getattr(target, part, None)
    return target
