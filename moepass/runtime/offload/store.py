"""The expert store: every routed expert's weights in a file, one aligned range per expert.

::

    experts/
        manifest.json                       blocks, their experts' byte ranges, checksums
        model.layers.0.mlp.safetensors     ┌ header (JSON, space-padded to 4096 bytes)
                                           ├ expert 0: 0.w1 ‖ 0.w2 (‖ 0.b1 ‖ 0.b2)   one 4096-aligned range
                                           ├ __pad__ …                              (so the next range is aligned)
                                           ├ expert 1: 1.w1 ‖ 1.w2 …
                                           └ …

Each block's file is a valid safetensors file (``safetensors.safe_open``
reads it: the expert tensors are named ``<expert>.<w1|w2|b1|b2>``, and the
gaps that keep every expert's range at a 4096-byte file offset are ``uint8``
tensors named ``__pad__.<n>``, since the format allows no holes).  Loading an
expert is then one read of one aligned range — with ``O_DIRECT`` where the
filesystem allows it, so the read really reaches the disk instead of the page
cache (see :class:`ExpertReader`).

The store is written from the tensors the backend's ``moepass.experts`` op
receives (the block's stacked weights, sliced per expert), so what is read
back is bit for bit what the in-memory model would have used.  The manifest
records each tensor's model parameter name (to free or re-attach it), shape
and dtype, and a CRC-32 of every expert's bytes (to check the store against a
model in memory, and optionally every load).  Writing goes to a temporary
folder that is renamed into place: a failed write leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import shutil
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

__all__ = [
    "ALIGNMENT",
    "FORMAT",
    "MANIFEST",
    "IO_MODES",
    "ExpertStoreError",
    "StoredTensor",
    "StoredBlock",
    "StoreManifest",
    "BlockWeights",
    "write_store",
    "open_store",
    "expert_bytes",
    "ExpertReader",
    "aligned_buffer",
]

logger = logging.getLogger(__name__)

#: File offsets and read sizes of every expert range are multiples of this
#: (O_DIRECT needs the logical block size; 4096 covers every common disk).
ALIGNMENT = 4096
#: Tensors inside an expert's range start at multiples of this (cache-line aligned views).
_TENSOR_ALIGNMENT = 64
FORMAT = "moepass-expert-store/1"
MANIFEST = "manifest.json"
#: How loads read the store: ``auto`` (O_DIRECT if the filesystem takes it,
#: else ``drop_cache``), ``direct`` (O_DIRECT or fail), ``drop_cache`` (plain
#: reads with readahead off — ``POSIX_FADV_RANDOM``, else the kernel caches the
#: next experts' ranges too — and ``POSIX_FADV_DONTNEED`` on each range after
#: reading it, so the next read goes to the disk again), ``page_cache`` (plain
#: reads, the OS may cache: a warm store).
IO_MODES = ("auto", "direct", "drop_cache", "page_cache")
#: The expert tensors of a block, in the order they lie in each expert's range: float weights
#: (``w1``, ``w2``) or quantized ones (the packed layout of :mod:`moepass.quantize.layout`:
#: ``w1.codes``, ``w1.scales``, ``w1.zeros``, the same for ``w2``), then biases.
TENSOR_NAMES = ("w1", "w2", "w1.codes", "w1.scales", "w1.zeros", "w2.codes", "w2.scales", "w2.zeros", "b1", "b2")

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


class ExpertStoreError(OSError):
    """The store cannot be written, opened or read; the message names the expert and file."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of every expert of a block (``w1[e]``, ``w2[e]``, ...)."""

    #: ``w1`` | ``w2`` | ``b1`` | ``b2`` (the experts op's arguments).
    name: str
    #: The model parameter it was sliced from (``model.layers.0.mlp.experts.gate_up_proj``), or "".
    param: str
    #: Shape of one expert's slice.
    shape: tuple[int, ...]
    #: safetensors dtype name (``F32``, ``BF16``...).
    dtype: str
    #: Byte offset inside the expert's range.
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a torch dtype."""
        return _TORCH_DTYPES[self.dtype]


@dataclass(frozen=True)
class StoredBlock:
    """The experts of one MoE block in the store."""

    #: Module path of the block (``model.layers.0.mlp``), as the backend reports it.
    path: str
    #: File name inside the store folder.
    file: str
    num_experts: int
    tensors: tuple[StoredTensor, ...]
    #: File offset of expert 0's range (a multiple of :data:`ALIGNMENT`).
    data_offset: int
    #: Distance between consecutive experts' ranges (a multiple of :data:`ALIGNMENT`).
    stride: int
    #: CRC-32 of each expert's tensor bytes (in tensor order, without padding).
    crc32: tuple[int, ...]
    #: The block's :class:`~moepass.compiler.spec.ExpertsSpec` as a dict (what the lowering needs).
    spec: dict[str, Any] = field(default_factory=dict)
    #: Quantized experts: the :class:`~moepass.quantize.QuantScheme` as a dict, plus ``row_block``
    #: (int4 codes stored in ATen's CPU row-block order for that block size, 0: plain order);
    #: empty for float experts.
    quant: dict[str, Any] = field(default_factory=dict)

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's weights (without alignment padding)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of all the block's experts' weights."""
        return self.expert_nbytes * self.num_experts

    @property
    def file_size(self) -> int:
        """The size the block's file must have."""
        return self.data_offset + self.stride * self.num_experts

    def expert_offset(self, expert: int) -> int:
        """File offset of ``expert``'s range."""
        return self.data_offset + expert * self.stride

    def tensor(self, name: str) -> StoredTensor | None:
        """The stored tensor called ``name`` (``w1``...), or None."""
        return next((t for t in self.tensors if t.name == name), None)

    def stacked_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the whole parameter [E, *shape] of tensor ``name``."""
        stored = self.tensor(name)
        if stored is None:
            raise KeyError(name)
        return (self.num_experts, *stored.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoredBlock:
        """Inverse of :meth:`to_dict`."""
        tensors = tuple(StoredTensor(**{**t, "shape": tuple(t["shape"])}) for t in data["tensors"])
        return cls(**{**data, "tensors": tensors, "crc32": tuple(data["crc32"])})


@dataclass(frozen=True)
class StoreManifest:
    """What a store folder holds."""

    blocks: tuple[StoredBlock, ...]
    #: Where the weights came from (for people reading the manifest).
    source: str = ""
    #: Lower-precision copies of blocks' experts (HOBBIT: read instead of the full expert on a miss of
    #: low routing weight), one entry per block that has one, in its own file.
    low: tuple[StoredBlock, ...] = ()

    def block(self, path: str) -> StoredBlock | None:
        """The entry of block ``path``, or None."""
        return next((b for b in self.blocks if b.path == path), None)

    def low_block(self, path: str) -> StoredBlock | None:
        """The lower-precision copy of block ``path``'s experts, or None."""
        return next((b for b in self.low if b.path == path), None)

    @property
    def paths(self) -> list[str]:
        """Block paths in store (layer) order."""
        return [b.path for b in self.blocks]

    @property
    def nbytes(self) -> int:
        """Bytes of expert weights in the store."""
        return sum(b.nbytes for b in self.blocks)

    def to_json(self) -> str:
        """The manifest file's text."""
        data = {"format": FORMAT, "source": self.source, "alignment": ALIGNMENT,
                "blocks": [b.to_dict() for b in self.blocks]}
        if self.low:
            data["low_blocks"] = [b.to_dict() for b in self.low]
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> StoreManifest:
        """Parse a manifest; ``where`` names the file in errors."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ExpertStoreError(f"{where} is not valid JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ExpertStoreError(f"{where} is not a moepass expert store manifest (format {found!r}, expected {FORMAT!r})")
        if data.get("alignment") != ALIGNMENT:
            raise ExpertStoreError(f"{where}: alignment {data.get('alignment')} is not {ALIGNMENT}")
        try:
            blocks = tuple(StoredBlock.from_dict(b) for b in data["blocks"])
            low = tuple(StoredBlock.from_dict(b) for b in data.get("low_blocks", ()))
        except (KeyError, TypeError) as error:
            raise ExpertStoreError(f"{where}: malformed block entry ({type(error).__name__}: {error})") from None
        return cls(blocks, data.get("source", ""), low)


# --- writing ------------------------------------------------------------------


@dataclass
class BlockWeights:
    """The stacked expert weights of one block, as the experts op receives them."""

    path: str
    #: ``{"w1": tensor [E, ...], "w2": ..., "b1": tensor or None, "b2": ...}``
    tensors: dict[str, torch.Tensor | None]
    #: Model parameter name of each tensor ("" when unknown).
    params: dict[str, str] = field(default_factory=dict)
    #: The block's ExpertsSpec as a dict.
    spec: dict[str, Any] = field(default_factory=dict)
    #: Quantized experts: see :attr:`StoredBlock.quant`.
    quant: dict[str, Any] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        """E (the first dimension of w1)."""
        first = self.tensors.get("w1")
        return int((first if first is not None else self.tensors["w1.codes"]).shape[0])


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def expert_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a (CPU) tensor, as a contiguous buffer (copied only if the tensor is strided)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _file_name(path: str, variant: str = "") -> str:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in path) or "root"
    return f"{safe}.{variant}.safetensors" if variant else f"{safe}.safetensors"


def _layout(weights: BlockWeights) -> tuple[list[StoredTensor], int]:
    """Tensor positions inside one expert's range, and the range's aligned size."""
    stored, offset = [], 0
    for name in TENSOR_NAMES:
        tensor = weights.tensors.get(name)
        if tensor is None:
            continue
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ExpertStoreError(f"block {weights.path}: {name} has dtype {tensor.dtype}, which the store cannot hold")
        if tensor.shape[0] != weights.num_experts:
            raise ExpertStoreError(
                f"block {weights.path}: {name} has {tensor.shape[0]} experts, w1 has {weights.num_experts}"
            )
        offset = _round_up(offset, _TENSOR_ALIGNMENT)
        per_expert = tuple(int(s) for s in tensor.shape[1:])
        nbytes = tensor[0].numel() * tensor.element_size()
        stored.append(StoredTensor(name, weights.params.get(name, ""), per_expert,
                                   _SAFETENSORS_DTYPES[tensor.dtype], offset, nbytes))
        offset += nbytes
    return stored, _round_up(max(offset, 1), ALIGNMENT)


def _safetensors_header(block: StoredBlock, metadata: dict[str, str]) -> bytes:
    """The block file's header, padded with spaces so the data starts at an aligned offset."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    cursor, pads = 0, 0

    def pad_to(target: int) -> None:
        nonlocal cursor, pads
        if target > cursor:
            entries[f"__pad__.{pads}"] = {"dtype": "U8", "shape": [target - cursor], "data_offsets": [cursor, target]}
            pads += 1
            cursor = target

    for expert in range(block.num_experts):
        base = expert * block.stride
        for tensor in block.tensors:
            pad_to(base + tensor.offset)
            entries[f"{expert}.{tensor.name}"] = {
                "dtype": tensor.dtype,
                "shape": list(tensor.shape),
                "data_offsets": [cursor, cursor + tensor.nbytes],
            }
            cursor += tensor.nbytes
        pad_to(base + block.stride)
    text = json.dumps(entries, separators=(",", ":")).encode()
    total = _round_up(8 + len(text), ALIGNMENT)
    return text + b" " * (total - 8 - len(text))


def _block_entry(weights: BlockWeights, variant: str = "") -> tuple[StoredBlock, list[torch.Tensor | None]]:
    stored, stride = _layout(weights)
    crcs = []
    for expert in range(weights.num_experts):
        crc = 0
        for tensor in stored:
            crc = zlib.crc32(expert_bytes(weights.tensors[tensor.name][expert]), crc)
        crcs.append(crc)
    block = StoredBlock(
        path=weights.path, file=_file_name(weights.path, variant), num_experts=weights.num_experts,
        tensors=tuple(stored), data_offset=0, stride=stride, crc32=tuple(crcs), spec=dict(weights.spec),
        quant=dict(weights.quant),
    )
    header = _safetensors_header(block, {"format": FORMAT, "block": weights.path})
    return dataclasses.replace(block, data_offset=8 + len(header)), [weights.tensors.get(t.name) for t in stored]


def _write_block(directory: Path, block: StoredBlock, tensors: list[torch.Tensor]) -> None:
    header = _safetensors_header(block, {"format": FORMAT, "block": block.path})
    assert 8 + len(header) == block.data_offset
    with open(directory / block.file, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little"))
        handle.write(header)
        for expert in range(block.num_experts):
            start = handle.tell()
            for stored, tensor in zip(block.tensors, tensors):
                handle.write(b"\0" * (block.expert_offset(expert) + stored.offset - handle.tell()))
                handle.write(expert_bytes(tensor[expert]))
            handle.write(b"\0" * (start + block.stride - handle.tell()))
        handle.flush()
        os.fsync(handle.fileno())


def write_store(blocks: Iterable[BlockWeights], out: str | Path, source: str = "", overwrite: bool = False,
                low: Iterable[BlockWeights] = ()) -> StoreManifest:
    """Write an expert store to the folder ``out``.

    Args:
        blocks: each MoE block's stacked expert weights (CPU tensors), in layer order.
        low: lower-precision copies of blocks' experts (HOBBIT), each in a file of its own.
        out: the store folder; written into a temporary folder beside it and
            renamed into place, so a failure leaves nothing half-written.
        source: a note on where the weights came from (kept in the manifest).
        overwrite: replace an existing store at ``out`` (else it is an error).

    Returns:
        The manifest of the written store.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise ExpertStoreError(f"{out} already exists; remove it or overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    entries = []
    try:
        seen = set()
        for weights in blocks:
            if weights.path in seen:
                raise ExpertStoreError(f"block {weights.path} given twice")
            seen.add(weights.path)
            block, tensors = _block_entry(weights)
            _write_block(staging, block, tensors)
            entries.append(block)
            logger.info("wrote %s: %d experts × %d bytes", block.file, block.num_experts, block.expert_nbytes)
        if not entries:
            raise ExpertStoreError("no MoE block with stacked expert weights to write")
        low_entries = []
        for weights in low:
            if weights.path not in seen:
                raise ExpertStoreError(f"a lower-precision copy of block {weights.path}, which the store does not hold")
            block, tensors = _block_entry(weights, "low")
            _write_block(staging, block, tensors)
            low_entries.append(block)
        manifest = StoreManifest(tuple(entries), source, tuple(low_entries))
        (staging / MANIFEST).write_text(manifest.to_json())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it private
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


# --- reading ------------------------------------------------------------------


def open_store(path: str | Path) -> tuple[Path, StoreManifest]:
    """Read a store's manifest and check its files exist with the right size and layout.

    Raises:
        ExpertStoreError: naming the file and the first expert it cannot provide.
    """
    root = Path(path).resolve()
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ExpertStoreError(
            f"{root} is not an expert store (no {MANIFEST}); write one with `moepass offload --model ... --out {root}`"
        )
    manifest = StoreManifest.from_json(manifest_path.read_text(), str(manifest_path))
    for block in (*manifest.blocks, *manifest.low):
        check_block_file(root, block)
    return root, manifest


def check_block_file(root: Path, block: StoredBlock) -> None:
    """Raise :class:`ExpertStoreError` unless ``block``'s file is there, whole, and laid out as the manifest says."""
    path = root / block.file
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ExpertStoreError(
            f"cannot load expert 0 of block {block.path}: store file {path} is missing ({error.strerror})"
        ) from None
    if size < block.file_size:
        first = max(0, (size - block.data_offset) // block.stride)
        raise ExpertStoreError(
            f"cannot load expert {min(first, block.num_experts - 1)} of block {block.path}: store file {path} is "
            f"truncated ({size} bytes, expected {block.file_size})"
        )
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if 8 + length != block.data_offset:
            raise ExpertStoreError(f"store file {path} does not match the manifest (header of {length} bytes)")
        header = json.loads(handle.read(length))
    first = header.get("0." + block.tensors[0].name)
    if first is None or first.get("shape") != list(block.tensors[0].shape) or first.get("dtype") != block.tensors[0].dtype:
        raise ExpertStoreError(f"store file {path} does not hold block {block.path}'s experts as the manifest says")


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of ``nbytes`` whose data starts at an :data:`ALIGNMENT` boundary (O_DIRECT needs it)."""
    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % ALIGNMENT
    return raw[skip : skip + nbytes]


def _direct_io_supported(path: Path) -> bool:
    """Whether ``path`` can be opened and read with O_DIRECT here."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return False
    try:
        probe = mmap.mmap(-1, ALIGNMENT)
        try:
            os.preadv(fd, [probe], 0)
        finally:
            probe.close()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class ExpertReader:
    """Reads experts' ranges from a store's files into caller-provided aligned buffers.

    Thread-safe: ``pread`` has no shared file position, so the prefetch worker
    and the compute thread read concurrently through the same descriptors.
    """

    def __init__(self, root: Path, manifest: StoreManifest, io: str = "auto", verify: bool = False):
        if io not in IO_MODES:
            raise ValueError(f"unknown io mode {io!r}; valid: {', '.join(IO_MODES)}")
        self.root = root
        self.manifest = manifest
        self.verify = verify
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        if io == "auto":
            probe = root / manifest.blocks[0].file
            io = "direct" if _direct_io_supported(probe) else "drop_cache"
        elif io == "direct" and not _direct_io_supported(root / manifest.blocks[0].file):
            raise ExpertStoreError(f"the filesystem of {root} does not support O_DIRECT reads; use io='drop_cache'")
        #: The mode in use: ``direct``, ``drop_cache`` or ``page_cache``.
        self.io = io
        logger.info("expert store %s: reading with %s", root, io)

    def _fd(self, block: StoredBlock, expert: int) -> int:
        fd = self._fds.get(block.file)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(block.file)
            if fd is None:
                flags = os.O_RDONLY | (os.O_DIRECT if self.io == "direct" else 0)
                path = self.root / block.file
                try:
                    fd = os.open(path, flags)
                except OSError as error:
                    raise ExpertStoreError(
                        f"cannot load expert {expert} of block {block.path}: cannot open store file {path} "
                        f"({error.strerror})"
                    ) from None
                if self.io == "drop_cache":
                    # no readahead (it would cache the next experts' ranges), and nothing of the file cached now
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                self._fds[block.file] = fd
        return fd

    def read(self, block: StoredBlock, expert: int, into: torch.Tensor) -> int:
        """Read ``expert``'s range of ``block`` into ``into`` (uint8, aligned, ``block.stride`` bytes).

        Returns the number of bytes read from the file.

        Raises:
            ExpertStoreError: the file is missing, short or (with ``verify``) corrupt; names the expert and file.
        """
        if not 0 <= expert < block.num_experts:
            raise ExpertStoreError(f"block {block.path} has no expert {expert}")
        fd = self._fd(block, expert)
        offset = block.expert_offset(expert)
        view = memoryview(into.numpy())[: block.stride]
        path = self.root / block.file
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as error:
            raise ExpertStoreError(
                f"cannot load expert {expert} of block {block.path} from store file {path}: {error.strerror}"
            ) from None
        if got < block.stride:
            raise ExpertStoreError(
                f"cannot load expert {expert} of block {block.path}: store file {path} is truncated (read {got} of "
                f"{block.stride} bytes at offset {offset})"
            )
        if self.io == "drop_cache":
            os.posix_fadvise(fd, offset, block.stride, os.POSIX_FADV_DONTNEED)
        if self.verify:
            crc = 0
            for tensor in block.tensors:
                crc = zlib.crc32(view[tensor.offset : tensor.offset + tensor.nbytes], crc)
            if crc != block.crc32[expert]:
                raise ExpertStoreError(
                    f"cannot load expert {expert} of block {block.path}: store file {path} is corrupt (CRC-32 "
                    f"{crc:08x}, the manifest says {block.crc32[expert]:08x})"
                )
        return got

    def read_stacked(self, block: StoredBlock) -> dict[str, torch.Tensor]:
        """All of ``block``'s experts as stacked tensors ``{"w1": [E, ...], ...}`` (for validation)."""
        stacked = {t.name: torch.empty(block.stacked_shape(t.name), dtype=t.torch_dtype) for t in block.tensors}
        buffer = aligned_buffer(block.stride)
        for expert in range(block.num_experts):
            self.read(block, expert, buffer)
            for name, view in expert_views(block, buffer).items():
                stacked[name][expert].copy_(view)
        return stacked

    def close(self) -> None:
        """Close the store's files."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def expert_views(block: StoredBlock, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Typed views ``{"w1": [..], ...}`` of one expert's range held in ``buffer``."""
    return {
        t.name: buffer[t.offset : t.offset + t.nbytes].view(t.torch_dtype).view(t.shape) for t in block.tensors
    }


def iter_expert_crc(tensors: dict[str, torch.Tensor | None], block: StoredBlock) -> Iterator[tuple[int, int]]:
    """(expert, CRC-32 of its bytes) of stacked in-memory tensors laid out as ``block`` says."""
    for expert in range(block.num_experts):
        crc = 0
        for stored in block.tensors:
            crc = zlib.crc32(expert_bytes(tensors[stored.name][expert]), crc)
        yield expert, crc
