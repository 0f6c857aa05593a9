"""Small C++ libraries of the CPU lowering: built on first use with the machine's compiler, cached, loaded by ctypes.

::

    moepass/lowering/csrc/<name>.cpp
        ──► <cache_dir()>/native/<name>-<digest>.so    built once per source, compiler, flags and platform
              (digest: sha256 of those; a new moepass or compiler builds a new file, never reuses a stale one)
        ──► ctypes.CDLL, once per process                 library(name) → the CDLL, or None

The libraries are plain C ABIs with no torch headers, so a build takes about a
second (``torch.utils.cpp_extension.load_inline`` compiles torch's headers and
pybind11: 30–60 s on the 2-core CI machine) and a call costs a ctypes call, not
a dispatcher round trip.  They parallelise with OpenMP: built with
``-fopenmp``, they bind to the OpenMP runtime torch already loaded (the same
``libgomp.so.1`` soname), so their threads are torch's intra-op threads.

**Failing closed.**  No compiler, a build that fails or times out, a library
that does not load, or ``$MOEPASS_NATIVE=off``: :func:`library` returns None,
:func:`unavailable_reason` says why (logged once at INFO), and callers keep
their ATen / torch paths.  A library is also checked by its caller against a
reference before its first use (:mod:`moepass.lowering.cpu_qgemv`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["NATIVE_ENV", "SOURCES", "library", "unavailable_reason", "build_flags", "compiler"]

logger = logging.getLogger(__name__)

#: ``off`` disables the native libraries (the ATen / torch paths run); anything else, or unset: on.
NATIVE_ENV = "MOEPASS_NATIVE"
#: Where the sources live (package data).
SOURCES = Path(__file__).with_name("csrc")
#: Seconds a build may take before it is abandoned (the library is then unavailable for this process).
BUILD_TIMEOUT = 180

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}


def compiler() -> str | None:
    """The C++ compiler a build uses: ``$CXX``, else the first of c++, g++, clang++ on the PATH."""
    chosen = os.environ.get("CXX")
    if chosen:
        return shutil.which(chosen) or (chosen if Path(chosen).is_file() else None)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def build_flags(openmp: bool = True) -> list[str]:
    """Flags of a build: optimised, position independent; ISA-specific code is selected at run time inside
    the library (function target attributes), so the build itself targets the baseline ISA."""
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
    if sys.platform == "darwin":
        flags.append("-undefined dynamic_lookup")
    return flags + (["-fopenmp"] if openmp else [])


def _compiler_identity(path: str) -> str:
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        return result.stdout.splitlines()[0] if result.stdout else path
    except (OSError, subprocess.SubprocessError):
        return path


def _target(name: str, source: bytes, cxx: str, flags: list[str]) -> Path:
    from moepass.runtime.tuning import cache_dir

    digest = hashlib.sha256()
    for part in (source, _compiler_identity(cxx).encode(), " ".join(flags).encode(), platform.platform().encode(),
                 platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache_dir() / "native" / f"{name}-{digest.hexdigest()[:16]}.so"


def _build(name: str, source_path: Path, cxx: str) -> tuple[Path | None, str]:
    """(the built library, "") or (None, why not).  Tries with OpenMP, then without."""
    source = source_path.read_bytes()
    failures = []
    for openmp in (True, False):
        flags = build_flags(openmp)
        target = _target(name, source, cxx, flags)
        if target.is_file():
            return target, ""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return None, f"cannot create {target.parent}: {error}"
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as folder:
            partial = Path(folder) / target.name
            command = [cxx, *flags, str(source_path), "-o", str(partial)]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
            except (OSError, subprocess.SubprocessError) as error:
                return None, f"{cxx} could not run: {error}"
            if result.returncode == 0 and partial.is_file():
                os.replace(partial, target)  # atomic: another process sees the whole library or none
                logger.info("moepass: built %s in %.1f s (%s)", target, time.perf_counter() - started, " ".join(flags))
                return target, ""
            failures.append(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    return None, "; ".join(failures)


def library(name: str) -> ctypes.CDLL | None:
    """The loaded library ``csrc/<name>.cpp`` (built now if needed), or None when it cannot be had (see
    :func:`unavailable_reason`)."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        found, reason = None, ""
        if os.environ.get(NATIVE_ENV, "").lower() == "off":
            reason = f"${NATIVE_ENV}=off"
        else:
            source = SOURCES / f"{name}.cpp"
            cxx = compiler()
            if not source.is_file():
                reason = f"the source {source} is missing from this installation"
            elif cxx is None:
                reason = "no C++ compiler found (set $CXX, or install g++ or clang++)"
            else:
                path, reason = _build(name, source, cxx)
                if path is not None:
                    try:
                        found = ctypes.CDLL(str(path))
                    except OSError as error:
                        reason = f"{path} does not load: {error}"
        if found is None:
            logger.info("moepass: the native %s kernels are not available (%s); the ATen and torch paths run",
                        name, reason)
        _loaded[name], _reasons[name] = found, reason
        return found


def unavailable_reason(name: str) -> str:
    """Why :func:`library` returned None for ``name`` ("" when it loaded, or was never asked for)."""
    return _reasons.get(name, "")


def forget(name: str, reason: str) -> None:
    """Mark ``name`` unavailable for the rest of the process (a caller's check of the library failed)."""
    with _lock:
        _loaded[name], _reasons[name] = None, reason
    logger.warning("moepass: the native %s kernels are disabled: %s", name, reason)
