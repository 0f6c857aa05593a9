"""Which experts layout a block of target ``ort`` gets: the layouts, and the fixed default per provider.

::

    layout     experts run by                                   dropped slot costs
    masked     one com.microsoft.MoE call, k = k_max            nothing on CPU (weight 0 is skipped);
                                                                a full row on CUDA (all k slots computed)
    buckets    one com.microsoft.MoE call per k                 nothing (each call re-packs its experts on CPU)
    slots      one com.microsoft.MoE call, k = 1, a row per     nothing, on every provider
               kept slot
    gemm       one pre-packed Gemm pair per expert (standard    nothing; no per-call weight re-packing
               ops; :mod:`.experts_gemm`)

``auto`` (the default) is measured on the exporting machine for the CPU
provider (:mod:`.layout_tuning`: the fastest layout per token-count range, in
ONNX Runtime, cached per machine).  Where it is not measured (tuning off, a
CUDA provider, non-float32 inputs) it is this fixed default, for ``provider``:

* ``cpu``: ``gemm`` for float32 experts of at least :data:`GEMM_MIN_EXPERT_BYTES`
  (the re-packing com.microsoft.MoE does on every call outweighs the ~15 small
  kernels per expert the Gemm pairs cost), else ``masked`` (small experts: at
  one token the MoE call is cheaper than the Gemm pairs' kernel launches).
* ``cuda``: ``slots``.  As far as its source shows, ONNX Runtime's CUDA MoE
  kernel computes all k slots of every token whatever their weight, so
  ``masked`` would save no work there; ``slots`` hands it exactly one row per
  kept slot in one call (``buckets`` would need one call per k).  Not measured
  on a GPU: none was available to this work.
"""

from __future__ import annotations

from moepass.lowering.onnx.builder import FLOAT
from moepass.lowering.onnx.experts_ort import MOE_LAYOUTS

from moepass.compiler.spec import ExpertsSpec

__all__ = ["DEFAULT_ORT_LAYOUTS", "GEMM_MIN_EXPERT_BYTES", "ORT_LAYOUTS", "PROVIDERS", "default_ort_layout",
           "expert_bytes"]

#: Every layout of target ``ort``.
ORT_LAYOUTS = (*MOE_LAYOUTS, "gemm")
#: Execution providers an export can be meant for.
PROVIDERS = ("cpu", "cuda")
#: The layout ``auto`` picks per provider for small experts (CPU) and for any (CUDA).
DEFAULT_ORT_LAYOUTS = {"cpu": "masked", "cuda": "slots"}
#: From this size of one expert's weights (bytes), ``auto`` on CPU runs the experts as pre-packed Gemm pairs.
GEMM_MIN_EXPERT_BYTES = 2 << 20


def expert_bytes(spec: ExpertsSpec, element_size: int = 4) -> int:
    """Bytes of one expert's weight matrices (gate+up or up, and down)."""
    first = (2 if spec.gated else 1) * spec.intermediate_size * spec.hidden_size
    return (first + spec.intermediate_size * spec.hidden_size) * element_size


def default_ort_layout(provider: str, spec: ExpertsSpec | None = None, elem_type: int = FLOAT) -> str:
    """The layout ``ort_layout="auto"`` means for a block with experts ``spec`` on ``provider``."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    if provider == "cpu" and spec is not None and elem_type == FLOAT and expert_bytes(spec) >= GEMM_MIN_EXPERT_BYTES:
        return "gemm"
    return DEFAULT_ORT_LAYOUTS[provider]
