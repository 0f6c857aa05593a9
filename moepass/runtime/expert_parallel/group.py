"""Expert-parallel groups: which ranks share a block's experts, by a key the experts op carries.

A ``moepass.experts`` op whose config names an expert-parallel group
(``ExpertsConfig.expert_parallel``, a string, so the op stays a plain custom op
with constant arguments) finds the process group here at run time.  Keys are
made from the process groups' names, which ``torch.distributed`` assigns in
creation order, so every rank of a group computes the same key.

Two groups describe a layout:

* the **expert group**: the ``R`` ranks over which the block's ``E`` experts are
  split, ``E / R`` consecutive experts each (rank ``r`` owns experts
  ``r·E/R … (r+1)·E/R − 1``, the ``Shard(0)`` convention of transformers and
  torchtitan);
* an optional **batch group**: ranks that hold the *same* tokens (transformers'
  ``tp_size == ep_size`` layout).  Each of them takes an equal slice of the
  batch, so no token is computed twice, and the outputs are gathered back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["ExpertParallelError", "ExpertParallelGroup", "register_group", "group_for", "group_of_mesh"]


class ExpertParallelError(RuntimeError):
    """Expert parallelism cannot run as asked (a layout, a rank or a call that does not fit)."""


@dataclass(frozen=True)
class ExpertParallelGroup:
    """The ranks one expert-parallel block runs on, as the experts op sees them."""

    key: str
    #: The expert group (a ``torch.distributed`` ProcessGroup).
    group: Any
    rank: int
    size: int
    #: Ranks holding the same tokens (None: every rank holds its own).
    batch_group: Any = None
    batch_rank: int = 0
    batch_size: int = 1


_lock = threading.Lock()
_groups: dict[str, ExpertParallelGroup] = {}


def _name(group: Any) -> str:
    name = getattr(group, "group_name", None)
    if not name:
        import torch.distributed as dist

        name = "ranks" + "-".join(map(str, dist.get_process_group_ranks(group)))
    return str(name)


def register_group(group: Any, batch_group: Any = None) -> ExpertParallelGroup:
    """Register (or find) the expert group ``group`` with an optional batch group; returns it with its key.

    Raises :class:`ExpertParallelError` when this process is not a member of
    ``group`` (its rank there is -1): it could not take part in the exchange.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ExpertParallelError(
            "expert parallelism needs torch.distributed initialised (torchrun, or init_process_group) "
            "before the model runs"
        )
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ExpertParallelError(
            f"this process (global rank {dist.get_rank()}) is not a member of the expert-parallel group "
            f"{dist.get_process_group_ranks(group)}"
        )
    batch_rank, batch_size = 0, 1
    if batch_group is not None:
        batch_rank, batch_size = dist.get_rank(batch_group), dist.get_world_size(batch_group)
        if batch_size <= 1:
            batch_group = None
            batch_rank, batch_size = 0, 1
    key = f"ep:{_name(group)}" + (f";batch:{_name(batch_group)}" if batch_group is not None else "")
    entry = ExpertParallelGroup(key, group, rank, size, batch_group, batch_rank, batch_size)
    with _lock:
        existing = _groups.get(key)
        if existing is not None and existing.group is group and existing.batch_group is batch_group:
            return existing
        _groups[key] = entry  # new, or a group re-created under a name a destroyed one had
        return entry


def group_for(key: str) -> ExpertParallelGroup:
    """The group registered under ``key`` (raises :class:`ExpertParallelError` naming it if none is)."""
    with _lock:
        entry = _groups.get(key)
    if entry is None:
        raise ExpertParallelError(
            f"no expert-parallel group {key!r} in this process: the compiled graph was made in another "
            "process, or its group was destroyed; compile the model again in this one"
        )
    return entry


def group_of_mesh(mesh: Any, mesh_dim: int | str | None = None) -> Any:
    """The process group of one dimension of a ``DeviceMesh`` (its only one when 1-D).

    Raises :class:`ExpertParallelError` for a mesh of several dimensions
    without ``mesh_dim``, or a dimension it does not have.
    """
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if mesh_dim is None:
        if mesh.ndim != 1:
            raise ExpertParallelError(
                f"the expert-parallel mesh has {mesh.ndim} dimensions {names or ''}: say which one holds the "
                "experts with options={'expert_parallel': {'mesh': mesh, 'mesh_dim': ...}}"
            )
        mesh_dim = 0
    if isinstance(mesh_dim, str) and mesh_dim not in names:
        raise ExpertParallelError(f"the mesh has no dimension {mesh_dim!r}; its dimensions are {names}")
    if isinstance(mesh_dim, int) and not 0 <= mesh_dim < mesh.ndim:
        raise ExpertParallelError(f"the mesh has no dimension {mesh_dim}; it has {mesh.ndim}")
    return mesh.get_group(mesh_dim)
