"""The expert-parallel stages: a rewritten block's experts run split over ranks, exchanging only kept slots.

::

    detect ─► resolve ─► expert_parallel_inputs ─► validate ─► rewrite ─► expert_parallel ─► finish

A block is expert-parallel when its experts are split over the ranks of a
process group, which the stages find in one of three ways:

``moepass``   its experts are already a ``moepass.experts`` op on a group
              (transformers' ``DistributedConfig(ep_size=N, ep_implementation="moepass")``,
              :mod:`moepass.runtime.expert_parallel.transformers_ep`): the weights in the
              graph are this rank's ``E/R`` experts;
``dtensor``   its stacked expert weights are DTensors ``Shard(0)`` on one mesh dimension
              (the torchtitan convention; the model's own forward gathers them, e.g.
              ``w.full_tensor()``): the op reads ``w.to_local()`` instead, so tokens move,
              not weights;
``mesh``      ``options={"expert_parallel": {"mesh": mesh}}`` and plain weights holding all
              ``E`` experts on every rank: rank ``r`` runs experts ``r·E/R … (r+1)·E/R − 1``
              (the op reads ``w.narrow(0, r·E/R, E/R)``).

``expert_parallel_inputs`` (before validation) makes each such block's
replacement the fused ``moepass.experts`` op (its backward exchanges too) with
a fingerprint of the block's routing policy, and gives validation what it can
run without communicating: both the original block and its replacement run on
this rank's experts alone (:func:`~moepass.runtime.expert_parallel.without_communication`;
for ``dtensor`` the weights become a ``Replicate`` DTensor holding this rank's
experts and zeros elsewhere, so the model's own gather needs no collective).
``expert_parallel`` (after the rewrite) points the op at the group and feeds it
the local weights.

A layout that cannot work — ``E`` not a multiple of the group size, weights
sharded another way, a mesh the experts do not live on, this rank outside the
mesh — raises :class:`~moepass.runtime.expert_parallel.ExpertParallelError`
while compiling, on every rank alike (the same model, the same options), before
any exchange could wait on a rank that is not coming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from moepass.compiler.dataflow import example_value, op_name
from moepass.compiler.stages import BlockState, GraphState
from moepass.runtime.expert_parallel import ExpertParallelError, ExpertParallelGroup, group_of_mesh, register_group
from moepass.runtime.ops import parse_experts_config

__all__ = ["expert_parallel_inputs_stage", "expert_parallel_stage", "local_experts"]

logger = logging.getLogger(__name__)

_BLOCKS = "expert_parallel.blocks"
_WEIGHTS = ("w1", "w2", "b1", "b2")


@dataclass
class _ExpertParallelBlock:
    """How one block's experts are split."""

    #: ``moepass`` | ``dtensor`` | ``mesh`` (see the module docstring).
    source: str
    group: ExpertParallelGroup
    #: The weight nodes the op must read locally (``dtensor``, ``mesh``).
    weights: dict[str, fx.Node] = field(default_factory=dict)


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _weight_values(state: GraphState, block: BlockState) -> dict[str, tuple[fx.Node, Any]]:
    values = {}
    for name, item in block.plan.weights.items():
        if isinstance(item, fx.Node):
            value = state.env.get(item)
            values[name] = (item, value if value is not None else example_value(item))
    return values


def _moepass_op_group(block: BlockState) -> ExpertParallelGroup | None:
    """The group of an expert-parallel ``moepass.experts`` op already in the block (transformers' EP)."""
    from moepass.runtime.expert_parallel import group_for

    keys = {
        parse_experts_config(node.args[7]).expert_parallel
        for node in block.item.region.nodes
        if op_name(node) == "moepass::experts" and isinstance(node.args[7], str)
    }
    keys.discard("")
    if not keys:
        return None
    if len(keys) > 1:
        raise ExpertParallelError(f"block {block.report.display_path}: experts ops on {len(keys)} different groups")
    return group_for(keys.pop())


def _shard_dim(value: Any, path: str, name: str) -> int:
    """The mesh dimension a DTensor expert weight is ``Shard(0)`` on (every other one ``Replicate``)."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(value.placements)
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    others_replicated = all(isinstance(p, Replicate) for i, p in enumerate(placements) if i not in sharded)
    if len(sharded) != 1 or not others_replicated or type(placements[sharded[0]]) is not Shard:
        raise ExpertParallelError(
            f"block {path}: its expert weight {name} is a DTensor placed {placements}; expert parallelism needs "
            "the experts split on dim 0 over one mesh dimension (Shard(0)) and replicated over the others"
        )
    return sharded[0]


def _same_group(a: Any, b: Any) -> bool:
    import torch.distributed as dist

    return a is b or dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


def _find(state: GraphState, block: BlockState) -> _ExpertParallelBlock | None:
    """Whether (and how) a block's experts are split over ranks; raises on a layout that cannot work."""
    option = state.options.expert_parallel
    path = block.report.display_path
    spec = block.item.spec.experts
    op_group = _moepass_op_group(block)
    values = _weight_values(state, block)
    distributed = {name: (node, value) for name, (node, value) in values.items() if _is_dtensor(value)}
    option_group = group_of_mesh(option.mesh, option.mesh_dim) if option is not None else None
    if op_group is not None:
        if option_group is not None and not _same_group(op_group.group, option_group):
            raise ExpertParallelError(
                f"block {path}: its experts are split over the ranks of the model's own expert-parallel group, "
                "not over the mesh given in options['expert_parallel']"
            )
        return _ExpertParallelBlock("moepass", op_group)
    if distributed:
        if len(distributed) != len(values):
            plain = sorted(set(values) - set(distributed))
            raise ExpertParallelError(f"block {path}: some expert weights are DTensors, not {', '.join(plain)}")
        groups = []
        for name, (_, value) in distributed.items():
            dim = _shard_dim(value, path, name)
            groups.append(value.device_mesh.get_group(dim))
        if any(not _same_group(g, groups[0]) for g in groups[1:]):
            raise ExpertParallelError(f"block {path}: its expert weights are split over different meshes")
        if option_group is not None and not _same_group(groups[0], option_group):
            raise ExpertParallelError(
                f"block {path}: the mesh given in options['expert_parallel'] does not hold its experts (they are "
                "DTensors on another mesh)"
            )
        group = register_group(groups[0])
        return _ExpertParallelBlock("dtensor", group, {n: node for n, (node, _) in distributed.items()})
    if option_group is None:
        return None
    group = register_group(option_group)
    for name, (node, value) in values.items():
        rows = value.shape[0] if isinstance(value, torch.Tensor) else None
        if rows != spec.num_experts:
            raise ExpertParallelError(
                f"block {path}: the mesh given in options['expert_parallel'] does not hold its experts: its {name} "
                f"has {rows} experts where the router picks among {spec.num_experts}"
            )
    if spec.stacked_from_modules:
        raise ExpertParallelError(
            f"block {path}: its experts are separate modules; expert parallelism needs stacked weights"
        )
    return _ExpertParallelBlock("mesh", group, {n: node for n, (node, _) in values.items()})


def _routing_fingerprint(block: BlockState) -> str:
    return hashlib.blake2b(block.plan.route_config.to_json().encode(), digest_size=8).hexdigest()


def _replicated_local_experts(value: Any, group: ExpertParallelGroup) -> Any:
    """A ``Replicate`` DTensor, made without communication, holding this rank's experts and zeros elsewhere.

    Validation runs the model's own block on it: a gather of it (``full_tensor``)
    is a no-op, and experts of other ranks add nothing.
    """
    from torch.distributed.tensor import DTensor, Replicate

    local = value.to_local()
    full = local.new_zeros(value.shape)
    start = group.rank * local.shape[0]
    full[start : start + local.shape[0]] = local.detach()
    mesh = value.device_mesh
    return DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)


def expert_parallel_inputs_stage(state: GraphState) -> None:
    """Find expert-parallel blocks; make their replacement the fused op; give validation local-only inputs."""
    found: dict[int, _ExpertParallelBlock] = {}
    for block in state.open_blocks():
        if block.item.experts is None or block.plan is None or block.plan.experts_config is None:
            continue
        split = _find(state, block)
        if split is None:
            continue
        spec = block.item.spec.experts
        if spec.num_experts % split.group.size:
            raise ExpertParallelError(
                f"block {block.report.display_path}: {spec.num_experts} experts cannot be split over the "
                f"{split.group.size} ranks of its expert-parallel group (E must be a multiple of the EP size)"
            )
        config = dataclasses.replace(block.plan.experts_config, routing_fingerprint=_routing_fingerprint(block))
        if split.source == "moepass":  # the graph's weights are already this rank's experts
            config = dataclasses.replace(config, expert_parallel=split.group.key)
        elif split.source == "dtensor":
            for node in split.weights.values():
                state.env[node] = _replicated_local_experts(state.env[node], split.group)
        block.plan.experts_config = config
        block.plan.differentiable = False  # the fused op: its backward exchanges too
        found[id(block)] = split
    state.scratch[_BLOCKS] = found


def _local_weight(
    graph: fx.Graph, before: fx.Node, weight: fx.Node, split: _ExpertParallelBlock, experts: int
) -> fx.Node:
    """This rank's experts of ``weight``: ``weight.to_local()`` (DTensor) or ``weight.narrow(0, r·E/R, E/R)``."""
    with graph.inserting_before(before):
        if split.source == "dtensor":
            node = graph.call_method("to_local", (weight,))
        else:
            local = experts // split.group.size
            node = graph.call_method("narrow", (weight, 0, split.group.rank * local, local))
    value = example_value(weight)
    if isinstance(value, torch.Tensor):
        try:
            node.meta["example_value"] = getattr(value, node.target)(*node.args[1:])
        except Exception as error:  # metadata is a convenience; the inner compiler re-derives it
            logger.debug("no example value for %s: %s", node.name, error)
    return node


def _drop_gathers(graph: fx.Graph, weights: list[fx.Node]) -> None:
    """Erase the model's own gathers of the weights (``full_tensor`` …) nothing reads any more."""
    for weight in weights:
        for user in list(weight.users):
            if user.op == "call_method" and user.target in ("full_tensor", "redistribute") and not user.users:
                graph.erase_node(user)


def expert_parallel_stage(state: GraphState) -> None:
    """Point each expert-parallel block's experts op at its group, reading this rank's experts."""
    from moepass.runtime.expert_parallel.transformers_ep import experts_modules_running_moepass

    found: dict[int, _ExpertParallelBlock] = state.scratch.get(_BLOCKS, {})
    graph = state.gm.graph
    split_by_fsdp = experts_modules_running_moepass() > 0
    for block in state.rewritten_blocks():
        split = found.get(id(block))
        node = block.experts_node()
        if block.item.experts is None and split_by_fsdp:  # the experts are in another graph (FSDP's hooks)
            block.report.notes.append(
                "if these experts run transformers' ep_implementation='moepass' (with FSDP its hooks put them in a "
                "graph of their own), the slots the policy drops are not sent: the exchange skips a repeated expert "
                "at weight 0"
            )
        if split is None or node is None:
            continue
        config = parse_experts_config(node.args[7])
        if split.source != "moepass":
            args = list(node.args)
            for index, name in enumerate(_WEIGHTS, start=3):
                weight = split.weights.get(name)
                if weight is not None and args[index] is weight:
                    args[index] = _local_weight(graph, node, weight, split, config.spec.num_experts)
            node.args = tuple(args)
            config = dataclasses.replace(config, expert_parallel=split.group.key)
            node.update_arg(7, config.to_json())
            _drop_gathers(graph, list(split.weights.values()))
        size = split.group.size
        block.report.notes.append(
            f"expert parallel over {size} ranks ({config.spec.num_experts // size} experts each; "
            f"{_SOURCES[split.source]}): only kept slots are exchanged"
        )


#: How each kind of expert-parallel block was recognised, as the report says it.
_SOURCES = {
    "moepass": "transformers' ep_implementation='moepass'",
    "dtensor": "Shard(0) DTensor weights",
    "mesh": "options['expert_parallel']",
}


def local_experts(config, weights: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(spec, weights) of the experts an expert-parallel op runs on this rank — what its lowering sees.

    ``weights`` may hold every expert (validation's copy) or this rank's only.
    """
    from moepass.runtime.expert_parallel import group_for

    group = group_for(config.expert_parallel)
    local = config.spec.num_experts // group.size
    spec = dataclasses.replace(config.spec, num_experts=local, weight_on_input=False, zero_compute=())
    start = group.rank * local
    sliced = {
        name: value[start : start + local] if isinstance(value, torch.Tensor) and value.shape[0] != local else value
        for name, value in weights.items()
    }
    return spec, sliced
