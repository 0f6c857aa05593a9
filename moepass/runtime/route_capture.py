"""Hooks that see every eager ``moepass.route`` call: how calibration records router logits.

A leaf module (the ``route`` op in :mod:`moepass.runtime.ops` calls the hooks;
offload's prefetcher and the rewrite's validation hide their own calls), so
code the experts op reaches can use it without importing the ops back.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

__all__ = ["call_capture_hooks", "capture_routes", "routes_not_captured"]

#: Callables run on each real (not fake, not validation) ``route`` call with
#: (config, logits, x): how calibration sees every block's router logits.
_capture_hooks: list = []
_capture_suspended: list = []


@contextlib.contextmanager
def capture_routes(hook) -> Iterator[None]:
    """Call ``hook(config, logits, x)`` on every eager ``moepass.route`` call inside the block."""
    _capture_hooks.append(hook)
    try:
        yield
    finally:
        _capture_hooks.remove(hook)


@contextlib.contextmanager
def routes_not_captured() -> Iterator[None]:
    """Hide ``route`` calls from capture hooks (validation runs on random inputs)."""
    _capture_suspended.append(True)
    try:
        yield
    finally:
        _capture_suspended.pop()


def call_capture_hooks(config: Any, logits: Any, x: Any) -> None:
    """Run the active hooks on one real ``route`` call (none while :func:`routes_not_captured`)."""
    if _capture_hooks and not _capture_suspended:
        for hook in list(_capture_hooks):
            hook(config, logits, x)
