"""Make graph-breaking experts loops traceable: ``moepass.make_traceable(model)``.

Some models run their experts in a Python loop over the experts that were hit
(``for e in expert_hit: int(e.item()) …``: LongCat-Flash and DBRX in
transformers), or split their rows by per-expert counts taken out as Python
ints (``.tolist()``: JetMoE).  Dynamo cannot trace such a loop (its length and
indices are data), so it graph-breaks and the backend sees the router alone
(or, for JetMoE, router and experts in different graphs): the loop keeps
running in Python.

:func:`make_traceable` replaces, on the model instance (not its class, not its
weights), the forward of each such experts module with the same computation
written with moepass's own operators: ``moepass.experts`` for the experts that
run GEMMs and ``moepass.zero_compute_experts`` for zero-computation experts
(LongCat-Flash's identity experts).  The new forward has no graph break and no
data-dependent Python, so ``torch.compile(model, backend="adaptive_moe")``
sees each block whole and rewrites it with the user's policy.  Without the
backend the model still runs the same function (eagerly, through the CPU or
Triton lowering).

Each supported class has an *adapter* that reads its weights' layout and
activation from the module.  Weights that do not fit raise
:class:`TraceableError` and change nothing; a variant the adapter does not
model is left as it was (logged); and every new forward is run against the
module's own on a small random input before it is kept — a module where they
differ is left as it was (logged), so an adapter's mistake cannot change a
model.  :data:`TRACEABLE_CLASSES` lists the classes known.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.ops import ExpertsConfig

__all__ = ["make_traceable", "TRACEABLE_CLASSES", "TraceableError"]

logger = logging.getLogger(__name__)

#: The attribute :func:`make_traceable` sets on a module it changed (its spec, for reports and tests).
MARK = "_moepass_traceable_spec"


class TraceableError(ValueError):
    """An experts module of a supported class whose weights do not fit its adapter."""


class _NotThisOne(Exception):
    """A module of a supported class computing a variant its adapter does not (left as it was, logged)."""


def _activation_name(act_fn: nn.Module) -> str:
    """The moepass activation of a transformers ``ACT2FN`` module (``silu``, ``gelu`` …)."""
    name = type(act_fn).__name__.lower()
    if "silu" in name or "swish" in name:
        return "silu"
    if "tanh" in name and "gelu" in name or name in ("newgeluactivation", "gelupytorchtanh", "fastgeluactivation"):
        return "gelu_tanh"
    if "gelu" in name:
        return "gelu"
    if name == "relu":
        return "relu"
    raise TraceableError(f"activation {type(act_fn).__name__} is not one the adapter knows (silu, gelu, gelu_tanh, relu)")


@dataclass(frozen=True)
class _Adapter:
    """How to run one experts class with moepass ops."""

    #: ``type(module).__name__`` of the experts modules this adapter serves.
    class_name: str
    #: module → (spec, ((module or one of its submodules, new forward), …)): the forwards to bind
    build: Callable[[nn.Module], tuple[ExpertsSpec, tuple[tuple[nn.Module, Callable], ...]]]
    #: (module, spec) → arguments of the module's forward, a small random input to check the new
    #: forward against the old one on
    example: Callable[[nn.Module, ExpertsSpec], tuple] = None  # type: ignore[assignment]


def _routed_example(module: nn.Module, spec: ExpertsSpec, tokens: int = 6) -> tuple:
    """(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) for an experts module's forward:
    k distinct experts per token over every id (zero-computation ones included)."""
    generator = torch.Generator().manual_seed(0)
    dtype = next(module.parameters()).dtype
    total = spec.num_experts + len(spec.zero_compute)
    depth = min(2, total)
    x = torch.randn(tokens, spec.hidden_size, generator=generator).to(dtype)
    ids = torch.stack([torch.randperm(total, generator=generator)[:depth] for _ in range(tokens)])
    weights = torch.rand(tokens, depth, generator=generator).to(dtype)
    return x, ids, weights


def _block_example(module: nn.Module, spec: ExpertsSpec, tokens: int = 6) -> tuple:
    """(layer_input [1, T, H],) for a whole MoE block's forward."""
    generator = torch.Generator().manual_seed(0)
    dtype = next(module.parameters()).dtype
    return (torch.randn(1, tokens, spec.hidden_size, generator=generator).to(dtype),)


def _gated_spec(num_experts: int, hidden: int, inter: int, act_fn: nn.Module, zero_compute=()) -> ExpertsSpec:
    """The spec of gated experts ([gate; up] rows in one [E, 2I, H] weight) that are already moepass ops."""
    return ExpertsSpec(
        dispatch="moepass_op",
        num_experts=int(num_experts),
        hidden_size=int(hidden),
        intermediate_size=int(inter),
        activation=_activation_name(act_fn),
        gated=True,
        gate_up_layout="concat",
        zero_compute=tuple(zero_compute),
    )


def _runner(spec: ExpertsSpec) -> Callable:
    """``run(x, ids, weights, w1, w2)``: the experts (and zero-computation experts) of ``spec``.

    The configuration strings are made here, once: the forward dynamo traces
    holds only constants and tensor ops.
    """
    config = ExpertsConfig(spec=spec).to_json()
    kinds = ",".join(spec.zero_compute)

    def run(x, ids, weights, w1, w2) -> torch.Tensor:
        out = torch.ops.moepass.experts(x, ids, weights.float(), w1, w2, None, None, config)
        if kinds:
            out = out + torch.ops.moepass.zero_compute_experts(x, ids, weights, spec.num_experts, kinds, None)
        return out

    return run


def _longcat(module: nn.Module) -> tuple[ExpertsSpec, Callable]:
    """LongCat-Flash: ``gate_up_proj`` [E+Z, 2I, H] (rows ≥ E unused), ``down_proj`` [E, H, I], identity experts ≥ E."""
    num_experts = int(module.num_routed_experts)
    zero = int(module.zero_expert_num or 0)
    if module.gate_up_proj is None or num_experts == 0:
        raise TraceableError("no routed experts (every expert is an identity)")
    gate_up, down = module.gate_up_proj, module.down_proj
    hidden, inter = int(module.hidden_size), int(module.intermediate_size)
    if tuple(gate_up.shape[1:]) != (2 * inter, hidden) or tuple(down.shape) != (num_experts, hidden, inter):
        raise TraceableError(
            f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not "
            f"[E+Z, 2I, H] and [E, H, I] with E={num_experts}, I={inter}, H={hidden}"
        )
    spec = _gated_spec(num_experts, hidden, inter, module.act_fn, ("identity",) * zero)
    run = _runner(spec)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return run(hidden_states, top_k_index, top_k_weights, self.gate_up_proj[:num_experts], self.down_proj)

    return spec, ((module, forward),)


def _jetmoe(module: nn.Module) -> tuple[ExpertsSpec, tuple[tuple[nn.Module, Callable], ...]]:
    """JetMoE's MLP mixture (``JetMoeMoE``): the block's forward and its router's.

    ``JetMoeTopKGating`` takes the top-k of the router's logits (in float32),
    softmaxes the k picked logits, then sorts the slots by expert and turns the
    per-expert counts into Python ints (``.tolist()``: the graph break) for
    ``JetMoeParallelExperts``, which splits the sorted rows and runs
    ``F.linear(x_e, W[e])`` per expert.  The experts are a gated MLP:
    ``input_linear.weight`` [E, 2I, H] (gate rows, then up rows),
    activation(gate)·up, ``output_linear.weight`` [E, H, I], no per-expert bias;
    the block adds one bias [H] after the weighted sum.

    The router's new forward keeps the model's ops up to the softmax (they stay
    in the graph, so detection matches the router) and drops the sorting; it
    still returns the logits at index 4, where ``router_logits`` outputs are
    recorded.  The block's new forward runs the experts with ``moepass.experts``.

    JetMoE's mixture of attention (``JetMoeMoA``) is not changed: its experts
    are the query and output projections with attention between them, so the
    router and the two projections are never one block; it stays reported as
    a graph break.
    """
    router, first, second = module.router, module.input_linear, module.output_linear
    hidden, inter = int(module.input_size), int(module.hidden_size)
    num_experts = int(router.num_experts)
    if not isinstance(getattr(router, "layer", None), nn.Linear) or router.layer.bias is not None:
        raise TraceableError("router.layer is not a linear layer without bias")
    if tuple(router.layer.weight.shape) != (num_experts, hidden):
        raise TraceableError(
            f"router.layer.weight {tuple(router.layer.weight.shape)} is not [E, H] with E={num_experts}, H={hidden}"
        )
    w1, w2 = first.weight, second.weight
    if tuple(w1.shape) != (num_experts, 2 * inter, hidden) or tuple(w2.shape) != (num_experts, hidden, inter):
        raise TraceableError(
            f"input_linear.weight {tuple(w1.shape)} and output_linear.weight {tuple(w2.shape)} are not "
            f"[E, 2I, H] and [E, H, I] with E={num_experts}, I={inter}, H={hidden}"
        )
    if module.bias is None or tuple(module.bias.shape) != (hidden,):
        raise TraceableError(f"bias is not [H] with H={hidden}")
    spec = _gated_spec(num_experts, hidden, inter, module.activation)
    run = _runner(spec)
    top_k = int(router.top_k)

    def route(self, hidden_states):
        logits = self.layer(hidden_states).float()
        top_k_logits, top_k_indices = logits.topk(top_k, dim=1)
        top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(hidden_states)
        # index 4 is where transformers records ``router_logits``; 2 and 3 (the sorting) are not computed
        return top_k_indices, top_k_gates, None, None, logits

    def forward(self, layer_input):
        batch, length, width = layer_input.size()
        tokens = layer_input.reshape(-1, width)
        top_k_indices, top_k_gates, _, _, _ = self.router(tokens)
        out = run(tokens, top_k_indices, top_k_gates, self.input_linear.weight, self.output_linear.weight)
        return out.view(batch, length, width) + self.bias

    return spec, ((router, route), (module, forward))


def _stacked_experts(module: nn.Module) -> tuple[ExpertsSpec, tuple[tuple[nn.Module, Callable], ...]]:
    """transformers' stacked experts written as a Python loop (Step 3.7's ``Step3p7Experts``).

    ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], no biases, a gated
    activation (``_apply_gate`` or ``act_fn``); empty slots carry id E.  Which
    activation is read from ``act_fn``; a module whose gate does more (Step
    3.7's clamped layers) fails the check :func:`make_traceable` runs and is
    left as it was.
    """
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3 or down.dim() != 3:
        raise TraceableError("no stacked gate_up_proj / down_proj")
    num_experts, width, hidden = gate_up.shape
    inter = width // 2
    if width % 2 or tuple(down.shape) != (num_experts, hidden, inter):
        raise TraceableError(
            f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not [E, 2I, H] and [E, H, I]"
        )
    if getattr(module, "limit", float("inf")) != float("inf"):
        raise _NotThisOne(f"its gate and up projections are clamped at {module.limit} (not a plain gated activation)")
    spec = _gated_spec(num_experts, hidden, inter, module.act_fn)
    run = _runner(spec)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return run(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)

    return spec, ((module, forward),)


#: DBRX (``DbrxExperts``) also loops in Python, but stores gate and up as two
#: tensors: running it with one [E, 2I, H] operand would copy both on every
#: call, so it stays router-only until the experts op takes them apart.
_ADAPTERS = (
    _Adapter("LongcatFlashExperts", _longcat, _routed_example),
    _Adapter("JetMoeMoE", _jetmoe, _block_example),
    _Adapter("Step3p7Experts", _stacked_experts, _routed_example),
)

#: Classes whose graph-breaking loops :func:`make_traceable` replaces: experts modules
#: (LongCat-Flash) or whole MoE blocks with their router (JetMoE's MLP mixture; not
#: its mixture of attention, which stays a reported graph break).
TRACEABLE_CLASSES = tuple(a.class_name for a in _ADAPTERS)


def _first_tensor(result) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp_min(1e-30)
    return float((actual.double() - expected.double()).abs().max() / scale)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def make_traceable(model: nn.Module) -> list[str]:
    """Replace the graph-breaking experts loops of ``model`` by moepass ops; returns the module paths changed.

    Call it before ``torch.compile(model, backend="adaptive_moe", ...)`` on a
    model whose report says its experts loop graph-broke (only the router was
    rewritten).  The model computes the same function afterwards (the
    experts' weights are used where they are; nothing is copied): each new
    forward is checked against the module's own on a small random input, and
    a module where they differ is left as it was (logged).  Calling it twice
    changes nothing more; if any module's weights do not fit its adapter, none
    is changed.

    Raises:
        TraceableError: a module of a supported class whose weights do not
            fit (names the module and what was found).
    """
    adapters = {a.class_name: a for a in _ADAPTERS}
    planned = []
    for path, module in model.named_modules():
        adapter = adapters.get(type(module).__name__)
        if adapter is None or hasattr(module, MARK):
            continue
        try:
            planned.append((path, module, *adapter.build(module)))
        except _NotThisOne as reason:
            logger.warning("moepass.make_traceable: left %s (%s) as it was: %s", path or "<root>", type(module).__name__, reason)
        except TraceableError as error:  # raised before any module changed: all or nothing
            raise TraceableError(f"{path or '<root>'} ({type(module).__name__}): {error}") from None
    changed = []
    for path, module, spec, forwards in planned:
        adapter = adapters[type(module).__name__]
        args = adapter.example(module, spec)
        with torch.no_grad():
            expected = _first_tensor(module(*args))
            for target, forward in forwards:
                target.forward = types.MethodType(forward, target)
            error = _relative_error(_first_tensor(module(*args)), expected)
        if not error <= _tolerance(expected.dtype):  # the adapter does not compute this module's function
            for target, _ in forwards:
                del target.forward
            logger.warning(
                "moepass.make_traceable: left %s (%s) as it was: its moepass form differs from its own forward "
                "by %.1e on a random input", path or "<root>", type(module).__name__, error,
            )
            continue
        setattr(module, MARK, spec)
        changed.append(path)
    # blocks whose experts are a ModuleList (hand-written, remote code): moepass.compiler.traceable_lists
    from moepass.compiler.traceable_lists import make_expert_lists_traceable

    changed += make_expert_lists_traceable(model, skip=tuple(changed))
    if changed:
        logger.info("made %d experts loop(s) traceable: %s", len(changed), ", ".join(changed[:4]))
    return changed
