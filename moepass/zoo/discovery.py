"""Every MoE family of the installed transformers, and a tiny random model of each.

The families come from transformers itself, not from a hand-kept list, so a
release that adds a MoE model is picked up without a code change:

1. every config class of ``CONFIG_MAPPING`` whose configuration source (or
   that of a sub-config it names) mentions experts is instantiated with its
   defaults (the text scan only saves importing ~500 unrelated modules:
   ``discover_moe_families(prefilter=False)`` instantiates all, same result);
2. a config (or one of its sub-configs: ``text_config``, ``thinker_config``,
   ``ffn_config`` …) is *MoE* when it has an expert-count attribute
   (:data:`EXPERT_COUNT`: ``num_experts``, ``num_local_experts``,
   ``n_routed_experts``, ``moe_num_experts`` …) **and** either a top-k
   attribute (:data:`TOP_K`: ``num_experts_per_tok``, ``moe_topk``,
   ``moe_k``, ``top_k_experts`` …) or a router class in its modeling source
   (``class …Router(`` / ``…Gating(``: Switch Transformers and NLLB-MoE name
   no top-k).  This keeps ViTPose+ out: its ``num_experts`` are per-dataset
   heads, picked by an index, not routed;
3. the family is classified by the auto-model mappings and the config tree:
   ``encoder_decoder`` (``is_encoder_decoder``), ``multimodal`` (the experts
   live in a sub-config: a MoE text tower), ``causal_lm`` (a
   ``MODEL_FOR_CAUSAL_LM`` entry), else ``other`` (a base model, e.g. a
   token classifier);
4. a config type that only exists as the sub-config of another family (e.g.
   ``qwen3_vl_moe_text``) and has no generative class of its own is not a
   family of its own: its parent covers it.

:func:`tiny_config` shrinks a family's default config generically, by
attribute name (:func:`_shrink`): hidden 64, 2 layers that are *both* MoE
(dense-first counts, sparse steps and per-layer kind lists rewritten), 8
experts, top-2 (group-limited routing: 4 groups, top-2 groups), expert
intermediate 32, heads 4 / kv heads 2 / head dim 16, vocab 128 with the
special token ids moved inside it.  A few relations between sizes that the
models check are kept (:func:`_keep_relations`: multi-head stays multi-head,
MLA head dims, Mamba heads × head dim), and multimodal RoPE sections are
sized to the rotary dim, also where the modeling code falls back to a default
the config does not name.  :data:`FAMILY_OVERRIDES` holds the few per-family
settings no rule can derive, each with the reason.  Only sizes shrink: a
default that is already small (top-1 routing, two shared experts) is kept, so
the variant the config class describes — the one real checkpoints use — is
the one built; :data:`FAMILY_VARIANTS` adds the other variants in real use.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "EXPERT_COUNT",
    "TOP_K",
    "FAMILY_OVERRIDES",
    "FAMILY_VARIANTS",
    "MoEFamily",
    "discover_moe_families",
    "moe_family",
    "tiny_config",
    "tiny_family_model",
    "randomize_moe_weights",
]

logger = logging.getLogger(__name__)

#: Attribute names that hold the number of routed experts.
EXPERT_COUNT = re.compile(r"^(moe_)?(num|n)_(local_|routed_)?experts$")
#: Attribute names that hold the number of experts each token picks.
TOP_K = re.compile(r"^(num_experts_per_tok(en)?|moe_topk|moe_top_k|moe_k|top_k_experts|num_selected_experts)$")
#: A router class in the modeling source (for families that name no top-k).
_ROUTER_CLASS = re.compile(r"^class \w*(Router|Gating)\b\w*\(", re.M)

#: Tiny sizes.
HIDDEN = 64
INTERMEDIATE = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
VOCAB = 128
EXPERTS = 8
TOP_K_VALUE = 2
GROUPS = 4
TOPK_GROUP = 2

_GENERATIVE = ("CAUSAL_LM", "SEQ_TO_SEQ_CAUSAL_LM", "IMAGE_TEXT_TO_TEXT", "MULTIMODAL_LM")


@dataclass(frozen=True)
class MoEFamily:
    """One MoE model family of the installed transformers."""

    #: transformers' ``model_type`` (the key of ``CONFIG_MAPPING``).
    name: str
    #: ``causal_lm`` | ``multimodal`` | ``encoder_decoder`` | ``other``.
    kind: str
    #: The auto-model mapping the model class comes from (``CAUSAL_LM`` …).
    mapping: str
    #: The model class built for the family.
    model_class: str
    #: Where the experts are configured: ``""`` (top level) or a sub-config path.
    moe_config_path: str
    #: The expert-count attribute that made it MoE (``n_routed_experts``).
    expert_attribute: str


def _config_mapping():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING


def _model_mappings() -> dict[str, dict[str, str]]:
    """``{"CAUSAL_LM": {model_type: class name}, ...}`` from transformers' auto mappings."""
    from transformers.models.auto import modeling_auto

    mappings = {}
    for attribute in dir(modeling_auto):
        if attribute.endswith("_MAPPING_NAMES") and attribute.startswith("MODEL"):
            key = attribute[: -len("_MAPPING_NAMES")].removeprefix("MODEL_FOR_").removeprefix("MODEL")
            mappings[key or "MODEL"] = getattr(modeling_auto, attribute)
    return mappings


def _subconfigs(config) -> dict[str, Any]:
    """Direct sub-configs of ``config`` by attribute name."""
    from transformers import PretrainedConfig

    return {k: v for k, v in vars(config).items() if isinstance(v, PretrainedConfig)}


@functools.cache
def _has_router_class(config_module: str) -> bool:
    """Whether the modeling source beside ``config_module`` defines a router class."""
    modeling = config_module.replace(".configuration_", ".modeling_")
    try:
        spec = importlib.util.find_spec(modeling)
    except (ImportError, ValueError):
        return False
    if spec is None or spec.origin is None:
        return False
    with open(spec.origin, encoding="utf-8") as source:
        return bool(_ROUTER_CLASS.search(source.read()))


def _moe_attribute(config) -> str | None:
    """The expert-count attribute of ``config`` itself when it configures routed experts."""
    names = [k for k in vars(config) if not k.startswith("_")]
    count = next((k for k in names if EXPERT_COUNT.match(k)), None)
    if count is None:
        return None
    if any(TOP_K.match(k) for k in names) or _has_router_class(type(config).__module__):
        return count
    return None


def _find_moe(config, prefix: str = "") -> tuple[str, str] | None:
    """(sub-config path, attribute) of the first MoE (sub)config, top level first."""
    attribute = _moe_attribute(config)
    if attribute is not None:
        return prefix, attribute
    for key, sub in _subconfigs(config).items():
        found = _find_moe(sub, f"{prefix}.{key}" if prefix else key)
        if found is not None:
            return found
    return None


def _sub_model_types(config) -> set[str]:
    types = set()
    for sub in _subconfigs(config).values():
        types.add(getattr(sub, "model_type", ""))
        types |= _sub_model_types(sub)
    return types


_CONFIG_IMPORT = re.compile(r"from \.\.(\w+)\.configuration_\w+ import|from \.\.(\w+) import")
_NAMED_MODEL_TYPE = re.compile(r"""model_type["']?\s*[=:]\s*["']([\w.-]+)["']""")


def _config_sources() -> dict[str, str]:
    """``{model_type: source text of its configuration module}`` (read, not imported)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    sources = {}
    for model_type in CONFIG_MAPPING_NAMES:
        module = model_type_to_module_name(model_type)
        path = os.path.join(root, module, f"configuration_{module}.py")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                sources[model_type] = handle.read()
    return sources


def _may_be_moe(sources: dict[str, str]) -> set[str]:
    """Config types whose source, or that of a config they import or name as a default
    sub-config, mentions experts: the only ones whose default instance can have any.

    Importing all ~800 configuration modules costs seconds; this text scan
    keeps the import to the few hundred that matter.  Types without a
    source file of their own are kept (they are imported and checked).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    module_to_types: dict[str, list[str]] = {}
    for model_type in sources:
        module_to_types.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    direct = {t for t, text in sources.items() if re.search("expert", text, re.I)}

    refs: dict[str, set[str]] = {}
    for model_type, text in sources.items():
        found = set(_NAMED_MODEL_TYPE.findall(text)) & set(sources)
        for a, b in _CONFIG_IMPORT.findall(text):
            found |= set(module_to_types.get(a or b, []))
        refs[model_type] = found
    keep = set(direct)
    changed = True
    while changed:
        changed = False
        for model_type in sources:
            if model_type not in keep and refs[model_type] & keep:
                keep.add(model_type)
                changed = True
    return keep | (set(CONFIG_MAPPING_NAMES) - set(sources))


@functools.cache
def discover_moe_families(prefilter: bool = True) -> tuple[MoEFamily, ...]:
    """Every MoE family of the installed transformers, sorted by name (see the module docstring).

    ``prefilter=False`` instantiates every config class instead of only those
    whose source mentions experts (slower; the same result).
    """
    mappings = _model_mappings()
    names = list(_config_mapping().keys())
    if prefilter:
        keep = _may_be_moe(_config_sources())
        names = [n for n in names if n in keep]
    found: dict[str, tuple[Any, tuple[str, str]]] = {}
    for model_type in names:
        try:
            config = _config_mapping()[model_type]()
        except Exception as error:  # a config that cannot be built with its defaults
            logger.debug("zoo: config %s has no default instance: %s", model_type, error)
            continue
        try:
            where = _find_moe(config)
        except Exception as error:  # a config whose attributes this scan cannot read: say so, go on
            logger.warning("zoo: could not read config %s (%s: %s); it is not in the zoo", model_type, type(error).__name__, error)
            continue
        if where is not None:
            found[model_type] = (config, where)
    covered = set()
    for config, _ in found.values():
        covered |= _sub_model_types(config)
    families = []
    for model_type, (config, (path, attribute)) in found.items():
        has = {m for m, names in mappings.items() if model_type in names}
        multimodal_mapping = next((m for m in ("IMAGE_TEXT_TO_TEXT", "MULTIMODAL_LM") if m in has), None)
        if getattr(config, "is_encoder_decoder", False):
            kind, mapping = "encoder_decoder", next((m for m in _GENERATIVE if m in has), None)
        elif path and multimodal_mapping is not None:
            kind, mapping = "multimodal", multimodal_mapping
        elif "CAUSAL_LM" in has:
            kind, mapping = "causal_lm", "CAUSAL_LM"
        elif not path and multimodal_mapping is not None:
            kind, mapping = "causal_lm", multimodal_mapping  # a text model filed under a multimodal task
        elif model_type in covered:
            continue  # only a tower of another family, which covers it
        else:
            kind, mapping = "other", "MODEL" if "MODEL" in has else next(iter(sorted(has)), None)
        if mapping is None:
            logger.debug("zoo: MoE config %s has no model class", model_type)
            continue
        families.append(
            MoEFamily(
                name=model_type,
                kind=kind,
                mapping=mapping,
                model_class=mappings[mapping][model_type],
                moe_config_path=path,
                expert_attribute=attribute,
            )
        )
    return tuple(sorted(families, key=lambda f: f.name))


def moe_family(name: str) -> MoEFamily:
    """The discovered family ``name`` (a transformers ``model_type``)."""
    for family in discover_moe_families():
        if family.name == name:
            return family
    raise ValueError(f"{name!r} is not a MoE family of the installed transformers")


# --- tiny configs -------------------------------------------------------------

#: Per-family settings no name rule derives, each with the reason.  Keys are
#: family names; values are dicts merged into the shrunk config dict (dotted
#: keys reach sub-configs, e.g. ``"text_config.x"``).
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    # DbrxAttentionConfig has no rope_theta field, but DbrxAttention reads
    # attn_config.rope_theta; and clip_qkv=None (the default) makes
    # ``clamp(min=None, max=None)`` raise.
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    # The config leaves layer_types unset (checkpoints carry it) and the model
    # indexes it per layer: one short-conv layer and one attention layer.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # Indexed attention needs the QSA indexer sizes the config leaves unset,
    # and its per-query Python loop over nonzero() graph-breaks per token:
    # both layers use linear attention (the MoE block is the same).
    "qwen4_exp": {"text_config.layer_types": ["linear_attention", "linear_attention"]},
    "qwen4_exp_text": {"layer_types": ["linear_attention", "linear_attention"]},
    # The speech talker cannot be built from the default config (its MoE block
    # reads shared_expert_intermediate_size and its RoPE spatial_merge_size,
    # fields its configs do not define); the thinker holds the text MoE.
    "qwen3_omni_moe": {"enable_audio_output": False},
    # Its RoPE stacks the height and width sections: they must be equal.
    "ernie4_5_vl_moe": {"text_config.rope_parameters.mrope_section": [3, 3, 2]},
    # The model builds a sliding-window mask whatever the layer types, and the
    # config leaves the window unset.
    "step3p7": {"text_config.sliding_window": 4},
}

#: Variants of a family that real checkpoints use beside the config class's defaults, each tested as
#: well: ``{family: {variant: overrides}}`` (overrides as in :data:`FAMILY_OVERRIDES`), each with why.
FAMILY_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    # stepfun-ai/Step-3.7-Flash clamps its routed experts on two layers (swiglu_limits 7 there, 0 elsewhere)
    "step3p7": {"clamped": {"text_config.swiglu_limits": [0.0, 7.0]}},
}

_LAYER_COUNT = re.compile(r"^(num_hidden_layers|num_layers|n_layers|encoder_layers|decoder_layers|num_decoder_layers|num_encoder_layers|depth)$")
_MOE_FROM_ZERO = re.compile(r"^(first_k_dense_replace|num_dense_layers|moe_layer_start_index|expert_layer_offset)$")
_MOE_EVERY_LAYER = re.compile(r"^(decoder_sparse_step|encoder_sparse_step|interleave_moe_layer_step|moe_layer_interval|expert_layer_period)$")
_DENSE_LAYER_LIST = re.compile(r"(mlp_only_layers|dense_layers)$")
#: Per-layer kinds that are MoE layers (``sparse``, ``moe``, and variants such as ``hash_moe``).
_MOE_LAYER_VALUE = re.compile(r"^(sparse|(\w+_)?moe)$")
_SHARED_COUNT = re.compile(r"^(n|num|moe_num)_shared_experts$")
_INTERMEDIATE = re.compile(r"(intermediate|ffn_dim|^d_ff$|ffn_hidden_size|share_expert_dim|mlp_dim|moe_hidden_size)")
_HEAD_DIM = re.compile(r"(head_dim|^d_kv$|^kv_channels$|^mamba_d_head$)")
_RANK = re.compile(r"(_rank|rank)$")
_KV_HEADS = re.compile(r"(key_value_heads|kv_heads|kv_n_heads|num_key_heads)$")
_HEADS = re.compile(r"heads")
_HIDDEN = re.compile(r"(hidden_size$|^d_model$|^n_embd$|_hidden_dim$|^hidden_dim$|^embed_dim$|out_hidden_size$|^output_dim$|_output_dim$|_input_dim$|embed_dim$|adapter_\w+_(dim|size)$)")
_PERIOD = re.compile(r"(every_n_layers|_pattern$|_interval$|_period$|layer_group_size$|max_window_layers$)")
_STATE = re.compile(r"(ssm_state_size|mamba_d_state)$")
_GROUPS = re.compile(r"(_groups$|^n_groups$)")
_LAYER_INDICES = re.compile(r"(layers$|layer_ids$|indexes$|_idxs$|source_layers$)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resize_per_layer(name: str, values: list, layers: int) -> list:
    """A per-layer list of the default depth, cut to ``layers`` with every layer MoE."""
    if all(isinstance(v, str) for v in values):
        moe = list(dict.fromkeys(v for v in values if _MOE_LAYER_VALUE.match(v)))
        if moe:  # every layer MoE, each MoE variant (e.g. hash-routed) while there is room
            return [moe[i % len(moe)] for i in range(layers)]
        distinct = list(dict.fromkeys(values))  # keep every kind of layer while there is room
        return [distinct[i % len(distinct)] for i in range(layers)]
    return [values[i % len(values)] for i in range(layers)]


def _shrink_value(name: str, value: Any, default_layers: int | None) -> Any:
    """The tiny value of one config attribute (``value`` unchanged when no rule applies)."""
    L = LAYERS
    if EXPERT_COUNT.match(name):
        return [EXPERTS] * L if isinstance(value, list) else EXPERTS
    if TOP_K.match(name):
        return min(value, TOP_K_VALUE) if _is_int(value) and value > 0 else TOP_K_VALUE  # a top-1 model stays top-1
    if name in ("n_group", "num_expert_group"):
        return GROUPS if _is_int(value) and value > 1 else value
    if name == "topk_group":
        return TOPK_GROUP if _is_int(value) and value > 1 else value
    if "zero_expert" in name and _is_int(value):
        return EXPERTS // 2
    if _SHARED_COUNT.match(name) and (_is_int(value) or value is None):
        return 1 if value is None else min(value, 2)  # None: the model multiplies by it; 2 (Inkling) stays 2
    if value is None and _INTERMEDIATE.search(name) and re.search("moe|expert", name):
        return INTERMEDIATE  # configs that switch the experts off leave their size unset
    if name == "head_dim" and value is None:
        return HEAD_DIM
    if name == "mlp_layer_types" and value is None:
        return ["sparse"] * L
    if _LAYER_COUNT.match(name) and _is_int(value):
        return L
    if _MOE_FROM_ZERO.match(name) and _is_int(value):
        return 0
    if _MOE_EVERY_LAYER.match(name) and _is_int(value):
        return 1
    if name == "moe_layer_end_index" and _is_int(value):
        return L - 1
    if name.startswith("num_sparse_") and _is_int(value):
        return L
    if _DENSE_LAYER_LIST.search(name) and isinstance(value, list):
        return []
    if isinstance(value, list) and value and default_layers and len(value) == default_layers:
        return _resize_per_layer(name, value, L)
    if isinstance(value, list) and re.search(r"_types?$", name) and not name.startswith("mtp_") and value:
        return _resize_per_layer(name, value, L)
    if isinstance(value, list) and value and all(_is_int(v) for v in value) and _LAYER_INDICES.search(name):
        if default_layers and all(0 <= v < default_layers for v in value):
            kept = [v for v in value if v < L]
            return kept or [L - 1]
    if not (_is_int(value) or (isinstance(value, list) and value and all(_is_int(v) for v in value))):
        return value
    if isinstance(value, list):
        if _INTERMEDIATE.search(name):
            return [INTERMEDIATE] * len(value)
        return value
    if "vocab" in name and value > VOCAB:
        return VOCAB
    if name in ("max_position_embeddings", "max_seq_len", "model_max_length") and value > 256:
        return 256
    if name in ("qk_rope_head_dim", "qk_nope_head_dim"):
        return min(value, HEAD_DIM // 2)  # a 0 RoPE dim (NoPE) stays 0
    if _HEAD_DIM.search(name):
        return HEAD_DIM
    if _RANK.search(name) and value > 16:
        return 16
    if _INTERMEDIATE.search(name):
        return INTERMEDIATE
    if _KV_HEADS.search(name):
        return KV_HEADS
    if _HEADS.search(name):
        return HEADS
    if "per_layer_input" in name:
        return 16
    if _STATE.search(name):
        return 16
    if _GROUPS.search(name) and value > 2:
        return 2
    if _PERIOD.search(name) and value > L:
        return L
    if name.endswith("_offset") and value > 1:
        return 1
    if _HIDDEN.search(name) and value > HIDDEN:
        return HIDDEN
    return value


def _shrink(config: dict[str, Any], token_ids: dict[int, int] | None = None) -> dict[str, Any]:
    """A shrunk copy of a config dict (``to_dict()`` form); sub-config dicts are shrunk too.

    ``token_ids`` maps special token ids outside the tiny vocabulary to ids
    inside it (shared by the sub-configs, so equal ids stay equal).
    """
    token_ids = {} if token_ids is None else token_ids
    default_layers = next(
        (config[k] for k in ("num_hidden_layers", "num_layers", "n_layers", "depth") if _is_int(config.get(k))), None
    )
    out = {}
    for name, value in config.items():
        if isinstance(value, dict) and "model_type" in value:
            out[name] = _shrink(value, token_ids)
        elif "layer" in name and isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            # per-layer settings keyed by layer index: those of the kept layers, shrunk
            out[name] = {k: _shrink(v, token_ids) if isinstance(v, dict) else v for k, v in value.items() if int(k) < LAYERS}
        elif name == "rope_parameters" and isinstance(value, dict):
            out[name] = value
        elif _is_token_id(name, value):
            out[name] = _tiny_token_id(value, token_ids)
        elif name in ("enable_moe_block", "is_moe"):
            out[name] = True  # families whose default has the experts switched off
        elif name == "use_cache":
            out[name] = False  # one forward over the whole sequence: no KV / state cache
        else:
            out[name] = _shrink_value(name, value, default_layers)
    _keep_relations(config, out)
    if isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = _shrink_rope(out["rope_parameters"], _rope_dim(out))
    return out


def _is_token_id(name: str, value: Any) -> bool:
    if not re.search(r"(token_id|token_index|token_ids)$", name):
        return False
    return _is_int(value) or (isinstance(value, list) and bool(value) and all(_is_int(v) for v in value))


def _tiny_token_id(value: Any, token_ids: dict[int, int]) -> Any:
    """Special token ids moved into the tiny vocabulary, from its top down (ids inside it stay)."""
    if isinstance(value, list):
        return [_tiny_token_id(v, token_ids) for v in value]
    if value < VOCAB:
        return value
    if value not in token_ids:
        token_ids[value] = VOCAB - 1 - len(token_ids)
    return token_ids[value]


def _keep_relations(default: dict[str, Any], out: dict[str, Any]) -> None:
    """Relations between sizes that the model checks and no single name rule keeps."""
    # multi-head attention (kv heads == heads) stays multi-head
    for kv in ("num_key_value_heads", "swa_num_key_value_heads"):
        heads = kv.replace("key_value_heads", "attention_heads")
        if _is_int(default.get(kv)) and default.get(kv) == default.get(heads):
            out[kv] = out[heads]
    # MLA: the head dim some families derive from the RoPE part, and the q/k head dim
    if _is_int(default.get("head_dim")) and default.get("head_dim") == default.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]
    if _is_int(default.get("qk_head_dim")) and _is_int(out.get("qk_nope_head_dim")) and _is_int(out.get("qk_rope_head_dim")):
        if default["qk_head_dim"] == default.get("qk_nope_head_dim", 0) + default.get("qk_rope_head_dim", 0):
            out["qk_head_dim"] = out["qk_nope_head_dim"] + out["qk_rope_head_dim"]
    # an attention indexer's heads read one key head's group of query heads (Kolibri 1.1)
    heads, kv = out.get("num_attention_heads"), out.get("num_key_value_heads")
    if _is_int(out.get("index_num_heads")) and _is_int(heads) and _is_int(kv) and kv:
        out["index_num_heads"] = max(1, min(out["index_num_heads"], heads // kv))
    # Mamba: heads × head dim == expand × hidden size
    for heads, head_dim, expand in (
        ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
        ("mamba_num_heads", "mamba_head_dim", "expand"),
    ):
        if all(_is_int(out.get(k)) for k in (heads, head_dim, expand)) and _is_int(out.get("hidden_size")):
            out[heads] = out[expand] * out["hidden_size"] // out[head_dim]


def _rope_dim(config: dict[str, Any]) -> int:
    """The rotary dimension of a shrunk config (for multimodal RoPE sections)."""
    dim = config.get("qk_rope_head_dim") or config.get("head_dim") or HEAD_DIM
    return int(dim)


def _shrink_rope(rope: dict[str, Any], rope_dim: int) -> dict[str, Any]:
    """RoPE parameters for the tiny head dim: multimodal sections sum to the rotary half-dim."""
    if any(isinstance(v, dict) for v in rope.values()):  # per-layer-type RoPE parameters
        return {k: _shrink_rope(v, rope_dim) if isinstance(v, dict) else v for k, v in rope.items()}
    rope = dict(rope)
    for key in ("mrope_section", "mrope_sections"):
        sections = rope.get(key)
        if isinstance(sections, list) and sections and all(_is_int(s) for s in sections):
            factor = float(rope.get("partial_rotary_factor") or 1.0)
            if int(rope_dim * factor) // 2 < 2 * len(sections):
                rope["partial_rotary_factor"] = factor = 1.0  # room for every section
            half = int(rope_dim * factor) // 2
            parts = [half // len(sections)] * len(sections)
            parts[0] += half - sum(parts)
            rope[key] = parts
    return rope


def _apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> None:
    for dotted, value in overrides.items():
        target = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = copy.deepcopy(value)


_MROPE_DEFAULT = re.compile(r"""get\(\s*["']mrope_section["']\s*,\s*\[([\d,\s]+)\]""")


def _mrope_default_sections(config_class) -> int | None:
    """Sections of the multimodal RoPE a modeling module falls back to when the config names none."""
    modeling = config_class.__module__.replace(".configuration_", ".modeling_")
    spec = importlib.util.find_spec(modeling)
    if spec is None or spec.origin is None:
        return None
    with open(spec.origin, encoding="utf-8") as source:
        match = _MROPE_DEFAULT.search(source.read())
    return len(match.group(1).split(",")) if match else None


def _add_mrope_sections(config: dict[str, Any], sections: int) -> None:
    """Give every RoPE parameter dict without ``mrope_section`` tiny sections (their default is for head dim 128)."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_type" in rope and "mrope_section" not in rope:
        config["rope_parameters"] = _shrink_rope({**rope, "mrope_section": [1] * sections}, _rope_dim(config))
    for value in config.values():
        if isinstance(value, dict) and "model_type" in value:
            _add_mrope_sections(value, sections)


def tiny_config(family: str | MoEFamily, **overrides: Any):
    """A tiny config of a discovered MoE family: every layer MoE, 8 experts, top-2, hidden 64.

    ``overrides`` are merged last (dotted keys reach sub-configs).
    """
    family = family if isinstance(family, MoEFamily) else moe_family(family)
    config_class = _config_mapping()[family.name]
    shrunk = _shrink(config_class().to_dict())
    sections = _mrope_default_sections(config_class)
    if sections:
        _add_mrope_sections(shrunk, sections)
    _apply_overrides(shrunk, FAMILY_OVERRIDES.get(family.name, {}))
    _apply_overrides(shrunk, overrides)
    for key in ("transformers_version", "architectures", "_name_or_path"):
        shrunk.pop(key, None)
    return config_class(**shrunk)


def tiny_family_model(family: str | MoEFamily, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> nn.Module:
    """A randomly initialised tiny model of ``family`` in eval mode (see :func:`tiny_config`)."""
    from transformers.models.auto import modeling_auto

    family = family if isinstance(family, MoEFamily) else moe_family(family)
    config = tiny_config(family, **overrides)
    mapping_name = "MODEL_MAPPING" if family.mapping == "MODEL" else f"MODEL_FOR_{family.mapping}_MAPPING"
    model_class = getattr(modeling_auto, mapping_name)[type(config)]
    torch.manual_seed(seed)
    model = model_class._from_config(config, dtype=dtype)
    randomize_moe_weights(model, seed)
    return model.eval()


def randomize_moe_weights(model: nn.Module, seed: int = 0, scale: float = 0.08) -> nn.Module:
    """Random weights N(0, ``scale``) for every matrix and bias, and router state, in place.

    transformers zero-initialises some router weights, correction biases and
    per-expert scales; with those every token ties and routing does not vary
    per token.  Matrices and biases get N(0, scale); float buffers named like
    router state (``*correction_bias``, ``*expert_bias``) too; 1-D parameters of
    routers and experts (per-expert scales, router scales) get 1 + N(0, scale).
    """
    generator = torch.Generator().manual_seed(seed)

    def noise(shape):
        return torch.randn(shape, generator=generator) * scale

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 or "bias" in name:
                param.copy_(noise(param.shape).to(param.dtype))
            elif param.ndim == 1 and re.search(r"(expert|router|\.gate\.)", name) and "norm" not in name:
                param.copy_((1 + noise(param.shape)).to(param.dtype))
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point() and re.search(r"(correction_bias|expert_bias|router.*bias)", name):
                buffer.copy_(noise(buffer.shape).to(buffer.dtype))
    return model
