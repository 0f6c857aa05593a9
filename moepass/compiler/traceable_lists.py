"""``moepass.make_traceable`` for MoE blocks whose experts are a ``ModuleList`` (hand-written, remote code).

Research code and remote-code checkpoints (``trust_remote_code=True``) write
an MoE block as a router plus a ``ModuleList`` of small MLPs, run by a Python
loop that dynamo cannot capture (``torch.where(ids == e)``, boolean masks,
per-expert counts moved to the host).  Whatever the loop looks like, the block
computes the same thing::

    block ─┬─ router    nn.Linear(H, E) whose formula (softmax → top-k → renormalise, …)
           │            is found by trying, or a module returning (ids, weights) itself
           ├─ experts   nn.ModuleList of E identical experts: down(act(gate(x)) · up(x))
           │            or down(act(up(x))), two or three nn.Linear
           └─ shared    optional: + shared(x), or + sigmoid(gate(x)) · shared(x)

:func:`make_expert_lists_traceable` replaces the forward of such a block (on
the instance) by that computation in moepass ops — the router as the model
computes it, then ``moepass.experts`` on the experts' weights — so
``torch.compile(model, backend="adaptive_moe")`` sees the block whole.

**No second copy of the experts.**  The experts' weights are moved, once,
into one stacked buffer per projection (``[E, 2I, H]`` gate and up rows,
``[E, H, I]`` down; non-persistent buffers of the block) and every expert's
``nn.Linear`` parameter becomes a view into it: the parameters stay the same
objects under the same names, so ``state_dict`` keys, ``load_state_dict``
(it copies into the views), optimizers and parameter counts are unchanged,
and the experts op reads the buffers with no copy.  Gradients of the stacked
weights are handed back to each expert's own parameters (:class:`_StackedViews`).
``.to()`` / ``.half()`` / ``.cuda()`` convert the parameters and the buffers
separately; the block's ``_apply`` then rebuilds the views (for a moment both
exist), as do ``load_state_dict(assign=True)`` (a post-hook) and
``copy.deepcopy`` (the copy gets views of its own buffers).  Replacing a
parameter object by hand afterwards is seen by the eager forward (it rebuilds
the views) but not by an already compiled graph.  Saving: ``torch.save`` and
``safetensors.torch.save_file(model.state_dict())`` write each view as its own
tensor; ``safetensors.torch.save_model`` refuses tensors that share storage.

**Checked, or left as it was.**  Each candidate forward is run against the
block's own on a small random input (values, and gradients wherever the
block's own forward gives one), in ``eval()`` and in ``train()``; the first
that matches is kept.  A mode where none matches (router noise, dropout or an
auxiliary loss in training) keeps running the block's own forward in that mode
— so does a block called with more arguments than its input; a block where no
candidate matches in ``eval()`` is left exactly as it was (logged), with its
weights where they were.  A block whose own forward gives no gradient to its
experts in a mode (DeepSeek-V2's remote code runs ``moe_infer`` under
``torch.no_grad()`` in eval mode) gets none from the moepass form either: its
routed experts then read detached inputs and weights.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.ops import ExpertsConfig

__all__ = ["make_expert_lists_traceable", "expert_list_block", "ExpertListBlock"]

logger = logging.getLogger(__name__)

#: Set on a block this module changed (its experts spec), the attribute ``moepass.make_traceable`` marks with.
MARK = "_moepass_traceable_spec"
#: Buffer names of the stacked expert weights on a changed block.
_BUFFERS = ("_moepass_experts_w1", "_moepass_experts_w2", "_moepass_experts_b1", "_moepass_experts_b2")

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
}
#: Block attributes that give the router's k, most specific first.
_TOP_K_NAMES = ("num_experts_per_tok", "top_k", "topk", "k", "num_selected_experts", "moe_top_k", "n_activated_experts")
_SHARED_GATE_NAMES = ("shared_expert_gate", "shared_gate", "shared_experts_gate")


# --- what the block is made of ------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertListBlock:
    """A block that holds a router and a ``ModuleList`` of identical experts (structure only, no probing)."""

    experts_name: str
    router_name: str
    num_experts: int
    hidden_size: int
    #: The router is an ``nn.Linear`` (its formula lives in the block's forward), else a module of its own.
    router_is_linear: bool


def _linears(module: nn.Module) -> dict[str, nn.Linear] | None:
    """The ``nn.Linear`` submodules of an expert by relative name, or None when it holds other parameters."""
    linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    owned = {id(p) for m in linears.values() for p in m.parameters()}
    if any(id(p) not in owned for p in module.parameters()):
        return None
    return linears


def _expert_list(block: nn.Module) -> tuple[str, nn.ModuleList, dict[str, nn.Linear]] | None:
    """The one child ``ModuleList`` of ≥ 2 experts of one class, each 2 or 3 ``nn.Linear`` of equal shapes."""
    found = []
    for name, child in block.named_children():
        if not isinstance(child, nn.ModuleList) or len(child) < 2 or len({type(m) for m in child}) != 1:
            continue
        first = _linears(child[0])
        if first is None or len(first) not in (2, 3):
            continue
        shapes = {n: tuple(m.weight.shape) + (m.bias is not None,) for n, m in first.items()}
        if all((lin := _linears(m)) is not None and {n: tuple(x.weight.shape) + (x.bias is not None,)
                                                      for n, x in lin.items()} == shapes for m in child):
            found.append((name, child, first))
    return found[0] if len(found) == 1 else None


def _router_weight(module: nn.Module) -> torch.Tensor | None:
    """The [E, H] weight of a router module: an ``nn.Linear``, or a module with a 2-D ``weight`` parameter."""
    if isinstance(module, nn.Linear):
        return module.weight
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 2:
        return weight
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[0].weight if len(linears) == 1 else None


def expert_list_block(block: nn.Module) -> ExpertListBlock | None:
    """What makes ``block`` an MoE block with a ``ModuleList`` of experts, or None (structure only)."""
    listed = _expert_list(block)
    if listed is None:
        return None
    experts_name, experts, first = listed
    num_experts = len(experts)
    widths = {m.in_features for m in first.values()} | {m.out_features for m in first.values()}
    routers = []
    for name, child in block.named_children():
        if child is experts:
            continue
        weight = _router_weight(child)
        if weight is not None and weight.shape[0] == num_experts and weight.shape[1] in widths:
            routers.append((name, child, int(weight.shape[1])))
    if len(routers) != 1:
        return None
    name, router, hidden = routers[0]
    return ExpertListBlock(experts_name, name, num_experts, hidden, isinstance(router, nn.Linear))


# --- the experts: which linear does what ---------------------------------------------------------


@dataclass(frozen=True)
class _Experts:
    """How every expert of the list computes: which linears, which activation."""

    #: Relative names of the first projection(s) inside an expert: (gate, up) or (up,).
    first: tuple[str, ...]
    down: str
    activation: str
    hidden: int
    inter: int
    bias: bool

    @property
    def gated(self) -> bool:
        return len(self.first) == 2

    def compute(self, expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lin = dict(expert.named_modules())
        act = _ACTIVATIONS[self.activation]
        if self.gated:
            h = act(lin[self.first[0]](x)) * lin[self.first[1]](x)
        else:
            h = act(lin[self.first[0]](x))
        return lin[self.down](h)


def _experts_form(experts: nn.ModuleList, linears: dict[str, nn.Linear], hidden: int) -> _Experts | None:
    """The one arrangement of the linears and activation every expert computes, found by probing each.

    Candidates: any linear H → I as the down projection's input side's
    partner(s), the one I → H as the down projection; gated (two first
    projections, either one the gate) or plain; each named activation.
    """
    names = list(linears)
    parameter = next(experts[0].parameters())
    probe = torch.randn(5, hidden, generator=torch.Generator().manual_seed(3)).to(parameter.dtype).to(parameter.device)
    candidates = []
    for down in names:
        firsts = [n for n in names if n != down]
        inter = linears[down].in_features
        if linears[down].out_features != hidden or any(
            linears[n].in_features != hidden or linears[n].out_features != inter for n in firsts
        ):
            continue
        bias = linears[down].bias is not None
        if any((linears[n].bias is not None) != bias for n in firsts):
            continue
        for first in itertools.permutations(firsts):
            for activation in _ACTIVATIONS:
                candidates.append(_Experts(tuple(first), down, activation, hidden, inter, bias))
    if not candidates:
        return None
    with torch.no_grad():
        outputs = [expert(probe) for expert in experts]
        for form in candidates:
            if all(_close(form.compute(e, probe), out) for e, out in zip(experts, outputs)):
                return form
    return None


# --- the router: the model's own module, or the formula that reproduces it -----------------------


def _softmax_topk(logits, k, renormalize):
    weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def _topk_softmax(logits, k, renormalize):
    values, ids = torch.topk(logits, k, dim=-1)
    return ids, torch.softmax(values, dim=-1, dtype=torch.float32)


def _sigmoid_topk(logits, k, renormalize):
    weights, ids = torch.topk(torch.sigmoid(logits.float()), k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


#: Router formulas tried on a block whose router is an nn.Linear: (name, function of (logits, k, renormalise)).
_FORMULAS = (("softmax→top-k", _softmax_topk), ("top-k→softmax", _topk_softmax), ("sigmoid→top-k", _sigmoid_topk))


@dataclass(frozen=True)
class _Router:
    """How the new forward gets (ids, weights)."""

    name: str
    #: For a router module: positions of ids and weights in its output; for a linear: its formula.
    ids_at: int = -1
    weights_at: int = -1
    formula: Callable | None = None
    renormalize: bool = False
    top_k: int = 0
    #: Position of the router's [.., E] logits in a router module's output (-1: none).
    logits_at: int = -1

    def describe(self) -> str:
        if self.formula is None:
            return f"the block's own router module ({self.name})"
        text = dict((f, n) for n, f in _FORMULAS)[self.formula].replace("k", str(self.top_k))
        return f"{self.name}: {text}" + ("→renormalise" if self.renormalize and self.formula is not _topk_softmax else "")


def _router_candidates(block: nn.Module, shape: ExpertListBlock, probe: torch.Tensor, rows: int | None) -> list[_Router]:
    """Ways to get the block's selection: its router module's own outputs, or formulas over its linear."""
    router = getattr(block, shape.router_name)
    if not shape.router_is_linear:
        with torch.no_grad():
            try:
                out = router(probe)
            except Exception as error:  # a router that takes something else: not one this adapter models
                logger.debug("router %s does not take the block input: %s", shape.router_name, error)
                return []
        out = out if isinstance(out, (tuple, list)) else (out,)
        tensors = [(i, t) for i, t in enumerate(out) if isinstance(t, torch.Tensor)]
        ids = [(i, t) for i, t in tensors if not t.dtype.is_floating_point and t.dim() >= 1]
        found = []
        for i, t in ids:
            for j, w in tensors:
                if w.dtype.is_floating_point and w.shape == t.shape and 0 < t.shape[-1] < shape.num_experts:
                    logits_at = next((m for m, z in tensors if z.dtype.is_floating_point
                                      and z.shape[-1] == shape.num_experts and m != j), -1)
                    found.append(_Router(shape.router_name, ids_at=i, weights_at=j, logits_at=logits_at))
        return found[:1]
    ks = []
    for name in _TOP_K_NAMES:
        value = getattr(block, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < shape.num_experts and value not in ks:
            ks.append(value)
    tokens = probe.numel() // probe.shape[-1]
    if rows is not None and rows % tokens == 0 and 0 < rows // tokens < shape.num_experts and rows // tokens not in ks:
        ks.append(rows // tokens)
    return [
        _Router(shape.router_name, formula=formula, renormalize=renormalize, top_k=k)
        for k in ks
        for _, formula in _FORMULAS
        for renormalize in ((False, True) if formula is not _topk_softmax and k > 1 else (False,))
    ]


def _shared_candidates(block: nn.Module, shape: ExpertListBlock) -> list[tuple[str | None, str | None]]:
    """(shared module, its sigmoid gate) pairs to try: none, or each other child that maps H → H."""
    others = [
        name for name, child in block.named_children()
        if name not in (shape.experts_name, shape.router_name) and any(True for _ in child.parameters())
    ]
    gates = [n for n in others if n in _SHARED_GATE_NAMES and isinstance(getattr(block, n), nn.Linear)
             and getattr(block, n).out_features == 1]
    shared = [n for n in others if n not in gates]
    candidates: list[tuple[str | None, str | None]] = [(None, None)]
    for name in shared:
        candidates.append((name, None))
        candidates.extend((name, gate) for gate in gates)
    return candidates


# --- the experts' weights, stacked in place -----------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One expert parameter's place in a stacked buffer: ``experts[expert].<linear>.<what>`` at ``row``."""

    expert: int
    row: int
    linear: tuple[str, ...]
    what: str

    def param(self, block: nn.Module, experts_name: str) -> nn.Parameter:
        module = getattr(block, experts_name)[self.expert]
        for name in self.linear:
            module = getattr(module, name)
        return getattr(module, self.what)


@dataclass(frozen=True)
class _Storage:
    """Where each expert parameter lives in the stacked buffers, by path (a deep copy of the block stays right)."""

    experts_name: str
    parts: dict = field(default_factory=dict)  # buffer name → tuple[_Part, ...]

    def params(self, block: nn.Module, buffer: str) -> list[nn.Parameter]:
        return [part.param(block, self.experts_name) for part in self.parts[buffer]]


def _storage_layout(experts_name: str, num_experts: int, form: _Experts) -> _Storage:
    parts: dict[str, list[_Part]] = {name: [] for name in _BUFFERS}
    for e in range(num_experts):
        row = 0
        for linear in form.first:
            parts[_BUFFERS[0]].append(_Part(e, row, tuple(linear.split(".")), "weight"))
            if form.bias:
                parts[_BUFFERS[2]].append(_Part(e, row, tuple(linear.split(".")), "bias"))
            row += form.inter
        parts[_BUFFERS[1]].append(_Part(e, 0, tuple(form.down.split(".")), "weight"))
        if form.bias:
            parts[_BUFFERS[3]].append(_Part(e, 0, tuple(form.down.split(".")), "bias"))
    return _Storage(experts_name, {name: tuple(p) for name, p in parts.items()})


def _view(buffer: torch.Tensor, expert: int, row: int, like: torch.Tensor) -> torch.Tensor:
    return buffer[expert].narrow(0, row, like.shape[0])


def _tied(block: nn.Module, storage: _Storage) -> bool:
    """Whether every expert parameter is still the view of its buffer it was made."""
    for name, parts in storage.parts.items():
        if not parts:
            continue
        buffer = getattr(block, name, None)
        if buffer is None:
            return False
        for part, param in zip(parts, storage.params(block, name)):
            view = _view(buffer, part.expert, part.row, param)
            if param.data_ptr() != view.data_ptr() or param.shape != view.shape or param.dtype != buffer.dtype:
                return False
    return True


def _tie(block: nn.Module, storage: _Storage, num_experts: int, form: _Experts) -> None:
    """Copy the expert parameters into stacked buffers (one projection at a time) and make them views of them."""
    rows = {_BUFFERS[0]: len(form.first) * form.inter, _BUFFERS[1]: form.hidden,
            _BUFFERS[2]: len(form.first) * form.inter, _BUFFERS[3]: form.hidden}
    for name, parts in storage.parts.items():
        if not parts:
            if name in block._buffers:
                del block._buffers[name]
            continue
        params = storage.params(block, name)
        shape = (num_experts, rows[name], *params[0].shape[1:])
        buffer = torch.empty(shape, dtype=params[0].dtype, device=params[0].device)
        with torch.no_grad():
            for part, param in zip(parts, params):
                view = _view(buffer, part.expert, part.row, param)
                view.copy_(param)
                param.data = view
        block.register_buffer(name, buffer, persistent=False)


class _StackedViews(torch.autograd.Function):
    """The stacked buffer, differentiable in the expert parameters that are its views.

    Forward returns the buffer (no copy); backward hands each parameter its
    slice of the buffer's gradient.
    """

    @staticmethod
    def forward(ctx, buffer, places, *params):
        ctx.places = places
        return buffer.view_as(buffer)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *(grad[e].narrow(0, row, rows) for e, row, rows in ctx.places))


def _stacked(block: nn.Module, storage: _Storage, name: str) -> torch.Tensor | None:
    buffer = getattr(block, name, None)
    if buffer is None:
        return None
    params = storage.params(block, name)
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return buffer
    places = tuple((part.expert, part.row, p.shape[0]) for part, p in zip(storage.parts[name], params))
    return _StackedViews.apply(buffer, places, *params)


# --- the new forward ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    shape: ExpertListBlock
    form: _Experts
    router: _Router
    shared: str | None
    shared_gate: str | None
    #: What the block returns: ("y",) for a tensor, else per element "y", "logits" or None.
    returns: tuple
    spec: ExpertsSpec

    def describe(self) -> str:
        shared = "" if self.shared is None else f", shared experts {self.shared}" + (
            f" gated by sigmoid({self.shared_gate})" if self.shared_gate else "")
        act = f"{self.form.activation}({self.form.first[0]})" + (f" · {self.form.first[1]}" if self.form.gated else "")
        return f"{self.shape.num_experts} experts {self.form.down}({act}), router {self.router.describe()}{shared}"


def _experts_spec(shape: ExpertListBlock, form: _Experts) -> ExpertsSpec:
    return ExpertsSpec(
        dispatch="moepass_op",
        num_experts=shape.num_experts,
        hidden_size=form.hidden,
        intermediate_size=form.inter,
        activation=form.activation,
        gated=form.gated,
        gate_up_layout="concat" if form.gated else "none",
        has_bias=form.bias,
    )


#: How a changed block runs in a mode: the moepass form, the moepass form with the routed experts
#: detached (the block's own forward gives them no gradient there), or the block's own forward.
_MOEPASS, _DETACHED, _OWN = "moepass", "moepass, routed experts without gradient", "own"


def _moepass_forward(
    plan: _Plan, weights_of: Callable, modes: dict[bool, str], storage: _Storage | None = None
) -> Callable:
    """The block's forward in moepass ops (``modes[training]`` says how it runs in that mode).

    ``weights_of(block)`` gives (w1, w2, b1, b2); ``storage``, when given, is
    checked (eagerly) to still hold the parameters' views.  The block's own
    forward is its class's (so a deep copy of the block calls its own).
    """
    config = ExpertsConfig(spec=plan.spec).to_json()
    hidden, top_k = plan.form.hidden, plan.router.top_k
    router = plan.router

    def forward(self, hidden_states, *args, **kwargs):
        mode = modes[self.training]
        if args or kwargs or mode == _OWN or not isinstance(hidden_states, torch.Tensor):
            return type(self).forward(self, hidden_states, *args, **kwargs)
        if storage is not None and not torch.compiler.is_compiling() and not _tied(self, storage):
            logger.info("moepass: the experts' parameters of %s were replaced; stacking them again", type(self).__name__)
            _tie(self, storage, plan.shape.num_experts, plan.form)
        x = hidden_states.reshape(-1, hidden)
        logits = None
        if router.formula is None:
            out = getattr(self, router.name)(hidden_states)
            k = out[router.ids_at].shape[-1]
            ids, weights = out[router.ids_at].reshape(-1, k), out[router.weights_at].reshape(-1, k)
            logits = out[router.logits_at] if router.logits_at >= 0 else None
        else:
            logits = getattr(self, router.name)(x)
            ids, weights = router.formula(logits, top_k, router.renormalize)
        if mode == _DETACHED:
            w1, w2, b1, b2 = (getattr(self, name, None) for name in _BUFFERS) if storage is not None else (
                w.detach() if w is not None else None for w in weights_of(self))
            y = torch.ops.moepass.experts(x.detach(), ids, weights.detach().float(), w1, w2, b1, b2, config)
        else:
            w1, w2, b1, b2 = weights_of(self)
            y = torch.ops.moepass.experts(x, ids, weights.float(), w1, w2, b1, b2, config)
        if plan.shared is not None:
            shared = getattr(self, plan.shared)(hidden_states).reshape(-1, hidden)
            if plan.shared_gate is not None:
                shared = torch.sigmoid(getattr(self, plan.shared_gate)(hidden_states).reshape(-1, 1)) * shared
            y = y + shared
        y = y.view(hidden_states.shape)
        if plan.returns == ("y",):
            return y
        values = {"y": y, "logits": logits, None: None}
        return tuple(values[item] for item in plan.returns)

    return forward


# --- checking a candidate against the block's own forward ---------------------------------------


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _close(actual: Any, expected: Any) -> bool:
    if expected is None or actual is None:
        return expected is None and actual is None
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return False
    expected64, actual64 = expected.detach().double(), actual.detach().double()
    scale = expected64.abs().max().clamp_min(1e-30) if expected64.numel() else 1.0
    return bool(((actual64 - expected64).abs().max() / scale <= _tolerance(expected.dtype)) if expected64.numel() else True)


@dataclass
class _Observed:
    """The block's own forward on the probe: its output, and the gradients of a random loss."""

    output: Any
    grads: dict[str, torch.Tensor | None]
    rows: int | None = None


def _run(block: nn.Module, forward: Callable, probe: torch.Tensor, seed: int = 5) -> _Observed:
    """Run ``forward`` on ``probe`` with grad on; the gradients of Σ output · r of the input and every parameter."""
    x = probe.detach().clone().requires_grad_(True)
    params = dict(block.named_parameters())
    saved = {name: p.grad for name, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        with torch.enable_grad():
            output = forward(x)
            first = output[0] if isinstance(output, (tuple, list)) else output
            r = torch.randn(first.shape, generator=torch.Generator().manual_seed(seed)).to(first.dtype).to(first.device)
            grads: dict[str, torch.Tensor | None] = {}
            if first.requires_grad:
                (first * r).sum().backward()
            grads = {name: (None if p.grad is None else p.grad.detach().clone()) for name, p in params.items()}
            grads["<input>"] = None if x.grad is None else x.grad.detach().clone()
    finally:
        for name, p in params.items():
            p.grad = saved[name]
    detached = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output) if isinstance(
        output, (tuple, list)) else output.detach()
    return _Observed(detached, grads)


def _matches(new: _Observed, own: _Observed) -> bool:
    outputs = own.output if isinstance(own.output, tuple) else (own.output,)
    candidates = new.output if isinstance(new.output, tuple) else (new.output,)
    if len(outputs) != len(candidates) or not all(_close(a, e) for a, e in zip(candidates, outputs)):
        return False
    # every gradient must be reproduced: the ones the block gives, and the ones it does not
    # (DeepSeek-V2's remote code runs its eval-mode experts under no_grad: so does the moepass form)
    return all(_same_gradient(new.grads.get(name), expected) for name, expected in own.grads.items())


def _same_gradient(actual: torch.Tensor | None, expected: torch.Tensor | None) -> bool:
    """Equal gradients; none and an all-zero one are the same (an expert no probe token reached)."""
    if actual is None or expected is None:
        other = expected if actual is None else actual
        return other is None or not bool(other.any())
    return _close(actual, expected)


def _returns(output: Any, logits: torch.Tensor | None) -> tuple | None:
    """How the block's output is made: ("y",) for a tensor; per element "y", "logits" or None; None if unknown."""
    if isinstance(output, torch.Tensor):
        return ("y",)
    if not isinstance(output, tuple) or not output or not isinstance(output[0], torch.Tensor):
        return None
    items: list = ["y"]
    for value in output[1:]:
        if value is None:
            items.append(None)
        elif logits is not None and _close(logits, value):
            items.append("logits")
        else:
            return None
    return tuple(items)


def _probes(block: nn.Module, hidden: int) -> list[torch.Tensor]:
    """Random inputs to try the block on: [batch, sequence, H] first, then [tokens, H]."""
    parameter = next(block.parameters())
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, hidden, generator=generator).to(parameter.dtype).to(parameter.device)
    return [x, x.reshape(10, hidden)]


def _count_rows(block: nn.Module, experts: nn.ModuleList, probe: torch.Tensor) -> tuple[Any, int]:
    """Run the block's own forward; how many rows its experts were given in all."""
    rows = [0]

    def count(module, args):
        if args and isinstance(args[0], torch.Tensor):
            rows[0] += args[0].numel() // max(args[0].shape[-1], 1)

    handles = [expert.register_forward_pre_hook(count) for expert in experts]
    try:
        with torch.no_grad():
            output = block(probe)
    finally:
        for handle in handles:
            handle.remove()
    return output, rows[0]


# --- the adapter --------------------------------------------------------------------------------


class _NotThisOne(Exception):
    """The block is not one this adapter can reproduce (left as it was, logged)."""


def _plan(block: nn.Module, shape: ExpertListBlock) -> tuple[_Plan, dict[bool, bool]]:
    """The first candidate forward that reproduces ``block``'s own in eval mode, and the modes it holds in."""
    experts = getattr(block, shape.experts_name)
    _, _, linears = _expert_list(block)
    form = _experts_form(experts, linears, shape.hidden_size)
    if form is None:
        raise _NotThisOne(
            "its experts are not down(act(gate(x)) · up(x)) or down(act(up(x))) with one of "
            f"{', '.join(_ACTIVATIONS)} (probed on each expert)"
        )
    owners = [id(p) for expert in experts for p in expert.parameters()]
    if len(set(owners)) != len(owners):
        raise _NotThisOne("some experts share a parameter (stacking it once per expert would untie it)")
    signature = inspect.signature(type(block).forward)
    required = [p for p in list(signature.parameters.values())[1:] if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(required) != 1:
        raise _NotThisOne(f"its forward takes {len(required)} required arguments, not one input tensor")
    original = type(block).forward.__get__(block)
    was_training = block.training
    try:
        block.eval()
        failures = []
        for probe in _probes(block, shape.hidden_size):
            try:
                _, rows = _count_rows(block, experts, probe)
                own = {False: _run(block, original, probe)}
                break
            except Exception as error:  # a block that takes [tokens, H] only, or [batch, seq, H] only
                failures.append(f"{list(probe.shape)}: {type(error).__name__}: {error}")
        else:
            raise _NotThisOne(f"its own forward fails on a random input ({'; '.join(failures)})")
        block.train()
        try:
            own[True] = _run(block, original, probe)
        except Exception as error:  # e.g. an auxiliary loss that needs labels: training keeps the block's forward
            logger.debug("train-mode forward of %s failed: %s", type(block).__name__, error)
        spec = _experts_spec(shape, form)
        block.eval()
        unstacked = _storage_layout(shape.experts_name, shape.num_experts, form)

        def copies(block):  # stacked by copying while candidates are tried: nothing changes yet
            return tuple(_copied_stack(block, unstacked, name, shape.num_experts) for name in _BUFFERS)

        for router in _router_candidates(block, shape, probe, rows):
            for shared, gate in _shared_candidates(block, shape):
                for returns in _return_forms(own[False].output):
                    plan = _Plan(shape, form, router, shared, gate, returns, spec)
                    block.eval()
                    evaluation = _first_match(block, plan, copies, probe, own[False])
                    if evaluation == _OWN:
                        continue
                    block.train()
                    training = _first_match(block, plan, copies, probe, own[True]) if True in own else _OWN
                    return plan, {False: evaluation, True: training}
        raise _NotThisOne(
            "no router formula (its own router module, or softmax/sigmoid top-k with or without "
            "renormalisation, top-k then softmax) and shared-expert arrangement reproduces its forward"
        )
    finally:
        block.train(was_training)


def _first_match(block, plan: _Plan, weights_of: Callable, probe, own: _Observed) -> str:
    """How ``plan`` reproduces the block's own forward in the block's current mode (``_OWN``: it does not)."""
    for mode in (_MOEPASS, _DETACHED):
        forward = types.MethodType(_moepass_forward(plan, weights_of, {False: mode, True: mode}), block)
        try:
            if _matches(_run(block, forward, probe), own):
                return mode
        except Exception as error:  # a candidate that does not fit this block
            logger.debug("candidate %s failed: %s", plan.describe(), error)
            return _OWN
    return _OWN


def _return_forms(output: Any) -> list[tuple]:
    if isinstance(output, torch.Tensor):
        return [("y",)]
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        forms = [["y"]]
        for value in output[1:]:
            options = [None] if value is None else ["logits"]
            forms = [f + [o] for f in forms for o in options]
        return [tuple(f) for f in forms]
    return []


def _copied_stack(block: nn.Module, storage: _Storage, name: str, num_experts: int) -> torch.Tensor | None:
    """The stacked buffer ``name`` as a differentiable copy of the parameters (while candidates are tried)."""
    parts = storage.parts[name]
    if not parts:
        return None
    per_expert: list[list[torch.Tensor]] = [[] for _ in range(num_experts)]
    for part, param in zip(parts, storage.params(block, name)):
        per_expert[part.expert].append(param)
    return torch.stack([torch.cat(group, dim=0) for group in per_expert])


def make_expert_lists_traceable(
    model: nn.Module, skip: tuple[str, ...] = ()
) -> tuple[list[str], dict[str, str], list[str]]:
    """Replace the forward of every ``ModuleList``-of-experts MoE block of ``model`` by moepass ops.

    Returns (the module paths changed, the blocks left as they were → why,
    the blocks an earlier call changed).  ``skip``: paths already handled (a
    block inside one is left alone).  A block this adapter cannot reproduce
    is left exactly as it was, logged with the reason.
    """
    changed: list[str] = []
    left: dict[str, str] = {}
    already: list[str] = []
    for path, block in list(model.named_modules()):
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        if hasattr(block, MARK) or "forward" in vars(block):
            if hasattr(block, "_moepass_own_forward_in_training"):
                already.append(path)
            continue
        shape = expert_list_block(block)
        if shape is None:
            continue
        shown = path or "<root>"
        try:
            plan, modes = _plan(block, shape)
        except _NotThisOne as reason:
            left[shown] = str(reason)
            logger.warning("moepass.make_traceable: left %s (%s) as it was: %s", shown, type(block).__name__, reason)
            continue
        except Exception as error:  # the block's own code raised somewhere unexpected: fail closed
            left[shown] = f"the adapter could not read it ({type(error).__name__}: {error})"
            logger.warning("moepass.make_traceable: left %s (%s) as it was: %s", shown, type(block).__name__, left[shown])
            continue
        storage = _storage_layout(shape.experts_name, shape.num_experts, plan.form)
        _tie(block, storage, shape.num_experts, plan.form)

        def stacked(self, storage=storage):
            return tuple(_stacked(self, storage, name) for name in _BUFFERS)

        block.forward = types.MethodType(_moepass_forward(plan, stacked, modes, storage), block)
        _keep_tied(block, storage, plan)
        setattr(block, MARK, plan.spec)
        block._moepass_own_forward_in_training = modes[True] == _OWN
        changed.append(path)
        training = "" if modes[True] != _OWN else " (train() keeps the block's own forward: it differs there)"
        logger.info("moepass.make_traceable: %s (%s): %s%s", shown, type(block).__name__, plan.describe(), training)
    return changed, left, already


def _keep_tied(block: nn.Module, storage: _Storage, plan: _Plan) -> None:
    """Rebuild the views after ``.to()`` / ``.half()`` / ``load_state_dict(assign=True)`` separated them."""
    def _apply(self, fn, *args, **kwargs):
        result = type(self)._apply(self, fn, *args, **kwargs)
        if not _tied(self, storage):
            _tie(self, storage, plan.shape.num_experts, plan.form)
        return result

    block._apply = types.MethodType(_apply, block)

    def after_load(module, incompatible_keys):
        if not _tied(module, storage):
            _tie(module, storage, plan.shape.num_experts, plan.form)

    block.register_load_state_dict_post_hook(after_load)

    def __deepcopy__(self, memo):  # a copy's parameters and buffers come apart: tie the copy's own
        hook = self.__dict__.pop("__deepcopy__")
        try:
            clone = copy.deepcopy(self, memo)
        finally:
            self.__dict__["__deepcopy__"] = hook
        clone.__dict__["__deepcopy__"] = types.MethodType(hook.__func__, clone)
        if not _tied(clone, storage):
            _tie(clone, storage, plan.shape.num_experts, plan.form)
        return clone

    block.__dict__["__deepcopy__"] = types.MethodType(__deepcopy__, block)
