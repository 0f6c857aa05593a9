"""Training through the pass: fine-tune the bundled model with adaptive gating on.

Adaptive gating (Li et al. 2023) is a *training* method: a token takes its
top-2 experts unless the top-1 wins by more than T, and the model is trained
with that gate, so it learns to live with fewer experts.  Here the gate runs
inside the compiled model — ``torch.compile(model, backend="adaptive_moe",
options={"policy": "threshold", "T": T})`` — and the optimizer steps through
it (the experts' split form carries the gradients, see
:mod:`moepass.lowering.grouped`)::

    for each step:  ids ──► compiled model (threshold gate) ──► CE + α · aux
                    loss.backward(); AdamW step

Compared on held-out text (every row through the compiled model):

======================== =========================== ==========================
row                      weights                     routing at evaluation
======================== =========================== ==========================
static                   the checkpoint              native top-2
post hoc                 the checkpoint              threshold T
trained with the gate    fine-tuned with threshold T threshold T
static fine-tune         fine-tuned with top-2       native top-2 (the control:
                                                     more training alone)
static fine-tune + gate  fine-tuned with top-2       threshold T
======================== =========================== ==========================

``python -m moepass.bundled.train.gating`` runs all of it and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moepass.bundled.train.lm import optimisation_step
from moepass.runtime.progress import progress

__all__ = ["GatingConfig", "FinetuneResult", "finetune_through_pass", "compare", "main"]

logger = logging.getLogger(__name__)


@dataclass
class GatingConfig:
    """Hyper-parameters of the fine-tune (the bundled model was trained with batch 16 × 256 bytes)."""

    #: The gate's threshold on p1 − p2 (the paper's 0.1).
    T: float = 0.1
    steps: int = 150
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup: int = 20
    batch_size: int = 16
    seq_len: int = 256
    #: Weight of Mixtral's load-balancing loss (as in pre-training).
    aux_coef: float = 0.02
    grad_clip: float = 1.0
    seed: int = 1
    #: The backend's inner compiler in the training loop.
    inner: str = "aot_eager"
    #: Held-out bytes each row is evaluated on.
    eval_tokens: int = 131072


@dataclass
class FinetuneResult:
    """A fine-tuned model and how its training went."""

    model: torch.nn.Module
    policy: str
    #: (step, mean training loss over the last interval).
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def finetune_through_pass(model, options: dict, config: GatingConfig, show_progress: bool = True) -> FinetuneResult:
    """Fine-tune a copy of ``model`` with the backend (``options``) in the training loop.

    Args:
        model: a transformers Mixtral causal LM (the bundled model).
        options: the backend's options, e.g. ``{"policy": "threshold", "T": 0.1}``.
        config: optimisation settings.
    """
    from moepass.bundled import corpus

    torch._dynamo.reset()
    started = time.perf_counter()
    model = copy.deepcopy(model).float().train()
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": config.inner, **options})
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    stream = corpus.token_stream("train")
    generator = torch.Generator().manual_seed(config.seed)
    curve, running, count = [], 0.0, 0
    label = options.get("policy", "static")
    for step in progress(range(config.steps), f"fine-tune through the pass ({label})", enabled=show_progress):
        ids = corpus.random_windows(stream, config.seq_len, config.batch_size, generator)
        lm_loss, _ = optimisation_step(compiled, model, optimizer, ids, config, step)
        running += float(lm_loss)
        count += 1
        if (step + 1) % 50 == 0 or step == config.steps - 1:
            curve.append((step + 1, running / count))
            logger.info("%s step %d: loss %.4f", label, step + 1, running / count)
            running, count = 0.0, 0
    torch._dynamo.reset()
    return FinetuneResult(model.eval(), str(label), curve, time.perf_counter() - started)


def compare(config: GatingConfig, show_progress: bool = True) -> tuple[list, dict]:
    """Fine-tune with the gate and without (the control), evaluate the five rows of the module table.

    Returns the rows (:class:`moepass.bundled.evaluate.EvalResult`, changes against
    the first) and a JSON-ready record of the run.
    """
    from moepass import bundled
    from moepass.bundled.evaluate import evaluate_policy, relative_to
    from moepass.policies import make_policy

    base = bundled.load_model()
    batches = bundled.heldout_batches(max_tokens=config.eval_tokens)
    gate = make_policy("threshold", T=config.T)
    static = make_policy("static")
    gated = finetune_through_pass(base, {"policy": "threshold", "T": config.T}, config, show_progress)
    control = finetune_through_pass(base, {}, config, show_progress)
    rows = [
        evaluate_policy(base, static, batches, label="static", setting="checkpoint"),
        evaluate_policy(base, gate, batches, label="threshold post hoc", setting=f"checkpoint, T={config.T:g}"),
        evaluate_policy(gated.model, gate, batches, label="trained with the gate",
                        setting=f"fine-tuned with T={config.T:g}"),
        evaluate_policy(control.model, static, batches, label="static fine-tune", setting="fine-tuned with top-2"),
        evaluate_policy(control.model, gate, batches, label="static fine-tune + gate",
                        setting=f"fine-tuned with top-2, T={config.T:g}"),
    ]
    rows = relative_to(rows, rows[0])
    return rows, {
        "config": asdict(config),
        "rows": [r.to_dict() for r in rows],
        "finetune_seconds": {"gated": gated.seconds, "static": control.seconds},
        "curves": {"gated": gated.curve, "static": control.curve},
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m moepass.bundled.train.gating``: the adaptive-gating fine-tune and its table."""
    from moepass.bundled.evaluate import format_table

    defaults = GatingConfig()
    parser = argparse.ArgumentParser(prog="python -m moepass.bundled.train.gating", description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=float, default=defaults.T)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = GatingConfig(T=args.T, steps=args.steps, lr=args.lr, eval_tokens=args.eval_tokens)
    rows, results = compare(config)
    header, table = format_table(rows)
    for line in (header, *table):
        logger.info(" | ".join(line))
    if args.out:
        path = Path(args.out)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
