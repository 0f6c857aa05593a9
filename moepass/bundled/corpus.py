"""The offline text corpus of the bundled model: the Python standard library.

Every machine with Python has the standard library's source, so the bundled
model trains and evaluates on it with nothing downloaded::

    stdlib/**/*.py  (sorted; no test dirs, no site-packages)
        │  split by file: sha256(relative path) % 100 < HELDOUT_PERCENT → held-out
        ▼
    train stream    [BOUNDARY] file₁ bytes [BOUNDARY] file₂ bytes …   (int64 ids)
    held-out stream   same layout, the held-out files only

Tokens are bytes (ids 0..255) plus one file-boundary id (:data:`BOUNDARY`,
256) before every file.  The split depends only on the relative paths, so it
is the same on every machine; the files' contents depend on the Python
version, which :func:`fingerprint` records so that drift is detected.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "BOUNDARY",
    "VOCAB_SIZE",
    "HELDOUT_PERCENT",
    "CorpusFile",
    "Fingerprint",
    "stdlib_root",
    "list_files",
    "split_files",
    "token_stream",
    "fingerprint",
    "encode",
    "decode",
    "spaced_windows",
    "random_windows",
]

logger = logging.getLogger(__name__)

#: The id that starts every file (not a byte).
BOUNDARY = 256
#: Byte ids 0..255 plus :data:`BOUNDARY`.
VOCAB_SIZE = 257
#: Share of files (by path hash) in the held-out split.
HELDOUT_PERCENT = 10

#: Directory names whose files are left out: test suites (large, generated
#: data, many near-copies) and third-party packages (differ per machine).
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class CorpusFile:
    """One source file: its path relative to the stdlib root and its bytes."""

    path: str
    data: bytes


@dataclass(frozen=True)
class Fingerprint:
    """What identifies a split's content: file count, bytes, content hash."""

    files: int
    bytes: int
    sha256: str
    python: str

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {"files": self.files, "bytes": self.bytes, "sha256": self.sha256, "python": self.python}


def stdlib_root() -> Path:
    """Where this interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=4)
def list_files(root: str | None = None) -> tuple[CorpusFile, ...]:
    """Every ``*.py`` file of the standard library, sorted by relative path.

    Test directories and site-packages are left out (see ``_EXCLUDED_DIRS``).
    """
    base = Path(root) if root is not None else stdlib_root()
    found = []
    for path in base.rglob("*.py"):
        relative = path.relative_to(base).as_posix()
        if any(part in _EXCLUDED_DIRS for part in relative.split("/")[:-1]):
            continue
        if path.name.startswith("_sysconfigdata"):  # generated per platform build
            continue
        if not path.is_file():
            continue
        found.append(CorpusFile(relative, path.read_bytes()))
    found.sort(key=lambda f: f.path)
    logger.debug("corpus: %d files under %s", len(found), base)
    return tuple(found)


def is_heldout(relative_path: str) -> bool:
    """Whether a file belongs to the held-out split (a stable hash of its path)."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "little") % 100 < HELDOUT_PERCENT


def split_files(root: str | None = None) -> dict[str, tuple[CorpusFile, ...]]:
    """``{"train": files, "heldout": files}``, each sorted by path."""
    files = list_files(root)
    return {
        "train": tuple(f for f in files if not is_heldout(f.path)),
        "heldout": tuple(f for f in files if is_heldout(f.path)),
    }


def encode(data: bytes | str) -> torch.Tensor:
    """Bytes (or UTF-8 text) to token ids [N] int64."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64) if data else torch.zeros(0, dtype=torch.int64)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Token ids back to text; boundary ids become newlines, bad UTF-8 is replaced."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(b if b < 256 else 10 for b in values).decode("utf-8", errors="replace")


@lru_cache(maxsize=4)
def _stream(split: str, root: str | None) -> torch.Tensor:
    files = split_files(root)[split]
    pieces = []
    for f in files:
        pieces.append(torch.tensor([BOUNDARY], dtype=torch.int64))
        pieces.append(encode(f.data))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)


def token_stream(split: str, root: str | None = None) -> torch.Tensor:
    """The split's files as one token stream [N] int64 (a :data:`BOUNDARY` before each file).

    Args:
        split: ``"train"`` or ``"heldout"``.
        root: the stdlib directory (default: this interpreter's).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return _stream(split, root)


def fingerprint(split: str, root: str | None = None) -> Fingerprint:
    """Count, size and content hash of a split (paths and bytes of every file)."""
    files = split_files(root)[split]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.path.encode() + b"\0" + hashlib.sha256(f.data).digest())
    version = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return Fingerprint(len(files), sum(len(f.data) for f in files), digest.hexdigest(), version)


def spaced_windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping windows over ``stream``: [W, seq_len].

    ``W = min(max_tokens // seq_len, len(stream) // seq_len)``; the windows
    start at evenly spaced multiples of ``seq_len`` from the start to the end
    of the stream, so a small slice still samples every part of the split.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    available = stream.numel() // seq_len
    count = min(max_tokens // seq_len, available)
    if count < 1:
        raise ValueError(f"max_tokens={max_tokens} is less than one window of seq_len={seq_len}")
    slots = torch.linspace(0, available - 1, count).round().long()
    starts = slots * seq_len
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def random_windows(stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens at random offsets: [B, seq_len]."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len)
    return stream[starts[:, None] + offsets[None, :]]
