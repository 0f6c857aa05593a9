"""Tiny MoE models built from real transformers classes, for tests, demos and docs.

Every model here is randomly initialised from a small config: nothing is
downloaded.  :func:`tiny_model` builds one by family name: the hand-written
configs below for the families the pass has always supported, and, for any
other MoE family of the installed transformers, the generic tiny config of
:mod:`moepass.zoo.discovery`.  :func:`survey` runs every discovered family
through the backend (:mod:`moepass.zoo.survey`);
:class:`ReferenceMoE` is a hand-written MoE in the common reference style
(nn.ModuleList of expert MLPs, a softmax/top-k router, a Python loop over
experts with ``torch.where`` and ``index_add_``).

May import anything but :mod:`moepass.cli` (``tests/test_layout.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FAMILIES",
    "UNSUPPORTED_FAMILIES",
    "tiny_config",
    "tiny_model",
    "survey",
    "randomize_weights",
    "ReferenceMoE",
    "ExpertMLP",
]

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    vocab_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

_FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=0,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        routed_scaling_factor=2.5,
    ),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, layer_types=None),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=128, head_dim=16),
}

#: Families the pass supports: every MoE block is rewritten.
FAMILIES = tuple(_FAMILY_CONFIGS)

#: MoE families the pass reports but leaves alone, with the expected reason.
UNSUPPORTED_FAMILIES: dict[str, dict[str, Any]] = {
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
}


def tiny_config(family: str, experts_implementation: str | None = None, **overrides: Any):
    """A small transformers config of ``family`` (e.g. ``"mixtral"``)."""
    from transformers import AutoConfig

    if family in _FAMILY_CONFIGS:
        extra = _FAMILY_CONFIGS[family]
    elif family in UNSUPPORTED_FAMILIES:
        extra = UNSUPPORTED_FAMILIES[family]
    elif family == "llama":
        extra = {}
    elif _is_discovered(family):
        from moepass.zoo import discovery as zoo_discovery

        if experts_implementation is not None:
            overrides["experts_implementation"] = experts_implementation
        return zoo_discovery.tiny_config(family, **overrides)
    else:
        raise ValueError(
            f"unknown family {family!r}; known: {', '.join(FAMILIES + tuple(UNSUPPORTED_FAMILIES))}, llama, "
            "or any MoE family of the installed transformers (moepass.zoo.discovery.discover_moe_families())"
        )
    kwargs = {**_COMMON, **extra, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(
    family: str,
    experts_implementation: str | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> nn.Module:
    """A randomly initialised model of ``family`` in eval mode.

    A causal LM for the hand-configured families; for the other discovered
    families the model class of :func:`moepass.zoo.discovery.tiny_family_model`
    (multimodal and encoder–decoder ones included).
    """
    from transformers import AutoModelForCausalLM

    if family not in _FAMILY_CONFIGS and family not in UNSUPPORTED_FAMILIES and family != "llama":
        if _is_discovered(family):
            from moepass.zoo.discovery import tiny_family_model

            if experts_implementation is not None:
                overrides["experts_implementation"] = experts_implementation
            return tiny_family_model(family, seed=seed, dtype=dtype, **overrides)
    config = tiny_config(family, experts_implementation, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomize_weights(model, seed)
    return model.eval()


def _is_discovered(family: str) -> bool:
    from moepass.zoo.discovery import discover_moe_families

    return any(f.name == family for f in discover_moe_families())


def survey(families=None, lengths=(8, 13), progress=None):
    """Every discovered MoE family through the backend: see :func:`moepass.zoo.survey.survey`."""
    from moepass.zoo.survey import survey as run

    return run(families, lengths, progress)


def randomize_weights(model: nn.Module, seed: int = 0, scale: float = 0.1) -> nn.Module:
    """Give every matrix, bias and router correction bias of ``model`` a random value, in place.

    transformers initialises some router weights (and biases) to zero; with
    those, every token ties and routing does not differ per token.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 or "bias" in name:
                param.copy_((torch.randn(param.shape, generator=generator) * scale).to(param.dtype))
        for name, buffer in model.named_buffers():
            if "correction_bias" in name:
                buffer.copy_((torch.randn(buffer.shape, generator=generator) * scale).to(buffer.dtype))
    return model


class ExpertMLP(nn.Module):
    """A SwiGLU expert: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ReferenceMoE(nn.Module):
    """A hand-written MoE block in the common reference style.

    ``softmax_first=True`` gives softmax → top-k → renormalise (Mixtral-like);
    ``False`` gives top-k → softmax over the k (the mistral reference).
    Under torch.compile the loop over ``torch.where`` needs
    ``fullgraph=True`` (or ``torch._dynamo.config.capture_dynamic_output_shape_ops
    = True``) to stay in one graph.
    """

    def __init__(self, dim: int = 32, hidden: int = 64, num_experts: int = 4, top_k: int = 2, softmax_first: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList([ExpertMLP(dim, hidden) for _ in range(num_experts)])
        self.top_k = top_k
        self.softmax_first = softmax_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(-1, shape[-1])
        logits = self.gate(x)
        if self.softmax_first:
            probs = F.softmax(logits, dim=-1, dtype=torch.float)
            weights, selected = torch.topk(probs, self.top_k, dim=-1)
            weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        else:
            weights, selected = torch.topk(logits, self.top_k, dim=-1)
            weights = F.softmax(weights, dim=-1, dtype=torch.float).to(x.dtype)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            token, nth = torch.where(selected == i)
            out.index_add_(0, token, expert(x[token]) * weights[token, nth, None])
        return out.view(shape)
