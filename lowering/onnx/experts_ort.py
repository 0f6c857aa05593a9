"""The experts half of a block's function for ONNX Runtime: k-buckets run by ``com.microsoft.MoE``.

::

    k_t   = #{slots of token t with id < E}                  tokens grouped by k
    for each k in k_min..k_max (k ≥ 1):
        rows   = NonZero(k_t == k)                           the bucket, [n]
        logits = -1e30 everywhere, log(w) at the bucket's k ids   [n, E]
        y      = com.microsoft.MoE(x[rows], logits, fc1, fc1_b, fc2, fc2_b, k=k)
        out[rows] = y · Σ_slots w                            (ScatterND)

ORT's MoE takes router *logits* and computes softmax and top-k itself.  With
the logits above, its top-k is exactly the bucket's experts and its softmax
gives w_j / Σw; multiplying by Σw afterwards restores the weights
(renormalised, scaled, or not) to round-off.  ``normalize_routing_weights`` is
0.  A static policy has one bucket and skips the grouping.

Llama 4 scales the expert *input* by the weight, which MoE cannot do per slot
within a k > 1 bucket: there every non-empty slot becomes its own row
(x_t · w), run with k = 1 and a logit row whose softmax is exactly 1, and the
rows are added back to their tokens.

Weights are handed to MoE in its layout (fc1 [E, 2I or I, H], gate/up
interleaved; fc2 [E, H, I]); the Transpose/Gather that get there from the
model's storage act on initializers only, so ONNX Runtime folds them when the
session is created.

CPU kernel facts this relies on (checked against ORT 1.32 here): SwiGLU needs
``swiglu_fusion=1`` (interleaved gate, up) and computes
``G·sigmoid(alpha·G)·(L + beta)`` with ``G = min(g, limit)``,
``L = clamp(l, ±limit)``; no FC3; its ``gelu`` is the tanh approximation.
"""

from __future__ import annotations

from moepass.lowering.onnx.builder import FLOAT, INT64, NodeBuilder

from moepass.spec import ExpertsSpec

__all__ = ["ORT_DOMAIN", "moe_attributes", "ort_experts", "unsupported_reason"]

ORT_DOMAIN = "com.microsoft"

#: Logit of an expert a bucket does not use: exp(-1e30 - max) is exactly 0.
_ABSENT = -1e30
#: Weights are floored here before the log, so a kept slot whose weight
#: underflowed to 0 contributes 0 instead of making a row of -inf.
_FLOOR = 1.1754944e-38


def unsupported_reason(spec: ExpertsSpec) -> str | None:
    """Why ``com.microsoft.MoE`` cannot run these experts exactly, or None if it can."""
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
) -> str:
    """Append the bucketed ``com.microsoft.MoE`` computation to ``b``; returns the [T, H] output.

    Args:
        x: [T, H] block input (``elem_type``); ids [T, k_max] int64 (E = empty);
        weights: [T, k_max] float32; w1, w2, b1, b2: the model's expert weights.
        k_min, k_max: the policy's bounds on k (one bucket when equal).
    """
    attrs = moe_attributes(spec)
    moe_weights = _moe_weights(b, w1, w2, b1, b2, spec)
    num_experts = spec.num_experts

    def as_t(value: str) -> str:
        return value if elem_type == FLOAT else b.cast(value, elem_type)

    if spec.weight_on_input:
        return _slot_rows(b, x, ids, weights, moe_weights, spec, attrs, elem_type)
    log_weights = b.op("Log", b.op("Max", weights, b.const(_FLOOR, FLOAT)))
    weight_sum = b.reduce_sum(weights, [1], keepdims=1)  # empty slots hold weight 0
    if k_min == k_max:  # every token keeps k_max experts: one bucket, no grouping
        logits = b.op("ScatterElements", _absent_logits(b, x, num_experts, FLOAT), ids, log_weights, axis=1)
        return b.op("Mul", _moe(b, x, as_t(logits), moe_weights, k_max, attrs), as_t(weight_sum))
    kept = b.reduce_sum(b.cast(b.op("Less", ids, b.const(num_experts, INT64)), INT64), [1])
    out = b.op("Expand", b.const(0.0, elem_type), b.op("Shape", x))
    for k in range(max(k_min, 1), k_max + 1):  # k = 0 tokens keep their zero row
        rows = b.rows_where(b.op("Equal", kept, b.const(k, INT64)))
        bucket_ids = b.slice(b.gather(ids, rows), [0], [k], [1])
        bucket_log_weights = b.slice(b.gather(log_weights, rows), [0], [k], [1])
        logits = b.op("ScatterElements", _absent_logits(b, rows, num_experts, FLOAT), bucket_ids, bucket_log_weights, axis=1)
        y = _moe(b, b.gather(x, rows), as_t(logits), moe_weights, k, attrs)
        y = b.op("Mul", y, as_t(b.gather(weight_sum, rows)))
        out = b.op("ScatterND", out, b.unsqueeze(rows, [1]), y)
    return out


def _slot_rows(b: NodeBuilder, x, ids, weights, moe_weights, spec: ExpertsSpec, attrs: dict, elem_type: int) -> str:
    """Weight on the input: one k = 1 row per non-empty slot, x_t · w, added back to its token."""

    def as_t(value: str) -> str:
        return value if elem_type == FLOAT else b.cast(value, elem_type)

    picked = b.op("NonZero", b.op("Less", ids, b.const(spec.num_experts, INT64)))  # [2, R]
    token = b.gather(picked, b.const(0, INT64), axis=0)
    position = b.op("Transpose", picked, perm=[1, 0])
    slot_ids = b.unsqueeze(b.op("GatherND", ids, position), [1])
    slot_weights = b.unsqueeze(b.op("GatherND", weights, position), [1])
    rows = b.op("Mul", b.gather(x, token), as_t(slot_weights))
    zeros = b.op("Expand", b.const(0.0, FLOAT), b.op("Shape", slot_ids))
    logits = b.op("ScatterElements", _absent_logits(b, token, spec.num_experts, FLOAT), slot_ids, zeros, axis=1)
    y = _moe(b, rows, as_t(logits), moe_weights, 1, attrs)
    out = b.op("Expand", b.const(0.0, elem_type), b.op("Shape", x))
    return b.op("ScatterND", out, b.unsqueeze(token, [1]), y, reduction="add")
