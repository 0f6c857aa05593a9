"""Calibration: fit a policy's parameters on data to hit a compute target.

::

    policy = moepass.calibrate(model, batches, "sensitivity", target_avg_k=1.5)
    policy.save("calib/")

1. The model runs once over the calibration batches, compiled with the
   backend (static policy, eager inner compiler); every block's router logits
   are recorded as the ``moepass.route`` op sees them.
2. Per-layer statistics are computed: for ``skip_ratio`` the distribution of
   w_2 / w_1; for ``sensitivity`` each layer's F_l, a Fisher estimate of how
   much the loss moves when the block's output moves (needs a loss: a
   transformers causal LM gives one; otherwise pass ``loss_fn``).
3. The policy's one free scalar (``T``, ``p``, or the skip-ratio quantile) is
   found by bisection so that the average k over all blocks and tokens
   matches ``target_avg_k`` (or ``flops_budget`` × native k: expert FLOPs are
   proportional to k).  Each step re-routes the recorded logits; the model
   does not run again.

AdapMoE's sensitivity is taken as F_l = E_t[‖∂L/∂y_t‖²] · E_t[‖y_t‖²] / H for
the block output y (the loss change of dropping a slot of weight w is then
≈ F_l · w², so a slot is dropped when w < sqrt(T / F_l)).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from moepass.compiler.spec import MoEBlockSpec, RouterSpec, layer_index_of
from moepass.policies import Policy, PolicyError, make_policy
from moepass.policies.rules import get_rule
from moepass.runtime import ops
from moepass.runtime.progress import progress
from moepass.runtime.routing import route

__all__ = ["calibrate", "RouterRecord", "record_router_logits", "average_k", "CALIBRATABLE"]

logger = logging.getLogger(__name__)

#: Policies calibrate() fits, and the scalar it searches.
CALIBRATABLE = ("threshold", "top_p", "sensitivity", "skip_ratio")


@dataclass
class RouterRecord:
    """Router logits of one block over the calibration data."""

    router: RouterSpec
    logits: list[torch.Tensor] = field(default_factory=list)
    correction_bias: torch.Tensor | None = None

    def all_logits(self) -> torch.Tensor:
        """[tokens, E]"""
        return torch.cat(self.logits)


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if hasattr(model, "config") and hasattr(model, "generation_config"):
        return model(input_ids=batch, use_cache=False)
    return model(batch)


def record_router_logits(
    model: torch.nn.Module, batches: Iterable[Any], show_progress: bool = True
) -> dict[str, RouterRecord]:
    """Run ``model`` over ``batches`` and record each MoE block's router logits."""
    records: dict[str, RouterRecord] = {}

    def hook(config: ops.RouteConfig, logits: torch.Tensor, x: torch.Tensor | None) -> None:
        record = records.setdefault(config.block, RouterRecord(config.router))
        record.logits.append(logits.detach().float().reshape(-1, logits.shape[-1]))

    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
    with ops.capture_routes(hook), torch.no_grad():
        for batch in progress(list(batches), "calibration: recording router logits", enabled=show_progress):
            _call(compiled, batch)
    if not records:
        raise PolicyError("calibration found no MoE block the backend can rewrite in this model")
    for path, record in records.items():
        if record.router.has_correction_bias:
            record.correction_bias = _correction_bias(model, path)
    return records


def _correction_bias(model: torch.nn.Module, path: str) -> torch.Tensor | None:
    block = model.get_submodule(path) if path else model
    for name, buffer in block.named_buffers():
        if "correction_bias" in name:
            return buffer.detach().float()
    return None


def _block_spec(path: str, record: RouterRecord) -> MoEBlockSpec:
    return MoEBlockSpec(path=path, router=record.router, experts=None, layer_index=layer_index_of(path))


def average_k(policy: Policy, records: dict[str, RouterRecord]) -> float:
    """Average experts per token over all blocks if ``policy`` routed the recorded logits."""
    total_k, total_tokens = 0.0, 0
    for path, record in records.items():
        resolved = policy.resolve(_block_spec(path, record))
        rule = get_rule(resolved.rule, resolved.params) if resolved.rule != "static" else None
        if resolved.uses_x:
            raise PolicyError(f"policy {policy.name!r} needs the block input; calibrate() fits training-free policies")
        logits = record.all_logits()
        ids, _ = route(
            logits,
            record.router,
            rule,
            k_min=resolved.k_min,
            k_max=resolved.k_max,
            correction_bias=record.correction_bias,
            renormalize=resolved.renormalize,
        )
        total_k += float((ids < record.router.num_experts).sum())
        total_tokens += logits.shape[0]
    return total_k / max(total_tokens, 1)


def _bisect(
    make: Callable[[float], Policy], records: dict[str, RouterRecord], target: float, low: float, high: float, increasing: bool, log_scale: bool = False, steps: int = 40
) -> Policy:
    """The policy whose average k is closest to ``target`` for a parameter in [low, high]."""
    best, best_gap = None, math.inf
    for _ in range(steps):
        mid = math.sqrt(low * high) if log_scale else (low + high) / 2
        policy = make(mid)
        achieved = average_k(policy, records)
        gap = abs(achieved - target)
        if gap < best_gap:
            best, best_gap = policy, gap
        if (achieved < target) == increasing:
            low = mid
        else:
            high = mid
    logger.info("calibrated %s: average k %.3f for target %.3f", best.describe(), average_k(best, records), target)
    return best


def _ratios(records: dict[str, RouterRecord]) -> dict[str, torch.Tensor]:
    """Per block, p_2 / p_1 of every token (in the router's probability form)."""
    from moepass.runtime.routing import rank_experts

    ratios = {}
    for path, record in records.items():
        ranked = rank_experts(record.all_logits(), record.router, min(2, record.router.num_experts), record.correction_bias)
        probs = ranked.probs
        ratios[path] = probs[:, 1] / probs[:, 0].clamp_min(1e-30) if probs.shape[1] > 1 else torch.zeros(probs.shape[0])
    return ratios


def _skip_ratio_at(quantile: float, ratios: dict[str, torch.Tensor], params: dict) -> Policy:
    beta = {path: float(torch.quantile(r.double(), quantile)) for path, r in ratios.items()}
    return make_policy("skip_ratio", beta=beta, **params)


def layer_sensitivities(
    model: torch.nn.Module,
    block_paths: list[str],
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """F_l per block: E[‖∂L/∂y‖²] · E[‖y‖²] / H over the calibration tokens (eager autograd)."""
    outputs: dict[str, list[torch.Tensor]] = {p: [] for p in block_paths}
    handles = []
    for path in block_paths:
        module = model.get_submodule(path) if path else model

        def keep(_module, _inputs, output, path=path):
            tensor = output[0] if isinstance(output, tuple) else output
            tensor.retain_grad()
            outputs[path].append(tensor)

        handles.append(module.register_forward_hook(keep))
    grad_norm = {p: 0.0 for p in block_paths}
    out_norm = {p: 0.0 for p in block_paths}
    tokens = {p: 0 for p in block_paths}
    try:
        for batch in progress(list(batches), "calibration: layer sensitivities", enabled=show_progress):
            for p in block_paths:
                outputs[p].clear()
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                if loss_fn is not None:
                    loss = loss_fn(model, batch)
                elif isinstance(batch, torch.Tensor) and hasattr(model, "generation_config"):
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                else:
                    raise PolicyError("sensitivity calibration needs a loss: pass loss_fn(model, batch)")
                loss.backward()
            for p in block_paths:
                for y in outputs[p]:
                    if y.grad is None:
                        continue
                    flat_y = y.detach().reshape(-1, y.shape[-1]).float()
                    # the loss is a mean over the batch's tokens: per-token
                    # loss gradients are the batch size times larger
                    flat_g = y.grad.reshape(-1, y.shape[-1]).float() * flat_y.shape[0]
                    grad_norm[p] += float((flat_g**2).sum())
                    out_norm[p] += float((flat_y**2).sum())
                    tokens[p] += flat_y.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    sensitivities = {}
    for p in block_paths:
        if tokens[p] == 0:
            raise PolicyError(f"block {p or '<root>'}: no gradient reached it during sensitivity calibration")
        hidden = outputs[p][0].shape[-1] if outputs[p] else 1
        sensitivities[p] = max((grad_norm[p] / tokens[p]) * (out_norm[p] / tokens[p]) / hidden, 1e-30)
    return sensitivities


def calibrate(
    model: torch.nn.Module,
    batches: Iterable[Any],
    policy: str = "sensitivity",
    *,
    target_avg_k: float | None = None,
    flops_budget: float | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    show_progress: bool = True,
    **params: Any,
) -> Policy:
    """Fit ``policy``'s parameters on ``batches`` to hit a compute target.

    Args:
        model: the (eager) model; it is compiled with the backend internally.
        batches: calibration inputs (token id tensors for transformers LMs,
            dicts of keyword arguments, or argument tuples).
        policy: one of ``threshold``, ``top_p``, ``sensitivity``, ``skip_ratio``.
        target_avg_k: the average number of experts per token to aim for.
        flops_budget: alternatively, expert FLOPs as a fraction of static
            (0.75 = 25% fewer); converted with the blocks' native k.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for sensitivity when the
            model is not a transformers causal LM.
        show_progress: progress bars.
        **params: fixed parameters of the policy (k_min, k_max, renormalize...).

    Returns:
        The calibrated policy (save it with ``policy.save(dir)``).
    """
    if policy not in CALIBRATABLE:
        raise PolicyError(f"calibrate() fits {', '.join(CALIBRATABLE)}; got {policy!r}")
    if target_avg_k is not None and flops_budget is not None:
        raise PolicyError("give target_avg_k or flops_budget, not both")
    batches = list(batches)
    if not batches:
        raise PolicyError("calibrate() needs at least one batch")
    records = record_router_logits(model, batches, show_progress)
    native = max(r.router.top_k for r in records.values())
    if flops_budget is not None:
        if not 0.0 < flops_budget <= 1.0:
            raise PolicyError(f"flops_budget must be in (0, 1], got {flops_budget}")
        target_avg_k = flops_budget * native
    if target_avg_k is not None and not 0.0 < target_avg_k <= native:
        raise PolicyError(f"target_avg_k must be in (0, {native}] (the native k), got {target_avg_k}")

    if policy == "threshold":
        if target_avg_k is None:
            return make_policy("threshold", **params)
        return _bisect(lambda t: make_policy("threshold", T=t, **params), records, target_avg_k, 0.0, 1.0, increasing=True)
    if policy == "top_p":
        if target_avg_k is None:
            return make_policy("top_p", **params)
        return _bisect(lambda p: make_policy("top_p", p=p, **params), records, target_avg_k, 1e-6, 1.0, increasing=True)
    if policy == "skip_ratio":
        ratios = _ratios(records)
        if target_avg_k is None:  # Lu et al.: the per-layer median
            return _skip_ratio_at(0.5, ratios, params)
        return _bisect(lambda q: _skip_ratio_at(q, ratios, params), records, target_avg_k, 0.0, 1.0, increasing=False)
    sensitivities = layer_sensitivities(model, sorted(records), batches, loss_fn, show_progress)
    logger.info("layer sensitivities: %s", {k: f"{v:.3g}" for k, v in sensitivities.items()})
    if target_avg_k is None:
        return make_policy("sensitivity", sensitivity=sensitivities, **params)
    return _bisect(
        lambda t: make_policy("sensitivity", T=t, sensitivity=sensitivities, **params),
        records,
        target_avg_k,
        1e-12,
        1e6,
        increasing=False,
        log_scale=True,
        steps=60,
    )

