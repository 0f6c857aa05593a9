"""The experts half of a block's function as one Gemm pair per expert, for ONNX Runtime on CPU.

::

    out = 0                                              [T, H]
    for e in 0 .. E-1:                                   unrolled: e is a constant
        tok, slot = NonZero(ids == e)                    the slots routed to e, [R_e]
        If R_e > 0:                                      an expert no slot picked runs nothing
        xr  = x[tok]                     (· w if the weight goes on the input: Llama 4)
        h   = Gemm(xr, Gather(w1, e), Gather(b1, e))     Gather of an initializer by a constant:
        a   = act(h)                                     ONNX Runtime folds it when the session is
        y   = Gemm(a, Gather(w2, e), Gather(b2, e)) · w  created, and Gemm pre-packs the folded
        out = ScatterND(out, tok, y, reduction="add")    weights once

Standard ops only, and only the kept slots become GEMM rows (empty slots,
id E, match no expert).  Why it exists: ONNX Runtime's CPU
``com.microsoft.MoE`` re-packs (transposes into MLAS panels) the weights of
every expert it hits on *every* call — a cost that does not shrink with the
rows adaptive routing removes — and runs each expert's GEMMs on one thread,
experts split over the threads by index.  Measured on the Mixtral-shaped block
(hidden 1024, intermediate 2816, 8 experts; one thread, CPU time): at 512
tokens the MoE call is 228 ms static and 166 ms under top-p at an average k of
1.37 (1.38×; 2/1.37 = 1.46× ideal), a fixed ~24 ms of re-packing in both;
these Gemm pairs take 183 ms and 126 ms (1.45×), and 3.3 ms against 4.1 ms for
one token.  The price is ~15 small kernels per expert per call, whatever its
rows: for small experts at one token that overhead outweighs the re-packing it
saves (the bundled model, 0.4 MB per expert: +0.1 ms per layer), which is why
the pair sits in an ``If`` on the expert's row count (an expert nobody picked
costs two tiny kernels: one token on the Mixtral-shaped block, static, 7.4 ms
→ 3.6 ms), and why
the CPU default uses this layout for large experts only
(:func:`moepass.lowering.onnx.experts_ort.default_ort_layout`).
"""

from __future__ import annotations

from moepass.lowering.onnx.builder import FLOAT, INT64, NodeBuilder
from moepass.lowering.onnx.experts_portable import activation
from onnx import helper

from moepass.compiler.spec import ExpertsSpec

__all__ = ["gemm_experts"]


def gemm_experts(
    b: NodeBuilder,
    x: str,
    ids: str,
    weights: str,
    w1: str,
    w2: str,
    b1: str | None,
    b2: str | None,
    spec: ExpertsSpec,
    elem_type: int,
    skip_empty: bool = True,
    project=None,
) -> str:
    """Append one Gemm pair per expert on the rows routed to it; returns the [T, H] output (``elem_type``).

    Args:
        x: [T, H] block input; ids [T, k_max] int64 (E = empty); weights [T, k_max] float32.
        w1, w2, b1, b2: the model's expert weights, stacked over experts (initializers in the main graph).
        skip_empty: run an expert's pair only when a slot picked it (an ``If`` on its row count).
        project: ``project(b, rows, "w1" | "w2", expert) -> [R, out]`` instead of a Gemm on the gathered
            weights (quantized experts: :mod:`.experts_quantized`).
    """
    out = b.op("Expand", b.const(0.0, elem_type), b.op("Shape", x))
    trans_b = 0 if spec.transposed else 1
    for e in range(spec.num_experts):
        expert = b.const(e, INT64)
        picked = b.op("NonZero", b.op("Equal", ids, expert))  # [2, R]: token, slot
        token = b.gather(picked, b.const(0, INT64), axis=0)
        if not skip_empty:
            out = _expert_pair(b, out, x, weights, picked, token, expert, w1, w2, b1, b2, spec, elem_type, trans_b,
                               project)
            continue
        # an expert no slot picked runs nothing: its pair sits in the then-branch of an If on its row count
        routed = b.op("Greater", b.op("Squeeze", b.op("Shape", token)), b.const(0, INT64))
        branch = NodeBuilder(f"{b.prefix}/expert{e}")
        updated = _expert_pair(branch, out, x, weights, picked, token, expert, w1, w2, b1, b2, spec, elem_type,
                               trans_b, project)
        skipped = NodeBuilder(f"{b.prefix}/expert{e}_skipped")
        unchanged = skipped.op("Identity", out)
        out = b.op(
            "If",
            routed,
            then_branch=helper.make_graph(branch.nodes, f"expert{e}", [],
                                          [helper.make_tensor_value_info(updated, elem_type, None)]),
            else_branch=helper.make_graph(skipped.nodes, f"expert{e}_skipped", [],
                                          [helper.make_tensor_value_info(unchanged, elem_type, None)]),
        )
    return out


def _expert_pair(b: NodeBuilder, out: str, x: str, weights: str, picked: str, token: str, expert: str, w1: str,
                 w2: str, b1: str | None, b2: str | None, spec: ExpertsSpec, elem_type: int, trans_b: int,
                 project=None) -> str:
    """``out`` plus expert ``expert``'s weighted outputs on its rows (``token``, ``picked`` from NonZero)."""
    slot_weight = b.op("GatherND", weights, b.op("Transpose", picked, perm=[1, 0]))
    scale = b.unsqueeze(slot_weight if elem_type == FLOAT else b.cast(slot_weight, elem_type), [1])
    rows = b.gather(x, token)
    if spec.weight_on_input:
        rows = b.op("Mul", rows, scale)
    if project is not None:
        y = project(b, activation(b, project(b, rows, "w1", expert), spec, elem_type), "w2", expert)
    else:
        first = b.op("Gemm", rows, b.gather(w1, expert), b.gather(b1, expert) if b1 else None, transB=trans_b)
        y = b.op("Gemm", activation(b, first, spec, elem_type), b.gather(w2, expert),
                 b.gather(b2, expert) if b2 else None, transB=trans_b)
    if not spec.weight_on_input:
        y = b.op("Mul", y, scale)
    return b.op("ScatterND", out, b.unsqueeze(token, [1]), y, reduction="add")
