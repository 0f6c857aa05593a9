"""Per-token k-rules: the run-time half of each routing policy.

A rule maps a :class:`moepass.routing.RoutingContext` to k per token ([T]
int64).  Rules are looked up by name from the ``moepass.route`` op's config,
with the scalar parameters the policy resolved for that block.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from moepass.routing import RoutingContext

__all__ = ["RULES", "get_rule", "register_rule"]

RuleFactory = Callable[..., Callable[[RoutingContext], torch.Tensor]]
RULES: dict[str, RuleFactory] = {}


def register_rule(name: str) -> Callable[[RuleFactory], RuleFactory]:
    """Register a rule factory under ``name``."""

    def decorate(factory: RuleFactory) -> RuleFactory:
        RULES[name] = factory
        return factory

    return decorate


def get_rule(name: str, params: dict[str, Any]) -> Callable[[RoutingContext], torch.Tensor]:
    """The rule ``name`` bound to ``params``."""
    try:
        factory = RULES[name]
    except KeyError:
        raise ValueError(f"unknown routing rule {name!r}; known: {sorted(RULES)}") from None
    return factory(**params)
