"""AdapMoE sensitivity and skip-ratio artefacts for the bundled model.

Both are training-free; :func:`moepass.calibrate` fits them on windows of the
train split::

    sensitivity   F_l per layer (a Fisher estimate, see moepass.calibrate),
                  T bisected so the average k over all blocks is ``target_avg_k``
    skip_ratio    β_l = the per-layer median of p_2 / p_1 (Lu et al.'s rule)

and each is saved with :meth:`moepass.policies.Policy.save` under
``moepass/bundled/data/policies/<name>/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

__all__ = ["calibrate_bundled", "main"]

logger = logging.getLogger(__name__)


def calibrate_bundled(model, batches, target_avg_k: float = 1.5, show_progress: bool = True) -> dict:
    """``{"sensitivity": Policy, "skip_ratio": Policy}`` fitted on ``batches``."""
    from moepass.runtime.calibrate import calibrate

    sensitivity = calibrate(model, batches, "sensitivity", target_avg_k=target_avg_k, show_progress=show_progress)
    skip_ratio = calibrate(model, batches, "skip_ratio", show_progress=show_progress)
    return {"sensitivity": sensitivity, "skip_ratio": skip_ratio}


def main(argv: list[str] | None = None) -> int:
    """``python -m moepass.bundled.train.calibrations``: calibrate and save the bundled model's training-free artefacts."""
    from moepass import bundled

    parser = argparse.ArgumentParser(prog="python -m moepass.bundled.train.calibrations", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(bundled.POLICIES_DIR), help="directory of the policy directories")
    parser.add_argument("--target-avg-k", type=float, default=1.5, help="average experts per token the sensitivity T is fitted to")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of 16 x 256 train bytes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = bundled.load_model()
    batches = bundled.train_batches(seq_len=256, max_batches=args.batches, batch_size=16, seed=args.seed)
    policies = calibrate_bundled(model, batches, args.target_avg_k)
    command = ("python -m moepass.bundled.train.calibrations " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))).strip()
    for name, policy in policies.items():
        out = Path(args.out) / name
        policy.save(out)
        log = {"command": command, "seconds": time.perf_counter() - started, "policy": policy.describe()}
        (out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
        logger.info("saved %s to %s", policy.describe(), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
