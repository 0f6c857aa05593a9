"""Identity experts a block serves itself: the term it adds for slots it keeps away from its experts.

LongCat-Flash from transformers 5.25 handles its identity (zero-computation)
experts in the block instead of the experts module: it adds ``x`` times the
summed weight of the slots routed to an identity expert, then remaps those
slots onto real experts at weight 0 before its experts run::

    ids, w = router(x)                                      ids in [0, E+Z): E GEMM experts, Z identity experts
    T   = x · Σ_j w_j [ids_j ≥ E]                           masked_fill(w, ~(ids ≥ E), 0).sum(-1, keepdim)
    ids' = where(ids ≥ E, dummy, ids);   w' = masked_fill(w, ids ≥ E, 0)
    C   = experts(x, ids', w') + T

That is the function of identity experts exactly (5.24 put the same term
inside the experts module): slot j adds ``w_j · x`` when ``ids_j ≥ E``.
:func:`match_identity_term` recognises ``T`` by its structure, so the block
can be rewritten whole with the router's true selection — ids in [0, E+Z)
and their true weights — in the route op: the experts op skips ids ≥ E and
``moepass.zero_compute_experts`` adds the identity term beside it, the same
form as 5.24's (and :func:`moepass.make_traceable`'s).  An adaptive policy
then decides over every slot, identity ones included, with their mass.
Validation still proves each rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from moepass.compiler.dataflow import Dataflow, op_name, tensor_shape
from moepass.compiler.detect.common import CAST_OPS, SHAPE_OPS, arg
from moepass.compiler.detect.lifted_router import _classes_of_mask, routing_set
from moepass.compiler.detect.router import RouterMatch

__all__ = ["IdentityTerm", "match_identity_term", "zeroes_classes"]

_MULS = {"mul", "imul", "mul_", "__mul__", "multiply"}
_INVERTS = {"invert", "bitwise_not", "logical_not", "__invert__"}


@dataclass(frozen=True)
class IdentityTerm:
    """The identity experts a block adds itself."""

    #: The router's weights before the block zeroes the identity slots (the route op's selection).
    weights: fx.Node
    #: Router classes served as identity experts (ids E … E+Z−1).
    classes: frozenset[int]


def _through(node, ops: set[str]):
    """``node`` followed back through single-input ops of ``ops``."""
    for _ in range(8):
        if not isinstance(node, fx.Node) or op_name(node) not in ops or not node.args:
            return node
        node = node.args[0]
    return node


def _same_value(a, b) -> bool:
    plumbing = CAST_OPS | SHAPE_OPS
    return isinstance(a, fx.Node) and isinstance(b, fx.Node) and _through(a, plumbing) is _through(b, plumbing)


def _members(router: RouterMatch, flow: Dataflow) -> set[fx.Node]:
    return routing_set(router.linear, router.x_base, flow, tuple(tensor_shape(router.linear)[:-1]))


def zeroes_classes(node: fx.Node, router: RouterMatch, flow: Dataflow) -> tuple[fx.Node, frozenset[int]] | None:
    """(source, classes) when ``node`` is ``masked_fill(source, ids ≥ c, 0)`` over the router's ids, up to casts."""
    node = _through(node, CAST_OPS | SHAPE_OPS)
    if op_name(node) not in ("masked_fill", "masked_fill_") or arg(node, 2, "value") != 0:
        return None
    classes = _classes_of_mask(arg(node, 1, "mask"), router.ids, _members(router, flow), router.spec.num_experts)
    source = node.args[0]
    return (source, frozenset(classes)) if classes and isinstance(source, fx.Node) else None


def _selected_weight_sum(node, router: RouterMatch, flow: Dataflow) -> tuple[fx.Node, frozenset[int]] | None:
    """(w, classes) when ``node`` is Σ over the slots of w kept where the ids fall in ``classes``.

    ``masked_fill(w, ~mask, 0).sum(-1, keepdim=True)`` or ``where(mask, w, 0).sum(…)``, up to casts.
    """
    total = _through(node, CAST_OPS)
    if op_name(total) != "sum" or not total.args:
        return None
    rank = len(tensor_shape(total.args[0]) or ())
    if arg(total, 1, "dim") not in (-1, rank - 1, [-1], [rank - 1], (-1,), (rank - 1,)) or not arg(total, 2, "keepdim", False):
        return None
    kept = _through(total.args[0], CAST_OPS)
    members = _members(router, flow)
    name = op_name(kept)
    if name in ("masked_fill", "masked_fill_") and arg(kept, 2, "value") == 0:
        inverted = arg(kept, 1, "mask")
        if not isinstance(inverted, fx.Node) or op_name(inverted) not in _INVERTS:
            return None
        mask, source = inverted.args[0], kept.args[0]
    elif name == "where" and len(kept.args) == 3 and kept.args[2] in (0, 0.0):
        mask, source = kept.args[0], kept.args[1]
    else:
        return None
    classes = frozenset(_classes_of_mask(mask, router.ids, members, router.spec.num_experts))
    return (source, classes) if classes and isinstance(source, fx.Node) else None


def match_identity_term(term: fx.Node, x_base: fx.Node, router: RouterMatch, flow: Dataflow) -> IdentityTerm | None:
    """The identity experts ``term`` adds, when it is ``x · Σ w[ids ∈ classes]`` (see the module docstring).

    The classes must be the ones the block zeroes on its experts' side
    (``masked_fill(w, ids ≥ E, 0)`` on the way to the router's weights) and
    ``w`` the same weights; ``x`` the block's input, up to views and casts.
    None when the term is anything else (the block is then handled as it was).
    """
    product = _through(term, CAST_OPS)
    if op_name(product) not in _MULS or len(product.args) != 2:
        return None
    for tokens, weight_sum in (product.args, product.args[::-1]):
        if not isinstance(tokens, fx.Node) or _through(tokens, CAST_OPS | SHAPE_OPS) is not x_base:
            continue
        summed = _selected_weight_sum(weight_sum, router, flow)
        if summed is None:
            continue
        source, classes = summed
        zeroed = _zeroing_of(router, flow)
        if zeroed is None:
            return None
        experts_source, experts_classes = zeroed
        if classes != experts_classes or not _same_value(source, experts_source):
            return None
        return IdentityTerm(weights=experts_source, classes=classes)
    return None


def _zeroing_of(router: RouterMatch, flow: Dataflow) -> tuple[fx.Node, frozenset[int]] | None:
    """The ``masked_fill(w, ids ≥ E, 0)`` on the way to the router's weights (the experts' side), if one."""
    if router.weights_end is None:
        return None
    for node in flow.sorted(flow.ancestors(router.weights_end) | {router.weights_end}):
        found = zeroes_classes(node, router, flow) if op_name(node) in ("masked_fill", "masked_fill_") else None
        if found is not None and found[1] <= router.zero_weight_classes:
            return found
    return None
