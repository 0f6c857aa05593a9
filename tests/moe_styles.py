"""Small MoE blocks written the ways research and remote code write them (not transformers).

Each class is one style of writing the same computation — a router picks
experts per token, the experts are gated MLPs, their outputs are summed with
the routing weights — so tests can check that moepass finds each by what it
computes:

* :class:`WhereLoopMoE` — a ``ModuleList`` of experts and a Python loop over
  them with ``torch.where(selected == e)``;
* :class:`GatheredEinsumMoE` — stacked expert weights gathered per token by
  the selected ids and contracted with ``einsum``;
* :class:`GatheredBmmMoE` — the same with weights stored ``[E, in, out]`` and
  a ``bmm`` per slot;
* :class:`ArgmaxMoE` — top-1 by ``argmax`` with a boolean-masked loop;
* :class:`DenseGateMoE` — every expert on every token, combined through a
  ``[T, E]`` gate matrix that is zero outside the top-k (:class:`DenseEinsumMoE`:
  the same over stacked weights, one ``einsum`` for all experts);
* :class:`RemoteDeepseekV2MoE` — the remote-code style of DeepSeek-V2
  (``trust_remote_code``): a gate module with greedy or group-limited top-k,
  experts sorted by id with per-expert counts taken by ``scatter_`` of ones and
  moved to the host (``.cpu().numpy()``), a loop over the experts' rows, and
  shared experts.

Written for these tests; no code is taken from the models they imitate.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatedExpert(nn.Module):
    """down(silu(gate(x)) * up(x)): the expert every style below uses (three ``nn.Linear``)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter, bias=False)
        self.up_proj = nn.Linear(dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PlainExpert(nn.Module):
    """fc2(gelu(fc1(x))): an ungated expert (two ``nn.Linear`` with biases)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, inter)
        self.fc2 = nn.Linear(inter, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return module


class WhereLoopMoE(nn.Module):
    """Style 1: ``for e, expert in enumerate(self.experts): rows, slot = torch.where(selected == e)``."""

    def __init__(self, dim=16, inter=32, num_experts=6, top_k=2, expert=GatedExpert, seed=0):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(expert(dim, inter) for _ in range(num_experts))
        _randomize(self, seed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = hidden.reshape(-1, hidden.shape[-1])
        probs = torch.softmax(self.router(tokens), dim=-1, dtype=torch.float32)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(tokens.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(selected == e)
            out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot].unsqueeze(-1))
        return out.reshape(hidden.shape)


class GatedMatrices(nn.Module):
    """Stacked expert weights ``w_in`` [E, 2I, H] (gate rows, then up rows) and ``w_out`` [E, H, I]."""

    def __init__(self, dim, inter, num_experts, transposed=False):
        super().__init__()
        shape_in, shape_out = ((num_experts, dim, 2 * inter), (num_experts, inter, dim)) if transposed else (
            (num_experts, 2 * inter, dim), (num_experts, dim, inter))
        self.w_in = nn.Parameter(torch.empty(shape_in))
        self.w_out = nn.Parameter(torch.empty(shape_out))


class GatedExpertsInEinsum(nn.Module):
    """The ``experts`` of :class:`GatheredEinsumMoE`: a module of its own, like remote code writes it."""

    def __init__(self, dim, inter, num_experts):
        super().__init__()
        self.weights = GatedMatrices(dim, inter, num_experts)

    def forward(self, tokens, selected, weights):
        w_in = self.weights.w_in[selected]                                # [T, k, 2I, H]
        h = torch.einsum("th,tkfh->tkf", tokens, w_in)
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, self.weights.w_out[selected])
        return torch.einsum("tkh,tk->th", y, weights)


class GatheredEinsumMoE(nn.Module):
    """Style 2a: top-k → softmax over the k; each slot's expert weights gathered, GEMMs as ``einsum``."""

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x``, written plainly (for per-token references)."""
        gate, up = (x @ self.experts.weights.w_in[e].T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.experts.weights.w_out[e].T

    def __init__(self, dim=16, inter=32, num_experts=6, top_k=2, seed=0):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = GatedExpertsInEinsum(dim, inter, num_experts)
        _randomize(self, seed)

    def forward(self, hidden):
        tokens = hidden.reshape(-1, hidden.shape[-1])
        logits, selected = self.gate(tokens).topk(self.top_k, dim=-1)
        weights = logits.softmax(dim=-1)
        return self.experts(tokens, selected, weights).view_as(hidden)


class GatheredBmmMoE(nn.Module):
    """Style 2b: weights stored [E, in, out] (``x @ W``), gathered per slot and run by ``bmm``."""

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x``, written plainly (for per-token references)."""
        gate, up = (x @ self.mats.w_in[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.mats.w_out[e]

    def __init__(self, dim=16, inter=32, num_experts=6, top_k=2, seed=0):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.mats = GatedMatrices(dim, inter, num_experts, transposed=True)
        _randomize(self, seed)

    def forward(self, hidden):
        tokens = hidden.reshape(-1, hidden.shape[-1])
        probs = torch.softmax(self.gate(tokens), dim=-1)
        weights, selected = probs.topk(self.top_k, dim=-1)
        flat = selected.reshape(-1)
        rows = tokens.repeat_interleave(self.top_k, dim=0).unsqueeze(1)    # [T·k, 1, H]
        h = torch.bmm(rows, self.mats.w_in[flat])                          # [T·k, 1, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, self.mats.w_out[flat]).squeeze(1)  # [T·k, H]
        y = y.view(-1, self.top_k, tokens.shape[-1]) * weights.unsqueeze(-1)
        return y.sum(dim=1).view_as(hidden)


class ArgmaxMoE(nn.Module):
    """Style 3: top-1 chosen by ``argmax``, weight the chosen probability, a boolean-masked loop."""

    def __init__(self, dim=16, inter=32, num_experts=6, seed=0):
        super().__init__()
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(GatedExpert(dim, inter) for _ in range(num_experts))
        _randomize(self, seed)

    def forward(self, hidden):
        tokens = hidden.reshape(-1, hidden.shape[-1])
        probs = self.router(tokens).softmax(dim=-1)
        best = probs.argmax(dim=-1)
        weight = probs.gather(-1, best.unsqueeze(-1))
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            mask = best == e
            out[mask] = expert(tokens[mask]) * weight[mask]
        return out.view_as(hidden)


class DenseGateMoE(nn.Module):
    """Style 4: every expert runs on every token; a [T, E] gate matrix, zero outside the top-k, combines them."""

    def __init__(self, dim=16, inter=32, num_experts=6, top_k=2, seed=0):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(GatedExpert(dim, inter) for _ in range(num_experts))
        _randomize(self, seed)

    def forward(self, hidden):
        tokens = hidden.reshape(-1, hidden.shape[-1])
        probs = torch.softmax(self.router(tokens), dim=-1)
        top, selected = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, selected, top / top.sum(-1, keepdim=True))
        every = torch.stack([expert(tokens) for expert in self.experts], dim=1)   # [T, E, H]
        return torch.einsum("te,teh->th", gates, every).view_as(hidden)


class DenseEinsumMoE(nn.Module):
    """Style 4, stacked: every expert on every token as one ``einsum`` over [E, ., .] weights, a gate matrix."""

    def __init__(self, dim=16, inter=32, num_experts=6, top_k=2, seed=0):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.mats = GatedMatrices(dim, inter, num_experts)
        _randomize(self, seed)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x``, written plainly (for per-token references)."""
        gate, up = (x @ self.mats.w_in[e].T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.mats.w_out[e].T

    def forward(self, hidden):
        tokens = hidden.reshape(-1, hidden.shape[-1])
        probs = self.router(tokens).softmax(dim=-1)
        top, selected = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, selected, top)              # no renormalisation
        gate, up = torch.einsum("th,efh->tef", tokens, self.mats.w_in).chunk(2, dim=-1)
        every = torch.einsum("tei,ehi->teh", F.silu(gate) * up, self.mats.w_out)
        return torch.einsum("te,teh->th", gates, every).view_as(hidden)


class RemoteGate(nn.Module):
    """DeepSeek-V2's remote-code gate, re-written: softmax scores, greedy or group-limited top-k."""

    def __init__(self, dim, num_experts, top_k, n_group=1, topk_group=1, norm_topk_prob=False, scaling=1.0):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, scaling
        self.weight = nn.Parameter(torch.empty(num_experts, dim))

    def forward(self, hidden):
        batch, length, dim = hidden.shape
        scores = F.linear(hidden.view(-1, dim), self.weight).softmax(dim=-1)
        if self.n_group > 1:  # the best expert of each group scores the group; keep topk_group groups
            tokens = scores.shape[0]
            group_best = scores.view(tokens, self.n_group, -1).max(dim=-1).values
            kept = torch.topk(group_best, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_best).scatter_(1, kept, 1)
            mask = group_mask.unsqueeze(-1).expand(tokens, self.n_group, scores.shape[-1] // self.n_group)
            scores = scores.masked_fill(~mask.reshape(tokens, -1).bool(), 0.0)
        weight, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weight = weight * self.routed_scaling_factor
        return ids, weight, None


class RemoteDeepseekV2MoE(nn.Module):
    """DeepSeek-V2's remote-code MoE block, re-written: host-side counts and a loop over sorted rows."""

    def __init__(self, dim=16, inter=24, num_experts=8, top_k=2, n_group=1, topk_group=1, shared=1,
                 norm_topk_prob=False, scaling=1.0, seed=0):
        super().__init__()
        self.num_experts_per_tok = top_k
        self.experts = nn.ModuleList(GatedExpert(dim, inter) for _ in range(num_experts))
        self.gate = RemoteGate(dim, num_experts, top_k, n_group, topk_group, norm_topk_prob, scaling)
        self.shared_experts = GatedExpert(dim, inter * shared) if shared else None
        _randomize(self, seed)

    def forward(self, hidden):
        identity, shape = hidden, hidden.shape
        ids, weight, _ = self.gate(hidden)
        tokens = hidden.view(-1, shape[-1])
        if self.training:  # every slot its own row, written back by boolean masks
            rows = tokens.repeat_interleave(self.num_experts_per_tok, dim=0)
            flat = ids.view(-1)
            y = torch.empty_like(rows)
            for e, expert in enumerate(self.experts):
                y[flat == e] = expert(rows[flat == e])
            y = (y.view(*weight.shape, -1) * weight.unsqueeze(-1)).sum(dim=1).view(*shape)
        else:
            y = self.moe_infer(tokens, ids, weight).view(*shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y

    @torch.no_grad()
    def moe_infer(self, x, ids, weight):
        counts = ids.new_zeros((ids.shape[0], len(self.experts)))
        counts.scatter_(1, ids, 1)
        per_expert = counts.sum(dim=0).cpu().numpy()
        order = ids.view(-1).argsort()
        rows = x[order // ids.shape[1]]
        outputs, start = [], 0
        for e, count in enumerate(per_expert):
            if count == 0:
                continue
            outputs.append(self.experts[e](rows[start:start + count]))
            start += count
        done = torch.cat(outputs, dim=0) if outputs else rows.new_empty(0)
        back = torch.empty_like(done)
        back[order] = done
        mixed = back.view(*ids.shape, -1).type(weight.dtype).mul_(weight.unsqueeze(-1)).sum(dim=1)
        return mixed.type(back.dtype)


STYLES = {
    "where_loop": WhereLoopMoE,
    "gathered_einsum": GatheredEinsumMoE,
    "gathered_bmm": GatheredBmmMoE,
    "argmax": ArgmaxMoE,
    "dense_gate": DenseGateMoE,
    "dense_einsum": DenseEinsumMoE,
    "remote_deepseek_v2": RemoteDeepseekV2MoE,
}
