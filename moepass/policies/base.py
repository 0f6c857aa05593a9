"""The policy interface: plain data that resolves, per block, to a k-rule.

A policy is a dataclass.  Its scalar fields serialise to JSON; learned or
calibrated tensors (per-layer thresholds, allocator weights, null-expert
router rows) live in a safetensors file beside the JSON.  At compile time the
backend calls :meth:`Policy.resolve` once per MoE block, which checks the
policy fits the block and returns the rule name, scalar parameters and tensors
the ``moepass.route`` op runs with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from moepass.routing import num_candidates
from moepass.spec import MoEBlockSpec

__all__ = ["Policy", "ResolvedPolicy", "PolicyError", "POLICIES", "register_policy"]

POLICIES: dict[str, type["Policy"]] = {}


class PolicyError(ValueError):
    """A policy that does not fit a block, or bad policy parameters."""


def register_policy(cls: type["Policy"]) -> type["Policy"]:
    """Class decorator: make a policy selectable by its ``name``."""
    POLICIES[cls.name] = cls
    return cls


@dataclass
class ResolvedPolicy:
    """A policy bound to one block: what the ``moepass.route`` op needs."""

    rule: str
    params: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    k_min: int | None = None
    k_max: int | None = None
    uses_x: bool = False


@dataclass
class Policy:
    """Base class of routing policies.

    Attributes:
        k_min: fewest experts a token may keep (default 0 for adaptive
            policies: shared experts still run; 1 for ``allocator``).
        k_max: most experts a token may keep (default: the model's k).
    """

    name: ClassVar[str] = ""
    k_min: int | None = None
    k_max: int | None = None

    def bounds(self, block: MoEBlockSpec) -> tuple[int, int]:
        """(k_min, k_max) for ``block``, checked against what it can reach."""
        native = block.top_k
        k_max = native if self.k_max is None else self.k_max
        k_min = self.default_k_min() if self.k_min is None else self.k_min
        limit = num_candidates(block.router)
        if not 0 <= k_min <= k_max <= limit:
            raise PolicyError(
                f"block {block.path or '<root>'}: k bounds k_min={k_min}, k_max={k_max} must satisfy "
                f"0 <= k_min <= k_max <= {limit} (experts a token can reach)"
            )
        return k_min, k_max

    def default_k_min(self) -> int:
        """k_min when not given."""
        return 0

    def resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        """Bind the policy to ``block``; raise :class:`PolicyError` naming the mismatch."""
        raise NotImplementedError

    def describe(self) -> str:
        """Short description, e.g. ``top_p(p=0.4)``."""
        fields = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.repr and getattr(self, f.name) is not None and not isinstance(getattr(self, f.name), (dict, list))
        ]
        return f"{self.name}({', '.join(fields)})"


@register_policy
@dataclass
class Static(Policy):
    """The model's own top-k, bit for bit."""

    name: ClassVar[str] = "static"

    def resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        if self.k_min is not None or self.k_max is not None:
            raise PolicyError("the static policy keeps the model's k; k_min/k_max do not apply")
        return ResolvedPolicy(rule="static")
