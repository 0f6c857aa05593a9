"""Export a causal LM with adaptive routing to a folder onnxruntime-genai loads as it is.

::

    moepass.export_genai(model, "bundled-genai/", policy="top_p", p=0.65)

    bundled-genai/
        model.onnx              KV cache in and out (past_key_values.{i}.key/value → present.{i}.key/value),
                                one moepass.AdaptiveMoE node per MoE block
        model.onnx.data         the weights, when the model is large (or asked for)
        genai_config.json       I/O names, heads, context length, search defaults, provider
        tokenizer files         when the model's folder has them, or a tokenizer is given

    import onnxruntime_genai as og
    model = og.Model("bundled-genai/")
    params = og.GeneratorParams(model); params.set_search_options(max_length=64, do_sample=False)
    generator = og.Generator(model, params); generator.append_tokens([prompt_ids])
    while not generator.is_done(): generator.generate_next_token()

Before anything is written, the exported model runs in ONNX Runtime against
the rewritten torch model three times: on the traced example (batch 2, a past
of 5), on a prefill with an empty cache and on a one-token decode step after
it.  The folder is assembled in a staging folder beside the target and moved
into place at the end: a failure leaves nothing behind, and re-exporting into
a folder that holds a previous export replaces it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moepass.exports.onnx import (
    OnnxExport,
    OnnxExportError,
    OnnxExportOptions,
    PreparedExport,
    _check,
    _relative_error,
    _verify,
    _write,
    prepare_generation_export,
)

__all__ = ["GENAI_CONFIG", "GenaiExport", "TOKENIZER_FILES", "export_genai", "genai_config"]

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"
#: Tokenizer files copied from a model's folder (transformers' names; onnxruntime-genai reads tokenizer.json).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: genai_config provider_options entry per execution provider (none for CPU).
_PROVIDER_OPTIONS = {"cpu": None, "cuda": {"cuda": {}}}


@dataclass
class GenaiExport:
    """What :func:`export_genai` wrote."""

    folder: Path
    #: The model file's export (blocks, target, policy; ``path`` is where it now lies).
    onnx: OnnxExport
    #: The genai_config.json written.
    config: dict
    #: Names of the files in the folder.
    files: list[str] = field(default_factory=list)
    #: Max relative error of ONNX Runtime against the rewritten torch model per check (example, prefill, decode).
    errors: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.folder}/: onnxruntime-genai folder ({', '.join(self.files)})", str(self.onnx)]
        if self.errors:
            lines.append("ONNX Runtime vs torch: " + ", ".join(f"{k} {v:.1e}" for k, v in self.errors.items()))
        return "\n".join(lines)


def _text_config(model: torch.nn.Module) -> Any:
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _search_defaults(model: torch.nn.Module, context_length: int) -> dict:
    """onnxruntime-genai's search options, from the model's generation_config where it sets them."""
    search = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": context_length,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": False,  # present = past + new tokens, as the export computes it
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    }
    generation = getattr(model, "generation_config", None)
    for key in ("do_sample", "num_beams", "repetition_penalty", "temperature", "top_k", "top_p", "length_penalty",
                "no_repeat_ngram_size", "diversity_penalty"):
        value = getattr(generation, key, None)
        if value is not None:
            search[key] = type(search[key])(value)
    return search


def genai_config(model: torch.nn.Module, layout, filename: str = MODEL_FILE, *, context_length: int | None = None,
                 provider: str = "cpu", search: dict | None = None) -> dict:
    """The genai_config.json of an export of ``model`` with KV-cache ``layout``.

    Args:
        layout: the :class:`moepass.lowering.onnx.kv_cache.CacheLayout` of the export.
        context_length: longest sequence (default ``max_position_embeddings``).
        provider: ``cpu`` or ``cuda`` (the session's execution provider).
        search: search options that replace the defaults (from the model's generation_config).
    """
    from moepass.lowering.onnx.kv_cache import GENAI_NAMES

    if provider not in _PROVIDER_OPTIONS:
        raise OnnxExportError(f"unknown provider {provider!r}; expected one of {', '.join(_PROVIDER_OPTIONS)}")
    config = _text_config(model)
    context_length = int(context_length or getattr(config, "max_position_embeddings", 0) or 0)
    if context_length < 2:
        raise OnnxExportError(f"{type(model).__name__}: no max_position_embeddings in its config; pass context_length")
    eos = getattr(config, "eos_token_id", None)
    generation = getattr(model, "generation_config", None)
    if eos is None:
        eos = getattr(generation, "eos_token_id", None)
    if eos is None:
        raise OnnxExportError(f"{type(model).__name__}: no eos_token_id in its config or generation_config; "
                              "onnxruntime-genai needs one to stop generating (set model.config.eos_token_id)")
    eos = [int(e) for e in eos] if isinstance(eos, (list, tuple)) else int(eos)
    bos = _first_id(getattr(config, "bos_token_id", None))
    pad = _first_id(getattr(config, "pad_token_id", None))
    inputs = {key: GENAI_NAMES[key] for key in ("input_ids", "attention_mask")}
    if layout.takes_position_ids:
        inputs["position_ids"] = GENAI_NAMES["position_ids"]
    inputs.update(past_key_names=GENAI_NAMES["past_key_names"], past_value_names=GENAI_NAMES["past_value_names"])
    outputs = {key: GENAI_NAMES[key] for key in ("logits", "present_key_names", "present_value_names")}
    options = _PROVIDER_OPTIONS[provider]
    search_options = _search_defaults(model, context_length)
    unknown = sorted(set(search or {}) - set(search_options))
    if unknown:
        raise OnnxExportError(f"unknown search options {', '.join(unknown)}; known: {', '.join(sorted(search_options))}")
    search_options.update(search or {})
    return {
        "model": {
            "bos_token_id": bos if bos is not None else _first_id(eos),
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [options] if options else []},
                "filename": filename,
                "head_size": layout.head_size,
                "hidden_size": int(config.hidden_size),
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": int(config.num_attention_heads),
                "num_hidden_layers": layout.num_layers,
                "num_key_value_heads": layout.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else _first_id(eos),
            # a generic decoder-only model: onnxruntime-genai drives it through the names above
            "type": "decoder",
            "vocab_size": layout.vocab_size,
        },
        "search": search_options,
    }


def _tokenizer_source(model: torch.nn.Module, tokenizer: Any) -> Any:
    """What to take tokenizer files from: the given tokenizer or folder, else the model's own folder (if it has one).

    Raises:
        OnnxExportError: ``tokenizer`` is neither a tokenizer nor a folder with a tokenizer.json.
    """
    if tokenizer is None:
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not (name and (Path(name) / "tokenizer.json").is_file()):
            return None
        tokenizer = Path(name)
    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    if not isinstance(tokenizer, (str, os.PathLike)) or not Path(tokenizer).is_dir():
        raise OnnxExportError(f"tokenizer {tokenizer!r} is neither a transformers tokenizer nor a folder")
    if not (Path(tokenizer) / "tokenizer.json").is_file():
        raise OnnxExportError(f"tokenizer folder {tokenizer} has no tokenizer.json (the file onnxruntime-genai reads)")
    return Path(tokenizer)


def _write_tokenizer(source: Any, staging: Path) -> list[str]:
    """Save or copy the tokenizer files into ``staging``; returns their names."""
    if source is None:
        return []
    if hasattr(source, "save_pretrained"):
        before = set(os.listdir(staging))
        source.save_pretrained(str(staging))
        return sorted(set(os.listdir(staging)) - before)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)
            copied.append(name)
    return copied


def _check_target(folder: Path) -> None:
    """Refuse to write over a folder that is neither empty nor a previous export."""
    if folder.exists() and not folder.is_dir():
        raise OnnxExportError(f"{folder} is a file; give the folder to write the onnxruntime-genai model into")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / GENAI_CONFIG).is_file():
        raise OnnxExportError(f"{folder} is not empty and holds no {GENAI_CONFIG}: not replacing it; remove it or give "
                              "another folder")


def _move_into_place(staging: Path, folder: Path) -> None:
    _check_target(folder)  # again: it may have changed during the export
    if not folder.exists():
        os.replace(staging, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
    os.replace(folder, old / folder.name)
    try:
        os.replace(staging, folder)
    except OSError:
        os.replace(old / folder.name, folder)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _verify_generation(path: Path, prepared: PreparedExport, layout, tolerance: float) -> dict[str, float]:
    """Prefill with an empty cache, then one decode step, in ONNX Runtime against the rewritten torch model."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = prepared.captured.input_names
    ids = torch.randint(0, layout.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    errors = {}
    past = None
    for step, tokens in (("prefill", ids[:, :4]), ("decode", ids[:, 4:])):
        args = tuple(layout.feeds(tokens, past))
        actual = session.run(None, {n: t.numpy() for n, t in zip(names, args)})
        with torch.no_grad():
            expected = prepared.captured.gm(*args)
        errors[step] = max(_relative_error(a, e.float().numpy()) for a, e in zip(actual, expected))
        if not errors[step] <= tolerance:
            raise OnnxExportError(f"ONNX Runtime's {step} step differs from the rewritten torch model: max relative "
                                  f"error {errors[step]:.2e} > {tolerance:.0e}")
        past = [torch.from_numpy(a) for a in actual[1:]]
    return errors


def _name_axes(onnx_model, layout) -> None:
    """Give the graph's inputs and outputs the axis names onnxruntime-genai's builder uses."""
    from moepass.lowering.onnx.kv_cache import genai_dim_names

    dims = genai_dim_names(layout)
    for value in [*onnx_model.graph.input, *onnx_model.graph.output]:
        wanted = dims.get(value.name)
        shape = value.type.tensor_type.shape
        if wanted is None or len(shape.dim) != len(wanted):
            raise OnnxExportError(f"the exported graph's {value.name!r} is not [{', '.join(map(str, wanted or []))}]")
        for dim, name in zip(shape.dim, wanted):
            if isinstance(name, str):
                dim.dim_param = name
            elif dim.HasField("dim_value") and dim.dim_value != name:
                raise OnnxExportError(f"the exported graph's {value.name!r} has size {dim.dim_value} where {name} "
                                      "is expected")
            else:
                dim.dim_value = name


def export_genai(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    policy: Any = "static",
    *,
    target: str = "ort",
    options: OnnxExportOptions | None = None,
    tokenizer: Any = None,
    context_length: int | None = None,
    search: dict | None = None,
    **backend_options: Any,
) -> GenaiExport:
    """Export a causal LM with its MoE blocks routed by ``policy`` to a folder onnxruntime-genai loads.

    Args:
        model: a transformers causal LM with a plain full-attention KV cache (eval mode).
        folder: the folder to write (created; a previous export there is replaced).
        policy: a policy name or :class:`moepass.policies.Policy`, as for the backend.
        target: ``ort`` (laid out for ONNX Runtime, ``options.ort_layout``) or ``portable`` (standard ONNX ops only).
        options: :class:`moepass.OnnxExportOptions`; its ``provider`` also picks the
            genai_config's execution provider, ``external_data`` the weights file.
        tokenizer: a transformers tokenizer or a folder with ``tokenizer.json``;
            default: the tokenizer files of the folder the model was loaded from, if any.
        context_length: longest sequence (default the model's ``max_position_embeddings``).
        search: onnxruntime-genai search options replacing the defaults (e.g. ``{"max_length": 256}``).
        **backend_options: the policy's parameters (``p=0.65``) and backend options.

    Returns:
        :class:`GenaiExport`: the folder, its files and how each block was exported.

    Raises:
        OnnxExportError: the model cannot be exported with its KV cache or
            exactly (the message names the block and why), ONNX Runtime
            disagrees with torch, or ``folder`` holds something else.
    """
    from moepass.lowering.onnx import TARGETS
    from moepass.lowering.onnx.kv_cache import cache_layout

    options = options or OnnxExportOptions()
    if target not in TARGETS:
        raise OnnxExportError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    folder = Path(folder)
    _check_target(folder)
    tokenizer_source = _tokenizer_source(model, tokenizer)
    layout = cache_layout(model)  # a probe run: what cannot be exported fails before the long part
    config = genai_config(model, layout, MODEL_FILE, context_length=context_length, provider=options.provider,
                          search=search)
    prepared, _ = prepare_generation_export(model, opset=options.opset, layout=layout, policy=policy,
                                            **backend_options)
    onnx_model, blocks = prepared.lower(target, options.ort_fallback, options.ort_layout, in_place=True,
                                        provider=options.provider, ort_tuning=options.ort_tuning)
    _name_axes(onnx_model, layout)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the folder is an ordinary one
    try:
        path = staging / MODEL_FILE
        external = _write(onnx_model, path, options.external_data)
        if options.check:
            _check(onnx_model, path, external)
        errors = {}
        if options.verify:
            errors["example"] = _verify(path, prepared, options.tolerance)
            errors.update(_verify_generation(path, prepared, layout, options.tolerance))
        (staging / GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
        _write_tokenizer(tokenizer_source, staging)
        files = sorted(os.listdir(staging))
        _move_into_place(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = OnnxExport(folder / MODEL_FILE, target, prepared.policy, prepared.captured.input_names,
                        prepared.captured.output_names, blocks, errors.get("example"))
    exported = GenaiExport(folder, result, config, files, errors)
    logger.info("%s", exported)
    return exported
