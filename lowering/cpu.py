"""The CPU lowering of the experts op: sort by expert, one GEMM pair per expert.

::

    ids [T,K] ──► bucket tokens by k, take every bucket's slots, sort them by expert
    x [T,H]   ──► gather rows      xs [S,H]           S = non-empty slots
                  for each expert e with rows:        (GEMMs in place, no copies
                      h  = xs[e] @ w1[e]ᵀ (+ b1[e])    of weights: w[e]ᵀ is a
                      a  = act(h)   (in place)         strided view BLAS reads)
                      y[e] = a @ w2[e]ᵀ (+ b2[e])
                  y *= weight (per row)
                  add each row into its token's output (float32)

Empty slots cost no GEMM work: each GEMM processes exactly the rows routed to
its expert (see :func:`moepass.stats.count_gemm_rows`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moepass.lowering.activations import apply_activation, split_gate_up, unary_activation
from moepass.lowering.grouped import accumulation_dtype

from moepass.bucketing import bucket_by_k
from moepass.spec import ExpertsSpec
from moepass.stats import note_gemm_rows

__all__ = ["experts_forward", "expert_slots"]


def expert_slots(ids: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """The non-empty slots of a routing, as the union of its k-buckets, sorted by expert.

    The buckets' fixed-k problems (see :mod:`moepass.bucketing`) all use the
    same expert weights, so on CPU they run fused: every bucket's slots go
    through one GEMM pair per expert — fewer, larger GEMMs than bucket by
    bucket, and still no row for an empty slot.

    Returns (token per row, weight per row, rows per expert), rows grouped by expert.
    """
    plan = bucket_by_k(ids, weights, num_experts)
    if not plan.buckets:
        empty = ids.new_empty(0)
        return empty, weights.new_empty(0), [0] * num_experts
    tokens = torch.cat([b.tokens.repeat_interleave(b.k) for b in plan.buckets])
    experts = torch.cat([b.ids.reshape(-1) for b in plan.buckets])
    slot_weights = torch.cat([b.weights.reshape(-1) for b in plan.buckets])
    order = torch.sort(experts, stable=True)[1]
    counts = torch.bincount(experts, minlength=num_experts).tolist()
    return tokens[order], slot_weights[order], counts


def _activate_inplace(h: torch.Tensor, spec: ExpertsSpec, dim: int = -1) -> torch.Tensor:
    """act(h) reusing ``h``'s storage where the math allows; features along ``dim``."""
    if spec.activation == "lifted":
        return apply_activation(h, spec, dim)
    if not spec.gated:
        if spec.activation == "silu":
            return F.silu(h, inplace=True)
        if spec.activation == "relu":
            return h.relu_()
        return unary_activation(spec.activation, h)
    gate, up = split_gate_up(h, spec, dim)
    if spec.activation == "swiglu_clamp":
        limit = spec.swiglu_limit
        gate = gate.clamp(max=limit)
        glu = gate * torch.sigmoid(gate * spec.swiglu_alpha)
        return up.clamp_(min=-limit, max=limit).add_(1).mul_(glu)
    if spec.activation == "silu":
        return F.silu(gate, inplace=True).mul_(up)
    return unary_activation(spec.activation, gate).mul_(up)


#: Up to this many rows per expert the GEMMs run weight-major (W @ xᵀ): for a
#: handful of tokens the work is a matrix-vector product that streams the
#: weights, and MKL streams a row-major [N, K] weight about twice as fast as
#: A [M, K] @ Wᵀ when M is small (measured on the CI machine: 13.7 ms against
#: 27.5 ms for 2 tokens on a Mixtral-shaped block).
_WEIGHT_MAJOR_MAX_ROWS = 16


def _expert_token_major(xs, out, expert, w1, w2, b1, b2, spec: ExpertsSpec, buffer) -> None:
    """out = expert(xs) with GEMMs of shape [rows, K] @ [K, N]."""
    n1 = w1.shape[2] if spec.transposed else w1.shape[1]
    h = buffer.view(xs.shape[0], n1)
    first = w1[expert] if spec.transposed else w1[expert].t()
    if b1 is None:
        torch.mm(xs, first, out=h)
    else:
        torch.addmm(b1[expert], xs, first, out=h)
    a = _activate_inplace(h, spec)
    second = w2[expert] if spec.transposed else w2[expert].t()
    if b2 is None:
        torch.mm(a, second, out=out)
    else:
        torch.addmm(b2[expert], a, second, out=out)


def _expert_weight_major(xs, out, expert, w1, w2, b1, b2, spec: ExpertsSpec, buffer) -> None:
    """out = expert(xs) with GEMMs of shape [N, K] @ [K, rows] (weights [E, out, in])."""
    n1 = w1.shape[1]
    h_t = buffer.view(n1, xs.shape[0])
    if b1 is None:
        torch.mm(w1[expert], xs.t(), out=h_t)
    else:
        torch.addmm(b1[expert].unsqueeze(1), w1[expert], xs.t(), out=h_t)
    a_t = _activate_inplace(h_t, spec, dim=0)  # [I, rows]: contiguous rows of h_t for the concat layout
    y_t = torch.mm(w2[expert], a_t)
    if b2 is not None:
        y_t += b2[expert].unsqueeze(1)
    out.copy_(y_t.t())


def experts_forward(x, ids, weights, w1, w2, b1, b2, spec: ExpertsSpec) -> torch.Tensor:
    """The experts op on CPU tensors (any float dtype; accumulation in float32)."""
    num_tokens, hidden = x.shape
    token, slot_weights, counts = expert_slots(ids, weights, spec.num_experts)
    acc = accumulation_dtype(x.dtype)
    slot_weights = slot_weights.to(acc).unsqueeze(1)
    xs = x.index_select(0, token)
    if spec.weight_on_input:
        xs = (xs.to(acc) * slot_weights).to(x.dtype)
    n1 = w1.shape[2] if spec.transposed else w1.shape[1]
    y = torch.empty(token.numel(), hidden, dtype=x.dtype, device=x.device)
    h_buffer = torch.empty(max(counts, default=0) * n1, dtype=x.dtype, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        if count <= _WEIGHT_MAJOR_MAX_ROWS and not spec.transposed:
            _expert_weight_major(xs[rows], y[rows], expert, w1, w2, b1, b2, spec, h_buffer[: count * n1])
        else:
            _expert_token_major(xs[rows], y[rows], expert, w1, w2, b1, b2, spec, h_buffer[: count * n1])
        note_gemm_rows(count)
        start += count
    weighted = y.to(acc)
    if not spec.weight_on_input:
        weighted = weighted.mul_(slot_weights)
    out = torch.zeros(num_tokens, hidden, dtype=weighted.dtype, device=x.device)
    out.index_add_(0, token, weighted)
    return out.to(x.dtype)
