"""Eager Mixtral forward with a per-token number of experts.

Training and rewards need the model's forward with an arbitrary k per token
*in eager PyTorch* (gradients, sampling), which the compiled backend does not
give.  :func:`routed` temporarily replaces the forward of every
``MixtralSparseMoeBlock`` by one that routes through :func:`moepass.runtime.routing.route`
(the same rank → choose k → weigh code the ``moepass.route`` op runs)::

    x [T,H] ─► gate linear ─► logits [T,E] ─► route(logits, spec, k_rule_l) ─► ids, weights
            └───────────────────────────────► model's own experts on the non-empty slots

The k-rule of layer ``l`` sees a :class:`moepass.runtime.routing.RoutingContext`
(ranked experts, logits, the block input ``x``).  :func:`routed_policy` runs a
:class:`moepass.policies.Policy` with its own rules, so an eager run of a
policy routes exactly as the compiled model does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from moepass.compiler.spec import ExpertsSpec, MoEBlockSpec, RouterSpec
from moepass.runtime.routing import KRule, route

__all__ = ["MoELayer", "moe_layers", "block_spec", "routed", "routed_policy", "Observation"]


@dataclass
class MoELayer:
    """One Mixtral MoE block of a model."""

    index: int
    path: str
    module: torch.nn.Module


@dataclass
class Observation:
    """What one routed block saw and chose in one call."""

    layer: int
    #: [T, H] block input.
    x: torch.Tensor
    #: [T, E] router logits.
    logits: torch.Tensor
    #: [T, k_max] selected ids (sentinel E in empty slots) and weights.
    ids: torch.Tensor
    weights: torch.Tensor


def moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """The ``MixtralSparseMoeBlock`` modules of ``model`` in layer order."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MixtralSparseMoeBlock)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no MixtralSparseMoeBlock")
    return [MoELayer(i, name, module) for i, (name, module) in enumerate(found)]


def block_spec(layer: MoELayer) -> MoEBlockSpec:
    """The :class:`MoEBlockSpec` detection builds for a Mixtral block (softmax → top-k → renormalise)."""
    block = layer.module
    experts = block.experts
    router = RouterSpec(
        kind="softmax_topk",
        num_experts=experts.num_experts,
        top_k=block.top_k,
        renormalize=True,
        hidden_size=experts.hidden_dim,
    )
    spec = ExpertsSpec(
        dispatch="grouped_mm",
        num_experts=experts.num_experts,
        hidden_size=experts.hidden_dim,
        intermediate_size=experts.intermediate_dim,
    )
    return MoEBlockSpec(path=layer.path, router=router, experts=spec, layer_index=layer.index)


def _experts(block: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ over non-empty slots of weight · expert(x), with the model's own experts.

    The non-empty slots become a k=1 problem (one row per slot), so the
    model's experts implementation never sees the sentinel id.
    """
    num_experts = block.experts.num_experts
    keep = ids < num_experts
    token = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)[keep]
    if token.numel() == 0:
        return torch.zeros_like(x)
    y = block.experts(x[token], ids[keep].unsqueeze(1), weights[keep].unsqueeze(1).to(x.dtype))
    return torch.zeros_like(x).index_add(0, token, y)


def _routed_forward(
    block: torch.nn.Module,
    spec: MoEBlockSpec,
    rule: KRule | None,
    k_min: int | None,
    k_max: int | None,
    renormalize: bool | None,
    observe: Callable[[Observation], None] | None,
    layer: int,
):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)
        logits = F.linear(x, block.gate.weight)
        ids, weights = route(logits, spec.router, rule, k_min=k_min, k_max=k_max, x=x, renormalize=renormalize)
        if observe is not None:
            observe(Observation(layer, x, logits, ids, weights))
        return _experts(block, x, ids, weights).reshape(batch, length, hidden)

    return forward


RuleSource = Sequence[KRule | None] | Callable[[int], KRule | None] | None


@contextlib.contextmanager
def routed(
    model: torch.nn.Module,
    rules: RuleSource = None,
    *,
    k_min: int | Sequence[int | None] | None = None,
    k_max: int | Sequence[int | None] | None = None,
    renormalize: bool | Sequence[bool | None] | None = None,
    observe: Callable[[Observation], None] | None = None,
) -> Iterator[list[MoELayer]]:
    """Run ``model``'s Mixtral blocks with per-token k-rules inside the block.

    Args:
        model: a transformers Mixtral (any size).
        rules: per layer, a k-rule (None: the model's own k) — a sequence
            indexed by layer or a function of the layer index.
        k_min, k_max: bounds on k (an int for every layer, or per layer);
            defaults as :func:`moepass.runtime.routing.route`.
        renormalize: override of the model's renormalisation (every layer,
            or per layer); None follows the model.
        observe: called once per block call with an :class:`Observation`.

    Yields the model's :class:`MoELayer` list; the original forwards come back
    on exit.
    """
    layers = moe_layers(model)

    def per_layer(value, index):
        if isinstance(value, (list, tuple)):
            return value[index]
        return value

    saved = []
    try:
        for layer in layers:
            rule = rules(layer.index) if callable(rules) else per_layer(rules, layer.index)
            spec = block_spec(layer)
            saved.append((layer.module, layer.module.__dict__.get("forward")))
            layer.module.forward = _routed_forward(
                                layer.module,
                spec,
                rule,
                per_layer(k_min, layer.index),
                per_layer(k_max, layer.index),
                per_layer(renormalize, layer.index),
                observe,
                layer.index,
            )
        yield layers
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextlib.contextmanager
def routed_policy(
    model: torch.nn.Module, policy, observe: Callable[[Observation], None] | None = None
) -> Iterator[list[MoELayer]]:
    """:func:`routed` with the k-rules, bounds and weights of ``policy``.

    Uses the policy's own :meth:`~moepass.policies.Policy.resolve` and the
    registered run-time rules, i.e. the same code the compiled model runs.
    """
    from moepass.policies.rules import get_rule

    rules, lows, highs, renorms = [], [], [], []
    for layer in moe_layers(model):
        resolved = policy.resolve(block_spec(layer))
        renorms.append(resolved.renormalize)
        if resolved.rule == "static":
            rules.append(None)
            lows.append(None)
            highs.append(None)
            continue
        rule = get_rule(resolved.rule, resolved.params)
        tensors = list(resolved.tensors.values())

        def bound(context, rule=rule, tensors=tensors):
            context.tensors = tensors
            return rule(context)

        rules.append(bound)
        lows.append(resolved.k_min)
        highs.append(resolved.k_max)
    with routed(model, rules, k_min=lows, k_max=highs, renormalize=renorms, observe=observe) as layers:
        yield layers
