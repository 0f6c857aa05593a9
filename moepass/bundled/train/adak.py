"""Ada-K allocators for the bundled model: top-p warm start, then PPO.

Ada-K (arXiv 2410.10456) gives every MoE layer l a bias-free linear
allocator W_l [H, N]; a token with block input x gets k ~ softmax(x W_l) + 1
experts (argmax at inference) from the frozen router's renormalised top-k.
Everything but the allocators is frozen::

    warm start   x_l, k_l under top-p(p) routing ──► cross-entropy(x_l W_l, k_l − 1)
    PPO, per iteration on a batch of train windows:
        default forward  (native top-k)       ──► r_def[t]  = log p(byte_{t+1} | ≤ t)
        rollout forward  (k ~ π_l(·|x_l))     ──► r_smp[t], and x_l, k_l of every layer
        advantage        A_l[t] = γ^(L−1−l) · (r_smp[t] − r_def[t])
        epochs × :  −mean min(ρ A, clip(ρ, 1±ε) A) + λ · mean_l mean_t Σ_n n π_l(n|x)
                    ρ = π_new(k|x) / π_old(k|x)

The result is saved as an :class:`moepass.policies.Allocator` policy.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from moepass.bundled.train.routed import Observation, moe_layers, routed, routed_policy
from moepass.runtime.progress import progress

__all__ = ["AdaKConfig", "AdaKResult", "pseudo_labels", "warm_start", "ppo", "train_allocators", "main"]

logger = logging.getLogger(__name__)


@dataclass
class AdaKConfig:
    """Hyper-parameters of allocator training (defaults: the paper's where they apply)."""

    #: k ranges over 1..max_k.
    max_k: int = 4
    #: Warm start: top-p pseudo-labels.  The paper uses p = 0.3 on Mixtral-8x7B;
    #: the bundled model's routers are sharper (median p_1 ≈ 0.6-0.75), where
    #: top-p(0.3) is top-1 for 95% of tokens (average k 1.1), and PPO then
    #: climbs back only slowly; p = 0.6 starts near the budget (average k ≈ 1.5).
    warm_p: float = 0.6
    warm_batches: int = 8
    warm_steps: int = 300
    warm_lr: float = 1e-2
    #: PPO.
    iterations: int = 600
    epochs: int = 2
    #: Allocator learning rate (paper: 1e-3 with batches of 64 sequences).
    lr: float = 3e-3
    clip: float = 0.2
    #: FLOPs penalty weight λ on the expected k, in nats per expert (paper:
    #: 3e-3; on the bundled model 3e-3 settles at average k 1.55, 1e-2 at 1.37).
    flops_penalty: float = 1e-2
    #: Discount γ^(L−1−l) of the shared per-token advantage for earlier layers.
    gamma: float = 0.95
    batch_size: int = 16
    seq_len: int = 256
    seed: int = 0
    threads: int = 1


@dataclass
class AdaKResult:
    """Trained allocators and how training went."""

    #: Block path → W_l [H, max_k].
    weights: dict[str, torch.Tensor]
    config: AdaKConfig
    #: Warm-start cross-entropy at each logged step: (step, loss, accuracy).
    warm_curve: list[tuple[int, float, float]] = field(default_factory=list)
    #: Per PPO iteration: (iteration, mean advantage, mean expected k, surrogate loss).
    ppo_curve: list[tuple[int, float, float, float]] = field(default_factory=list)
    seconds: float = 0.0

    def policy(self):
        """The trained allocators as an :class:`~moepass.policies.Allocator` policy."""
        from moepass.policies import Allocator

        return Allocator(weights={path: w.detach().clone() for path, w in self.weights.items()})


def _rewards(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, S-1] log-likelihood of each next token."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def pseudo_labels(model, batches: Sequence[torch.Tensor], p: float, max_k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per block, (x_l [N, H], k_l [N]) with k_l the number of experts top-p(p) keeps (≤ max_k).

    The model runs with top-p routing itself, so each layer's inputs are those
    the allocator will see once earlier layers route adaptively too.
    """
    from moepass.policies import TopP

    layers = moe_layers(model)
    xs: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    ks: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}

    def observe(seen: Observation) -> None:
        xs[seen.layer].append(seen.x.detach())
        ks[seen.layer].append((seen.ids < seen.logits.shape[1]).sum(dim=1))

    with torch.no_grad(), routed_policy(model, TopP(p=p, k_max=max_k), observe=observe):
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    return {layer.path: (torch.cat(xs[layer.index]), torch.cat(ks[layer.index])) for layer in layers}


def warm_start(
    model, batches: Sequence[torch.Tensor], config: AdaKConfig, show_progress: bool = True
) -> tuple[dict[str, torch.Tensor], list[tuple[int, float, float]]]:
    """Allocators fitted to top-p pseudo-labels (the paper's supervised warm start)."""
    data = pseudo_labels(model, batches, config.warm_p, config.max_k)
    generator = torch.Generator().manual_seed(config.seed)
    weights = {}
    for path, (x, _labels) in data.items():
        w = (torch.randn(x.shape[1], config.max_k, generator=generator) * 0.01).requires_grad_(True)
        weights[path] = w
    optimizer = torch.optim.Adam(list(weights.values()), lr=config.warm_lr)
    curve = []
    for step in progress(range(config.warm_steps), "Ada-K warm start", enabled=show_progress):
        optimizer.zero_grad(set_to_none=True)
        losses, hits, count = [], 0, 0
        for path, (x, k) in data.items():
            scores = x @ weights[path]
            losses.append(F.cross_entropy(scores, k.clamp(min=1) - 1))
            hits += int((scores.argmax(dim=1) + 1 == k.clamp(min=1)).sum())
            count += k.numel()
        loss = torch.stack(losses).mean()
        loss.backward()
        optimizer.step()
        if step % max(1, config.warm_steps // 10) == 0 or step == config.warm_steps - 1:
            curve.append((step, float(loss.detach()), hits / count))
    label_k = {path: float(k.clamp(min=1).float().mean()) for path, (_, k) in data.items()}
    logger.info("warm start: pseudo-label average k per layer %s; final CE %.4f, accuracy %.3f", label_k, curve[-1][1], curve[-1][2])
    return {path: w.detach() for path, w in weights.items()}, curve


def _sampling_rules(weights: list[torch.Tensor], generator: torch.Generator, record: dict[int, list]):
    """Per layer, a k-rule sampling k ~ softmax(x W_l) + 1 and recording (x, k)."""

    def rule_for(index: int):
        def rule(context) -> torch.Tensor:
            x = context.x.detach().float()
            probs = torch.softmax(x @ weights[index], dim=1)
            k = torch.multinomial(probs, 1, generator=generator).squeeze(1) + 1
            record[index].append((x, k))
            return k

        return rule

    return rule_for


def ppo(
    model,
    weights: dict[str, torch.Tensor],
    batches,
    config: AdaKConfig,
    show_progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[tuple[int, float, float, float]]]:
    """PPO on the allocators of a frozen model (see the module docstring).

    Args:
        weights: initial allocators per block path (e.g. from :func:`warm_start`).
        batches: an iterable of ``[B, S]`` train windows, one per iteration.

    Returns:
        The trained allocators and, per iteration, (iteration, mean advantage
        of the last layer, mean expected k over layers, surrogate loss).
    """
    layers = moe_layers(model)
    params = [weights[layer.path].clone().requires_grad_(True) for layer in layers]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 1)
    n_layers = len(layers)
    curve = []
    for iteration, ids in enumerate(progress(batches, "Ada-K PPO", total=config.iterations, enabled=show_progress)):
        record: dict[int, list] = {layer.index: [] for layer in layers}
        with torch.no_grad():
            default = _rewards(model(input_ids=ids, use_cache=False).logits, ids)
            frozen = [p.detach().clone() for p in params]
            with routed(model, _sampling_rules(frozen, generator, record), k_min=1, k_max=config.max_k):
                sampled = _rewards(model(input_ids=ids, use_cache=False).logits, ids)
        # token t's routing is rewarded with the log-likelihood of byte t+1;
        # the last position of each window has no next byte
        gain = torch.cat([sampled - default, torch.zeros(ids.shape[0], 1)], dim=1).reshape(-1)
        valid = torch.cat([torch.ones_like(default), torch.zeros(ids.shape[0], 1)], dim=1).reshape(-1).bool()
        states = []
        for layer in layers:
            (x, k), = record[layer.index]
            advantage = (config.gamma ** (n_layers - 1 - layer.index)) * gain
            old = torch.log_softmax(x @ frozen[layer.index], dim=1).gather(1, (k - 1).unsqueeze(1)).squeeze(1)
            states.append((x[valid], k[valid], old[valid], advantage[valid]))
        surrogate = 0.0
        for _ in range(config.epochs):
            optimizer.zero_grad(set_to_none=True)
            policy_losses, expected_k = [], []
            for index, (x, k, old, advantage) in enumerate(states):
                logp_all = torch.log_softmax(x @ params[index], dim=1)
                logp = logp_all.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
                ratio = torch.exp(logp - old)
                clipped = torch.clamp(ratio, 1 - config.clip, 1 + config.clip)
                policy_losses.append(-torch.min(ratio * advantage, clipped * advantage).mean())
                choices = torch.arange(1, config.max_k + 1, dtype=logp_all.dtype)
                expected_k.append((logp_all.exp() * choices).sum(dim=1).mean())
            flops = torch.stack(expected_k).mean()
            loss = torch.stack(policy_losses).mean() + config.flops_penalty * flops
            loss.backward()
            optimizer.step()
            surrogate = float(loss.detach())
        curve.append((iteration, float(gain[valid].mean()), float(flops.detach()), surrogate))
        if iteration % max(1, config.iterations // 10) == 0:
            logger.info("PPO %d: mean log-lik gain %.4f, expected k %.3f", iteration, curve[-1][1], curve[-1][2])
        if iteration + 1 >= config.iterations:
            break
    return {layer.path: params[layer.index].detach() for layer in layers}, curve


def train_allocators(model, config: AdaKConfig, train_stream: torch.Tensor | None = None, show_progress: bool = True) -> AdaKResult:
    """Warm start and PPO on ``model`` (frozen) with windows of the train split."""
    from moepass.bundled import corpus

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    stream = corpus.token_stream("train") if train_stream is None else train_stream
    generator = torch.Generator().manual_seed(config.seed)

    def windows():
        while True:
            yield corpus.random_windows(stream, config.seq_len, config.batch_size, generator)

    warm_data = [corpus.random_windows(stream, config.seq_len, config.batch_size, generator) for _ in range(config.warm_batches)]
    weights, warm_curve = warm_start(model, warm_data, config, show_progress)
    weights, ppo_curve = ppo(model, weights, windows(), config, show_progress)
    return AdaKResult(weights, config, warm_curve, ppo_curve, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    """``python -m moepass.bundled.train.adak``: train the bundled model's allocators and save the policy."""
    from moepass import bundled

    defaults = AdaKConfig()
    parser = argparse.ArgumentParser(prog="python -m moepass.bundled.train.adak", description="Train Ada-K allocators (warm start + PPO) on the bundled model.")
    parser.add_argument("--out", default=str(bundled.policy_dir("ada_k")))
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--flops-penalty", type=float, default=defaults.flops_penalty)
    parser.add_argument("--max-k", type=int, default=defaults.max_k)
    parser.add_argument("--warm-p", type=float, default=defaults.warm_p)
    parser.add_argument("--gamma", type=float, default=defaults.gamma)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = AdaKConfig(
        max_k=args.max_k,
        warm_p=args.warm_p,
        iterations=args.iterations,
        flops_penalty=args.flops_penalty,
        gamma=args.gamma,
        lr=args.lr,
        seed=args.seed,
    )
    model = bundled.load_model()
    result = train_allocators(model, config)
    out = Path(args.out)
    result.policy().save(out)
    log = {
        "command": ("python -m moepass.bundled.train.adak " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))).strip(),
        "config": asdict(config),
        "seconds": result.seconds,
        "warm_curve": result.warm_curve,
        "ppo_curve": result.ppo_curve[:: max(1, len(result.ppo_curve) // 50)],
    }
    (out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    logger.info("saved the Ada-K allocator policy to %s (%.0f s)", out, result.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
