"""Routing policies: how many experts each token keeps.

See :mod:`moepass.policies.base` for the interface,
:mod:`moepass.policies.builtin` for the policies and
:mod:`moepass.runtime.routing` for how every policy composes with every router kind.

A new policy goes in :mod:`moepass.policies.builtin` (``@register_policy``).
May import: :mod:`moepass.runtime.routing` and the compiler's contract
(``moepass.compiler.spec``); the run-time ops import the policies, not the
other way round (``tests/test_layout.py``).
"""

from __future__ import annotations

import dataclasses

from moepass.policies.base import POLICIES, Policy, PolicyError, ResolvedPolicy, load_policy, register_policy
from moepass.policies.builtin import Allocator, NullExperts, Sensitivity, SkipRatio, Static, Threshold, TopP

__all__ = [
    "POLICIES",
    "Policy",
    "PolicyError",
    "ResolvedPolicy",
    "Static",
    "Threshold",
    "TopP",
    "Sensitivity",
    "SkipRatio",
    "NullExperts",
    "Allocator",
    "load_policy",
    "make_policy",
    "register_policy",
]


def make_policy(name: str, **params) -> Policy:
    """Build the policy called ``name`` from its parameters; errors list what is valid."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise PolicyError(f"unknown policy {name!r}; valid policies: {', '.join(sorted(POLICIES))}") from None
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise PolicyError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for policy {name!r}; "
            f"valid: {', '.join(sorted(valid)) or '(none)'}"
        )
    try:
        return cls(**params)
    except TypeError as error:
        raise PolicyError(f"policy {name!r}: {error}") from None
