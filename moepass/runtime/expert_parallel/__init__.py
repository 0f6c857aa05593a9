"""Expert parallelism: a block's experts split over ranks, only the kept slots exchanged.

moepass builds no distributed runtime of its own: it runs on ``torch.distributed``
(gloo on CPU, NCCL on GPU) with the process groups of a ``DeviceMesh`` —
transformers' ``DistributedConfig(ep_size=N)`` or a torch-native model's
``Shard(0)`` expert weights (the torchtitan convention).

* :mod:`~moepass.runtime.expert_parallel.group` — the expert group (and batch
  group) a ``moepass.experts`` op names by key;
* :mod:`~moepass.runtime.expert_parallel.exchange` — the op's forward and
  backward: count exchange, row exchange, local experts on the usual lowering,
  combine; no communication at compile time;
* :mod:`~moepass.runtime.expert_parallel.traffic` — rows and bytes each rank
  sent (:func:`count_traffic`);
* :mod:`~moepass.runtime.expert_parallel.transformers_ep` — ``MoepassEP``,
  registered as transformers' ``ep_implementation="moepass"``.

The backend's plan stage (:mod:`moepass.compiler.plan.expert_parallel`) points
a rewritten block's experts op at its group.
"""

from moepass.runtime.expert_parallel.exchange import communicating, without_communication
from moepass.runtime.expert_parallel.group import (
    ExpertParallelError,
    ExpertParallelGroup,
    group_for,
    group_of_mesh,
    register_group,
)
from moepass.runtime.expert_parallel.traffic import Traffic, count_traffic

__all__ = [
    "ExpertParallelError",
    "ExpertParallelGroup",
    "Traffic",
    "communicating",
    "count_traffic",
    "group_for",
    "group_of_mesh",
    "register_group",
    "without_communication",
]
