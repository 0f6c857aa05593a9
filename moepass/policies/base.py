"""The policy interface: plain data that resolves, per block, to a k-rule.

A policy is a dataclass.  Its scalar fields and per-layer scalars serialise to
``policy.json``; learned or calibrated tensors (allocator weights, null-expert
router rows) go to ``policy.safetensors`` beside it, keyed ``<field>/<block
path>``.  At compile time the backend calls :meth:`Policy.resolve` once per MoE
block: it applies the per-layer overrides, checks the policy fits the block and
returns the rule name, scalar parameters and tensors the ``moepass.route`` op
runs with.  Mismatches raise :class:`PolicyError` naming the block.

Per-layer overrides: ``layers={"model.layers.0.mlp": {"p": 0.6}}`` (a block
path, or its layer index as a string) replaces fields for that block only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from moepass.compiler.spec import MoEBlockSpec
from moepass.runtime.routing import num_candidates

__all__ = ["Policy", "ResolvedPolicy", "PolicyError", "POLICIES", "register_policy", "load_policy", "per_block"]

POLICIES: dict[str, type["Policy"]] = {}
POLICY_JSON = "policy.json"
POLICY_TENSORS = "policy.safetensors"
_FORMAT_VERSION = 1


class PolicyError(ValueError):
    """A policy that does not fit a block, bad policy parameters, or a bad policy file."""


def register_policy(cls: type["Policy"]) -> type["Policy"]:
    """Class decorator: make a policy selectable by its ``name``."""
    POLICIES[cls.name] = cls
    return cls


@dataclass
class ResolvedPolicy:
    """A policy bound to one block: what the ``moepass.route`` op needs."""

    rule: str
    params: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    k_min: int | None = None
    k_max: int | None = None
    uses_x: bool = False
    #: None follows the model's renormalisation; True/False forces it.
    renormalize: bool | None = None


def block_name(block: MoEBlockSpec) -> str:
    """The block's path as shown to users (``<root>`` for a root-level block)."""
    return block.path or "<root>"


def per_block(values: dict[str, Any], block: MoEBlockSpec, what: str) -> Any:
    """The entry of ``values`` for ``block`` (by path, else by layer index)."""
    if block.path in values:
        return values[block.path]
    index = str(block.layer_index)
    if index in values:
        return values[index]
    known = ", ".join(sorted(values)[:8]) or "(none)"
    hint = ""
    if not block.path:
        hint = (
            "; this block was compiled on its own (its experts loop graph-broke), once for every layer, so "
            "per-layer values cannot apply: use experts_implementation='grouped_mm'"
        )
    raise PolicyError(f"block {block_name(block)}: no {what} for it (the policy has {known}){hint}")


@dataclass
class Policy:
    """Base class of routing policies.

    Attributes:
        k_min: fewest experts a token keeps (default 1; 0 for null experts).
        k_max: most experts a token keeps (default: the model's k).
        layers: per-block field overrides, keyed by block path or layer index.
    """

    name: ClassVar[str] = ""
    #: Fields whose values are per-block tensors, saved to safetensors.
    tensor_fields: ClassVar[tuple[str, ...]] = ()
    k_min: int | None = None
    k_max: int | None = None
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    # --- binding to a block ---------------------------------------------------

    def default_k_min(self) -> int:
        """k_min when not given."""
        return 1

    def default_k_max(self, block: MoEBlockSpec) -> int:
        """k_max when not given."""
        return block.top_k

    def bounds(self, block: MoEBlockSpec) -> tuple[int, int]:
        """(k_min, k_max) for ``block``, checked against what it can reach."""
        k_max = self.default_k_max(block) if self.k_max is None else self.k_max
        k_min = self.default_k_min() if self.k_min is None else self.k_min
        limit = num_candidates(block.router)
        if not 0 <= k_min <= k_max <= limit:
            raise PolicyError(
                f"block {block_name(block)}: k bounds k_min={k_min}, k_max={k_max} must satisfy "
                f"0 <= k_min <= k_max <= {limit} (the experts a token can reach)"
            )
        return k_min, k_max

    def for_block(self, block: MoEBlockSpec) -> "Policy":
        """This policy with the overrides for ``block`` applied."""
        override = self.layers.get(block.path, self.layers.get(str(block.layer_index)))
        if not override:
            return self
        valid = {f.name for f in dataclasses.fields(self) if f.init and f.name != "layers"}
        unknown = sorted(set(override) - valid)
        if unknown:
            raise PolicyError(
                f"block {block_name(block)}: unknown per-layer field(s) {', '.join(map(repr, unknown))} "
                f"for policy {self.name!r}; valid: {', '.join(sorted(valid))}"
            )
        return dataclasses.replace(self, layers={}, **override)

    def resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        """Bind the policy to ``block``; raise :class:`PolicyError` naming the mismatch."""
        policy = self.for_block(block)
        k_min, k_max = policy.bounds(block)
        resolved = policy._resolve(block)
        resolved.k_min, resolved.k_max = k_min, k_max
        return resolved

    def _resolve(self, block: MoEBlockSpec) -> ResolvedPolicy:
        raise NotImplementedError

    def describe(self) -> str:
        """Short description, e.g. ``top_p(p=0.4)``."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "layers" or isinstance(value, dict) and not value:
                continue
            if isinstance(value, dict):
                parts.append(f"{f.name}=<{len(value)} blocks>")
            else:
                parts.append(f"{f.name}={value!r}")
        if self.layers:
            parts.append(f"layers=<{len(self.layers)} overrides>")
        return f"{self.name}({', '.join(parts)})"

    # --- files ----------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``policy.json`` (+ ``policy.safetensors`` if it has tensors) to ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params, tensors = {}, {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.tensor_fields:
                for path, tensor in (value or {}).items():
                    tensors[f"{f.name}/{path}"] = tensor.detach().contiguous().cpu()
            else:
                params[f.name] = value
        document = {"policy": self.name, "format": _FORMAT_VERSION, "params": params}
        (directory / POLICY_JSON).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        tensor_file = directory / POLICY_TENSORS
        if tensors:
            save_file(tensors, str(tensor_file), metadata={"policy": self.name})
        elif tensor_file.exists():
            tensor_file.unlink()
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Policy":
        """Read a policy saved with :meth:`save` (of this class or, from ``Policy``, any)."""
        policy = load_policy(directory)
        if cls is not Policy and not isinstance(policy, cls):
            raise PolicyError(f"{directory}: holds a {policy.name!r} policy, not {cls.name!r}")
        return policy


def load_policy(directory: str | Path) -> Policy:
    """Read a policy directory written by :meth:`Policy.save`.

    Raises:
        PolicyError: the directory has no policy, or its files do not parse.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    json_file = directory / POLICY_JSON
    if not json_file.is_file():
        raise PolicyError(f"{directory}: no {POLICY_JSON} (not a saved moepass policy)")
    try:
        document = json.loads(json_file.read_text())
        name, params = document["policy"], dict(document.get("params", {}))
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PolicyError(f"{json_file}: does not parse as a moepass policy ({error})") from None
    if name not in POLICIES:
        raise PolicyError(f"{json_file}: unknown policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    cls = POLICIES[name]
    tensor_file = directory / POLICY_TENSORS
    if cls.tensor_fields:
        if not tensor_file.is_file():
            raise PolicyError(f"{directory}: policy {name!r} needs {POLICY_TENSORS}, which is missing")
        try:
            tensors = load_file(str(tensor_file))
        except Exception as error:  # safetensors raises several types for a corrupt file
            raise PolicyError(f"{tensor_file}: does not load ({error})") from None
        for field_name in cls.tensor_fields:
            prefix = f"{field_name}/"
            params[field_name] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise PolicyError(f"{json_file}: unknown field(s) {', '.join(unknown)} for policy {name!r}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as error:
        raise PolicyError(f"{json_file}: {error}") from None
