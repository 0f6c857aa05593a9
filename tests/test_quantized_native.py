"""moepass's native quantized decode kernel (moepass/lowering/csrc/qgemv.cpp, :mod:`moepass.lowering.cpu_qgemv`).

Against the dequantized reference (float32 and 16-bit activations, int4 in several group sizes, int8,
odd shapes, every ISA path this CPU runs), as the ``native`` form of ``moepass.quantized_experts``, and
how it is chosen: never with tuning off (nothing is built), only where it measured faster with tuning
on, and not at all when the library cannot be had (no compiler, a failed build, ``$MOEPASS_NATIVE=off``).

Only the ``native_library`` fixture builds the library (once per worker, ~3 s on the 2-core CI machine,
into the suite's temporary cache folder); the tests that use it are marked ``native``.
"""

from __future__ import annotations

import pytest
import torch

from moepass.lowering import cpu_qgemv, cpu_quantized, native
from moepass.quantize import dequantize, quantize_rtn
from moepass.quantize.scheme import QuantScheme, parse_scheme
from moepass.runtime import tuning


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.fixture(scope="module")
def native_library():
    """The native kernels, built and checked (skipped only where no C++ compiler exists at all)."""
    if native.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    assert cpu_qgemv.available(), cpu_qgemv.unavailable_reason()  # a compiler that cannot build it is a failure
    return cpu_qgemv


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A process state in which the library was never asked for (and a private cache folder)."""
    monkeypatch.setenv("MOEPASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_reasons", {})
    monkeypatch.setattr(cpu_qgemv, "_ready", [])


CASES = [  # (scheme, out, in): int4 in every group size the layout takes, int8, odd output counts
    (parse_scheme("int4", 32), 37, 96),
    (QuantScheme(bits=4, group_size=32, symmetric=True), 19, 64),  # no zero points: z = 8
    (parse_scheme("int4", 64), 64, 192),
    (parse_scheme("int4", 128), 21, 384),
    (parse_scheme("int4", 256), 9, 512),
    (parse_scheme("int8"), 33, 70),
    (parse_scheme("int8"), 8, 1000),
]


@pytest.mark.native
@pytest.mark.parametrize("scheme,out_features,in_features", CASES,
                         ids=[f"{s.describe()}-{n}x{k}".replace(" ", "") for s, n, k in CASES])
def test_kernel_matches_dequantized_reference(native_library, scheme, out_features, in_features):
    """Every path this CPU runs, every activation dtype, several experts with different row counts (one
    with none), a bias: y = x · deq(W)ᵀ + b to float32 round-off (float32 out), to bfloat16 rounding
    (bfloat16 out); rows of experts not in the call are left alone."""
    generator = torch.Generator().manual_seed(out_features * in_features)
    layout = quantize_rtn(torch.randn(4, out_features, in_features, generator=generator), scheme)
    operands = list(layout.tensors().values())
    weights = dequantize(layout).double()
    bias = torch.randn(4, out_features, generator=generator)
    counts = [2, 0, 5, 1]
    tasks = cpu_qgemv.expert_tasks(counts)
    assert tasks.tolist() == [[0, 2, 3], [0, 2, 7], [2, 5, 1]]
    rows = sum(counts)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(rows + 1, in_features, generator=generator).to(dtype)  # a last row no expert owns
        expected = torch.cat([x[0:2].double() @ weights[0].T + bias[0], x[2:7].double() @ weights[2].T + bias[2],
                              x[7:8].double() @ weights[3].T + bias[3]])
        for path in range(cpu_qgemv.best_path() + 1):
            out = torch.full((rows + 1, out_features), float("nan"))
            cpu_qgemv.project(x, out, tasks, operands, bias, scheme, path=path, threads=2)
            assert rel_err(out[:rows], expected) <= 1e-5, (dtype, cpu_qgemv.PATHS[path])
            assert out[rows].isnan().all()  # not an expert's row: untouched
        low = torch.empty(rows, out_features, dtype=torch.bfloat16)
        cpu_qgemv.project(x[:rows], low, tasks, operands, bias, scheme)
        assert torch.allclose(low.double(), expected, rtol=2 ** -8, atol=1e-6 * float(expected.abs().max()))
    broken = [t.clone() for t in operands]  # the test can fail: one wrong code moves an output
    broken[0][0, 3, 1] ^= 0x11 if scheme.bits == 4 else 0x40
    x = torch.randn(rows, in_features, generator=generator)
    good, bad = torch.empty(rows, out_features), torch.empty(rows, out_features)
    cpu_qgemv.project(x, good, tasks, operands, None, scheme)
    cpu_qgemv.project(x, bad, tasks, broken, None, scheme)
    assert (good[:2, 3] - bad[:2, 3]).abs().max() > 1e-3 * float(good.abs().max())  # expert 0's output 3 moved
    others = [n for n in range(out_features) if n != 3]
    assert torch.equal(good[:, others], bad[:, others]) and torch.equal(good[2:], bad[2:])  # nothing else did


def _paths():
    return range(cpu_qgemv.best_path() + 1)


@pytest.mark.native
@pytest.mark.parametrize("group", [32, 128])
def test_native_dequantize_matches_layout(native_library, group):
    """The native int4 dequantization (the ``dequant`` kernel of the native form) equals the layout's on every
    path this CPU runs: float32 to round-off, bfloat16 and float16 bit for bit (each value rounded once)."""
    layout = quantize_rtn(torch.randn(1, 24, 256), parse_scheme("int4", group))
    codes, scales, zeros = (t[0] for t in layout.tensors().values())
    expected = dequantize(layout)[0]
    moved = codes.clone()
    moved[5, 7] ^= 0x10  # column 15's code of row 5
    for path in _paths():
        assert torch.allclose(cpu_qgemv.dequantize_int4(codes, scales, zeros, group, torch.float32, path=path),
                              expected, rtol=1e-6, atol=1e-7), path
        for dtype in (torch.bfloat16, torch.float16):
            got = cpu_qgemv.dequantize_int4(codes, scales, zeros, group, dtype, path=path)
            assert torch.equal(got, expected.to(dtype)), (path, dtype)
        changed = cpu_qgemv.dequantize_int4(moved, scales, zeros, group, torch.float32, path=path) != expected
        assert changed.nonzero().tolist() == [[5, 15]], path


@pytest.mark.native
@pytest.mark.parametrize("in_features", [256, 70])
def test_native_int8_dequantize_matches_layout(native_library, in_features):
    """The native int8 dequantization equals the layout's on every path (70 columns: a vector body and a
    scalar tail)."""
    layout = quantize_rtn(torch.randn(1, 12, in_features), parse_scheme("int8"))
    codes, scales = (t[0] for t in layout.tensors().values())
    expected = dequantize(layout)[0]
    for path in _paths():
        assert torch.allclose(cpu_qgemv.dequantize_int8(codes, scales, torch.float32, path=path), expected,
                              rtol=1e-6, atol=1e-7), path
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(cpu_qgemv.dequantize_int8(codes, scales, dtype, path=path), expected.to(dtype)), path


@pytest.mark.native
@pytest.mark.parametrize("scheme", [parse_scheme("int4", 32), parse_scheme("int8")], ids=["int4g32", "int8"])
def test_native_form_of_the_op_matches_plain(native_library, scheme):
    """``moepass.quantized_experts`` in the native form (gemv for few rows, dequantize + GEMM beyond) gives
    the plain form's result, at one token, a few, and prefill-sized calls; the kernel choice says gemv
    only for few rows."""
    from moepass.compiler.spec import ExpertsSpec
    from moepass.runtime.ops import ExpertsConfig
    from moepass.runtime.quantized_ops import QuantizedExpertsConfig

    generator = torch.Generator().manual_seed(0)
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=6, hidden_size=96, intermediate_size=160,
                       activation="silu", gated=True, gate_up_layout="concat")
    layouts = [quantize_rtn(torch.randn(6, 320, 96, generator=generator) * 0.1, scheme),
               quantize_rtn(torch.randn(6, 96, 160, generator=generator) * 0.1, scheme)]
    w1, w2 = (list(lay.tensors().values()) for lay in layouts)
    configs = {form: QuantizedExpertsConfig(ExpertsConfig(spec=spec, lowering="cpu"), scheme, form).to_json()
               for form in ("plain", "native")}
    assert cpu_quantized.choose_quantized_kernel(scheme, "native", 1, 320, 96, torch.bfloat16) == "gemv"
    assert cpu_quantized.choose_quantized_kernel(scheme, "native", 200, 320, 96, torch.bfloat16) == "dequant"
    assert cpu_quantized.choose_quantized_kernel(scheme, "plain", 1, 320, 96, torch.bfloat16) == "dequant"
    for tokens in (1, 3, 40):
        ids = torch.stack([torch.randperm(6, generator=generator)[:2] for _ in range(tokens)])
        weights = torch.softmax(torch.randn(tokens, 2, generator=generator), -1)
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            x = torch.randn(tokens, 96, generator=generator).to(dtype)
            results = {form: torch.ops.moepass.quantized_experts(x, ids, weights.to(dtype), w1, w2, None, None, config)
                       for form, config in configs.items()}
            assert rel_err(results["native"], results["plain"]) <= tolerance, (tokens, dtype)


@pytest.mark.native
def test_flushing_the_caches_keeps_the_bytes(native_library):
    """The tuning's eviction of an expert (clflush) writes back and leaves the data as it was."""
    import platform

    tensors = [torch.randn(1000, 37), torch.arange(70000, dtype=torch.uint8).reshape(700, 100)]
    before = [t.clone() for t in tensors]
    done = cpu_qgemv.flush_caches(tensors)
    assert done == (platform.machine().lower() in ("x86_64", "amd64"))
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


def _per_token_reference(x, ids, weights, first, second, b1, b2, layout):
    """out[t] = Σ_k w[t,k]·(silu(gate)·up of x[t] through expert ids[t,k]) · W2ᵀ, in float32 (empty slots: 0)."""
    experts, _, inner = second.shape
    out = torch.zeros(x.shape[0], second.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if not 0 <= e < experts:
                continue
            h = x[t].double() @ first[e].double().T + (0 if b1 is None else b1[e].double())
            gate, up = (h[:inner], h[inner:]) if layout == "concat" else (h[0::2], h[1::2])
            y = (torch.nn.functional.silu(gate) * up) @ second[e].double().T + (0 if b2 is None else b2[e].double())
            out[t] += float(weights[t, k]) * y
    return out


@pytest.mark.native
@pytest.mark.parametrize("scheme", [parse_scheme("int4", 32), parse_scheme("int8")], ids=["int4g32", "int8"])
@pytest.mark.parametrize("layout", ["concat", "interleaved"])
def test_fused_few_token_call_matches_the_per_token_reference(native_library, scheme, layout):
    """The whole op in one native call (routing, both projections, SwiGLU, weighted sum) equals a plain
    per-token loop over the dequantized experts to float32 round-off: biases, an empty slot (id E), a token
    whose slots are all empty, and an expert hit by two tokens; the rows per expert it reports are the
    routing's."""
    import numpy as np

    generator = torch.Generator().manual_seed(1)
    experts, hidden, inner = 5, 64, 96 if scheme.bits == 4 else 40  # int8: a SwiGLU width off the vector step
    layouts = [quantize_rtn(torch.randn(experts, 2 * inner, hidden, generator=generator) * 0.1, scheme),
               quantize_rtn(torch.randn(experts, hidden, inner, generator=generator) * 0.1, scheme)]
    w1, w2 = (list(lay.tensors().values()) for lay in layouts)
    first, second = (dequantize(lay) for lay in layouts)
    b1, b2 = torch.randn(experts, 2 * inner, generator=generator), torch.randn(experts, hidden, generator=generator)
    ids = torch.tensor([[3, 1], [1, experts], [experts, experts], [0, 4]])
    weights = torch.softmax(torch.randn(4, 2, generator=generator), -1)
    x = torch.randn(4, hidden, generator=generator)
    counts = np.zeros(experts, dtype=np.int64)
    got = cpu_qgemv.fused_experts(x, ids, weights, w1, w2, b1, b2, scheme, ("silu", layout), counts)
    expected = _per_token_reference(x, ids, weights, first, second, b1, b2, layout)
    assert rel_err(got, expected) <= 1e-5
    assert torch.equal(got[2], torch.zeros(hidden))  # every slot empty
    assert counts.tolist() == [1, 2, 0, 1, 1]
    got16 = cpu_qgemv.fused_experts(x.bfloat16(), ids, weights.bfloat16(), w1, w2, None, None, scheme,
                                    ("silu", layout))
    assert got16.dtype == torch.bfloat16
    assert rel_err(got16, _per_token_reference(x, ids, weights, first, second, None, None, layout)) <= 2e-2


@pytest.mark.native
def test_the_native_form_runs_few_tokens_fused_and_many_unfused(native_library, monkeypatch):
    """In the native form a decode-sized call of a SwiGLU block is one native call and gives the unfused
    path's result (float32: to round-off) with the same GEMM rows counted; a prefill-sized call, a
    weight-on-input block and gpt-oss's clamped SwiGLU take the unfused path."""
    import dataclasses

    from moepass.compiler.spec import ExpertsSpec
    from moepass.runtime.stats import count_gemm_rows

    scheme = parse_scheme("int4", 32)
    generator = torch.Generator().manual_seed(2)
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=6, hidden_size=64, intermediate_size=96,
                       activation="silu", gated=True, gate_up_layout="concat")
    layouts = [quantize_rtn(torch.randn(6, 192, 64, generator=generator) * 0.1, scheme),
               quantize_rtn(torch.randn(6, 64, 96, generator=generator) * 0.1, scheme)]
    w1, w2 = (list(lay.tensors().values()) for lay in layouts)
    calls = []
    real = cpu_qgemv.fused_experts
    monkeypatch.setattr(cpu_qgemv, "fused_experts", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(tokens, block_spec, fused):
        ids = torch.stack([torch.randperm(6, generator=generator)[:2] for _ in range(tokens)])
        weights = torch.softmax(torch.randn(tokens, 2, generator=generator), -1)
        x = torch.randn(tokens, 64, generator=generator)
        before = len(calls)
        with count_gemm_rows() as rows:
            got = cpu_quantized.experts_forward(x, ids, weights, w1, w2, None, None, block_spec, scheme, "native")
        assert (len(calls) > before) == fused, (tokens, block_spec.activation)
        monkeypatch.setattr(cpu_quantized, "fused_decode_usable", lambda *a: False)
        with count_gemm_rows() as unfused_rows:
            expected = cpu_quantized.experts_forward(x, ids, weights, w1, w2, None, None, block_spec, scheme, "native")
        monkeypatch.undo()
        monkeypatch.setattr(cpu_qgemv, "fused_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
        assert rel_err(got, expected) <= 1e-5
        assert rows == unfused_rows

    run(1, spec, fused=True)
    run(3, spec, fused=True)
    run(200, spec, fused=False)  # many rows per expert: dequantize + GEMM
    run(1, dataclasses.replace(spec, weight_on_input=True), fused=False)
    run(1, dataclasses.replace(spec, activation="swiglu_clamp", gate_up_layout="interleaved"), fused=False)


def test_tuning_off_builds_nothing_and_never_chooses_native(fresh_native, monkeypatch):
    """The suite's setting ($MOEPASS_TUNING=off): the choice is ATen's form (plain for float32), the same on
    every machine, and the native library is never asked for — not at compile time, not at run time."""
    from moepass.lowering.cpu_quantized_tuning import choose_form

    def no_build(name):
        raise AssertionError(f"the native library {name} was asked for")

    monkeypatch.setattr(native, "library", no_build)
    monkeypatch.setenv("MOEPASS_TUNING", "off")
    scheme = parse_scheme("int4", 32)
    layouts = [quantize_rtn(torch.randn(2, 64, 32), scheme), quantize_rtn(torch.randn(2, 32, 32), scheme)]
    assert choose_form(scheme, layouts, torch.bfloat16, "auto", "test")[0] == "aten_cpu"
    assert choose_form(scheme, layouts, torch.float32, "auto", "test") == ("plain", "")
    for form in ("aten_cpu", "plain"):
        assert cpu_quantized.choose_quantized_kernel(scheme, form, 1, 64, 32, torch.bfloat16) in ("aten", "dequant")


def test_unavailable_library_fails_closed(fresh_native, monkeypatch, caplog):
    """No compiler, a compiler that fails, or $MOEPASS_NATIVE=off: not available, the reason said once, and
    the choice with tuning on measures only ATen's candidates."""
    import logging

    from moepass.lowering.cpu_quantized_tuning import choose_form

    monkeypatch.setenv("MOEPASS_NATIVE", "off")
    assert not cpu_qgemv.available() and "MOEPASS_NATIVE=off" in cpu_qgemv.unavailable_reason()
    monkeypatch.delenv("MOEPASS_NATIVE")
    for cxx, words in (("/nonexistent/c++", "no C++ compiler"), ("false", "failed")):
        monkeypatch.setattr(native, "_loaded", {})
        monkeypatch.setattr(cpu_qgemv, "_ready", [])
        monkeypatch.setenv("CXX", cxx)
        with caplog.at_level(logging.INFO, logger="moepass.lowering.native"):
            caplog.clear()
            assert not cpu_qgemv.available() and not cpu_qgemv.available()
        assert words in cpu_qgemv.unavailable_reason()
        assert sum("not available" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="not available"):
        cpu_qgemv.project(torch.zeros(1, 64), torch.zeros(1, 8), cpu_qgemv.expert_tasks([1]),
                          [torch.zeros(1, 8, 32, dtype=torch.uint8), torch.ones(1, 8, 2)], None, parse_scheme("int4", 32))

    timed = []

    def timer(label, names):
        timed.extend(names)
        return {name: 1e-3 for name in names}

    monkeypatch.setenv("MOEPASS_TUNING", "auto")
    tuning.forget_measured()
    scheme = parse_scheme("int4", 32)
    layouts = [quantize_rtn(torch.randn(2, 64, 32), scheme), quantize_rtn(torch.randn(2, 32, 32), scheme)]
    with tuning.measurement_override(timer):
        assert choose_form(scheme, layouts, torch.bfloat16, 30.0, "test")[0] == "aten_cpu"
    tuning.forget_measured()
    assert timed and set(timed) == {"aten_cpu:aten", "aten_cpu:dequant"}
    assert cpu_quantized.choose_quantized_kernel(scheme, "native", 1, 64, 32, torch.bfloat16) == "dequant"


@pytest.mark.native
def test_tuning_on_chooses_native_only_where_it_measured_faster(native_library, monkeypatch, tmp_path):
    """With tuning on the native form is a candidate; the block takes it when its kernels measured faster by
    the margin — counting what its fused few-token path saves around the kernels — ATen's form otherwise, and
    the run-time kernel columns follow the table."""
    from moepass.compiler.spec import ExpertsSpec
    from moepass.lowering.cpu_quantized_tuning import choose_form

    monkeypatch.setenv("MOEPASS_TUNING", "auto")
    scheme = parse_scheme("int4", 32)
    layouts = [quantize_rtn(torch.randn(2, 64, 32), scheme), quantize_rtn(torch.randn(2, 32, 32), scheme)]

    def timer_for(native_seconds, native_dequant=1e-3, overheads=(1e-3, 1e-3), decode=(1e-3, 1e-3)):
        def timer(label, names):
            if label.startswith("quantized op overhead"):  # the whole op on a tiny block, both forms
                assert sorted(names) == ["aten_cpu", "native"]
                return dict(zip(("aten_cpu", "native"), overheads))
            if label.startswith("quantized op "):  # the whole op at one token on the block's own shapes
                assert sorted(names) == ["aten_cpu", "native"] and "64x32 32x32 silu/concat" in label
                return dict(zip(("aten_cpu", "native"), decode))
            assert sorted(names) == ["aten_cpu:aten", "aten_cpu:dequant", "native:dequant", "native:gemv"]
            return {name: (native_seconds if name == "native:gemv" else native_dequant if name == "native:dequant"
                           else 1e-3) for name in names}
        return timer

    cases = [((0.5e-3,), "native"), ((0.95e-3,), "aten_cpu"), ((2e-3,), "aten_cpu"),
             # kernels 5% slower than ATen's, but the native form's fused few-token calls save 1.5 ms of the op
             # around them (rows 1, 4 and 16 run fused): the native form; without that saving ATen's
             ((1.05e-3, 2e-3, (2e-3, 0.5e-3)), "native"), ((1.05e-3, 2e-3, (1e-3, 1e-3)), "aten_cpu"),
             # given the block's MLP, the whole op at one token is timed in both forms and replaces the one-row
             # sums: projections 20% slower, but the op at one token 20× faster
             ((1.2e-3, 2e-3, (1e-3, 1e-3), (20e-3, 1e-3)), "native"),
             ((1.2e-3, 2e-3, (1e-3, 1e-3), (1e-3, 1e-3)), "aten_cpu")]
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=2, hidden_size=32, intermediate_size=32,
                       activation="silu", gated=True, gate_up_layout="concat")
    for index, (timing, form) in enumerate(cases):
        native_seconds = timing[0]
        monkeypatch.setenv("MOEPASS_CACHE_DIR", str(tmp_path / str(index)))  # measured afresh
        tuning.forget_measured()
        with tuning.measurement_override(timer_for(*timing)):
            given = spec if len(timing) > 3 else None
            assert choose_form(scheme, layouts, torch.bfloat16, 30.0, "test", spec=given)[0] == form, timing
        expected = "gemv" if native_seconds < min(timing[1:2] or (1e-3,)) else "dequant"
        assert cpu_quantized.choose_quantized_kernel(scheme, "native", 1, 64, 32, torch.bfloat16) == expected
    tuning.forget_measured()
