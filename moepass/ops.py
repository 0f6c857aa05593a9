"""The ``torch.ops.moepass`` operators a rewritten MoE block is made of.

::

    logits ─► moepass.route(logits, x, tensors, config) ─► ids [T,k_max], weights [T,k_max]
                                                              │
    x ──────► moepass.experts(x, ids, weights, w1, w2, b1, b2, config) ─► out [T,H]

``route`` is a composite of standard torch ops (so Inductor compiles it and
exporters decompose it); ``experts`` is an opaque custom op with a fake
implementation, lowered at run time to the CPU path, the Triton kernels or the
plain reference.  Static attributes travel as a JSON string (parsed once and
cached); per-layer tensors of a policy travel in ``tensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterator, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from moepass.spec import ExpertsSpec, RouterSpec

__all__ = ["RouteConfig", "ExpertsConfig", "route", "experts", "LOWERINGS", "capture_routes", "routes_not_captured"]

#: Implementations of the experts op; "auto" picks triton for CUDA tensors
#: and cpu otherwise.
LOWERINGS = ("auto", "cpu", "triton", "reference")


@dataclass(frozen=True)
class RouteConfig:
    """Static attributes of one ``moepass.route`` call."""

    router: RouterSpec
    #: Name of the k-rule (a policy's per-token rule); "static" keeps native k.
    rule: str = "static"
    #: The rule's scalar parameters, already resolved for this block.
    params: dict[str, Any] = field(default_factory=dict)
    k_min: int | None = None
    k_max: int | None = None
    #: What each entry of the op's ``tensors`` argument is: "correction_bias"
    #: or a rule tensor name.
    tensor_roles: tuple[str, ...] = ()
    #: Whether ``x`` is passed (rules such as the allocator need it).
    uses_x: bool = False
    #: None follows the model's renormalisation; True/False forces it.
    renormalize: bool | None = None
    #: Module path of the block, for calibration capture.
    block: str = ""
    #: How empty slots are written: "sentinel" (id E, weight 0: consumers skip
    #: them) or "repeat_first" (the token's first expert, weight 0: for
    #: consumers outside the graph that may not know the sentinel).
    empty_slots: str = "sentinel"

    def to_json(self) -> str:
        """Encode for the op's ``config`` argument."""
        data = dataclasses.asdict(self)
        return json.dumps(data, sort_keys=True)

    @property
    def depth(self) -> int:
        """The number of slots per token (k_max, or native k)."""
        return self.router.top_k if self.k_max is None else self.k_max


@dataclass(frozen=True)
class ExpertsConfig:
    """Static attributes of one ``moepass.experts`` call."""

    spec: ExpertsSpec
    lowering: str = "auto"
    #: Module path of the block, for run-time statistics.
    block: str = ""
    collect_stats: bool = False
    #: Non-empty when the block's expert weights live in an expert store:
    #: ``"<offload session>|<block path>"`` (see :mod:`moepass.offload`).
    offload: str = ""

    def __post_init__(self) -> None:
        if self.lowering not in LOWERINGS:
            raise ValueError(f"unknown lowering {self.lowering!r}; expected one of {LOWERINGS}")

    def to_json(self) -> str:
        """Encode for the op's ``config`` argument."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@lru_cache(maxsize=4096)
def parse_route_config(text: str) -> RouteConfig:
    """Decode (and cache) a ``route`` config string."""
    data = json.loads(text)
    data["router"] = RouterSpec(**data["router"])
    data["tensor_roles"] = tuple(data.get("tensor_roles", ()))
    return RouteConfig(**data)


@lru_cache(maxsize=4096)
def parse_experts_config(text: str) -> ExpertsConfig:
    """Decode (and cache) an ``experts`` config string."""
    data = json.loads(text)
    data["spec"] = ExpertsSpec(**data["spec"])
    return ExpertsConfig(**data)


# --- moepass::route ---------------------------------------------------------

_lib = torch.library.Library("moepass", "FRAGMENT")
_lib.define("route(Tensor logits, Tensor? x, Tensor[] tensors, str config) -> (Tensor, Tensor)")


def _route_composite(
    logits: torch.Tensor, x: Optional[torch.Tensor], tensors: list[torch.Tensor], config: str
) -> tuple[torch.Tensor, torch.Tensor]:
    from moepass import routing
    from moepass.policies.rules import get_rule

    cfg = parse_route_config(config)
    if _capture_hooks and not _capture_suspended and not is_fake(logits):
        for hook in list(_capture_hooks):
            hook(cfg, logits, x)
    named = dict(zip(cfg.tensor_roles, tensors))
    rule = get_rule(cfg.rule, cfg.params) if cfg.rule != "static" else None
    rule_tensors = [t for role, t in zip(cfg.tensor_roles, tensors) if role != "correction_bias"]
    ids, weights = routing.route(
        logits,
        cfg.router,
        rule,
        k_min=cfg.k_min,
        k_max=cfg.k_max,
        x=x,
        correction_bias=named.get("correction_bias"),
        tensors=rule_tensors,
        renormalize=cfg.renormalize,
    )
    if cfg.empty_slots == "repeat_first":
        num_experts = cfg.router.num_experts
        first = torch.where(ids[:, :1] < num_experts, ids[:, :1], torch.zeros_like(ids[:, :1]))
        ids = torch.where(ids < num_experts, ids, first)
    return ids, weights


#: Callables run on each real (not fake, not validation) ``route`` call with
#: (config, logits, x): how calibration sees every block's router logits.
_capture_hooks: list = []
_capture_suspended: list = []


@contextlib.contextmanager
def capture_routes(hook) -> Iterator[None]:
    """Call ``hook(config, logits, x)`` on every eager ``moepass.route`` call inside the block."""
    _capture_hooks.append(hook)
    try:
        yield
    finally:
        _capture_hooks.remove(hook)


@contextlib.contextmanager
def routes_not_captured() -> Iterator[None]:
    """Hide ``route`` calls from capture hooks (validation runs on random inputs)."""
    _capture_suspended.append(True)
    try:
        yield
    finally:
        _capture_suspended.pop()


_lib.impl("route", _route_composite, "CompositeImplicitAutograd")
route = torch.ops.moepass.route


# --- moepass::experts --------------------------------------------------------


@torch.library.custom_op("moepass::experts", mutates_args=())
def experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    config: str,
) -> torch.Tensor:
    """Run the routed experts of one block.

    Args:
        x: [T, H] tokens.
        ids: [T, K] int64 expert per slot; ``E`` marks an empty slot.
        weights: [T, K] float routing weight per slot (0 for empty slots).
        w1: [E, N1, H] gate+up (or up) weights, or [E, H, N1] if transposed.
        w2: [E, H, I] down weights, or [E, I, H] if transposed.
        b1: [E, N1] or None.  b2: [E, H] or None.
        config: :class:`ExpertsConfig` as JSON.

    Returns:
        [T, H] in ``x.dtype``: Σ_slots weight · expert(x) (or expert(weight · x)).
    """
    from moepass.lowering import run_experts
    from moepass.stats import record_routing

    cfg = parse_experts_config(config)
    if cfg.collect_stats:
        record_routing(cfg.block, ids, cfg.spec.num_experts)
    return run_experts(x, ids, weights, w1, w2, b1, b2, cfg)


@experts.register_fake
def _experts_fake(x, ids, weights, w1, w2, b1, b2, config):
    return torch.empty_like(x)
