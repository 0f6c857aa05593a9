"""Every MoE family of the installed transformers, discovered from its config classes.

Each family's tiny model (moepass.zoo.discovery) is compiled with
``backend="adaptive_moe"`` (static policy, inner compiler eager) and must be
either rewritten exactly — every MoE block that ran rewritten into
``moepass::route`` (+ ``moepass::experts``), logits equal to eager to 1e-5
relative — or left alone with a reason from the fixed set
``moepass.runtime.report.REASON_CODES`` for every block it left.  A wrong answer, a
crash, or an MoE block the report does not mention at all fails.

One sequence length per family keeps this fast (``benchmarks/zoo_table.py``
compares at two).  ``KNOWN_GAPS`` lists the families that fail today, each
with why; the marks are strict, so a fixed family fails until it is removed.
"""

from __future__ import annotations

import pytest

from moepass.runtime.report import REASON_CODES, classify_reason
from moepass.zoo import FAMILIES, UNSUPPORTED_FAMILIES
from moepass.zoo.discovery import EXPERTS, discover_moe_families, tiny_config
from moepass.zoo.survey import TOLERANCE, FamilyOutcome, run_family

DISCOVERED = discover_moe_families()

#: Families that fail this test today, and why (see notes/zoo-survey.md).
KNOWN_GAPS: dict[str, str] = {
    "doge": "product-key experts (embedding rows, no experts module); the report lists no block",
    "llama4": "transformers 5.24: Llama4ForConditionalGeneration's text-only forward reads "
    "outputs.image_outputs, which the text model does not return",
}


def _problems(outcome: FamilyOutcome) -> list[str]:
    """Why ``outcome`` is neither an exact rewrite nor a reported refusal ([] when it is one)."""
    if outcome.outcome in ("build failed", "crash"):
        return [f"{outcome.outcome}: {outcome.error}"]
    problems = []
    if outcome.max_error is None or not outcome.max_error <= TOLERANCE:
        problems.append(f"logits differ from eager: max relative error {outcome.max_error}")
    if outcome.blocks_ran == 0:
        problems.append("no routed-experts module ran in the tiny model")
    if len(outcome.blocks) < outcome.blocks_ran:
        problems.append(
            f"{outcome.blocks_ran} MoE blocks ran but the report lists {len(outcome.blocks)} "
            f"({[b.path for b in outcome.blocks]}): a block was missed without a reason"
        )
    for block in outcome.blocks:
        if block.rewritten:
            if "moepass::route" not in block.inserted_ops:
                problems.append(f"{block.path}: rewritten without a moepass::route op ({block.inserted_ops})")
            if block.dispatch != "eager_loop" and "moepass::experts" not in block.inserted_ops:
                problems.append(f"{block.path}: experts rewritten without a moepass::experts op ({block.inserted_ops})")
        elif block.reason_code not in REASON_CODES or block.reason_code == "unclassified":
            problems.append(f"{block.path}: left alone with an unclassified reason: {block.reason!r}")
    return problems


def _param(family):
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[family.name])] if family.name in KNOWN_GAPS else []
    return pytest.param(family, id=family.name, marks=marks)


@pytest.mark.parametrize("family", [_param(f) for f in DISCOVERED])
def test_family_rewritten_exactly_or_left_alone_with_a_reason(family):
    outcome = run_family(family, lengths=(8,))
    problems = _problems(outcome)
    assert not problems, f"{family.name} ({outcome.outcome}): " + "; ".join(problems)
    if outcome.outcome == "rewritten":
        assert len(outcome.rewritten) >= outcome.blocks_ran
        assert all(b.rewritten for b in outcome.blocks)


def test_discovery_finds_every_family_the_pass_supports():
    names = {f.name for f in DISCOVERED}
    # llama4_text is the text model of the llama4 family; both are discovered
    assert set(FAMILIES) | set(UNSUPPORTED_FAMILIES) <= names
    kinds = {f.name: f.kind for f in DISCOVERED}
    assert kinds["switch_transformers"] == kinds["nllb-moe"] == "encoder_decoder"
    assert kinds["qwen3_vl_moe"] == "multimodal"
    assert kinds["mixtral"] == "causal_lm"
    # not MoE: a dense LM, and ViTPose+ whose per-dataset "experts" are not routed
    assert "llama" not in names and "vitpose_backbone" not in names
    # a tower covered by its multimodal parent is not a family of its own
    assert "qwen3_vl_moe_text" not in names
    # the source prefilter drops nothing the full scan finds
    assert discover_moe_families(prefilter=False) == DISCOVERED


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "ernie4_5_moe", "llama4_text", "nemotron_h"])
def test_tiny_configs_make_every_layer_moe(name):
    config = tiny_config(name).get_text_config()
    assert config.num_hidden_layers == 2 or len(getattr(config, "layer_types", [])) == 2
    assert config.hidden_size == 64
    experts = [getattr(config, a) for a in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts") if hasattr(config, a)]
    assert experts and experts[0] == EXPERTS


@pytest.mark.parametrize(
    "text,code",
    [
        ("no top-k expert selection: the router is a sparsemixer (gather); only top-k routers are supported", "not_topk_routing"),
        ("router not supported: topk: could not find where the routing weights are formed", "unsupported_router"),
        ("no supported top-k router reaches these stacked experts", "unsupported_router"),
        ("unsupported expert activation (ops between the GEMMs: ['relu', 'square', 'to'])", "unsupported_activation"),
        ("found 3 stacked expert weights; expected 2 (gate_up and down)", "unsupported_experts"),
        ("the block's output depends on values computed outside it (x), not only on its input", "region_not_closed"),
        ("the experts graph-broke and this router's weights are dense scores; nothing to rewrite", "graph_break"),
        ("the experts graph-broke away from their router: they run in a graph of their own", "graph_break"),
        ("per-expert output norm: each expert's output rows are normalised (mean_8, rsqrt_3)", "unsupported_experts"),
        ("rewrite does not reproduce the block: max relative error 1.00e+00 > 1e-04 on a random input", "validation_failed"),
        ("something nobody has written yet", "unclassified"),
    ],
)
def test_reason_codes(text, code):
    assert classify_reason(text) == code
    assert code in REASON_CODES
