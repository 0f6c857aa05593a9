"""Expert offloading: experts in a slower tier, a per-layer cache sized by measured miss costs, prefetch.

AdapMoE's system half (Zhong et al. 2024) on top of adaptive-k routing::

    moepass offload --model bundled --out experts/          # write the store (moepass.exports.expert_store)

    fast = torch.compile(model, backend="adaptive_moe", options={
        "policy": moepass.bundled.load_policy("sensitivity"),
        "offload": {"store": "experts/", "cache_gb": 0.004, "prefetch": True}})
    with torch.no_grad():
        fast(input_ids)
    moepass.report(fast)              # its text: per layer slots, hit rate, bytes read per token, load wait

* **store** (:mod:`~moepass.runtime.offload.store`) — one safetensors file per block,
  each expert one 4096-aligned range, read with O_DIRECT (or with the pages
  dropped after the read), so a load costs a real read;
* **cache** (:mod:`~moepass.runtime.offload.cache`) — per-layer slots with LRU;
  the budget is split evenly (``cache="lru"``) or by a DP over each layer's
  simulated misses on the recorded trace × bytes per miss (``cache="allocated"``,
  :mod:`~moepass.runtime.offload.allocation`);
* **prefetch** (:mod:`~moepass.runtime.offload.prefetch`) — layer l+1's gate and
  policy applied to layer l's input predict its experts; a worker thread
  reads them while layer l computes; the policy's k per token decides how
  many;
* **backend** (:mod:`moepass.compiler.plan.offload`) — offloaded blocks' experts ops
  read through the session's cache (:mod:`~moepass.runtime.offload.experts`); their
  weights are checked against the store, then freed (storage resized to 0:
  dynamo's guards still hold, so nothing recompiles).

Inference only, CPU tensors only.  Outputs are bit for bit those of the same
model and policy with every expert in memory.
"""

from moepass.runtime.offload.allocation import allocate_slots, even_split
from moepass.runtime.offload.cache import LayerStats
from moepass.runtime.offload.options import OffloadOptions, OffloadOptionsError
from moepass.runtime.offload.release import is_released, release_experts
from moepass.runtime.offload.session import OffloadError, OffloadSession, close_all, session_for, sessions
from moepass.runtime.offload.store import BlockWeights, ExpertStoreError, StoreManifest, open_store, write_store

__all__ = [
    "BlockWeights",
    "ExpertStoreError",
    "LayerStats",
    "OffloadError",
    "OffloadOptions",
    "OffloadOptionsError",
    "OffloadSession",
    "StoreManifest",
    "allocate_slots",
    "close_all",
    "even_split",
    "is_released",
    "open_store",
    "release_experts",
    "session_for",
    "sessions",
    "write_store",
]
