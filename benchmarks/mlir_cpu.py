"""IREE on CPU: moepass's MLIR export beside torch eager and ONNX Runtime, static and adaptive, side by side.

Each model runs as:

(a) ``torch eager``            the original transformers module (``grouped_mm`` experts);
(b) ``ORT static``/``ORT adaptive``   ``moepass.export_onnx`` (target ort) under static and the adaptive policy;
(c) ``IREE static``/``IREE adaptive`` ``moepass.export_mlir`` (linalg-on-tensors, grouped experts form:
                               each expert's GEMMs on its own rows, dropped slots skipped), compiled
                               with IREE for this CPU (``llvm-cpu``, ``--iree-llvmcpu-target-cpu=host``)
                               and run by ``iree.runtime`` (``local-task``, all cores);
(d) ``IREE adaptive dense``    the same with ``experts_form="dense"`` (every expert on every token,
                               masked): what a static-shape form costs, whatever the policy drops.

Models: the Mixtral-shaped block (hidden 1024, intermediate 2816, 8 experts, top-2, float32; random
weights) at 8 and 512 tokens, and the bundled model on 1 × 128 held-out-style bytes.  The adaptive
policy is top-p calibrated to an average k of about 1.4 (``moepass.calibrate``).  The MLIR modules
have static shapes (one export per size).  Every variant is checked against torch before it is
timed; times are medians of interleaved rounds (each round runs every variant once), so drifting
machine load hits all variants alike.

Usage: python benchmarks/mlir_cpu.py [--tokens 8 512] [--target-k 1.4] [--rounds 15] [--small] [--no-write]
(``--small``: a hidden-256 block and 8/64 tokens, a smoke run of a few minutes.)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
from _common import interleaved_medians, machine_description, markdown_table, today, write_section
from moe_block_cpu import EXPERTS, HIDDEN, INTER, TOP_K
from moepass.lowering.mlir import IreeModule
from onnx_cpu import BlockOutput, average_k, session
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import moepass
from moepass.exports.mlir import MlirExportOptions

EAGER, ORT_STATIC, ORT_ADAPTIVE = "(a) torch eager", "(b) ORT static", "(b) ORT adaptive"
IREE_STATIC, IREE_ADAPTIVE, IREE_DENSE = "(c) IREE static", "(c) IREE adaptive", "(d) IREE adaptive dense"
VARIANTS = (EAGER, ORT_STATIC, ORT_ADAPTIVE, IREE_STATIC, IREE_ADAPTIVE, IREE_DENSE)


def make_block(hidden: int, inter: int, seed: int = 0) -> MixtralSparseMoeBlock:
    """A Mixtral MoE block with N(0, 0.02) weights (as benchmarks/moe_block_cpu.py, any size)."""
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=EXPERTS,
                           num_experts_per_tok=TOP_K, experts_implementation="grouped_mm")
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    return block


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


def iree_variants(module, example: tuple, policy, directory: Path, label: str) -> dict[str, IreeModule]:
    """IREE modules of ``module`` at the example's (static) shape: static, adaptive, adaptive dense."""
    modules = {}
    for name, chosen, form in ((IREE_STATIC, "static", "grouped"), (IREE_ADAPTIVE, policy, "grouped"),
                               (IREE_DENSE, policy, "dense")):
        started = time.perf_counter()
        # export_mlir compiles the module with IREE and checks it against torch before returning
        result = moepass.export_mlir(module, example, directory / f"{label}_{len(modules)}.mlir", chosen,
                                     options=MlirExportOptions(experts_form=form))
        print(f"  {label}: {name} exported, compiled and verified in {time.perf_counter() - started:.0f} s "
              f"(error {result.max_error:.0e})")
        modules[name] = IreeModule(result.vmfb)
    return modules


def bench(label: str, size: str, fns: dict, outputs: dict, expected: dict, rounds: int, k: float) -> list[list[str]]:
    """Check every variant against torch, time them interleaved; rows with ratios to static."""
    errors = {}
    for name, output in outputs.items():
        errors[name] = relative_error(output, expected[name in (ORT_ADAPTIVE, IREE_ADAPTIVE, IREE_DENSE)])
        assert errors[name] <= 1e-4, (label, size, name, errors[name])
    times = interleaved_medians(fns, rounds=rounds, warmup=2)
    rows = []
    for name in VARIANTS:
        if name not in times:
            continue
        base = times[IREE_STATIC] if name.startswith("(c)") or name.startswith("(d)") else times.get(ORT_STATIC)
        if name == EAGER:
            base = times[EAGER]
        ratio = f"{base / times[name]:.2f}×" if base else "—"
        rows.append([label, size, name, f"{times[name] * 1e3:.2f}", ratio, f"{times[EAGER] / times[name]:.2f}×",
                     f"{errors[name]:.0e}"])
        print(f"{label:8s} {size:8s} {name:26s} {times[name] * 1e3:9.2f} ms  {ratio:>6s} vs its static  "
              f"{times[EAGER] / times[name]:5.2f}× eager  err {errors[name]:.0e}")
    print(f"{label:8s} {size:8s} adaptive average k {k:.2f}: ideal adaptive/static time {k / TOP_K:.2f}")
    return rows


def block_benchmark(directory: Path, tokens: list[int], target_k: float, rounds: int, hidden: int, inter: int):
    block = make_block(hidden, inter)
    module = BlockOutput(block).eval()
    calibration = [torch.randn(1, 512, hidden, generator=torch.Generator().manual_seed(1))]
    policy = moepass.calibrate(block, calibration, "top_p", target_avg_k=target_k, show_progress=False)
    onnx_example = (torch.randn(2, 8, hidden, generator=torch.Generator().manual_seed(2)),)
    moepass.export_onnx(module, onnx_example, directory / "block_static.onnx", "static")
    moepass.export_onnx(module, onnx_example, directory / "block_adaptive.onnx", policy)
    sessions = {ORT_STATIC: session(directory / "block_static.onnx"),
                ORT_ADAPTIVE: session(directory / "block_adaptive.onnx")}
    compiled = torch.compile(module, backend="adaptive_moe", options={"policy": policy, "inner": "eager"})
    rows, ks = [], {}
    for count in tokens:
        x = torch.randn(1, count, hidden, generator=torch.Generator().manual_seed(10 + count))
        with torch.no_grad():
            expected = (module(x).double().numpy(), compiled(x).double().numpy())
        ks[count] = average_k(module, policy, (x,), {})
        torch._dynamo.reset()
        modules = iree_variants(module, (x,), policy, directory, f"block{count}")
        feeds = {"x": x.numpy()}
        fns: dict[str, Callable[[], object]] = {EAGER: lambda: _no_grad(module, x)}
        fns |= {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
        fns |= {name: (lambda m=m: m(x.numpy())) for name, m in modules.items()}
        outputs = {name: np.asarray(fn()[0] if name != EAGER else fn()) for name, fn in fns.items()}
        rows += bench("block", f"1×{count}", fns, outputs, expected, rounds, ks[count])
    return rows, policy, ks


def _no_grad(module, *args):
    with torch.no_grad():
        out = module(*args)
    return out.numpy() if isinstance(out, torch.Tensor) else out


def bundled_benchmark(directory: Path, target_k: float, rounds: int, tokens: int):
    if importlib.util.find_spec("moepass.bundled") is None:
        print("bundled model: moepass.bundled is not in this build; skipped")
        return [], None, None
    from moepass import bundled

    model = bundled.load_model()
    batches = list(bundled.train_batches(seq_len=128, batch_size=4, max_batches=4))
    policy = moepass.calibrate(model, batches, "top_p", target_avg_k=target_k, show_progress=False)
    ids = batches[1][:1, :tokens].contiguous()
    onnx_example = {"input_ids": batches[0][:2, :16]}
    moepass.export_onnx(model, onnx_example, directory / "bundled_static.onnx", "static")
    moepass.export_onnx(model, onnx_example, directory / "bundled_adaptive.onnx", policy)
    sessions = {ORT_STATIC: session(directory / "bundled_static.onnx"),
                ORT_ADAPTIVE: session(directory / "bundled_adaptive.onnx")}
    compiled = torch.compile(model, backend="adaptive_moe", options={"policy": policy, "inner": "eager"})
    with torch.no_grad():
        expected = (model(ids, use_cache=False).logits.double().numpy(),
                    compiled(ids, use_cache=False).logits.double().numpy())
    k = average_k(model, policy, (ids,), {"use_cache": False})
    torch._dynamo.reset()
    modules = iree_variants(model, (ids,), policy, directory, "bundled")
    feeds = {"input_ids": ids.numpy()}

    def eager():
        with torch.no_grad():
            return model(ids, use_cache=False).logits.numpy()

    fns: dict[str, Callable[[], object]] = {EAGER: eager}
    fns |= {name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()}
    fns |= {name: (lambda m=m: m(ids.numpy())) for name, m in modules.items()}
    outputs = {name: np.asarray(fn()[0] if name != EAGER else fn()) for name, fn in fns.items()}
    rows = bench("bundled", f"1×{tokens}", fns, outputs, expected, rounds, k)
    return rows, policy, k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="block token counts (default 8 512)")
    parser.add_argument("--target-k", type=float, default=1.4, help="average k the adaptive policy is calibrated to")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--small", action="store_true", help="a hidden-256 block at 8 and 64 tokens (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import importlib.metadata

    import iree.runtime  # noqa: F401  (fail early when the mlir extra is missing)
    import torch_mlir  # noqa: F401

    hidden, inter = (256, 704) if args.small else (HIDDEN, INTER)
    tokens = args.tokens or ([8, 64] if args.small else [8, 512])
    load = os.getloadavg()
    versions = (f"IREE {importlib.metadata.version('iree-base-compiler')}, torch-mlir "
                f"{importlib.metadata.version('torch-mlir')}, onnxruntime {ort.__version__}")
    print(f"machine: {machine_description()}; {versions}; load average {load[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        rows, policy, ks = block_benchmark(directory, tokens, args.target_k, args.rounds, hidden, inter)
        bundled_rows, bundled_policy, bundled_k = bundled_benchmark(directory, args.target_k, args.rounds, 128)
    load_after = os.getloadavg()
    table = markdown_table(["model", "batch×tokens", "variant", "ms", "speed vs its static", "speed vs eager",
                            "max rel err vs torch"], rows + bundled_rows)
    notes = [f"Block adaptive policy {policy.describe()}: average k "
             + ", ".join(f"{ks[t]:.2f} at {t} tokens" for t in tokens) + f" (ideal adaptive/static time k/{TOP_K})."]
    if bundled_policy is not None:
        notes.append(f"Bundled adaptive policy {bundled_policy.describe()}: average k {bundled_k:.2f}.")
    body = (
        f"## IREE on CPU (`benchmarks/mlir_cpu.py`)\n\n"
        f"{today()} — {machine_description()}; {versions} (llvm-cpu, target cpu host, local-task driver; "
        f"ORT CPU provider with {os.cpu_count()} intra-op threads); load average {load[0]:.2f} before, "
        f"{load_after[0]:.2f} after; medians of {args.rounds} interleaved rounds.\n"
        f"Block: Mixtral-shaped (hidden {hidden}, intermediate {inter}, {EXPERTS} experts, top-{TOP_K}, float32).  "
        f"(a) transformers eager (`grouped_mm`), (b) `moepass.export_onnx` target ort, (c) `moepass.export_mlir` "
        f"linalg-on-tensors, grouped experts (dropped slots skipped), (d) the same with the dense experts form "
        f"(every expert on every token).  Errors: static against the original model, adaptive against "
        f"torch.compile with the same policy.\n\n{table}\n\n" + "\n".join(notes) + "\n"
    )
    print(body)
    if not args.no_write:
        write_section("mlir_cpu", body)


if __name__ == "__main__":
    main()
