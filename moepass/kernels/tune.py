"""``moepass tune``: measure the best tiles of the Triton experts kernels for a model's shapes.

::

    model (zoo family | local config.json or folder | "E,H,I,K")
      └─► ExpertShape(E, H, I, top_k)
            for each token count T:                       random top-k routing, seeded
              for each BLOCK_M candidate:                 (sizes the alignment's padding)
                align once
                triton.autotune(gate_up tiles) ─► best gate/up time
                triton.autotune(down tiles)    ─► best down time
              keep the BLOCK_M with the least gate/up + down time
      └─► kernels/configs/E=..,H=..,I=..,dtype=..,device=...json   (merged with what is there)

The search uses ``triton.autotune`` with ``cache_results=True``, so Triton
keeps each kernel's timings in its on-disk cache (``TRITON_CACHE_DIR``): a
rerun (more token counts, an interrupted run) benchmarks only what it has not
seen.  Under ``TRITON_INTERPRET=1`` (no GPU) the same search runs on the
CPU with a wall-clock timer, which is only good for smoke tests on tiny
shapes: the interpreter's timings say nothing about a GPU.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import triton
from moepass.kernels._jit import interpreter_enabled
from moepass.kernels.align import slot_capacity
from moepass.kernels.config_store import (
    BLOCK_M_CHOICES,
    CONFIG_DIR,
    GemmConfig,
    MoEKernelConfig,
    config_dirs,
    config_file_name,
    device_name,
    heuristic_config,
    load_config_file,
    save_config_file,
)
from moepass.kernels.down import down_config_space, down_kernel
from moepass.kernels.gate_up import gate_up_config_space, gate_up_kernel
from moepass.kernels.launch import align_slots, check_launchable, launch_down, launch_gate_up, new_slot_rows

from moepass.compiler.spec import ExpertsSpec
from moepass.runtime.progress import progress

__all__ = [
    "ExpertShape",
    "NoTuningDeviceError",
    "resolve_shape",
    "shape_from_config",
    "tune_shape",
    "tune_to_file",
    "tune_command_lines",
    "tuning_device",
    "DTYPES",
]

logger = logging.getLogger(__name__)


class NoTuningDeviceError(ValueError):
    """Neither a GPU nor the interpreter is available to tune on."""


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ExpertShape:
    """What the tiles depend on: E experts of an H → I → H gated MLP, top-k routing."""

    num_experts: int
    hidden: int
    inter: int
    top_k: int

    def describe(self) -> str:
        """``E=8 H=4096 I=14336 top-2``."""
        return f"E={self.num_experts} H={self.hidden} I={self.inter} top-{self.top_k}"


def shape_from_config(config: Any) -> ExpertShape:
    """The routed experts' shape from a transformers config (MoE attribute names of the
    common families: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, gpt-oss, Llama 4, Granite)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names: str) -> Any:
        for name in names:
            value = getattr(config, name, None)
            if value:
                return value
        raise ValueError(f"{type(config).__name__} has none of {names}: not a MoE config?")

    return ExpertShape(
        num_experts=int(first("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")),
        hidden=int(first("hidden_size")),
        inter=int(first("moe_intermediate_size", "intermediate_size")),
        top_k=int(first("num_experts_per_tok", "moe_topk", "top_k")),
    )


def resolve_shape(model: str) -> ExpertShape:
    """``model`` as "E,H,I,K", a local config.json or model folder, or a moepass.zoo family
    (``zoo:mixtral`` or ``mixtral``), the model specs of ``moepass inspect`` that carry a config.

    Nothing is downloaded: hub names are not accepted.
    """
    if re.fullmatch(r"\d+,\d+,\d+,\d+", model):
        num_experts, hidden, inter, top_k = (int(v) for v in model.split(","))
        return ExpertShape(num_experts, hidden, inter, top_k)
    if Path(model).exists():
        from transformers import AutoConfig

        return shape_from_config(AutoConfig.from_pretrained(model))
    from moepass.zoo import FAMILIES, tiny_config

    family = model.removeprefix("zoo:")
    if family in FAMILIES:
        return shape_from_config(tiny_config(family))
    raise ValueError(
        f"{model!r} is not E,H,I,K, a local config.json or model folder, or a zoo family "
        f"(zoo:{', zoo:'.join(FAMILIES)})"
    )


def _interpreter_bench(fn: Callable[[], object], quantiles: Sequence[float] | None = None, repeat: int = 2) -> list[float]:
    """Wall-clock milliseconds (median of ``repeat`` after one warm-up), shaped like do_bench's answer."""
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
    median = statistics.median(samples)
    return [median] * len(quantiles) if quantiles else median


def _gpu_bench(fn: Callable[[], object], quantiles: Sequence[float] | None = None) -> list[float]:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(quantiles) if quantiles else None)


def _problem(shape: ExpertShape, tokens: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Random experts inputs with softmax top-k routing (balanced on average)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    e, h, i, k = shape.num_experts, shape.hidden, shape.inter, shape.top_k
    x = torch.randn(tokens, h, generator=g).to(device=device, dtype=dtype)
    scores = torch.randn(tokens, e, generator=g).softmax(dim=-1)
    weights, ids = scores.topk(k, dim=-1)
    w1 = (torch.randn(e, 2 * i, h, generator=g) * h**-0.5).to(device=device, dtype=dtype)
    w2 = (torch.randn(e, h, i, generator=g) * i**-0.5).to(device=device, dtype=dtype)
    return x, ids.to(device), weights.to(device=device, dtype=torch.float32), w1, w2


def _block_m_candidates(shape: ExpertShape, tokens: int, quick: bool, dtype: torch.dtype) -> list[int]:
    """BLOCK_M values worth trying: up to twice the expected rows per expert."""
    if quick:
        return [heuristic_config(tokens, shape.top_k, shape.num_experts, shape.hidden, shape.inter, dtype).BLOCK_M]
    rows = tokens * shape.top_k / shape.num_experts
    return [bm for bm in BLOCK_M_CHOICES if bm == BLOCK_M_CHOICES[0] or bm <= 2 * rows]


def _autotuner(kernel, configs: list[dict[str, int]], bench):
    tiles = [
        triton.Config({n: c[n] for n in ("BLOCK_N", "BLOCK_K", "GROUP_M")}, num_warps=c["num_warps"], num_stages=c["num_stages"])
        for c in configs
    ]
    key = ["capacity", "hidden", "inter", "BLOCK_M"]
    return triton.autotune(configs=tiles, key=key, cache_results=True, do_bench=bench)(kernel.current())


def _search(kernel, space: list[dict[str, int]], bench, launch: Callable[[Any, GemmConfig | None], None]) -> tuple[GemmConfig, float]:
    """Autotune ``kernel`` over ``space`` through ``launch(kernel, tile)``; the best tile and its ms."""
    tuner = _autotuner(kernel, space, bench)
    launch(tuner, None)
    best = tuner.best_config
    tile = GemmConfig(
        BLOCK_N=best.kwargs["BLOCK_N"],
        BLOCK_K=best.kwargs["BLOCK_K"],
        GROUP_M=best.kwargs["GROUP_M"],
        num_warps=best.num_warps,
        num_stages=best.num_stages,
    )
    timing = (getattr(tuner, "configs_timings", None) or {}).get(best)
    if timing is None:  # a single candidate: the autotuner ran it without timing it
        timing = bench(lambda: launch(kernel, tile), quantiles=(0.5, 0.2, 0.8))
    return tile, float(timing[0] if isinstance(timing, (list, tuple)) else timing)


def tune_shape(
    shape: ExpertShape,
    token_counts: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    quick: bool = False,
    seed: int = 0,
) -> tuple[dict[int, MoEKernelConfig], dict[int, dict[str, float]]]:
    """Best config per token count, and its measured milliseconds (gate/up, down)."""
    check_launchable(device)
    bench = _interpreter_bench if interpreter_enabled() else _gpu_bench
    spec = ExpertsSpec(
        dispatch="grouped_mm", num_experts=shape.num_experts, hidden_size=shape.hidden, intermediate_size=shape.inter
    )
    element_bytes = torch.empty((), dtype=dtype).element_size()
    plan = [(t, bm) for t in token_counts for bm in _block_m_candidates(shape, t, quick, dtype)]
    results: dict[int, tuple[float, MoEKernelConfig, dict[str, float]]] = {}
    problems: dict[int, tuple] = {}
    for tokens, block_m in progress(plan, f"tuning {shape.describe()} {str(dtype)[6:]}"):
        if tokens not in problems:
            problems = {tokens: _problem(shape, tokens, dtype, device, seed)}
        x, ids, weights, w1, w2 = problems[tokens]
        alignment = align_slots(ids, shape.num_experts, block_m)
        capacity = slot_capacity(ids.numel(), shape.num_experts, block_m)
        h = torch.empty(capacity, shape.inter, dtype=dtype, device=device)
        y = new_slot_rows(tokens, shape.top_k, shape.hidden, dtype, device)

        gate_up_tile, gate_up_ms = _search(
            gate_up_kernel,
            gate_up_config_space(block_m, shape.hidden, shape.inter, element_bytes, gated=True, quick=quick),
            bench,
            lambda kernel, tile: launch_gate_up(x, weights, *alignment, w1, None, h, spec, block_m, tile, kernel=kernel),
        )
        down_tile, down_ms = _search(
            down_kernel,
            down_config_space(block_m, shape.hidden, shape.inter, element_bytes, quick=quick),
            bench,
            lambda kernel, tile: launch_down(h, weights, *alignment, w2, None, y, spec, block_m, tile, kernel=kernel),
        )
        total = gate_up_ms + down_ms
        logger.info("T=%d BLOCK_M=%d: gate/up %.4f ms, down %.4f ms", tokens, block_m, gate_up_ms, down_ms)
        if tokens not in results or total < results[tokens][0]:
            config = MoEKernelConfig(BLOCK_M=block_m, gate_up=gate_up_tile, down=down_tile)
            results[tokens] = (total, config, {"gate_up_ms": round(gate_up_ms, 5), "down_ms": round(down_ms, 5)})
    table = {t: results[t][1] for t in sorted(results)}
    timings = {t: results[t][2] for t in sorted(results)}
    return table, timings


def default_output_dir() -> Path:
    """Where tuned files go unless told: the first ``$MOEPASS_TRITON_CONFIG_DIR`` folder, else
    the packaged configs/ folder."""
    return config_dirs()[0] if len(config_dirs()) > 1 else CONFIG_DIR


def tuning_device() -> torch.device:
    """The GPU, or the CPU under ``TRITON_INTERPRET=1``; :class:`NoTuningDeviceError` otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if interpreter_enabled():
        return torch.device("cpu")
    raise NoTuningDeviceError("moepass tune needs a CUDA GPU (or TRITON_INTERPRET=1 for a smoke run of tiny shapes on the CPU)")


def tune_to_file(
    shape: ExpertShape,
    token_counts: Sequence[int],
    dtype: torch.dtype,
    device: torch.device | None = None,
    out_dir: Path | None = None,
    quick: bool = False,
) -> tuple[Path, dict[int, MoEKernelConfig], dict[int, dict[str, float]]]:
    """Tune ``shape`` and write (merging with an existing file) its tuned-config JSON."""
    device = torch.device(device) if device is not None else tuning_device()
    table, timings = tune_shape(shape, token_counts, dtype, device, quick=quick)
    path = Path(out_dir or default_output_dir()) / config_file_name(
        shape.num_experts, shape.hidden, shape.inter, dtype, device_name(device)
    )
    merged, extra = _existing_entries(path)
    merged.update(table)
    extra.update(timings)
    meta = {
        "num_experts": shape.num_experts,
        "hidden": shape.hidden,
        "inter": shape.inter,
        "top_k": shape.top_k,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device_name(device),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "tuned": date.today().isoformat(),
        "space": "quick" if quick else "full",
        "interpreter": interpreter_enabled(),
    }
    save_config_file(path, meta, merged, extra=extra)
    return path, table, timings


def _existing_entries(path: Path) -> tuple[dict[int, MoEKernelConfig], dict[int, dict[str, Any]]]:
    """The configs of a tuned file already at ``path`` and their extra fields (timings), to merge into."""
    if not path.is_file():
        return {}, {}
    table = load_config_file(path)
    raw = json.loads(path.read_text())["configs"]
    known = set(MoEKernelConfig(16, GemmConfig(16, 16), GemmConfig(16, 16)).to_dict())
    extra = {int(t): {k: v for k, v in entry.items() if k not in known} for t, entry in raw.items()}
    return table, extra


def tune_command_lines(
    model: str, token_counts: Sequence[int], dtype: str, out_dir: str | None, quick: bool
) -> Iterator[str]:
    """The ``moepass tune`` command: yields the lines it reports as it goes."""
    shape = resolve_shape(model)
    device = tuning_device()
    yield f"tuning the Triton experts kernels for {shape.describe()}, {dtype}, tokens {list(token_counts)}"
    path, table, timings = tune_to_file(
        shape, token_counts, DTYPES[dtype], device, out_dir=Path(out_dir) if out_dir else None, quick=quick
    )
    for tokens, config in table.items():
        ms = timings[tokens]
        yield (
            f"  T={tokens:<6} BLOCK_M={config.BLOCK_M:<4} gate/up {ms['gate_up_ms']:.4f} ms"
            f"  down {ms['down_ms']:.4f} ms"
        )
    yield f"wrote {path}"
