"""The Triton lowering of the experts op: align, fused gate/up, fused down, combine.

::

    ids [T,K] ──► triton_align_slots   non-empty slots grouped by expert, each run
                                       padded to BLOCK_M; empty slots get no row
    x [T,H]   ──► triton_gate_up       h = act(x W1ᵀ + b1) per row   (activation fused)
              ──► triton_down          y[slot] = w · (h W2ᵀ + b2)     (routing weight fused)
              ──► triton_combine_slots out[t] = Σ_j y[t*K + j]        (slot order; skipped when K == 1)

Four launches, no host synchronisation (grids are sized by the worst case and
idle programs exit at once), so the path is CUDA-graph friendly.  Variable k
needs no token bucketing (:mod:`moepass.runtime.bucketing`) here: the alignment
already gives empty slots no row, in one pass, whereas buckets would need
their sizes on the host (a synchronisation) and one set of launches each.  Tile sizes
come from :func:`moepass.kernels.config_store.lookup_config`: a tuned file for
this shape and GPU, else a logged heuristic.  Semantics match
:mod:`moepass.lowering.reference`; accumulation is float32 and the result is
returned in ``x.dtype``.

Runs on CUDA tensors; on a CPU only under ``TRITON_INTERPRET=1`` (Triton's
interpreter, how the tests run), otherwise it raises
:class:`~moepass.kernels.launch.TritonUnavailableError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import torch
from moepass.lowering.activations import apply_activation

from moepass.compiler.spec import ExpertsSpec

__all__ = ["experts_forward"]


@functools.lru_cache(maxsize=1024)
def _spec_json(spec: ExpertsSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


@functools.lru_cache(maxsize=1024)
def _config_json(config) -> str:
    return config.to_json()


def _kernel_ops():
    try:
        from moepass.kernels import launch
    except ImportError as error:  # triton missing
        raise RuntimeError(
            f"lowering='triton' needs the triton package ({error}); install it with `pip install 'moepass[triton]'`"
        ) from error
    return launch


def experts_forward(x, ids, weights, w1, w2, b1, b2, spec: ExpertsSpec) -> torch.Tensor:
    """Σ over non-empty slots of weight · expert(x) (or expert(weight · x)), with the Triton kernels."""
    launch = _kernel_ops()
    from moepass.kernels.config_store import lookup_config

    launch.check_launchable(x.device)
    num_tokens, hidden = x.shape
    num_slots = ids.shape[1]
    if num_tokens == 0 or num_slots == 0:
        return torch.zeros_like(x)
    n1 = w1.shape[2] if spec.transposed else w1.shape[1]
    config = lookup_config(
        num_experts=spec.num_experts,
        hidden=hidden,
        inter=n1 // 2 if spec.gated else (w2.shape[1] if spec.transposed else w2.shape[2]),
        dtype=x.dtype,
        device=x.device,
        tokens=num_tokens,
        top_k=num_slots,
    )
    config_json, spec_json = _config_json(config), _spec_json(spec)
    ops = torch.ops.moepass
    sorted_slots, block_experts, padded_rows = ops.triton_align_slots(ids, spec.num_experts, config.BLOCK_M)
    h = ops.triton_gate_up(x, weights, sorted_slots, block_experts, padded_rows, w1, b1, spec_json, config_json)
    if spec.activation == "lifted":
        # the gate/up kernel stored the raw projection; the lifted activation
        # runs as one elementwise pass over the aligned rows (padding rows
        # included: the down kernel never reads them)
        h = apply_activation(h, spec)
    y = ops.triton_down(h, weights, sorted_slots, block_experts, padded_rows, w2, b2, spec_json, config_json)
    if num_slots == 1:
        return y  # one slot per token: the slot rows are the output rows
    return ops.triton_combine_slots(y, ids, spec.num_experts)
