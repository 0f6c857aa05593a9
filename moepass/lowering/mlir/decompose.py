"""``moepass.moe_block`` as aten ops that torch-mlir lowers: the decomposition table of the MLIR export.

torch-mlir imports an op it does not know as ``torch.operator``, which no
lowering pipeline legalises, so every fused block is decomposed before import:
``moepass.route`` is already a composite of standard ops (it decomposes by
itself), and the experts get one of two forms.

``grouped`` (default): dropped slots cost no work::

    flat  = ids.view(-1)                               [S = T·k_max] slots, sentinel E = dropped
    count = Σ_s (flat == e)    start = cumsum - count  [E + 1]
    order = scatter(start[flat] + rank within expert)  slots grouped by expert, dropped ones last
    for e in 0..E-1:                                   (unrolled: E is static)
        s, n = start[e].item(), max(count[e], 1).item()     data-dependent row count
        rows = order[s : s + n]                        the slots routed to e (or the padding slot)
        y    = W2[e] · act(W1[e] · x[rows // k_max])   [n, H]: the expert's GEMMs on its own rows only
        out  = index_add(out, rows // k_max, y · w[rows])

  A dropped slot (id E) sorts after every expert's range, so it is in no
  expert's rows: it costs no GEMM row and its token's row of x is never
  read.  An expert that no slot picked runs one padding row (a zero row at
  weight 0, into an output row that is cut off), because IREE's CPU matmul
  crashes on a 0-row dynamic operand (iree-base-compiler 3.13).  All row
  counts are read in one go before the first expert runs (one host readback).

``dense``: static shapes only (for targets without data-dependent sizes)::

    h   = act(x · W1[e]ᵀ) for every expert e          [E, T, N1]: every expert on every token
    out = Σ_e dense[:, e] · (h[e] · W2[e]ᵀ)            dense[t, e] = Σ_slots w · (id == e)

  E / k_max times the work of static routing, whatever the policy drops.

Activations go through :func:`moepass.lowering.activations.apply_activation`,
exactly as every other lowering.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from moepass.lowering.activations import apply_activation

from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.ops import parse_experts_config, parse_route_config

__all__ = ["FORMS", "decomposition_table", "experts_dense", "experts_grouped", "moe_block_aten", "topk_by_argmax"]

#: The experts forms, by name.
FORMS = ("grouped", "dense")


def _first(w1: torch.Tensor, expert: int, spec: ExpertsSpec) -> torch.Tensor:
    """[H, N1] first-projection matrix of one expert."""
    return w1[expert] if spec.transposed else w1[expert].t()


def _second(w2: torch.Tensor, expert: int, spec: ExpertsSpec) -> torch.Tensor:
    """[I, H] second-projection matrix of one expert."""
    return w2[expert] if spec.transposed else w2[expert].t()


def experts_grouped(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    spec: ExpertsSpec,
) -> torch.Tensor:
    """The experts op with each expert's GEMMs on the rows routed to it (data-dependent row counts)."""
    num_tokens, depth = ids.shape
    hidden = x.shape[1]
    flat = ids.reshape(-1).clamp(0, spec.num_experts)  # every id ≥ E (empty, zero-computation) is the sentinel
    num_slots = flat.shape[0]
    slot = torch.arange(num_slots, device=ids.device)
    # slots grouped by expert (the sentinel E last), in slot order within an expert: a counting sort.
    # (torch.sort would do, but IREE 3.13 cannot compile a sort of dynamic length: unbounded stack allocation)
    picked = (flat.unsqueeze(1) == torch.arange(spec.num_experts + 1, device=ids.device)).long()  # [S, E + 1]
    counts_all = picked.sum(0)
    starts_all = counts_all.cumsum(0) - counts_all
    rank = (picked.cumsum(0) * picked).sum(1) - 1  # earlier slots of the same expert
    position = starts_all.index_select(0, flat) + rank
    order = torch.zeros_like(slot).scatter(0, position, slot)
    # one padding slot past the end, read by an expert no slot picked: token num_tokens (a zero row of x,
    # an output row that is cut off), weight 0.  Padding never reads a real token, dropped or not.
    padding = num_slots
    order = torch.cat([order, order.new_full((1,), padding)])
    counts, starts = counts_all[: spec.num_experts], starts_all[: spec.num_experts]
    rows_run = counts.clamp(min=1)  # IREE's CPU matmul crashes on 0 rows: an unpicked expert runs the padding row
    x_padded = torch.cat([x, x.new_zeros(1, hidden)])
    w_padded = torch.cat([weights.reshape(-1).float(), weights.new_zeros(1, dtype=torch.float32)])
    out = torch.zeros(num_tokens + 1, hidden, dtype=torch.float32, device=x.device)
    # every expert's bounds read at once, before any expert runs: one host readback in IREE, not one per expert
    bounds = torch.cat([starts, rows_run]).tolist()
    for expert in range(spec.num_experts):
        start, length = bounds[expert], bounds[spec.num_experts + expert]
        torch._check(start >= 0)
        torch._check(length >= 1)
        torch._check(start + length <= num_slots + 1)
        live = torch.arange(length, device=ids.device) < counts[expert]
        slots = torch.where(live, order.narrow(0, start, length), padding)
        tokens = torch.div(slots, depth, rounding_mode="floor")
        scale = w_padded.index_select(0, slots)
        rows = x_padded.index_select(0, tokens)
        if spec.weight_on_input:
            rows = (rows.float() * scale.unsqueeze(1)).to(x.dtype)
        h = rows @ _first(w1, expert, spec)
        if b1 is not None:
            h = h + b1[expert]
        y = apply_activation(h, spec) @ _second(w2, expert, spec)
        if b2 is not None:
            y = y + b2[expert]
        if not spec.weight_on_input:
            y = y.float() * scale.unsqueeze(1)
        out = out.index_add(0, tokens, y.float())
    return out[:num_tokens].to(x.dtype)


def experts_dense(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    spec: ExpertsSpec,
) -> torch.Tensor:
    """The experts op with every expert on every token, weighted by a dense [T, E] matrix (static shapes)."""
    num_experts = spec.num_experts
    # one_hot over E + 1 classes: the sentinel E lands in the last column, which is dropped
    picked = torch.nn.functional.one_hot(ids.clamp(0, num_experts), num_experts + 1)[..., :num_experts].float()
    dense = (picked * weights.float().unsqueeze(-1)).sum(1)  # [T, E]
    gate = dense.t().unsqueeze(-1)  # [E, T, 1]
    first = w1 if spec.transposed else w1.transpose(1, 2)  # [E, H, N1]
    second = w2 if spec.transposed else w2.transpose(1, 2)  # [E, I, H]
    if spec.weight_on_input:
        rows = (x.float().unsqueeze(0) * gate).to(x.dtype)  # [E, T, H]
    else:
        rows = x.unsqueeze(0).expand(num_experts, -1, -1)
    h = torch.bmm(rows, first)
    if b1 is not None:
        h = h + b1.unsqueeze(1)
    y = torch.bmm(apply_activation(h, spec), second)
    if b2 is not None:
        y = y + b2.unsqueeze(1)
    if spec.weight_on_input:
        y = y.float() * (gate > 0).float()  # a token that did not pick e gets no bias output from it
    else:
        y = y.float() * gate
    return y.sum(0).to(x.dtype)


_EXPERTS: dict[str, Callable[..., torch.Tensor]] = {"grouped": experts_grouped, "dense": experts_dense}


def moe_block_aten(
    x: torch.Tensor,
    logits: torch.Tensor,
    route_tensors: list[torch.Tensor],
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    route_config: str,
    experts_config: str,
    *,
    form: str = "grouped",
) -> torch.Tensor:
    """``moepass.moe_block`` in aten ops: the route composite, then the experts in ``form``."""
    uses_x = parse_route_config(route_config).uses_x
    ids, weights = torch.ops.moepass.route(logits, x if uses_x else None, route_tensors, route_config)
    spec = parse_experts_config(experts_config).spec
    out = _EXPERTS[form](x, ids, weights, w1, w2, b1, b2, spec)
    if spec.zero_compute:  # a composite of aten ops: identity slots add w·x, no GEMM
        kinds = ",".join(spec.zero_compute)
        out = out + torch.ops.moepass.zero_compute_experts(x, ids, weights, spec.num_experts, kinds, None)
    return out


def topk_by_argmax(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """``torch.topk`` as k rounds of argmax, each masking its winner: for stablehlo, where torch-mlir's
    ``chlo.top_k`` (int64 indices) and ``stablehlo.sort`` do not compile in IREE 3.13.

    Ties go to the lowest index, as torch's CPU top-k; k is small (a router's k_max, or 2).
    """
    scores = x if largest else -x
    positions = torch.arange(x.shape[dim], device=x.device).view([-1] + [1] * (x.ndim - 1 - dim % x.ndim))
    taken = torch.full_like(scores, float("-inf"))
    values, indices = [], []
    for _ in range(k):
        index = scores.argmax(dim, keepdim=True)
        values.append(x.gather(dim, index))
        indices.append(index)
        scores = torch.where(positions == index, taken, scores)
    return torch.cat(values, dim), torch.cat(indices, dim)


def decomposition_table(form: str = "grouped", output_type: str = "linalg-on-tensors") -> dict:
    """torch-mlir's default decompositions plus ``moepass.moe_block`` → aten in ``form``.

    For stablehlo, ``topk`` too becomes :func:`topk_by_argmax`.
    """
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table

    if form not in FORMS:
        raise ValueError(f"unknown experts form {form!r}; expected one of {', '.join(FORMS)}")
    table = dict(get_decomposition_table())  # a table passed to the importer replaces its default: merge
    table[torch.ops.moepass.moe_block.default] = functools.partial(moe_block_aten, form=form)
    if output_type == "stablehlo":
        table[torch.ops.aten.topk.default] = topk_by_argmax
    return table
