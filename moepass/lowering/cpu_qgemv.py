"""Native quantized projections for few rows: every expert a call hits, in one call, on the portable layout.

::

    xs [S, K] (rows sorted by expert)     tasks [3, n] int64: (expert, first row, rows) per expert hit
    codes/scales/zeros [E, N, …]           the plain layout of moepass.quantize.layout, as stored
        ──► moepass_qgemv (csrc/qgemv.cpp)  out[rows of task i] = xs[rows of task i] · deq(W[expert i])ᵀ (+ b)
                                            output rows split over torch's threads, float32 accumulation
    x [T, H], ids, weights  ──► moepass_qmoe  the whole experts op for a few tokens (:func:`fused_experts`)
    one expert's codes      ──► moepass_dequantize_int4 / _int8   (prefill: dequantize, then a float GEMM)

The kernel reads the bytes the expert store and the exports hold (no
repacking, no second copy), so the plain form serves it, the ONNX exports and
offloading alike.  On a CPU with AVX-512 BF16 and bfloat16 activations an int4
projection streams 128 codes per step: one ``vpermw`` per 32 nibbles turns
codes into bfloat16 and ``vdpbf16ps`` multiplies them with the activations;
AVX2 machines and other activation dtypes take a float32 FMA path, anything
else portable C++.  Products of integer codes and activations are exact in
float32, so results differ from ``x · deq(W)ᵀ`` in float32 by summation order
only (checked to 1e-5 relative when the library loads, on every path this CPU
runs; a library that disagrees is not used).

For a decode step the op's own Python (planning rows, gathering, two kernel
calls, the activation, the weighted sum: ~0.25 ms on the 2-core EPYC) cost
as much as the GEMVs themselves, so :func:`fused_experts` runs all of it in
one call (20–40 µs around the kernels).  Dequantizing for prefill builds each
group's 16 possible values ``(q − z)·s`` once and looks every code up (one
``vpermw`` per 32 codes on AVX-512): a 5632×1024 expert in 0.14 ms to
bfloat16, against 5 ms for the scalar loop it replaced.

:func:`available` is False, and the ATen / torch paths run, when the library
cannot be built or loaded (:mod:`moepass.lowering.native`) or failed its
check.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import numpy as np
import torch

from moepass.lowering import native
from moepass.quantize.scheme import QuantScheme

__all__ = [
    "LIBRARY", "PATHS", "DTYPES", "available", "unavailable_reason", "supports", "best_path", "project", "expert_tasks",
    "dequantize_int4", "dequantize_int8", "FUSED_ACTIVATIONS", "fused_experts", "flush_caches",
]

logger = logging.getLogger(__name__)

LIBRARY = "qgemv"
#: The kernel's paths by number (csrc/qgemv.cpp): what :func:`best_path` returns and ``path=`` asks for.
PATHS = {0: "portable", 1: "avx2", 2: "avx512_bf16"}
#: Activation / output dtypes the kernels take, with their codes in csrc/qgemv.cpp.
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_ready: list = []  # [the checked CDLL] once checked; [None] when unavailable


def _bind(lib: ctypes.CDLL) -> None:
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.moepass_qgemv.restype = i32
    lib.moepass_qgemv.argtypes = [i32, i32, i32, ptr, i32, i64, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, i64, ptr, i64,
                                  ptr, i32, i64, ptr, i32, i64, i32]
    lib.moepass_qgemv_isa.restype = i32
    lib.moepass_qgemv_isa.argtypes = []
    lib.moepass_qgemv_openmp.restype = i32
    lib.moepass_dequantize_int4.restype = None
    lib.moepass_dequantize_int4.argtypes = [ptr, ptr, ptr, i64, i64, i32, ptr, i32, i32, i32]
    lib.moepass_qmoe.restype = i32
    lib.moepass_qmoe.argtypes = [i32, i32, i32, ptr, i32, i64, i64, ptr, i64, ptr, i32, i64, i32,
                                 ptr, i64, ptr, i64, ptr, i64, ptr, i32, i64,
                                 ptr, i64, ptr, i64, ptr, i64, ptr, i32, i64,
                                 i64, ptr, ptr, i32]
    lib.moepass_flush.restype = i32
    lib.moepass_flush.argtypes = [ptr, i64]
    lib.moepass_dequantize_int8.restype = None
    lib.moepass_dequantize_int8.argtypes = [ptr, ptr, i64, i64, ptr, i32, i32, i32]


def _library() -> ctypes.CDLL | None:
    if _ready:
        return _ready[0]
    with _lock:
        if not _ready:
            lib = native.library(LIBRARY)
            if lib is not None:
                try:
                    _bind(lib)
                    failure = _self_check(lib)
                except (AttributeError, OSError, RuntimeError) as error:
                    failure = f"{type(error).__name__}: {error}"
                if failure:
                    native.forget(LIBRARY, failure)
                    lib = None
                elif not lib.moepass_qgemv_openmp():
                    logger.info("moepass: the native %s kernels were built without OpenMP: one thread", LIBRARY)
            _ready.append(lib)
    return _ready[0]


def available() -> bool:
    """Whether the native kernels run in this process (built, loaded and checked)."""
    return _library() is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True)."""
    return "" if available() else native.unavailable_reason(LIBRARY) or "not loaded"


def best_path() -> int:
    """The fastest path this CPU runs (a key of :data:`PATHS`); -1 when the kernels are unavailable."""
    lib = _library()
    return -1 if lib is None else int(lib.moepass_qgemv_isa())


def supports(scheme: QuantScheme, in_features: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this scheme, input width and activation dtype (availability aside)."""
    if dtype not in DTYPES:
        return False
    if scheme.bits == 8:
        return scheme.group_size in (0, in_features)
    group = scheme.group_of(in_features)
    return in_features % 2 == 0 and group > 0 and in_features % group == 0


def expert_tasks(counts: list[int]) -> np.ndarray:
    """int64 [3, n]: (expert, first row, rows) of each expert with rows, from rows per expert (sorted rows)."""
    counts_array = np.asarray(counts, dtype=np.int64)
    experts = np.flatnonzero(counts_array)
    starts = np.cumsum(counts_array) - counts_array
    return np.ascontiguousarray(np.stack([experts, starts[experts], counts_array[experts]]))


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def project(inputs: torch.Tensor, outputs: torch.Tensor, tasks: np.ndarray, operands: list[torch.Tensor],
            bias: torch.Tensor | None, scheme: QuantScheme, path: int = -1, threads: int | None = None) -> None:
    """``outputs[rows] = inputs[rows] · deq(W[expert])ᵀ (+ bias[expert])`` for every task of ``tasks``
    (:func:`expert_tasks`).

    ``inputs`` [S, K] and ``outputs`` [S, N] contiguous (any of float32,
    bfloat16, float16; outputs may differ from inputs, e.g. float32 to keep
    the accumulation); ``operands`` the plain layout ``[codes, scales(, zeros)]``
    [E, N, …]; ``bias`` [E, N] or None; ``path`` -1 for the fastest, or a
    lower one of :data:`PATHS` (tests).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native quantized kernels are not available: {unavailable_reason()}")
    _project(lib, inputs, outputs, tasks, operands, bias, scheme, path, threads)


def _project(lib, inputs, outputs, tasks, operands, bias, scheme, path, threads) -> None:
    codes, scales = operands[0], operands[1]
    zeros = operands[2] if len(operands) > 2 else None
    experts, out_features, width = codes.shape
    in_features = inputs.shape[1]
    if not (inputs.is_contiguous() and outputs.is_contiguous() and codes.is_contiguous() and scales.is_contiguous()
            and (zeros is None or zeros.is_contiguous()) and (bias is None or bias.is_contiguous())):
        raise ValueError("the native quantized kernels take contiguous tensors")
    groups = in_features // scheme.group_of(in_features) if scheme.bits == 4 else 1
    scale_shape = [experts, out_features, groups]  # int8: one per output channel, [E, N, 1] (or [E, N])
    if (outputs.shape[1] != out_features or outputs.shape[0] < inputs.shape[0]
            or width * (2 if scheme.bits == 4 else 1) != in_features
            or list(scales.shape) not in (scale_shape, scale_shape[:2] if scheme.bits == 8 else scale_shape)
            or (zeros is not None and list(zeros.shape) != scale_shape)
            or (bias is not None and list(bias.shape) != [experts, out_features])):
        raise ValueError(f"shapes do not match: inputs {list(inputs.shape)}, outputs {list(outputs.shape)}, codes "
                         f"{list(codes.shape)}, scales {list(scales.shape)} ({scheme.describe()})")
    if (codes.dtype != (torch.uint8 if scheme.bits == 4 else torch.int8) or scales.dtype != torch.float32
            or (zeros is not None and zeros.dtype != torch.uint8) or inputs.dtype not in DTYPES
            or outputs.dtype not in DTYPES or (bias is not None and bias.dtype not in DTYPES)):
        raise ValueError(f"the native quantized kernels take the plain layout's dtypes ({scheme.describe()}): codes "
                         f"{codes.dtype}, scales {scales.dtype}, inputs {inputs.dtype}, outputs {outputs.dtype}")
    tasks = np.ascontiguousarray(tasks, dtype=np.int64)
    if tasks.ndim != 2 or tasks.shape[0] != 3:
        raise ValueError(f"tasks must be int64 [3, n] (expert, first row, rows), got shape {tasks.shape}")
    if tasks.shape[1] and (tasks[0].min() < 0 or tasks[0].max() >= experts or tasks[1].min() < 0
                           or tasks[2].min() < 0 or (tasks[1] + tasks[2]).max() > inputs.shape[0]):
        raise ValueError(f"tasks out of range for {experts} experts and {inputs.shape[0]} rows")
    status = lib.moepass_qgemv(
        scheme.bits, scheme.group_of(in_features), path, inputs.data_ptr(), DTYPES[inputs.dtype], inputs.shape[0],
        in_features, tasks.ctypes.data, tasks.ctypes.data + 8 * tasks.shape[1],
        tasks.ctypes.data + 16 * tasks.shape[1], tasks.shape[1],
        codes.data_ptr(), codes.stride(0), scales.data_ptr(), scales.stride(0),
        _address(zeros), 0 if zeros is None else zeros.stride(0),
        _address(bias), DTYPES[bias.dtype] if bias is not None else 0, 0 if bias is None else bias.stride(0),
        outputs.data_ptr(), DTYPES[outputs.dtype], out_features,
        torch.get_num_threads() if threads is None else threads,
    )
    if status:
        raise ValueError(f"the native quantized kernel refused {scheme.describe()} with {in_features} input "
                         f"features (code {status})")


#: The expert MLPs :func:`fused_experts` runs: (activation, gate/up layout) → the kernel's code.
FUSED_ACTIVATIONS = {("silu", "concat"): 0, ("silu", "interleaved"): 1}


def fused_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: list[torch.Tensor],
                  w2: list[torch.Tensor], b1: torch.Tensor | None, b2: torch.Tensor | None, scheme: QuantScheme,
                  activation: tuple[str, str], counts: np.ndarray | None = None) -> torch.Tensor:
    """The whole quantized experts op for a few tokens in one native call: out [T, H] in x's dtype.

    Routing rows to experts, both projections (the native kernel, float32
    outputs), ``silu(gate)·up`` and the weighted sum run without returning to
    Python in between — for one decode token the op's own Python costs more
    than its GEMVs.  ``w1``/``w2`` are the plain layout's operands ([E, 2I, H]
    and [E, H, I]); ``activation`` a key of :data:`FUSED_ACTIVATIONS`;
    ``counts`` (int64 [E], optional) receives each expert's rows.  The caller
    checks the operands (:func:`moepass.lowering.cpu_quantized.fused_decode_usable`).
    """
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native quantized kernels are not available: {unavailable_reason()}")
    tokens, hidden = x.shape
    slots = ids.shape[1]
    experts, _, inner = w2[0].shape
    inner *= 2 if scheme.bits == 4 else 1
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    out = torch.empty_like(x)
    first_zeros = w1[2] if len(w1) > 2 else None
    second_zeros = w2[2] if len(w2) > 2 else None
    status = lib.moepass_qmoe(
        scheme.bits, scheme.group_of(hidden), -1, x.data_ptr(), DTYPES[x.dtype], tokens, hidden, ids.data_ptr(),
        slots, weights.data_ptr(), DTYPES[weights.dtype], experts, FUSED_ACTIVATIONS[activation],
        w1[0].data_ptr(), w1[0].stride(0), w1[1].data_ptr(), w1[1].stride(0), _address(first_zeros),
        0 if first_zeros is None else first_zeros.stride(0), _address(b1), DTYPES[b1.dtype] if b1 is not None else 0,
        0 if b1 is None else b1.stride(0),
        w2[0].data_ptr(), w2[0].stride(0), w2[1].data_ptr(), w2[1].stride(0), _address(second_zeros),
        0 if second_zeros is None else second_zeros.stride(0), _address(b2), DTYPES[b2.dtype] if b2 is not None else 0,
        0 if b2 is None else b2.stride(0),
        inner, out.data_ptr(), None if counts is None else counts.ctypes.data, torch.get_num_threads(),
    )
    if status:
        raise ValueError(f"the native quantized kernel refused {scheme.describe()} with {hidden} input features "
                         f"(code {status})")
    return out


def flush_caches(tensors: list[torch.Tensor]) -> bool:
    """Evict the CPU tensors' bytes from every cache level (``clflush``), so that the next read comes from
    memory; False (nothing done) where the library is unavailable or the CPU has no such instruction."""
    lib = _library()
    if lib is None:
        return False
    done = True
    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.numel():
            done = bool(lib.moepass_flush(tensor.data_ptr(), tensor.numel() * tensor.element_size())) and done
    return done


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                    dtype: torch.dtype, out: torch.Tensor | None = None, path: int = -1) -> torch.Tensor:
    """One expert's int4 weights [N, K] = (q − z)·s in ``dtype``, from its plain codes [N, K/2], scales and
    zero points [N, K/G] (computed in float32, then rounded once; ``path`` as :func:`project`'s)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native quantized kernels are not available: {unavailable_reason()}")
    rows, half = codes.shape
    out = torch.empty(rows, 2 * half, dtype=dtype) if out is None else out
    codes, scales = codes.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    if (group <= 0 or (2 * half) % group or list(scales.shape) != [rows, 2 * half // group]
            or (zeros is not None and list(zeros.shape) != list(scales.shape)) or codes.dtype != torch.uint8
            or scales.dtype != torch.float32 or (zeros is not None and zeros.dtype != torch.uint8)
            or dtype not in DTYPES or out.dtype != dtype or list(out.shape) != [rows, 2 * half]
            or not out.is_contiguous()):
        raise ValueError(f"dequantize_int4: codes {list(codes.shape)} {codes.dtype}, scales {list(scales.shape)} "
                         f"{scales.dtype}, group {group}, out {list(out.shape)} {out.dtype} do not fit")
    lib.moepass_dequantize_int4(codes.data_ptr(), scales.data_ptr(), _address(zeros), rows, 2 * half, group,
                                out.data_ptr(), DTYPES[dtype], torch.get_num_threads(), path)
    return out


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                    out: torch.Tensor | None = None, path: int = -1) -> torch.Tensor:
    """One expert's int8 weights [N, K] = q·s in ``dtype``, from its plain codes [N, K] and per-output-channel
    scales [N] (or [N, 1]) (computed in float32, then rounded once; ``path`` as :func:`project`'s)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native quantized kernels are not available: {unavailable_reason()}")
    rows, columns = codes.shape
    out = torch.empty(rows, columns, dtype=dtype) if out is None else out
    codes, scales = codes.contiguous(), scales.contiguous()
    if (codes.dtype != torch.int8 or scales.dtype != torch.float32 or scales.numel() != rows
            or dtype not in DTYPES or out.dtype != dtype or list(out.shape) != [rows, columns]
            or not out.is_contiguous()):
        raise ValueError(f"dequantize_int8: codes {list(codes.shape)} {codes.dtype}, scales {list(scales.shape)} "
                         f"{scales.dtype}, out {list(out.shape)} {out.dtype} do not fit")
    lib.moepass_dequantize_int8(codes.data_ptr(), scales.data_ptr(), rows, columns, out.data_ptr(), DTYPES[dtype],
                                torch.get_num_threads(), path)
    return out


def _self_check(lib: ctypes.CDLL) -> str:
    """"" when every path this CPU runs matches the dequantized reference on small problems, else what did not."""
    from moepass.quantize.layout import dequantize, quantize_rtn
    from moepass.quantize.scheme import parse_scheme

    generator = torch.Generator().manual_seed(0)
    best = int(lib.moepass_qgemv_isa())
    for scheme, (out_features, in_features) in ((parse_scheme("int4", 32), (20, 160)),
                                                (parse_scheme("int8"), (12, 70))):
        layout = quantize_rtn(torch.randn(2, out_features, in_features, generator=generator), scheme)
        operands = list(layout.tensors().values())
        reference_weights = dequantize(layout)
        tasks = expert_tasks([2, 3])
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(5, in_features, generator=generator).to(dtype)
            expected = torch.cat([x[:2].float() @ reference_weights[0].T, x[2:].float() @ reference_weights[1].T])
            for path in range(best + 1):
                out = torch.full((5, out_features), float("nan"))
                _project(lib, x, out, tasks, operands, None, scheme, path, 2)
                error = float((out - expected).abs().max() / expected.abs().max())
                if not error <= 1e-5:
                    return (f"its {PATHS.get(path, path)} path differs from the dequantized reference by {error:.1e} "
                            f"({scheme.describe()}, {str(dtype).removeprefix('torch.')})")
    return ""

