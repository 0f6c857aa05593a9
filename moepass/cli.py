"""The ``moepass`` command line.

Subcommands print to the terminal (this module is the only one that prints);
each fails with one clear line and a non-zero exit code on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import moepass
    from moepass.zoo import tiny_model

    print(f"moepass {moepass.__version__} demo: a tiny random Mixtral ({args.family}), static policy")
    model = tiny_model(args.family)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="adaptive_moe", options={"inner": args.inner})
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        started = time.perf_counter()
        actual = compiled(ids, use_cache=False).logits
        print(f"compiled and ran in {time.perf_counter() - started:.1f} s")
    print(moepass.report(compiled))
    error = float((actual - expected).abs().max() / expected.abs().max())
    print(f"max relative error against eager: {error:.1e}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from moepass import bundled, evaluate

    torch.set_num_threads(args.threads)
    model = bundled.load_model()
    batches = bundled.heldout_batches(seq_len=args.seq_len, max_tokens=args.tokens)
    runs = bundled.policy_runs(args.policies or None)
    print(f"bundled model, {sum(b.numel() for b in batches)} held-out tokens, {len(runs)} policies (compiled, inner {args.inner})")
    results = evaluate.evaluate_policies(model, runs, batches, inner=args.inner)
    header, rows = evaluate.format_table(results)
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``moepass`` command."""
    parser = argparse.ArgumentParser(prog="moepass", description="Adaptive-k routing for MoE models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the pass does")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="compile a small MoE model and show what moepass did")
    demo.add_argument("--family", default="mixtral", help="model family of the demo model")
    demo.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"])
    demo.set_defaults(run=_cmd_demo)
    ev = commands.add_parser("eval", help="held-out quality against expert FLOPs of routing policies, bundled model")
    ev.add_argument("policies", nargs="*", help="bundled artefact or policy name, or name:key=value,key=value (default: all)")
    ev.add_argument("--tokens", type=int, default=65536, help="held-out tokens")
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--inner", default="eager", choices=["inductor", "aot_eager", "eager"])
    ev.add_argument("--threads", type=int, default=1)
    ev.set_defaults(run=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moepass`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError, LookupError) as error:
        print(f"moepass {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
