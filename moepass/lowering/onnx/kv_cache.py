"""Capture a causal LM with its KV cache as flat tensors, under the names onnxruntime-genai expects.

::

    input_ids [batch, sequence]                     int64
    attention_mask [batch, total_sequence]          int64   (total = past + sequence)
    position_ids [batch, sequence]                  int64   (when the model takes them)
    past_key_values.{i}.key / .value                [batch, kv_heads, past_sequence, head_size]
        │
        ▼  _CacheEntry: DynamicCache built from the past tensors, model(..., use_cache=True)
        │  torch._dynamo.export → one torch-level graph (the MoE blocks rewrite exactly as without a cache)
        ▼
    logits [batch, sequence, vocab]
    present.{i}.key / .value                        [batch, kv_heads, total_sequence, head_size]

The present tensors are the past ones with this call's keys and values
appended (onnxruntime-genai's layout when past and present do not share a
buffer).  A first call passes past tensors of length 0.  The cache layout
(layers, KV heads, head size, dtype) is read off the cache the model itself
fills on a probe run, not guessed from its config, and a model whose cache is
not one plain key/value pair per layer (sliding windows, linear attention) is
refused with the reason.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from moepass.lowering.onnx.capture import CapturedModel, _first_lines, _with_model_names

from moepass.exports.errors import OnnxExportError

__all__ = ["CacheLayout", "GENAI_NAMES", "cache_layout", "capture_with_cache", "genai_dim_names"]

logger = logging.getLogger(__name__)

#: Input and output names (onnxruntime-genai's defaults: src/config.h, the model builder).
GENAI_NAMES = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "position_ids": "position_ids",
    "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value",
    "logits": "logits",
    "present_key_names": "present.%d.key",
    "present_value_names": "present.%d.value",
}

#: Symbolic axis names of the exported graph's inputs and outputs (those of onnxruntime-genai's builder).
BATCH, SEQUENCE, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


@dataclass(frozen=True)
class CacheLayout:
    """What the model's KV cache holds, read off a probe run."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    vocab_size: int
    #: Whether the model's forward takes ``position_ids``.
    takes_position_ids: bool
    #: The keyword the model's forward takes its cache by (``cache`` from transformers 5.24, else ``past_key_values``).
    cache_keyword: str

    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask"] + (["position_ids"] if self.takes_position_ids else [])
        for i in range(self.num_layers):
            names += [GENAI_NAMES["past_key_names"] % i, GENAI_NAMES["past_value_names"] % i]
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in range(self.num_layers):
            names += [GENAI_NAMES["present_key_names"] % i, GENAI_NAMES["present_value_names"] % i]
        return names

    def past_shape(self, batch: int, past: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, past, self.head_size)

    def feeds(self, input_ids: torch.Tensor, past: list[torch.Tensor] | None = None,
              past_length: int | None = None) -> list[torch.Tensor]:
        """The input tensors, in :meth:`input_names` order, for ``input_ids`` after ``past`` (None: an empty cache).

        Positions continue from the past length; every token is attended to.
        """
        batch, sequence = input_ids.shape
        if past is None:
            past = [torch.zeros(self.past_shape(batch, 0), dtype=self.dtype) for _ in range(2 * self.num_layers)]
        length = past[0].shape[2] if past_length is None else past_length
        tensors = [input_ids, torch.ones(batch, length + sequence, dtype=torch.int64)]
        if self.takes_position_ids:
            tensors.append(torch.arange(length, length + sequence, dtype=torch.int64).expand(batch, sequence).contiguous())
        return tensors + list(past)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_of(out: Any) -> Any:
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def cache_layout(model: torch.nn.Module) -> CacheLayout:
    """The model's KV cache layout, from a probe run with a transformers ``DynamicCache``.

    Raises:
        OnnxExportError: the model is not a causal LM with a plain per-layer key/value cache.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    name = type(model).__name__
    config = _text_config(model)
    if config is None or not hasattr(model, "generate"):
        raise OnnxExportError(f"{name} is not a transformers causal LM (no config / generate()); the KV-cache export "
                              "needs one")
    keyword = "cache" if _accepts(model, "cache") else "past_key_values"
    if not _accepts(model, keyword) or not _accepts(model, "attention_mask"):
        raise OnnxExportError(f"{name}.forward takes no {keyword!r} and 'attention_mask': it cannot be exported with a "
                              "KV cache")
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or [])
    if window or layer_types - {"full_attention"}:
        kinds = ", ".join(sorted(layer_types - {"full_attention"})) or f"sliding window {window}"
        raise OnnxExportError(f"{name}: attention layers of kind {kinds}; the KV-cache export supports full attention "
                              "only (a sliding window would need onnxruntime-genai's windowed cache)")
    vocab = getattr(config, "vocab_size", None)
    ids = torch.randint(0, int(vocab or 2), (1, 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{keyword: DynamicCache()})
    cache = _cache_of(out)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise OnnxExportError(f"{name}: its cache holds {', '.join(kinds)}, not one key/value pair per layer; the "
                              "KV-cache export supports plain full-attention caches only")
    keys = layers[0].keys
    if keys is None or keys.ndim != 4 or any(layer.keys.shape != keys.shape or layer.values.shape != keys.shape
                                             for layer in layers):
        raise OnnxExportError(f"{name}: its layers' cached keys and values differ in shape; the KV-cache export needs "
                              "[batch, kv_heads, sequence, head_size] in every layer")
    if keys.dtype not in (torch.float32, torch.float16):
        raise OnnxExportError(f"{name}: its KV cache is {keys.dtype}; export it in float32 or float16")
    logits = out.logits
    return CacheLayout(len(layers), keys.shape[1], keys.shape[3], keys.dtype, int(logits.shape[-1]),
                       _accepts(model, "position_ids"), keyword)


class _CacheEntry(torch.nn.Module):
    """Takes the flat inputs of :meth:`CacheLayout.input_names`, returns logits and the flat present tensors."""

    def __init__(self, model: torch.nn.Module, layout: CacheLayout):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        layout = self.layout
        input_ids, attention_mask = tensors[0], tensors[1]
        position_ids = tensors[2] if layout.takes_position_ids else None
        past = tensors[3:] if layout.takes_position_ids else tensors[2:]
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layout.num_layers)])
        extra = {"position_ids": position_ids} if position_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{layout.cache_keyword: cache}, **extra)
        present = []
        for layer in _cache_of(out).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _dynamic_shapes(layout: CacheLayout) -> tuple[dict[int, Any], ...]:
    batch = torch.export.Dim(BATCH)
    sequence = torch.export.Dim(SEQUENCE)
    past = torch.export.Dim(PAST)
    # torch.export takes sizes of dynamic axes to be >= 2, so past + sequence >= 4 while tracing; the
    # graph has no such guard, and runs with an empty past and one token (checked by the export)
    total = torch.export.Dim(TOTAL, min=4)
    shapes: list[dict[int, Any]] = [{0: batch, 1: sequence}, {0: batch, 1: total}]
    if layout.takes_position_ids:
        shapes.append({0: batch, 1: sequence})
    shapes += [{0: batch, 2: past} for _ in range(2 * layout.num_layers)]
    return tuple(shapes)


def genai_dim_names(layout: CacheLayout) -> dict[str, list[str | int]]:
    """Axis names (or sizes) of every graph input and output, as onnxruntime-genai's builder writes them."""
    kv = [BATCH, layout.num_kv_heads, PAST, layout.head_size]
    present = [BATCH, layout.num_kv_heads, TOTAL, layout.head_size]
    dims: dict[str, list[str | int]] = {"input_ids": [BATCH, SEQUENCE], "attention_mask": [BATCH, TOTAL],
                                        "logits": [BATCH, SEQUENCE, layout.vocab_size]}
    if layout.takes_position_ids:
        dims["position_ids"] = [BATCH, SEQUENCE]
    for i in range(layout.num_layers):
        for kind in ("key", "value"):
            dims[GENAI_NAMES[f"past_{kind}_names"] % i] = kv
            dims[GENAI_NAMES[f"present_{kind}_names"] % i] = present
    return dims


def example_inputs(layout: CacheLayout, batch: int = 2, sequence: int = 3, past: int = 5,
                   seed: int = 0) -> list[torch.Tensor]:
    """Example tensors for tracing: random token ids after a random past (every axis >= 2)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, layout.vocab_size, (batch, sequence), generator=generator)
    cached = [torch.randn(layout.past_shape(batch, past), generator=generator).to(layout.dtype)
              for _ in range(2 * layout.num_layers)]
    return layout.feeds(ids, cached)


def capture_with_cache(model: torch.nn.Module, layout: CacheLayout | None = None) -> tuple[CapturedModel, CacheLayout]:
    """Capture ``model`` as one graph taking and returning its KV cache as flat tensors.

    Raises:
        OnnxExportError: the model has no plain KV cache, or does not capture as one graph.
    """
    if model.training:
        logger.warning("moepass: %s is in training mode; the export traces what it does now (call .eval())",
                       type(model).__name__)
    layout = layout or cache_layout(model)
    tensors = example_inputs(layout)
    shapes = _dynamic_shapes(layout)
    entry = _CacheEntry(model, layout).eval()
    try:
        with torch.no_grad():
            result = torch._dynamo.export(entry, aten_graph=False, dynamic_shapes=(shapes,),
                                          assume_static_by_default=True)(*tensors)
    except Exception as error:  # dynamo raises many types: Unsupported, UserError, constraint violations
        raise OnnxExportError(
            f"the model does not capture as one graph with its KV cache: {_first_lines(error)}"
        ) from error
    finally:
        torch._dynamo.reset()
    gm = _with_model_names(result.graph_module, model)
    logger.info("captured %s with its KV cache: %d layers, %d KV heads of %d, %d graph nodes", type(model).__name__,
                layout.num_layers, layout.num_kv_heads, layout.head_size, len(gm.graph.nodes))
    return CapturedModel(gm, tuple(tensors), layout.input_names(), layout.output_names(), shapes), layout
