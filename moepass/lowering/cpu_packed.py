"""Expert weights pre-packed for oneDNN, kept beside the model's own (CPU inference).

A bfloat16 ``torch.mm`` goes through oneDNN, which first reorders the weight
into its blocked layout (pairs of bfloat16 along the reduction, for the
AVX-512 BF16 dot products) — on every call, for every expert hit.  Packing
each expert's matrices once (``torch.ops.mkldnn._reorder_linear_weight``, what
Inductor's CPU freezing path does for linear layers) and running
``torch.ops.mkldnn._linear_pointwise`` on them removes that work: on the
2-core CI machine a Qwen3-30B-A3B-shaped block in bfloat16 ran 1.4–1.6× faster
at 64 and 512 tokens on one thread.

The packed copies cost memory: as much again as the experts' weights.  They
are made lazily, one expert at a time when it is first hit, and only when
:func:`packing_allowed` says so: ``"auto"`` packs bfloat16 weights while the
packed bytes of the whole process stay within :data:`AUTO_MEMORY_FRACTION` of
the memory available when the weight is first seen (Linux ``MemAvailable``);
``"on"`` packs whatever fits no check; ``"off"`` never packs.  Each decision is
logged once per weight.  The packed copies follow the weight: an in-place
update (its version counter moves) or a new storage (``param.data = ...``)
repacks, and they are freed with the weight.  Inference only: the fused
experts op runs only where the graph needs no gradient.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["PREPACK_MODES", "packed_matrix", "packing_allowed", "packed_bytes", "release_packed", "AUTO_MEMORY_FRACTION"]

logger = logging.getLogger(__name__)

PREPACK_MODES = ("auto", "on", "off")

#: In ``auto`` mode, packed copies may use at most this fraction of the memory available.
AUTO_MEMORY_FRACTION = 0.5

#: dtypes whose GEMMs gain from packing on CPU (oneDNN reorders them per call otherwise).
PACKED_DTYPES = (torch.bfloat16,)


@dataclass
class _Entry:
    ref: weakref.ref
    version: int
    data_ptr: int
    allowed: bool
    #: Bytes counted against the budget (the weight's size when allowed).
    nbytes: int = 0
    matrices: list = field(default_factory=list)


# re-entrant: a weak reference's callback may run (garbage collection) while the lock is held
_lock = threading.RLock()
_entries: dict[tuple, _Entry] = {}
_packed_total = 0


def _available_memory() -> int | None:
    """Linux ``MemAvailable`` in bytes, or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _owner_and_key(weight: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The tensor whose lifetime the packed copies follow, and the entry's key.

    A view (``gate_up_proj[:E]``, taken anew on every call by a forward that
    uses only some of a parameter's rows) is keyed by its base and where it
    sits in it, so its packed copies live as long as the parameter, not the
    view; views share their base's version counter, so in-place updates
    still repack.
    """
    base = weight._base
    if base is None:
        return weight, (id(weight),)
    return base, (id(base), weight.storage_offset(), tuple(weight.shape), tuple(weight.stride()))


def _forget(key: tuple, dead: weakref.ref) -> None:
    """A packed weight died: free its copies (unless its id already names a newer weight)."""
    global _packed_total
    with _lock:
        entry = _entries.get(key)
        if entry is not None and entry.ref is dead:
            del _entries[key]
            _packed_total -= entry.nbytes


def _decide(weight: torch.Tensor, mode: str) -> bool:
    """Whether ``weight``'s experts may be packed (``_lock`` held)."""
    if mode == "off" or weight.dtype not in PACKED_DTYPES or weight.device.type != "cpu":
        return False
    from moepass.lowering.cpu_kernels import onednn_available

    if not onednn_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    nbytes = weight.numel() * weight.element_size()
    if mode == "on":
        return True
    available = _available_memory()
    if available is None:
        logger.info("expert weights %s not packed: available memory unknown (cpu_prepack='on' packs anyway)", tuple(weight.shape))
        return False
    if _packed_total + nbytes > AUTO_MEMORY_FRACTION * (available + _packed_total):
        logger.info(
            "expert weights %s (%.0f MB) not packed: packed copies would pass %.0f%% of the memory available "
            "(%.0f MB); cpu_prepack='on' packs anyway",
            tuple(weight.shape), nbytes / 1e6, 100 * AUTO_MEMORY_FRACTION, available / 1e6,
        )
        return False
    return True


def packing_allowed(weight: torch.Tensor, mode: str) -> bool:
    """Whether the experts of the stacked ``weight`` [E, out, in] run on packed copies (decided once per weight)."""
    global _packed_total
    if mode == "off" or weight.dtype not in PACKED_DTYPES:
        return False
    owner, key = _owner_and_key(weight)
    with _lock:
        entry = _entries.get(key)
        fresh = entry is not None and entry.ref() is owner
        if fresh and entry.version == weight._version and entry.data_ptr == weight.data_ptr():
            return entry.allowed
        if fresh and entry.allowed:  # updated in place or given new storage: repack lazily
            entry.version, entry.data_ptr = weight._version, weight.data_ptr()
            entry.matrices = [None] * weight.shape[0]
            return True
        allowed = _decide(weight, mode)
        nbytes = weight.numel() * weight.element_size() if allowed else 0
        if entry is not None:  # a dead weight whose id was reused
            _packed_total -= entry.nbytes
        entry = _Entry(
            weakref.ref(owner, lambda dead, key=key: _forget(key, dead)), weight._version, weight.data_ptr(), allowed, nbytes
        )
        entry.matrices = [None] * weight.shape[0]
        _entries[key] = entry
        if allowed:
            _packed_total += entry.nbytes
            logger.info(
                "packing expert weights %s %s for oneDNN (%.0f MB more, expert by expert as they are hit)",
                tuple(weight.shape), str(weight.dtype).removeprefix("torch."), entry.nbytes / 1e6,
            )
        return allowed


def packed_matrix(weight: torch.Tensor, expert: int) -> torch.Tensor:
    """The packed copy of ``weight[expert]`` ([out, in]); call :func:`packing_allowed` first."""
    entry = _entries[_owner_and_key(weight)[1]]
    matrix = entry.matrices[expert]
    if matrix is None:
        matrix = torch.ops.mkldnn._reorder_linear_weight(weight[expert])
        entry.matrices[expert] = matrix
    return matrix


def packed_bytes() -> int:
    """Bytes of weights the process may hold packed (what was allowed, packed or still to pack)."""
    return _packed_total


def release_packed() -> None:
    """Drop every packed copy (they are rebuilt on the next call that needs them)."""
    global _packed_total
    with _lock:
        _entries.clear()
        _packed_total = 0
