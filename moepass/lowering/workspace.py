"""Scratch buffers the CPU lowering reuses from call to call.

A fresh CPU tensor of more than 32 MiB is mapped anew by the allocator on
every call and pays a page fault per 4 KiB page on first touch: on the 2-core
CI machine writing a fresh 32 MiB buffer took 18 ms against 1.7 ms for a
reused one — as long as the GEMMs of a whole OLMoE block at 64 tokens.  The
CPU lowering's intermediates (the gathered input rows, the expert outputs, the
token-ordered rows of the combine) are therefore taken from per-thread
buffers that live across calls; only the op's output is freshly allocated.

Buffers are per thread (two threads running the op never share one) and are
kept only from :data:`MIN_KEPT_BYTES` (smaller ones come from the heap
without faults) up to :data:`MAX_KEPT_BYTES` each; other requests get a
fresh tensor.  :func:`release_workspace` frees the calling thread's buffers.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["scratch", "release_workspace", "MAX_KEPT_BYTES"]

#: Buffers larger than this are not kept between calls (allocated fresh each time).
MAX_KEPT_BYTES = 512 << 20
#: Below this a fresh tensor comes from the allocator's heap, without page
#: faults, and is cheaper than slicing a kept buffer.
MIN_KEPT_BYTES = 1 << 20

_local = threading.local()


def _buffers() -> dict:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    return buffers


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape``, reusing this thread's CPU buffer ``name``.

    The tensor is valid until the next ``scratch`` call with the same name on
    this thread; never return it (or a view of it) from an op.  Off the CPU
    (where the caching allocator already reuses memory) it is a fresh tensor.
    """
    numel = math.prod(shape)
    size = numel * dtype.itemsize
    if (device is not None and torch.device(device).type != "cpu") or size < MIN_KEPT_BYTES or size > MAX_KEPT_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers = _buffers()
    key = (name, dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        # a normal tensor even under torch.inference_mode(): an inference tensor could not be
        # written outside it later (a recompile's validation, a no_grad call after an inference one)
        with torch.inference_mode(False):
            buffer = buffers[key] = torch.empty(max(numel, 1), dtype=dtype)
    return buffer[:numel].view(shape)


def release_workspace() -> None:
    """Free the calling thread's scratch buffers."""
    _buffers().clear()
