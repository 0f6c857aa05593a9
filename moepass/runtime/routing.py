"""Router math: each router kind's ranking and weights, and the k-rule hook.

Every router kind is split into the same three steps so that any policy
composes with any router:

1. **rank** — order the experts for each token the way the model does
   (top-k of its selection scores, after bias correction and group masking);
2. **choose k** — a policy rule picks how many of the ranked experts each
   token keeps (``static``: the model's own k);
3. **weigh** — the model's own weight formula applied to the kept experts
   (renormalised over the survivors exactly when the model renormalises).

Empty slots hold the sentinel id ``E`` and weight 0.

Probability form.  Rules that reason about probability mass (``top_p``,
``threshold``) see, in ranking order:

==================== ==========================================================
router kind          probability of expert e
==================== ==========================================================
softmax_topk         softmax(logits)_e over all E experts
topk_softmax         softmax(logits)_e over all E experts (the model's weights
                     are these renormalised over the selection)
topk_sigmoid         softmax(logits)_e over all E experts
sigmoid_group_topk   sigmoid(logit_e) / Σ sigmoid(logit_c) over the experts c
                     in the groups that survive group masking (unbiased
                     scores; the ranking itself uses the biased scores)
lifted               the model's own weight of each of its k selected experts,
                     normalised over them (the model's formula ran in the
                     graph; only its top-k is known, so mass rules such as
                     ``top_p`` count mass within the model's top-k)
==================== ==========================================================

For ``lifted`` routers the route op receives the model's selection itself
(ids sorted best first, and the weights its formula gave them); dropping slots
then zeroes their weights and, when the model renormalises (its weights sum
to the same total for every token), rescales the survivors to that total —
which is the model's formula over the survivors for every renormalising form
(a softmax over the selected logits, a sum-renormalisation with or without
a scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moepass.compiler.spec import RouterSpec

__all__ = ["RankedExperts", "RoutingContext", "rank_experts", "weigh_experts", "route", "num_candidates"]


@dataclass
class RankedExperts:
    """Experts in the model's preference order, per token."""

    #: [T, C] expert ids, best first.
    order: torch.Tensor
    #: [T, C] the router-kind-specific values the weights are made from
    #: (softmax probs, raw logits, or unbiased sigmoid scores), in ranking order.
    values: torch.Tensor
    #: [T, C] probability form (see module docstring), in ranking order.
    probs: torch.Tensor


@dataclass
class RoutingContext:
    """What a k-rule may look at for one block."""

    ranked: RankedExperts
    #: [T, E] float32 router logits (linear output, bias included).
    logits: torch.Tensor
    #: [T, H] the block input (for learned allocators), or None.
    x: torch.Tensor | None
    #: The model's native k.
    native_k: int
    #: Extra tensors the rule was resolved with (allocator weights, null rows).
    tensors: list[torch.Tensor]


def num_candidates(router: RouterSpec) -> int:
    """How many experts a token can be routed to at most (after group limits).

    A lifted router's weights exist only for the model's own top-k.
    """
    if router.kind == "lifted":
        return router.top_k
    return router.num_experts // router.n_group * router.topk_group


def _group_limited_scores(biased: torch.Tensor, router: RouterSpec) -> torch.Tensor:
    """Mask (to -inf) the experts outside each token's best ``topk_group`` groups.

    A group's score is the sum of its two best biased scores, as DeepSeek-V3.
    """
    if router.n_group == 1:
        return biased
    tokens = biased.shape[0]
    grouped = biased.view(tokens, router.n_group, -1)
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1.0)  # out of place: exporters decompose it
    score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(tokens, -1)
    return biased.masked_fill(~score_mask.bool(), float("-inf"))


def rank_experts(
    logits: torch.Tensor,
    router: RouterSpec,
    depth: int,
    correction_bias: torch.Tensor | None = None,
    selected: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RankedExperts:
    """Rank the ``depth`` best experts per token as the model's router does.

    Args:
        logits: [T, E] router linear output.
        router: the block's router spec.
        depth: how many ranked experts to return (the policy's k_max).
        correction_bias: [E] selection bias (``sigmoid_group_topk`` only).
        selected: (ids [T, k], weights [T, k]) the model chose (``lifted`` only).
    """
    logits = logits.float()
    if router.kind == "lifted":
        if selected is None:
            raise ValueError("a lifted router is ranked from the model's own selection; none was given")
        order, weights = selected[0][:, :depth].long(), selected[1][:, :depth].float()
        total = weights.sum(dim=-1, keepdim=True)
        probs = weights / torch.where(total > 0, total, torch.ones_like(total))
        return RankedExperts(order, weights, probs)
    if router.kind == "softmax_topk":
        scores = torch.softmax(logits, dim=-1)
        values, order = torch.topk(scores, depth, dim=-1)
        return RankedExperts(order, values, values)
    if router.kind in ("topk_softmax", "topk_sigmoid"):
        values, order = torch.topk(logits, depth, dim=-1)
        probs = torch.softmax(logits, dim=-1).gather(1, order)
        return RankedExperts(order, values, probs)
    if router.kind == "sigmoid_group_topk":
        scores = torch.sigmoid(logits)
        biased = scores + correction_bias if correction_bias is not None else scores
        masked = _group_limited_scores(biased, router)
        order = torch.topk(masked, depth, dim=-1)[1]
        values = scores.gather(1, order)
        mass = scores.masked_fill(masked == float("-inf"), 0.0).sum(dim=-1, keepdim=True)
        return RankedExperts(order, values, values / mass)
    raise ValueError(f"unknown router kind {router.kind!r}")


def _natural_weights(ranked: RankedExperts, router: RouterSpec) -> torch.Tensor:
    """Per-slot weights before any renormalisation, in ranking order."""
    if router.kind == "topk_softmax":
        return ranked.probs  # softmax over all experts; renormalised it is the model's formula
    if router.kind == "topk_sigmoid":
        return torch.sigmoid(ranked.values)
    return ranked.values


def _normalise(weights: torch.Tensor, eps: float) -> torch.Tensor:
    denominator = weights.sum(dim=-1, keepdim=True) + eps
    if eps == 0.0:
        # a token that keeps no expert would divide 0 by 0
        denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return weights / denominator


def weigh_experts(
    ranked: RankedExperts, keep: torch.Tensor, router: RouterSpec, renormalize: bool | None = None
) -> torch.Tensor:
    """The model's weights for the kept experts; 0 for dropped slots.

    Args:
        ranked: output of :func:`rank_experts`.
        keep: [T, C] bool, which ranked slots survive.
        router: the block's router spec.
        renormalize: None follows the model (its own formula, renormalised
            over the survivors exactly when the model renormalises); True or
            False forces it (``top_p``'s paper form is not renormalised).
    """
    zeros = torch.zeros_like(ranked.values)
    if router.kind == "lifted":
        kept = torch.where(keep, ranked.values, zeros)
        if router.renormalize if renormalize is None else renormalize:
            total, kept_total = ranked.values.sum(dim=-1, keepdim=True), kept.sum(dim=-1, keepdim=True)
            scale = torch.where(kept_total != 0, total / torch.where(kept_total != 0, kept_total, 1.0), 0.0)
            kept = torch.where(keep.all(dim=-1, keepdim=True), ranked.values, kept * scale)
        return kept
    if renormalize is None:
        if router.kind == "topk_softmax":
            # softmax over the surviving logits == full softmax renormalised over them
            weights = torch.softmax(ranked.values.masked_fill(~keep, float("-inf")), dim=-1)
            # a token with no expert has a row of -inf: softmax gives NaN; it gets zeros
            return _scaled(torch.where(keep, weights, zeros), router)
        if router.kind == "topk_sigmoid":
            return _scaled(torch.where(keep, torch.sigmoid(ranked.values), zeros), router)
        renormalize = router.renormalize
    weights = torch.where(keep, _natural_weights(ranked, router), zeros)
    if renormalize:
        weights = _normalise(weights, router.renormalize_eps)
    return _scaled(weights, router)


def _scaled(weights: torch.Tensor, router: RouterSpec) -> torch.Tensor:
    """The router's constant scale on the final weights (DeepSeek's routed_scaling_factor, a ÷ k)."""
    return weights * router.scaling_factor if router.scaling_factor != 1.0 else weights


KRule = Callable[[RoutingContext], torch.Tensor]


def route(
    logits: torch.Tensor,
    router: RouterSpec,
    k_rule: KRule | None = None,
    *,
    k_min: int | None = None,
    k_max: int | None = None,
    x: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
    tensors: list[torch.Tensor] | None = None,
    renormalize: bool | None = None,
    selected: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens: rank, choose k per token, weigh.

    Args:
        logits: [T, E] router logits.
        router: the block's router spec.
        k_rule: maps a :class:`RoutingContext` to k per token ([T] int64);
            None keeps the model's own k.
        k_min, k_max: bounds on k (default: the native k for both when
            ``k_rule`` is None, else ``0`` and the native k).
        x: [T, H] block input, for rules that need it.
        correction_bias: [E] selection bias of ``sigmoid_group_topk`` routers.
        tensors: extra tensors for the rule.
        renormalize: override of the model's renormalisation (see :func:`weigh_experts`).
        selected: the model's own (ids, weights), for ``lifted`` routers.

    Returns:
        ``ids`` [T, k_max] int64 (sentinel ``E`` in empty slots) and
        ``weights`` [T, k_max] float32 (0 in empty slots).
    """
    native_k = router.top_k
    k_max = native_k if k_max is None else k_max
    k_min = (native_k if k_rule is None else 0) if k_min is None else k_min
    if not 0 <= k_min <= k_max <= num_candidates(router):
        raise ValueError(
            f"k bounds must satisfy 0 <= k_min <= k_max <= {num_candidates(router)} "
            f"(experts a token can reach), got k_min={k_min}, k_max={k_max}"
        )
    ranked = rank_experts(logits, router, k_max, correction_bias, selected)
    slots = torch.arange(k_max, device=logits.device)
    if k_rule is None and k_min == k_max:
        keep = torch.ones_like(ranked.order, dtype=torch.bool)
    else:
        context = RoutingContext(ranked, logits.float(), x, native_k, list(tensors or []))
        k = native_k * torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
        if k_rule is not None:
            k = k_rule(context)
        k = k.clamp(min=k_min, max=k_max)
        keep = slots.unsqueeze(0) < k.unsqueeze(1)
    weights = weigh_experts(ranked, keep, router, renormalize)
    ids = torch.where(keep, ranked.order, torch.full_like(ranked.order, router.num_experts))
    return ids, weights.float()
