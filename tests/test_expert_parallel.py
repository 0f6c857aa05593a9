"""Expert parallelism: experts split over ranks, only kept slots exchanged, right on every rank.

The checks run in spawned processes — gloo on 127.0.0.1 with a 60 s
process-group timeout, so a hang fails instead of blocking CI — one group of
2 processes for every 2-rank check and one of 4 (correctness only);
:mod:`expert_parallel_workers` holds what each rank runs.  Every rank's
result is checked:

* transformers' ``DistributedConfig(ep_implementation="moepass")``, EP alone
  (``tp_size == ep_size``: the batch shared) and EP + FSDP (a batch per rank):
  static logits equal the model, adaptive ones one-process moepass under the
  same policy, gradients equal, ``generate()`` gives the same tokens, one graph,
  no recompile as routing changes, rows sent = kept remote slots;
* torch-native models: every policy on the bundled model with
  ``options={"expert_parallel": {"mesh": mesh}}``, ``Shard(0)`` DTensor
  weights (whose all-gather leaves the graph), zero-computation experts;
* the op alone: a rank with no tokens, a rank whose slots all drop, forward and
  backward against the one-process op;
* bad input: E not a multiple of the EP size, a mesh the experts do not live
  on, ranks with different policies — one clear error on every rank.

Compiles use the ``eager`` inner compiler (``aot_eager`` where the backward is
what is tested); several policies run the backend's stages on one captured
graph (:class:`expert_parallel_workers.CapturedGraph`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from expert_parallel_workers import free_port, run_ranks, tiny_mixtral

ROOT = Path(__file__).resolve().parents[1]

STATIC = 1e-5  # the static policy against the model itself (float32 round-off)
SAME_POLICY = 1e-5  # against one-process moepass under the same policy
GRADIENTS = 1e-5


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> list[dict]:
    path = tiny_mixtral(str(tmp_path_factory.mktemp("mixtral")))
    return run_ranks("two_ranks", 2, path=path)


@pytest.fixture(scope="module")
def four() -> list[dict]:
    return run_ranks("four_ranks", 4)


def _worst(errors: dict[str, float]) -> tuple[str, float]:
    name = max(errors, key=errors.get)
    return name, errors[name]


def test_transformers_ep_alone_is_one_graph_and_equals_one_process(two):
    for rank, ranks_result in enumerate(two):
        result = ranks_result["shared"]
        assert result["eager_error"] <= STATIC, (rank, result["eager_error"])
        static, top_p = result["static"], result["top_p"]
        assert static["scores_error"] <= STATIC, (rank, static)  # every generated step's logits
        assert top_p["error"] <= SAME_POLICY and top_p["error_other"] <= SAME_POLICY, (rank, top_p)
        assert top_p["eager_error"] > 1e-3  # adaptive routing does change the logits (the check can fail)
        # the whole model is one graph, each block rewritten and expert-parallel; new routing, no recompile
        assert top_p["graphs"] == 1 and top_p["recompiles"] == 0 and top_p["routing_differs"], (rank, top_p)
        assert top_p["report"].count("expert parallel over 2 ranks") == 2, top_p["report"]
        for run in (static, top_p):  # exactly the kept slots on the other rank's experts travel
            assert run["rows_sent"] == run["remote_kept"] > 0, (rank, run)
            assert run["rows_sent"] + run["rows_local"] == run["kept"], (rank, run)
        assert top_p["kept"] < top_p["slots"] and static["kept"] == static["slots"]  # dropped slots were not sent
        assert result["generated"] == result["generated_reference"], rank
        name, error = _worst(result["gradient_errors"])
        assert error <= GRADIENTS and len(result["gradient_errors"]) >= 10, (rank, name, error)


def test_ranks_with_different_policies_fail_together(two):
    for result in two:
        message = result["shared"]["policy_mismatch"]
        assert message.startswith("ExpertParallelError") and "different call" in message, message
        assert "every rank must compile the model with the same options" in message


def test_transformers_ep_with_fsdp_equals_one_process(two):
    assert two[0]["fsdp"]["top_p"]["slots"] != two[1]["fsdp"]["top_p"]["slots"]  # uneven tokens per rank
    for rank, ranks_result in enumerate(two):
        result = ranks_result["fsdp"]
        assert result["eager_error"] <= STATIC, (rank, result["eager_error"])
        run = result["top_p"]
        assert run["error"] <= SAME_POLICY, (rank, run)
        # FSDP's hooks split each block in two graphs (the router's keeps the model's ids, a dropped slot at
        # weight -0.0); the experts op still sends only the kept remote slots
        assert run["rows_sent"] == run["remote_kept"] > 0, (rank, run)
        assert run["rows_sent"] + run["rows_local"] == run["kept"] < run["slots"], (rank, run)
        name, error = _worst(result["gradient_errors"])
        assert error <= GRADIENTS and len(result["gradient_errors"]) >= 10, (rank, name, error)


def test_every_policy_with_the_mesh_option_equals_one_process_moepass(two):
    policies = ("static", "top_p", "threshold", "sensitivity", "skip_ratio", "ada_k", "null_experts")
    for rank, ranks_result in enumerate(two):
        result = ranks_result["native"]
        for policy in policies:
            run = result[f"bundled_{policy}"]
            assert run["error"] <= SAME_POLICY, (rank, policy, run)
            assert run["expert_parallel_blocks"] == 4 and run["rows_sent"] > 0, (rank, policy, run)
        training = result["training_top_p"]  # adaptive: gradients through the exchange equal one process's
        assert training["gradient_error"] <= GRADIENTS and training["gradients"] >= 15, (rank, training)
        for policy in policies:
            run = result[f"bundled_{policy}"]
            if policy != "static":
                assert run["rows_sent"] + run["rows_local"] < result["bundled_static"]["rows_sent"] + result[
                    "bundled_static"]["rows_local"], (rank, policy)


def test_dtensor_weights_move_tokens_not_weights(two):
    for rank, ranks_result in enumerate(two):
        dtensor = ranks_result["native"]["dtensor"]
        assert dtensor["eager_error"] <= STATIC and dtensor["static_error"] <= STATIC, (rank, dtensor)
        assert dtensor["error"] <= SAME_POLICY, (rank, dtensor)
        # the model's own all-gather of the weights left the graph: the op reads this rank's shard
        assert dtensor["gathers"] == 0 and dtensor["to_local"] == 2 and dtensor["experts_ops"] == 1, dtensor
        name, error = _worst(dtensor["gradient_errors"])
        assert error <= GRADIENTS, (rank, name, error)


def test_zero_computation_experts(two):
    for rank, ranks_result in enumerate(two):
        zero = ranks_result["native"]["zero_compute"]
        assert zero["error"] <= SAME_POLICY and zero["expert_parallel_blocks"] == 1 and zero["calls"] > 0, (rank, zero)


def _check_op_cases(rank: int, cases: dict) -> None:
    for case, run in cases.items():
        assert run["calls"] == 2, (rank, case, run)  # forward and backward exchanged on every rank, none skipped
        assert run["error"] <= STATIC and run["gradient_error"] <= GRADIENTS, (rank, case, run)
        assert run["rows_sent"] == 2 * run["remote_kept"], (rank, case, run)  # forward + backward, kept slots only
    assert cases["mixed"]["identity_slots"] > 0 and cases["mixed"]["remote_kept"] > 0, cases


def test_a_rank_without_tokens_and_a_rank_whose_slots_all_drop(two):
    assert two[0]["op"]["edge"]["tokens"] == 0 and two[1]["op"]["edge"]["remote_kept"] == 0
    for rank, result in enumerate(two):
        _check_op_cases(rank, result["op"])


def test_bad_layouts_fail_on_every_rank_while_compiling(two):
    for result in two:
        native = result["native"]
        assert native["mesh_mismatch"].startswith("ExpertParallelError") and "does not hold" in native["mesh_mismatch"]
        assert native["not_divisible"].startswith("ExpertParallelError"), native["not_divisible"]
        assert "3 experts cannot be split over the 2 ranks" in native["not_divisible"]


def test_four_ranks(four):
    for rank, result in enumerate(four):
        assert result["eager_error"] <= STATIC and result["static"]["eager_error"] <= STATIC, (rank, result)
        for policy in ("static", "top_p"):
            run = result[policy]
            assert run["error"] <= SAME_POLICY and run["dtensor_error"] <= SAME_POLICY, (rank, policy, run)
        assert result["top_p"]["eager_error"] > 1e-3
        assert result["top_p"]["rows_sent"] < result["static"]["rows_sent"]
        assert "6 experts cannot be split over the 4 ranks" in result["not_divisible"], result["not_divisible"]
        _check_op_cases(rank, result["op"])


def test_the_readme_example_runs_under_torchrun():
    """docs/expert-parallel.md's ``torchrun --nproc-per-node 2 examples/expert_parallel.py --policy top_p --p 0.5`` (inner eager,
    1 new token: the same script, quicker)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), str(ROOT / "examples" / "expert_parallel.py"), "--policy", "top_p",
        "--p", "0.5", "--inner", "eager", "--max-new-tokens", "1", "--timeout", "60",
    ]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-4000:]
    lines = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    assert sorted(line["rank"] for line in lines) == [0, 1], finished.stdout
    for line in lines:
        assert line["error_vs_one_process"] <= SAME_POLICY and line["expert_parallel_blocks"] == 4, line
        assert line["rows_sent"] > 0 and line["bytes_sent"] > 0 and line["text"].startswith("def fibonacci"), line


# --- single-process checks: the option, the transformers adapter's reading, the empty-slot forms ---------------


class _Mesh:
    """Stands in for a DeviceMesh (the option's parser reads these attributes only)."""

    def __init__(self, ndim: int, names=None):
        self.ndim, self.mesh_dim_names, self.mesh = ndim, names, None

    def get_group(self, dim=0):
        return None

    def size(self, dim=None):
        return 2


@pytest.mark.parametrize(
    "value, message",
    [
        ("mesh", "must be a dict such as {'mesh': mesh}"),
        ({"mesh": "cpu"}, "needs 'mesh': a torch.distributed DeviceMesh"),
        ({"mesh": _Mesh(1), "axis": 0}, "unknown key(s) 'axis'"),
        ({"mesh": _Mesh(2, ("dp", "ep"))}, "name the one holding the experts with 'mesh_dim'"),
        ({"mesh": _Mesh(2, ("dp", "ep")), "mesh_dim": "tp"}, "the mesh has no dimension 'tp'"),
        ({"mesh": _Mesh(2, ("dp", "ep")), "mesh_dim": 2}, "the mesh has no dimension 2"),
    ],
)
def test_the_expert_parallel_option_names_what_is_wrong(value, message):
    from moepass.compiler.options import BackendOptions, OptionsError

    with pytest.raises(OptionsError) as error:
        BackendOptions.parse({"expert_parallel": value})
    assert message in str(error.value)


def test_the_expert_parallel_option_parses_and_excludes_offload(tmp_path):
    from moepass.compiler.options import BackendOptions, OptionsError

    mesh = _Mesh(2, ("dp", "ep"))
    parsed = BackendOptions.parse({"expert_parallel": {"mesh": mesh, "mesh_dim": "ep"}})
    assert parsed.expert_parallel.mesh is mesh and parsed.expert_parallel.mesh_dim == "ep"
    assert BackendOptions.parse({}).expert_parallel is None
    with pytest.raises(OptionsError, match="cannot be combined"):
        BackendOptions.parse({"expert_parallel": {"mesh": _Mesh(1)}, "offload": str(tmp_path)})


def test_the_transformers_adapter_reads_the_experts_flags_and_fails_closed():
    from transformers.integrations import moe as transformers_moe

    from moepass.runtime.expert_parallel import ExpertParallelError
    from moepass.runtime.expert_parallel.transformers_ep import experts_spec
    from moepass.zoo import tiny_model

    experts = tiny_model("mixtral", num_local_experts=4).model.layers[0].mlp.experts
    spec, names = experts_spec(experts, ep_size=2)  # plain (unsharded) weights: E = local rows × EP size
    assert (spec.num_experts, spec.activation, spec.gated, spec.gate_up_layout, spec.has_bias) == (8, "silu", True, "concat", False)
    assert names == ("gate_up_proj", "down_proj", None, None)
    experts.config._experts_implementation = "eager"  # the class's own forward: not read
    with pytest.raises(ExpertParallelError, match="experts_implementation='grouped_mm'"):
        experts_spec(experts, 2)
    experts.config._experts_implementation = "grouped_mm"
    experts.has_post_expert_norm = True
    with pytest.raises(ExpertParallelError, match="has_post_expert_norm"):
        experts_spec(experts, 2)
    experts.has_post_expert_norm = False
    original = type(experts)._apply_gate
    type(experts)._apply_gate = lambda self, out: transformers_moe._default_apply_gate(self, out) * 2
    try:
        with pytest.raises(ExpertParallelError, match="own gate function"):
            experts_spec(experts, 2)
    finally:
        type(experts)._apply_gate = original


def test_slots_that_need_no_row():
    """The sentinel and ids past the GEMM experts, and a repeated expert at weight 0 (the router-only form of an
    empty slot), are not kept; a repeated expert with a weight, and a first slot at weight 0, are."""
    import torch

    from moepass.runtime.expert_parallel.exchange import kept_slots

    ids = torch.tensor([[1, 1, 4], [2, 3, 5], [0, 0, 2], [3, 3, 3]])
    weights = torch.tensor([[0.7, 0.0, 0.3], [0.5, 0.5, 0.0], [0.0, 0.4, 0.6], [1.0, 0.0, 0.0]])
    kept = kept_slots(ids, weights, num_experts=4)
    assert kept.tolist() == [[1, 4, 4], [2, 3, 4], [0, 0, 2], [3, 4, 4]]
