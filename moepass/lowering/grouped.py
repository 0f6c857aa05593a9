"""Grouped expert GEMMs over slot rows sorted by expert, and their backward.

This is the *split* form of the experts op, used when the compiled graph must
be differentiable (training, or inference in grad mode)::

    ids [T,K] ──► expert_rows        row_token, row_slot [S], offsets [E+1]
                                     (slots sorted by expert, empty slots last)
    x [T,H]   ──► up_forward         h[r] = x[token(r)] W1[e]ᵀ (+ b1[e])          [S, N1]
    h         ──► activation         a = act(h)  (plain torch ops: autograd and
                                     Inductor see it, any elementwise form works)
    a         ──► down_forward       out[t] = Σ_{r of t} w(r) · (a[r] W2[e]ᵀ + b2[e])  [T, H]

Each function notes its rows per expert (:func:`moepass.runtime.stats.count_gemm_rows`):
the forward counts once per expert (as the fused op does), each backward once.
``S = T · K`` rows are allocated; rows of empty slots (id ``E``) sort last,
after every expert's rows, and no GEMM touches them — forward or backward —
so an empty slot costs no GEMM work in training either.  Each function runs
one GEMM (or GEMM pair, backward) per expert hit, on whatever device the
tensors live (a torch-ops path: on CUDA this is the backward the Triton
lowering uses too).  Llama 4's weight-on-input form multiplies the routing
weight into the up projection's input instead of the down projection's output.

Backward formulas, per expert e and its rows (g = ∂L/∂out, dy = w · g[token])::

    down:  u = g[token] W2[e]  (one GEMM, [rows, I]);  ∂a = w · u
           ∂w = Σ_i u ⊙ a + g[token] · b2[e]            (no second GEMM needed)
           ∂W2[e] = dyᵀ a,  ∂b2[e] = Σ dy
    up:    ∂xs = ∂h W1[e];  ∂x[token] += ∂xs (· w on input)
           ∂W1[e] = ∂hᵀ xs,  ∂b1[e] = Σ ∂h
"""

from __future__ import annotations

import torch
from moepass.lowering.cpu_kernels import onednn_available
from moepass.lowering.workspace import scratch

from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.stats import note_gemm_rows

__all__ = [
    "expert_rows",
    "up_forward",
    "up_backward",
    "down_forward",
    "down_backward",
    "first_projection_width",
    "hidden_size_of",
    "accumulation_dtype",
]


def first_projection_width(w1: torch.Tensor, spec: ExpertsSpec) -> int:
    """N1: outputs of the gate/up projection (2I when gated)."""
    return w1.shape[2] if spec.transposed else w1.shape[1]


def hidden_size_of(w2: torch.Tensor, spec: ExpertsSpec) -> int:
    """H: outputs of the down projection."""
    return w2.shape[2] if spec.transposed else w2.shape[1]


def expert_rows(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the T·K slots by expert (stable); empty slots (id ``E``) sort last.

    Returns ``row_token`` [T·K] (token of each row), ``row_slot`` [T·K] (flat
    slot index t·K + j of each row) and ``offsets`` [E + 1] (expert e owns rows
    ``offsets[e]:offsets[e+1]``; ``offsets[E]`` is the number of non-empty
    slots).  Shapes are static, so the function traces under fake tensors.
    """
    slots_per_token = ids.shape[1]
    flat = ids.reshape(-1).clamp(0, num_experts)
    row_slot = torch.sort(flat, stable=True)[1]
    row_token = torch.div(row_slot, slots_per_token, rounding_mode="floor")
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    counts = counts.scatter_add(0, flat, torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts[:num_experts], 0)])
    return row_token, row_slot, offsets


def _expert_grad_buffer(weight: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    """A gradient buffer for a stacked [E, ...] weight: experts with rows are written
    in full by their GEMM, so only the experts no row reached are zeroed."""
    grad = torch.empty_like(weight)
    hit = {expert for expert, _, _ in runs}
    for expert in range(weight.shape[0]):
        if expert not in hit:
            grad[expert].zero_()
    return grad


def _runs(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every expert with rows."""
    bounds = offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs, else the input's own dtype (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _slot_weights(weights: torch.Tensor, row_slot: torch.Tensor, live: int, dtype: torch.dtype) -> torch.Tensor:
    """Routing weight per live row, [live, 1] in the accumulation dtype of ``dtype``."""
    return weights.reshape(-1).index_select(0, row_slot[:live]).to(accumulation_dtype(dtype)).unsqueeze(1)


def _gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """out = a @ b (+ bias).

    float32 CPU tensors go through oneDNN's linear (on b's transpose, a view):
    on the AMD CI machine MKL, which ``torch.mm`` runs for float32, reached
    60–90% of its speed on every GEMM form of the forward and backward here
    (one thread, 16 and 128 rows, Mixtral-shaped experts).  Other dtypes and
    devices use ``torch.mm``.  Only for outputs of a few rows: the linear
    returns a new tensor, and copying a weight-sized gradient out of it (plus
    the page faults of two fresh weight-sized buffers) cost more than the
    GEMM saved, so the weight gradients stay ``torch.mm(..., out=)``.
    """
    if a.dtype == torch.float32 and a.device.type == "cpu" and onednn_available():
        out.copy_(torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], ""))
    elif bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


def _first(w1: torch.Tensor, expert: int, spec: ExpertsSpec) -> torch.Tensor:
    """W1[e] as a [H, N1] operand (a strided view; no copy)."""
    return w1[expert] if spec.transposed else w1[expert].t()


def _second(w2: torch.Tensor, expert: int, spec: ExpertsSpec) -> torch.Tensor:
    """W2[e] as an [I, H] operand."""
    return w2[expert] if spec.transposed else w2[expert].t()


def _gathered_input(x, row_token, row_slot, weights, live, spec: ExpertsSpec) -> torch.Tensor:
    """xs [live, H]: each live row's token (times its weight, weight on input), in a scratch buffer."""
    xs = scratch("up_xs", (live, x.shape[1]), x.dtype, x.device)
    torch.index_select(x, 0, row_token[:live], out=xs)
    if spec.weight_on_input:
        acc = accumulation_dtype(x.dtype)
        xs.copy_(xs.to(acc) * _slot_weights(weights, row_slot, live, x.dtype))
    return xs


def _slot_rows(row_slot: torch.Tensor, live: int) -> torch.Tensor:
    """The row of each slot [T·K]: its place in the expert order, ``live`` (a zero row) for empty slots."""
    slot_row = torch.empty_like(row_slot)
    slot_row[row_slot] = torch.arange(row_slot.shape[0], device=row_slot.device)
    return slot_row.clamp_(max=live)


def token_ordered(rows: torch.Tensor, slot_row: torch.Tensor, num_tokens: int, slots: int) -> torch.Tensor:
    """rows[slot_row] as [T, K, H], in a scratch buffer: each token's slots side by side."""
    ordered = scratch("combine", (num_tokens * slots, rows.shape[1]), rows.dtype, rows.device)
    torch.index_select(rows, 0, slot_row, out=ordered)
    return ordered.view(num_tokens, slots, rows.shape[1])


def _sum_rows_per_token(rows: torch.Tensor, weights, slot_row, num_tokens: int, slots: int) -> torch.Tensor:
    """out [T, H] = Σ_j w[t,j] · rows[slot_row[t,j]] (no weight when ``weights`` is None).

    ``rows`` [live + 1, H] ends with a zero row, which empty slots read.  The
    rows are put in token order and reduced in one batched product (float32
    accumulation), in slot order — the same order whatever the experts.
    """
    ordered = token_ordered(rows, slot_row, num_tokens, slots)
    if weights is None:
        return ordered.sum(dim=1) if slots > 1 else ordered[:, 0].clone()
    acc = accumulation_dtype(rows.dtype)
    if weights.dtype == rows.dtype:
        return torch.bmm(weights.reshape(num_tokens, 1, slots), ordered).view(num_tokens, rows.shape[1])
    out = torch.bmm(weights.to(acc).reshape(num_tokens, 1, slots), ordered.to(acc))
    return out.view(num_tokens, rows.shape[1]).to(rows.dtype)


def up_forward(x, row_token, row_slot, offsets, weights, w1, b1, spec: ExpertsSpec) -> torch.Tensor:
    """h [T·K, N1]: each non-empty slot's first projection; rows of empty slots are 0."""
    n1 = first_projection_width(w1, spec)
    h = x.new_empty(row_token.shape[0], n1)
    live = int(offsets[-1])
    h[live:].zero_()
    xs = _gathered_input(x, row_token, row_slot, weights, live, spec)
    for expert, start, end in _runs(offsets):
        rows = slice(start, end)
        if b1 is None:
            _gemm(h[rows], xs[rows], _first(w1, expert, spec))
        else:
            _gemm(h[rows], xs[rows], _first(w1, expert, spec), b1[expert])
        note_gemm_rows(end - start)
    return h


def down_forward(a, row_token, row_slot, offsets, weights, w2, b2, spec: ExpertsSpec) -> torch.Tensor:
    """out [T, H] = Σ over each token's slots of w · (a W2ᵀ + b2) (or without w, weight on input)."""
    num_tokens, slots = weights.shape
    hidden = hidden_size_of(w2, spec)
    live = int(offsets[-1])
    y = scratch("down_y", (live + 1, hidden), a.dtype, a.device)
    y[live].zero_()
    for expert, start, end in _runs(offsets):
        rows = slice(start, end)
        if b2 is None:
            _gemm(y[rows], a[rows], _second(w2, expert, spec))
        else:
            _gemm(y[rows], a[rows], _second(w2, expert, spec), b2[expert])
    slot_weights = None if spec.weight_on_input else weights
    return _sum_rows_per_token(y, slot_weights, _slot_rows(row_slot, live), num_tokens, slots)


def down_backward(grad_out, a, row_token, row_slot, offsets, weights, w2, b2, spec: ExpertsSpec, needs):
    """Gradients of :func:`down_forward` for (a, weights, w2, b2); None where ``needs`` is False.

    Phase by phase over the experts (all ∂a GEMMs, then all ∂W2 GEMMs), as
    the forward runs its projections.
    """
    need_a, need_weights, need_w2, need_b2 = needs
    live = int(offsets[-1])
    hidden = grad_out.shape[1]
    g = scratch("down_g", (live, hidden), grad_out.dtype, grad_out.device)
    torch.index_select(grad_out, 0, row_token[:live], out=g)  # [live, H]
    on_output = not spec.weight_on_input
    acc = accumulation_dtype(a.dtype)
    sw = _slot_weights(weights, row_slot, live, a.dtype) if on_output else None
    runs = _runs(offsets)
    grad_a = torch.zeros_like(a) if need_a else None
    grad_w2 = _expert_grad_buffer(w2, runs) if need_w2 else None
    grad_b2 = torch.zeros_like(b2) if (need_b2 and b2 is not None) else None
    want_weights = need_weights and on_output
    grad_weights = None
    if need_a or want_weights:
        u = scratch("down_u", (live, a.shape[1]), a.dtype, a.device)  # g W2[e]: [live, I]
        for expert, start, end in runs:
            rows = slice(start, end)
            _gemm(u[rows], g[rows], _second(w2, expert, spec).t())
        if need_a:
            if on_output:
                grad_a[:live] = (u.to(acc) * sw).to(a.dtype)
            else:
                grad_a[:live] = u
        if want_weights:
            row_grad = (u.to(acc) * a[:live].to(acc)).sum(dim=1)
            if b2 is not None:
                for expert, start, end in runs:
                    row_grad[start:end] += g[start:end].to(acc) @ b2[expert].to(acc)
            grad_weights = torch.zeros(weights.numel(), dtype=acc, device=a.device)
            grad_weights.index_copy_(0, row_slot[:live], row_grad)
    if need_w2 or grad_b2 is not None:
        dy = (g.to(acc) * sw).to(g.dtype) if on_output else g
        for expert, start, end in runs:
            rows = slice(start, end)
            if need_w2:
                if spec.transposed:  # w2[e] is [I, H]: ∂ = aᵀ dy
                    torch.mm(a[rows].t(), dy[rows], out=grad_w2[expert])
                else:  # [H, I]: ∂ = dyᵀ a
                    torch.mm(dy[rows].t(), a[rows], out=grad_w2[expert])
            if grad_b2 is not None:
                grad_b2[expert] = dy[rows].sum(dim=0)
    for _, start, end in runs:
        note_gemm_rows(end - start)
    if need_weights and grad_weights is None:
        grad_weights = torch.zeros(weights.numel(), dtype=acc, device=a.device)
    if grad_weights is not None:
        grad_weights = grad_weights.view(weights.shape).to(weights.dtype)
    return grad_a, grad_weights, grad_w2, grad_b2


def up_backward(grad_h, x, row_token, row_slot, offsets, weights, w1, b1, spec: ExpertsSpec, needs):
    """Gradients of :func:`up_forward` for (x, weights, w1, b1); None where ``needs`` is False.

    Phase by phase over the experts (all ∂xs GEMMs, then all ∂W1 GEMMs).
    """
    need_x, need_weights, need_w1, need_b1 = needs
    live = int(offsets[-1])
    num_tokens, slots = weights.shape
    on_input = spec.weight_on_input
    need_xs_grad = need_x or (need_weights and on_input)
    runs = _runs(offsets)
    grad_w1 = _expert_grad_buffer(w1, runs) if need_w1 else None
    grad_b1 = torch.zeros_like(b1) if (need_b1 and b1 is not None) else None
    grad_xs = None
    if need_xs_grad:
        grad_xs = scratch("up_grad_xs", (live + 1, x.shape[1]), x.dtype, x.device)  # row `live`: zero, read by empty slots
        grad_xs[live].zero_()
        for expert, start, end in runs:
            rows = slice(start, end)
            _gemm(grad_xs[rows], grad_h[rows], _first(w1, expert, spec).t())
    if need_w1 or grad_b1 is not None:
        xs = _gathered_input(x, row_token, row_slot, weights, live, spec) if need_w1 else None
        for expert, start, end in runs:
            rows = slice(start, end)
            dh = grad_h[rows]
            if need_w1:
                if spec.transposed:  # w1[e] is [H, N1]: ∂ = xsᵀ dh
                    torch.mm(xs[rows].t(), dh, out=grad_w1[expert])
                else:  # [N1, H]: ∂ = dhᵀ xs
                    torch.mm(dh.t(), xs[rows], out=grad_w1[expert])
            if grad_b1 is not None:
                grad_b1[expert] = dh.sum(dim=0)
    for _, start, end in runs:
        note_gemm_rows(end - start)
    grad_x = grad_weights = None
    acc = accumulation_dtype(x.dtype)
    if need_weights:
        grad_weights = torch.zeros(weights.numel(), dtype=acc, device=x.device)
        if on_input:
            x_rows = x.index_select(0, row_token[:live]).to(acc)
            grad_weights.index_copy_(0, row_slot[:live], (grad_xs[:live].to(acc) * x_rows).sum(dim=1))
        grad_weights = grad_weights.view(weights.shape).to(weights.dtype)
    if need_x:
        slot_weights = weights if on_input else None
        grad_x = _sum_rows_per_token(grad_xs, slot_weights, _slot_rows(row_slot, live), num_tokens, slots)
    return grad_x, grad_weights, grad_w1, grad_b1
