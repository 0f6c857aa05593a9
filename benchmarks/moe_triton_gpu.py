"""The Triton experts kernels on a GPU against transformers' experts, with roofline fractions.

Shapes, bfloat16, tokens {1, 16, 128, 1024, 4096}:

* Mixtral-8x7B: hidden 4096, intermediate 14336, 8 experts, top-2;
* Qwen-MoE-like (Qwen1.5-MoE-A2.7B): hidden 2048, intermediate 1408, 60 experts, top-4.

For each, in one run: transformers ``eager`` experts (a loop over the experts
hit), transformers ``grouped_mm`` experts (``torch._grouped_mm``), moepass's
Triton lowering with the model's own top-k (static) and with adaptive routing
(slot 0 always kept, every later slot dropped, id set to E, with probability
0.6: average k 1.4 of 2 for Mixtral, 2.2 of 4 for Qwen).  It measures the
GPU's HBM bandwidth (a 1 GiB read and copy) and bf16 GEMM rate (8192³
``torch.mm``) and reports

* speed against grouped_mm (target ≥ 1.2× at every size);
* % of the bandwidth floor: bytes of the experts the tokens hit (plus
  activations) ÷ measured bandwidth, ÷ time (target ≥ 70% at 1–16 tokens);
* % of the GEMM rate: FLOPs of the non-empty slots ÷ measured rate, ÷ time
  (target ≥ 60% at 4096 tokens);
* adaptive ÷ ideal, ideal = (k_avg / k) × static time (target ≤ 1.15).

Tile configs come from moepass/kernels/configs/ (run ``moepass tune`` first on a new
GPU; the table says whether configs were tuned or heuristic).  Without CUDA
it prints that it needs a GPU and exits 0.  ``--smoke`` runs tiny shapes on
the CPU under TRITON_INTERPRET=1, to check the script itself, and writes
nothing.

Usage: python benchmarks/moe_triton_gpu.py [--tokens 1 16 128 1024 4096] [--shapes mixtral qwen] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
from _common import markdown_table, time_it, today, write_section


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    hidden: int
    inter: int
    top_k: int


SHAPES = {
    "mixtral": Shape("Mixtral-8x7B", 8, 4096, 14336, 2),
    "qwen": Shape("Qwen-MoE-like", 60, 2048, 1408, 4),
}
SMOKE_SHAPES = {"mixtral": Shape("tiny Mixtral", 8, 64, 96, 2), "qwen": Shape("tiny Qwen-like", 12, 48, 40, 4)}
DROP_PROBABILITY = 0.6


def timer(device: torch.device):
    """Median milliseconds of a call: triton's do_bench on a GPU (L2 flushed between runs)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=200))
    return lambda fn: time_it(fn, repeat=3, warmup=1) * 1e3


def hbm_bandwidth(device: torch.device, measure) -> float:
    """Bytes/s: the better of a 1 GiB read (sum) and a 1 GiB copy counted as read + write."""
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    read = nbytes / (measure(lambda: src.sum(dtype=torch.float32)) / 1e3)
    copy = 2 * nbytes / (measure(lambda: dst.copy_(src)) / 1e3)
    src = dst = None  # free the buffers
    return max(read, copy)


def gemm_rate(device: torch.device, measure, size: int = 8192) -> float:
    """FLOP/s of a bf16 [size, size] @ [size, size]."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return 2 * size**3 / (measure(lambda: a @ b) / 1e3)


def routing(tokens: int, shape: Shape, device: torch.device, generator: torch.Generator):
    """Static top-k ids/weights (softmax, renormalised) and the adaptive variant."""
    scores = torch.randn(tokens, shape.num_experts, generator=generator).softmax(dim=-1)
    weights, ids = scores.topk(shape.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    drop = torch.rand(tokens, shape.top_k, generator=generator) < DROP_PROBABILITY
    drop[:, 0] = False
    adaptive_ids = ids.masked_fill(drop, shape.num_experts)
    adaptive_weights = weights.masked_fill(drop, 0.0)
    adaptive_weights = adaptive_weights / adaptive_weights.sum(dim=-1, keepdim=True)
    return ids.to(device), weights.to(device), adaptive_ids.to(device), adaptive_weights.to(device)


def transformers_experts(shape: Shape, impl: str, w1: torch.Tensor, w2: torch.Tensor) -> torch.nn.Module:
    """transformers' Mixtral experts module (same computation for both shapes) holding w1, w2 (no copy)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.inter,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        experts_implementation=impl,
    )
    with torch.device("meta"):
        module = MixtralExperts(config)
    module.gate_up_proj = torch.nn.Parameter(w1, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w2, requires_grad=False)
    return module.eval()


def bytes_and_flops(shape: Shape, ids: torch.Tensor, tokens: int, element_bytes: int) -> tuple[int, int]:
    """Bytes the experts hit must move (weights + activations) and FLOPs of the non-empty slots."""
    valid = ids[ids < shape.num_experts]
    experts_hit = int(valid.unique().numel())
    per_expert = 3 * shape.hidden * shape.inter * element_bytes
    activations = 2 * tokens * shape.hidden * element_bytes
    flops = 2 * int(valid.numel()) * 3 * shape.hidden * shape.inter
    return experts_hit * per_expert + activations, flops


def tuned_or_heuristic(shape: Shape, dtype: torch.dtype, device: torch.device) -> str:
    from moepass.kernels.config_store import config_dirs, config_file_name, device_name

    name = config_file_name(shape.num_experts, shape.hidden, shape.inter, dtype, device_name(device))
    return "tuned" if any((folder / name).is_file() for folder in config_dirs()) else "heuristic (untuned)"


def run_shape(shape: Shape, token_counts, dtype, device, measure, bandwidth: float, rate: float):
    from moepass.lowering.triton import experts_forward

    from moepass.compiler.spec import ExpertsSpec

    generator = torch.Generator().manual_seed(0)
    w1 = (torch.randn(shape.num_experts, 2 * shape.inter, shape.hidden, generator=generator) * shape.hidden**-0.5).to(device, dtype)
    w2 = (torch.randn(shape.num_experts, shape.hidden, shape.inter, generator=generator) * shape.inter**-0.5).to(device, dtype)
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=shape.num_experts, hidden_size=shape.hidden, intermediate_size=shape.inter)
    eager = transformers_experts(shape, "eager", w1, w2)
    grouped = transformers_experts(shape, "grouped_mm", w1, w2)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, shape.hidden, generator=generator).to(device, dtype)
        ids, weights, adaptive_ids, adaptive_weights = routing(tokens, shape, device, generator)
        weights, adaptive_weights = weights.to(dtype), adaptive_weights.to(dtype)
        k_avg = float((adaptive_ids < shape.num_experts).sum()) / tokens
        with torch.no_grad():
            reference = grouped(x, ids, weights)
            static = experts_forward(x, ids, weights, w1, w2, None, None, spec)
            error = float((static.float() - reference.float()).abs().max() / reference.float().abs().max())
            times = {
                "eager": measure(lambda: eager(x, ids, weights)),
                "grouped_mm": measure(lambda: grouped(x, ids, weights)),
                "static": measure(lambda: experts_forward(x, ids, weights, w1, w2, None, None, spec)),
                "adaptive": measure(lambda: experts_forward(x, adaptive_ids, adaptive_weights, w1, w2, None, None, spec)),
            }
        nbytes, flops = bytes_and_flops(shape, ids, tokens, element_bytes)
        static_s = times["static"] / 1e3
        ideal = k_avg / shape.top_k * times["static"]
        row = dict(
            tokens=tokens,
            error=error,
            k_avg=k_avg,
            **{f"{name}_ms": ms for name, ms in times.items()},
            speedup=times["grouped_mm"] / times["static"],
            adaptive_speedup=times["grouped_mm"] / times["adaptive"],
            bandwidth_fraction=nbytes / bandwidth / static_s,
            gemm_fraction=flops / rate / static_s,
            adaptive_over_ideal=times["adaptive"] / ideal,
        )
        rows.append(row)
        print(
            f"{shape.name:14s} T={tokens:<5d} eager {times['eager']:8.3f} ms  grouped_mm {times['grouped_mm']:8.3f} ms  "
            f"moepass {times['static']:8.3f} ms ({row['speedup']:.2f}×)  adaptive k={k_avg:.2f} {times['adaptive']:8.3f} ms "
            f"({row['adaptive_over_ideal']:.2f}× ideal)  BW {100 * row['bandwidth_fraction']:.0f}%  "
            f"GEMM {100 * row['gemm_fraction']:.0f}%  err {error:.1e}"
        )
    return rows


def table(rows) -> str:
    header = [
        "tokens", "eager ms", "grouped_mm ms", "moepass static ms", "static vs grouped_mm",
        "adaptive ms (k_avg)", "adaptive vs grouped_mm", "adaptive ÷ ideal", "% BW floor (static)",
        "% GEMM rate (static)", "max rel err vs grouped_mm",
    ]
    body = [
        [
            str(r["tokens"]), f"{r['eager_ms']:.3f}", f"{r['grouped_mm_ms']:.3f}", f"{r['static_ms']:.3f}",
            f"{r['speedup']:.2f}×", f"{r['adaptive_ms']:.3f} ({r['k_avg']:.2f})", f"{r['adaptive_speedup']:.2f}×",
            f"{r['adaptive_over_ideal']:.2f}", f"{100 * r['bandwidth_fraction']:.0f}%", f"{100 * r['gemm_fraction']:.0f}%",
            f"{r['error']:.1e}",
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def target_lines(rows, shape: Shape) -> list[str]:
    """The issue's targets, met or not, for one shape."""
    small = [r for r in rows if r["tokens"] <= 16]
    large = [r for r in rows if r["tokens"] >= 4096]
    lines = [
        f"≥ 1.2× grouped_mm at every size: {'met' if all(r['speedup'] >= 1.2 for r in rows) else 'NOT met'} "
        f"(min {min(r['speedup'] for r in rows):.2f}×)",
        f"adaptive within 15% of ideal: {'met' if all(r['adaptive_over_ideal'] <= 1.15 for r in rows) else 'NOT met'} "
        f"(max {max(r['adaptive_over_ideal'] for r in rows):.2f})",
    ]
    if small:
        worst = min(r["bandwidth_fraction"] for r in small)
        lines.append(f"≥ 70% of the bandwidth floor at 1–16 tokens: {'met' if worst >= 0.7 else 'NOT met'} (min {100 * worst:.0f}%)")
    if large:
        worst = min(r["gemm_fraction"] for r in large)
        lines.append(f"≥ 60% of the GEMM rate at 4096 tokens: {'met' if worst >= 0.6 else 'NOT met'} ({100 * worst:.0f}%)")
    return [f"- {shape.name}: {line}" for line in lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1; writes nothing")
    args = parser.parse_args()

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype, shapes, tokens = torch.device("cpu"), torch.float32, SMOKE_SHAPES, [t for t in args.tokens if t <= 16] or [1]
    elif not torch.cuda.is_available():
        print("benchmarks/moe_triton_gpu.py needs a CUDA GPU (none found); nothing measured.")
        return 0
    else:
        device, dtype, shapes, tokens = torch.device("cuda"), torch.bfloat16, SHAPES, args.tokens

    import triton

    import moepass  # noqa: F401  (registers the ops)

    measure = timer(device)
    device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter, smoke run)"
    bandwidth = hbm_bandwidth(device, measure) if device.type == "cuda" else 10e9
    rate = gemm_rate(device, measure) if device.type == "cuda" else 50e9
    print(f"device: {device_label}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"measured: HBM bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 GEMM {rate / 1e12:.0f} TFLOP/s")

    sections, targets = [], []
    for key in args.shapes:
        shape = shapes[key]
        configs = tuned_or_heuristic(shape, dtype, device)
        rows = run_shape(shape, tokens, dtype, device, measure, bandwidth, rate)
        sections.append(
            f"### {shape.name}: hidden {shape.hidden}, intermediate {shape.inter}, {shape.num_experts} experts, "
            f"top-{shape.top_k} ({configs} configs)\n\n{table(rows)}\n"
        )
        targets += target_lines(rows, shape)
    body = (
        f"## Triton experts kernels on a GPU (`benchmarks/moe_triton_gpu.py`)\n\n"
        f"{today()} — {device_label}, torch {torch.__version__}, triton {triton.__version__}, {str(dtype)[6:]}.\n"
        f"Measured in the same run: HBM bandwidth {bandwidth / 1e12:.2f} TB/s (best of a 1 GiB read and copy), "
        f"bf16 GEMM {rate / 1e12:.0f} TFLOP/s (8192³).  Adaptive: slot 0 kept, each later slot dropped "
        f"(id E) with probability {DROP_PROBABILITY}; ideal = k_avg / k × static.\n\n"
        + "\n".join(sections)
        + "\nTargets:\n\n"
        + "\n".join(targets)
        + "\n"
    )
    print(body)
    if not args.no_write and not args.smoke:
        write_section("moe_triton_gpu", body, machine=f"GPU: {device_label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
