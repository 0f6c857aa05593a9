"""Every MoE family of the installed transformers through the backend, as a markdown table.

    python benchmarks/zoo_table.py                 # all discovered families
    python benchmarks/zoo_table.py mixtral dbrx    # some
    python benchmarks/zoo_table.py --json out.json # also the raw outcomes
    python benchmarks/zoo_table.py --docs          # also replace the coverage table of docs/coverage.md
                                                   # (--readme: the same; the table lived in the README)

Tiny random models (hidden 64, 2 layers both MoE, 8 experts, top-2), static
policy, inner compiler eager, logits against eager at [2, 8] and [2, 13].
See moepass/zoo/survey.py for the outcome definitions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


#: The page that holds the coverage table (the site's "Model coverage"; the README links to it).
COVERAGE_PAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "coverage.md")
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


def table_block(table: str, summary: str, transformers_version: str, torch_version: str, date: str) -> str:
    """The text between (and including) the zoo markers: a dated summary line, then the table."""
    return (
        f"{START}\n*{summary} — transformers {transformers_version}, torch {torch_version}, {date} "
        f"(the table `python benchmarks/zoo_table.py --docs` writes)*\n\n{table}\n\n{END}"
    )


def write_table(table: str, summary: str, transformers_version: str, page: str = COVERAGE_PAGE) -> None:
    """Replace the text between the zoo markers of ``page`` with ``table`` (atomically)."""
    import torch

    with open(page) as handle:
        text = handle.read()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{os.path.relpath(page)} needs one {START} … {END} pair to write the table between")
    block = table_block(table, summary, transformers_version, torch.__version__.split("+")[0], time.strftime("%Y-%m-%d"))
    text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(page), delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="family names (transformers model_type); default: all")
    parser.add_argument("--json", help="also write the outcomes as JSON to this file")
    parser.add_argument(
        "--docs",
        "--readme",
        dest="docs",
        action="store_true",
        help="also replace the table between the zoo markers of docs/coverage.md (--readme is the old name)",
    )
    args = parser.parse_args(argv)
    if args.docs and args.families:
        parser.error("--docs writes the whole table: give no family names")

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    from moepass.zoo.survey import markdown_table, survey

    started = time.perf_counter()
    outcomes = survey(
        args.families or None,
        progress=lambda o: print(f"{o.case}: {o.outcome} ({o.seconds:.1f}s)", file=sys.stderr, flush=True),
    )
    print(markdown_table(outcomes))
    counts = {}
    for o in outcomes:
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"\n{len(outcomes)} families: {summary} ({time.perf_counter() - started:.0f}s)")
    if args.docs:
        write_table(markdown_table(outcomes), summary, transformers.__version__)
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as handle:
            json.dump([dataclasses.asdict(o) for o in outcomes], handle, indent=1)
        os.replace(handle.name, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
