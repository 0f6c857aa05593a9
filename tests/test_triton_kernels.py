"""The Triton experts kernels, run in Triton's CPU interpreter, against a pure-torch reference.

Every test here runs with ``TRITON_INTERPRET=1`` set by a module-scoped fixture
(and restored after), so nothing leaks into other test modules: the kernels
choose compiled or interpreted form at launch time
(:mod:`moepass.kernels._jit`), not at import.  The interpreter is slow, so
the problem matrix is pairwise (every pair of values of any two factors
appears in some case), modelled on vLLM's fused-MoE tests: tokens
{1, 7, 33, 128}, experts {4, 8, 16}, k {1, 2, 4}, fp32/fp16/bf16, each
activation, layout, bias and weight-on-input variant, variable k per token,
tokens with every slot empty, all tokens on one expert, H and I that are not
multiples of 16, and tiles forced small enough to loop.
"""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from moepass.kernels import launch  # noqa: E402
from moepass.kernels.config_store import (  # noqa: E402
    GemmConfig,
    MoEKernelConfig,
    clear_config_cache,
    config_file_name,
    heuristic_config,
    lookup_config,
    override_config,
    save_config_file,
)
from moepass.lowering import triton as triton_lowering  # noqa: E402

from moepass.compiler.spec import ExpertsSpec  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    """Run this module's kernels in Triton's CPU interpreter, and only this module's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


# --- the pure-torch reference ----------------------------------------------------------


def _act(h: torch.Tensor, spec: ExpertsSpec) -> torch.Tensor:
    """The expert activation on the first projection [.., N1] -> [.., I], written out plainly."""
    if not spec.gated:
        gate, up = h, None
    elif spec.gate_up_layout == "interleaved":
        gate, up = h[..., 0::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if spec.activation == "swiglu_clamp":
        gate = gate.clamp(max=spec.swiglu_limit)
        up = up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
        return (up + 1) * gate * torch.sigmoid(spec.swiglu_alpha * gate)
    act = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
        "relu": F.relu,
    }[spec.activation](gate)
    return act if up is None else act * up


def reference_experts(x, ids, weights, w1, w2, b1, b2, spec: ExpertsSpec) -> torch.Tensor:
    """Dense float64 reference: every expert on every token, masked by the routing."""
    xd = x.double()
    out = torch.zeros_like(xd)
    for e in range(spec.num_experts):
        first = w1[e].double() if spec.transposed else w1[e].double().t()
        second = w2[e].double() if spec.transposed else w2[e].double().t()
        for j in range(ids.shape[1]):
            chosen = (ids[:, j] == e).double().unsqueeze(1)
            w = weights[:, j].double().unsqueeze(1) * chosen
            inp = xd * w if spec.weight_on_input else xd
            h = inp @ first + (b1[e].double() if b1 is not None else 0)
            y = _act(h, spec) @ second + (b2[e].double() if b2 is not None else 0)
            out += y * (chosen if spec.weight_on_input else w)
    return out


# --- problems ----------------------------------------------------------------------


VARIANTS = {
    "silu": dict(activation="silu"),
    "gelu": dict(activation="gelu"),
    "gelu_tanh-bias": dict(activation="gelu_tanh", has_bias=True),
    "relu-plain": dict(activation="relu", gated=False, gate_up_layout="none"),
    "silu-plain-transposed": dict(activation="silu", gated=False, gate_up_layout="none", transposed=True),
    "swiglu_clamp-oss": dict(activation="swiglu_clamp", gate_up_layout="interleaved", transposed=True, has_bias=True),
    "silu-interleaved": dict(activation="silu", gate_up_layout="interleaved"),
    "weight_on_input-llama4": dict(activation="silu", transposed=True, weight_on_input=True),
}

#: (H, I): multiples of 16, and neither.
SIZES = [(32, 48), (40, 24), (33, 19)]

#: Routing patterns: random top-k with some empty slots (variable k per token),
#: random with every slot of some tokens empty, every token on one expert.
ROUTINGS = ["variable_k", "some_tokens_empty", "one_expert"]

#: None: the heuristic; otherwise tiles forced small so K and N loop and rows group.
TILES = {
    "heuristic": None,
    "small": MoEKernelConfig(16, GemmConfig(16, 16, GROUP_M=2), GemmConfig(16, 16, GROUP_M=2)),
    "bm32": MoEKernelConfig(32, GemmConfig(32, 32), GemmConfig(32, 16)),
}

TOLERANCE = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def make_problem(tokens, experts, k, variant, dtype, sizes, routing, seed=0):
    """Random inputs of the experts op, as (spec, (x, ids, weights, w1, w2, b1, b2))."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter = sizes
    spec = ExpertsSpec(
        dispatch="grouped_mm", num_experts=experts, hidden_size=hidden, intermediate_size=inter, **VARIANTS[variant]
    )
    n1 = 2 * inter if spec.gated else inter
    w1 = torch.randn(experts, hidden, n1, generator=g) if spec.transposed else torch.randn(experts, n1, hidden, generator=g)
    w2 = torch.randn(experts, inter, hidden, generator=g) if spec.transposed else torch.randn(experts, hidden, inter, generator=g)
    w1, w2 = (w1 / hidden**0.5).to(dtype), (w2 / inter**0.5).to(dtype)
    b1 = (torch.randn(experts, n1, generator=g) * 0.1).to(dtype) if spec.has_bias else None
    b2 = (torch.randn(experts, hidden, generator=g) * 0.1).to(dtype) if spec.has_bias else None
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    if routing == "one_expert":
        ids = torch.full_like(ids, experts - 1)[:, :1].expand(tokens, k).clone()
        ids[:, 1:] = experts  # one real slot each; the rest empty
    else:
        empty = torch.rand(tokens, k, generator=g) < 0.3
        if routing == "some_tokens_empty":
            empty[:: max(2, tokens // 3)] = True
        ids = ids.masked_fill(empty, experts)
    weights = weights.masked_fill(ids >= experts, 0.0)
    return spec, (x, ids, weights, w1, w2, b1, b2)


def pairwise(factors: dict[str, list]) -> list[dict]:
    """A small set of cases covering every pair of values of every two factors (greedy)."""
    names = list(factors)
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(names, 2)
        for va in range(len(factors[a]))
        for vb in range(len(factors[b]))
    }
    cases = []
    while uncovered:
        a, va, b, vb = min(uncovered)
        case = {a: va, b: vb}
        for name in names:  # fill the rest greedily: most new pairs covered
            if name in case:
                continue

            def gain(v, name=name):
                return sum(
                    ((n, case[n], name, v) if names.index(n) < names.index(name) else (name, v, n, case[n])) in uncovered
                    for n in case
                )

            case[name] = max(range(len(factors[name])), key=gain)
        uncovered -= {
            (x, case[x], y, case[y]) for x, y in itertools.combinations(names, 2)
        }
        cases.append({name: factors[name][i] for name, i in case.items()})
    return cases


FACTORS = {
    "variant": list(VARIANTS),
    "tokens": [1, 7, 33, 128],
    "experts": [4, 8, 16],
    "k": [1, 2, 4],
    "dtype": [torch.float32, torch.float16, torch.bfloat16],
    "sizes": SIZES,
    "routing": ROUTINGS,
    "tiles": list(TILES),
}
CASES = pairwise(FACTORS)


def _case_id(case):
    return "-".join(
        [case["variant"], f"T{case['tokens']}", f"E{case['experts']}", f"k{case['k']}", str(case["dtype"])[6:],
         "H{}I{}".format(*case["sizes"]), case["routing"], case["tiles"]]
    )


def _assert_matches_reference(actual, expected, dtype):
    assert actual.dtype == dtype
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale)


def test_pairwise_matrix_covers_every_pair():
    covered = {
        (a, str(c[a]), b, str(c[b])) for c in CASES for a, b in itertools.combinations(FACTORS, 2)
    }
    for a, b in itertools.combinations(FACTORS, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            assert (a, str(va), b, str(vb)) in covered
    assert len(CASES) < 50


# --- the whole lowering against the reference ---------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_experts_match_reference(case):
    spec, args = make_problem(
        case["tokens"], case["experts"], case["k"], case["variant"], case["dtype"], case["sizes"], case["routing"]
    )
    expected = reference_experts(*args, spec)
    tiles = TILES[case["tiles"]]
    if tiles is None:
        actual = triton_lowering.experts_forward(*args, spec)
    else:
        with override_config(tiles):
            actual = triton_lowering.experts_forward(*args, spec)
    _assert_matches_reference(actual, expected, case["dtype"])


def test_all_slots_empty_gives_zeros():
    spec, (x, ids, weights, w1, w2, b1, b2) = make_problem(9, 8, 2, "gelu_tanh-bias", torch.float32, (32, 48), "variable_k")
    ids = torch.full_like(ids, 8)
    out = triton_lowering.experts_forward(x, ids, torch.zeros_like(weights), w1, w2, b1, b2, spec)
    assert torch.equal(out, torch.zeros_like(x))


def test_ids_outside_range_are_empty():
    spec, (x, ids, weights, w1, w2, b1, b2) = make_problem(7, 4, 2, "silu", torch.float32, (32, 48), "variable_k")
    odd = ids.clone()
    odd[ids == 4] = -1  # any id outside [0, E) is empty, not just the sentinel E
    odd[0, 0], weights[0, 0] = 97, 0.0
    expected = reference_experts(x, ids.masked_fill(odd == 97, 4), weights, w1, w2, b1, b2, spec)
    actual = triton_lowering.experts_forward(x, odd, weights, w1, w2, b1, b2, spec)
    _assert_matches_reference(actual, expected, torch.float32)


def test_non_contiguous_weights_need_no_copy():
    spec, (x, ids, weights, w1, w2, b1, b2) = make_problem(7, 4, 2, "silu", torch.float32, (32, 48), "variable_k")
    # the same matrices stored transposed, seen through a transposed view
    w1_view = w1.transpose(1, 2).contiguous().transpose(1, 2)
    w2_view = w2.transpose(1, 2).contiguous().transpose(1, 2)
    expected = reference_experts(x, ids, weights, w1, w2, b1, b2, spec)
    _assert_matches_reference(triton_lowering.experts_forward(x, ids, weights, w1_view, w2_view, b1, b2, spec), expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lifted_activation_runs_between_the_gemm_kernels(dtype):
    """A lifted activation: the gate/up kernel stores the raw projection, the program runs, then the down kernel."""
    from moepass.compiler.lifted import ElementwiseProgram

    gated, (x, ids, weights, w1, w2, b1, b2) = make_problem(33, 8, 2, "gelu_tanh-bias", dtype, (40, 24), "variable_k")
    inter = gated.intermediate_size
    program = ElementwiseProgram(
        (("input",), ("slice", ("v", 0), 0, inter, 1), ("slice", ("v", 0), inter, 2 * inter, 1),
         ("clamp", ("v", 1), None, 0.5), ("gelu_tanh", ("v", 3)), ("tanh", ("v", 2)), ("mul", ("v", 4), ("v", 5)))
    )
    lifted = ExpertsSpec(dispatch="grouped_mm", num_experts=8, hidden_size=40, intermediate_size=inter,
                         activation="lifted", gated=False, gate_up_layout="none", has_bias=True,
                         program=program.to_json())
    # the same experts with tanh(up) and clamped gate written out in the reference
    expected = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(8):
        for j in range(ids.shape[1]):
            chosen = (ids[:, j] == e).double().unsqueeze(1)
            h = x.double() @ w1[e].double().t() + b1[e].double()
            a = F.gelu(h[:, :inter].clamp(max=0.5), approximate="tanh") * torch.tanh(h[:, inter:])
            expected += (a @ w2[e].double().t() + b2[e].double()) * weights[:, j].double().unsqueeze(1) * chosen
    actual = triton_lowering.experts_forward(x, ids, weights, w1, w2, b1, b2, lifted)
    _assert_matches_reference(actual, expected, dtype)


# --- the alignment kernel: structure ----------------------------------------------------


@pytest.mark.parametrize(
    "tokens,experts,k,block_m,routing",
    [(1, 4, 1, 16, "variable_k"), (7, 8, 2, 16, "some_tokens_empty"), (33, 16, 4, 32, "variable_k"),
     (128, 8, 4, 64, "variable_k"), (128, 4, 2, 16, "one_expert"), (1100, 16, 2, 16, "variable_k")],
)
def test_alignment_rows_are_exactly_the_non_empty_slots(tokens, experts, k, block_m, routing):
    _, (_, ids, *_) = make_problem(tokens, experts, k, "silu", torch.float32, (16, 16), routing)
    sorted_slots, block_experts, padded_rows = launch.align_slots(ids, experts, block_m)
    flat = ids.reshape(-1)
    num_slots = flat.numel()
    filled = torch.nonzero(flat < experts).flatten()
    counts = torch.bincount(flat[filled], minlength=experts)
    padded = int(padded_rows)

    # rows used: each expert's slots padded to block_m, nothing for empty slots
    assert padded == int(((counts + block_m - 1) // block_m * block_m).sum())
    rows = sorted_slots[:padded]
    real = rows[rows < num_slots]
    assert real.numel() == filled.numel() == int((ids < experts).sum())  # one row per non-empty slot
    assert torch.equal(real.sort().values.long(), filled)  # each exactly once
    assert bool((sorted_slots[padded:] == num_slots).all())  # unused tail is padding

    # every row block belongs to one expert, holds only that expert's slots, in slot order
    per_block = rows.view(-1, block_m)
    for b, block in enumerate(per_block):
        expert = int(block_experts[b])
        slots = block[block < num_slots].long()
        assert bool((flat[slots] == expert).all())
        assert bool((slots[1:] > slots[:-1]).all())
    assert bool((block_experts[padded // block_m :] == -1).all())
    assert len(set(block_experts[: padded // block_m].tolist())) == int((counts > 0).sum())


def test_alignment_of_all_empty_slots_has_no_rows():
    ids = torch.full((5, 2), 8)
    sorted_slots, _, padded_rows = launch.align_slots(ids, 8, 16)
    assert int(padded_rows) == 0
    assert bool((sorted_slots == 10).all())


def test_combine_sums_in_slot_order_and_skips_empty_slots():
    ids = torch.tensor([[0, 3], [3, 3], [1, 2]])  # E = 3: id 3 is empty
    y = torch.arange(6 * 4, dtype=torch.float32).view(6, 4)
    y[[1, 2, 3]] = float("nan")  # rows of empty slots are garbage; must not be read
    out = launch.combine_slots(y, ids, 3)
    assert torch.equal(out, torch.stack([y[0], torch.zeros(4), y[4] + y[5]]))


# --- custom ops ----------------------------------------------------------------------


def test_kernel_ops_schemas_and_fake_implementations():
    spec, (x, ids, weights, w1, w2, b1, b2) = make_problem(7, 4, 2, "swiglu_clamp-oss", torch.float32, (32, 48), "variable_k")
    config = heuristic_config(7, 2, 4, 32, 48, torch.float32)
    spec_json = triton_lowering._spec_json(spec)
    ops = torch.ops.moepass
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.triton_align_slots, (ids, 4, config.BLOCK_M), test_utils=checks)
    alignment = ops.triton_align_slots(ids, 4, config.BLOCK_M)
    gate_up_args = (x, weights, *alignment, w1, b1, spec_json, config.to_json())
    torch.library.opcheck(ops.triton_gate_up, gate_up_args, test_utils=checks)
    h = ops.triton_gate_up(*gate_up_args)
    torch.library.opcheck(ops.triton_down, (h, weights, *alignment, w2, b2, spec_json, config.to_json()), test_utils=checks)
    y = ops.triton_down(h, weights, *alignment, w2, b2, spec_json, config.to_json())
    torch.library.opcheck(ops.triton_combine_slots, (y, ids, 4), test_utils=checks)


def test_cpu_tensors_without_interpreter_raise_a_clear_error(monkeypatch):
    from moepass.runtime.ops import ExpertsConfig

    monkeypatch.delenv("TRITON_INTERPRET")
    spec, args = make_problem(3, 4, 2, "silu", torch.float32, (16, 16), "variable_k")
    with pytest.raises(launch.TritonUnavailableError, match="TRITON_INTERPRET=1"):
        triton_lowering.experts_forward(*args, spec)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch.ops.moepass.experts(*args, ExpertsConfig(spec=spec, lowering="triton").to_json())


def test_interpreted_runs_leave_triton_as_they_found_it():
    # Interpreted launches patch triton.language and JITFunction while they
    # run; afterwards compiled kernels (and other tests) must see them untouched.
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    namespaces = (tl, tl.core, tl.standard, tl.math, tl.tensor, tl.dtype)
    before = [dict(vars(n)) for n in namespaces]
    call = JITFunction.__call__
    spec, args = make_problem(7, 4, 2, "gelu_tanh-bias", torch.float32, (32, 48), "variable_k")
    triton_lowering.experts_forward(*args, spec)
    assert JITFunction.__call__ is call
    for namespace, old in zip(namespaces, before):
        now = vars(namespace)
        # Triton's interpreter adds its own helper names to the modules of the
        # functions it rewrites (never overwriting); nothing that was there changes.
        changed = [name for name, value in old.items() if now.get(name, None) is not value]
        assert not changed, f"{namespace.__name__}: {changed}"


# --- configs ---------------------------------------------------------------------------


def test_tuned_file_lookup_takes_the_nearest_token_count(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPASS_TRITON_CONFIG_DIR", str(tmp_path))
    clear_config_cache()
    small = MoEKernelConfig(16, GemmConfig(32, 64), GemmConfig(32, 64))
    large = MoEKernelConfig(64, GemmConfig(64, 32, GROUP_M=8), GemmConfig(128, 32))
    name = config_file_name(8, 32, 48, torch.bfloat16, "cpu")
    assert name == "E=8,H=32,I=48,dtype=bfloat16,device=cpu.json"
    save_config_file(tmp_path / name, {"num_experts": 8}, {1: small, 256: large})
    try:
        common = dict(num_experts=8, hidden=32, inter=48, dtype=torch.bfloat16, device=torch.device("cpu"), top_k=2)
        assert lookup_config(tokens=1, **common) == small
        assert lookup_config(tokens=100, **common) == small
        assert lookup_config(tokens=200, **common) == large
        assert lookup_config(tokens=5000, **common) == large
        with override_config({"BLOCK_M": 32, "gate_up": {"BLOCK_N": 16, "BLOCK_K": 16}, "down": {"BLOCK_N": 16, "BLOCK_K": 16}}) as forced:
            assert lookup_config(tokens=1, **common) == forced
        assert lookup_config(tokens=1, **common) == small
        # a tuned file steers the real kernels
        spec, args = make_problem(7, 8, 2, "silu", torch.bfloat16, (32, 48), "variable_k")
        expected = reference_experts(*args, spec)
        _assert_matches_reference(triton_lowering.experts_forward(*args, spec), expected, torch.bfloat16)
    finally:
        clear_config_cache()


def test_missing_tuned_file_falls_back_to_a_logged_heuristic(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MOEPASS_TRITON_CONFIG_DIR", str(tmp_path))
    clear_config_cache()
    common = dict(num_experts=6, hidden=24, inter=40, dtype=torch.float16, device=torch.device("cpu"), top_k=2)
    with caplog.at_level(logging.INFO, logger="moepass.kernels.config_store"):
        first = lookup_config(tokens=3, **common)
        lookup_config(tokens=3, **common)
    fallbacks = [r for r in caplog.records if "no tuned Triton MoE config" in r.getMessage()]
    assert len(fallbacks) == 1  # logged once per missing file
    assert "E=6,H=24,I=40,dtype=float16,device=cpu.json" in fallbacks[0].getMessage()
    assert first == heuristic_config(3, 2, 6, 24, 40, torch.float16)
    clear_config_cache()


def test_heuristic_tiles_grow_with_rows_per_expert_and_fit_shared_memory():
    from moepass.kernels.config_store import MAX_SHARED_BYTES, pipeline_bytes

    decode = heuristic_config(1, 2, 8, 4096, 14336, torch.bfloat16)
    prefill = heuristic_config(4096, 2, 8, 4096, 14336, torch.bfloat16)
    assert decode.BLOCK_M == 16 < prefill.BLOCK_M == 128
    fp32 = heuristic_config(4096, 2, 8, 4096, 14336, torch.float32)
    for cfg, element_bytes in ((decode, 2), (prefill, 2), (fp32, 4)):
        gate_up, down = cfg.gate_up, cfg.down
        assert pipeline_bytes(cfg.BLOCK_M, gate_up.BLOCK_N, gate_up.BLOCK_K, element_bytes, gate_up.num_stages, 2) <= MAX_SHARED_BYTES
        assert pipeline_bytes(cfg.BLOCK_M, down.BLOCK_N, down.BLOCK_K, element_bytes, down.num_stages, 1) <= MAX_SHARED_BYTES


def test_tune_reads_shapes_from_configs_without_downloading(tmp_path):
    from moepass.kernels.tune import ExpertShape, resolve_shape

    from moepass.zoo import tiny_config

    assert resolve_shape("8,4096,14336,2") == ExpertShape(8, 4096, 14336, 2)
    assert resolve_shape("zoo:mixtral") == resolve_shape("mixtral") == ExpertShape(4, 64, 128, 2)
    tiny_config("qwen2_moe").save_pretrained(tmp_path)
    assert resolve_shape(str(tmp_path)) == ExpertShape(4, 64, 32, 2)  # the experts' own intermediate size
    assert resolve_shape(str(tmp_path / "config.json")) == ExpertShape(4, 64, 32, 2)
    with pytest.raises(ValueError, match="zoo family"):
        resolve_shape("mistralai/Mixtral-8x7B-v0.1")


def test_tune_writes_a_file_that_lookup_uses(tmp_path, monkeypatch):
    from moepass.cli.main import main

    monkeypatch.setenv("MOEPASS_PROGRESS", "0")
    monkeypatch.setenv("MOEPASS_TRITON_CONFIG_DIR", str(tmp_path))
    clear_config_cache()
    try:
        assert main(["tune", "4,160,96,2", "--tokens", "2", "9", "--dtype", "float32", "--quick", "--out", str(tmp_path)]) == 0
        path = tmp_path / "E=4,H=160,I=96,dtype=float32,device=cpu.json"
        data = json.loads(path.read_text())
        assert sorted(data["configs"]) == ["2", "9"]
        assert data["meta"]["top_k"] == 2
        tuned = MoEKernelConfig.from_dict(data["configs"]["9"])
        common = dict(num_experts=4, hidden=160, inter=96, dtype=torch.float32, device=torch.device("cpu"), top_k=2)
        assert lookup_config(tokens=8, **common) == tuned
    finally:
        clear_config_cache()


# --- end to end ----------------------------------------------------------------------


def test_compiled_mixtral_with_triton_lowering_matches_eager():
    from conftest import rel_err, token_ids

    import moepass
    from moepass.zoo import tiny_model

    model = tiny_model("mixtral")
    ids = token_ids(2, 6)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        compiled = torch.compile(model, backend="adaptive_moe", options={"lowering": "triton", "inner": "eager"})
        actual = compiled(ids, use_cache=False).logits
    report = moepass.report(compiled)
    assert report.lowering == "triton"
    assert len(report.rewritten) == 2
    assert rel_err(actual, expected) < 1e-5


# --- the compiled (GPU) form ---------------------------------------------------------


def _compile_for_h100(kernel, pointer_types: dict[str, str], constexprs: dict, num_warps=4, num_stages=3):
    """Compile ``kernel`` ahead of time for sm_90 (no GPU needed: Triton ships ptxas),
    as a launch with contiguous tensors would specialise it: unit strides constant,
    pointers and the other sizes and strides 16-divisible."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.compiled()
    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "fp32" if name.startswith("swiglu") else "i32")
        for name in fn.arg_names
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name] != "constexpr" and not name.startswith("swiglu")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": True})


@pytest.mark.parametrize(
    "dtype,activation,gated,bias,weight_on_input,tiles",
    [
        ("bf16", "silu", True, False, False, (16, 64, 128, 4)),
        ("bf16", "swiglu_clamp", True, True, False, (64, 128, 64, 4)),
        ("fp16", "gelu_tanh", True, False, True, (128, 128, 64, 3)),
        ("fp32", "relu", False, True, False, (32, 64, 32, 3)),
        ("fp32", "silu", True, False, False, (64, 64, 32, 3)),
    ],
)
def test_kernels_compile_for_h100(monkeypatch, dtype, activation, gated, bias, weight_on_input, tiles):
    from moepass.kernels.align import align_slots_kernel
    from moepass.kernels.down import combine_slots_kernel, down_kernel
    from moepass.kernels.gate_up import ACTIVATION_CODES, gate_up_kernel

    monkeypatch.delenv("TRITON_INTERPRET")  # the compiled form, after interpreted runs in this process
    block_m, block_n, block_k, stages = tiles
    ptr, idx = f"*{dtype}", "*i32"
    precision = "tf32x3" if dtype == "fp32" else "tf32"
    gemm = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, DOT_PRECISION=precision, UPCAST_DOT=False)
    compiled = _compile_for_h100(
        gate_up_kernel,
        dict(x_ptr=ptr, routing_ptr="*fp32", sorted_slots_ptr=idx, block_experts_ptr=idx, padded_rows_ptr=idx,
             w1_ptr=ptr, b1_ptr=ptr, h_ptr=ptr),
        dict(stride_xh=1, stride_w1h=1, stride_b1n=1, stride_hi=1, ACTIVATION=ACTIVATION_CODES[activation],
             GATED=gated, HAS_BIAS=bias, WEIGHT_ON_INPUT=weight_on_input, **gemm),
        num_stages=stages,
    )
    assert "cubin" in compiled.asm
    # the software pipeline is in place: tiles stream through shared memory asynchronously
    assert "async_copy" in compiled.asm["ttgir"] and compiled.metadata.shared > 0
    compiled = _compile_for_h100(
        down_kernel,
        dict(h_ptr=ptr, routing_ptr="*fp32", sorted_slots_ptr=idx, block_experts_ptr=idx, padded_rows_ptr=idx,
             w2_ptr=ptr, b2_ptr=ptr, y_ptr=ptr),
        dict(stride_hi=1, stride_w2i=1, stride_b2n=1, stride_yn=1, HAS_BIAS=bias, APPLY_ROUTING_WEIGHT=not weight_on_input, **gemm),
        num_stages=stages,
    )
    assert "async_copy" in compiled.asm["ttgir"]
    assert "cubin" in _compile_for_h100(
        align_slots_kernel,
        dict(ids_ptr="*i64", sorted_slots_ptr=idx, block_experts_ptr=idx, padded_rows_ptr=idx),
        dict(BLOCK_M=block_m, BLOCK_SLOTS=1024, BLOCK_E=16),
    ).asm
    assert "cubin" in _compile_for_h100(
        combine_slots_kernel, dict(y_ptr=ptr, ids_ptr="*i64", out_ptr=ptr), dict(stride_yn=1, stride_on=1, BLOCK_N=1024)
    ).asm
