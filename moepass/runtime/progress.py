"""Progress bars for long runs (calibration, evaluation, tuning, training).

A thin wrapper over tqdm that writes to stderr, stays quiet when disabled or
when ``MOEPASS_PROGRESS=0``, and degrades to periodic log lines when stderr is
not a terminal (CI logs stay readable).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

__all__ = ["progress"]

T = TypeVar("T")
logger = logging.getLogger("moepass.runtime.progress")


def progress(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items`` showing a progress bar labelled ``description``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled or os.environ.get("MOEPASS_PROGRESS", "1") == "0":
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=description, total=total, file=sys.stderr, dynamic_ncols=True)
        return
    step = max(1, (total or 100) // 10)
    for index, item in enumerate(items):
        if index % step == 0:
            logger.info("%s: %d/%s", description, index, total if total is not None else "?")
        yield item
    logger.info("%s: done", description)
