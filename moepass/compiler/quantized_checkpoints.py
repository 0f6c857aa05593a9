"""Experts that arrive quantized: ``moepass.adapt_quantized_experts(model)`` before ``torch.compile``.

What a quantized MoE checkpoint leaves in memory on a CPU varies (see
``notes/quantized-experts.md``): transformers dequantizes gpt-oss's MXFP4 to
bfloat16 at load; torchao quantizes 3-D expert parameters into ``Int8Tensor``
subclasses whose CPU paths dequantize; gptqmodel "defuses" the stacked experts
into one GPTQ (or AWQ) linear per expert and projection, run by a Python loop.
:func:`adapt_quantized_experts` finds such experts modules, reads their
stored format into moepass's packed layout (:mod:`moepass.quantize.adapters`:
no second rounding), and replaces, on the model instance, each module's
forward by the moepass computation on those codes, as
:func:`moepass.make_traceable` does for loops::

    experts module (torchao Int8Tensor params | gpt-oss + MXFP4 blocks | defused GPTQ/AWQ linears)
        ──► QuantizedWeight (codes, scales, zero points) ×2 + two float *stand-ins* [E, out, in] with no data
        forward eagerly:        moepass.quantized_experts(x, ids, w, codes…)        (the plain layout)
        forward under compile:  moepass.experts(x, ids, w, stand-in₁, stand-in₂)    the backend sees a normal
                                block; its quantize stage maps the stand-ins back to the codes
                                (moepass.compiler.plan.quantize), so the compiled graph runs
                                moepass.quantized_experts on the checkpoint's own codes

Each new forward is checked against the module's own forward on a small random
input (or, where that cannot run on a CPU, against the codes' float
dequantization) and left as it was where they differ.  :class:`AdaptedExperts`
says, per module, the format *actually found* (not what the config claims) and
what was done; a format the layout cannot take (act-order GPTQ, 3-bit) is left
as it was with the reason.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from moepass.compiler.plan.quantize import register_standin
from moepass.compiler.spec import ExpertsSpec
from moepass.compiler.traceable import _activation_name
from moepass.quantize.adapters import from_awq, from_gptq, from_mxfp4, from_torchao_int8
from moepass.quantize.layout import QuantizedWeight, dequantize
from moepass.quantize.scheme import QuantizeError
from moepass.runtime.ops import ExpertsConfig
from moepass.runtime.quantized_ops import QuantizedExpertsConfig

__all__ = ["AdaptedExperts", "adapt_quantized_experts"]

logger = logging.getLogger(__name__)

#: The attribute set on a module this adapter changed.
MARK = "_moepass_quantized_experts"


@dataclass
class AdaptedExperts:
    """One experts module: what was found, and what moepass did."""

    path: str
    #: The format actually found in memory (or in the checkpoint given).
    found: str
    #: What moepass did ("int4 g128 asymmetric, exact: ..." or "left as it was: <reason>").
    action: str
    adapted: bool = False

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: found {self.found}; {self.action}"


class _Skip(Exception):
    """The module is not of this adapter's kind."""


def _quantized_attr(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value).__name__ == "Int8Tensor" and hasattr(value, "qdata")


def _standin(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A float tensor of ``shape`` with no data (its storage resized to 0 bytes)."""
    tensor = torch.empty(shape, dtype=dtype)
    tensor.untyped_storage().resize_(0)
    return tensor


def _release(tensor: torch.Tensor) -> int:
    """Free a tensor's data in place (shape kept); returns the bytes given back."""
    if tensor.untyped_storage().nbytes() == 0:
        return 0
    freed = tensor.numel() * tensor.element_size()
    empty = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    empty.untyped_storage().resize_(0)
    tensor.data = empty
    return freed


# --- reading each format --------------------------------------------------------------------------


def _stacked_spec(module: nn.Module, w1: QuantizedWeight, w2: QuantizedWeight) -> ExpertsSpec:
    experts, n1, hidden = w1.shape
    return ExpertsSpec(dispatch="moepass_op", num_experts=experts, hidden_size=hidden, intermediate_size=n1 // 2,
                       activation=_activation_name(module.act_fn), gated=True, gate_up_layout="concat")


def _read_torchao(module: nn.Module, path: str, checkpoint) -> tuple:
    """transformers' stacked experts whose ``gate_up_proj`` / ``down_proj`` are torchao ``Int8Tensor``s."""
    first, second = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (_quantized_attr(first) and _quantized_attr(second)):
        raise _Skip
    found = f"torchao Int8Tensor gate_up_proj {list(first.shape)} and down_proj {list(second.shape)} (block_size " \
            f"{list(first.block_size)})"
    if type(module).__name__.startswith("GptOss"):
        raise QuantizeError(f"{found}: gpt-oss's [E, in, out] experts quantized per row group the outputs, not the inputs")
    w1, w2 = from_torchao_int8(first.qdata, first.scale), from_torchao_int8(second.qdata, second.scale)
    return found, w1, w2, _stacked_spec(module, w1, w2), None, None, [], first.dtype


def _read_mxfp4(module: nn.Module, path: str, checkpoint) -> tuple:
    """gpt-oss experts with MXFP4 ``*_blocks`` / ``*_scales`` on the module or in the checkpoint given."""
    name = type(module).__name__
    if not ((name.startswith(("GptOss", "Mxfp4GptOss")) and name.endswith("Experts")) or hasattr(module, "gate_up_proj_blocks")):
        raise _Skip
    prefix = f"{path}." if path else ""

    def stored(name: str) -> torch.Tensor | None:
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            return value
        return checkpoint.get(prefix + name) if checkpoint is not None else None

    names = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")
    tensors = [stored(n) for n in names]
    if any(t is None for t in tensors):
        if checkpoint is None:
            raise _Skip  # float gpt-oss experts: the config check below says what was found
        missing = next(prefix + n for n, t in zip(names, tensors) if t is None)
        raise QuantizeError(f"no MXFP4 blocks: the checkpoint given has no {missing}")
    w1, w2 = from_mxfp4(tensors[0], tensors[1]), from_mxfp4(tensors[2], tensors[3])
    found = f"MXFP4 blocks + E8M0 scales as stored (gate_up {list(tensors[0].shape)}, down {list(tensors[2].shape)})"
    spec = ExpertsSpec(
        dispatch="moepass_op", num_experts=w1.shape[0], hidden_size=w1.shape[2], intermediate_size=w1.shape[1] // 2,
        activation="swiglu_clamp", gated=True, gate_up_layout="interleaved", has_bias=True,
        swiglu_alpha=float(getattr(module, "alpha", 1.702)), swiglu_limit=float(getattr(module, "limit", 7.0)),
    )
    dense = [getattr(module, n, None) for n in ("gate_up_proj", "down_proj")]
    dtype = next((d.dtype for d in dense if isinstance(d, torch.Tensor) and d.is_floating_point()), torch.bfloat16)
    release = [d for d in dense if isinstance(d, torch.Tensor)]
    return found, w1, w2, spec, "gate_up_proj_bias", "down_proj_bias", release, dtype


def _linear_tensors(linear: nn.Module) -> dict[str, torch.Tensor]:
    found = {name: getattr(linear, name, None) for name in ("qweight", "qzeros", "scales", "g_idx")}
    if not all(isinstance(found[n], torch.Tensor) for n in ("qweight", "qzeros", "scales")):
        raise _Skip
    return {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the model computes in around ``module`` (its first float parameter outside quantized buffers)."""
    for parameter in _MODEL_PARAMETERS.get(id(module), ()):
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


#: id(experts module) → the parameters of the model it belongs to (set while adapting)
_MODEL_PARAMETERS: dict[int, tuple] = {}


def _read_gptq(module: nn.Module, path: str, checkpoint) -> tuple:
    """Defused experts (gptqmodel): children 0…E−1 with GPTQ or AWQ ``gate_proj`` / ``up_proj`` / ``down_proj``."""
    children = dict(module.named_children())
    if not children or not all(name.isdigit() for name in children):
        raise _Skip
    experts = [children[str(i)] for i in range(len(children))] if all(str(i) in children for i in range(len(children))) else None
    if experts is None or not all(hasattr(e, p) for e in experts for p in ("gate_proj", "up_proj", "down_proj")):
        raise _Skip
    linears = {p: [_linear_tensors(getattr(e, p)) for e in experts] for p in ("gate_proj", "up_proj", "down_proj")}
    first = experts[0].down_proj
    bits = int(getattr(first, "bits", 4))
    scales = linears["down_proj"][0]["scales"]
    awq = linears["down_proj"][0]["qweight"].shape[1] != scales.shape[1]  # AWQ packs along the outputs
    kind = "AWQ" if awq else "GPTQ"
    group = linears["down_proj"][0]["qweight"].shape[0] * (1 if awq else 32 // bits) // scales.shape[0]
    found = f"{kind} {bits}-bit g{group} linears per expert ({len(experts)} experts × gate/up/down)"
    zero_format = getattr(first, "qzero_format", None)
    zero_format = zero_format() if callable(zero_format) else None

    def read(which: list[dict], fmt: str) -> QuantizedWeight:
        return from_awq(which, bits) if awq else from_gptq(which, bits, fmt)

    def layouts(fmt: str):
        gate, up, down = (read(linears[p], fmt) for p in ("gate_proj", "up_proj", "down_proj"))
        w1 = QuantizedWeight(torch.cat([gate.codes, up.codes], 1), torch.cat([gate.scales, up.scales], 1),
                             torch.cat([gate.zeros, up.zeros], 1), gate.scheme,
                             (gate.shape[0], gate.shape[1] + up.shape[1], gate.shape[2]))
        return w1, down

    w1, w2 = layouts(zero_format or "v2")
    spec = ExpertsSpec(dispatch="moepass_op", num_experts=len(experts), hidden_size=w1.shape[2],
                       intermediate_size=w2.shape[2], activation=_activation_name(experts[0].act_fn), gated=True,
                       gate_up_layout="concat")
    alternative = None if awq or zero_format else (lambda: layouts("v1"))
    release = [t for p in linears.values() for linear in p for t in linear.values()]
    dtype = _compute_dtype(module)
    return found, w1, w2, spec, None, None, release, dtype, alternative


_READERS: tuple[Callable, ...] = (_read_torchao, _read_mxfp4, _read_gptq)


# --- the new forward ----------------------------------------------------------------------------


def _forward(spec: ExpertsSpec, w1: QuantizedWeight, w2: QuantizedWeight, bias1: str | None, bias2: str | None):
    """The experts forward on the codes (eager) or on the stand-ins (traced; see the module docstring)."""
    float_config = ExpertsConfig(spec=spec).to_json()
    quantized_config = QuantizedExpertsConfig(ExpertsConfig(spec=spec), w1.scheme, "plain").to_json()
    first, second = list(w1.tensors().values()), list(w2.tensors().values())

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None):
        weights = top_k_weights.float()
        b1 = getattr(self, bias1) if bias1 else None
        b2 = getattr(self, bias2) if bias2 else None
        if torch.compiler.is_compiling():
            out = torch.ops.moepass.experts(hidden_states, top_k_index, weights, self._moepass_w1, self._moepass_w2,
                                            b1, b2, float_config)
        else:
            out = torch.ops.moepass.quantized_experts(hidden_states, top_k_index, weights, first, second, b1, b2,
                                                      quantized_config)
        return out.to(hidden_states.dtype)

    return forward


def _example(spec: ExpertsSpec, dtype: torch.dtype, tokens: int = 6) -> tuple:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, spec.hidden_size, generator=generator).to(dtype)
    depth = min(2, spec.num_experts)
    ids = torch.stack([torch.randperm(spec.num_experts, generator=generator)[:depth] for _ in range(tokens)])
    return x, ids, torch.rand(tokens, depth, generator=generator).to(dtype)


def _dequantized_reference(spec, w1, w2, module, bias1, bias2, args) -> torch.Tensor:
    b1 = getattr(module, bias1) if bias1 else None
    b2 = getattr(module, bias2) if bias2 else None
    x, ids, weights = args
    config = ExpertsConfig(spec=spec, lowering="reference").to_json()
    return torch.ops.moepass.experts(x.float(), ids, weights.float(), dequantize(w1), dequantize(w2),
                                     None if b1 is None else b1.float(), None if b2 is None else b2.float(), config)


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp_min(1e-30)
    return float((actual.double() - expected.double()).abs().max() / scale)


def _adapt(path: str, module: nn.Module, read: tuple, release: bool) -> AdaptedExperts:
    found, w1, w2, spec, bias1, bias2, owned, dtype, *alternatives = read
    candidates = [(w1, w2)] + [alt() for alt in alternatives if alt is not None]
    args = _example(spec, dtype)
    with torch.no_grad():
        try:
            expected = module(*args)
            expected = expected[0] if isinstance(expected, (tuple, list)) else expected
            against = "its own forward"
        except Exception as error:  # torchao's CPU subclass paths, a kernel-only module: compare with the codes
            expected, against = None, f"the codes' float dequantization (its own forward raised {type(error).__name__})"
        for first, second in candidates:
            forward = _forward(spec, first, second, bias1, bias2)
            reference = expected if expected is not None else _dequantized_reference(spec, first, second, module, bias1,
                                                                                      bias2, args)
            got = forward(module, *args)
            error = _error(got, reference)
            tolerance = 1e-4 if reference.dtype in (torch.float32, torch.float64) else 3e-2
            if error <= tolerance:
                break
        else:
            return AdaptedExperts(path, found, f"left as it was: the moepass form differs from {against} by "
                                  f"{error:.1e} on a random input")
    module.register_buffer("_moepass_w1", _standin(first.shape, dtype), persistent=False)
    module.register_buffer("_moepass_w2", _standin(second.shape, dtype), persistent=False)
    register_standin(module._moepass_w1, first)
    register_standin(module._moepass_w2, second)
    module.forward = types.MethodType(forward, module)
    setattr(module, MARK, (spec, first.scheme))
    freed = sum(_release(t) for t in owned) if release else 0
    kept = sum(t.nbytes() for t in (first, second))
    action = (f"runs as {first.scheme.describe()} codes ({kept / 1e6:.2f} MB), exact: checked against {against} "
              f"(max relative error {error:.1e})")
    if freed:
        action += f"; {freed / 1e6:.2f} MB of the module's own copy released"
    return AdaptedExperts(path, found, action, adapted=True)


def _configured_method(model: nn.Module) -> str | None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, Mapping) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) if method is not None else None


def _load_checkpoint(checkpoint) -> Mapping[str, torch.Tensor] | None:
    if checkpoint is None or isinstance(checkpoint, Mapping):
        return checkpoint
    from safetensors.torch import load_file

    path = Path(checkpoint)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise QuantizeError(f"no .safetensors file in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def adapt_quantized_experts(model: nn.Module, checkpoint: Mapping[str, torch.Tensor] | str | Path | None = None,
                            release: bool = True) -> list[AdaptedExperts]:
    """Run the model's quantized experts as they are stored, through moepass ops (see the module docstring).

    Args:
        model: a model whose experts modules hold quantized weights (torchao ``Int8Tensor``
            parameters, gptqmodel's defused GPTQ/AWQ linears, gpt-oss MXFP4 blocks).
        checkpoint: the checkpoint's tensors (a dict, a ``.safetensors`` file or a folder of them)
            for formats a loader did not keep in memory: gpt-oss's ``*_blocks`` / ``*_scales``
            (transformers dequantizes them to bfloat16 at load on a CPU).
        release: free the module's own copies the new forward no longer reads (the bfloat16
            weights transformers made from MXFP4, the GPTQ/AWQ buffers); torchao's tensors share
            their codes with moepass and stay.

    Returns:
        One :class:`AdaptedExperts` per experts module found, adapted or not (with the reason),
        and, where the model's config names a quantization method but its experts were found
        in float, an entry saying so.
    """
    checkpoint = _load_checkpoint(checkpoint)
    method = _configured_method(model)
    results: list[AdaptedExperts] = []
    parameters = tuple(p for p in model.parameters() if p.is_floating_point() and type(p) in (torch.Tensor, nn.Parameter))
    for path, module in list(model.named_modules()):
        if hasattr(module, MARK):
            continue
        _MODEL_PARAMETERS[id(module)] = parameters[:1]
        for reader in _READERS:
            try:
                read = reader(module, path, checkpoint)
            except _Skip:
                continue
            except QuantizeError as error:
                results.append(AdaptedExperts(path, str(error).split(":")[0], f"left as it was: {error}"))
                break
            results.append(_adapt(path, module, read, release))
            break
        else:
            dense = getattr(module, "gate_up_proj", None)
            if method and isinstance(dense, torch.Tensor) and dense.is_floating_point() and dense.dim() == 3:
                dtype = str(dense.dtype).removeprefix("torch.")
                results.append(AdaptedExperts(
                    path, f"{dtype} experts", f"config says {method}; the experts are {dtype}: the loader dequantized "
                    "them; left as they are (compile with experts_dtype='int4' to quantize them, or pass the "
                    "checkpoint's quantized tensors)",
                ))
    _MODEL_PARAMETERS.clear()
    for result in results:
        (logger.info if result.adapted else logger.warning)("moepass.adapt_quantized_experts: %s", result)
    return results
