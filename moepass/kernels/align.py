"""Token alignment: group a token's non-empty expert slots by expert, padded to BLOCK_M.

::

    ids [T, K]  (slot s = t*K + j holds an expert id; id E, or any id outside
                 [0, E), marks an EMPTY slot)

    e.g. E=3, K=2, BLOCK_M=4, ids = [[1, 0], [1, E], [E, E], [1, 2]]

                       expert 0        expert 1         expert 2
    sorted_slots  = [1, P, P, P,   0, 2, 6, P,   7, P, P, P]     P = padding (value T*K)
    block_experts = [0,            1,            2          ]   one entry per BLOCK_M rows
    padded_rows   = 12

Empty slots produce no rows at all: ``sorted_slots`` holds every non-empty
slot exactly once and nothing else but padding, so the GEMMs that follow do
work proportional to the non-empty slots (plus at most BLOCK_M - 1 padding
rows per expert hit), never to T*K.  Within an expert, slots keep their
original order, so the layout is deterministic.

One program per expert, no atomics: each program histograms all ids (every
program recomputes the same E counts, which costs T*K integer loads per
program and saves a second launch and a global synchronisation), takes the
prefix sum of the padded counts of the experts before it as its first row,
then writes its own slots in order (a cumulative sum gives each slot its rank)
and its padding.  Program 0 writes the total number of padded rows and marks
the unused tail (rows past it) as padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moepass.kernels._jit import jit_kernel

__all__ = ["align_slots_kernel", "slot_capacity", "align_launch_sizes"]


def slot_capacity(num_slots, num_experts: int, block_m: int):
    """Rows the aligned layout may need: every slot plus the padding of every expert hit.

    At most ``min(E, num_slots)`` experts receive rows, each padded by fewer
    than ``BLOCK_M`` rows.  Works on SymInts (fake tensors) as well as ints.
    """
    return num_slots + torch.sym_min(num_experts, num_slots) * (block_m - 1)


def align_launch_sizes(num_slots: int, num_experts: int) -> dict[str, int]:
    """Block sizes of :func:`align_slots_kernel`: a power of two over the experts (plus
    the empty bin) and a chunk of slots per step."""
    return {
        "BLOCK_E": triton.next_power_of_2(num_experts + 1),
        "BLOCK_SLOTS": min(1024, max(16, triton.next_power_of_2(num_slots))),
    }


@jit_kernel
def align_slots_kernel(
    ids_ptr,
    sorted_slots_ptr,
    block_experts_ptr,
    padded_rows_ptr,
    num_slots,
    num_experts,
    capacity,
    BLOCK_M: tl.constexpr,
    BLOCK_SLOTS: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Write the expert-sorted, BLOCK_M-padded slot layout. Grid: (E,).

    Args:
        ids_ptr: [T*K] int64 or int32, the flattened ``ids [T, K]``.
        sorted_slots_ptr: [capacity] int32 out, slot index per row; ``T*K`` on padding rows
            and on the unused rows at or past ``padded_rows``.
        block_experts_ptr: [cdiv(capacity, BLOCK_M)] int32 out, the expert of each BLOCK_M
            rows; -1 for blocks at or past ``padded_rows / BLOCK_M``.
        padded_rows_ptr: [1] int32 out, the number of rows used (a multiple of BLOCK_M).
        num_slots: T*K.
        num_experts: E.
        capacity: rows of sorted_slots, :func:`slot_capacity`.
        BLOCK_M: the GEMMs' row block; every expert's run of rows is padded to it.
        BLOCK_SLOTS: slots read per step.
        BLOCK_E: power of two > E (bin E collects empty slots and is ignored).
    """
    expert = tl.program_id(0)
    bins = tl.arange(0, BLOCK_E)

    # Pass 1: how many slots every expert received (empty slots land in bin E).
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_slots, BLOCK_SLOTS):
        offs = start + tl.arange(0, BLOCK_SLOTS)
        ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1)
        valid = (ids >= 0) & (ids < num_experts)
        counts += tl.histogram(tl.where(valid, ids, num_experts).to(tl.int32), BLOCK_E)

    padded = tl.where(bins < num_experts, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    first_row = tl.sum(tl.where(bins < expert, padded, 0))
    my_count = tl.sum(tl.where(bins == expert, counts, 0))
    my_padded = tl.sum(tl.where(bins == expert, padded, 0))
    if expert == 0:
        # The total, and the unused tail marked as padding (a few rows: the
        # capacity bounds the padding of every expert), so the outputs are
        # fully defined.
        total = tl.sum(padded)
        tl.store(padded_rows_ptr, total)
        for start in range(total, capacity, BLOCK_SLOTS):
            offs = start + tl.arange(0, BLOCK_SLOTS)
            tl.store(sorted_slots_ptr + offs, tl.full([BLOCK_SLOTS], 0, tl.int32) + num_slots, mask=offs < capacity)
        num_blocks = tl.cdiv(capacity, BLOCK_M)
        for start in range(total // BLOCK_M, num_blocks, BLOCK_SLOTS):
            offs = start + tl.arange(0, BLOCK_SLOTS)
            tl.store(block_experts_ptr + offs, tl.full([BLOCK_SLOTS], -1, tl.int32), mask=offs < num_blocks)

    # Pass 2: this expert's slots, in slot order.
    if my_count > 0:
        written = tl.zeros([], dtype=tl.int32)
        for start in range(0, num_slots, BLOCK_SLOTS):
            offs = start + tl.arange(0, BLOCK_SLOTS)
            ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1)
            mine = (ids == expert).to(tl.int32)
            rank = written + tl.cumsum(mine, axis=0) - 1
            tl.store(sorted_slots_ptr + first_row + rank, offs.to(tl.int32), mask=mine != 0)
            written += tl.sum(mine)

        pad = tl.arange(0, BLOCK_M)
        tl.store(
            sorted_slots_ptr + first_row + my_count + pad,
            tl.full([BLOCK_M], 0, tl.int32) + num_slots,
            mask=pad < my_padded - my_count,
        )
        first_block = first_row // BLOCK_M
        my_blocks = my_padded // BLOCK_M
        for start in range(0, my_blocks, BLOCK_SLOTS):
            offs = start + tl.arange(0, BLOCK_SLOTS)
            tl.store(block_experts_ptr + first_block + offs, tl.full([BLOCK_SLOTS], 0, tl.int32) + expert, mask=offs < my_blocks)
