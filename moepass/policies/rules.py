"""Per-token k-rules: the run-time half of each routing policy.

A rule maps a :class:`moepass.runtime.routing.RoutingContext` to k per token ([T]
int64).  Every rule keeps a *prefix* of the model's own ranking, so it
composes with every router kind (see :mod:`moepass.runtime.routing` for how the
probabilities ``p_1 ≥ p_2 ≥ ...`` are formed for each kind).  Rules are looked
up by name from the ``moepass.route`` op's config, with the scalar parameters
the policy resolved for that block.

============ ================================================================
rule         k for a token with ranked probabilities p_1 ≥ p_2 ≥ … ≥ p_C
============ ================================================================
threshold    1 + #{leading j ≥ 1 with p_j − p_{j+1} ≤ T}: top-2 unless the
             top-1 wins by more than T (Li et al. 2023), extended one slot at
             a time for k0 > 2
top_p        smallest k with p_1 + … + p_k > p (Huang et al. 2024)
sensitivity  1 + #{leading j ≥ 2 with w_j ≥ τ}, w = p renormalised over the C
             ranked experts, τ = sqrt(T / F_l) (AdapMoE)
skip_ratio   1 + #{leading j ≥ 2 with p_j ≥ β_l · p_1} (Lu et al. 2024)
null_experts number of real experts among the top-k of E real and m null
             logits, null logits = x · R_lᵀ (AdaMoE)
allocator    argmax softmax(x · W_l) + 1, or a sample of it (Ada-K)
============ ================================================================
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from moepass.runtime.routing import RoutingContext

__all__ = ["RULES", "get_rule", "register_rule"]

Rule = Callable[[RoutingContext], torch.Tensor]
RuleFactory = Callable[..., Rule]
RULES: dict[str, RuleFactory] = {}


def register_rule(name: str) -> Callable[[RuleFactory], RuleFactory]:
    """Register a rule factory under ``name``."""

    def decorate(factory: RuleFactory) -> RuleFactory:
        RULES[name] = factory
        return factory

    return decorate


def get_rule(name: str, params: dict[str, Any]) -> Rule:
    """The rule ``name`` bound to ``params``."""
    try:
        factory = RULES[name]
    except KeyError:
        raise ValueError(f"unknown routing rule {name!r}; known: {sorted(RULES)}") from None
    return factory(**params)


def _leading_true(mask: torch.Tensor) -> torch.Tensor:
    """Per row, how many leading entries of a [T, n] bool mask are True."""
    if mask.shape[1] == 0:
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    # a position counts while no False came before it (or at it); cumsum, not
    # cumprod: ONNX has CumSum but no CumProd, so the rule exports as it is
    return (torch.cumsum((~mask).long(), dim=1) == 0).sum(dim=1)


@register_rule("threshold")
def threshold_rule(T: float) -> Rule:
    """Keep the next expert while it is within ``T`` of the previous one."""

    def rule(ctx: RoutingContext) -> torch.Tensor:
        probs = ctx.ranked.probs
        gaps = probs[:, :-1] - probs[:, 1:]
        return 1 + _leading_true(gaps <= T)

    return rule


@register_rule("top_p")
def top_p_rule(p: float) -> Rule:
    """Smallest prefix whose probability mass exceeds ``p``."""

    def rule(ctx: RoutingContext) -> torch.Tensor:
        mass = torch.cumsum(ctx.ranked.probs, dim=1)
        # mass is non-decreasing: the prefix with mass <= p, plus one more
        return 1 + (mass <= p).sum(dim=1)

    return rule


@register_rule("sensitivity")
def sensitivity_rule(threshold: float) -> Rule:
    """Drop slot j ≥ 2 when its renormalised weight is below ``threshold`` = sqrt(T / F_l)."""

    def rule(ctx: RoutingContext) -> torch.Tensor:
        probs = ctx.ranked.probs
        weights = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-30)
        return 1 + _leading_true(weights[:, 1:] >= threshold)

    return rule


@register_rule("skip_ratio")
def skip_ratio_rule(beta: float) -> Rule:
    """Drop slot j ≥ 2 when p_j < beta · p_1."""

    def rule(ctx: RoutingContext) -> torch.Tensor:
        probs = ctx.ranked.probs
        return 1 + _leading_true(probs[:, 1:] >= beta * probs[:, :1])

    return rule


@register_rule("null_experts")
def null_experts_rule(k: int) -> Rule:
    """Top-``k`` over real and null logits; the real experts among them are kept."""

    def rule(ctx: RoutingContext) -> torch.Tensor:
        (rows,) = ctx.tensors
        null_logits = ctx.x.float() @ rows.float().t()
        combined = torch.cat([ctx.logits, null_logits], dim=1)
        picked = torch.topk(combined, k, dim=1)[1]
        return (picked < ctx.logits.shape[1]).sum(dim=1)

    return rule


@register_rule("allocator")
def allocator_rule(sample: bool = False, seed: int | None = None) -> Rule:
    """k = argmax softmax(x · W) + 1, or a sample from that distribution."""

    def rule(ctx: RoutingContext) -> torch.Tensor:
        (weight,) = ctx.tensors
        scores = ctx.x.float() @ weight.float()
        if not sample:
            return scores.argmax(dim=1) + 1
        generator = None
        if seed is not None:
            generator = torch.Generator(device=scores.device).manual_seed(seed)
        return torch.multinomial(torch.softmax(scores, dim=1), 1, generator=generator).squeeze(1) + 1

    return rule
