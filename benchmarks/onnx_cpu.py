"""ONNX Runtime on CPU: plain torch.onnx, static com.microsoft.MoE, and moepass exports, side by side.

Two models, each exported four ways and run with ONNX Runtime's CPU provider:

(a) ``torch.onnx``       the original model exported plainly (transformers'
                         ``batched_mm`` experts: ``grouped_mm`` does not export,
                         ``eager`` loops over data-dependent ``nonzero``);
(b) ``MoE static top-k`` router logits straight into ``com.microsoft.MoE``
                         with k = 2 and ``normalize_routing_weights`` — what
                         onnxruntime-genai ships for Mixtral;
(c) ``moepass static``   ``moepass.export_onnx(policy="static", target="ort")``
                         (layout ``auto``: measured in ONNX Runtime on this
                         machine per token-count range and cached — the
                         layouts chosen are printed and recorded; run with
                         ``MOEPASS_TUNING=off`` for the fixed default);
(d) ``moepass adaptive`` the same with top-p calibrated to an average k of
                         about 1.4 (``moepass.calibrate``);
(d') the same, layout ``masked`` (one com.microsoft.MoE call; block only, where
                         it is not the default);
(e) the same, target ``portable`` (standard ONNX ops only; block only).

Models: the Mixtral-shaped block (hidden 1024, intermediate 2816, 8 experts,
top-2, float32: transformers' ``MixtralSparseMoeBlock`` with random weights)
at 1, 8 and 512 tokens, and the bundled model when ``moepass.bundled`` is
there, at 1, 16 and 128 tokens (without a KV cache: each is a forward pass).
Every variant is checked against torch before it is timed; the variants run in
turn, round after round (interleaved), and each time is the median; ratios
come from one run.  Targets checked at the end: (c) and (d) never slower than
(b) at any size, and (d) within 15% of its ideal (k_avg ÷ k × (c)'s time).

Usage: python benchmarks/onnx_cpu.py [--tokens 1 8 512] [--bundled-tokens 1 16 128] [--target-k 1.4] [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _common import interleaved_medians, machine_description, markdown_table, today, write_section
from moe_block_cpu import EXPERTS, HIDDEN, INTER, TOP_K, make_block
from onnx import TensorProto, helper, numpy_helper

import moepass
import moepass.runtime.stats
from moepass.exports.onnx import OnnxExportOptions

PLAIN, GENAI, STATIC, ADAPTIVE = "(a) torch.onnx", "(b) MoE static top-k", "(c) moepass static", "(d) moepass adaptive"
MASKED = "(d') moepass adaptive, masked MoE"
PORTABLE = "(e) moepass adaptive, portable"
ADAPTIVE_VARIANTS = (ADAPTIVE, MASKED, PORTABLE)
#: batched_mm gathers each token's experts' weights: beyond this many tokens the copy does not fit in memory
PLAIN_MAX_TOKENS = 64


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


class BlockOutput(torch.nn.Module):
    """The block's routed output only (transformers' Mixtral block returns it alone or with logits)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out


def export_plain(module: torch.nn.Module, example: tuple, path: Path, dynamic_shapes) -> None:
    program = torch.onnx.export(module, example, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes)
    program.save(str(path))


def genai_block(block: torch.nn.Module, path: Path) -> None:
    """(b) for the block: x → router MatMul → com.microsoft.MoE(k=2, renormalised), weights pre-interleaved."""
    router = block.gate.weight.detach().numpy().T.copy()  # [H, E]
    gate_up = block.experts.gate_up_proj.detach().numpy()  # [E, 2I, H]: [gate; up]
    order = np.stack([np.arange(INTER), INTER + np.arange(INTER)], axis=1).reshape(-1)
    fc1 = gate_up[:, order, :].copy()  # [g0, u0, g1, u1, ...]: swiglu_fusion=1
    fc2 = block.experts.down_proj.detach().numpy().copy()  # [E, H, I]
    nodes = [
        helper.make_node("Reshape", ["x", "flat_shape"], ["x2d"]),
        helper.make_node("MatMul", ["x2d", "router"], ["logits"]),
        helper.make_node(
            "MoE", ["x2d", "logits", "fc1", "", "fc2", ""], ["y2d"], domain="com.microsoft", k=TOP_K,
            activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
            normalize_routing_weights=1,
        ),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Reshape", ["y2d", "x_shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "genai_moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        initializer=[
            numpy_helper.from_array(np.array([-1, HIDDEN], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(router, "router"),
            numpy_helper.from_array(fc1, "fc1"),
            numpy_helper.from_array(fc2, "fc2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))


def genai_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """(b) for a whole model: every AdaptiveMoE function becomes router logits → MoE(k=native, renormalised).

    Only for softmax → top-k → renormalise routers (Mixtral, the bundled model).
    """
    import json

    for function in model.functions:
        node = next(n for n in model.graph.node if n.overload == function.overload)
        meta = {p.key: p.value for p in node.metadata_props}
        router = json.loads(meta["moepass.route_config"])["router"]
        spec = json.loads(meta["moepass.experts_config"])["spec"]
        assert router["kind"] == "softmax_topk" and router["renormalize"] and spec["activation"] == "silu"
        inter = spec["intermediate_size"]
        order = np.stack([np.arange(inter), inter + np.arange(inter)], axis=1).reshape(-1)
        body = [
            helper.make_node("Constant", [], ["order"], value=numpy_helper.from_array(order.astype(np.int64))),
            helper.make_node("Gather", ["w1", "order"], ["fc1"], axis=1),
            helper.make_node(
                "MoE", ["x", "logits", "fc1", "", "w2", ""], ["y"], domain="com.microsoft", k=router["top_k"],
                activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                normalize_routing_weights=1,
            ),
        ]
        del function.node[:]
        function.node.extend(body)
        if not any(o.domain == "com.microsoft" for o in function.opset_import):
            function.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def average_k(module: torch.nn.Module, policy, args: tuple, kwargs: dict) -> float:
    """Average k the policy gives over every block of ``module`` on ``args`` (torch, stats on)."""
    moepass.runtime.stats.reset_stats()
    compiled = torch.compile(module, backend="adaptive_moe", options={"policy": policy, "stats": True, "inner": "eager"})
    with torch.no_grad():
        compiled(*args, **kwargs)
    stats = list(moepass.runtime.stats.routing_stats().values())
    torch._dynamo.reset()
    return sum(s.average_k * s.tokens for s in stats) / sum(s.tokens for s in stats)


def bench(variants: dict[str, Path], feeds_by_size: dict, expected_by_size: dict, label: str, repeat: int) -> list:
    """Time every variant at every size; returns rows [label, size, name, ms, speed vs (b), error] and the
    times by size."""
    rows, all_times = [], {}
    sessions = {name: session(path) for name, path in variants.items() if path is not None}
    for size, feeds in feeds_by_size.items():
        errors, runs = {}, {}
        for name, sess in sessions.items():
            if name == PLAIN and size[1] * size[0] > PLAIN_MAX_TOKENS and label == "block":
                continue
            out = sess.run(None, feeds)[0]
            expected = expected_by_size[size][name in ADAPTIVE_VARIANTS]
            errors[name] = relative_error(out, expected)
            assert errors[name] <= 1e-4, (label, size, name, errors[name])
            runs[name] = lambda s=sess, f=feeds: s.run(None, f)
        times = interleaved_medians(runs, rounds=repeat, warmup=2, min_seconds=1.0)
        all_times[size] = times
        base = times[GENAI]
        for name in variants:
            if name not in times:
                rows.append([label, f"{size[0]}×{size[1]}", name, "—", "—", "—"])
                continue
            seconds, error = times[name], errors[name]
            rows.append([label, f"{size[0]}×{size[1]}", name, f"{seconds * 1e3:.2f}", f"{base / seconds:.2f}×", f"{error:.0e}"])
            print(f"{label:8s} {size[0]}×{size[1]:<5d} {name:24s} {seconds * 1e3:9.2f} ms  {base / seconds:5.2f}× (b)"
                  f"  err {error:.0e}")
    return rows, all_times


def block_benchmark(directory: Path, tokens: list[int], target_k: float, repeat: int):
    # grouped_mm (the default) for calibration and moepass: running batched_mm at 512 tokens (calibration,
    # validation) would gather 1024 copies of an expert's weights, 23.6 GB; (a) gets a batched_mm twin
    block = make_block("grouped_mm").eval()
    module = BlockOutput(block).eval()
    calibration = [torch.randn(1, 512, HIDDEN, generator=torch.Generator().manual_seed(1))]
    policy = moepass.calibrate(block, calibration, "top_p", target_avg_k=target_k, show_progress=False)
    example = (torch.randn(2, 8, HIDDEN, generator=torch.Generator().manual_seed(2)),)
    names = (PLAIN, GENAI, STATIC, ADAPTIVE, MASKED, PORTABLE)
    paths = {name: directory / f"block_{i}.onnx" for i, name in enumerate(names)}
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    plain = BlockOutput(make_block("batched_mm")).eval()  # same seed: the same weights
    export_plain(plain, example, paths[PLAIN], ({0: batch, 1: sequence},))
    genai_block(block, paths[GENAI])
    # export_onnx verifies each export against torch on its example before writing it
    layouts = {
        STATIC: moepass.export_onnx(module, example, paths[STATIC], "static").blocks[0].layout,
        ADAPTIVE: moepass.export_onnx(module, example, paths[ADAPTIVE], policy).blocks[0].layout,
    }
    moepass.export_onnx(module, example, paths[MASKED], policy, options=OnnxExportOptions(ort_layout="masked"))
    moepass.export_onnx(module, example, paths[PORTABLE], policy, target="portable")
    feeds, expected, ks = {}, {}, {}
    compiled = torch.compile(module, backend="adaptive_moe", options={"policy": policy, "inner": "eager"})
    for count in tokens:
        x = torch.randn(1, count, HIDDEN, generator=torch.Generator().manual_seed(10 + count))
        with torch.no_grad():
            expected[(1, count)] = (module(x).double().numpy(), compiled(x).double().numpy())
        feeds[(1, count)] = {"x": x.numpy()}
        ks[count] = average_k(module, policy, (x,), {})
        torch._dynamo.reset()
    rows, times = bench(paths, feeds, expected, "block", repeat)
    return rows, policy, ks, times, layouts


def bundled_benchmark(directory: Path, tokens: list[int], target_k: float, repeat: int):
    if importlib.util.find_spec("moepass.bundled") is None:
        print("bundled model: moepass.bundled is not in this build; skipped")
        return [], None, None, {}, {}
    from moepass import bundled

    model = bundled.load_model()
    plain_model = bundled.load_model()
    plain_model.set_experts_implementation("batched_mm")  # grouped_mm does not export plainly
    batches = list(bundled.train_batches(seq_len=128, batch_size=4, max_batches=4))
    policy = moepass.calibrate(model, batches, "top_p", target_avg_k=target_k, show_progress=False)
    example = {"input_ids": batches[0][:2, :16]}
    paths = {name: directory / f"bundled_{i}.onnx" for i, name in enumerate((PLAIN, GENAI, STATIC, ADAPTIVE))}

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    export_plain(Logits(plain_model).eval(), (example["input_ids"],), paths[PLAIN],
                 ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")},))
    layouts = {STATIC: moepass.export_onnx(model, example, paths[STATIC], "static").blocks[0].layout}
    genai = genai_functions(onnx.load(str(paths[STATIC])))
    onnx.save(genai, str(paths[GENAI]))
    layouts[ADAPTIVE] = moepass.export_onnx(model, example, paths[ADAPTIVE], policy).blocks[0].layout
    compiled = torch.compile(model, backend="adaptive_moe", options={"policy": policy, "inner": "eager"})
    feeds, expected, ks = {}, {}, {}
    for count in tokens:
        ids = batches[1][:1, :count]
        with torch.no_grad():
            expected[(1, count)] = (model(ids, use_cache=False).logits.double().numpy(),
                                    compiled(ids, use_cache=False).logits.double().numpy())
        feeds[(1, count)] = {"input_ids": ids.numpy()}
        ks[count] = average_k(model, policy, (ids,), {"use_cache": False})
    rows, times = bench(paths, feeds, expected, "bundled", repeat)
    return rows, policy, ks, times, layouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 512], help="block sizes")
    parser.add_argument("--bundled-tokens", type=int, nargs="+", default=[1, 16, 128], help="bundled model sizes")
    parser.add_argument("--target-k", type=float, default=1.4, help="average k the adaptive policy is calibrated to")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)
    load = os.getloadavg()
    print(f"machine: {machine_description()}; onnxruntime {ort.__version__}; load average {load[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        rows, policy, ks, times, layouts = block_benchmark(directory, args.tokens, args.target_k, args.repeat)
        bundled_rows, bundled_policy, bundled_ks, bundled_times, bundled_layouts = bundled_benchmark(
            directory, args.bundled_tokens, args.target_k, args.repeat)
    load_after = os.getloadavg()
    table = markdown_table(["model", "batch×tokens", "export", "ms", "speed vs (b)", "max rel err vs torch"],
                           rows + bundled_rows)
    notes = [
        f"Block adaptive policy {policy.describe()}: average k "
        + ", ".join(f"{ks[t]:.2f} at {t} tokens" for t in args.tokens) + "."
    ]
    if bundled_policy is not None:
        notes.append(f"Bundled adaptive policy {bundled_policy.describe()}: average k "
                     + ", ".join(f"{bundled_ks[t]:.2f} at {t} tokens" for t in args.bundled_tokens) + ".")
    targets = []
    for label, by_size, k_of, chosen in (("block", times, ks, layouts), ("bundled", bundled_times, bundled_ks,
                                                                         bundled_layouts)):
        if not by_size:
            continue
        slowest = min((t[GENAI] / t[name], name, size[1]) for size, t in by_size.items() for name in (STATIC, ADAPTIVE))
        ideal = max((t[ADAPTIVE] / (k_of[size[1]] / TOP_K * t[STATIC]), size[1]) for size, t in by_size.items())
        targets.append(
            f"{label}: slowest moepass export against (b) {slowest[0]:.2f}× ({slowest[1]}, {slowest[2]} tokens; target "
            f"≥ 1.00: {'met' if slowest[0] >= 1.0 else 'NOT met'}); adaptive ÷ its ideal at most {ideal[0]:.2f} "
            f"({ideal[1]} tokens; target ≤ 1.15: {'met' if ideal[0] <= 1.15 else 'NOT met'}).  Layouts: "
            + "; ".join(f"{name}: {layout}" for name, layout in chosen.items()))
    print("\n".join(targets))
    body = (
        f"## ONNX Runtime on CPU (`benchmarks/onnx_cpu.py`)\n\n"
        f"{today()} — {machine_description()}; onnxruntime {ort.__version__} (CPU provider, "
        f"{os.cpu_count()} intra-op threads); load average {load[0]:.2f} before, {load_after[0]:.2f} after.\n"
        f"Block: Mixtral-shaped (hidden {HIDDEN}, intermediate {INTER}, {EXPERTS} experts, top-{TOP_K}, float32).  "
        f"(a) plain torch.onnx of the original (transformers `batched_mm` experts: `grouped_mm` does not export; "
        f"its per-token weight gather does not fit in memory beyond {PLAIN_MAX_TOKENS} tokens, —), "
        f"(b) router logits → `com.microsoft.MoE` k={TOP_K} (what onnxruntime-genai ships), "
        f"(c)/(d) `moepass.export_onnx` target ort, static and adaptive, layout `auto` (measured on this machine "
        f"per token-count range; the layouts chosen are listed under Targets); (d') adaptive, layout masked; (e) adaptive, target portable (a Loop "
        f"over experts in standard ops).  Variants interleaved, medians.  Errors: (a)–(c) against the original "
        f"model, (d)–(e) against torch.compile with "
        f"the same policy.\n\n{table}\n\n" + "\n".join(notes) + "\n\nTargets:\n\n"
        + "\n".join(f"- {line}" for line in targets) + "\n"
    )
    print(body)
    if not args.no_write:
        write_section("onnx_cpu", body)


if __name__ == "__main__":
    main()
