"""The bundled model: a small Mixtral byte LM trained on the Python stdlib.

::

    moepass/bundled/data/
        model.safetensors    bf16 weights of a transformers MixtralForCausalLM
        config.json          its MixtralConfig (4 layers, 8 experts, top-2, byte vocabulary)
        tokenizer.json       the byte vocabulary as a Hugging Face tokenizer (moepass.bundled.train.tokenizer)
        training.json        the command that made it, losses, corpus fingerprints
        policies/<name>/     policy.json + policy.safetensors (+ overlay.safetensors)

``load_model()`` gives the model in eval mode (float32 by default);
``heldout_batches()`` re-derives the held-out split from this interpreter's
standard library and checks it against the fingerprint recorded at training
time, so a different Python version fails with a clear error instead of
giving silently different numbers.  Nothing here touches the network.

The package also holds the corpus (:mod:`~moepass.bundled.corpus`), the
quality evaluation (:mod:`~moepass.bundled.evaluate`), the demo
(:mod:`~moepass.bundled.demo`) and the training of the model and its policy
artefacts (:mod:`moepass.bundled.train`).  May import :mod:`moepass.compiler`,
:mod:`moepass.runtime`, :mod:`moepass.policies` and the ``moepass`` package
itself (``tests/test_layout.py``).
"""

from __future__ import annotations

import json
import logging
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from moepass.bundled import corpus
from moepass.bundled.corpus import BOUNDARY, VOCAB_SIZE, decode, encode

__all__ = [
    "BUNDLED_DIR",
    "POLICIES_DIR",
    "BOUNDARY",
    "VOCAB_SIZE",
    "CorpusDriftError",
    "encode",
    "decode",
    "training_info",
    "load_model",
    "check_corpus",
    "heldout_batches",
    "train_batches",
    "policy_dir",
    "policy_names",
    "load_policy",
]

logger = logging.getLogger(__name__)

#: Where the checkpoint lives (package data).
BUNDLED_DIR = Path(__file__).resolve().parent / "data"
#: Where the bundled policy artefacts live, one directory per policy.
POLICIES_DIR = BUNDLED_DIR / "policies"


class CorpusDriftError(RuntimeError):
    """This interpreter's standard library differs from the one the model was trained on."""


def training_info(directory: str | Path | None = None) -> dict[str, Any]:
    """The checkpoint's ``training.json`` (command, losses, corpus fingerprints)."""
    path = Path(directory or BUNDLED_DIR) / "training.json"
    if not path.exists():
        raise FileNotFoundError(f"no bundled checkpoint metadata at {path}; train it with examples/train_bundled.py")
    return json.loads(path.read_text())


def load_model(directory: str | Path | None = None, dtype: torch.dtype = torch.float32, overlay: str | Path | None = None):
    """The bundled checkpoint as a transformers ``MixtralForCausalLM`` in eval mode.

    Args:
        directory: checkpoint directory (default: the bundled one).
        dtype: parameter dtype (the file holds bf16; float32 is the default).
        overlay: a safetensors file of what a fine-tune changed (e.g. a
            policy's): tensors named like the model's parameters replace them;
            pairs ``<name>.lora_A`` [E, r, in] / ``<name>.lora_B`` [E, out, r]
            add ``lora_B @ lora_A`` to parameter ``<name>`` (merged in float32).
    """
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    directory = Path(directory or BUNDLED_DIR)
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no bundled checkpoint at {weights}; train it with examples/train_bundled.py")
    config = MixtralConfig.from_json_file(str(directory / "config.json"))
    model = MixtralForCausalLM(config)  # ~3M parameters: initialising them first costs ~0.1 s
    state = {name: t.to(dtype) for name, t in load_file(str(weights)).items()}
    if overlay is not None:
        _apply_overlay(state, load_file(str(overlay)), str(overlay), dtype)
    model.load_state_dict(state, strict=True)
    model.to(dtype)
    # where its config and tokenizer files are, as from_pretrained records it
    model.name_or_path = model.config.name_or_path = str(directory)
    return model.eval()


def _apply_overlay(state: dict[str, torch.Tensor], overlay: dict[str, torch.Tensor], where: str, dtype: torch.dtype) -> None:
    for name, tensor in overlay.items():
        base = name.rsplit(".", 1)[0] if name.endswith((".lora_A", ".lora_B")) else name
        if base not in state:
            raise KeyError(f"overlay {where}: {name} names no parameter of the model")
        if name.endswith(".lora_A"):
            continue
        if name.endswith(".lora_B"):
            factor_a = overlay.get(base + ".lora_A")
            if factor_a is None:
                raise KeyError(f"overlay {where}: {name} has no matching {base}.lora_A")
            merged = state[base].float() + torch.matmul(tensor.float(), factor_a.float())
            state[base] = merged.to(dtype)
        else:
            state[name] = tensor.to(dtype)


def check_corpus(split: str = "heldout", directory: str | Path | None = None) -> corpus.Fingerprint:
    """Raise :class:`CorpusDriftError` unless ``split`` matches the training-time fingerprint."""
    recorded = training_info(directory)["corpus"][split]
    current = corpus.fingerprint(split)
    if (current.files, current.bytes, current.sha256) != (recorded["files"], recorded["bytes"], recorded["sha256"]):
        raise CorpusDriftError(
            f"the {split} split of this Python's standard library ({corpus.stdlib_root()}, Python {current.python}: "
            f"{current.files} files, {current.bytes} bytes, sha256 {current.sha256[:12]}) differs from the one the "
            f"bundled model was trained on (Python {recorded['python']}: {recorded['files']} files, "
            f"{recorded['bytes']} bytes, sha256 {recorded['sha256'][:12]}); its numbers are only comparable on "
            f"Python {recorded['python']}"
        )
    return current


@lru_cache(maxsize=1)
def _checked(split: str) -> bool:
    check_corpus(split)
    return True


def _batched(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


def heldout_batches(seq_len: int = 256, max_tokens: int = 65536, batch_size: int = 16, check: bool = True) -> list[torch.Tensor]:
    """Held-out token windows, ``[B, seq_len]`` int64 batches, the same on every call.

    The ``max_tokens // seq_len`` windows are evenly spaced over the whole
    held-out stream (non-overlapping), so a small slice still covers every
    held-out file region.

    Args:
        check: compare the split with the training-time fingerprint first.
    """
    if check:
        _checked("heldout")
    windows = corpus.spaced_windows(corpus.token_stream("heldout"), seq_len, max_tokens)
    return _batched(windows, batch_size)


def train_batches(
    seq_len: int = 256, max_batches: int = 8, batch_size: int = 16, seed: int = 0, check: bool = False
) -> list[torch.Tensor]:
    """``max_batches`` batches ``[B, seq_len]`` of windows at seeded random offsets of the train split."""
    if check:
        _checked("train")
    stream = corpus.token_stream("train")
    generator = torch.Generator().manual_seed(seed)
    return [corpus.random_windows(stream, seq_len, batch_size, generator) for _ in range(max_batches)]


def policy_dir(name: str) -> Path:
    """The directory of the bundled policy artefact ``name`` (e.g. ``"ada_k"``)."""
    return POLICIES_DIR / name


def policy_names() -> list[str]:
    """Names of the bundled policy artefacts."""
    if not POLICIES_DIR.is_dir():
        return []
    return sorted(p.name for p in POLICIES_DIR.iterdir() if (p / "policy.json").exists())


def load_policy(name: str):
    """A bundled policy artefact, via :func:`moepass.policies.load_policy`."""
    from moepass.policies import load_policy as _load

    path = policy_dir(name)
    if not (path / "policy.json").exists():
        raise FileNotFoundError(f"no bundled policy {name!r} at {path}; bundled: {', '.join(policy_names()) or '(none)'}")
    return _load(str(path))


def overlay_path(name: str) -> Path | None:
    """The fine-tuned weights a bundled policy needs on top of the checkpoint, if any."""
    path = policy_dir(name) / "overlay.safetensors"
    return path if path.exists() else None


def python_version() -> str:
    """This interpreter's version as recorded in fingerprints."""
    return f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


#: Training-free policies at their papers' settings, evaluated beside the artefacts.
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "threshold": {"T": 0.1},
    "top_p": {"p": 0.4},
}

#: The order of the quality table.
DEFAULT_RUNS = ("static", "threshold", "top_p", "sensitivity", "skip_ratio", "ada_k", "null_experts")


def policy_run(spec: str, model=None):
    """A :class:`moepass.bundled.evaluate.PolicyRun` from ``name`` or ``name:key=value,key=value``.

    ``name`` is a bundled artefact (``ada_k``, ``null_experts``, ``sensitivity``,
    ``skip_ratio``: loaded from the package, with its weight overlay applied to
    a fresh copy of the model when it has one) or any policy name (built with
    its paper setting, :data:`PAPER_SETTINGS`, unless parameters are given).
    Parameters given for a bundled artefact replace its saved fields.
    """
    import dataclasses

    from moepass.bundled.evaluate import PolicyRun
    from moepass.policies import make_policy

    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"policy spec {spec!r}: expected key=value, got {item!r}")
        params[key] = _parse_value(value)
    if name in policy_names():
        policy = load_policy(name)
        if params:
            policy = dataclasses.replace(policy, **params)
        overlay = overlay_path(name)
        run_model = load_model(overlay=overlay) if overlay is not None else None
        setting = _artefact_setting(policy) + (" + fine-tuned weights" if overlay is not None else "")
        return PolicyRun(name, policy, setting, run_model)
    policy = make_policy(name, **(params or PAPER_SETTINGS.get(name, {})))
    return PolicyRun(name, policy, ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (params or PAPER_SETTINGS.get(name, {})).items()) or "native top-k")


def policy_runs(specs: list[str] | None = None) -> list:
    """:func:`policy_run` of each spec (default: :data:`DEFAULT_RUNS` that are available)."""
    if specs is None:
        available = set(policy_names())
        specs = [s for s in DEFAULT_RUNS if s in available or s in ("static", "threshold", "top_p")]
    return [policy_run(s) for s in specs]


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _artefact_setting(policy) -> str:
    name = policy.name
    if name == "sensitivity":
        return f"T={policy.T:.3g}, calibrated F_l"
    if name == "skip_ratio":
        beta = policy.beta
        if isinstance(beta, dict):
            return "β_l=" + "/".join(f"{v:.2f}" for _, v in sorted(beta.items()))
        return f"β={beta:g}"
    if name == "allocator":
        return "PPO-trained W_l"
    if name == "null_experts":
        rows = next(iter(policy.router_rows.values()))
        return f"m={rows.shape[0]}, k={policy.k}"
    return policy.describe()
