"""Compile MLIR with IREE for the CPU (``llvm-cpu``) and run it: how the MLIR export is verified.

::

    MLIR text (linalg-on-tensors | stablehlo | tosa) ─► iree.compiler.compile_str(target llvm-cpu) ─► vmfb
    vmfb ─► iree.runtime.load_vm_flatbuffer(driver "local-task") ─► module.main(*numpy arrays)
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

__all__ = ["IREE_INPUT_TYPES", "IreeCompileError", "IreeModule", "compile_for_cpu"]

logger = logging.getLogger(__name__)

#: IREE's --iree-input-type for each output type torch-mlir produces.
IREE_INPUT_TYPES = {"linalg-on-tensors": "auto", "stablehlo": "stablehlo", "tosa": "tosa"}


class IreeCompileError(Exception):
    """IREE could not compile the module; the message is its first error lines."""


def compile_for_cpu(text: str, output_type: str, cpu: str = "host", extra_args: Sequence[str] = ()) -> bytes:
    """IREE bytecode (vmfb) of ``text`` for this machine's CPU.

    Args:
        text: the MLIR module.
        output_type: the torch-mlir output type it is in (selects IREE's input type).
        cpu: ``--iree-llvmcpu-target-cpu`` (``host``: this CPU's features; ``generic`` runs anywhere).
        extra_args: further iree-compile flags.
    """
    import iree.compiler as compiler

    started = time.perf_counter()
    try:
        vmfb = compiler.compile_str(
            text,
            target_backends=["llvm-cpu"],
            input_type=IREE_INPUT_TYPES.get(output_type, "auto"),
            extra_args=[f"--iree-llvmcpu-target-cpu={cpu}", *extra_args],
        )
    except compiler.CompilerToolError as error:
        lines = [line for line in str(error).splitlines() if "error:" in line]
        raise IreeCompileError(" | ".join(lines[:3]) or str(error).strip().splitlines()[0]) from None
    logger.info("IREE compiled %d bytes of MLIR for llvm-cpu in %.1f s", len(text), time.perf_counter() - started)
    return vmfb


class IreeModule:
    """A compiled module, callable on numpy arrays; returns a list of numpy arrays."""

    def __init__(self, vmfb: bytes, func_name: str = "main", driver: str = "local-task"):
        import iree.runtime as runtime

        self.vmfb = vmfb
        self._module = runtime.load_vm_flatbuffer(vmfb, driver=driver)
        self._function = getattr(self._module, func_name)

    def __call__(self, *args: np.ndarray) -> list[np.ndarray]:
        results = self._function(*[np.ascontiguousarray(a) for a in args])
        if not isinstance(results, (tuple, list)):
            results = (results,)
        return [np.asarray(r.to_host() if hasattr(r, "to_host") else r) for r in results]
