"""Plan stages: what the backend does to blocks after their rewrite, each stage in its own module.

The rewrite stage leaves each block as ``moepass.route`` + ``moepass.experts``
with the experts' weights in memory, run by the lowering the options name.  A
plan stage takes the rewritten graph and its blocks
(:class:`moepass.compiler.stages.GraphState`) and changes how a block's
experts run, without touching what they compute:

* :mod:`~moepass.compiler.plan.quantize` — the experts run on int8 / int4 codes
  (``options={"experts_dtype": ...}``, or a quantized checkpoint's experts adapted
  by :func:`moepass.adapt_quantized_experts`);
* :mod:`~moepass.compiler.plan.offload` — the experts read their weights (float or
  quantized) from an expert store through a per-layer cache (``options={"offload": ...}``);
* :mod:`~moepass.compiler.plan.expert_parallel` — the experts are split over
  ranks and only kept slots are exchanged (transformers'
  ``ep_implementation="moepass"``, ``Shard(0)`` DTensor weights, or
  ``options={"expert_parallel": {"mesh": mesh}}``);
* :mod:`~moepass.compiler.plan.cpu_kernels` — the CPU lowering's kernel and path
  choices for this machine, looked up or measured (``options={"cpu_tuning": ...}``);
  the graph is unchanged (the op reads the tables when it runs).

Each stage checks its own change (the offload stage: the store holds the
model's bytes, and the offloaded op equals the in-memory op on a random
input) and leaves a block in memory, with the reason in its report, where the
change cannot be made.  The stages run in the order of
:data:`moepass.compiler.backend.STAGES`.
"""
