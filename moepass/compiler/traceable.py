"""Make graph-breaking experts loops traceable: ``moepass.make_traceable(model)``.

Some models run their experts in a Python loop over the experts that were hit
(``for e in expert_hit: int(e.item()) …``: LongCat-Flash and DBRX in
transformers, and OpenAI Privacy Filter, whose own default
``experts_implementation`` is that loop), or split their rows by per-expert counts taken out as Python
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
activation from the module.  Everything an adapter reads belongs to another
library and changes between its releases, so each read fails closed: a
module whose attributes, weight shapes or forward signature are not the ones
its adapter models (transformers 5.25 moved LongCat-Flash's
``num_routed_experts`` to the block and remaps its identity slots there) is
left exactly as it was, logged, and named with the reason in the result's
``left``; and every new forward is run against the module's own on a small
random input before it is kept — a module where they differ is left as it
was too, so an adapter's mistake cannot change a model.  A module whose class
dispatches through transformers' ``experts_implementation`` and is set to a
traceable one (``grouped_mm``, the default since 5.25 for LongCat-Flash and
Step 3.7) is already seen whole by the backend and not touched.
:data:`TRACEABLE_CLASSES` lists the classes known.
"""

from __future__ import annotations

import inspect
import logging
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.ops import ExpertsConfig

__all__ = ["make_traceable", "TRACEABLE_CLASSES", "TraceableError", "TraceableResult"]

logger = logging.getLogger(__name__)

#: The attribute :func:`make_traceable` sets on a module it changed (its spec, for reports and tests).
MARK = "_moepass_traceable_spec"


class TraceableError(ValueError):
    """An experts module of a supported class whose attributes or weights do not fit its adapter.

    :func:`make_traceable` does not raise it: the module is left as it was and
    the message is the reason in :attr:`TraceableResult.left`.
    """


class _NotThisOne(TraceableError):
    """A module of a supported class computing a variant its adapter does not (left as it was, logged)."""


class TraceableResult(list):
    """What :func:`make_traceable` did: the module paths it changed (the list itself), and why it left the others.

    ``left`` maps the path of every module of a supported class that was left
    exactly as it was to the reason, in words; ``already`` lists the modules
    that were already traceable (an ``experts_implementation`` other than
    ``eager``, or changed by an earlier call).
    """

    def __init__(self, changed=(), left=None, already=None):
        super().__init__(changed)
        self.left: dict[str, str] = dict(left or {})
        self.already: list[str] = list(already or [])


def _read(module: nn.Module, name: str, kind: type | tuple[type, ...] = object):
    """``module.name``, or :class:`TraceableError` naming it when it is missing or not a ``kind``."""
    try:
        value = getattr(module, name)
    except AttributeError:
        raise TraceableError(f"it has no attribute {name!r} (the adapter was written for another version)") from None
    if not isinstance(value, kind):
        raise TraceableError(f"its {name} is a {type(value).__name__}, not the {getattr(kind, '__name__', kind)} the adapter expects")
    return value


def _check_signature(module: nn.Module, expected: tuple[str, ...]) -> None:
    """:class:`TraceableError` unless the class's forward takes exactly ``expected`` (after self)."""
    try:
        parameters = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        raise TraceableError("its forward's signature cannot be read") from None
    if tuple(parameters) != expected:
        raise TraceableError(
            f"its forward takes ({', '.join(parameters)}); the adapter models ({', '.join(expected)})"
        )


def _experts_implementation(module: nn.Module) -> str | None:
    """The ``experts_implementation`` a transformers experts class dispatches on, or None when it has none.

    Classes decorated with transformers' ``use_experts_implementation``
    (LongCat-Flash and Step 3.7 since 5.25) read ``config._experts_implementation``
    on every call; ``eager`` is their Python loop, anything else is traceable.
    """
    config = getattr(module, "config", None)
    forward = type(module).forward
    if config is None or not hasattr(forward, "__wrapped__"):
        return None
    value = getattr(config, "_experts_implementation", None)
    return value if isinstance(value, str) else None


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


def _longcat(module: nn.Module) -> tuple[ExpertsSpec, tuple[tuple[nn.Module, Callable], ...]]:
    """LongCat-Flash's experts, in either of transformers' forms.

    Up to 5.24 the experts module owns the identity experts: ``gate_up_proj``
    [E+Z, 2I, H] (rows ≥ E unused), ``down_proj`` [E, H, I],
    ``num_routed_experts`` = E, ``zero_expert_num`` = Z; a slot with id ≥ E
    adds w·x.  From 5.25 the block (``LongcatFlashMoE``) handles the identity
    slots itself — it adds their term, remaps their ids onto real experts and
    sets their weights to 0 — and the experts module is plain stacked experts
    over E (``num_experts``), read by :func:`_stacked_experts`.
    """
    _check_signature(module, ("hidden_states", "top_k_index", "top_k_weights"))
    if not hasattr(module, "num_routed_experts"):
        return _stacked_experts(module)
    num_experts = int(_read(module, "num_routed_experts", int))
    zero = int(_read(module, "zero_expert_num", (int, type(None))) or 0)
    gate_up = _read(module, "gate_up_proj", (torch.Tensor, type(None)))
    if gate_up is None or num_experts == 0:
        raise TraceableError("no routed experts (every expert is an identity)")
    down = _read(module, "down_proj", torch.Tensor)
    hidden, inter = int(_read(module, "hidden_size", int)), int(_read(module, "intermediate_size", int))
    if (
        gate_up.dim() != 3
        or tuple(gate_up.shape[1:]) != (2 * inter, hidden)
        or gate_up.shape[0] < num_experts
        or tuple(down.shape) != (num_experts, hidden, inter)
    ):
        raise TraceableError(
            f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not "
            f"[E+Z, 2I, H] and [E, H, I] with E={num_experts}, I={inter}, H={hidden}"
        )
    spec = _gated_spec(num_experts, hidden, inter, _read(module, "act_fn", nn.Module), ("identity",) * zero)
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
    _check_signature(module, ("layer_input",))
    router = _read(module, "router", nn.Module)
    first, second = _read(module, "input_linear", nn.Module), _read(module, "output_linear", nn.Module)
    _check_signature(router, ("hidden_states",))
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
    """transformers' stacked experts written as a Python loop (Step 3.7's ``Step3p7Experts``, LongCat-Flash's from 5.25).

    ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], no biases, a gated
    activation (``_apply_gate`` or ``act_fn``); empty slots carry id E.  Which
    activation is read from ``act_fn``.  Step 3.7 clamps some layers
    (``limit``: act(gate) clamped at ``limit`` from above, up at ±``limit``;
    None or 0 for none): such a layer's activation is carried as a lifted
    program of exactly those ops.  Anything the check :func:`make_traceable`
    runs finds different is left as it was.
    """
    _check_signature(module, ("hidden_states", "top_k_index", "top_k_weights"))
    gate_up, down = _read(module, "gate_up_proj", torch.Tensor), _read(module, "down_proj", torch.Tensor)
    if gate_up.dim() != 3 or down.dim() != 3:
        raise TraceableError(f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not stacked [E, ., .]")
    num_experts, width, hidden = gate_up.shape
    inter = width // 2
    if width % 2 or tuple(down.shape) != (num_experts, hidden, inter):
        raise TraceableError(
            f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not [E, 2I, H] and [E, H, I]"
        )
    declared = getattr(module, "num_experts", num_experts)
    if declared != num_experts:
        raise TraceableError(f"num_experts={declared} but gate_up_proj holds {num_experts} experts")
    limit = getattr(module, "limit", None)
    act_fn = _read(module, "act_fn", nn.Module)
    if limit is None or limit == 0 or limit == float("inf"):
        spec = _gated_spec(num_experts, hidden, inter, act_fn)
    elif isinstance(limit, (int, float)) and limit > 0:
        spec = _clamped_spec(num_experts, hidden, inter, act_fn, float(limit))
    else:
        raise _NotThisOne(f"its limit {limit!r} is not a clamp bound the adapter knows")
    run = _runner(spec)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return run(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)

    return spec, ((module, forward),)


def _clamped_spec(num_experts: int, hidden: int, inter: int, act_fn: nn.Module, limit: float) -> ExpertsSpec:
    """Step 3.7's clamped layers: act(gate).clamp(max=limit) * up.clamp(-limit, limit), as a lifted program."""
    from moepass.compiler.lifted import ElementwiseProgram

    program = ElementwiseProgram((
        ("input",),
        ("slice", ("v", 0), 0, inter, 1),
        ("slice", ("v", 0), inter, 2 * inter, 1),
        (_activation_name(act_fn), ("v", 1)),
        ("clamp", ("v", 3), None, limit),
        ("clamp", ("v", 2), -limit, limit),
        ("mul", ("v", 4), ("v", 5)),
    ))
    program.check()
    return ExpertsSpec(
        dispatch="moepass_op",
        num_experts=int(num_experts),
        hidden_size=int(hidden),
        intermediate_size=int(inter),
        activation="lifted",
        gated=False,
        gate_up_layout="none",
        program=program.to_json(),
    )


def _privacy_filter(module: nn.Module) -> tuple[ExpertsSpec, tuple[tuple[nn.Module, Callable], ...]]:
    """OpenAI Privacy Filter's experts (``OpenAIPrivacyFilterExperts``): gpt-oss's clamped SwiGLU, in float32.

    The model's own default is transformers' ``eager`` experts (its
    ``get_correct_experts_implementation`` picks it: "very sensitive to
    accumulation orders"), a Python loop over the experts hit that
    graph-breaks.  The weights are stored transposed, ``gate_up_proj``
    [E, H, 2I] (gate columns, then up: ``chunk(2)``) with ``gate_up_proj_bias``
    [E, 2I], ``down_proj`` [E, I, H] with ``down_proj_bias`` [E, H];
    the activation is ``(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)`` with
    ``g = clamp(gate, max=limit)``.  Every projection, the activation and the
    weighted sum run in float32 whatever the weights' dtype, and the sum is
    cast back to the input's dtype at the end: the new forward does the same
    (float32 tokens, weights and routing weights into ``moepass.experts``,
    which accumulates in float32).  Its one-hot has ``num_experts`` classes,
    so the loop would fail on the sentinel id E; the experts op skips it.
    """
    _check_signature(module, ("hidden_states", "router_indices", "routing_weights"))
    gate_up, down = _read(module, "gate_up_proj", torch.Tensor), _read(module, "down_proj", torch.Tensor)
    gate_up_bias = _read(module, "gate_up_proj_bias", torch.Tensor)
    down_bias = _read(module, "down_proj_bias", torch.Tensor)
    num_experts = int(_read(module, "num_experts", int))
    hidden, inter = int(_read(module, "hidden_size", int)), int(_read(module, "intermediate_size", int))
    expected = {
        "gate_up_proj": (gate_up, (num_experts, hidden, 2 * inter)),
        "gate_up_proj_bias": (gate_up_bias, (num_experts, 2 * inter)),
        "down_proj": (down, (num_experts, inter, hidden)),
        "down_proj_bias": (down_bias, (num_experts, hidden)),
    }
    wrong = [f"{name} {tuple(t.shape)}" for name, (t, shape) in expected.items() if tuple(t.shape) != shape]
    if wrong:
        raise TraceableError(
            f"{', '.join(wrong)} not [E, H, 2I], [E, 2I], [E, I, H], [E, H] with E={num_experts}, I={inter}, H={hidden}"
        )
    alpha, limit = _read(module, "alpha", (int, float)), _read(module, "limit", (int, float))
    if not limit > 0:
        raise _NotThisOne(f"its limit {limit!r} is not a clamp bound the adapter knows")
    spec = ExpertsSpec(
        dispatch="moepass_op",
        num_experts=num_experts,
        hidden_size=hidden,
        intermediate_size=inter,
        activation="swiglu_clamp",
        gated=True,
        gate_up_layout="concat",
        transposed=True,
        has_bias=True,
        swiglu_alpha=float(alpha),
        swiglu_limit=float(limit),
    )
    config = ExpertsConfig(spec=spec).to_json()

    def forward(self, hidden_states, router_indices=None, routing_weights=None):
        out = torch.ops.moepass.experts(
            hidden_states.float(), router_indices, routing_weights.float(), self.gate_up_proj.float(),
            self.down_proj.float(), self.gate_up_proj_bias.float(), self.down_proj_bias.float(), config,
        )
        return out.to(hidden_states.dtype)

    return spec, ((module, forward),)


#: DBRX (``DbrxExperts``) also loops in Python, but stores gate and up as two
#: tensors: running it with one [E, 2I, H] operand would copy both on every
#: call, so it stays router-only until the experts op takes them apart.
_ADAPTERS = (
    _Adapter("LongcatFlashExperts", _longcat, _routed_example),
    _Adapter("JetMoeMoE", _jetmoe, _block_example),
    _Adapter("Step3p7Experts", _stacked_experts, _routed_example),
    _Adapter("OpenAIPrivacyFilterExperts", _privacy_filter, _routed_example),
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


def make_traceable(model: nn.Module) -> TraceableResult:
    """Replace the graph-breaking experts loops of ``model`` by moepass ops; returns the module paths changed.

    Call it before ``torch.compile(model, backend="adaptive_moe", ...)`` on a
    model whose report says its experts loop graph-broke (only the router was
    rewritten).  The model computes the same function afterwards (the
    experts' weights are used where they are; nothing is copied): each new
    forward is checked against the module's own on a small random input.
    Calling it twice changes nothing more; on a model that is already
    traceable it is a no-op.

    It never raises on a model it does not understand: a module of a
    supported class whose attributes, weights or forward signature are not
    what its adapter models, or whose moepass form differs from its own
    forward, is left exactly as it was, logged (warning), and named with the
    reason in the result's ``left`` (:class:`TraceableResult`, a list of the
    paths changed).
    """
    adapters = {a.class_name: a for a in _ADAPTERS}
    planned = []
    left: dict[str, str] = {}
    already: list[str] = []

    def leave(path: str, module: nn.Module, reason: str) -> None:
        name = path or "<root>"
        left[name] = reason
        logger.warning("moepass.make_traceable: left %s (%s) as it was: %s", name, type(module).__name__, reason)

    for path, module in model.named_modules():
        adapter = adapters.get(type(module).__name__)
        if adapter is None:
            continue
        if hasattr(module, MARK):
            already.append(path)
            continue
        implementation = _experts_implementation(module)
        if implementation is not None and implementation != "eager":
            already.append(path)
            logger.info(
                "moepass.make_traceable: %s (%s) runs experts_implementation=%r, already traceable: not changed",
                path or "<root>", type(module).__name__, implementation,
            )
            continue
        try:
            planned.append((path, module, *adapter.build(module)))
        except TraceableError as reason:
            leave(path, module, str(reason))
        except Exception as error:  # another library's internals changed under the adapter: fail closed
            leave(path, module, f"the adapter could not read it ({type(error).__name__}: {error})")
    changed = []
    for path, module, spec, forwards in planned:
        adapter = adapters[type(module).__name__]
        try:
            args = adapter.example(module, spec)
            with torch.no_grad():
                expected = _first_tensor(module(*args))
                for target, forward in forwards:
                    target.forward = types.MethodType(forward, target)
                error = _relative_error(_first_tensor(module(*args)), expected)
            failure = None if error <= _tolerance(expected.dtype) else (
                f"its moepass form differs from its own forward by {error:.1e} on a random input"
            )
        except Exception as raised:  # the module's own forward or the new one failed on the example
            failure = f"checking its moepass form against its own forward failed ({type(raised).__name__}: {raised})"
        if failure is not None:  # the adapter does not compute this module's function
            for target, _ in forwards:
                vars(target).pop("forward", None)
            leave(path, module, failure)
            continue
        setattr(module, MARK, spec)
        changed.append(path)
    # blocks whose experts are a ModuleList (hand-written, remote code): moepass.compiler.traceable_lists
    from moepass.compiler.traceable_lists import make_expert_lists_traceable

    lists_changed, lists_left, lists_already = make_expert_lists_traceable(model, skip=tuple(changed))
    changed += lists_changed
    left.update(lists_left)
    already += lists_already
    if changed:
        logger.info("made %d experts loop(s) traceable: %s", len(changed), ", ".join(changed[:4]))
    return TraceableResult(changed, left, already)
