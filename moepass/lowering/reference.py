"""The plain per-slot reference of the experts op: obviously right, slow.

For every token and every non-empty slot: run that slot's expert on the token
and add it, weighted, to the token's output.  Tests compare every other
lowering against this.
"""

from __future__ import annotations

import torch
from moepass.lowering.activations import apply_activation

from moepass.compiler.spec import ExpertsSpec

__all__ = ["experts_forward", "expert_mlp", "quantized_experts_forward"]


def expert_mlp(x, expert, w1, w2, b1, b2, spec: ExpertsSpec) -> torch.Tensor:
    """One expert's MLP on rows ``x`` [S, H] -> [S, H]."""
    first = w1[expert] if spec.transposed else w1[expert].t()
    h = x @ first
    if b1 is not None:
        h = h + b1[expert]
    h = apply_activation(h, spec)
    second = w2[expert] if spec.transposed else w2[expert].t()
    y = h @ second
    if b2 is not None:
        y = y + b2[expert]
    return y


def experts_forward(x, ids, weights, w1, w2, b1, b2, spec: ExpertsSpec) -> torch.Tensor:
    """Σ over non-empty slots of weight · expert(x) (or expert(weight · x))."""
    num_tokens, num_slots = ids.shape
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    for t in range(num_tokens):
        for j in range(num_slots):
            expert = int(ids[t, j])
            if not 0 <= expert < spec.num_experts:
                continue
            w = weights[t, j].float()
            row = x[t : t + 1]
            if spec.weight_on_input:
                y = expert_mlp((row.float() * w).to(x.dtype), expert, w1, w2, b1, b2, spec)
                out[t] += y[0].float()
            else:
                y = expert_mlp(row, expert, w1, w2, b1, b2, spec)
                out[t] += y[0].float() * w
    return out.to(x.dtype)


def quantized_experts_forward(x, ids, weights, w1, w2, b1, b2, spec: ExpertsSpec, scheme, form: str) -> torch.Tensor:
    """The dequantized reference of quantized experts: the same codes dequantized and computed in float32."""
    from moepass.lowering.cpu_quantized import dequantize_expert, operand_shape

    experts = operand_shape(w1, form, scheme)[0]
    first = torch.stack([dequantize_expert(w1, form, scheme, e, torch.float32) for e in range(experts)])
    second = torch.stack([dequantize_expert(w2, form, scheme, e, torch.float32) for e in range(experts)])
    out = experts_forward(
        x.float(), ids, weights.float(), first, second,
        None if b1 is None else b1.float(), None if b2 is None else b2.float(), spec,
    )
    return out.to(x.dtype)
