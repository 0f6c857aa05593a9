"""The routing policies of the seed papers.

================ ============================================ =======================
policy           rule (see :mod:`moepass.policies.rules`)     artefact
================ ============================================ =======================
``static``       the model's own top-k, bit for bit           none
``threshold``    top-2 unless p1 − p2 > T (Li et al. 2023)    T
``top_p``        smallest set with mass > p (Huang et al.)    p
``sensitivity``  drop slot j if w_j < sqrt(T / F_l) (AdapMoE) F_l per layer
``skip_ratio``   drop slot j if w_j < β_l · w_1 (Lu et al.)   β_l per layer
``null_experts`` top-k over E real + m null logits (AdaMoE)   null router rows
``allocator``    k = argmax softmax(x · W_l) + 1 (Ada-K)      W_l per layer
================ ============================================ =======================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from moepass.compiler.spec import MoEBlockSpec
from moepass.policies.base import Policy, PolicyError, ResolvedPolicy, block_name, per_block, register_policy

__all__ = ["Static", "Threshold", "TopP", "Sensitivity", "SkipRatio", "NullExperts", "Allocator"]


@register_policy
@dataclass
class Static(Policy):
    """The model's own top-k, bit for bit."""

    name: ClassVar[str] = "static"

    def bounds(self, block: MoEBlockSpec) -> tuple[int, int]:
        if self.k_min is not None or self.k_max is not None:
            raise PolicyError("the static policy keeps the model's k; k_min and k_max do not apply")
        return block.top_k, block.top_k

    def resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        self.bounds(block)
        return ResolvedPolicy(rule="static")


@register_policy
@dataclass
class Threshold(Policy):
    """Adaptive gating (Li et al. 2023): top-2 unless the top-1 wins by more than ``T``.

    For k0 > 2 the rule goes one slot at a time: expert j+1 is kept while
    p_j − p_{j+1} ≤ T.
    """

    name: ClassVar[str] = "threshold"
    T: float = 0.1

    def __post_init__(self) -> None:
        if not self.T >= 0:
            raise PolicyError(f"threshold: T must be >= 0, got {self.T}")

    def _resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        return ResolvedPolicy(rule="threshold", params={"T": float(self.T)})


@register_policy
@dataclass
class TopP(Policy):
    """Top-p routing (Huang et al. 2024): the smallest set of experts with mass > ``p``.

    ``renormalize``: None follows the model; False gives the paper's weights
    (the selected experts' probabilities, not renormalised); True renormalises.
    """

    name: ClassVar[str] = "top_p"
    p: float = 0.4
    renormalize: bool | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.p <= 1.0:
            raise PolicyError(f"top_p: p must be in (0, 1], got {self.p}")

    def _resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        return ResolvedPolicy(rule="top_p", params={"p": float(self.p)}, renormalize=self.renormalize)


@register_policy
@dataclass
class Sensitivity(Policy):
    """AdapMoE: drop slot j when its renormalised weight < sqrt(T / F_l).

    ``sensitivity`` maps each block (path or layer index) to F_l, the layer's
    calibrated sensitivity (see :func:`moepass.calibrate`).
    """

    name: ClassVar[str] = "sensitivity"
    T: float = 0.005
    sensitivity: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.T >= 0:
            raise PolicyError(f"sensitivity: T must be >= 0, got {self.T}")
        for key, value in self.sensitivity.items():
            if not value > 0:
                raise PolicyError(f"sensitivity: F for {key!r} must be > 0, got {value}")

    def _resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        if not self.sensitivity:
            raise PolicyError("the sensitivity policy needs per-layer sensitivities F_l: run moepass calibrate")
        sensitivity = float(per_block(self.sensitivity, block, "sensitivity F_l"))
        return ResolvedPolicy(rule="sensitivity", params={"threshold": math.sqrt(self.T / sensitivity)})


@register_policy
@dataclass
class SkipRatio(Policy):
    """Dynamic skipping (Lu et al. 2024): drop slot j when w_j < β_l · w_1.

    ``beta`` is one value for every block or a per-block map (the per-layer
    median of w_2 / w_1 on calibration data).
    """

    name: ClassVar[str] = "skip_ratio"
    beta: float | dict[str, float] = 0.5

    def __post_init__(self) -> None:
        values = self.beta.values() if isinstance(self.beta, dict) else [self.beta]
        if not all(0.0 <= float(v) <= 1.0 for v in values):
            raise PolicyError(f"skip_ratio: beta must be in [0, 1], got {self.beta}")

    def _resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        beta = per_block(self.beta, block, "beta_l") if isinstance(self.beta, dict) else self.beta
        return ResolvedPolicy(rule="skip_ratio", params={"beta": float(beta)})


def _check_tensor(block: MoEBlockSpec, what: str, tensor: torch.Tensor, shape: tuple) -> None:
    expected = tuple("?" if s is None else s for s in shape)
    if tensor.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        raise PolicyError(f"block {block_name(block)}: {what} has shape {tuple(tensor.shape)}, expected {expected}")


_SOFTMAX_ROUTERS = ("softmax_topk", "topk_softmax")


@register_policy
@dataclass
class NullExperts(Policy):
    """AdaMoE: top-``k`` over E real and m null experts; null picks are empty slots.

    ``router_rows`` maps each block to its null-expert router rows R_l [m, H]
    (null logits = x · R_lᵀ).  A token that picks only null experts gets no
    routed expert (its shared experts still run).
    """

    name: ClassVar[str] = "null_experts"
    tensor_fields: ClassVar[tuple[str, ...]] = ("router_rows",)
    k: int = 3
    router_rows: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise PolicyError(f"null_experts: k must be >= 1, got {self.k}")

    def default_k_min(self) -> int:
        return 0

    def default_k_max(self, block: MoEBlockSpec) -> int:
        return min(self.k, block.num_experts)

    def _resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        if block.router.kind not in _SOFTMAX_ROUTERS:
            raise PolicyError(
                f"block {block_name(block)}: null experts extend a softmax router; this block's router is "
                f"{block.router.kind}"
            )
        rows = per_block(self.router_rows, block, "null-expert router rows")
        _check_tensor(block, "the null-expert router rows", rows, (None, block.router.hidden_size))
        if self.k > block.num_experts + rows.shape[0]:
            raise PolicyError(
                f"block {block_name(block)}: k={self.k} exceeds its {block.num_experts} real + {rows.shape[0]} null experts"
            )
        return ResolvedPolicy(rule="null_experts", params={"k": int(self.k)}, tensors={"null_rows": rows}, uses_x=True)


@register_policy
@dataclass
class Allocator(Policy):
    """Ada-K: a per-layer bias-free linear W_l [H, N]; k = argmax softmax(x · W_l) + 1.

    ``sample=True`` samples k from the softmax instead (as in PPO training).
    """

    name: ClassVar[str] = "allocator"
    tensor_fields: ClassVar[tuple[str, ...]] = ("weights",)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    sample: bool = False

    def default_k_max(self, block: MoEBlockSpec) -> int:
        if not self.weights:
            return block.top_k
        return int(per_block(self.weights, block, "allocator weights").shape[1])

    def _resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        if not self.weights:
            raise PolicyError("the allocator policy needs trained per-layer weights W_l")
        weight = per_block(self.weights, block, "allocator weights")
        _check_tensor(block, "the allocator weights", weight, (block.router.hidden_size, None))
        return ResolvedPolicy(
            rule="allocator", params={"sample": bool(self.sample)}, tensors={"allocator": weight}, uses_x=True
        )
