"""Machine-keyed kernel tables: the machine key, the tables' keying, caching and reuse across processes,
the measurement's bounds and the choice logic — with a fake timer, so no test depends on a timing —
and one first compile that measures for real within a tiny budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from moepass.compiler.options import BackendOptions, OptionsError
from moepass.compiler.spec import ExpertsSpec
from moepass.lowering import cpu, cpu_choice, cpu_tuning, reference
from moepass.runtime import tuning
from moepass.runtime.machine import Machine, cpu_identity, current_machine

ROOT = Path(__file__).resolve().parents[1]

X86_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8 ibrs
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes asimddp sve sve2 bf16 i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""
ZEN4 = "model name\t: AMD EPYC 9R14\nflags\t\t: fma avx2 avx512f avx512_bf16 avx512_vnni\n"


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """An empty cache folder and an empty shipped folder for this test's tables."""
    monkeypatch.setenv("MOEPASS_CACHE_DIR", str(tmp_path / "cache"))
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(cpu_choice, "FAMILY", tuning.Family("cpu_experts", 1, shipped=shipped))
    tuning.forget_measured()
    yield tmp_path
    tuning.forget_measured()


def _same_threads(env: dict) -> dict:
    """The environment for a second process that is the same machine as this one: the thread
    count is part of the machine key, and a test worker runs one thread (conftest) where a new
    process would start with one per core."""
    return {**env, "OMP_NUM_THREADS": str(torch.get_num_threads())}


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- the machine ------------------------------------------------------------------------------


def test_cpu_identity_reads_the_model_and_the_isa_features_that_matter():
    model, features = cpu_identity(X86_AMX, "Linux")
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert features == {"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512", "avx2", "fma"}  # not ibrs, sse
    model, features = cpu_identity(ARM, "Linux")
    assert "0x41" in model and "0xd4f" in model
    assert features == {"neon", "dotprod", "sve", "sve2", "bf16", "i8mm"}
    model, features = cpu_identity(ZEN4, "Linux")
    assert model == "AMD EPYC 9R14" and "amx_bf16" not in features


def test_the_machine_key_changes_with_everything_a_choice_depends_on():
    here = current_machine(threads=2)
    assert Machine.from_dict(json.loads(json.dumps(here.to_dict()))) == here
    assert current_machine(threads=2).file_stem == here.file_stem  # stable
    others = [
        Machine(**{**here.__dict__, "threads": 1}),
        Machine(**{**here.__dict__, "cores": here.cores + 4}),
        Machine(**{**here.__dict__, "torch": "2.14"}),
        Machine(**{**here.__dict__, "cpu": "Intel(R) Xeon(R) Platinum 8480+"}),
        Machine(**{**here.__dict__, "isa": tuple(sorted({*here.isa, "amx_bf16"}))}),
    ]
    assert len({m.file_stem for m in [here, *others]}) == 6
    amx = Machine("Intel Xeon", "x86_64", ("amx_bf16", "avx2"), "AVX512", 2, "2.13", 2)
    zen = Machine("AMD EPYC", "x86_64", ("avx2", "avx512_bf16"), "AVX512", 2, "2.13", 2)
    assert "AMX-BF16" in amx.describe() and "no AMX" not in amx.describe()
    assert "no AMX" in zen.describe() and "AVX-512 BF16" in zen.describe()


# --- tables: keying, caching, reuse -----------------------------------------------------------


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEPASS_CACHE_DIR", str(tmp_path / "chosen"))
    assert tuning.cache_dir() == tmp_path / "chosen"
    monkeypatch.delenv("MOEPASS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == tmp_path / "xdg" / "moepass"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_dir() == tmp_path / "home" / ".cache" / "moepass"


def test_stored_entries_merge_atomically_and_a_fresh_process_finds_them(tables):
    family = tuning.Family("probe_family", 1)
    path = tuning.store(family, "a", {"x": 1})
    tuning.store(family, "b", {"x": 2})
    data = json.loads(path.read_text())
    assert data["entries"] == {"a": {"x": 1}, "b": {"x": 2}}
    assert Machine.from_dict(data["machine"]) == current_machine()
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []  # nothing half-written left
    assert tuning.lookup(family, "a").source == "cache"
    assert not tuning.lookup(family, "c")
    script = ("from moepass.runtime import tuning; f = tuning.Family('probe_family', 1); "
              "found = tuning.lookup(f, 'b'); print(found.source, found.entry['x'])")
    env = _same_threads({**os.environ, "PYTHONPATH": str(ROOT)})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["cache", "2"], out.stderr


def test_a_shipped_table_serves_only_its_own_machine_and_the_cache_wins(tables):
    family = cpu_choice.FAMILY
    here = current_machine()
    other = Machine(**{**here.__dict__, "threads": here.threads + 1})
    tuning.store(family, "k", {"from": "shipped here"}, path=family.shipped / f"{here.file_stem}.json")
    tuning.store(family, "j", {"from": "shipped elsewhere"}, machine=other, path=family.shipped / f"{other.file_stem}.json")
    assert tuning.lookup(family, "k").entry == {"from": "shipped here"}
    assert tuning.lookup(family, "k").source == "shipped"
    assert not tuning.lookup(family, "j")  # measured on another machine: not this machine's choice
    assert [m for m, _, _ in tuning.other_machine_tables(family)] == sorted([here, other], key=lambda m: m.file_stem)
    tuning.store(family, "k", {"from": "measured here"})
    assert tuning.lookup(family, "k").entry == {"from": "measured here"} and tuning.lookup(family, "k").source == "cache"


def test_a_corrupt_or_other_version_table_is_ignored_and_replaced(tables, caplog):
    family = tuning.Family("probe_family", 2)
    path = tuning.table_path(family)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level("WARNING", logger="moepass.runtime.tuning"):
        assert not tuning.lookup(family, "a")
    assert "ignoring the tuning table" in caplog.text
    tuning.store(family, "a", {"x": 1})
    assert tuning.lookup(family, "a").entry == {"x": 1}
    assert not tuning.lookup(tuning.Family("probe_family", 3), "a")  # written for version 2


# --- measuring: bounds and settings -----------------------------------------------------------


def test_a_measurement_stops_at_its_budget():
    clock = FakeClock()

    def timer(label, names):
        clock.now += 0.4
        return {name: 1.0 for name in names}

    with tuning.measurement_override(timer, clock):
        m = tuning.Measurement(1.0)
        results = [m.compare(f"step {i}", {"a": None, "b": None}) for i in range(5)]
    assert m.measured == ["step 0", "step 1", "step 2"] and m.skipped == ["step 3", "step 4"]
    assert results[3] is None and results[0] == {"a": [1.0], "b": [1.0]}
    with tuning.measurement_override(timer, clock):  # a step predicted not to fit is skipped before it runs
        m = tuning.Measurement(2.0)
        m.compare("cheap", {"a": None}, cost_hint=1)      # 0.4 s for cost 1
        m.compare("costly", {"a": None}, cost_hint=100)   # predicted 40 s
        m.compare("cheap again", {"a": None}, cost_hint=1)
    assert m.measured == ["cheap", "cheap again"] and m.skipped == ["costly"]


def test_interleaved_rounds_rotate_and_run_the_before_hook_untimed():
    """Each round starts one candidate later (whatever a candidate leaves behind lands on every other one in
    turn), and ``before`` runs before every call, warm-up included, outside the timed span."""
    order, hooks = [], []
    m = tuning.Measurement(60.0, rounds=3)
    samples = m.compare("step", {name: (lambda name=name: order.append(name)) for name in "abc"},
                        before=lambda: hooks.append(len(order)))
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert hooks == list(range(len(order)))  # once before each call
    assert {name: len(values) for name, values in samples.items()} == {"a": 3, "b": 3, "c": 3}


def test_obtain_measures_once_then_finds(tables):
    family = tuning.Family("probe_family", 1)
    calls = []

    def measure(m):
        calls.append(m.budget)
        return {"choice": "a"}

    assert tuning.obtain(family, "k", measure, None).entry is None  # tuning off: nothing measured
    first = tuning.obtain(family, "k", measure, 2.0, "probe")
    again = tuning.obtain(family, "k", measure, 2.0, "probe")
    assert calls == [2.0] and first.source == "measured" and again.source == "process"
    assert first.entry["choice"] == "a" and first.entry["complete"] is True and "date" in first.entry


def test_an_exhausted_budget_runs_nothing():
    def must_not_run():
        raise AssertionError("ran a candidate with no budget left")

    m = tuning.Measurement(0.0)
    assert m.compare("step", {"a": must_not_run}) is None and m.skipped == ["step"]


def test_tuning_settings(monkeypatch):
    monkeypatch.setenv("MOEPASS_TUNING", "auto")
    assert tuning.tuning_budget("auto", 10.0) == 10.0
    assert tuning.tuning_budget("off", 10.0) is None and tuning.tuning_budget(False, 10.0) is None
    assert tuning.tuning_budget(2.5, 10.0) == 2.5 and tuning.tuning_budget("3", 10.0) == 3.0
    monkeypatch.setenv("MOEPASS_TUNING", "off")
    assert tuning.tuning_budget("auto", 10.0) is None
    assert tuning.tuning_budget(1.5, 10.0) == 1.5  # the option wins over the environment
    monkeypatch.setenv("MOEPASS_TUNING", "7")
    assert tuning.tuning_budget("auto", 10.0) == 7.0
    for bad in ("sometimes", -1, 0, float("inf")):
        with pytest.raises(tuning.TuningError):
            tuning.tuning_budget(bad, 10.0)
    with pytest.raises(OptionsError, match="cpu_tuning"):
        BackendOptions.parse({"cpu_tuning": "sometimes"})
    monkeypatch.setenv("MOEPASS_TUNING", "often")
    with pytest.raises(OptionsError, match=r"\$MOEPASS_TUNING 'often'"):
        BackendOptions.parse({})
    monkeypatch.setenv("MOEPASS_TUNING", "7")
    assert BackendOptions.parse({"cpu_tuning": 4}).cpu_tuning == 4


# --- the CPU family's choices -----------------------------------------------------------------


def _block(dtype=torch.float32, seed=0):
    spec = ExpertsSpec(dispatch="grouped_mm", num_experts=8, hidden_size=16, intermediate_size=24)
    g = torch.Generator().manual_seed(seed)
    weights = {"w1": torch.randn(8, 48, 16, generator=g).to(dtype), "w2": torch.randn(8, 16, 24, generator=g).to(dtype),
               "b1": None, "b2": None}
    return spec, weights


def scripted_timer(label: str, names: list[str]) -> dict[str, float]:
    """weight-major wins projections at 2 rows; moepass wins blocks up to 8 tokens, grouped_mm above."""
    words = label.split()
    if "rows" in words:
        rows = int(words[words.index("rows") + 1])
        return {n: (0.5 if n == "weight_major" and rows == 2 else 1.0 if n == "token_major" else 2.0) * 1e-3 for n in names}
    tokens = int(words[words.index("tokens") + 1])
    return {"moepass": (1.0 if tokens <= 8 else 2.0) * 1e-3, "grouped_mm": 1.5e-3}


def test_first_use_measures_picks_per_row_count_and_the_lowering_follows(tables, monkeypatch):
    spec, weights = _block()
    with tuning.measurement_override(scripted_timer):
        kernels = cpu_tuning.tune_block(spec, weights, top_k=2, prepack="off", budget=30.0, description="tiny")
    assert kernels.source == "measured" and kernels.complete
    assert [(p["tokens"], p["rows"], p["path"]) for p in kernels.points] == [
        (1, 2, "moepass"), (8, 16, "moepass"), (64, 128, "grouped_mm"), (512, 1024, "grouped_mm"), (2048, 4096, "grouped_mm")]
    choose = cpu_choice.choose_path
    assert [choose(kernels.key, r) for r in (1, 2, 127, 128, 100000)] == ["moepass"] * 3 + ["grouped_mm"] * 2
    assert cpu_choice.choose_kernel(2, (48, 16), torch.float32, False) == "weight_major"
    assert cpu_choice.choose_kernel(3, (48, 16), torch.float32, False) == "weight_major"
    assert cpu_choice.choose_kernel(4, (48, 16), torch.float32, False) == "token_major"
    lines = "\n".join(kernels.lines())
    assert "moepass 1 ms < grouped_mm 1.5 ms" in lines and "the model's path" in lines and "rows 128–1023" in lines

    ran = []
    grouped = cpu._grouped_path
    monkeypatch.setattr(cpu, "_grouped_path", lambda *args: ran.append("grouped_mm") or grouped(*args))
    for tokens, expected in ((1, []), (64, ["grouped_mm"])):  # 2 live rows, 128 live rows
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, 16, generator=g)
        ids = torch.randn(tokens, 8, generator=g).topk(2, dim=-1).indices
        w = torch.rand(tokens, 2, generator=g)
        ran.clear()
        out = cpu.experts_forward(x, ids, w, weights["w1"], weights["w2"], None, None, spec, "off")
        assert ran == expected
        assert rel_err(out, reference.experts_forward(x, ids, w, weights["w1"], weights["w2"], None, None, spec)) < 1e-5

    def no_timer(label, names):
        raise AssertionError("measured again")

    with tuning.measurement_override(no_timer):  # the same shape again: found, not measured
        assert cpu_tuning.tune_block(spec, weights, 2, "off", 30.0).source == "process"
        tuning.forget_measured()
        again = cpu_tuning.tune_block(spec, weights, 2, "off", 30.0)
    assert again.source == "cache" and again.points == kernels.points


def test_a_kernel_must_clearly_beat_token_major():
    assert cpu_tuning._pick({"token_major": [1.0] * 3, "weight_major": [0.95] * 3}) == "token_major"  # within 10%
    assert cpu_tuning._pick({"token_major": [1.0] * 3, "weight_major": [0.5] * 3}) == "weight_major"
    noisy = {"token_major": [1.0, 1.0, 1.0, 1.0, 0.3], "weight_major": [0.5, 2.0, 2.0, 2.0, 0.9]}  # one lucky round
    assert cpu_tuning._pick(noisy) == "token_major"


def test_a_short_budget_measures_part_and_a_forced_measurement_completes_it(tables):
    spec, weights = _block()
    clock = FakeClock()

    def slow_timer(label, names):
        clock.now += 1.0
        return scripted_timer(label, names)

    with tuning.measurement_override(slow_timer, clock):
        partial = cpu_tuning.tune_block(spec, weights, 2, "off", budget=4.0)
    # projections get half the budget (2 steps), the paths the rest: at least their first row count
    assert not partial.complete and partial.source == "measured"
    assert [p["tokens"] for p in partial.points] == [1] and "partial" in partial.lines()[0]
    assert cpu_choice.choose_path(partial.key, 4096) == "moepass"  # as measured at 1 token
    assert clock.now <= 4.0 + 1.0  # at most one step past the budget
    first = tuning.lookup(cpu_choice.FAMILY, cpu_choice.projection_key(torch.float32, 48, 16, False)).entry
    assert first["complete"] is False and list(first["kernels"]) == ["1", "2"]
    second = cpu_choice.projection_key(torch.float32, 16, 24, False)
    assert tuning.lookup(cpu_choice.FAMILY, second).entry["kernels"] == {}  # recorded as not measured
    assert cpu_choice.choose_kernel(2, (16, 24), torch.float32, False) == "weight_major"  # the nearest shape's choice

    def no_timer(label, names):
        raise AssertionError("a later compile measured again")

    with tuning.measurement_override(no_timer):  # a later first compile uses the partial entries as they are
        again = cpu_tuning.tune_block(spec, weights, 2, "off", budget=30.0)
    assert again.points == partial.points and not again.complete
    with tuning.measurement_override(scripted_timer):  # a forced measurement (moepass tune --cpu) completes them
        full = cpu_tuning.tune_block(spec, weights, 2, "off", budget=30.0, force=True)
    assert full.complete and len(full.points) == 5
    with tuning.measurement_override(scripted_timer):
        off = cpu_tuning.tune_block(spec, weights, 2, "off", budget=None)  # tuning off: what is there
    assert off.points == full.points and off.source == "process"


def test_tuning_off_with_no_table_takes_the_moepass_path(tables):
    spec, weights = _block()
    kernels = cpu_tuning.tune_block(spec, weights, 2, "off", budget=None)
    assert kernels.source == "none" and kernels.points == []
    assert "tuning off" in kernels.lines()[0]
    assert cpu_choice.choose_path(kernels.key, 64) == "moepass"


# --- on first compile, for real ---------------------------------------------------------------

_MODEL = """
import torch
from transformers import MixtralConfig, MixtralForCausalLM
torch.manual_seed(0)
config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
model = MixtralForCausalLM(config).eval()
ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(1))
"""


def test_the_first_compile_measures_caches_and_a_second_process_reuses(tmp_path, monkeypatch, caplog):
    import moepass

    monkeypatch.setenv("MOEPASS_CACHE_DIR", str(tmp_path))
    tuning.forget_measured()
    namespace: dict = {}
    exec(_MODEL, namespace)
    model, ids = namespace["model"], namespace["ids"]
    fast = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", "cpu_tuning": 0.5})
    with caplog.at_level("INFO", logger="moepass"), torch.no_grad():
        logits = fast(ids).logits
        expected = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert "measuring CPU kernels for model.layers.0.mlp" in caplog.text  # the progress line
    block = moepass.report(fast).block("model.layers.0.mlp")
    assert block.cpu_kernels is not None and block.cpu_kernels.source == "measured"
    assert "CPU lowering on" in str(moepass.report(fast))
    assert moepass.report(fast).to_dict()["blocks"][0]["cpu_kernels"]["source"] == "measured"
    written = json.loads(tuning.table_path(cpu_choice.FAMILY).read_text())
    assert block.cpu_kernels.key in written["entries"]

    script = _MODEL + textwrap.dedent("""
        import logging, moepass
        logging.basicConfig(level=logging.INFO)
        fast = torch.compile(model, backend="adaptive_moe", options={"inner": "eager"})
        with torch.no_grad():
            fast(ids)
        print("SOURCE", moepass.report(fast).block("model.layers.0.mlp").cpu_kernels.source)
    """)
    env = _same_threads({**os.environ, "PYTHONPATH": str(ROOT), "MOEPASS_TUNING": "auto",
                         "MOEPASS_CACHE_DIR": str(tmp_path)})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "SOURCE cache" in out.stdout, out.stdout + out.stderr
    assert "measuring" not in out.stderr  # a second process adds no measurement
    tuning.forget_measured()


def test_moepass_tune_cpu_measures_a_shape_ahead_of_time(tables, capsys):
    from moepass.cli.main import main

    out = tables / "shipped-here"
    with tuning.measurement_override(scripted_timer):
        assert main(["tune", "--cpu", "8,16,24,2", "--dtype", "float32", "--seconds", "30", "--quick",
                     "--tokens", "1", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "block float32 E=8 H=16 N1=48 I=24 [E,out,in] plain" in printed and "the model's path" in printed
    table = json.loads((out / f"{current_machine().file_stem}.json").read_text())
    assert {e for e in table["entries"]} == {
        "projection float32 48x16 plain", "projection float32 16x24 plain",
        "block float32 E=8 H=16 N1=48 I=24 [E,out,in] plain"}
    assert [p["path"] for p in table["entries"]["block float32 E=8 H=16 N1=48 I=24 [E,out,in] plain"]["points"]] == [
        "moepass", "grouped_mm"]
    assert main(["tune", "8,16,24,2", "--seconds", "3"]) == 2  # --seconds is for --cpu


def test_bfloat16_blocks_measure_their_packed_kernels_for_real(tables):
    """A real (tiny, bounded) measurement: every kernel runs on the block's own bfloat16 weights, packed ones
    too, and the entries are keyed by each weight's packing."""
    from moepass.lowering.cpu_kernels import KERNELS
    from moepass.lowering.cpu_packed import packing_allowed

    spec, weights = _block(torch.bfloat16, seed=3)
    with torch.no_grad():
        kernels = cpu_tuning.tune_block(spec, weights, 2, "on", budget=2.0, rows_list=(1, 2), token_points=(1, 8))
    packed = packing_allowed(weights["w1"], "on")
    assert kernels.key.endswith("packed" if packed else "plain") and kernels.source == "measured"
    for shape in ((48, 16), (16, 24)):
        entry = tuning.lookup(cpu_choice.FAMILY, cpu_choice.projection_key(torch.bfloat16, *shape, packed)).entry
        assert set(entry["kernels"].values()) <= set(KERNELS)
        if packed and entry.get("microseconds"):
            assert "packed" in next(iter(entry["microseconds"].values()))
    assert {p["path"] for p in kernels.points} <= set(cpu_choice.PATHS) and kernels.points
