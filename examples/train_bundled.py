"""Train the bundled Mixtral byte LM and write it to moepass/bundled/data/.

    python examples/train_bundled.py                 # the shipped checkpoint (~20 min, 1 thread)
    python examples/train_bundled.py --steps 50 --out /tmp/tiny   # a quick try

Everything that determines the weights is in the arguments (seeded, one
thread); the exact command line is recorded in the checkpoint's training.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402
import transformers  # noqa: E402

from moepass.bundled import corpus  # noqa: E402
from moepass.bundled.train.lm import ModelShape, TrainConfig, config_dict, save_checkpoint, train_lm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    shape = ModelShape()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "moepass" / "bundled" / "data"), help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--aux-coef", type=float, default=defaults.aux_coef)
    parser.add_argument("--hidden", type=int, default=shape.hidden)
    parser.add_argument("--intermediate", type=int, default=shape.intermediate)
    parser.add_argument("--layers", type=int, default=shape.layers)
    parser.add_argument("--experts", type=int, default=shape.experts)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    config = TrainConfig(
        shape=ModelShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, experts=args.experts),
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=min(defaults.warmup, max(1, args.steps // 10)),
        aux_coef=args.aux_coef,
        seed=args.seed,
        threads=args.threads,
        eval_every=args.eval_every,
    )
    load_before = os.getloadavg()
    started = time.time()
    result = train_lm(config)
    wall = time.time() - started
    load_after = os.getloadavg()
    summary = result.summary()
    metadata = {
        "command": ("python examples/train_bundled.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))).strip(),
        "config": config_dict(config),
        "results": summary,
        "wall_seconds": wall,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "corpus": {"train": corpus.fingerprint("train").to_dict(), "heldout": corpus.fingerprint("heldout").to_dict()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    out = save_checkpoint(result.model, args.out, metadata)
    bits = summary
    print(f"trained {config.steps} steps in {wall / 60:.1f} min (load average before {load_before[0]:.2f}, after {load_after[0]:.2f})")
    print(f"held-out {bits['heldout_nats_per_byte']:.4f} nats/byte ({bits['heldout_bits_per_byte']:.3f} bits/byte)")
    print(f"train    {bits['train_nats_per_byte']:.4f} nats/byte ({bits['train_bits_per_byte']:.3f} bits/byte)")
    print(f"unigram  {bits['unigram_nats_per_byte']:.4f} nats/byte ({bits['unigram_bits_per_byte']:.3f} bits/byte)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
