"""A plain per-token Python reference of every router kind and routing rule.

Written from the papers' and the models' definitions with Python floats and
loops, independently of moepass.runtime.routing; tests compare the two.  Every
function returns the decision margins it saw, so tests can skip inputs that
sit on a threshold (where float32 and float64 may rightly disagree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


@dataclass
class Router:
    kind: str
    num_experts: int
    top_k: int
    renormalize: bool = False
    eps: float = 0.0
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    correction_bias: list = field(default_factory=list)


def rank(logits, router, depth):
    """(order, values, probs, margins) for one token."""
    E = router.num_experts
    margins = []
    if router.kind == "softmax_topk":
        p = softmax(logits)
        order = sorted(range(E), key=lambda e: -p[e])
        return order[:depth], [p[e] for e in order[:depth]], [p[e] for e in order[:depth]], _gaps([p[e] for e in order])
    if router.kind in ("topk_softmax", "topk_sigmoid"):
        p = softmax(logits)
        order = sorted(range(E), key=lambda e: -logits[e])
        return order[:depth], [logits[e] for e in order[:depth]], [p[e] for e in order[:depth]], _gaps(sorted(logits, reverse=True))
    s = [sigmoid(v) for v in logits]
    bias = router.correction_bias or [0.0] * E
    b = [s[e] + bias[e] for e in range(E)]
    size = E // router.n_group
    group_scores = []
    for g in range(router.n_group):
        members = sorted((b[e] for e in range(g * size, (g + 1) * size)), reverse=True)
        group_scores.append(sum(members[:2]))
    margins += _gaps(sorted(group_scores, reverse=True))
    kept_groups = sorted(range(router.n_group), key=lambda g: -group_scores[g])[: router.topk_group]
    candidates = [e for e in range(E) if e // size in kept_groups]
    order = sorted(candidates, key=lambda e: -b[e])[:depth]
    margins += _gaps(sorted((b[e] for e in candidates), reverse=True))
    mass = sum(s[e] for e in candidates)
    return order, [s[e] for e in order], [s[e] / mass for e in order], margins


def _gaps(sorted_values):
    return [a - b for a, b in zip(sorted_values, sorted_values[1:])]


def choose_k(rule, params, probs, logits, x, tensors, native_k):
    """(k, margins) for one token."""
    C = len(probs)
    if rule == "static":
        return native_k, []
    if rule == "threshold":
        k, margins = 1, []
        while k < C:
            gap = probs[k - 1] - probs[k]
            margins.append(gap - params["T"])
            if gap > params["T"]:
                break
            k += 1
        return k, margins
    if rule == "top_p":
        total, margins = 0.0, []
        for j, p in enumerate(probs):
            total += p
            margins.append(total - params["p"])
            if total > params["p"]:
                return j + 1, margins
        return C, margins
    if rule == "sensitivity":
        total = sum(probs)
        w = [p / total for p in probs]
        k, margins = 1, []
        while k < C:
            margins.append(w[k] - params["threshold"])
            if w[k] < params["threshold"]:
                break
            k += 1
        return k, margins
    if rule == "skip_ratio":
        k, margins = 1, []
        while k < C:
            margins.append(probs[k] - params["beta"] * probs[0])
            if probs[k] < params["beta"] * probs[0]:
                break
            k += 1
        return k, margins
    if rule == "null_experts":
        rows = tensors[0]
        null = [sum(a * b for a, b in zip(x, row)) for row in rows]
        combined = list(logits) + null
        ranked = sorted(combined, reverse=True)
        picked = sorted(range(len(combined)), key=lambda i: -combined[i])[: params["k"]]
        return sum(1 for i in picked if i < len(logits)), _gaps(ranked)
    if rule == "allocator":
        (weight,) = tensors
        scores = [sum(x[h] * weight[h][n] for h in range(len(x))) for n in range(len(weight[0]))]
        best = max(range(len(scores)), key=lambda n: scores[n])
        return best + 1, _gaps(sorted(scores, reverse=True))
    raise ValueError(rule)


def weigh(router, order, values, probs, k, renormalize):
    kept = list(range(k))
    if renormalize is None and router.kind == "topk_softmax":
        w = softmax([values[j] for j in kept]) if kept else []
        return w
    if renormalize is None and router.kind == "topk_sigmoid":
        return [sigmoid(values[j]) for j in kept]
    if renormalize is None:
        renormalize = router.renormalize
    if router.kind == "topk_softmax":
        natural = [probs[j] for j in kept]
    elif router.kind == "topk_sigmoid":
        natural = [sigmoid(values[j]) for j in kept]
    else:
        natural = [values[j] for j in kept]
    if renormalize:
        total = sum(natural) + router.eps
        natural = [w / total for w in natural] if total > 0 else natural
    return [w * router.scale for w in natural]


def route_token(logits, router, rule="static", params=None, k_min=None, k_max=None, x=None, tensors=(), renormalize=None):
    """(ids, weights, margins) of one token, padded to k_max with (E, 0.0)."""
    params = params or {}
    native = router.top_k
    k_max = native if k_max is None else k_max
    k_min = (native if rule == "static" else 0) if k_min is None else k_min
    order, values, probs, margins = rank(logits, router, k_max)
    k, rule_margins = choose_k(rule, params, probs, logits, x, tensors, native)
    k = max(k_min, min(k_max, k))
    weights = weigh(router, order, values, probs, k, renormalize)
    E = router.num_experts
    ids = order[:k] + [E] * (k_max - k)
    return ids, weights + [0.0] * (k_max - k), margins + rule_margins
