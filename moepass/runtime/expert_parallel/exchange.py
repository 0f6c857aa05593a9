"""The expert-parallel experts: exchange only the kept slots, run the local experts, combine.

Forward, on each rank of an expert group of ``R`` ranks (``E`` experts, ``E/R``
a rank, ``T`` tokens with ``K`` slots each on this rank)::

    ids [T,K] ──► kept slots        ids in [0, E): dropped slots (id E), null experts,
                                    zero-computation experts (ids ≥ E) are not kept
              ──► plan_slots         kept slots sorted by expert = by owner rank (stable)
    counts    ──► all_to_all #1      [R, E/R + 3] int64: rows per (owner, local expert) and a
                                    header (fingerprint, call, status) every rank checks
    x rows    ──► all_to_all #2      one row per kept slot, to its expert's owner
                  local experts      the received rows on this rank's E/R experts, through
                                    the usual lowering (cpu | triton | reference), top-1, weight 1
    y rows    ──► all_to_all #3      back to the ranks the rows came from, in send order
                  combine            out[t] = Σ_j w[t,j] · y[slot]   (float32 accumulation,
                                    the single-process CPU lowering's combine, slot order)

So the bytes a rank sends per layer are ``2 · (kept remote slots) · H · b`` plus
``(R−1) · (E/R + 3) · 8`` for the counts: linear in the average k.  Every rank
makes all three exchanges even with no rows (a rank with no tokens, or whose
tokens all dropped), so no rank waits for one that skipped.

The backward (:func:`experts_backward`) re-plans, sends each kept slot's token
row, its output gradient and its routing weight in one exchange, recomputes the
local experts and differentiates them with the single-process split form's own
functions, and returns each row's input gradient and routing-weight gradient
in a second.

The header's fingerprint is a hash of the call (block, experts, routing policy,
direction): ranks that compiled different policies, run different blocks or
call forward and backward out of step get an :class:`ExpertParallelError` on
every rank at the first exchange, instead of exchanging mismatched rows or
waiting forever.

While the backend compiles (:func:`without_communication`), an expert-parallel
call runs its local experts only and communicates nothing: validation compares
two such calls, and nothing collective runs at compile time.

Empty slots written as a repeated expert at weight 0, or as the model's own
expert at weight -0.0 (``moepass.route`` for a router rewritten alone, its
experts in another graph), are recognised and not sent either: a slot whose weight is 0 and whose expert
an earlier slot of the same token already names adds exactly nothing.

On CUDA tensors (NCCL) the same code runs: the header and the rows are
exchanged on the device, the split sizes and the header check are read back
to the host (one synchronisation per call, as transformers' ``all_to_all``
has; no CUDA-graph capture), ``plan_slots`` takes its torch path, and the
local experts run the Triton lowering (``lowering="auto"``) — written and
reviewed, not run: no machine with two GPUs was available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
from moepass.lowering.activations import apply_activation
from moepass.lowering.cpu import SlotPlan, combine_rows, plan_slots
from moepass.lowering.grouped import (
    accumulation_dtype,
    down_backward,
    expert_rows,
    token_ordered,
    up_backward,
    up_forward,
)

from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.expert_parallel.group import ExpertParallelError, ExpertParallelGroup, group_for
from moepass.runtime.expert_parallel.traffic import note_exchange

__all__ = ["experts_forward", "experts_backward", "without_communication", "communicating", "kept_slots"]

_FORWARD, _BACKWARD = 1, 2
#: Header columns after the counts: fingerprint, call kind, status (0 ok, 1 this rank failed a check).
_HEADER = 3

_state = threading.local()


@contextlib.contextmanager
def without_communication() -> Iterator[None]:
    """Inside: expert-parallel calls run their local experts only and exchange nothing (compile time)."""
    _state.quiet = getattr(_state, "quiet", 0) + 1
    try:
        yield
    finally:
        _state.quiet -= 1


def communicating() -> bool:
    """False inside :func:`without_communication`."""
    return not getattr(_state, "quiet", 0)


@dataclass(frozen=True)
class _Layout:
    group: ExpertParallelGroup
    num_experts: int
    local_experts: int
    #: The experts of this rank as the local lowering runs them (E/R experts, weights on the output).
    local_spec: ExpertsSpec
    #: Why this rank cannot take part ("" when it can); reported to every rank through the header.
    problem: str = ""

    @property
    def first(self) -> int:
        return self.group.rank * self.local_experts


def _layout(cfg, w1: torch.Tensor) -> _Layout:
    group = group_for(cfg.expert_parallel)
    spec = cfg.spec
    if spec.num_experts % group.size:
        raise ExpertParallelError(
            f"block {cfg.block or '<root>'}: {spec.num_experts} experts cannot be split over the "
            f"{group.size} ranks of its expert-parallel group (E must be a multiple of the EP size)"
        )
    local = spec.num_experts // group.size
    problem = ""
    if w1.shape[0] != local:
        problem = (
            f"block {cfg.block or '<root>'}: rank {group.rank} holds {w1.shape[0]} experts, expected "
            f"{spec.num_experts} / {group.size} = {local}"
        )
    local_spec = dataclasses.replace(spec, num_experts=local, weight_on_input=False, zero_compute=())
    return _Layout(group, spec.num_experts, local, local_spec, problem)


def _fingerprint(cfg, kind: int) -> int:
    data = dataclasses.asdict(cfg)
    data.pop("collect_stats", None)
    digest = hashlib.blake2b(json.dumps([data, kind], sort_keys=True).encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def kept_slots(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``ids`` with every slot that needs no expert row as ``num_experts`` (the sentinel).

    Not kept: ids outside [0, E) (dropped slots, null experts, zero-computation
    experts), slots that repeat an earlier slot's expert of the same token at
    weight 0 (an empty slot written as a repeated expert), and slots at weight
    -0.0 (how ``moepass.route`` drops a slot whose ids a router-only rewrite
    leaves as the model's own: the router in another graph).
    """
    valid = (ids >= 0) & (ids < num_experts) & ~((weights == 0) & torch.signbit(weights))
    if ids.shape[1] > 1:
        repeats = torch.zeros_like(valid)
        for j in range(1, ids.shape[1]):
            repeats[:, j] = (ids[:, j : j + 1] == ids[:, :j]).any(dim=1)
        valid &= ~(repeats & (weights == 0))
    return torch.where(valid, ids, torch.full_like(ids, num_experts))


@dataclass
class _Exchange:
    """Who sends what to whom for one call."""

    slots: SlotPlan
    #: Rows to / from each rank of the group.
    send_sizes: list[int]
    recv_sizes: list[int]
    #: [R, E/R]: rows from each rank for each local expert.
    recv_counts: torch.Tensor

    def local_ids(self, layout: _Layout) -> torch.Tensor:
        """[S_recv, 1] the local expert of every received row (rows arrive by source, then by expert)."""
        experts = torch.arange(layout.local_experts, device=self.recv_counts.device).repeat(layout.group.size)
        total = sum(self.recv_sizes)
        return torch.repeat_interleave(experts, self.recv_counts.reshape(-1), output_size=total).unsqueeze(1)


def _plan_exchange(
    ids, weights, cfg, layout: _Layout, kind: int, element_bytes: int, dispatch_width: int, combine_width: int
) -> _Exchange:
    """Plan this rank's kept slots and swap row counts (and the header) with the group."""
    import torch.distributed as dist

    group = layout.group
    slots = plan_slots(kept_slots(ids, weights, layout.num_experts), layout.num_experts)
    header = torch.zeros(group.size, layout.local_experts + _HEADER, dtype=torch.int64)
    if not layout.problem:
        header[:, : layout.local_experts] = torch.tensor(slots.counts, dtype=torch.int64).view(group.size, -1)
    header[:, -3] = _fingerprint(cfg, kind)
    header[:, -2] = kind
    header[:, -1] = 1 if layout.problem else 0
    header = header.to(ids.device)
    received = torch.empty_like(header)
    dist.all_to_all_single(received, header, group=group.group)
    _check_header(received.cpu(), header[0].cpu(), cfg, layout)
    recv_counts = received[:, : layout.local_experts]
    send_sizes = header[:, : layout.local_experts].sum(dim=1).tolist()
    recv_sizes = recv_counts.sum(dim=1).tolist()
    others = [r for r in range(group.size) if r != group.rank]
    note_exchange(
        tokens=ids.shape[0],
        rows_sent=sum(send_sizes[r] for r in others),
        rows_local=send_sizes[group.rank],
        rows_received=sum(recv_sizes[r] for r in others),
        dispatch_bytes=sum(send_sizes[r] for r in others) * dispatch_width * element_bytes,
        combine_bytes=sum(recv_sizes[r] for r in others) * combine_width * element_bytes,
        counts_bytes=len(others) * header.shape[1] * 8,
    )
    return _Exchange(slots, send_sizes, recv_sizes, recv_counts)


def _check_header(received: torch.Tensor, mine: torch.Tensor, cfg, layout: _Layout) -> None:
    """Every rank raises the same error when any rank failed a check or runs a different call."""
    if layout.problem:
        raise ExpertParallelError(layout.problem)
    failed = [r for r in range(received.shape[0]) if int(received[r, -1]) != 0]
    if failed:
        raise ExpertParallelError(
            f"block {cfg.block or '<root>'}: rank(s) {failed} of the expert-parallel group could not run their "
            "part of the exchange (see their error)"
        )
    differ = [r for r in range(received.shape[0]) if not torch.equal(received[r, -3:-1], mine[-3:-1])]
    if differ:
        call = "forward" if int(mine[-2]) == _FORWARD else "backward"
        raise ExpertParallelError(
            f"block {cfg.block or '<root>'} ({call}): rank(s) {differ} of the expert-parallel group run a different "
            "call (another block, routing policy, experts or direction); every rank must compile the model with the "
            "same options and call it the same number of times"
        )


def _exchange_rows(rows: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group, out=None) -> torch.Tensor:
    """all_to_all of variable row counts: ``rows`` [Σ send, W] → [Σ recv, W]."""
    import torch.distributed as dist

    if out is None:
        out = rows.new_empty(sum(recv_sizes), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), recv_sizes, send_sizes, group=group)
    return out


def _run_local(rows: torch.Tensor, local_ids: torch.Tensor, w1, w2, b1, b2, cfg, layout: _Layout) -> torch.Tensor:
    """The received rows through this rank's experts (top-1, weight 1) on the configured lowering."""
    from moepass.lowering import run_experts

    local_cfg = dataclasses.replace(
        cfg, spec=layout.local_spec, expert_parallel="", routing_fingerprint="", collect_stats=False
    )
    ones = torch.ones(rows.shape[0], 1, dtype=torch.float32, device=rows.device)
    return run_experts(rows, local_ids, ones, w1, w2, b1, b2, local_cfg)


def _batch_rows(num_tokens: int, group: ExpertParallelGroup) -> tuple[slice, int]:
    """This rank's slice of a batch its batch group shares (``torch.chunk``'s split), and the chunk size."""
    chunk = -(-num_tokens // group.batch_size) if num_tokens else 0
    start = min(group.batch_rank * chunk, num_tokens)
    return slice(start, min(start + chunk, num_tokens)), chunk


def _gather_batch(part: torch.Tensor, num_tokens: int, chunk: int, group: ExpertParallelGroup) -> torch.Tensor:
    """The slices of the batch group back into one [T, ...] tensor on every rank."""
    import torch.distributed as dist

    padded = part.new_zeros(chunk, *part.shape[1:])
    padded[: part.shape[0]] = part
    whole = part.new_empty(chunk * group.batch_size, *part.shape[1:])
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(whole, padded, group=group.batch_group)
    return whole[:num_tokens]


def _local_only(x, ids, weights, w1, w2, b1, b2, cfg, layout: _Layout) -> torch.Tensor:
    """Compile time: the contribution of this rank's experts alone, no communication."""
    from moepass.lowering import run_experts

    inside = (ids >= layout.first) & (ids < layout.first + layout.local_experts)
    local_ids = torch.where(inside, ids - layout.first, torch.full_like(ids, layout.local_experts))
    spec = dataclasses.replace(layout.local_spec, weight_on_input=cfg.spec.weight_on_input)
    local_cfg = dataclasses.replace(cfg, spec=spec, expert_parallel="", routing_fingerprint="", collect_stats=False)
    return run_experts(x, local_ids, weights, w1, w2, b1, b2, local_cfg)


def experts_forward(x, ids, weights, w1, w2, b1, b2, cfg) -> torch.Tensor:
    """The ``moepass.experts`` op of an expert-parallel block: [T, H] on every rank for its own tokens.

    ``w1``/``w2``/``b1``/``b2`` hold this rank's ``E/R`` experts; ``ids`` are
    global expert ids (``cfg.spec.num_experts`` = E).
    """
    layout = _layout(cfg, w1)
    if not communicating():
        return _local_only(x, ids, weights, w1, w2, b1, b2, cfg, layout)
    group = layout.group
    if group.batch_size == 1:
        return _forward(x, ids, weights, w1, w2, b1, b2, cfg, layout)
    rows, chunk = _batch_rows(x.shape[0], group)
    part = _forward(x[rows], ids[rows], weights[rows], w1, w2, b1, b2, cfg, layout)
    return _gather_batch(part, x.shape[0], chunk, group)


def _forward(x, ids, weights, w1, w2, b1, b2, cfg, layout: _Layout) -> torch.Tensor:
    spec, hidden = cfg.spec, x.shape[1]
    plan = _plan_exchange(ids, weights, cfg, layout, _FORWARD, x.element_size(), hidden, hidden)
    slots = plan.slots
    sent = x.index_select(0, slots.row_token)
    if spec.weight_on_input:  # Llama 4: the expert runs on w · x, weighted here as the local lowering would
        acc = accumulation_dtype(x.dtype)
        row_weights = weights.reshape(-1).index_select(0, slots.row_slot).to(acc).unsqueeze(1)
        sent = (sent.to(acc) * row_weights).to(x.dtype)
    group = layout.group.group
    received = _exchange_rows(sent, plan.send_sizes, plan.recv_sizes, group)
    outputs = _run_local(received, plan.local_ids(layout), w1, w2, b1, b2, cfg, layout)
    back = x.new_empty(slots.rows + 1, hidden)
    _exchange_rows(outputs.to(x.dtype), plan.recv_sizes, plan.send_sizes, group, out=back[: slots.rows])
    back[slots.rows].zero_()  # the row empty slots read
    return combine_rows(back, weights, slots, spec)


def experts_backward(grad_out, x, ids, weights, w1, w2, b1, b2, cfg, needs) -> list[torch.Tensor | None]:
    """Gradients of :func:`experts_forward` for (x, weights, w1, w2, b1, b2); None where ``needs`` is False.

    The local experts' gradients cover every row any rank sent them; ``x`` and
    ``weights`` get their gradients on the rank that holds the token.
    """
    layout = _layout(cfg, w1)
    if not communicating():
        raise ExpertParallelError("an expert-parallel backward ran while compiling (a moepass bug)")
    group = layout.group
    if group.batch_size == 1:
        return _backward(grad_out, x, ids, weights, w1, w2, b1, b2, cfg, layout, needs)
    rows, chunk = _batch_rows(x.shape[0], group)
    grads = _backward(grad_out[rows], x[rows], ids[rows], weights[rows], w1, w2, b1, b2, cfg, layout, needs)
    for i in (0, 1):  # the token-side gradients, gathered back over the batch group
        if grads[i] is not None:
            grads[i] = _gather_batch(grads[i], x.shape[0], chunk, group)
    return grads


def _autograd_inside_op():
    """Autograd for the activation's gradient inside the backward op's kernel.

    A custom op's kernel runs with the autograd dispatch keys excluded, so no
    graph would be recorded; the activation may be any elementwise program
    (lifted from the model), whose gradient autograd knows.  torch's own
    leaf-function op re-includes the keys the same way.
    """
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _packed(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, 1] values in the accumulation dtype as columns of ``dtype`` (their bits), to travel with rows of it."""
    return values.contiguous().view(dtype) if values.dtype != dtype else values


def _unpacked(columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return columns.contiguous().view(dtype) if columns.dtype != dtype else columns


def _backward(grad_out, x, ids, weights, w1, w2, b1, b2, cfg, layout: _Layout, needs) -> list[torch.Tensor | None]:
    """The backward of :func:`_forward`, by the single-process split form's own formulas.

    Each kept slot's token row, its output gradient and its routing weight go to
    the expert's owner, which runs ``up_forward`` → activation →
    ``down_backward`` → ``up_backward`` on the rows it received as tokens of one
    slot each — the functions and accumulation order one process uses — and
    returns each row's input gradient and routing-weight gradient.
    """
    need_x, need_weights, need_w1, need_w2, need_b1, need_b2 = needs
    dtype, hidden, acc = x.dtype, x.shape[1], accumulation_dtype(x.dtype)
    columns = acc.itemsize // dtype.itemsize  # a routing weight as columns of the rows' dtype
    kind = _BACKWARD + 4 * sum(1 << i for i, need in enumerate(needs) if need)
    back_width = hidden * int(need_x) + columns * int(need_weights)
    plan = _plan_exchange(ids, weights, cfg, layout, kind, x.element_size(), 2 * hidden + columns, back_width)
    slots = plan.slots
    row_weights = weights.reshape(-1).index_select(0, slots.row_slot).to(acc).unsqueeze(1)
    sent = torch.cat([
        x.index_select(0, slots.row_token), grad_out.to(dtype).index_select(0, slots.row_token),
        _packed(row_weights, dtype),
    ], dim=1)
    group = layout.group.group
    received = _exchange_rows(sent, plan.send_sizes, plan.recv_sizes, group)
    recv_x, recv_g = received[:, :hidden].contiguous(), received[:, hidden : 2 * hidden].contiguous()
    recv_weights = _unpacked(received[:, 2 * hidden :], acc)  # [S_recv, 1]

    # this rank's experts on the rows it received, one slot each, forward again and backward
    spec = dataclasses.replace(layout.local_spec, weight_on_input=cfg.spec.weight_on_input)
    row_token, row_slot, offsets = expert_rows(plan.local_ids(layout), layout.local_experts)
    h = up_forward(recv_x, row_token, row_slot, offsets, recv_weights, w1, b1, spec)
    with _autograd_inside_op(), torch.enable_grad():
        h_leaf = h.detach().requires_grad_(True)
        a = apply_activation(h_leaf, spec)
    grad_a, down_weights, grad_w2, grad_b2 = down_backward(
        recv_g, a.detach(), row_token, row_slot, offsets, recv_weights, w2, b2, spec,
        (True, need_weights, need_w2, need_b2),
    )
    with _autograd_inside_op():
        (grad_h,) = torch.autograd.grad(a, h_leaf, grad_a)
    grad_rows, up_weights, grad_w1, grad_b1 = up_backward(
        grad_h, recv_x, row_token, row_slot, offsets, recv_weights, w1, b1, spec,
        (need_x, need_weights, need_w1, need_b1),
    )

    # back to the senders: each row's input gradient, its routing weight's gradient
    parts = [grad_rows.to(dtype)] if need_x else []
    if need_weights:
        parts.append(_packed((down_weights.to(acc) + up_weights.to(acc)).reshape(-1, 1), dtype))
    grad_x = grad_weights = None
    if parts:
        back = _exchange_rows(torch.cat(parts, dim=1), plan.recv_sizes, plan.send_sizes, group)
        num_tokens, depth = weights.shape
        if need_x:  # each token's slot rows summed in slot order, as one process sums them
            rows = x.new_zeros(slots.rows + 1, hidden)
            rows[: slots.rows] = back[:, :hidden]
            ordered = token_ordered(rows, slots.slot_row, num_tokens, depth)
            grad_x = ordered.sum(dim=1) if depth > 1 else ordered[:, 0].clone()
        if need_weights:
            per_row = _unpacked(back[:, hidden * int(need_x) :], acc).reshape(-1)
            grad_weights = torch.zeros(weights.numel(), dtype=acc, device=x.device)
            grad_weights.index_copy_(0, slots.row_slot, per_row)
            grad_weights = grad_weights.view(weights.shape).to(weights.dtype)
    return [grad_x, grad_weights, grad_w1, grad_w2, grad_b1, grad_b2]
