"""Every MoE family of the installed transformers, discovered from its config classes.

Each family's tiny model (moepass.zoo.discovery) is compiled with
``backend="adaptive_moe"`` (static policy, inner compiler eager) and must be
either rewritten exactly — every MoE block that ran rewritten into
``moepass::route`` (+ ``moepass::experts``), logits equal to eager to 1e-5
relative — or left alone with a reason from the fixed set
``moepass.runtime.report.REASON_CODES`` for every block it left.  A wrong answer, a
crash, or an MoE block the report does not mention at all fails.

Each family is built from its config class's own defaults, shrunk only in
size, plus each variant in real use (``FAMILY_VARIANTS``).  One sequence
length per family keeps this fast (``benchmarks/zoo_table.py`` compares at
two).  ``KNOWN_GAPS`` lists the families that fail, each with why and the
transformers versions it applies to: within them a failure is an expected
failure and a pass a warning (an upstream fix shows in the log and in
``make test-newest``'s table without failing CI); outside them the family
must pass, and a new family that fails fails with its name.

With ``MOEPASS_ZOO_OUTCOMES`` naming a file, each case appends its outcome
as a JSON line (``make test-newest`` builds its compatibility table from them).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import pytest
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from moepass.runtime.report import REASON_CODES, classify_reason
from moepass.zoo import FAMILIES, UNSUPPORTED_FAMILIES
from moepass.zoo.discovery import EXPERTS, discover_moe_families, tiny_config
from moepass.zoo.survey import TOLERANCE, FamilyOutcome, run_family, zoo_cases

DISCOVERED = discover_moe_families()
TRANSFORMERS = Version(transformers.__version__)


@dataclass(frozen=True)
class KnownGap:
    """A case that fails, why, and the transformers versions it fails with."""

    reason: str
    #: a PEP 440 range of transformers versions (``"<5.25"``)
    transformers: str = ""

    def applies(self, version: Version = TRANSFORMERS) -> bool:
        return version in SpecifierSet(self.transformers)


#: Cases (``family`` or ``family:variant``) that fail, why, and with which transformers (notes/zoo-survey.md).
KNOWN_GAPS: dict[str, KnownGap] = {
    "doge": KnownGap("product-key experts (embedding rows, no experts module); the report lists no block", ">=5.17"),
    "llama4": KnownGap(
        "Llama4ForConditionalGeneration's text-only forward reads outputs.image_outputs, which the text model "
        "does not return (fixed in transformers 5.25)",
        ">=5.17,<5.25",
    ),
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
        elif block.reason_code not in REASON_CODES or block.reason_code in ("unclassified", "internal_error"):
            problems.append(f"{block.path}: left alone with an unclassified reason: {block.reason!r}")
    return problems


def _record(outcome: FamilyOutcome, problems: list[str], test: str) -> None:
    """Append the case's outcome to ``$MOEPASS_ZOO_OUTCOMES`` (one JSON line; xdist workers append whole lines)."""
    path = os.environ.get("MOEPASS_ZOO_OUTCOMES")
    if not path:
        return
    record = {
        "id": outcome.case, "kind": outcome.kind, "outcome": outcome.outcome, "max_error": outcome.max_error,
        "counts": f"{len(outcome.rewritten)} / {len(outcome.blocks)} / {outcome.blocks_ran}",
        "reason": outcome.reason if outcome.outcome != "rewritten" else "", "problems": problems, "test": test,
    }
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c[0].name}:{c[1]}" if c[1] else c[0].name) for c in zoo_cases()])
def test_family_rewritten_exactly_or_left_alone_with_a_reason(case):
    family, variant = case
    outcome = run_family(family, lengths=(8,), variant=variant)
    problems = _problems(outcome)
    if outcome.outcome == "rewritten" and not problems:
        if len(outcome.rewritten) < outcome.blocks_ran or not all(b.rewritten for b in outcome.blocks):
            problems.append("rewritten, but not every block that ran is")
    gap = KNOWN_GAPS.get(outcome.case)
    if gap is not None and gap.applies():
        if problems:
            _record(outcome, problems, "known gap")
            pytest.xfail(f"known gap with transformers {TRANSFORMERS}: {gap.reason}")
        _record(outcome, problems, "fixed upstream?")
        warnings.warn(f"zoo: {outcome.case} passes with transformers {TRANSFORMERS}: the known gap "
                      f"({gap.reason}) no longer applies; narrow its version range in KNOWN_GAPS", stacklevel=1)
        return
    _record(outcome, problems, "FAIL" if problems else "pass")
    assert not problems, f"{outcome.case} ({outcome.outcome}): " + "; ".join(problems)


def test_known_gaps_name_cases_of_this_zoo_and_version_ranges():
    cases = {f"{f.name}:{v}" if v else f.name for f, v in zoo_cases()}
    for name, gap in KNOWN_GAPS.items():
        assert gap.transformers, f"{name}: a known gap names the transformers versions it applies to"
        SpecifierSet(gap.transformers)  # parses
        if gap.applies():
            assert name in cases, f"known gap {name} is no case of transformers {TRANSFORMERS}'s zoo"
    assert KnownGap("x", "<5.25").applies(Version("5.24.0")) and not KnownGap("x", "<5.25").applies(Version("5.25.0"))


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
        ("per-expert output function after the down projection: var_1: op 'var' ...", "unsupported_experts"),
        ("rewrite does not reproduce the block: max relative error 1.00e+00 > 1e-04 on a random input", "validation_failed"),
        ("something nobody has written yet", "unclassified"),
    ],
)
def test_reason_codes(text, code):
    assert classify_reason(text) == code
    assert code in REASON_CODES
