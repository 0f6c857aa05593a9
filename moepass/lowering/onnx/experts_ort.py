"""The experts half of a block's function for ONNX Runtime: ``com.microsoft.MoE`` with k per token.

ORT's MoE takes router *logits* and computes softmax and top-k itself.  Given
logits that are log(w_j) at a token's kept experts and -1e30 elsewhere, its
top-k holds exactly those experts and its softmax gives w_j / Σw; multiplying
the output by Σw restores the weights (renormalised, scaled or not) to
round-off (``normalize_routing_weights`` = 0).  Three layouts, all exact:

``masked`` (default)::

    logits[t, e] = log w_tj if ids[t, j] == e else -1e30          [T, E]
    y = com.microsoft.MoE(x, logits, fc1, fc1_b, fc2, fc2_b, k=k_max) · Σ_j w_tj

    A dropped slot's softmax weight is exactly 0, and ORT's CPU kernel skips
    routes of weight 0 (moe_cpu.cc), so it costs no GEMM row there; a
    provider that does not skip them computes them and multiplies by 0.

``buckets``::

    k_t = #{kept slots of t};  for each k: rows = NonZero(k_t == k)
    out[rows] = com.microsoft.MoE(x[rows], logits of the bucket, k=k) · Σw     (ScatterND)

    The form ONNX Runtime's fixed-k kernels see most literally, but on CPU
    every call re-packs the weights of each expert it hits: measured on the
    Mixtral-shaped block (average k 1.39, 512 tokens) it saves nothing over
    static, where ``masked`` is 1.33× faster and ``slots`` 1.27×.

``slots``::

    one row per kept slot (x_t), k = 1, logits 0 at its expert (softmax exactly 1),
    y · w added back to its token (ScatterND add)

    Only kept slots become rows, on every provider.

A static policy is one fixed-k call in every layout; where the model's own
router is what ORT's MoE computes from logits (softmax → top-k, renormalised
or not: Mixtral, Qwen-MoE, OLMoE …) it gets the model's logits directly
(:func:`native_routing_experts`), exactly as the static MoE model
onnxruntime-genai's builder writes, with no routing subgraph of its own.  Target ``ort`` has a
fourth layout that does without this op, ``gemm`` (:mod:`.experts_gemm`);
:mod:`.layouts` says which one each provider and expert size gets by default.  Llama 4 scales the
expert *input* by the weight, which MoE cannot do per slot within k > 1: it
always uses ``slots`` with rows x_t · w.

Weights are handed to MoE in its layout (fc1 [E, 2I or I, H], gate/up
interleaved; fc2 [E, H, I]); the Transpose/Gather that get there from the
model's storage act on initializers only, so ONNX Runtime folds them when the
session is created (measured: the static export runs as fast as a model built
with pre-interleaved weights).

CPU kernel facts this relies on (checked against ORT 1.32 here): SwiGLU needs
``swiglu_fusion=1`` (interleaved gate, up) and computes
``G·sigmoid(alpha·G)·(L + beta)`` with ``G = min(g, limit)``,
``L = clamp(l, ±limit)``; no FC3; its ``gelu`` is the tanh approximation.
"""

from __future__ import annotations

import numpy as np
from moepass.lowering.onnx.builder import FLOAT, INT64, NodeBuilder

from moepass.compiler.spec import ExpertsSpec

__all__ = ["MOE_LAYOUTS", "ORT_DOMAIN", "moe_attributes", "ort_experts", "unsupported_reason"]

ORT_DOMAIN = "com.microsoft"
#: How variable k is laid out over com.microsoft.MoE calls (see the module docstring).
MOE_LAYOUTS = ("masked", "buckets", "slots")

#: Logit of an expert a token does not keep: exp(-1e30 - max) is exactly 0.
_ABSENT = -1e30
#: Weights are floored here before the log, so a kept slot whose weight
#: underflowed to 0 contributes 0 instead of making a row of -inf.
_FLOOR = 1.1754944e-38


def unsupported_reason(spec: ExpertsSpec) -> str | None:
    """Why ``com.microsoft.MoE`` cannot run these experts exactly, or None if it can."""
    if spec.activation == "lifted":
        return "a lifted activation: com.microsoft.MoE has fixed activations only"
    if spec.gated and spec.activation not in ("silu", "swiglu_clamp"):
        return f"gated {spec.activation}: com.microsoft.MoE gates with SwiGLU only"
    if not spec.gated and spec.activation in ("gelu", "gelu_tanh"):
        return (
            f"{spec.activation}: com.microsoft.MoE's gelu is the tanh approximation on CPU and is not specified "
            "alike on every execution provider"
        )
    if spec.gated and spec.gate_up_layout not in ("concat", "interleaved"):
        return f"gate/up layout {spec.gate_up_layout!r}"
    return None


def moe_attributes(spec: ExpertsSpec) -> dict:
    """``com.microsoft.MoE`` attributes (without k) for these experts."""
    if not spec.gated:
        return {"activation_type": spec.activation, "normalize_routing_weights": 0}
    attrs = {"activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 0}
    if spec.activation == "swiglu_clamp":  # gpt-oss: (clamp(up) + 1) · G · sigmoid(alpha · G)
        attrs.update(activation_alpha=float(spec.swiglu_alpha), activation_beta=1.0, swiglu_limit=float(spec.swiglu_limit))
    else:  # act(gate) · up with act = silu: alpha 1, beta 0, no clamp
        attrs.update(activation_alpha=1.0, activation_beta=0.0)
    return attrs


def _interleave_index(inter: int) -> list[int]:
    """Row order that turns [gate; up] into [g0, u0, g1, u1, ...]."""
    order = []
    for i in range(inter):
        order += [i, inter + i]
    return order


def _moe_weights(b: NodeBuilder, w1: str, w2: str, b1: str | None, b2: str | None, spec: ExpertsSpec):
    """fc1 [E, N1, H] (gate/up interleaved), fc1 bias, fc2 [E, H, I], fc2 bias."""
    if spec.transposed:  # stored [E, in, out]
        w1 = b.op("Transpose", w1, perm=[0, 2, 1])
        w2 = b.op("Transpose", w2, perm=[0, 2, 1])
    if spec.gated and spec.gate_up_layout == "concat":
        order = b.ints(_interleave_index(spec.intermediate_size))
        w1 = b.gather(w1, order, axis=1)
        b1 = b.gather(b1, order, axis=1) if b1 else None
    return w1, b1, w2, b2


def _moe(b: NodeBuilder, x: str, logits: str, weights: tuple, k: int, attrs: dict) -> str:
    fc1, fc1_bias, fc2, fc2_bias = weights
    return b.op("MoE", x, logits, fc1, fc1_bias, fc2, fc2_bias, domain=ORT_DOMAIN, k=k, **attrs)


def native_routing_reason(router, rule: str, spec: ExpertsSpec) -> str | None:
    """Why ORT's MoE cannot route this block from the model's logits itself (None when it can).

    It can for the static rule on a softmax→top-k router (renormalised or not)
    or a top-k→softmax one, with no bias on the selection, no group limit, no
    constant scale and no epsilon in the renormalisation, and experts that
    weigh their outputs (not their input).
    """
    if rule != "static":
        return f"policy {rule!r} chooses k per token"
    if router.kind not in ("softmax_topk", "topk_softmax"):
        return f"router {router.kind!r} is not softmax and top-k"
    if router.has_correction_bias or router.n_group > 1 or router.scaling_factor != 1.0 or router.renormalize_eps:
        return "the router biases, groups or scales its selection"
    if spec.weight_on_input:
        return "the routing weight scales the experts' input"
    if spec.zero_compute:
        return "some experts are zero-computation experts"
    return None


def native_routing_experts(b: NodeBuilder, x: str, logits: str, w1: str, w2: str, b1: str | None, b2: str | None,
                           spec: ExpertsSpec, router) -> str:
    """``com.microsoft.MoE(x, logits, k=top_k)``: ORT's MoE routes from the model's own logits.

    Only where :func:`native_routing_reason` is None: softmax over the E
    logits, the top k, renormalised when the model renormalises (top-k →
    softmax is the renormalised form).
    """
    attrs = moe_attributes(spec)
    attrs["normalize_routing_weights"] = int(router.kind == "topk_softmax" or router.renormalize)
    return _moe(b, x, logits, _moe_weights(b, w1, w2, b1, b2, spec), router.top_k, attrs)


def _absent_logits(b: NodeBuilder, rows_like: str, num_experts: int, elem_type: int) -> str:
    shape = b.op("Concat", b.op("Shape", rows_like, start=0, end=1), b.ints([num_experts]), axis=0)
    return b.op("Expand", b.const(_ABSENT, elem_type), shape)


def ort_experts(
    b: NodeBuilder,
    x: str,
    ids: str,
    weights: str,
    w1: str,
    w2: str,
    b1: str | None,
    b2: str | None,
    spec: ExpertsSpec,
    k_min: int,
    k_max: int,
    elem_type: int,
    layout: str = "masked",
) -> str:
    """Append the ``com.microsoft.MoE`` computation of one block to ``b``; returns the [T, H] output.

    Args:
        x: [T, H] block input (``elem_type``); ids [T, k_max] int64 (E = empty);
        weights: [T, k_max] float32; w1, w2, b1, b2: the model's expert weights.
        k_min, k_max: the policy's bounds on k (one fixed-k call when equal).
        layout: ``masked``, ``buckets`` or ``slots`` (see the module docstring).
    """
    if layout not in MOE_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(MOE_LAYOUTS)}")
    attrs = moe_attributes(spec)
    moe_weights = _moe_weights(b, w1, w2, b1, b2, spec)
    if spec.zero_compute:  # slots on zero-computation experts (ids ≥ E) are not this call's: weight 0 here
        weights = b.op("Where", b.op("Less", ids, b.const(spec.num_experts, INT64)), weights, b.const(0.0, FLOAT))
    if spec.weight_on_input or (layout == "slots" and k_min != k_max):
        return _slots(b, x, ids, weights, moe_weights, spec, attrs, elem_type)
    log_weights = b.op("Log", b.op("Max", weights, b.const(_FLOOR, FLOAT)))
    weight_sum = b.reduce_sum(weights, [1], keepdims=1)  # empty slots hold weight 0
    if k_min == k_max or layout == "masked":
        logits = _masked_logits(b, ids, log_weights, spec.num_experts)
        y = _moe(b, x, _as(b, logits, elem_type), moe_weights, k_max, attrs)
        return b.op("Mul", y, _as(b, weight_sum, elem_type))
    return _buckets(b, x, ids, log_weights, weight_sum, moe_weights, spec, attrs, k_min, k_max, elem_type)


def _as(b: NodeBuilder, value: str, elem_type: int) -> str:
    return value if elem_type == FLOAT else b.cast(value, elem_type)


def _masked_logits(b: NodeBuilder, ids: str, log_weights: str, num_experts: int) -> str:
    """[T, E]: log w_j at each kept slot's expert, -1e30 elsewhere (empty slots, id E, match nothing)."""
    experts = b.const(np.arange(num_experts).reshape(1, 1, -1), INT64)
    match = b.op("Equal", b.unsqueeze(ids, [2]), experts)  # [T, K, E]; an expert is at most one slot
    dense = b.op("Where", match, b.unsqueeze(log_weights, [2]), b.const(_ABSENT, FLOAT))
    return b.op("ReduceMax", dense, b.ints([1]), keepdims=0)


def _buckets(b: NodeBuilder, x, ids, log_weights, weight_sum, moe_weights, spec: ExpertsSpec, attrs: dict,
             k_min: int, k_max: int, elem_type: int) -> str:
    """One fixed-k MoE call per bucket of tokens that keep k experts, scattered back."""
    kept = b.reduce_sum(b.cast(b.op("Less", ids, b.const(spec.num_experts, INT64)), INT64), [1])
    out = b.op("Expand", b.const(0.0, elem_type), b.op("Shape", x))
    for k in range(max(k_min, 1), k_max + 1):  # k = 0 tokens keep their zero row
        rows = b.rows_where(b.op("Equal", kept, b.const(k, INT64)))
        bucket_ids = b.slice(b.gather(ids, rows), [0], [k], [1])
        bucket_log_weights = b.slice(b.gather(log_weights, rows), [0], [k], [1])
        absent = _absent_logits(b, rows, spec.num_experts, FLOAT)
        logits = b.op("ScatterElements", absent, bucket_ids, bucket_log_weights, axis=1)
        y = _moe(b, b.gather(x, rows), _as(b, logits, elem_type), moe_weights, k, attrs)
        y = b.op("Mul", y, _as(b, b.gather(weight_sum, rows), elem_type))
        out = b.op("ScatterND", out, b.unsqueeze(rows, [1]), y)
    return out


def _slots(b: NodeBuilder, x, ids, weights, moe_weights, spec: ExpertsSpec, attrs: dict, elem_type: int) -> str:
    """One k = 1 row per non-empty slot (x_t, or x_t · w for Llama 4), added back to its token."""
    picked = b.op("NonZero", b.op("Less", ids, b.const(spec.num_experts, INT64)))  # [2, R]: token, slot
    token = b.gather(picked, b.const(0, INT64), axis=0)
    position = b.op("Transpose", picked, perm=[1, 0])
    slot_ids = b.unsqueeze(b.op("GatherND", ids, position), [1])
    slot_weights = _as(b, b.unsqueeze(b.op("GatherND", weights, position), [1]), elem_type)
    rows = b.gather(x, token)
    if spec.weight_on_input:
        rows = b.op("Mul", rows, slot_weights)
    zeros = b.op("Expand", b.const(0.0, FLOAT), b.op("Shape", slot_ids))
    logits = b.op("ScatterElements", _absent_logits(b, token, spec.num_experts, FLOAT), slot_ids, zeros, axis=1)
    y = _moe(b, rows, _as(b, logits, elem_type), moe_weights, 1, attrs)  # softmax of one 0 among -1e30: exactly 1
    if not spec.weight_on_input:
        y = b.op("Mul", y, slot_weights)
    out = b.op("Expand", b.const(0.0, elem_type), b.op("Shape", x))
    return b.op("ScatterND", out, b.unsqueeze(token, [1]), y, reduction="add")
