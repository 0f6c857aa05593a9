"""Quality against compute: run routing policies through the compiled model.

::

    for each policy:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="adaptive_moe",
                                 options={"policy": policy, "stats": True, "inner": "eager"})
        held-out batches ─► compiled ─► logits ─► next-byte NLL, accuracy
                                      └► moepass.runtime.stats ─► tokens per k per block ─► average k

Average k comes from the run-time counters of the compiled experts op, so it
counts exactly the expert work that ran.  Expert FLOPs relative to static are
``average k / native k`` (every expert has the same shape; the allocator's
and null rows' extra [H, N] products are < 1% of one expert and left out).
Each evaluation resets dynamo first so every policy gets a fresh compile
(compiled code of earlier policies is discarded; a model compiled elsewhere
recompiles on its next call).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from moepass.bundled.corpus import BOUNDARY
from moepass.runtime.progress import progress

__all__ = [
    "EvalResult",
    "PolicyRun",
    "score_logits",
    "evaluate_eager",
    "evaluate_policy",
    "evaluate_policies",
    "sweep",
    "relative_to",
    "format_table",
    "pareto_plot",
]

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """One policy on one set of batches."""

    #: Short name for tables (``static``, ``top_p``, ``ada_k``, ...).
    label: str
    #: The setting shown beside it (``p=0.4``, ``calibrated to k=1.5``).
    setting: str
    #: ``policy.describe()``.
    policy: str
    #: Mean experts per token over all blocks (from the run-time counters).
    average_k: float
    native_k: int
    #: Mean experts per token per block path.
    layer_k: dict[str, float]
    #: Mean next-byte negative log-likelihood, nats per byte.
    nll: float
    #: Share of bytes whose most likely prediction is right.
    accuracy: float
    #: Bytes scored.
    tokens: int
    seconds: float
    #: Filled by :func:`relative_to`: relative change of perplexity and
    #: accuracy against the baseline (0.01 = +1%).
    perplexity_change: float | None = None
    accuracy_change: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def flops_ratio(self) -> float:
        """Expert FLOPs relative to the model's static top-k."""
        return self.average_k / self.native_k

    @property
    def perplexity(self) -> float:
        """Per-byte perplexity, exp(nll)."""
        return math.exp(self.nll)

    @property
    def bits_per_byte(self) -> float:
        """nll in bits."""
        return self.nll / math.log(2)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers."""
        return {
            "label": self.label,
            "setting": self.setting,
            "policy": self.policy,
            "average_k": self.average_k,
            "flops_ratio": self.flops_ratio,
            "nll": self.nll,
            "perplexity": self.perplexity,
            "accuracy": self.accuracy,
            "perplexity_change": self.perplexity_change,
            "accuracy_change": self.accuracy_change,
            "layer_k": self.layer_k,
            "tokens": self.tokens,
            "seconds": self.seconds,
        }


@dataclass
class PolicyRun:
    """A policy to evaluate, with its table label and, optionally, its own model.

    ``model`` is for policies that came with fine-tuned weights (AdaMoE's
    null experts); None uses the model given to :func:`evaluate_policies`.
    """

    label: str
    policy: Any
    setting: str = ""
    model: Any = None


def score_logits(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int, int]:
    """(summed NLL in nats, correct predictions, bytes scored) of next-byte prediction.

    Position t predicts ``ids[:, t + 1]``; targets that are the file-boundary
    id are not bytes and are not scored.
    """
    targets = ids[:, 1:].reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    mask = targets != BOUNDARY
    nll = F.cross_entropy(flat[mask], targets[mask], reduction="sum")
    correct = (flat[mask].argmax(dim=-1) == targets[mask]).sum()
    return float(nll), int(correct), int(mask.sum())


def _forward_all(model, batches: Sequence[torch.Tensor], description: str, show_progress: bool) -> tuple[float, int, int]:
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for ids in progress(batches, description, enabled=show_progress):
            logits = model(input_ids=ids, use_cache=False).logits
            nll, hits, n = score_logits(logits, ids)
            total, correct, count = total + nll, correct + hits, count + n
    return total, correct, count


def evaluate_eager(model, batches: Iterable[torch.Tensor], label: str = "eager", show_progress: bool = False) -> EvalResult:
    """The uncompiled model's own numbers (its native top-k), for reference."""
    batches = list(batches)
    started = time.perf_counter()
    total, correct, count = _forward_all(model, batches, f"eval {label}", show_progress)
    native = int(model.config.num_experts_per_tok)
    return EvalResult(
        label=label,
        setting="transformers, not compiled",
        policy="eager",
        average_k=float(native),
        native_k=native,
        layer_k={},
        nll=total / max(count, 1),
        accuracy=correct / max(count, 1),
        tokens=count,
        seconds=time.perf_counter() - started,
    )


def evaluate_policy(
    model,
    policy,
    batches: Iterable[torch.Tensor],
    *,
    label: str | None = None,
    setting: str = "",
    inner: str = "eager",
    show_progress: bool = False,
    options: dict[str, Any] | None = None,
) -> EvalResult:
    """Compile ``model`` with ``policy`` and score it on ``batches``.

    Args:
        model: a transformers causal LM (e.g. :func:`moepass.bundled.load_model`).
        policy: a :class:`moepass.policies.Policy` or a policy name.
        batches: ``[B, S]`` token-id tensors (e.g. :func:`moepass.bundled.heldout_batches`).
        label, setting: what the table shows (default: the policy's name / description).
        inner: the backend's inner compiler (``eager`` compiles fastest).
        show_progress: progress bar over the batches.
        options: more backend options (``{"experts_dtype": "int4", "group_size": 64}``).

    Returns:
        An :class:`EvalResult` whose average k comes from the compiled model's
        run-time counters.
    """
    from moepass.policies import make_policy
    from moepass.runtime import stats

    if isinstance(policy, str):
        policy = make_policy(policy)
    batches = list(batches)
    label = label or policy.name
    torch._dynamo.reset()
    stats.reset_stats()
    started = time.perf_counter()
    compiled = torch.compile(
        model, backend="adaptive_moe", options={**(options or {}), "policy": policy, "stats": True, "inner": inner}
    )
    total, correct, count = _forward_all(compiled, batches, f"eval {label} {setting}".strip(), show_progress)
    seconds = time.perf_counter() - started
    counters = stats.routing_stats()
    if not counters:
        raise RuntimeError(
            f"no MoE block of {type(model).__name__} ran through moepass with {policy.describe()}: "
            f"see moepass.report(model)"
        )
    layer_k = {path: s.average_k for path, s in sorted(counters.items())}
    routed = sum(sum(k * n for k, n in enumerate(s.tokens_per_k)) for s in counters.values())
    tokens = sum(s.tokens for s in counters.values())
    result = EvalResult(
        label=label,
        setting=setting or _default_setting(policy),
        policy=policy.describe(),
        average_k=routed / max(tokens, 1),
        native_k=int(model.config.num_experts_per_tok),
        layer_k=layer_k,
        nll=total / max(count, 1),
        accuracy=correct / max(count, 1),
        tokens=count,
        seconds=seconds,
    )
    logger.info(
        "%s %s: average k %.3f, nll %.4f, accuracy %.4f (%.1f s)",
        result.label, result.setting, result.average_k, result.nll, result.accuracy, seconds,
    )
    return result


def _default_setting(policy) -> str:
    text = policy.describe()
    inside = text[text.index("(") + 1 : -1] if "(" in text else ""
    return inside or "native top-k"


def relative_to(results: Sequence[EvalResult], baseline: EvalResult) -> list[EvalResult]:
    """Copies of ``results`` with perplexity and accuracy changes against ``baseline``."""
    return [
        replace(
            r,
            perplexity_change=r.perplexity / baseline.perplexity - 1,
            accuracy_change=r.accuracy / baseline.accuracy - 1,
        )
        for r in results
    ]


def evaluate_policies(
    model,
    runs: Sequence[PolicyRun | tuple[str, Any]],
    batches: Iterable[torch.Tensor],
    *,
    baseline: str = "static",
    inner: str = "eager",
    show_progress: bool = True,
    options: dict[str, Any] | None = None,
) -> list[EvalResult]:
    """Evaluate every run and fill the changes against the run labelled ``baseline``.

    A static run is added first when none is labelled ``baseline``; ``options``
    are more backend options for every run (``{"experts_dtype": "int4"}``).
    """
    from moepass.policies import Static

    batches = list(batches)
    runs = [r if isinstance(r, PolicyRun) else PolicyRun(r[0], r[1]) for r in runs]
    if not any(r.label == baseline for r in runs):
        runs = [PolicyRun(baseline, Static())] + list(runs)
    results = []
    for run in progress(runs, "policies", enabled=show_progress):
        results.append(
            evaluate_policy(run.model or model, run.policy, batches, label=run.label, setting=run.setting, inner=inner,
                            options=options)
        )
    base = next(r for r in results if r.label == baseline)
    return relative_to(results, base)


def sweep(
    model,
    name: str,
    values: Sequence[float],
    batches: Iterable[torch.Tensor],
    *,
    make=None,
    inner: str = "eager",
    show_progress: bool = True,
) -> list[EvalResult]:
    """Evaluate policy ``name`` at each of ``values`` of its free parameter.

    ``make(value) -> Policy`` builds each policy (default: the parameter
    ``T`` of threshold/sensitivity, ``p`` of top_p, ``beta`` of skip_ratio).
    """
    from moepass.policies import make_policy

    if make is None:
        parameter = {"threshold": "T", "top_p": "p", "sensitivity": "T", "skip_ratio": "beta"}.get(name)
        if parameter is None:
            raise ValueError(f"sweep() needs make= for policy {name!r}")

        def make(value):
            return make_policy(name, **{parameter: value})

    batches = list(batches)
    results = []
    for value in progress(list(values), f"sweep {name}", enabled=show_progress):
        policy = make(value)
        results.append(evaluate_policy(model, policy, batches, label=name, setting=f"{value:g}", inner=inner))
    return results


def _percent(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value * 100:+.{digits}f}%"


def format_table(results: Sequence[EvalResult]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the quality-versus-compute table."""
    header = ["policy", "setting", "avg k", "expert FLOPs", "perplexity/byte", "bits/byte", "next-byte acc", "Δ ppl", "Δ acc"]
    rows = [
        [
            r.label,
            r.setting,
            f"{r.average_k:.3f}",
            f"{r.flops_ratio * 100:.1f}%",
            f"{r.perplexity:.4f}",
            f"{r.bits_per_byte:.4f}",
            f"{r.accuracy * 100:.2f}%",
            _percent(r.perplexity_change),
            _percent(r.accuracy_change),
        ]
        for r in results
    ]
    return header, rows


def pareto_plot(series: dict[str, Sequence[EvalResult]], path, baseline: EvalResult | None = None, points: Sequence[EvalResult] = (), title: str = "") -> None:
    """Perplexity against expert FLOPs, one line per sweep, one marker per single point (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 5))
    for name, results in series.items():
        ordered = sorted(results, key=lambda r: r.flops_ratio)
        axes.plot([r.flops_ratio * 100 for r in ordered], [r.perplexity for r in ordered], marker="o", markersize=3, label=name)
    markers = ["*", "P", "X", "D", "^", "v", "s"]
    for i, r in enumerate(points):
        axes.scatter(
            [r.flops_ratio * 100], [r.perplexity], marker=markers[i % len(markers)], s=90, zorder=5,
            color="black" if i % 2 == 0 else "dimgrey", label=f"{r.label} ({r.setting})",
        )
    if baseline is not None:
        axes.axhline(baseline.perplexity, color="grey", linestyle=":", linewidth=1)
        axes.axhline(baseline.perplexity * 1.01, color="grey", linestyle="--", linewidth=1, label="static +1% ppl")
        axes.axvline(75, color="grey", linestyle="-.", linewidth=1, label="75% expert FLOPs")
    axes.set_xlabel("expert FLOPs, % of static top-2")
    axes.set_ylabel("held-out perplexity per byte")
    axes.set_title(title or "quality against compute")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(str(path), dpi=120)
    plt.close(figure)
