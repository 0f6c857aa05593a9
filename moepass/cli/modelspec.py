"""Load a model from a command-line spec, for ``moepass inspect`` and friends.

Accepted specs:

``path/to/config.json``
    a transformers config (its ``model_type`` picks the class); the model is
    built with ``AutoModelForCausalLM.from_config`` and random weights.
``path/to/module.py:factory``
    the file is imported and ``factory()`` called; it returns a model or
    ``(model, example_inputs)``.
``bundled``
    the project's bundled checkpoint (``moepass.bundled.load_model()``).
``zoo:<family>``
    a tiny random model of :mod:`moepass.zoo` (``zoo:mixtral``).

Every failure raises :class:`ModelSpecError` with one line saying what and why.
Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ModelSpecError", "LoadedModel", "load_model", "example_input_ids", "example_for"]

logger = logging.getLogger(__name__)

#: Random weights are built in float32; refuse what would not fit in this
#: share of the machine's memory (a real 8×7B config would ask for ~190 GB).
_MEMORY_SHARE = 0.5


class ModelSpecError(ValueError):
    """A model spec that cannot be loaded; the message says which and why."""


@dataclass
class LoadedModel:
    """A model and, when its source gave them, example inputs."""

    model: torch.nn.Module
    example_inputs: Any = None
    #: Where it came from, for reports (``config.json (mixtral)``).
    source: str = ""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _from_config_file(path: Path, seed: int) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelSpecError(f"cannot read model config {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise ModelSpecError(f"model config {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelSpecError(f"model config {path} has no \"model_type\": it is not a transformers config")
    model_type = data.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **data)
    except Exception as error:  # unknown model type, bad field values: the user's file
        raise ModelSpecError(f"model config {path}: {_one_line(error)}") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as error:
        raise ModelSpecError(f"model config {path}: cannot build a causal LM from it: {_one_line(error)}") from None
    size = sum(p.numel() for p in skeleton.parameters()) * 4
    available = _available_memory()
    if available is not None and size > _MEMORY_SHARE * available:
        raise ModelSpecError(
            f"model config {path} describes {size / 1e9:.1f} GB of float32 weights, more than this machine can "
            f"hold with random weights ({available / 1e9:.1f} GB free); use a smaller config"
        )
    from moepass.zoo import randomize_weights

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize_weights(model, seed)
    return LoadedModel(model.eval(), None, f"{path.name} ({model_type}, random weights)")


def _from_factory(spec: str) -> LoadedModel:
    file_name, _, factory_name = spec.rpartition(":")
    path = Path(file_name)
    if not path.is_file():
        raise ModelSpecError(f"model file {path} does not exist")
    module_name = f"_moepass_user_model_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError("not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    except Exception as error:
        sys.modules.pop(module_name, None)
        raise ModelSpecError(f"cannot import {path}: {_one_line(error)}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ModelSpecError(
            f"{path} has no function {factory_name!r}" + (f" (it has {', '.join(found[:8])})" if found else "")
        )
    try:
        result = factory()
    except Exception as error:
        raise ModelSpecError(f"{spec}() failed: {_one_line(error)}") from None
    return _as_loaded(result, f"{path.name}:{factory_name}")


def _as_loaded(result: Any, source: str) -> LoadedModel:
    model, example = (result[0], result[1]) if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(
            f"{source} returned {type(model).__name__}, not a torch.nn.Module (or a (model, example_inputs) pair)"
        )
    return LoadedModel(model.eval(), example, source)


def _bundled() -> LoadedModel:
    try:
        bundled = importlib.import_module("moepass.bundled")
    except ModuleNotFoundError as error:
        if error.name == "moepass.bundled":
            raise ModelSpecError("the bundled model is not available in this build") from None
        raise ModelSpecError(f"the bundled model could not be loaded: {_one_line(error)}") from None
    loader = getattr(bundled, "load_model", None)
    if loader is None:
        raise ModelSpecError("the bundled model is not available in this build")
    try:
        result = loader()
    except Exception as error:
        raise ModelSpecError(f"the bundled model could not be loaded: {_one_line(error)}") from None
    return _as_loaded(result, "bundled")


def _from_zoo(family: str, seed: int) -> LoadedModel:
    from moepass.zoo import tiny_model

    try:
        model = tiny_model(family, seed=seed)
    except ValueError as error:
        raise ModelSpecError(str(error)) from None
    return LoadedModel(model, None, f"zoo:{family} (tiny, random weights)")


def load_model(spec: str, seed: int = 0) -> LoadedModel:
    """Load the model ``spec`` names (see the module docstring); raise :class:`ModelSpecError` if it cannot be.

    Experts loops that graph-break are made traceable
    (:func:`moepass.make_traceable`): a command-line user cannot call it
    between loading and compiling, and it changes no model's function.
    """
    from moepass.compiler.traceable import make_traceable

    loaded = _load(spec, seed)
    changed = make_traceable(loaded.model)
    if changed:
        logger.info("%s: made %d graph-breaking experts loop(s) traceable", loaded.source, len(changed))
    return loaded


def _load(spec: str, seed: int) -> LoadedModel:
    if spec == "bundled":
        return _bundled()
    if spec.startswith("zoo:"):
        return _from_zoo(spec[len("zoo:") :], seed)
    file_part, sep, factory = spec.rpartition(":")
    if sep and file_part.endswith(".py") and factory.isidentifier():
        return _from_factory(spec)
    path = Path(spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise ModelSpecError(f"model config {path} does not exist")
        return _from_config_file(path, seed)
    if path.is_dir() and (path / "config.json").is_file():
        return _from_config_file(path / "config.json", seed)
    raise ModelSpecError(
        f"cannot load model {spec!r}: expected a transformers config.json, module.py:factory, 'bundled' or zoo:<family>"
    )


def example_for(spec: str, loaded: LoadedModel, tokens: int, batch: int = 1, seed: int = 0) -> Any:
    """The example inputs a command runs: the factory's own, held-out text for
    the bundled model (its routing means something only on text), else random ids."""
    if loaded.example_inputs is not None:
        return loaded.example_inputs
    if spec == "bundled":
        from moepass import bundled

        ids = bundled.heldout_batches(seq_len=tokens, max_tokens=tokens * batch, batch_size=batch)[0]
        return {"input_ids": ids, "use_cache": False}
    return example_input_ids(loaded.model, tokens, batch, seed)


def example_input_ids(model: torch.nn.Module, tokens: int, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """Random token ids for a causal LM: ``{"input_ids": [batch, tokens], "use_cache": False}``."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ModelSpecError(
            f"{type(model).__name__} has no config.vocab_size to make example token ids from: "
            "return (model, example_inputs) from the factory"
        )
    if tokens < 1 or batch < 1:
        raise ModelSpecError(f"need at least one token, got --tokens {tokens} --batch {batch}")
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "use_cache": False}
