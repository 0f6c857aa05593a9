"""The machine a measurement belongs to: CPU model, ISA features, cores, torch version, threads.

A kernel table is a measurement of one machine (CPUs differ by an order of
magnitude in bfloat16 GEMM rate: AMX against AVX-512 against AVX2 against
NEON), so every table moepass keeps is keyed by a :class:`Machine`::

    Machine(cpu="AMD EPYC", arch="x86_64",
            isa=("avx2", "avx512", "avx512_bf16", "avx512_vnni", "fma"), aten="AVX512",
            cores=2, torch="2.13", threads=2)
      .file_stem  → "amd-epyc-x86_64-2c2t-torch2.13-3f9c0a1e"     (the table file's name)
      .describe() → "AMD EPYC (x86_64; AVX2, AVX-512, AVX-512 BF16, AVX-512 VNNI, FMA; no AMX), 2 cores,
                     torch 2.13, 2 threads"

Where each field comes from:

* ``cpu``: ``model name`` in /proc/cpuinfo (x86 Linux), the implementer and
  part numbers there on Arm Linux (``Arm 0xd40``, Neoverse V1), ``sysctl
  machdep.cpu.brand_string`` on macOS, else :func:`platform.processor`.
* ``isa``: the features of :data:`ISA_FEATURES` the CPU reports — /proc/cpuinfo
  ``flags`` (x86) or ``Features`` (Arm), ``sysctl hw.optional.arm.FEAT_*``
  (macOS) — joined with what torch itself detects
  (``torch.cpu._is_amx_tile_supported()``, ``_is_avx512_bf16_supported()``,
  …: what oneDNN will use).  Only features that change which kernel wins are
  kept, so a microcode flag does not split tables.
* ``aten``: ``torch.backends.cpu.get_cpu_capability()``, the vector ISA ATen's
  kernels dispatch to (``ATEN_CPU_CAPABILITY`` can lower it).
* ``cores``: the CPUs this process may run on (``os.sched_getaffinity``).
* ``torch``: major.minor (a patch release does not change the kernels).
* ``threads``: ``torch.get_num_threads()`` now — read on every call, since a
  program may change it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["ISA_FEATURES", "Machine", "current_machine", "cpu_identity"]

#: The ISA features a machine key records (the ones that change which CPU kernel wins), in display order.
ISA_FEATURES = {
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "amx_fp16": "AMX-FP16",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512": "AVX-512",
    "avx2": "AVX2",
    "fma": "FMA",
    "neon": "NEON",
    "dotprod": "DotProd",
    "i8mm": "I8MM",
    "bf16": "BF16",
    "sve": "SVE",
    "sve2": "SVE2",
    "sme": "SME",
}

#: /proc/cpuinfo flag (x86) or feature (Arm) → the name in :data:`ISA_FEATURES`.
_CPUINFO_FLAGS = {
    "amx_bf16": "amx_bf16",
    "amx_int8": "amx_int8",
    "amx_fp16": "amx_fp16",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512f": "avx512",
    "avx2": "avx2",
    "fma": "fma",
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
    "sme": "sme",
}

#: macOS ``sysctl hw.optional.*`` names → features (Apple silicon always has NEON).
_SYSCTL_FLAGS = {
    "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_SME": "sme",
}

#: torch.cpu probes (what oneDNN and ATen see) → features.
_TORCH_PROBES = {
    "_is_amx_tile_supported": "amx_bf16",
    "_is_amx_fp16_supported": "amx_fp16",
    "_is_avx512_bf16_supported": "avx512_bf16",
    "_is_avx512_supported": "avx512",
    "_is_avx2_supported": "avx2",
}


@dataclass(frozen=True)
class Machine:
    """What a kernel measurement depends on besides the problem itself."""

    cpu: str
    arch: str
    isa: tuple[str, ...]
    aten: str
    cores: int
    torch: str
    threads: int

    def to_dict(self) -> dict:
        """JSON-ready fields (``isa`` as a list)."""
        data = asdict(self)
        data["isa"] = list(self.isa)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Machine":
        """The inverse of :meth:`to_dict`; raises KeyError/TypeError on a malformed record."""
        return cls(
            cpu=str(data["cpu"]),
            arch=str(data["arch"]),
            isa=tuple(data["isa"]),
            aten=str(data["aten"]),
            cores=int(data["cores"]),
            torch=str(data["torch"]),
            threads=int(data["threads"]),
        )

    @property
    def kind(self) -> str:
        """The machine without its counts and torch version: what benchmarks group results by."""
        return f"{self.cpu} ({self.arch}; {self.isa_text()})"

    def isa_text(self) -> str:
        """``AVX2, AVX-512, AVX-512 BF16; no AMX`` — the features, and AMX's absence on x86."""
        names = [ISA_FEATURES[f] for f in ISA_FEATURES if f in self.isa]
        text = ", ".join(names) or "no vector extension reported"
        if self.arch in ("x86_64", "AMD64", "i686") and not any(f.startswith("amx") for f in self.isa):
            text += "; no AMX"
        return text

    def describe(self) -> str:
        """One line naming everything the key holds."""
        return (
            f"{self.cpu} ({self.arch}; {self.isa_text()}; ATen {self.aten}), {self.cores} cores, "
            f"torch {self.torch}, {self.threads} threads"
        )

    @property
    def file_stem(self) -> str:
        """A file name for this machine's tables: readable parts and a hash of every field."""
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        slug = re.sub(r"[^a-z0-9]+", "-", self.cpu.lower()).strip("-")[:40] or "cpu"
        return f"{slug}-{self.arch}-{self.cores}c{self.threads}t-torch{self.torch}-{digest}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first value of each key of /proc/cpuinfo (all processors of a machine are alike here)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_identity(cpuinfo: str | None = None, system: str | None = None) -> tuple[str, set[str]]:
    """(CPU model, ISA features from the operating system) — ``cpuinfo`` and ``system`` for tests."""
    system = system or platform.system()
    model, features = "", set()
    if system == "Linux" or cpuinfo is not None:
        fields = _cpuinfo_fields(_read("/proc/cpuinfo") if cpuinfo is None else cpuinfo)
        model = fields.get("model name", "") or fields.get("hardware", "")
        if not model and "cpu implementer" in fields:
            model = f"Arm implementer {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
        flags = (fields.get("flags", "") + " " + fields.get("features", "")).split()
        features = {_CPUINFO_FLAGS[f] for f in flags if f in _CPUINFO_FLAGS}
    elif system == "Darwin":
        model = _sysctl("machdep.cpu.brand_string")
        if platform.machine() == "arm64":
            features = {"neon"} | {name for key, name in _SYSCTL_FLAGS.items() if _sysctl(key) == "1"}
    model = re.sub(r"\s+", " ", model).strip() or platform.processor() or platform.machine() or "unknown CPU"
    return model, features


def _torch_features() -> set[str]:
    """Features torch's own probes report (what oneDNN and ATen will use)."""
    found = set()
    for probe, name in _TORCH_PROBES.items():
        try:
            if getattr(torch.cpu, probe)():
                found.add(name)
        except (AttributeError, RuntimeError):
            continue
    return found


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _fixed_part() -> tuple[str, str, tuple[str, ...], str, int, str]:
    """Everything but the thread count (read once per process)."""
    model, features = cpu_identity()
    features |= _torch_features()
    try:
        aten = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        aten = "unknown"
    version = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    isa = tuple(sorted(f for f in features if f in ISA_FEATURES))
    return model, platform.machine() or "unknown", isa, aten, _cores(), version


def current_machine(threads: int | None = None) -> Machine:
    """This machine, with ``threads`` (default: ``torch.get_num_threads()`` now)."""
    model, arch, isa, aten, cores, version = _fixed_part()
    return Machine(model, arch, isa, aten, cores, version, torch.get_num_threads() if threads is None else threads)
