"""Tile configs of the Triton experts kernels: tuned JSON files, nearest-size lookup, heuristics.

A tuned file covers one problem shape on one device::

    kernels/configs/E=8,H=4096,I=14336,dtype=bfloat16,device=NVIDIA_H100_80GB_HBM3.json
    {"meta":    {"num_experts": 8, "hidden": 4096, "inter": 14336, "dtype": "bfloat16",
                 "device": "NVIDIA_H100_80GB_HBM3", "top_k": 2, "triton": "3.9.0", ...},
     "configs": {"1":  {"BLOCK_M": 16, "gate_up": {"BLOCK_N": 64, ...}, "down": {...}},
                 "16": {...}, ...}}                  keys: token counts the file was tuned at

:func:`lookup_config` returns, in order of preference: the config forced by
:func:`override_config` (tests), the entry of the matching file whose token
count is nearest to the call's, or :func:`heuristic_config` (logged once per
missing file, so a user can see they are running untuned).  Files are read
from the folders in ``$MOEPASS_TRITON_CONFIG_DIR`` (``os.pathsep``-separated)
first, then from this package's ``configs/`` folder.  ``moepass tune``
writes them (see :mod:`moepass.kernels.tune`).

BLOCK_M is shared by the alignment and both GEMMs (the alignment pads each
expert's rows to it); the other tile sizes are per GEMM.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

__all__ = [
    "GemmConfig",
    "MoEKernelConfig",
    "BLOCK_M_CHOICES",
    "MAX_SHARED_BYTES",
    "CONFIG_DIR",
    "lookup_config",
    "parse_config_json",
    "override_config",
    "heuristic_config",
    "config_file_name",
    "device_name",
    "config_dirs",
    "load_config_file",
    "save_config_file",
    "clear_config_cache",
    "tile_config_space",
    "pipeline_bytes",
    "next_pow2",
]

logger = logging.getLogger(__name__)

#: The packaged folder of tuned configs.
CONFIG_DIR = Path(__file__).with_name("configs")

#: Row-block sizes the alignment and GEMMs are tuned over.
BLOCK_M_CHOICES = (16, 32, 64, 128)

#: Shared-memory budget of one program's software pipeline: H100 allows 227 KiB
#: per block and A100 163 KiB; configs above 200 KiB are not tried (they fail to
#: compile on A100 and rarely win on H100, where the epilogue needs room too).
MAX_SHARED_BYTES = 200 * 1024

_ENV_DIRS = "MOEPASS_TRITON_CONFIG_DIR"


@dataclass(frozen=True)
class GemmConfig:
    """Tiles and launch parameters of one grouped GEMM kernel."""

    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEKernelConfig:
    """Everything one experts call launches with."""

    BLOCK_M: int
    gate_up: GemmConfig
    down: GemmConfig

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoEKernelConfig:
        """Inverse of :meth:`to_dict` (extra keys such as timings are ignored)."""
        fields = {f.name for f in dataclasses.fields(GemmConfig)}
        return cls(
            BLOCK_M=int(data["BLOCK_M"]),
            gate_up=GemmConfig(**{k: int(v) for k, v in data["gate_up"].items() if k in fields}),
            down=GemmConfig(**{k: int(v) for k, v in data["down"].items() if k in fields}),
        )

    def to_json(self) -> str:
        """Encode for the kernel ops' ``config`` argument."""
        return json.dumps(self.to_dict(), sort_keys=True)


@functools.lru_cache(maxsize=1024)
def parse_config_json(text: str) -> MoEKernelConfig:
    """Decode (and cache) a kernel op's ``config`` argument."""
    return MoEKernelConfig.from_dict(json.loads(text))


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(1, int(n)) - 1).bit_length()


def pipeline_bytes(block_m: int, block_n: int, block_k: int, element_bytes: int, stages: int, b_operands: int) -> int:
    """Shared memory a pipelined GEMM program holds: ``stages`` copies of its A tile
    [BLOCK_M, BLOCK_K] and ``b_operands`` B tiles [BLOCK_K, BLOCK_N]."""
    return stages * (block_m * block_k + b_operands * block_k * block_n) * element_bytes


def tile_config_space(
    block_m: int, n: int, k: int, element_bytes: int, b_operands: int, quick: bool = False
) -> list[dict[str, int]]:
    """Candidate GEMM tiles for an [rows, k] @ [k, n] problem at a fixed BLOCK_M.

    Dicts of BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages.  Tiles are capped
    at the next power of two of the problem, and configs over
    :data:`MAX_SHARED_BYTES` are dropped.  ``quick`` is a small space (a few
    configs) for smoke runs.
    """
    n_cap, k_cap = max(16, next_pow2(n)), max(16, next_pow2(k))
    space = itertools.product(
        (64, 128) if quick else (32, 64, 128, 256),  # BLOCK_N
        (64, 128) if quick else (32, 64, 128, 256),  # BLOCK_K
        (1,) if quick else (1, 16),  # GROUP_M
        (4,) if quick else (4, 8),  # num_warps
        (3,) if quick else (2, 3, 4, 5),  # num_stages
    )
    configs: list[dict[str, int]] = []
    seen = set()
    for block_n, block_k, group_m, warps, stages in space:
        block_n, block_k = min(block_n, n_cap), min(block_k, k_cap)
        if pipeline_bytes(block_m, block_n, block_k, element_bytes, stages, b_operands) > MAX_SHARED_BYTES:
            continue
        key = (block_n, block_k, group_m, warps, stages)
        if key not in seen:
            seen.add(key)
            configs.append(dict(BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages))
    return configs


def heuristic_config(
    tokens: int, top_k: int, num_experts: int, hidden: int, inter: int, dtype: torch.dtype
) -> MoEKernelConfig:
    """A reasonable untuned config, chosen by the expected rows per expert.

    ``tokens * top_k / E`` rows reach an expert under balanced routing.  A
    handful (decode) is a weight-streaming problem: the smallest BLOCK_M (16,
    the least MMA size) and long BLOCK_K runs of the weights; hundreds of rows
    per expert is compute-bound: 128×128 tiles, grouped row blocks so the
    weight tiles stay in L2.
    """
    rows_per_expert = tokens * top_k / max(1, num_experts)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    if rows_per_expert <= 16:
        block_m, block_n, block_k, group_m, warps, stages = 16, 64, 128, 1, 4, 4
    elif rows_per_expert <= 64:
        block_m, block_n, block_k, group_m, warps, stages = 32, 64, 128, 1, 4, 4
    elif rows_per_expert <= 256:
        block_m, block_n, block_k, group_m, warps, stages = 64, 128, 64, 8, 4, 4
    else:
        block_m, block_n, block_k, group_m, warps, stages = 128, 128, 64, 16, 8, 3
    if element_bytes == 4:
        block_k //= 2

    def gemm(n: int, k: int, b_operands: int) -> GemmConfig:
        bn, bk = min(block_n, max(16, next_pow2(n))), min(block_k, max(16, next_pow2(k)))
        st = stages
        while st > 2 and pipeline_bytes(block_m, bn, bk, element_bytes, st, b_operands) > MAX_SHARED_BYTES:
            st -= 1
        return GemmConfig(BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=st)

    return MoEKernelConfig(BLOCK_M=block_m, gate_up=gemm(inter, hidden, 2), down=gemm(hidden, inter, 1))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=16)
def _device_name_of(device_type: str, index: int | None) -> str:
    if device_type == "cuda":
        raw = torch.cuda.get_device_name(index)
    else:
        raw = device_type
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw.strip())


def device_name(device: torch.device | str) -> str:
    """The name tuned files use for ``device``: the GPU's name with spaces as
    underscores (``NVIDIA_H100_80GB_HBM3``), or ``cpu`` (the interpreter)."""
    device = torch.device(device)
    return _device_name_of(device.type, device.index)


def config_file_name(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: str) -> str:
    """The file name of a tuned config: what the best tiles depend on."""
    return f"E={num_experts},H={hidden},I={inter},dtype={_dtype_name(dtype)},device={device}.json"


def config_dirs() -> list[Path]:
    """Folders searched for tuned files, first match wins."""
    extra = [Path(p) for p in os.environ.get(_ENV_DIRS, "").split(os.pathsep) if p]
    return extra + [CONFIG_DIR]


def load_config_file(path: Path) -> dict[int, MoEKernelConfig]:
    """The token-count → config table of a tuned file."""
    data = json.loads(Path(path).read_text())
    return {int(tokens): MoEKernelConfig.from_dict(entry) for tokens, entry in data["configs"].items()}


def save_config_file(
    path: Path, meta: Mapping[str, Any], table: Mapping[int, MoEKernelConfig], extra: Mapping[int, Mapping[str, Any]] | None = None
) -> Path:
    """Write a tuned file (``extra`` adds per-token-count fields such as timings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = {}
    for tokens in sorted(table):
        entry = table[tokens].to_dict()
        entry.update((extra or {}).get(tokens, {}))
        configs[str(tokens)] = entry
    path.write_text(json.dumps({"meta": dict(meta), "configs": configs}, indent=1, sort_keys=False) + "\n")
    clear_config_cache()
    return path


@functools.lru_cache(maxsize=256)
def _table_for(name: str, dirs: tuple[Path, ...]) -> tuple[Path | None, dict[int, MoEKernelConfig]]:
    for folder in dirs:
        path = folder / name
        if path.is_file():
            logger.debug("tuned Triton MoE configs from %s", path)
            return path, load_config_file(path)
    return None, {}


@functools.lru_cache(maxsize=256)
def _log_fallback(name: str, level: int) -> None:
    logger.log(
        level,
        "no tuned Triton MoE config %s in %s; using the heuristic config (run `moepass tune` to make one)",
        name,
        os.pathsep.join(str(d) for d in config_dirs()),
    )


def clear_config_cache() -> None:
    """Forget the tuned files read so far (after writing or moving files)."""
    _table_for.cache_clear()
    _log_fallback.cache_clear()


_override: contextvars.ContextVar[MoEKernelConfig | None] = contextvars.ContextVar("moepass_triton_config", default=None)


@contextlib.contextmanager
def override_config(config: MoEKernelConfig | Mapping[str, Any]) -> Iterator[MoEKernelConfig]:
    """Run every experts call inside the block with ``config`` (tests, experiments)."""
    if not isinstance(config, MoEKernelConfig):
        config = MoEKernelConfig.from_dict(config)
    token = _override.set(config)
    try:
        yield config
    finally:
        _override.reset(token)


def lookup_config(
    *, num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device, tokens: int, top_k: int
) -> MoEKernelConfig:
    """The config for one experts call: override, else nearest tuned entry, else heuristic."""
    forced = _override.get()
    if forced is not None:
        return forced
    name = config_file_name(num_experts, hidden, inter, dtype, device_name(device))
    _, table = _table_for(name, tuple(config_dirs()))
    if table:
        nearest = min(table, key=lambda tuned: (abs(tuned - tokens), tuned))
        return table[nearest]
    _log_fallback(name, logging.WARNING if torch.device(device).type == "cuda" else logging.INFO)
    return heuristic_config(tokens, top_k, num_experts, hidden, inter, dtype)
