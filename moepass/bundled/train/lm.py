"""Train the bundled model: a small transformers Mixtral on stdlib bytes.

::

    stdlib train stream ──random windows [B, S]──► MixtralForCausalLM (8 experts, top-2)
         loss = next-byte cross-entropy + aux_coef · Mixtral load-balancing loss
         AdamW, linear warm-up, cosine decay; fixed seed; one thread
    ──► model.safetensors (bf16) + config.json + training.json

One thread by default: the result is then bit-reproducible, and on a shared
2-core machine one thread is faster than two (two OpenMP threads fighting a
neighbour's job run several times slower).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moepass.bundled import corpus
from moepass.runtime.progress import progress

__all__ = [
    "ModelShape",
    "TrainConfig",
    "TrainResult",
    "mixtral_config",
    "build_model",
    "next_byte_loss",
    "heldout_loss",
    "unigram_nats",
    "train_lm",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)


@dataclass
class ModelShape:
    """The Mixtral's size."""

    hidden: int = 128
    intermediate: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    experts: int = 8
    top_k: int = 2
    max_positions: int = 1024


@dataclass
class TrainConfig:
    """Everything that determines the trained weights."""

    shape: ModelShape = field(default_factory=ModelShape)
    steps: int = 1600
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    #: Weight of Mixtral's load-balancing loss (transformers' default is
    #: 0.001; a stronger pull keeps all 8 experts in use in a short run).
    aux_coef: float = 0.02
    seed: int = 0
    threads: int = 1
    #: Held-out tokens for the evaluations during and after training.
    eval_tokens: int = 65536
    eval_every: int = 200


@dataclass
class TrainResult:
    """A trained model and how it got there."""

    model: Any
    config: TrainConfig
    #: (step, mean training next-byte loss over the last interval, aux loss).
    curve: list[tuple[int, float, float]]
    #: Nats per byte on ``eval_tokens`` held-out / train bytes (final weights).
    heldout_nats: float
    train_nats: float
    unigram_nats: float
    seconds: float

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no model)."""
        bits = 1 / math.log(2)
        return {
            "heldout_nats_per_byte": self.heldout_nats,
            "heldout_bits_per_byte": self.heldout_nats * bits,
            "train_nats_per_byte": self.train_nats,
            "train_bits_per_byte": self.train_nats * bits,
            "unigram_nats_per_byte": self.unigram_nats,
            "unigram_bits_per_byte": self.unigram_nats * bits,
            "seconds": self.seconds,
            "curve": [list(point) for point in self.curve],
        }


def mixtral_config(shape: ModelShape, aux_coef: float = 0.02):
    """The transformers ``MixtralConfig`` of ``shape`` with the byte vocabulary."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=corpus.VOCAB_SIZE,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        max_position_embeddings=shape.max_positions,
        router_aux_loss_coef=aux_coef,
        router_jitter_noise=0.0,
        tie_word_embeddings=False,
        bos_token_id=corpus.BOUNDARY,
        eos_token_id=corpus.BOUNDARY,
        pad_token_id=None,
        sliding_window=None,
    )


def build_model(shape: ModelShape, seed: int = 0, aux_coef: float = 0.02):
    """A freshly initialised ``MixtralForCausalLM`` of ``shape`` (seeded)."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(mixtral_config(shape, aux_coef))


def next_byte_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``ids[:, 1:]`` from ``logits[:, :-1]``, bytes only.

    Targets that are the file-boundary id are left out, so the result is per byte.
    """
    targets = ids[:, 1:].reshape(-1)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, reduction="none")
    mask = targets != corpus.BOUNDARY
    if reduction == "none":
        return torch.where(mask, nll, torch.zeros_like(nll)).view(ids.shape[0], -1)
    if reduction == "sum":
        return nll[mask].sum()
    return nll[mask].mean()


@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-byte loss (nats/byte) of ``model`` over ``windows`` [W, S]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits
        total += float(next_byte_loss(logits, ids, reduction="sum"))
        count += int((ids[:, 1:] != corpus.BOUNDARY).sum())
    model.train(was_training)
    return total / max(count, 1)


def unigram_nats(train_stream: torch.Tensor, heldout_stream: torch.Tensor) -> float:
    """Held-out cross-entropy (nats/byte) of the train split's byte frequencies (add-one)."""
    train_bytes = train_stream[train_stream != corpus.BOUNDARY]
    counts = torch.bincount(train_bytes, minlength=256).double() + 1.0
    log_p = (counts / counts.sum()).log()
    heldout_bytes = heldout_stream[heldout_stream != corpus.BOUNDARY]
    return float(-log_p[heldout_bytes].mean())


def learning_rate(config, step: int) -> float:
    """Linear warm-up over ``config.warmup`` steps, then cosine decay to ``lr · min_lr_ratio``.

    ``config`` needs ``lr``, ``warmup``, ``steps`` and ``min_lr_ratio``.
    """
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress_ = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def optimisation_step(forward, model, optimizer: torch.optim.Optimizer, ids: torch.Tensor, config, step: int):
    """One training step of a causal LM: next-byte cross-entropy + ``config.aux_coef`` × the router
    load-balancing loss through ``forward`` (the model, or a compile of it), then a clipped AdamW step on
    ``model``'s parameters at :func:`learning_rate`; returns (lm_loss, aux_loss), detached."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    out = forward(input_ids=ids, use_cache=False, output_router_logits=True)
    lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss = lm_loss + config.aux_coef * out.aux_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return lm_loss.detach(), out.aux_loss.detach()


def _optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on norms (1-D) and the router (keeps routing sharp)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or name.endswith("gate.weight") else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def train_lm(
    config: TrainConfig,
    train_stream: torch.Tensor | None = None,
    heldout_stream: torch.Tensor | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train a Mixtral byte LM as ``config`` says.

    Args:
        config: model shape, optimisation and seed.
        train_stream / heldout_stream: token streams (default: the stdlib
            splits of :mod:`moepass.bundled.corpus`).
        show_progress: show a progress bar.
    """
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    train_stream = corpus.token_stream("train") if train_stream is None else train_stream
    heldout_stream = corpus.token_stream("heldout") if heldout_stream is None else heldout_stream
    heldout_windows = corpus.spaced_windows(heldout_stream, config.seq_len, config.eval_tokens)
    train_windows = corpus.spaced_windows(train_stream, config.seq_len, config.eval_tokens)

    model = build_model(config.shape, config.seed, config.aux_coef)
    model.train()
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    curve: list[tuple[int, float, float]] = []
    running_loss, running_aux, running_n = 0.0, 0.0, 0
    for step in progress(range(config.steps), "train bundled model", enabled=show_progress):
        ids = corpus.random_windows(train_stream, config.seq_len, config.batch_size, generator)
        lm_loss, aux_loss = optimisation_step(model, model, optimizer, ids, config, step)
        running_loss += float(lm_loss)
        running_aux += float(aux_loss)
        running_n += 1
        last = step == config.steps - 1
        if (config.eval_every and (step + 1) % config.eval_every == 0) or last:
            curve.append((step + 1, running_loss / running_n, running_aux / running_n))
            running_loss, running_aux, running_n = 0.0, 0.0, 0
            logger.info(
                "step %d: train loss %.4f, aux %.4f, lr %.2e, %.0f s",
                step + 1, curve[-1][1], curve[-1][2], learning_rate(config, step), time.perf_counter() - started,
            )
    model.eval()
    # the shipped weights are bf16: report the losses of exactly those
    _round_to_bf16_(model)
    result = TrainResult(
        model=model,
        config=config,
        curve=curve,
        heldout_nats=heldout_loss(model, heldout_windows),
        train_nats=heldout_loss(model, train_windows),
        unigram_nats=unigram_nats(train_stream, heldout_stream),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "done in %.0f s: held-out %.4f nats/byte, train %.4f, unigram %.4f",
        result.seconds, result.heldout_nats, result.train_nats, result.unigram_nats,
    )
    return result


@torch.no_grad()
def _round_to_bf16_(model) -> None:
    for param in model.parameters():
        param.copy_(param.to(torch.bfloat16).float())


def save_checkpoint(model, directory: str | Path, metadata: dict[str, Any] | None = None, dtype=torch.bfloat16) -> Path:
    """Write ``model.safetensors`` (``dtype``), ``config.json`` and ``training.json``.

    Returns the directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(directory / "config.json"))
    if metadata is not None:
        (directory / "training.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return directory


def config_dict(config: TrainConfig) -> dict[str, Any]:
    """``config`` as a JSON-ready dict."""
    return asdict(config)
