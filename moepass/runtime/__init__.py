"""What runs after compile: the moepass ops, routing, statistics, reports, calibration, offloading.

:mod:`~moepass.runtime.ops` registers ``torch.ops.moepass.*`` (with
:mod:`~moepass.runtime.quantized_ops` for ``moepass.quantized_experts``; the names and
the ``moepass::`` namespace are fixed: compiled graphs and exports refer to
them); :mod:`~moepass.runtime.routing` ranks and weighs experts for the route
op and the policies; :mod:`~moepass.runtime.bucketing` groups tokens by k;
:mod:`~moepass.runtime.stats` and :mod:`~moepass.runtime.report` record what
the compiled model did (``moepass.report``); :mod:`~moepass.runtime.calibrate`
fits a policy to a target average k; :mod:`~moepass.runtime.offload` reads
experts from a store through a cache; :mod:`~moepass.runtime.expert_parallel`
splits a block's experts over ranks and exchanges only the kept slots.

May import: :mod:`moepass.policies`, ``moepass.lowering``, :mod:`moepass.quantize`, and the compiler's
contract (``moepass.compiler.spec``, ``moepass.compiler.lifted``), never the
rest of the compiler (``tests/test_layout.py``).
"""
