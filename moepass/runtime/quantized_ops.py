"""``torch.ops.moepass.quantized_experts``: the experts op on quantized weights.

::

    x ──► moepass.quantized_experts(x, ids, weights, w1 [codes, scales(, zeros)], w2 [...], b1, b2, config)
          ─► out [T, H] = Σ_slots weight · down(act(up(x)))     with up/down the dequantized projections

The same contract as ``moepass.experts`` (:mod:`moepass.runtime.ops`): ids
``E`` (and any id ≥ E) mark empty slots, which cost no GEMM row.  Each
projection's weights are a list of tensors in one of the forms of
:mod:`moepass.lowering.cpu_quantized` (``plain``: the portable layout of
:mod:`moepass.quantize.layout`; ``aten_cpu``: the ATen kernels' operands), all
``[E, out, in]``.  The config (:class:`QuantizedExpertsConfig`, JSON) carries
the experts' :class:`~moepass.runtime.ops.ExpertsConfig`, the scheme and the
form.

**Gradients.**  Quantized experts are frozen: the op is differentiable with
respect to the tokens ``x``, the routing ``weights`` and the biases (so the
router, attention, norms and adapters around the experts train through it),
never with respect to the codes or scales — a straight-through gradient on
dequantized weights would train float weights that do not exist.  The
backward dequantizes the experts the batch hit (only those) and runs the
split form's backward on them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from moepass.quantize.scheme import QuantScheme
from moepass.runtime.ops import ExpertsConfig, parse_experts_config, split_experts

__all__ = ["QuantizedExpertsConfig", "parse_quantized_config", "quantized_experts", "quantized_experts_backward"]


@dataclass(frozen=True)
class QuantizedExpertsConfig:
    """Static attributes of one ``moepass.quantized_experts`` call."""

    experts: ExpertsConfig
    scheme: QuantScheme
    #: How the weight lists are stored: ``plain`` | ``aten_cpu`` | ``native`` (plain's tensors; see :mod:`moepass.lowering.cpu_quantized`).
    form: str = "plain"

    def __post_init__(self) -> None:
        if self.form not in ("plain", "aten_cpu", "native"):
            raise ValueError(f"unknown quantized form {self.form!r}; expected plain, aten_cpu or native")
        if self.experts.spec.transposed:
            raise ValueError("quantized expert weights are [E, out, in]; the spec must not be transposed")

    def to_json(self) -> str:
        """Encode for the op's ``config`` argument."""
        return json.dumps(
            {"experts": json.loads(self.experts.to_json()), "scheme": self.scheme.to_dict(), "form": self.form},
            sort_keys=True,
        )


@lru_cache(maxsize=4096)
def parse_quantized_config(text: str) -> QuantizedExpertsConfig:
    """Decode (and cache) a ``quantized_experts`` config string."""
    data = json.loads(text)
    experts = parse_experts_config(json.dumps(data["experts"], sort_keys=True))
    return QuantizedExpertsConfig(experts, QuantScheme.from_dict(data["scheme"]), data.get("form", "plain"))


@torch.library.custom_op("moepass::quantized_experts", mutates_args=())
def quantized_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: list[torch.Tensor],
    w2: list[torch.Tensor],
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    config: str,
) -> torch.Tensor:
    """Run the routed experts of one block on quantized weights (see the module docstring).

    Args:
        x: [T, H] tokens.
        ids: [T, K] int64 expert per slot; ids ≥ E are empty.
        weights: [T, K] routing weight per slot.
        w1: the gate+up projection [E, N1, H] as a list of tensors in the config's form.
        w2: the down projection [E, H, I], likewise.
        b1: [E, N1] or None.  b2: [E, H] or None.
        config: :class:`QuantizedExpertsConfig` as JSON.
    """
    from moepass.lowering import run_quantized_experts
    from moepass.runtime.stats import record_routing

    cfg = parse_quantized_config(config)
    if cfg.experts.collect_stats:
        spec = cfg.experts.spec
        record_routing(cfg.experts.block, ids, spec.num_experts, len(spec.zero_compute))
    return run_quantized_experts(x, ids, weights, w1, w2, b1, b2, cfg)


@quantized_experts.register_fake
def _quantized_experts_fake(x, ids, weights, w1, w2, b1, b2, config):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, ids, weights, w1, w2, b1, b2, config = inputs
    ctx.save_for_backward(x, ids, weights, b1, b2, *w1, *w2)
    ctx.split, ctx.lists = len(w1), (len(w1), len(w2))
    ctx.config = config


def _hit_experts(ids: torch.Tensor, num_experts: int) -> tuple[list[int], torch.Tensor]:
    """The experts with slots, and ids renumbered over them (empty slots get their count)."""
    flat = ids.reshape(-1)
    hit = torch.unique(flat[(flat >= 0) & (flat < num_experts)]).tolist()
    table = torch.full((num_experts + 1,), len(hit), dtype=ids.dtype, device=ids.device)
    table[torch.tensor(hit, dtype=torch.long, device=ids.device)] = torch.arange(len(hit), dtype=ids.dtype, device=ids.device)
    return hit, table[ids.clamp(0, num_experts)]


def _autograd_inside_op():
    """A context in which autograd records again, inside a custom op's kernel.

    A custom op's kernel runs with the autograd dispatch keys excluded (it is
    below autograd); the backward op differentiates the split form there, so
    it takes them out of the thread's excluded set for its own duration.
    """
    keys = torch._C.DispatchKey
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "ADInplaceOrView", "AutogradOther", "AutogradCPU", "AutogradCUDA"):
        key = getattr(keys, name, None)
        if key is not None:
            excluded = excluded.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


@torch.library.custom_op("moepass::quantized_experts_backward", mutates_args=())
def quantized_experts_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: list[torch.Tensor],
    w2: list[torch.Tensor],
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    config: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``quantized_experts`` for (x, weights, b1, b2); an empty tensor where not needed.

    The split form's backward on the experts the batch hit, dequantized (an
    opaque op: its data-dependent set of experts stays out of traced graphs).
    """
    from moepass.lowering.cpu_quantized import dequantize_expert

    cfg = parse_quantized_config(config)
    spec = cfg.experts.spec
    grads: list[torch.Tensor] = [x.new_empty(0) for _ in range(4)]
    inputs = (x, weights, b1, b2)
    wanted = [bool(n) and t is not None for n, t in zip(needs, inputs)]
    hit, renumbered = _hit_experts(ids, spec.num_experts)
    if not hit:  # nothing was routed to an expert: the output depended on nothing
        return tuple(torch.zeros_like(t) if want else x.new_empty(0) for t, want in zip(inputs, wanted))
    first = torch.stack([dequantize_expert(w1, cfg.form, cfg.scheme, e, x.dtype) for e in hit])
    second = torch.stack([dequantize_expert(w2, cfg.form, cfg.scheme, e, x.dtype) for e in hit])
    index = torch.tensor(hit, dtype=torch.long, device=x.device)
    compact = dataclasses.replace(cfg.experts, spec=dataclasses.replace(spec, num_experts=len(hit)), collect_stats=False)
    with _autograd_inside_op(), torch.enable_grad():
        leaves = [
            x.detach().requires_grad_(wanted[0]),
            weights.detach().requires_grad_(wanted[1]),
            None if b1 is None else b1.detach()[index].requires_grad_(wanted[2]),
            None if b2 is None else b2.detach()[index].requires_grad_(wanted[3]),
        ]
        out = split_experts(leaves[0], renumbered, leaves[1], first, second, leaves[2], leaves[3], compact.to_json())
        asked = [i for i, want in enumerate(wanted) if want]
        found = torch.autograd.grad(out, [leaves[i] for i in asked], grad_out, allow_unused=True)
    for i, grad in zip(asked, found):
        if grad is None:
            grad = torch.zeros_like(leaves[i])
        if i >= 2:  # biases: the hit experts' rows, scattered back
            full = torch.zeros_like(inputs[i])
            full[index] = grad
            grad = full
        grads[i] = grad
    return tuple(grads)


@quantized_experts_backward.register_fake
def _quantized_backward_fake(grad_out, x, ids, weights, w1, w2, b1, b2, config, needs):
    inputs = (x, weights, b1, b2)
    return tuple(
        torch.empty_like(t) if need and t is not None else x.new_empty(0) for t, need in zip(inputs, needs)
    )


def _backward(ctx, grad_out):
    """Gradients for x, weights, b1, b2 (the codes and scales are frozen: None)."""
    x, ids, weights, b1, b2, *operands = ctx.saved_tensors
    w1, w2 = operands[: ctx.split], operands[ctx.split :]
    needs = ctx.needs_input_grad
    wanted = [needs[0], needs[2], needs[5] and b1 is not None, needs[6] and b2 is not None]
    result: list = [None] * 8
    result[3], result[4] = [None] * ctx.lists[0], [None] * ctx.lists[1]
    if not any(wanted):
        return tuple(result)
    grads = quantized_experts_backward(grad_out.contiguous(), x, ids, weights, w1, w2, b1, b2, ctx.config, wanted)
    for slot, grad, want in zip((0, 2, 5, 6), grads, wanted):
        result[slot] = grad if want else None
    return tuple(result)


quantized_experts.register_autograd(_backward, setup_context=_setup_context)
