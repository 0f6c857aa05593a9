"""Host launchers of the Triton experts kernels, registered as ``torch.library`` custom ops.

::

    ids [T,K] ─► moepass::triton_align_slots ─► sorted_slots [cap], block_experts [cap/BM], padded_rows [1]
    x [T,H]   ─► moepass::triton_gate_up     ─► h [cap, I]         act(x W1ᵀ + b1) per aligned row
    h         ─► moepass::triton_down        ─► y [T*K, H]         weight · (h W2ᵀ + b2) per slot
                                                 (= out [T, H] when K == 1)
    y         ─► moepass::triton_combine_slots ─► out [T, H]       Σ over each token's slots

Each op checks its inputs, allocates its outputs, computes the grid and
launches (``cap`` = :func:`~moepass.kernels.align.slot_capacity`).  None
mutates its inputs (``mutates_args=()``); each has a fake implementation so
graphs holding them trace with fake tensors.  Static attributes travel as
JSON strings: the :class:`~moepass.compiler.spec.ExpertsSpec` and the
:class:`~moepass.kernels.config_store.MoEKernelConfig`.

On a CPU tensor the kernels run only in Triton's interpreter
(``TRITON_INTERPRET=1``); otherwise :class:`TritonUnavailableError` says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any, Optional

import torch
import triton
from moepass.kernels._jit import ModeAwareKernel, interpreter_enabled
from moepass.kernels.align import align_launch_sizes, align_slots_kernel, slot_capacity
from moepass.kernels.config_store import GemmConfig, parse_config_json
from moepass.kernels.down import combine_slots_kernel, down_kernel
from moepass.kernels.gate_up import ACTIVATION_CODES, gate_up_kernel

from moepass.compiler.spec import ExpertsSpec

__all__ = [
    "TritonUnavailableError",
    "check_launchable",
    "align_slots",
    "gate_up",
    "down",
    "combine_slots",
    "launch_gate_up",
    "launch_down",
    "new_slot_rows",
    "parse_spec_json",
]


class TritonUnavailableError(RuntimeError):
    """The Triton kernels cannot run on these tensors here."""


def check_launchable(device: torch.device) -> None:
    """Raise :class:`TritonUnavailableError` unless kernels can run on ``device``:
    a CUDA device, or any device under ``TRITON_INTERPRET=1``."""
    if device.type == "cuda" or interpreter_enabled():
        return
    raise TritonUnavailableError(
        f"the Triton lowering needs CUDA tensors, got tensors on {device.type!r}; on a CPU the "
        "kernels run only in Triton's interpreter: set TRITON_INTERPRET=1 (slow, meant for tests) "
        "or use lowering='cpu'"
    )


@functools.lru_cache(maxsize=1024)
def parse_spec_json(text: str) -> ExpertsSpec:
    """Decode (and cache) an ops' ``spec`` argument (``json.dumps(dataclasses.asdict(spec))``)."""
    return ExpertsSpec(**json.loads(text))


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fp32_dot_precision() -> str:
    # fp32 experts follow torch's own matmul setting: plain TF32 only where the
    # user allowed it for torch's matmuls; otherwise three TF32 passes
    # ("tf32x3", error near fp32 round-off, at tensor-core speed), so the static
    # policy reproduces the model to float32 round-off.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _dot_flags(dtype: torch.dtype) -> dict[str, Any]:
    # The interpreter of Triton 3.9 multiplies bf16 operands as their raw
    # uint16 bits, so under it bf16 tiles are upcast first (bf16 products are
    # exact in fp32, so the result is what the tensor cores compute).
    return {
        "DOT_PRECISION": _fp32_dot_precision() if dtype == torch.float32 else "tf32",
        "UPCAST_DOT": interpreter_enabled() and dtype == torch.bfloat16,
    }


def _tile_kwargs(tile: GemmConfig | None) -> dict[str, int]:
    if tile is None:  # an autotuner supplies them
        return {}
    return dict(
        BLOCK_N=tile.BLOCK_N,
        BLOCK_K=tile.BLOCK_K,
        GROUP_M=tile.GROUP_M,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )


def _weight_dims(w: torch.Tensor, transposed: bool) -> tuple[int, int, int, int]:
    """(out size, in size, out stride, in stride) of stacked weights [E, out, in] / [E, in, out]."""
    if transposed:
        return w.shape[2], w.shape[1], w.stride(2), w.stride(1)
    return w.shape[1], w.shape[2], w.stride(1), w.stride(2)


# --- alignment ---------------------------------------------------------------


@torch.library.custom_op("moepass::triton_align_slots", mutates_args=())
def align_slots(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert-sorted, BLOCK_M-padded rows of the non-empty slots of ``ids`` [T, K].

    Returns ``sorted_slots`` [cap] int32 (slot ``t*K + j`` per row, ``T*K`` on
    padding rows), ``block_experts`` [cdiv(cap, block_m)] int32 and
    ``padded_rows`` [1] int32.  Rows at or past ``padded_rows`` are unused
    (slot ``T*K``, block expert -1).  See :mod:`moepass.kernels.align`.
    """
    check_launchable(ids.device)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be [T, K] int64 or int32, got {tuple(ids.shape)} {ids.dtype}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    ids = ids.contiguous()
    num_slots = ids.numel()
    capacity = slot_capacity(num_slots, num_experts, block_m)
    sorted_slots = torch.empty(capacity, dtype=torch.int32, device=ids.device)
    block_experts = torch.empty(triton.cdiv(capacity, block_m), dtype=torch.int32, device=ids.device)
    padded_rows = torch.zeros(1, dtype=torch.int32, device=ids.device)
    if num_slots == 0 or num_experts == 0:
        return sorted_slots.fill_(num_slots), block_experts.fill_(-1), padded_rows
    with _device_guard(ids.device):
        align_slots_kernel[(num_experts,)](
            ids,
            sorted_slots,
            block_experts,
            padded_rows,
            num_slots,
            num_experts,
            capacity,
            BLOCK_M=block_m,
            **align_launch_sizes(num_slots, num_experts),
            num_warps=4,
        )
    return sorted_slots, block_experts, padded_rows


@align_slots.register_fake
def _align_slots_fake(ids, num_experts, block_m):
    capacity = slot_capacity(ids.shape[0] * ids.shape[1], num_experts, block_m)
    return (
        ids.new_empty(capacity, dtype=torch.int32),
        ids.new_empty((capacity + block_m - 1) // block_m, dtype=torch.int32),
        ids.new_empty(1, dtype=torch.int32),
    )


# --- gate/up GEMM ------------------------------------------------------------


def launch_gate_up(
    x: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    block_experts: torch.Tensor,
    padded_rows: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    h: torch.Tensor,
    spec: ExpertsSpec,
    block_m: int,
    tile: GemmConfig | None,
    kernel: Any = None,
) -> None:
    """Launch the gate/up kernel into ``h`` [cap, I] (checked inputs; ``kernel`` may be an
    autotuner around :data:`gate_up_kernel`, then ``tile`` is None)."""
    num_tokens, slots_per_token = routing_weights.shape
    hidden = x.shape[1]
    n1, _, stride_w1n, stride_w1h = _weight_dims(w1, spec.transposed)
    inter = h.shape[1]
    capacity = sorted_slots.shape[0]
    if capacity == 0:
        return
    if not spec.gated:
        col_step, up_offset = 1, 0
    elif spec.gate_up_layout == "interleaved":
        col_step, up_offset = 2, 1
    else:
        col_step, up_offset = 1, inter

    def grid(meta):
        return (triton.cdiv(capacity, block_m) * triton.cdiv(inter, meta["BLOCK_N"]),)

    kernel = kernel if kernel is not None else gate_up_kernel
    if isinstance(kernel, ModeAwareKernel):
        kernel = kernel.current()
    with _device_guard(x.device):
        kernel[grid](
            x,
            routing_weights,
            sorted_slots,
            block_experts,
            padded_rows,
            w1,
            b1 if b1 is not None else w1,
            h,
            num_tokens * slots_per_token,
            slots_per_token,
            hidden,
            inter,
            capacity,
            col_step,
            up_offset,
            float(spec.swiglu_alpha),
            float(spec.swiglu_limit),
            x.stride(0),
            x.stride(1),
            w1.stride(0),
            stride_w1n,
            stride_w1h,
            b1.stride(0) if b1 is not None else 0,
            b1.stride(1) if b1 is not None else 0,
            h.stride(0),
            h.stride(1),
            BLOCK_M=block_m,
            ACTIVATION=ACTIVATION_CODES["identity" if spec.activation == "lifted" else spec.activation],
            GATED=spec.gated,
            HAS_BIAS=b1 is not None,
            WEIGHT_ON_INPUT=spec.weight_on_input,
            **_dot_flags(x.dtype),
            **_tile_kwargs(tile),
        )


def _check_gate_up(x, routing_weights, sorted_slots, block_experts, w1, b1, spec: ExpertsSpec, block_m: int) -> int:
    """Validate the gate/up op's inputs; returns I."""
    if x.dim() != 2 or routing_weights.dim() != 2 or routing_weights.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [T, H] and routing weights [T, K]; got {tuple(x.shape)}, {tuple(routing_weights.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if w1.dim() != 3 or w1.dtype != x.dtype:
        raise ValueError(f"w1 must be 3-D in x's dtype {x.dtype}, got {tuple(w1.shape)} {w1.dtype}")
    n1, w_in, _, _ = _weight_dims(w1, spec.transposed)
    if w_in != x.shape[1]:
        raise ValueError(f"w1 {tuple(w1.shape)} does not take hidden size {x.shape[1]} (transposed={spec.transposed})")
    if spec.gated and n1 % 2:
        raise ValueError(f"gated experts need an even gate+up width, got {n1}")
    if not spec.gated and spec.activation == "swiglu_clamp":
        raise ValueError("swiglu_clamp is a gated activation")
    inter = n1 // 2 if spec.gated else n1
    if b1 is not None and tuple(b1.shape) != (w1.shape[0], n1):
        raise ValueError(f"b1 must be [E, {n1}], got {tuple(b1.shape)}")
    if block_experts.shape[0] != triton.cdiv(sorted_slots.shape[0], block_m):
        raise ValueError("the alignment was made with a different BLOCK_M than this config")
    return inter


@torch.library.custom_op("moepass::triton_gate_up", mutates_args=())
def gate_up(
    x: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    block_experts: torch.Tensor,
    padded_rows: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    spec: str,
    config: str,
) -> torch.Tensor:
    """``h`` [cap, I] = act(x[token] @ W1[e]ᵀ + b1[e]) per aligned row, in x's dtype.

    Args: x [T, H]; routing_weights [T, K]; the three alignment outputs; w1
    [E, N1, H] or [E, H, N1]; b1 [E, N1] or None; ``spec`` ExpertsSpec JSON;
    ``config`` MoEKernelConfig JSON.  Rows of padding are left unwritten.
    """
    parsed, cfg = parse_spec_json(spec), parse_config_json(config)
    check_launchable(x.device)
    inter = _check_gate_up(x, routing_weights, sorted_slots, block_experts, w1, b1, parsed, cfg.BLOCK_M)
    x, routing_weights = x.contiguous(), routing_weights.contiguous()
    h = torch.empty(sorted_slots.shape[0], inter, dtype=x.dtype, device=x.device)
    launch_gate_up(x, routing_weights, sorted_slots, block_experts, padded_rows, w1, b1, h, parsed, cfg.BLOCK_M, cfg.gate_up)
    return h


@gate_up.register_fake
def _gate_up_fake(x, routing_weights, sorted_slots, block_experts, padded_rows, w1, b1, spec, config):
    parsed = parse_spec_json(spec)
    n1 = w1.shape[2] if parsed.transposed else w1.shape[1]
    return x.new_empty(sorted_slots.shape[0], n1 // 2 if parsed.gated else n1)


# --- down GEMM -------------------------------------------------------------------


def launch_down(
    h: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    block_experts: torch.Tensor,
    padded_rows: torch.Tensor,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    y: torch.Tensor,
    spec: ExpertsSpec,
    block_m: int,
    tile: GemmConfig | None,
    kernel: Any = None,
) -> None:
    """Launch the down kernel into the per-slot rows ``y`` [T*K, H] (see :func:`launch_gate_up`)."""
    hidden, inter, stride_w2n, stride_w2i = _weight_dims(w2, spec.transposed)
    capacity = sorted_slots.shape[0]
    if capacity == 0:
        return

    def grid(meta):
        return (triton.cdiv(capacity, block_m) * triton.cdiv(hidden, meta["BLOCK_N"]),)

    kernel = kernel if kernel is not None else down_kernel
    if isinstance(kernel, ModeAwareKernel):
        kernel = kernel.current()
    with _device_guard(h.device):
        kernel[grid](
            h,
            routing_weights,
            sorted_slots,
            block_experts,
            padded_rows,
            w2,
            b2 if b2 is not None else w2,
            y,
            routing_weights.numel(),
            hidden,
            inter,
            capacity,
            h.stride(0),
            h.stride(1),
            w2.stride(0),
            stride_w2n,
            stride_w2i,
            b2.stride(0) if b2 is not None else 0,
            b2.stride(1) if b2 is not None else 0,
            y.stride(0),
            y.stride(1),
            BLOCK_M=block_m,
            HAS_BIAS=b2 is not None,
            APPLY_ROUTING_WEIGHT=not spec.weight_on_input,
            **_dot_flags(h.dtype),
            **_tile_kwargs(tile),
        )


def new_slot_rows(num_tokens: int, slots_per_token: int, hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The down GEMM's output [T*K, H]: zero-filled when K == 1, because it is then the
    experts' output and tokens whose only slot is empty must read 0."""
    shape = (num_tokens * slots_per_token, hidden)
    if slots_per_token == 1:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.custom_op("moepass::triton_down", mutates_args=())
def down(
    h: torch.Tensor,
    routing_weights: torch.Tensor,
    sorted_slots: torch.Tensor,
    block_experts: torch.Tensor,
    padded_rows: torch.Tensor,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    spec: str,
    config: str,
) -> torch.Tensor:
    """``y`` [T*K, H]: y[t*K + j] = weight · (h[row] @ W2[e]ᵀ + b2[e]) for non-empty slots.

    Rows of empty slots are unwritten, except when K == 1: then ``y`` is zero
    where the slot is empty and equals the experts' output [T, H].
    """
    parsed, cfg = parse_spec_json(spec), parse_config_json(config)
    check_launchable(h.device)
    if w2.dim() != 3 or w2.dtype != h.dtype:
        raise ValueError(f"w2 must be 3-D in the activations' dtype {h.dtype}, got {tuple(w2.shape)} {w2.dtype}")
    hidden, inter, _, _ = _weight_dims(w2, parsed.transposed)
    if inter != h.shape[1]:
        raise ValueError(f"w2 {tuple(w2.shape)} does not take intermediate size {h.shape[1]} (transposed={parsed.transposed})")
    if b2 is not None and tuple(b2.shape) != (w2.shape[0], hidden):
        raise ValueError(f"b2 must be [E, {hidden}], got {tuple(b2.shape)}")
    num_tokens, slots_per_token = routing_weights.shape
    routing_weights = routing_weights.contiguous()
    y = new_slot_rows(num_tokens, slots_per_token, hidden, h.dtype, h.device)
    launch_down(h, routing_weights, sorted_slots, block_experts, padded_rows, w2, b2, y, parsed, cfg.BLOCK_M, cfg.down)
    return y


@down.register_fake
def _down_fake(h, routing_weights, sorted_slots, block_experts, padded_rows, w2, b2, spec, config):
    hidden = w2.shape[2] if parse_spec_json(spec).transposed else w2.shape[1]
    return h.new_empty(routing_weights.shape[0] * routing_weights.shape[1], hidden)


# --- combine -------------------------------------------------------------------


@torch.library.custom_op("moepass::triton_combine_slots", mutates_args=())
def combine_slots(y: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``out`` [T, H] = Σ over each token's non-empty slots, in slot order, of y [T*K, H]."""
    check_launchable(y.device)
    num_tokens, slots_per_token = ids.shape
    if y.shape[0] != num_tokens * slots_per_token:
        raise ValueError(f"y has {y.shape[0]} rows, expected T*K = {num_tokens * slots_per_token}")
    ids = ids.contiguous()
    hidden = y.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    if num_tokens == 0 or hidden == 0:
        return out
    block_n = min(1024, triton.next_power_of_2(hidden))
    with _device_guard(y.device):
        combine_slots_kernel[(num_tokens, triton.cdiv(hidden, block_n))](
            y,
            ids,
            out,
            slots_per_token,
            hidden,
            num_experts,
            y.stride(0),
            y.stride(1),
            out.stride(0),
            out.stride(1),
            BLOCK_N=block_n,
            num_warps=4,
        )
    return out


@combine_slots.register_fake
def _combine_slots_fake(y, ids, num_experts):
    return y.new_empty(ids.shape[0], y.shape[1])
