"""Every discovered MoE family through the backend: rewritten, left alone (and why), or broken.

For each family of :func:`moepass.zoo.discovery.discover_moe_families`,
:func:`run_family` builds the tiny model, runs it eagerly at each sequence
length, compiles it with ``backend="adaptive_moe"`` (static policy, inner
compiler ``eager``) and compares the outputs, then reads
:func:`moepass.report`.  The outcome is one of :data:`OUTCOMES`:

``rewritten``
    every MoE block that ran was rewritten, the moepass ops are in the
    graph, and the outputs equal eager to :data:`TOLERANCE` (relative);
``partial``
    some blocks rewritten, not all;
``not rewritten``
    no block rewritten; the report says why (see :data:`moepass.runtime.report.REASON_CODES`);
``wrong``
    the compiled outputs differ from eager by more than the tolerance
    (must never happen);
``crash``
    compiling or running raised (recorded);
``build failed``
    the tiny model could not be built (recorded).

:func:`markdown_table` renders the outcomes; ``benchmarks/zoo_table.py``
prints it.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from moepass.compiler.dataflow import op_name
from moepass.runtime.report import classify_reason
from moepass.zoo.discovery import FAMILY_VARIANTS, MoEFamily, discover_moe_families, moe_family, tiny_family_model

__all__ = [
    "OUTCOMES",
    "TOLERANCE",
    "BlockOutcome",
    "FamilyOutcome",
    "family_inputs",
    "moe_blocks_that_ran",
    "zoo_cases",
    "runnable_model",
    "run_family",
    "survey",
    "markdown_table",
]

logger = logging.getLogger(__name__)

#: ``router only``: every block rewritten, but only its router (the experts loop
#: graph-broke and no model-side switch makes it traceable).
OUTCOMES = ("rewritten", "router only", "partial", "not rewritten", "wrong", "crash", "build failed")
#: Max relative error of a static-policy rewrite against eager (float32).
TOLERANCE = 1e-5
#: Sequence lengths the survey compares at (the second one recompiles).
LENGTHS = (8, 13)

_EXPERTS_CLASS = re.compile(r"Experts$")


@dataclass
class BlockOutcome:
    """One MoE block the report lists."""

    path: str
    rewritten: bool
    #: how the experts were dispatched (``grouped_mm`` …; ``eager_loop``: the
    #: experts loop graph-broke and only the router was seen)
    dispatch: str = ""
    #: one of :data:`moepass.runtime.report.REASON_CODES` ("" when rewritten)
    reason_code: str = ""
    reason: str = ""
    #: op names the rewrite inserted (``moepass::route``, ``moepass::experts`` …)
    inserted_ops: list[str] = field(default_factory=list)


@dataclass
class FamilyOutcome:
    """What the backend did with one family."""

    family: str
    kind: str
    outcome: str
    #: MoE blocks that ran in the eager forward (modules holding routed experts)
    blocks_ran: int = 0
    blocks: list[BlockOutcome] = field(default_factory=list)
    #: max relative error of the compiled outputs against eager, over the lengths
    max_error: float | None = None
    graphs: int = 0
    #: the exception, for ``crash`` and ``build failed``
    error: str = ""
    seconds: float = 0.0
    #: experts modules :func:`moepass.make_traceable` replaced before compiling
    made_traceable: list[str] = field(default_factory=list)
    #: modules of a class make_traceable knows that it left as they were, and why
    traceable_left: dict[str, str] = field(default_factory=dict)
    #: the variant of :data:`moepass.zoo.discovery.FAMILY_VARIANTS` built ("" for the config class's defaults)
    variant: str = ""

    @property
    def case(self) -> str:
        """``family`` or ``family:variant``."""
        return f"{self.family}:{self.variant}" if self.variant else self.family

    @property
    def rewritten(self) -> list[BlockOutcome]:
        """Blocks now running through moepass ops."""
        return [b for b in self.blocks if b.rewritten]

    @property
    def reason(self) -> str:
        """One line: why not (distinct reason codes with their first text), or the error."""
        if self.error:
            return self.error
        seen: dict[str, str] = {}
        for block in self.blocks:
            if not block.rewritten:
                seen.setdefault(block.reason_code, block.reason)
        if not seen and self.outcome == "not rewritten":
            return "no MoE block found in the compiled graphs"
        if not seen and self.outcome == "router only":
            return "the experts loop graph-breaks: the router is rewritten, the experts run in eager PyTorch"
        if not seen and self.outcome == "partial":
            return f"the report lists {len(self.rewritten)} rewritten blocks, {self.blocks_ran} ran"
        return "; ".join(f"{code}: {text}" for code, text in seen.items())


def _special_token_ids(config) -> set[int]:
    """Every token id a config names (image, audio, pad … tokens), through its sub-configs."""
    from transformers import PretrainedConfig

    ids: set[int] = set()
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            ids |= _special_token_ids(value)
        elif re.search(r"(token_id|token_index|token_ids)$", name):
            values = value if isinstance(value, list) else [value]
            ids |= {v for v in values if isinstance(v, int) and not isinstance(v, bool)}
    return ids


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def family_inputs(model: nn.Module, length: int, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Text-only inputs for ``model``: token ids avoiding every special token id of its config.

    Encoder–decoder models get encoder ``input_ids`` and ``decoder_input_ids``
    of the same length; multimodal models get text only.
    """
    config = model.config
    vocab = config.get_text_config(decoder=True).vocab_size
    special = _special_token_ids(config)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    generator = torch.Generator().manual_seed(seed + length)

    def ids():
        return allowed[torch.randint(0, len(allowed), (batch, length), generator=generator)]

    inputs: dict[str, Any] = {"input_ids": ids()}
    if getattr(config, "is_encoder_decoder", False) or _accepts(model, "decoder_input_ids"):
        # encoder–decoder models, and block-diffusion ones (whose default canvas is random)
        inputs["decoder_input_ids"] = ids()
    if _accepts(model, "use_cache"):
        inputs["use_cache"] = False
    return inputs


def _output_tensor(output: Any) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, torch.Tensor):
        return output
    return next(v for v in output if isinstance(v, torch.Tensor))


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().abs().max().clamp_min(1e-30)
    return float((actual.double() - expected.double()).abs().max() / scale)


def _expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding routed experts: ``*Experts`` classes and ``experts`` ModuleLists (no shared)."""
    found = {}
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if "shared" in last:
            continue
        if _EXPERTS_CLASS.search(type(module).__name__) or (
            last == "experts" and isinstance(module, (nn.ModuleList, nn.ModuleDict))
        ):
            if not any(name.startswith(prefix + ".") for prefix in found):
                found[name] = module
    return found


def moe_blocks_that_ran(model: nn.Module, inputs: dict[str, Any]) -> list[str]:
    """Module paths of the MoE blocks (parents of routed-expert modules) that ran on ``inputs``.

    Blocks whose experts share their weights with an earlier block (an
    encoder and a decoder tied together) count once: the report names a
    block by its weights.
    """
    ran: set[str] = set()
    handles = []
    seen_weights: set[int] = set()
    for name, module in _expert_modules(model).items():
        weights = {id(p) for p in module.parameters()}
        if weights and weights <= seen_weights:
            continue
        seen_weights |= weights
        block = name.rsplit(".", 1)[0] if "." in name else ""
        handles.append(module.register_forward_hook(lambda *_, block=block: ran.add(block)))
        # a ModuleList container is never called itself: hook its members
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            for child in module.children():
                handles.append(child.register_forward_hook(lambda *_, block=block: ran.add(block)))
    try:
        with torch.no_grad():
            _seeded(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(ran)


def _block_outcomes(report) -> list[BlockOutcome]:
    blocks = []
    for entry in report.blocks:
        inserted = []
        if entry.graph_after is not None:
            inserted = [op_name(n) for n in entry.graph_after.nodes if n.op == "call_function"]
        blocks.append(
            BlockOutcome(
                path=entry.display_path,
                rewritten=entry.rewritten,
                dispatch=entry.dispatch,
                reason_code="" if entry.rewritten else classify_reason(entry.reason),
                reason=entry.reason,
                inserted_ops=inserted,
            )
        )
    return blocks


def _short_error(error: BaseException) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else ""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}{where}"


def run_family(
    family: str | MoEFamily,
    lengths: Iterable[int] = LENGTHS,
    options: dict[str, Any] | None = None,
    tolerance: float = TOLERANCE,
    traceable: bool = True,
    variant: str = "",
) -> FamilyOutcome:
    """Build, compile (static policy, inner eager) and compare one family; never raises.

    With ``traceable`` the model first goes through :func:`moepass.make_traceable`
    (as a user whose report names a graph-breaking experts loop would do);
    the reference is the model before it.  ``variant`` names one of the
    family's :data:`moepass.zoo.discovery.FAMILY_VARIANTS` ("" for its config class's defaults).
    """
    import moepass

    family = family if isinstance(family, MoEFamily) else moe_family(family)
    started = time.perf_counter()
    result = FamilyOutcome(family=family.name, kind=family.kind, outcome="build failed", variant=variant)
    lengths = list(lengths)
    try:
        overrides = FAMILY_VARIANTS.get(family.name, {})[variant] if variant else {}
        model = runnable_model(tiny_family_model(family, **overrides), family)
        inputs = [family_inputs(model, length) for length in lengths]
        result.blocks_ran = len(moe_blocks_that_ran(model, inputs[0]))
        with torch.no_grad():
            expected = [_output_tensor(_seeded(model, x)) for x in inputs]
        if traceable:
            made = moepass.make_traceable(model)
            result.made_traceable, result.traceable_left = list(made), dict(made.left)
    except Exception as error:  # the tiny model cannot be built or run eagerly: not the backend's doing
        result.error = _short_error(error)
        result.seconds = time.perf_counter() - started
        return result
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model, backend="adaptive_moe", options={"inner": "eager", **(options or {})})
            actual = [_output_tensor(_seeded(compiled, x)) for x in inputs]
        result.max_error = max(_rel_err(a, e) for a, e in zip(actual, expected))
        try:
            report = moepass.report(compiled)
        except LookupError:  # the backend saw no graph with a parameter of this model
            report = None
        if report is not None:
            result.blocks = _block_outcomes(report)
            result.graphs = report.graphs
    except Exception as error:
        result.outcome = "crash"
        result.error = _short_error(error)
        logger.info("zoo: %s crashed: %s", family.name, result.error)
        result.seconds = time.perf_counter() - started
        return result
    finally:
        torch._dynamo.reset()
    result.outcome = _classify(result, tolerance)
    result.seconds = time.perf_counter() - started
    return result


def _seeded(model: nn.Module, inputs: dict[str, Any]) -> Any:
    """One forward from a fixed RNG state (some models draw noise in their forward)."""
    torch.manual_seed(0)
    return model(**inputs)


def runnable_model(model: nn.Module, family: MoEFamily) -> nn.Module:
    """``model``, or the sub-model that holds its experts when its class has no ``forward``.

    Qwen3-Omni's top-level class only generates; its MoE text model is the
    ``thinker`` (the attribute named like the sub-config that holds the experts).
    """
    if type(model).forward is not nn.Module.forward:
        return model
    head = family.moe_config_path.split(".")[0].removesuffix("_config")
    sub = getattr(model, head, None)
    if isinstance(sub, nn.Module) and type(sub).forward is not nn.Module.forward:
        return sub
    raise TypeError(f"{type(model).__name__} has no forward and no {head!r} sub-model with one")


def _classify(result: FamilyOutcome, tolerance: float) -> str:
    if result.max_error is None or not result.max_error <= tolerance:
        return "wrong"
    rewritten = result.rewritten
    if not rewritten:
        return "not rewritten"
    complete = len(rewritten) == len(result.blocks) and len(rewritten) >= result.blocks_ran
    if complete and all("moepass::route" in b.inserted_ops for b in rewritten):
        return "router only" if any(b.dispatch == "eager_loop" for b in rewritten) else "rewritten"
    return "partial"


def zoo_cases(families: Iterable[str | MoEFamily] | None = None) -> list[tuple[MoEFamily, str]]:
    """(family, variant) for every discovered family (or those named): its defaults ("") and each variant."""
    chosen = discover_moe_families() if families is None else [f if isinstance(f, MoEFamily) else moe_family(f) for f in families]
    return [(f, v) for f in chosen for v in ("", *FAMILY_VARIANTS.get(f.name, {}))]


def survey(
    families: Iterable[str | MoEFamily] | None = None,
    lengths: Iterable[int] = LENGTHS,
    progress: Callable[[FamilyOutcome], None] | None = None,
) -> list[FamilyOutcome]:
    """:func:`run_family` for every discovered family (or those named) and its variants, in name order."""
    outcomes = []
    for family, variant in zoo_cases(families):
        outcome = run_family(family, lengths, variant=variant)
        logger.info("zoo: %s: %s (%.1fs)", outcome.case, outcome.outcome, outcome.seconds)
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)
    return outcomes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(outcomes: Iterable[FamilyOutcome]) -> str:
    """family → kind → outcome → blocks rewritten / found / ran → max error → reason, as markdown."""
    lines = [
        "| family | kind | outcome | rewritten / found / ran | max rel. error | why not |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        error = "" if o.max_error is None else f"{o.max_error:.1e}"
        counts = f"{len(o.rewritten)} / {len(o.blocks)} / {o.blocks_ran}"
        why = "" if o.outcome == "rewritten" else _cell(o.reason)
        if o.made_traceable:
            why = (why + "; " if why else "") + "experts loop made traceable by moepass.make_traceable"
        if o.traceable_left:
            why = (why + "; " if why else "") + _cell("make_traceable left: " + "; ".join(sorted(set(o.traceable_left.values()))))
        lines.append(f"| {o.case} | {o.kind} | {o.outcome} | {counts} | {error} | {why} |")
    return "\n".join(lines)
