"""The CPU lowering of the experts op: sort by expert, one GEMM pair per expert.

::

    ids [T,K] ──► sort slots by expert (empty slots last, then dropped)
    x [T,H]   ──► gather rows      xs [S,H]           S = non-empty slots
                  for each expert e with rows:        (GEMMs in place, no copies
                      h  = xs[e] @ w1[e]ᵀ (+ b1[e])    of weights: w[e]ᵀ is a
                      a  = act(h)   (in place)         strided view BLAS reads)
                      y[e] = a @ w2[e]ᵀ (+ b2[e])
                  y *= weight (per row)
                  scatter rows back to slot order, sum over each token's K slots

Empty slots cost no GEMM work: each GEMM processes exactly the rows routed to
its expert (see :func:`moepass.stats.count_gemm_rows`).  The final sum runs
over slots in slot order, as transformers' experts do, so the static policy
reproduces them to float32 round-off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moepass.lowering.activations import split_gate_up, unary_activation
from moepass.spec import ExpertsSpec
from moepass.stats import note_gemm_rows

__all__ = ["experts_forward", "sort_slots_by_expert"]


def sort_slots_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Order the non-empty slots of ``ids`` [T, K] by expert, stably.

    Returns the flat slot indices (``token * K + slot``) grouped by expert and
    the number of slots per expert.  Ids outside ``[0, E)`` (the sentinel) are
    dropped.
    """
    flat = ids.reshape(-1)
    keys = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.bincount(keys, minlength=num_experts + 1).tolist()[:num_experts]
    order = torch.sort(keys, stable=True)[1][: sum(counts)]
    return order, counts


def _activate_inplace(h: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """act(h) reusing ``h``'s storage where the math allows; returns [S, I]."""
    if not spec.gated:
        if spec.activation == "silu":
            return F.silu(h, inplace=True)
        if spec.activation == "relu":
            return h.relu_()
        return unary_activation(spec.activation, h)
    gate, up = split_gate_up(h, spec)
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
    a = _activate_inplace(h_t.t(), spec)  # [rows, I], a strided view
    y_t = torch.mm(w2[expert], a.t())
    if b2 is not None:
        y_t += b2[expert].unsqueeze(1)
    out.copy_(y_t.t())


def experts_forward(x, ids, weights, w1, w2, b1, b2, spec: ExpertsSpec) -> torch.Tensor:
    """The experts op on CPU tensors (any float dtype; accumulation in float32)."""
    num_tokens, hidden = x.shape
    num_slots = ids.shape[1]
    order, counts = sort_slots_by_expert(ids, spec.num_experts)
    rows_total = order.numel()
    token = torch.div(order, num_slots, rounding_mode="floor")
    xs = x.index_select(0, token)
    slot_weights = weights.reshape(-1).index_select(0, order).float().unsqueeze(1)
    if spec.weight_on_input:
        xs = (xs.float() * slot_weights).to(x.dtype)
    n1 = w1.shape[2] if spec.transposed else w1.shape[1]
    y = torch.empty(rows_total, hidden, dtype=x.dtype, device=x.device)
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
    if spec.weight_on_input:
        weighted = y.float() if x.dtype != torch.float32 else y
    else:
        weighted = y.float().mul_(slot_weights) if x.dtype != torch.float32 else y.mul_(slot_weights)
    by_slot = torch.zeros(num_tokens * num_slots, hidden, dtype=weighted.dtype, device=x.device)
    by_slot.index_copy_(0, order, weighted)
    return by_slot.view(num_tokens, num_slots, hidden).sum(dim=1).to(x.dtype)
