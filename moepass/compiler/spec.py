"""What detection found, as plain data.

A :class:`MoEBlockSpec` describes one Mixture-of-Experts block well enough to
re-run it without the graph it came from: the router (how scores are formed,
how experts are selected, how the selection's weights are formed), the routed
experts (weight layout, activation, biases) and the shared experts.  Everything
after detection (rewrite, lowering, export, reports) reads the spec, never the
graph.  Specs are frozen dataclasses that round-trip through JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ROUTER_KINDS",
    "DISPATCH_KINDS",
    "ACTIVATIONS",
    "ZERO_COMPUTE_KINDS",
    "RouterSpec",
    "ExpertsSpec",
    "SharedExpertSpec",
    "MoEBlockSpec",
]

#: Router kinds the pass understands.
#:
#: ``softmax_topk``
#:     p = softmax(logits) over E; top-k of p; optionally renormalised
#:     (Mixtral, Qwen2/3-MoE, OLMoE, DBRX-style).
#: ``topk_softmax``
#:     top-k of the logits, then softmax over the k selected logits
#:     (gpt-oss, Granite-MoE, the mistral reference MoE).
#: ``sigmoid_group_topk``
#:     s = sigmoid(logits); selection on s + correction bias within the best
#:     ``topk_group`` of ``n_group`` groups; weights gathered from s,
#:     optionally renormalised, times a scaling factor (DeepSeek-V3).
#: ``topk_sigmoid``
#:     top-k of the logits, weight = sigmoid(selected logit); Llama 4 scales the
#:     expert *input* by it.
#: ``lifted``
#:     any other router: the model's own ops from the router linear to the
#:     scores its top-k ranks, and from the selection to the weights, stay in
#:     the graph as they are (moepass only forces the top-k to sort its picks
#:     best first); the route op receives the model's ids and weights and
#:     chooses how many of them each token keeps.
ROUTER_KINDS = ("softmax_topk", "topk_softmax", "sigmoid_group_topk", "topk_sigmoid", "lifted")

#: How the model dispatched tokens to experts before the rewrite.
DISPATCH_KINDS = (
    "grouped_mm",  # transformers grouped_mm experts (sort, offsets, grouped GEMM)
    "batched_mm",  # transformers batched_mm experts (gather weights per token, bmm)
    "dense_bmm",  # every expert on every token, scaled by dense scores (Llama 4)
    "module_loop",  # nn.ModuleList of expert MLPs and a Python loop over experts
    "dense_modules",  # nn.ModuleList of expert MLPs, each on every token, combined through a [T, E] gate matrix
    "eager_loop",  # transformers eager experts: the loop graph-breaks, router only
    "moepass_op",  # already moepass.experts (moepass.make_traceable replaced a graph-breaking loop)
)

#: Zero-computation experts (LongCat-Flash, MoE++): expert ids E … E+Z−1 after
#: the E GEMM experts, each one of these kinds.  A slot routed to one costs no
#: GEMM row: ``identity`` adds w·x, ``zero`` adds nothing, ``constant`` adds w·c
#: (c a learned vector).
ZERO_COMPUTE_KINDS = ("identity", "zero", "constant")

#: Expert activations the lowerings implement.  ``lifted`` is any elementwise
#: function between the two GEMMs, carried as a program lifted from the
#: model's graph (:class:`moepass.compiler.lifted.ElementwiseProgram`); the named ones
#: are the forms lowerings fuse.
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "swiglu_clamp", "lifted")


@dataclass(frozen=True)
class RouterSpec:
    """How a block turns its input into per-token expert selections.

    The router linear itself (``logits = x @ W.T (+ b)``) stays in the graph;
    this spec describes what the model does with the logits.
    """

    kind: str
    num_experts: int
    top_k: int
    #: Divide the selected weights by their sum (``norm_topk_prob``).  Always
    #: True for ``topk_softmax`` (the softmax over the k is a renormalisation).
    renormalize: bool = False
    #: Constant added to the denominator of the renormalisation (DeepSeek: 1e-20).
    renormalize_eps: float = 0.0
    #: Multiplier on the final weights (DeepSeek ``routed_scaling_factor``).
    scaling_factor: float = 1.0
    #: Selection uses ``scores + correction_bias`` (DeepSeek ``e_score_correction_bias``).
    has_correction_bias: bool = False
    #: Group-limited selection (DeepSeek): experts are split into ``n_group``
    #: groups, each group scored by the sum of its best two biased scores, and
    #: only the best ``topk_group`` groups are eligible.
    n_group: int = 1
    topk_group: int = 1
    #: The router linear has a bias (gpt-oss).
    linear_has_bias: bool = False
    #: Width of the router's input (the block's hidden size).
    hidden_size: int = 0
    #: For ``lifted`` routers: the model's ops between the router linear and
    #: its weights, in words (for reports).
    formula: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {self.kind!r}; expected one of {ROUTER_KINDS}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")

    @property
    def description(self) -> str:
        """A one-line human description, e.g. ``softmax→top2→renorm``."""
        k = self.top_k
        if self.kind == "lifted":
            return f"lifted: {self.formula}→top{k}" + ("→renorm" if self.renormalize else "")
        if self.kind == "softmax_topk":
            text = f"softmax→top{k}" + ("→renorm" if self.renormalize else "")
        elif self.kind == "topk_softmax":
            text = f"top{k}→softmax"
        elif self.kind == "topk_sigmoid":
            text = f"top{k}→sigmoid"
        else:
            text = "sigmoid" + ("+bias" if self.has_correction_bias else "")
            if self.n_group > 1:
                text += f"→group{self.topk_group}/{self.n_group}"
            text += f"→top{k}" + ("→renorm" if self.renormalize else "")
            if self.scaling_factor != 1.0:
                text += f"×{self.scaling_factor:g}"
        return text


@dataclass(frozen=True)
class ExpertsSpec:
    """The routed experts: E copies of one MLP shape with stacked weights.

    Weights are described as the lowerings receive them:
    ``w1`` (gate+up or up projection) and ``w2`` (down projection), each either
    ``[E, out, in]`` (``transposed=False``, the nn.Linear convention) or
    ``[E, in, out]`` (``transposed=True``, gpt-oss and Llama 4).
    """

    dispatch: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    #: act(gate) * up (True) or act(up) (False).
    gated: bool = True
    #: Where gate and up live inside w1's output: "concat" ([gate; up]) or
    #: "interleaved" ([g0, u0, g1, u1, ...], gpt-oss).  "none" when not gated.
    gate_up_layout: str = "concat"
    transposed: bool = False
    has_bias: bool = False
    #: Llama 4 multiplies the routing weight into the expert's *input*;
    #: everyone else into its output.
    weight_on_input: bool = False
    #: gpt-oss clamped SwiGLU: out = (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g),
    #: g = clamp(gate, max=l).
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    #: The experts were separate modules; the rewrite stacked their weights.
    stacked_from_modules: bool = False
    #: For ``activation="lifted"``: the program's JSON (``gated`` is False and
    #: ``gate_up_layout`` "none": the program does its own splitting).
    program: str = ""
    #: Zero-computation experts after the ``num_experts`` GEMM experts: the
    #: kind (:data:`ZERO_COMPUTE_KINDS`) of ids E, E+1, …  Empty for most models.
    zero_compute: tuple[str, ...] = ()
    #: A per-slot output function: the JSON of a lifted program each slot's
    #: expert output row goes through before its routing weight multiplies it
    #: (a norm per expert: Ergo's and Muse Spark's ``post_expert_norm``); it may
    #: read tensors given beside it, shared or indexed by the slot's expert
    #: (:class:`moepass.compiler.lifted.ElementwiseProgram`).  "" for none: the
    #: routing weight multiplies the down projection directly.  See
    #: :func:`moepass.runtime.ops.experts_with_output` for how it is run.
    output: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.zero_compute, list):  # from JSON
            object.__setattr__(self, "zero_compute", tuple(self.zero_compute))
        unknown = [k for k in self.zero_compute if k not in ZERO_COMPUTE_KINDS]
        if unknown:
            raise ValueError(f"unknown zero-computation expert kind(s) {unknown}; expected {ZERO_COMPUTE_KINDS}")
        if self.dispatch not in DISPATCH_KINDS:
            raise ValueError(f"unknown dispatch {self.dispatch!r}; expected one of {DISPATCH_KINDS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if (self.activation == "lifted") != bool(self.program):
            raise ValueError("a lifted activation needs its program, and only a lifted one has a program")
        if self.gate_up_layout not in ("concat", "interleaved", "none"):
            raise ValueError(f"unknown gate_up_layout {self.gate_up_layout!r}")
        if self.output:
            from moepass.compiler.lifted import ElementwiseProgram

            ElementwiseProgram.from_json(self.output)  # raises LiftError (a ValueError) naming what is wrong
            if self.weight_on_input:
                raise ValueError("a per-slot output function with the routing weight on the expert input")

    @property
    def description(self) -> str:
        """A one-line human description, e.g. ``gated silu, [E,out,in]``."""
        if self.activation == "lifted":
            from moepass.compiler.lifted import ElementwiseProgram

            act = f"lifted {ElementwiseProgram.from_json(self.program).describe()}"
        else:
            act = self.activation if not self.gated else f"gated {self.activation}"
        if self.gate_up_layout == "interleaved":
            act += " (interleaved)"
        parts = [act, "[E,in,out]" if self.transposed else "[E,out,in]"]
        if self.has_bias:
            parts.append("biases")
        if self.weight_on_input:
            parts.append("weight on input")
        if self.output:
            from moepass.compiler.lifted import ElementwiseProgram

            parts.append(f"output {ElementwiseProgram.from_json(self.output).describe()} per slot")
        if self.zero_compute:
            counts = {k: self.zero_compute.count(k) for k in ZERO_COMPUTE_KINDS if k in self.zero_compute}
            parts.append("+ " + ", ".join(f"{n} {k}" for k, n in counts.items()) + " zero-computation")
        return ", ".join(parts)


@dataclass(frozen=True)
class SharedExpertSpec:
    """An always-on expert beside the routed ones; kept exactly as it was."""

    intermediate_size: int
    #: "none" (added as is, DeepSeek/Llama 4), "sigmoid" (scaled by
    #: sigmoid(x @ g), Qwen2-MoE) or "router" (scaled by a weight the router
    #: normalises jointly with the routed experts', Inkling).
    gate: str = "none"

    @property
    def description(self) -> str:
        """A one-line human description."""
        gate = "" if self.gate == "none" else f", {self.gate}-gated"
        return f"shared MLP (I={self.intermediate_size}{gate})"


@dataclass(frozen=True)
class MoEBlockSpec:
    """Everything known about one MoE block."""

    #: Module path of the block, e.g. ``model.layers.0.mlp``.
    path: str
    router: RouterSpec
    #: None when only the router could be handled (the experts graph-broke).
    experts: ExpertsSpec | None
    shared_experts: tuple[SharedExpertSpec, ...] = field(default_factory=tuple)
    #: Index of the block among the model's MoE blocks (layer order), used to
    #: look up per-layer policy parameters.
    layer_index: int = 0

    @property
    def num_experts(self) -> int:
        """Number of routed experts (E)."""
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        """The model's own k."""
        return self.router.top_k

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The spec as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoEBlockSpec:
        """Inverse of :meth:`to_dict`."""
        experts = data.get("experts")
        return cls(
            path=data["path"],
            router=RouterSpec(**data["router"]),
            experts=ExpertsSpec(**experts) if experts else None,
            shared_experts=tuple(SharedExpertSpec(**s) for s in data.get("shared_experts", ())),
            layer_index=data.get("layer_index", 0),
        )

    @classmethod
    def from_json(cls, text: str) -> MoEBlockSpec:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def layer_index_of(path: str) -> int:
    """The last integer component of a module path (``model.layers.7.mlp`` → 7), else 0."""
    numbers = [int(p) for p in path.split(".") if p.isdigit()]
    return numbers[-1] if numbers else 0
