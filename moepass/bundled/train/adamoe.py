"""AdaMoE null experts for the bundled model: extra router rows and a short fine-tune.

AdaMoE (arXiv 2406.13233) adds m *null experts* to each router: their
logits are x · R_lᵀ for m learned rows R_l [m, H], the token takes the top-k
(k raised above the model's own) of the E + m logits, and the null picks cost
nothing::

    init        R_l = the gate's rows tiled to m rows (+ a 1e-3 relative nudge that
                breaks the exact ties between a row and its copy)
    fine-tune   loss = next-byte CE (routing: top-k over E+m, real picks
                renormalised over the real survivors, as the policy runs)
                     + α · (E+m) · Σ_i f_i P_i      with f of every null expert
                       replaced by the mean over the null experts
    save        NullExperts(k, router_rows={path: R_l}) + overlay.safetensors
                holding only what the fine-tune changed: the gate rows and,
                for the experts, rank-r LoRA factors (the paper fine-tunes with
                QLoRA r=8); :func:`moepass.bundled.load_model` merges them

The language-model loss does not reach R_l (renormalising over the real
survivors makes the real weights independent of the null logits, as in the
paper's code); the load-balancing term alone trains it, which makes the null
pool take about m/(E+m) of the k slots.  Which tokens get fewer experts is
therefore not learned from the loss, and some get none or three: the experts
must be fine-tuned to live with that (router-only fine-tuning leaves the
bundled model +32% in perplexity at average k 1.5).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from moepass.bundled.train.routed import Observation, moe_layers, routed
from moepass.runtime.progress import progress

__all__ = ["AdaMoEConfig", "AdaMoEResult", "tiled_null_rows", "null_balance_loss", "finetune_null_experts", "main"]

logger = logging.getLogger(__name__)

#: Which parameters the fine-tune changes in full, by name pattern
#: ("lora" also trains rank-r factors of every expert weight).
TRAINABLE = {
    "router": ("mlp.gate.weight",),
    "lora": ("mlp.gate.weight",),
    "moe": ("mlp.gate.weight", "mlp.experts."),
}
#: Suffixes of LoRA factors in an overlay: the weight gains ``B @ A``.
LORA_A, LORA_B = ".lora_A", ".lora_B"


class LowRankDelta(torch.nn.Module):
    """Parametrisation W → W + B·A of a stacked [E, out, in] expert weight (B starts at 0)."""

    def __init__(self, shape: torch.Size, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        experts, out_features, in_features = shape
        self.scale = alpha / rank
        self.A = torch.nn.Parameter(torch.randn(experts, rank, in_features, generator=generator) / math.sqrt(in_features))
        self.B = torch.nn.Parameter(torch.zeros(experts, out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * torch.bmm(self.B, self.A)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, scale·B): the overlay's factors."""
        return self.A.detach().clone(), (self.scale * self.B).detach().clone()


@dataclass
class AdaMoEConfig:
    """Hyper-parameters of the null-expert fine-tune."""

    #: Null experts per layer (m) and the raised k (paper defaults m=8, k=3).
    null_experts: int = 8
    k: int = 3
    #: Load-balancing coefficient α (the paper starts at 0.02).
    balance: float = 0.02
    #: Which parameters besides the null rows train: see :data:`TRAINABLE`.
    trainable: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    steps: int = 300
    lr: float = 2e-3
    null_lr: float = 5e-3
    warmup: int = 20
    batch_size: int = 16
    seq_len: int = 256
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1


@dataclass
class AdaMoEResult:
    """Null router rows, the changed parameters and the fine-tune's curve."""

    #: Block path → R_l [m, H].
    router_rows: dict[str, torch.Tensor]
    #: Overlay: parameter name → new value, and ``<name>.lora_A`` /
    #: ``<name>.lora_B`` factors (only what the fine-tune changed).
    changed: dict[str, torch.Tensor]
    config: AdaMoEConfig
    #: (step, CE, balance loss, average real k) over logging intervals.
    curve: list[tuple[int, float, float, float]] = field(default_factory=list)
    seconds: float = 0.0

    def policy(self):
        """The :class:`~moepass.policies.NullExperts` policy with the trained rows."""
        from moepass.policies import NullExperts

        return NullExperts(k=self.config.k, router_rows={p: r.detach().clone() for p, r in self.router_rows.items()})


def tiled_null_rows(gate: torch.Tensor, m: int, generator: torch.Generator, nudge: float = 1e-3) -> torch.Tensor:
    """m rows made by tiling the gate's E rows, each nudged by ``nudge`` × the gate's scale."""
    rows = gate.detach().float()[torch.arange(m) % gate.shape[0]].clone()
    return rows + nudge * float(gate.detach().float().std()) * torch.randn(rows.shape, generator=generator)


def null_balance_loss(logits: list[torch.Tensor], num_experts: int, k: int) -> torch.Tensor:
    """AdaMoE's load-balancing loss over layers' [T, E+m] logits (null f_i averaged over nulls)."""
    combined = torch.cat([l.float() for l in logits])
    total = combined.shape[1]
    probs = torch.softmax(combined, dim=-1)
    picked = torch.topk(probs, k, dim=-1)[1]
    counts = F.one_hot(picked, total).float().mean(dim=0)  # [k, E+m]
    if total > num_experts:
        null_mean = counts[:, num_experts:].mean(dim=1, keepdim=True)
        counts = torch.cat([counts[:, :num_experts], null_mean.expand(-1, total - num_experts)], dim=1)
    return total * (counts * probs.mean(dim=0).unsqueeze(0)).sum()


def _null_rule(k: int, rows: torch.Tensor):
    from moepass.policies.rules import get_rule

    rule = get_rule("null_experts", {"k": k})

    def bound(context):
        context.tensors = [rows.detach()]
        return rule(context)

    return bound


def finetune_null_experts(model, config: AdaMoEConfig, train_stream: torch.Tensor | None = None, show_progress: bool = True) -> AdaMoEResult:
    """Add null experts to ``model``'s Mixtral blocks and fine-tune (``model`` is changed in place)."""
    from moepass.bundled import corpus

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    stream = corpus.token_stream("train") if train_stream is None else train_stream
    generator = torch.Generator().manual_seed(config.seed)
    layers = moe_layers(model)
    num_experts = layers[0].module.experts.num_experts
    rows = {
        layer.path: tiled_null_rows(layer.module.gate.weight, config.null_experts, generator).requires_grad_(True)
        for layer in layers
    }
    patterns = TRAINABLE[config.trainable]
    trainable = {name: p for name, p in model.named_parameters() if any(pattern in name for pattern in patterns)}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    before = {name: p.detach().clone() for name, p in trainable.items()}
    deltas: dict[str, LowRankDelta] = {}
    if config.trainable == "lora":
        from torch.nn.utils import parametrize

        for layer in layers:
            experts = layer.module.experts
            for weight in ("gate_up_proj", "down_proj"):
                delta = LowRankDelta(getattr(experts, weight).shape, config.lora_rank, config.lora_alpha, generator)
                parametrize.register_parametrization(experts, weight, delta)
                deltas[f"{layer.path}.experts.{weight}"] = delta
        for delta in deltas.values():
            trainable.update({f"lora{id(delta)}.{n}": p for n, p in delta.named_parameters()})
    optimizer = torch.optim.AdamW(
        [{"params": list(trainable.values()), "lr": config.lr, "weight_decay": 0.0},
         {"params": list(rows.values()), "lr": config.null_lr, "weight_decay": 0.0}],
        betas=(0.9, 0.95),
    )
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def observe(obs: Observation) -> None:
        seen.append((obs.x, obs.logits, obs.ids, obs.layer))

    rules = [_null_rule(config.k, rows[layer.path]) for layer in layers]
    model.train()
    curve = []
    sums = [0.0, 0.0, 0.0, 0]
    with routed(model, rules, k_min=0, k_max=min(config.k, num_experts), observe=observe):
        for step in progress(range(config.steps), "AdaMoE fine-tune", enabled=show_progress):
            scale = min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * scale
            ids = corpus.random_windows(stream, config.seq_len, config.batch_size, generator)
            seen.clear()
            logits = model(input_ids=ids, use_cache=False).logits
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            combined = [torch.cat([lg, x @ rows[layers[i].path].t()], dim=1) for x, lg, _, i in seen]
            balance = null_balance_loss(combined, num_experts, config.k)
            loss = ce + config.balance * balance
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trainable.values()) + list(rows.values()), config.grad_clip)
            optimizer.step()
            real_k = sum(float((i_ds < num_experts).sum()) for _, _, i_ds, _ in seen) / sum(x.shape[0] for x, _, _, _ in seen)
            sums = [sums[0] + float(ce.detach()), sums[1] + float(balance.detach()), sums[2] + real_k, sums[3] + 1]
            if (step + 1) % max(1, config.steps // 10) == 0 or step == config.steps - 1:
                curve.append((step + 1, sums[0] / sums[3], sums[1] / sums[3], sums[2] / sums[3]))
                logger.info("step %d: CE %.4f, balance %.4f, average real k %.3f", *curve[-1])
                sums = [0.0, 0.0, 0.0, 0]
    model.eval()
    changed = {
        name: p.detach().clone() for name, p in trainable.items() if name in before and not torch.equal(p.detach(), before[name])
    }
    if deltas:
        from torch.nn.utils import parametrize

        for name, delta in deltas.items():
            a, b = delta.factors()
            changed[name + LORA_A], changed[name + LORA_B] = a, b
            module_path, weight = name.rsplit(".", 1)
            parametrize.remove_parametrizations(model.get_submodule(module_path), weight, leave_parametrized=True)
    for param in model.parameters():
        param.requires_grad_(False)
    return AdaMoEResult({p: r.detach() for p, r in rows.items()}, changed, config, curve, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    """``python -m moepass.bundled.train.adamoe``: fine-tune null experts on the bundled model and save the policy."""
    from safetensors.torch import save_file

    from moepass import bundled

    defaults = AdaMoEConfig()
    parser = argparse.ArgumentParser(prog="python -m moepass.bundled.train.adamoe", description="AdaMoE null experts on the bundled model.")
    parser.add_argument("--out", default=str(bundled.policy_dir("null_experts")))
    parser.add_argument("--null-experts", type=int, default=defaults.null_experts)
    parser.add_argument("--k", type=int, default=defaults.k)
    parser.add_argument("--balance", type=float, default=defaults.balance)
    parser.add_argument("--trainable", choices=sorted(TRAINABLE), default=defaults.trainable)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = AdaMoEConfig(
        null_experts=args.null_experts, k=args.k, balance=args.balance, trainable=args.trainable,
        steps=args.steps, lr=args.lr, lora_rank=args.lora_rank, seed=args.seed,
    )
    model = bundled.load_model()
    result = finetune_null_experts(model, config)
    out = Path(args.out)
    result.policy().save(out)
    overlay = out / "overlay.safetensors"
    if result.changed:
        save_file({n: t.to(torch.bfloat16).contiguous() for n, t in result.changed.items()}, str(overlay), metadata={"format": "pt"})
    elif overlay.exists():
        overlay.unlink()
    log = {
        "command": ("python -m moepass.bundled.train.adamoe " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))).strip(),
        "config": asdict(config),
        "seconds": result.seconds,
        "curve": result.curve,
        "overlay_parameters": sorted(result.changed),
    }
    (out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    logger.info("saved the null-experts policy (+%d changed tensors) to %s (%.0f s)", len(result.changed), out, result.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
