"""The ``torch.ops.moepass`` operators a rewritten MoE block is made of.

::

    logits ─► moepass.route(logits, x, tensors, config) ─► ids [T,k_max], weights [T,k_max]
                                                              │
    x ──────► moepass.experts(x, ids, weights, w1, w2, b1, b2, config) ─► out [T,H]

``route`` is a composite of standard torch ops (so Inductor compiles it,
autograd differentiates it and exporters decompose it); ``experts`` is an
opaque custom op with a fake implementation, lowered at run time to the CPU
path, the Triton kernels or the plain reference.  Static attributes travel as
a JSON string (parsed once and cached); per-layer tensors of a policy travel
in ``tensors``.

When the compiled graph must be differentiable (grad mode with trainable
inputs) the experts are written in their *split* form instead, whose pieces
each have an autograd formula (see :mod:`moepass.lowering.grouped`)::

    ids ─► moepass.expert_rows ─► row_token, row_slot, offsets      (composite)
    x   ─► moepass.experts_up        ─► h [T·K, N1]                  (custom op + autograd)
    h   ─► moepass.expert_activation ─► a [T·K, I]                   (composite: autograd, Inductor fuse it)
    a   ─► moepass.experts_down      ─► out [T, H]                   (custom op + autograd)

``experts`` itself is differentiable too (its backward re-runs the split
form), so the op is usable on its own in eager code.

An ``experts`` call whose config names an expert-parallel group
(``ExpertsConfig.expert_parallel``) holds this rank's ``E/R`` experts and
exchanges the kept slots with the other ranks
(:mod:`moepass.runtime.expert_parallel.exchange`); its backward is the opaque
``moepass.expert_parallel_backward``, which exchanges too.  Neither fake
kernel communicates.

A block whose experts apply a function to each slot's output row before its
routing weight (a per-expert norm: ``ExpertsSpec.output``, Ergo's and Muse
Spark's ``post_expert_norm``) runs each slot as a row of its own, then the
function, then the weighted sum (:func:`experts_with_output`)::

    x[t] per slot ─► moepass.experts(x_slots, ids [T·K, 1], ones, …) ─► rows [T·K, H]   (any lowering, any form)
    rows ─► moepass.expert_output(rows, ids, weights, tensors, config) ─► Σ_k w·f(row) [T, H]   (composite)

Dropped slots still cost no GEMM row; ``f`` is plain torch ops that autograd,
Inductor and the exporters see.

Zero-computation experts (ids E … E+Z−1, LongCat-Flash's identity experts,
MoE++'s zero/constant experts) never reach the experts op's GEMMs (it treats
every id ≥ E as empty); their contribution is added beside it::

    x ──────► moepass.zero_compute_experts(x, ids, weights, first_id, kinds, constants) ─► + out

a composite of torch ops (Σ over those slots of w·x, 0 or w·c), so autograd,
Inductor and the exporters see plain ops.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from moepass.compiler.spec import ExpertsSpec, RouterSpec
from moepass.runtime.route_capture import call_capture_hooks, capture_routes, routes_not_captured  # noqa: F401  (callers use ops.*)

__all__ = [
    "RouteConfig",
    "ExpertsConfig",
    "route",
    "experts",
    "expert_rows",
    "experts_up",
    "expert_activation",
    "experts_down",
    "zero_compute_experts",
    "expert_output",
    "experts_with_output",
    "slot_rows_config",
    "expert_parallel_backward",
    "LOWERINGS",
    "CPU_PREPACK",
    "capture_routes",
    "routes_not_captured",
]

#: Implementations of the experts op; "auto" picks triton for CUDA tensors
#: and cpu otherwise.
LOWERINGS = ("auto", "cpu", "triton", "reference")
#: Whether the CPU lowering packs bfloat16 expert weights for oneDNN.
CPU_PREPACK = ("auto", "on", "off")


@dataclass(frozen=True)
class RouteConfig:
    """Static attributes of one ``moepass.route`` call."""

    router: RouterSpec
    #: Name of the k-rule (a policy's per-token rule); "static" keeps native k.
    rule: str = "static"
    #: The rule's scalar parameters, already resolved for this block.
    params: dict[str, Any] = field(default_factory=dict)
    k_min: int | None = None
    k_max: int | None = None
    #: What each entry of the op's ``tensors`` argument is: "correction_bias",
    #: "selected_ids" / "selected_weights" (a lifted router's own selection)
    #: or a rule tensor name.
    tensor_roles: tuple[str, ...] = ()
    #: Whether ``x`` is passed (rules such as the allocator need it).
    uses_x: bool = False
    #: None follows the model's renormalisation; True/False forces it.
    renormalize: bool | None = None
    #: Module path of the block, for calibration capture.
    block: str = ""
    #: How empty slots are written: "sentinel" (id E, weight 0: consumers skip
    #: them) or "model_ids" (for a router-only rewrite whose ids are consumed
    #: where moepass cannot see: the ids are the model's own, unchanged, in its
    #: order — tensors "model_ids", "model_weights" — and a dropped slot keeps
    #: its expert at weight -0.0; the static rule returns the model's selection as it is).
    empty_slots: str = "sentinel"

    def to_json(self) -> str:
        """Encode for the op's ``config`` argument."""
        data = dataclasses.asdict(self)
        return json.dumps(data, sort_keys=True)

    @property
    def depth(self) -> int:
        """The number of slots per token (k_max, or native k; the model's k for "model_ids")."""
        if self.k_max is None or self.empty_slots == "model_ids":
            return self.router.top_k
        return self.k_max


@dataclass(frozen=True)
class ExpertsConfig:
    """Static attributes of one ``moepass.experts`` call."""

    spec: ExpertsSpec
    lowering: str = "auto"
    #: Module path of the block, for run-time statistics.
    block: str = ""
    collect_stats: bool = False
    #: Non-empty when the block's expert weights live in an expert store:
    #: ``"<offload session>|<block path>"`` (see :mod:`moepass.runtime.offload`).
    offload: str = ""
    #: CPU lowering: run bfloat16 experts on weights pre-packed for oneDNN
    #: (``auto`` | ``on`` | ``off``; see :mod:`moepass.lowering.cpu_packed`).
    cpu_prepack: str = "auto"
    #: Non-empty when the block's experts are split over ranks: the key of its
    #: expert-parallel group (:mod:`moepass.runtime.expert_parallel`).  The
    #: weights are then this rank's ``E/R`` experts and ``ids`` global ids.
    expert_parallel: str = ""
    #: A hash of the block's routing policy, so ranks that route differently
    #: fail at the exchange instead of exchanging mismatched rows.
    routing_fingerprint: str = ""
    #: 0: ``ids`` holds each token's slots ([T, K]).  K > 0: each row of ``ids``
    #: is one slot, K consecutive rows one token's (a block with a per-slot
    #: output function runs its slots as rows, :func:`experts_with_output`);
    #: statistics count them per token.
    slots_per_token: int = 0

    def __post_init__(self) -> None:
        if self.lowering not in LOWERINGS:
            raise ValueError(f"unknown lowering {self.lowering!r}; expected one of {LOWERINGS}")
        if self.cpu_prepack not in CPU_PREPACK:
            raise ValueError(f"unknown cpu_prepack {self.cpu_prepack!r}; expected one of {CPU_PREPACK}")

    def to_json(self) -> str:
        """Encode for the op's ``config`` argument."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@lru_cache(maxsize=4096)
def parse_route_config(text: str) -> RouteConfig:
    """Decode (and cache) a ``route`` config string."""
    data = json.loads(text)
    data["router"] = RouterSpec(**data["router"])
    data["tensor_roles"] = tuple(data.get("tensor_roles", ()))
    return RouteConfig(**data)


@lru_cache(maxsize=4096)
def parse_experts_config(text: str) -> ExpertsConfig:
    """Decode (and cache) an ``experts`` config string."""
    data = json.loads(text)
    data["spec"] = ExpertsSpec(**data["spec"])
    return ExpertsConfig(**data)


# --- moepass::route ---------------------------------------------------------

_lib = torch.library.Library("moepass", "FRAGMENT")
_lib.define("route(Tensor logits, Tensor? x, Tensor[] tensors, str config) -> (Tensor, Tensor)")


def _route_composite(
    logits: torch.Tensor, x: Optional[torch.Tensor], tensors: list[torch.Tensor], config: str
) -> tuple[torch.Tensor, torch.Tensor]:
    from moepass.policies.rules import get_rule

    cfg = parse_route_config(config)
    if not is_fake(logits):
        call_capture_hooks(cfg, logits, x)
    named = dict(zip(cfg.tensor_roles, tensors))
    rule = get_rule(cfg.rule, cfg.params) if cfg.rule != "static" else None
    rule_tensors = [t for role, t in zip(cfg.tensor_roles, tensors) if role not in _ROUTER_ROLES]
    selected = None
    if "selected_ids" in named:
        selected = (named["selected_ids"].reshape(logits.shape[0], -1), named["selected_weights"].reshape(logits.shape[0], -1))
    if cfg.empty_slots == "model_ids" and "model_ids" in named:
        return _route_in_model_order(logits, x, cfg, rule, rule_tensors, named)
    # (without the model's selection — a capture hook re-routing the logits it saw — the policy's own routing)
    return _policy_route(logits, x, cfg, rule, rule_tensors, named, selected)


def _policy_route(logits, x, cfg: RouteConfig, rule, rule_tensors, named, selected) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's (ids, weights) for ``logits``, ranking ``selected`` (the model's picks) where given."""
    from moepass.runtime import routing

    return routing.route(
        logits,
        cfg.router,
        rule,
        k_min=cfg.k_min,
        k_max=cfg.k_max,
        x=x,
        correction_bias=named.get("correction_bias"),
        tensors=rule_tensors,
        renormalize=cfg.renormalize,
        selected=selected,
    )


def _route_in_model_order(logits, x, cfg: RouteConfig, rule, rule_tensors, named) -> tuple[torch.Tensor, torch.Tensor]:
    """``empty_slots="model_ids"``: the model's own ids, each with the weight the policy gives it (0: dropped).

    The ids are the model's, unchanged and in its slot order, so whatever
    consumes them (a loop outside the graph that counts slots per expert with
    ``scatter_``, sorts them, one-hots them) sees exactly what it always saw.
    """
    tokens = logits.shape[0]
    model_ids = named["model_ids"].reshape(tokens, -1).long()
    model_weights = named["model_weights"].reshape(tokens, -1).float()
    if rule is None and cfg.k_min is None and cfg.k_max is None:
        return model_ids, model_weights  # static: the model's own selection, bit for bit
    selected = None
    if cfg.router.kind == "lifted":  # rank the model's picks best first (its top-k may be unsorted)
        order = torch.sort(model_weights, dim=-1, descending=True, stable=True)[1]
        selected = (model_ids.gather(1, order), model_weights.gather(1, order))
    ids, weights = _policy_route(logits, x, cfg, rule, rule_tensors, named, selected)
    num_experts = cfg.router.num_experts
    columns = ids.clamp(0, num_experts)
    dense = torch.zeros(tokens, num_experts + 1, dtype=weights.dtype, device=weights.device).scatter(1, columns, weights)
    kept = torch.zeros(tokens, num_experts + 1, dtype=torch.bool, device=ids.device).scatter(1, columns, ids < num_experts)
    rows = model_ids.clamp(0, num_experts)
    # a dropped slot weighs -0.0: exactly nothing to any consumer, and its sign tells moepass's own experts
    # exchange (when the experts run expert-parallel in another graph) that the slot needs no row
    return model_ids, torch.where(kept.gather(1, rows), dense.gather(1, rows), torch.full_like(model_weights, -0.0))


#: Route tensor roles that describe the router itself (not a policy's tensors).
_ROUTER_ROLES = ("correction_bias", "selected_ids", "selected_weights", "model_ids", "model_weights")

_lib.impl("route", _route_composite, "CompositeImplicitAutograd")
route = torch.ops.moepass.route


# --- moepass::experts --------------------------------------------------------


@torch.library.custom_op("moepass::experts", mutates_args=())
def experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    config: str,
) -> torch.Tensor:
    """Run the routed experts of one block.

    Args:
        x: [T, H] tokens.
        ids: [T, K] int64 expert per slot; ``E`` marks an empty slot.
        weights: [T, K] float routing weight per slot (0 for empty slots).
        w1: [E, N1, H] gate+up (or up) weights, or [E, H, N1] if transposed.
        w2: [E, H, I] down weights, or [E, I, H] if transposed.
        b1: [E, N1] or None.  b2: [E, H] or None.
        config: :class:`ExpertsConfig` as JSON.

    Returns:
        [T, H] in ``x.dtype``: Σ_slots weight · expert(x) (or expert(weight · x)).
    """
    from moepass.lowering import run_experts
    from moepass.runtime.stats import record_routing

    cfg = parse_experts_config(config)
    if cfg.spec.output:
        raise ValueError(
            f"block {cfg.block or '<root>'}: its experts have a per-slot output function; run them with "
            "moepass.runtime.ops.experts_with_output (the experts op computes the slots' rows, slot_rows_config)"
        )
    if cfg.collect_stats:
        per_token = ids.reshape(-1, cfg.slots_per_token) if cfg.slots_per_token else ids
        record_routing(cfg.block, per_token, cfg.spec.num_experts, len(cfg.spec.zero_compute))
    if cfg.expert_parallel:  # experts split over ranks: exchange the kept slots (never in the fake kernel)
        from moepass.runtime.expert_parallel.exchange import experts_forward as expert_parallel_forward

        return expert_parallel_forward(x, ids, weights, w1, w2, b1, b2, cfg)
    return run_experts(x, ids, weights, w1, w2, b1, b2, cfg)


@experts.register_fake
def _experts_fake(x, ids, weights, w1, w2, b1, b2, config):
    return torch.empty_like(x)


def _experts_setup_context(ctx, inputs, output) -> None:
    x, ids, weights, w1, w2, b1, b2, config = inputs
    ctx.save_for_backward(x, ids, weights, w1, w2, b1, b2)
    ctx.config = config


def _experts_backward(ctx, grad_out):
    """Re-run the block in its split form with autograd on, and differentiate that.

    The compiled graph never needs this (the rewrite inserts the split form
    when it must be differentiable); it makes the fused op correct on its own.
    """
    saved = ctx.saved_tensors
    differentiable = (0, 2, 3, 4, 5, 6)  # x, weights, w1, w2, b1, b2
    if parse_experts_config(ctx.config).expert_parallel:  # the exchange backwards, in one opaque op
        needs = [bool(ctx.needs_input_grad[i] and saved[i] is not None) for i in differentiable]
        grads = expert_parallel_backward(grad_out.contiguous(), *saved, ctx.config, needs)
        result: list[Optional[torch.Tensor]] = [None] * 8
        for i, grad, need in zip(differentiable, grads, needs):
            result[i] = grad if need else None
        return tuple(result)
    leaves = list(saved)
    wanted = [i for i in differentiable if ctx.needs_input_grad[i] and saved[i] is not None]
    with torch.enable_grad():
        for i in wanted:
            leaves[i] = saved[i].detach().requires_grad_(True)
        x, ids, weights, w1, w2, b1, b2 = leaves
        out = split_experts(x, ids, weights, w1, w2, b1, b2, ctx.config)
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out, allow_unused=True)
    result: list[Optional[torch.Tensor]] = [None] * 8
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


experts.register_autograd(_experts_backward, setup_context=_experts_setup_context)


@torch.library.custom_op("moepass::expert_parallel_backward", mutates_args=())
def expert_parallel_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: Optional[torch.Tensor],
    b2: Optional[torch.Tensor],
    config: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of an expert-parallel ``experts`` call for (x, weights, w1, w2, b1, b2); empty where not needed.

    Exchanges rows with the other ranks of the block's group (see
    :mod:`moepass.runtime.expert_parallel.exchange`); its fake kernel does not.
    """
    from moepass.runtime.expert_parallel.exchange import experts_backward

    grads = experts_backward(grad_out, x, ids, weights, w1, w2, b1, b2, parse_experts_config(config), needs)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@expert_parallel_backward.register_fake
def _expert_parallel_backward_fake(grad_out, x, ids, weights, w1, w2, b1, b2, config, needs):
    inputs = (x, weights, w1, w2, b1, b2)
    return tuple(torch.empty_like(t) if need and t is not None else x.new_empty(0) for t, need in zip(inputs, needs))


# --- moepass::zero_compute_experts -------------------------------------------

_lib.define(
    "zero_compute_experts(Tensor x, Tensor ids, Tensor weights, int first_id, str kinds, Tensor? constants) -> Tensor"
)


def _zero_compute_composite(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    first_id: int,
    kinds: str,
    constants: Optional[torch.Tensor],
) -> torch.Tensor:
    """Σ over the slots routed to zero-computation experts of their output, [T, H] in ``x.dtype``.

    ``kinds`` names the experts ``first_id``, ``first_id + 1``, … (comma
    separated, :data:`moepass.compiler.spec.ZERO_COMPUTE_KINDS`): an identity
    expert adds w·x, a zero expert nothing, a constant expert w·c with c its
    row of ``constants`` [Z, H] (rows of other kinds are ignored).  Slots with
    other ids (GEMM experts, the empty-slot sentinel) add nothing.
    """
    names = kinds.split(",") if kinds else []
    relative = ids - first_id

    def slots_of(kind: str) -> torch.Tensor:  # [T, K] bool: slots on experts of this kind
        positions = [i for i, name in enumerate(names) if name == kind]
        if len(positions) == len(names):  # the common case (LongCat: all identity)
            return (relative >= 0) & (relative < len(names))
        mask = torch.zeros_like(relative, dtype=torch.bool)
        for position in positions:  # no lookup table: a constant tensor would not export functionally
            mask = mask | (relative == position)
        return mask

    accumulate = torch.promote_types(x.dtype, torch.float32)
    weight = torch.where(slots_of("identity"), weights.to(accumulate), 0.0).sum(dim=1, keepdim=True)
    out = weight * x.to(accumulate)
    if constants is not None and "constant" in names:
        slot_weight = torch.where(slots_of("constant"), weights.to(accumulate), 0.0)
        index = relative.clamp(0, len(names) - 1)
        out = out + torch.einsum("tk,tkh->th", slot_weight, constants.to(accumulate)[index])
    return out.to(x.dtype)


_lib.impl("zero_compute_experts", _zero_compute_composite, "CompositeImplicitAutograd")
zero_compute_experts = torch.ops.moepass.zero_compute_experts


# --- moepass::expert_output: a per-slot output function, then the weighted sum --

_lib.define("expert_output(Tensor rows, Tensor ids, Tensor weights, Tensor[] tensors, str config) -> Tensor")


def _expert_output_composite(
    rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, tensors: list[torch.Tensor], config: str
) -> torch.Tensor:
    """Σ over each token's slots of ``weight · f(row)``, [T, H] in ``rows.dtype``.

    ``rows`` [T·K, H] is each slot's expert output, a token's K slots in
    consecutive rows (0 for an empty slot); ``ids``, ``weights`` [T, K];
    ``f`` the spec's output program, reading ``tensors`` (an ``expert_tensor``
    at each row's expert).  Empty slots (ids outside [0, E)) add nothing.
    Sums in float32 (or wider), as transformers' experts do.
    """
    from moepass.lowering.activations import lifted_program

    spec = parse_experts_config(config).spec
    tokens, slots = ids.shape
    flat = ids.reshape(-1)
    live = (flat >= 0) & (flat < spec.num_experts)
    experts = torch.where(live, flat, torch.zeros_like(flat))
    y = lifted_program(spec.output)(rows, -1, list(tensors), experts)
    accumulate = torch.promote_types(y.dtype, torch.float32)
    scale = torch.where(live, weights.reshape(-1).to(accumulate), 0.0).unsqueeze(-1)
    weighted = torch.where(live.unsqueeze(-1), y.to(accumulate), 0.0) * scale
    return weighted.view(tokens, slots, -1).sum(dim=1).to(rows.dtype)


_lib.impl("expert_output", _expert_output_composite, "CompositeImplicitAutograd")
expert_output = torch.ops.moepass.expert_output


def slot_rows_config(config: str, slots: int) -> str:
    """The experts op's config that computes the slots' rows of a block with a per-slot output function."""
    cfg = parse_experts_config(config)
    rows = dataclasses.replace(cfg, spec=dataclasses.replace(cfg.spec, output=""), slots_per_token=slots)
    return rows.to_json()


def experts_with_output(x, ids, weights, w1, w2, b1, b2, tensors, config: str, differentiable: bool = False):
    """The experts of a block with a per-slot output function (``ExpertsSpec.output``), [T, H].

    Each slot runs as a row of its own — its token's row of ``x``, its id,
    weight 1 — through the experts op (``differentiable``: its split form),
    then :data:`expert_output` applies the function and the routing weights.
    An empty slot costs no GEMM row.
    """
    slots = ids.shape[1]
    rows_config = slot_rows_config(config, slots)
    x_slots = x.repeat_interleave(slots, dim=0)
    ids_slots = ids.reshape(-1, 1)
    ones = torch.ones_like(ids_slots, dtype=torch.float32)
    run = split_experts if differentiable else experts
    rows = run(x_slots, ids_slots, ones, w1, w2, b1, b2, rows_config)
    return expert_output(rows, ids, weights, list(tensors), config)


# --- the split form: expert_rows, experts_up, expert_activation, experts_down --

_lib.define("expert_rows(Tensor ids, int num_experts) -> (Tensor, Tensor, Tensor)")


def _expert_rows_composite(ids: torch.Tensor, num_experts: int):
    from moepass.lowering.grouped import expert_rows as rows

    return rows(ids, num_experts)


_lib.impl("expert_rows", _expert_rows_composite, "CompositeImplicitAutograd")
expert_rows = torch.ops.moepass.expert_rows

_lib.define("expert_activation(Tensor h, str config) -> Tensor")


def _expert_activation_composite(h: torch.Tensor, config: str) -> torch.Tensor:
    from moepass.lowering.activations import apply_activation

    return apply_activation(h, parse_experts_config(config).spec)


_lib.impl("expert_activation", _expert_activation_composite, "CompositeImplicitAutograd")
expert_activation = torch.ops.moepass.expert_activation


def _spec_of(config: str) -> ExpertsSpec:
    return parse_experts_config(config).spec


@torch.library.custom_op("moepass::experts_up", mutates_args=())
def experts_up(
    x: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    config: str,
) -> torch.Tensor:
    """First projection of every non-empty slot, rows sorted by expert: h [T·K, N1].

    Rows of empty slots (after ``offsets[E]``) are 0 and cost no GEMM work.
    """
    from moepass.lowering.grouped import up_forward
    from moepass.runtime.stats import record_k

    cfg = parse_experts_config(config)
    if cfg.collect_stats:
        tokens, slots = weights.shape
        if cfg.slots_per_token:  # one slot per row: K consecutive rows are a token's
            tokens, slots = tokens * slots // cfg.slots_per_token, cfg.slots_per_token
        live_tokens = torch.div(row_slot[: int(offsets[-1])], slots, rounding_mode="floor")
        record_k(cfg.block, torch.bincount(live_tokens, minlength=tokens), slots, cfg.spec.num_experts)
    return up_forward(x, row_token, row_slot, offsets, weights, w1, b1, cfg.spec)


@experts_up.register_fake
def _experts_up_fake(x, row_token, row_slot, offsets, weights, w1, b1, config):
    from moepass.lowering.grouped import first_projection_width

    return x.new_empty(row_token.shape[0], first_projection_width(w1, _spec_of(config)))


@torch.library.custom_op("moepass::experts_up_backward", mutates_args=())
def experts_up_backward(
    grad_h: torch.Tensor,
    x: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    config: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``experts_up`` for (x, weights, w1, b1); an empty tensor where not needed."""
    from moepass.lowering.grouped import up_backward

    grads = up_backward(grad_h, x, row_token, row_slot, offsets, weights, w1, b1, _spec_of(config), needs)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _grouped_backward_fake(grad, data, row_token, row_slot, offsets, weights, w, b, config, needs):
    """Both backward ops return gradients shaped like (data, weights, w, b), empty where not needed."""
    return tuple(
        torch.empty_like(t) if need and t is not None else data.new_empty(0) for t, need in zip((data, weights, w, b), needs)
    )


experts_up_backward.register_fake(_grouped_backward_fake)


def _grouped_setup_context(ctx, inputs, output) -> None:
    """experts_up and experts_down take (data, row_token, row_slot, offsets, weights, w, b, config)."""
    *tensors, config = inputs
    ctx.save_for_backward(*tensors)
    ctx.config = config


def _grouped_backward(backward_op):
    """The autograd formula of experts_up/experts_down: their backward op for (data, weights, w, b)."""

    def backward(ctx, grad):
        data, row_token, row_slot, offsets, weights, w, b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        wanted = [needs[0], needs[4], needs[5], needs[6] and b is not None]
        if not any(wanted):
            return (None,) * 8
        grads = backward_op(grad.contiguous(), data, row_token, row_slot, offsets, weights, w, b, ctx.config, wanted)
        grad_data, grad_weights, grad_w, grad_b = (g if want else None for g, want in zip(grads, wanted))
        return grad_data, None, None, None, grad_weights, grad_w, grad_b, None

    return backward


experts_up.register_autograd(_grouped_backward(experts_up_backward), setup_context=_grouped_setup_context)


@torch.library.custom_op("moepass::experts_down", mutates_args=())
def experts_down(
    a: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    config: str,
) -> torch.Tensor:
    """Second projection of every non-empty slot, weighted and summed per token: out [T, H]."""
    from moepass.lowering.grouped import down_forward

    return down_forward(a, row_token, row_slot, offsets, weights, w2, b2, _spec_of(config))


@experts_down.register_fake
def _experts_down_fake(a, row_token, row_slot, offsets, weights, w2, b2, config):
    from moepass.lowering.grouped import hidden_size_of

    return a.new_empty(weights.shape[0], hidden_size_of(w2, _spec_of(config)))


@torch.library.custom_op("moepass::experts_down_backward", mutates_args=())
def experts_down_backward(
    grad_out: torch.Tensor,
    a: torch.Tensor,
    row_token: torch.Tensor,
    row_slot: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    config: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``experts_down`` for (a, weights, w2, b2); an empty tensor where not needed."""
    from moepass.lowering.grouped import down_backward

    grads = down_backward(grad_out, a, row_token, row_slot, offsets, weights, w2, b2, _spec_of(config), needs)
    return tuple(g if g is not None else a.new_empty(0) for g in grads)


experts_down_backward.register_fake(_grouped_backward_fake)
experts_down.register_autograd(_grouped_backward(experts_down_backward), setup_context=_grouped_setup_context)


def split_experts(x, ids, weights, w1, w2, b1, b2, config: str) -> torch.Tensor:
    """``experts`` computed through its split form (differentiable piece by piece)."""
    num_experts = _spec_of(config).num_experts
    row_token, row_slot, offsets = expert_rows(ids, num_experts)
    h = experts_up(x, row_token, row_slot, offsets, weights, w1, b1, config)
    a = expert_activation(h, config)
    return experts_down(a, row_token, row_slot, offsets, weights, w2, b2, config)
