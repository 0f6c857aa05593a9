"""The CPU experts lowering against the plain per-slot reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from moepass.compiler.spec import ExpertsSpec
from moepass.lowering import cpu, reference
from moepass.runtime.stats import count_gemm_rows


def _problem(tokens, experts, slots, hidden, inter, spec_kwargs, dtype, empty_fraction, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=experts, hidden_size=hidden, intermediate_size=inter, **spec_kwargs)
    n1 = 2 * inter if spec.gated else inter
    if spec.transposed:
        w1, w2 = torch.randn(experts, hidden, n1, generator=g), torch.randn(experts, inter, hidden, generator=g)
    else:
        w1, w2 = torch.randn(experts, n1, hidden, generator=g), torch.randn(experts, hidden, inter, generator=g)
    w1, w2 = (w1 * 0.2).to(dtype), (w2 * 0.2).to(dtype)
    b1 = (torch.randn(experts, n1, generator=g) * 0.1).to(dtype) if spec.has_bias else None
    b2 = (torch.randn(experts, hidden, generator=g) * 0.1).to(dtype) if spec.has_bias else None
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=g)[:slots] for _ in range(tokens)])
    empty = torch.rand(tokens, slots, generator=g) < empty_fraction
    ids = ids.masked_fill(empty, experts)
    weights = torch.rand(tokens, slots, generator=g).masked_fill(empty, 0.0)
    return spec, (x, ids, weights, w1, w2, b1, b2)


VARIANTS = {
    "silu-concat": dict(activation="silu"),
    "gelu": dict(activation="gelu"),
    "gelu-tanh": dict(activation="gelu_tanh"),
    "relu-plain": dict(activation="relu", gated=False, gate_up_layout="none"),
    "swiglu-oss": dict(activation="swiglu_clamp", gate_up_layout="interleaved", transposed=True, has_bias=True),
    "weight-on-input": dict(activation="silu", transposed=True, weight_on_input=True),
    "silu-biases": dict(activation="silu", has_bias=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tokens,experts,slots", [(1, 4, 1), (7, 8, 2), (33, 8, 4), (20, 16, 2)])
def test_cpu_matches_reference(variant, tokens, experts, slots):
    spec, args = _problem(tokens, experts, slots, 16, 24, VARIANTS[variant], torch.float32, empty_fraction=0.3)
    expected = reference.experts_forward(*args, spec)
    actual = cpu.experts_forward(*args, spec)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision(dtype):
    spec, args = _problem(17, 8, 2, 32, 48, VARIANTS["silu-concat"], dtype, empty_fraction=0.2)
    expected = reference.experts_forward(*args, spec)
    actual = cpu.experts_forward(*args, spec)
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.float(), expected.float(), rtol=3e-2, atol=3e-2)


def test_a_call_outside_inference_mode_after_one_inside_it():
    """Scratch buffers kept from an inference_mode call must stay writable in no_grad (and grad) mode."""
    from moepass.lowering.workspace import release_workspace

    release_workspace()
    # big enough that the gathered rows come from a kept buffer (>= 1 MiB)
    spec, args = _problem(2048, 8, 2, 256, 64, VARIANTS["silu-concat"], torch.float32, empty_fraction=0.2)
    with torch.inference_mode():
        inside = cpu.experts_forward(*args, spec)
    with torch.no_grad():
        outside = cpu.experts_forward(*args, spec)
    torch.testing.assert_close(outside, inside.clone(), rtol=0, atol=0)


def test_empty_slots_cost_no_gemm_rows():
    spec, args = _problem(40, 8, 2, 16, 24, VARIANTS["silu-concat"], torch.float32, empty_fraction=0.45)
    ids = args[1]
    with count_gemm_rows() as rows:
        cpu.experts_forward(*args, spec)
    non_empty = int((ids < spec.num_experts).sum())
    assert sum(rows) == non_empty < ids.numel()
    # one GEMM pair per expert that received rows
    assert len(rows) == len(set(ids[ids < spec.num_experts].tolist()))


def test_all_slots_empty_gives_zeros():
    spec, (x, ids, weights, w1, w2, b1, b2) = _problem(5, 4, 2, 8, 12, VARIANTS["silu-concat"], torch.float32, 0.0)
    ids = torch.full_like(ids, 4)
    out = cpu.experts_forward(x, ids, torch.zeros_like(weights), w1, w2, b1, b2, spec)
    assert torch.equal(out, torch.zeros_like(x))


def test_all_tokens_on_one_expert():
    spec, (x, ids, weights, w1, w2, b1, b2) = _problem(9, 4, 1, 8, 12, VARIANTS["silu-concat"], torch.float32, 0.0)
    ids = torch.full_like(ids, 3)
    expected = reference.experts_forward(x, ids, weights, w1, w2, b1, b2, spec)
    torch.testing.assert_close(cpu.experts_forward(x, ids, weights, w1, w2, b1, b2, spec), expected)


def test_experts_op_dispatches_to_lowerings():
    from moepass.runtime.ops import ExpertsConfig

    spec, args = _problem(6, 4, 2, 8, 12, VARIANTS["silu-concat"], torch.float32, 0.3)
    results = [
        torch.ops.moepass.experts(*args, ExpertsConfig(spec=spec, lowering=lowering).to_json())
        for lowering in ("auto", "cpu", "reference")
    ]
    for a, b in itertools.pairwise(results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tokens,slots", [(1, 2), (3, 8), (40, 8), (700, 8)])
def test_slot_plan_in_numpy_equals_the_tensor_plan_and_a_stable_sort(tokens, slots):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, 9, (tokens, slots), generator=g)  # 8 = E: empty slots
    ids[0, -1] = -1  # out of range: empty too
    small = cpu.plan_slots(ids, 8)  # CPU int64 ids: the NumPy plan
    large = cpu.plan_slots(ids.to(torch.int32), 8)  # other ids: the torch-ops plan
    assert small.counts == large.counts
    for name in ("row_token", "row_slot", "slot_row"):
        assert torch.equal(getattr(small, name), getattr(large, name).long()), name
    keys = [e if 0 <= e < 8 else 8 for e in ids.flatten().tolist()]
    stable = sorted(range(len(keys)), key=keys.__getitem__)
    assert small.row_slot.tolist() == stable[: small.rows]
    live = ids.flatten()
    live = live[(live >= 0) & (live < 8)]
    assert small.counts == torch.bincount(live, minlength=8).tolist()



# --- the kernel table and each kernel -------------------------------------------------


@pytest.fixture
def forced_kernel(monkeypatch):
    """Make every projection take one kernel at one row (gemv: at one row; token-major above; packed
    only where packing is allowed)."""
    from moepass.lowering import cpu_choice

    def force(kernel: str) -> None:
        def choices(dtype, out_features, in_features, packed):
            return (1,), (kernel if kernel != "packed" or packed else "token_major",)

        monkeypatch.setattr(cpu_choice, "projection_choices", choices)

    yield force


@pytest.mark.parametrize("kernel", ["token_major", "weight_major", "gemv", "onednn", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["silu-concat", "relu-plain", "gelu", "silu-biases"])
def test_every_kernel_matches_the_reference(kernel, dtype, variant, forced_kernel):
    from moepass.lowering import cpu_packed

    forced_kernel(kernel)
    spec, args = _problem(12, 8, 2, 16, 24, VARIANTS[variant], dtype, empty_fraction=0.3, seed=3)
    expected = reference.experts_forward(*args, spec)
    with count_gemm_rows() as rows:
        actual = cpu.experts_forward(*args, spec, prepack="on")
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=tolerance)
    ids = args[1]
    assert sum(rows) == int((ids < spec.num_experts).sum())  # empty slots cost no GEMM row
    packed = kernel == "packed" and dtype == torch.bfloat16  # only bfloat16 weights are packed
    entry = cpu_packed._entries.get((id(args[3]),))
    assert (entry is not None and any(m is not None for m in entry.matrices)) == packed


def test_choose_kernel_reads_this_machines_table_by_nearest_shape_and_row_count(tmp_path, monkeypatch):
    from moepass.lowering import cpu_choice
    from moepass.runtime import tuning

    monkeypatch.setenv("MOEPASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_choice, "FAMILY", tuning.Family("cpu_experts", 1, shipped=None))  # this table only
    key = cpu_choice.projection_key
    tuning.store(cpu_choice.FAMILY, key(torch.float32, 100, 100, False),
                 {"kernels": {"1": "gemv", "2": "weight_major", "8": "token_major"}})
    tuning.store(cpu_choice.FAMILY, key(torch.float32, 5000, 1000, False), {"kernels": {"1": "token_major", "4": "weight_major"}})
    tuning.store(cpu_choice.FAMILY, key(torch.float32, 5000, 1000, True), {"kernels": {"1": "packed"}})
    choose = cpu_choice.choose_kernel
    assert choose(1, (90, 120), torch.float32, False) == "gemv"  # nearest shape: 100x100
    assert [choose(r, (90, 120), torch.float32, False) for r in (2, 7, 8)] == ["weight_major"] * 2 + ["token_major"]
    assert choose(4, (6000, 900), torch.float32, False) == "weight_major"
    assert choose(6, (6000, 900), torch.float32, False) == "token_major"  # above the table
    assert choose(64, (6000, 900), torch.float32, False, packed=True) == "packed"  # packed won at the largest
    assert choose(64, (6000, 900), torch.float32, False, packed=False) == "token_major"
    assert choose(3, (90, 120), torch.float32, True) == "token_major"  # [in, out] weights
    assert choose(1, (90, 120), torch.float64, False) == "token_major"  # a dtype no table covers


def test_packed_copies_follow_in_place_updates_and_die_with_the_weight(forced_kernel):
    import gc

    from moepass.lowering import cpu_packed

    forced_kernel("packed")
    spec, (x, ids, weights, w1, w2, b1, b2) = _problem(10, 8, 2, 16, 24, VARIANTS["silu-concat"], torch.bfloat16, 0.2)
    before = cpu_packed.packed_bytes()
    cpu.experts_forward(x, ids, weights, w1, w2, b1, b2, spec, prepack="on")
    assert cpu_packed.packed_bytes() == before + (w1.numel() + w2.numel()) * 2
    with torch.no_grad():
        w1.mul_(-1.5)  # the packed copies are stale now
    expected = reference.experts_forward(x, ids, weights, w1, w2, b1, b2, spec)
    actual = cpu.experts_forward(x, ids, weights, w1, w2, b1, b2, spec, prepack="on")
    torch.testing.assert_close(actual.float(), expected.float(), rtol=3e-2, atol=3e-2)
    off = cpu.experts_forward(x, ids, weights, w1, w2, b1, b2, spec, prepack="off")
    torch.testing.assert_close(actual.float(), off.float(), rtol=1e-2, atol=1e-2)
    del w1, w2
    gc.collect()
    assert cpu_packed.packed_bytes() == before


def test_a_view_taken_anew_each_call_is_packed_once(forced_kernel):
    """moepass.make_traceable's LongCat forward passes gate_up_proj[:E], a new view per call."""
    from moepass.lowering import cpu_packed

    forced_kernel("packed")
    spec, (x, ids, weights, w1, w2, b1, b2) = _problem(10, 8, 2, 16, 24, VARIANTS["silu-concat"], torch.bfloat16, 0.0)
    stored = torch.cat([w1, torch.zeros_like(w1[:3])])  # rows past E unused (LongCat's identity experts)
    before = cpu_packed.packed_bytes()
    first = cpu.experts_forward(x, ids, weights, stored[:8], w2, b1, b2, spec, prepack="on")
    matrix = cpu_packed.packed_matrix(stored[:8], int(ids[0, 0]))
    second = cpu.experts_forward(x, ids, weights, stored[:8], w2, b1, b2, spec, prepack="on")
    assert cpu_packed.packed_matrix(stored[:8], int(ids[0, 0])) is matrix  # not repacked for the new view
    assert cpu_packed.packed_bytes() == before + (w1.numel() + w2.numel()) * 2
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_auto_prepack_stays_within_the_memory_available(forced_kernel, monkeypatch, caplog):
    from moepass.lowering import cpu_packed

    forced_kernel("packed")
    spec, args = _problem(6, 8, 2, 16, 24, VARIANTS["silu-concat"], torch.bfloat16, 0.0, seed=5)
    monkeypatch.setattr(cpu_packed, "_available_memory", lambda: 1000)  # bytes: far less than the weights
    with caplog.at_level("INFO", logger="moepass.lowering.cpu_packed"):
        cpu.experts_forward(*args, spec, prepack="auto")
    assert not cpu_packed._entries[(id(args[3]),)].allowed
    assert "not packed" in caplog.text and "cpu_prepack='on'" in caplog.text
    monkeypatch.setattr(cpu_packed, "_available_memory", lambda: 1 << 40)
    spec, args = _problem(6, 8, 2, 16, 24, VARIANTS["silu-concat"], torch.bfloat16, 0.0, seed=6)
    cpu.experts_forward(*args, spec, prepack="auto")
    assert cpu_packed._entries[(id(args[3]),)].allowed
