"""A decomposed ExportedProgram → MLIR with torch-mlir's FX importer, each block's ops located by its path.

::

    ExportedProgram (aten; nodes of block B carry meta["custom"]["moepass_block"] = B)
        ─► FxImporter.import_frozen_program         torch dialect; an op of block B gets
                                                    loc("B"(<source location>))
        ─► torchdynamo-export-to-torch-backend-pipeline
        ─► torch-backend-to-<output type>-backend-pipeline   (not for "torch")

Diagnostics of every pass are collected (not printed), so a failure names the
op that did not lower and, from its location, the block it belongs to.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import fx

__all__ = [
    "BLOCK_KEY",
    "OUTPUT_TYPES",
    "LoweringFailure",
    "block_of_location",
    "import_program",
    "prepare_program",
]

logger = logging.getLogger(__name__)

#: The ``node.meta["custom"]`` key that carries a node's block path through torch.export.
BLOCK_KEY = "moepass_block"

#: What :func:`import_program` can produce, with the pipeline after the torch backend form.
_PIPELINES = {
    "linalg-on-tensors": "builtin.module(torch-backend-to-linalg-on-tensors-backend-pipeline{allow-non-finites=true})",
    "stablehlo": "builtin.module(torch-backend-to-stablehlo-backend-pipeline{allow-non-finites=true})",
    "tosa": "builtin.module(torch-backend-to-tosa-backend-pipeline)",
    "torch": None,
}
OUTPUT_TYPES = tuple(_PIPELINES)

_BACKEND_PIPELINE = (
    "builtin.module(func.func(torch-match-quantized-custom-ops), torchdynamo-export-to-torch-backend-pipeline)"
)
#: Asserts torch.export adds for torch._check: on the block's own sizes they hold by construction.
_ASSERTS = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default}
#: Metadata checks torch.export inserts; torch-mlir cannot canonicalise them on complex tensors (RoPE).
_METADATA_CHECKS = {torch.ops.aten._assert_tensor_metadata.default}


@dataclass
class LoweringFailure(Exception):
    """A torch-mlir pipeline failed; ``diagnostics`` are (location, message) of its errors."""

    stage: str
    diagnostics: list[tuple[str, str]]

    def __str__(self) -> str:
        first = self.diagnostics[0] if self.diagnostics else ("", "no diagnostic")
        return f"{self.stage}: {first[1]} (at {first[0]})"

    @property
    def block(self) -> str | None:
        """The block whose op failed first, from its location (None: outside every block)."""
        for location, _ in self.diagnostics:
            block = block_of_location(location)
            if block is not None:
                return block
        return None

    @property
    def op(self) -> str | None:
        """The op that did not lower, from the first diagnostic that names one."""
        for _, message in self.diagnostics:
            illegal = re.search(r"failed to legalize operation '([\w.]+)'", message)
            if illegal and illegal.group(1) == "torch.operator":  # an op torch-mlir does not know: its name
                named = re.search(r'name = "([\w.]+)"', message)
                return named.group(1) if named else illegal.group(1)
            if illegal:
                return illegal.group(1)
            leading = re.match(r"'([\w.]+)' op ", message)
            if leading:
                return leading.group(1)
            current = re.search(r'see current operation: (?:%\S+ = )?"([\w.]+)"', message)
            if current:
                return current.group(1)
        return None


def block_of_location(location: str) -> str | None:
    """The block path of an MLIR location string ``loc("model.layers.0.mlp"(...))``, if it has one."""
    found = re.search(r'loc\(("(?:[^"\\]|\\.)*")\(', location) or re.search(r'loc\(("(?:[^"\\]|\\.)*")\)', location)
    if not found:
        return None
    name = found.group(1)[1:-1]
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else None


#: Prefix of the location names of block ops.
_PREFIX = "moepass:"


def _block(node: fx.Node) -> str | None:
    custom = node.meta.get("custom") or {}
    return custom.get(BLOCK_KEY)


def prepare_program(program: torch.export.ExportedProgram):
    """Adjust a decomposed program for torch-mlir and ``output_type``, in place; returns it.

    * ``topk(sorted=False)`` → ``sorted=True``: torch-mlir lowers only the sorted
      form, and an unsorted top-k leaves its order unspecified anyway (DeepSeek's
      group mask scatters it).
    * the runtime asserts of a block's own ``torch._check`` calls are dropped: they
      restate what the decomposition guarantees, and stablehlo/tosa cannot lower them.
    * ``_assert_tensor_metadata`` checks are dropped: they restate the traced
      dtypes, and torch-mlir fails on them for complex tensors (Llama 4's RoPE).
    """
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.topk.default:
            args, kwargs = list(node.args), dict(node.kwargs)  # topk(self, k, dim=-1, largest=True, sorted=True)
            if len(args) >= 5 and args[4] is False:
                args[4] = True
            if kwargs.get("sorted") is False:
                kwargs["sorted"] = True
            node.args, node.kwargs = tuple(args), kwargs
        elif node.target in _ASSERTS and _block(node) is not None and not node.users:
            graph.erase_node(node)
        elif node.target in _METADATA_CHECKS and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    program.graph_module.recompile()
    return program


def _run_pipeline(module, pipeline: str, stage: str) -> None:
    from torch_mlir.passmanager import PassManager

    diagnostics: list[tuple[str, str]] = []

    def collect(diagnostic) -> bool:
        if str(diagnostic.severity).endswith("ERROR"):
            notes = " ".join(str(n.message) for n in diagnostic.notes)
            diagnostics.append((str(diagnostic.location), f"{diagnostic.message} {notes}".strip()))
        return True  # handled: nothing reaches stderr

    context = module.context
    handler = context.attach_diagnostic_handler(collect)
    try:
        with context:
            context.emit_error_diagnostics = True  # errors reach the handler, not only a failed status
            PassManager.parse(pipeline).run(module.operation)
    except Exception as error:
        raise LoweringFailure(stage, diagnostics or [("", str(error).strip().splitlines()[0])]) from None
    finally:
        handler.detach()


def _block_located_importer(context):
    """An FxImporter whose locations of block nodes are ``loc("moepass:<path>"(<source location>))``."""
    from torch_mlir import ir
    from torch_mlir.extras.fx_importer import ContextCache, FxImporter

    class BlockLocations(ContextCache):
        __slots__ = ()

        def get_node_location(self, node: fx.Node):
            location = super().get_node_location(node)
            block = _block(node)
            if block is None:
                return location
            child = location if location is not None else ir.Location.unknown(context=self._c)
            return ir.Location.name(_PREFIX + block, childLoc=child, context=self._c)

    class BlockLocatedImporter(FxImporter):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            # the importer asks its context cache for each node's location
            self._cc = BlockLocations(self._c, py_attr_tracker=self._py_attr_tracker)

    return BlockLocatedImporter(context=context)


def import_program(program: torch.export.ExportedProgram, output_type: str, func_name: str = "main"):
    """Import ``program`` with torch-mlir and lower it to ``output_type``; returns the MLIR module.

    Ops of a node whose ``meta["custom"]`` names a block get the location
    ``loc("moepass:<block path>"(<source location>))``.

    Raises:
        LoweringFailure: a pipeline failed (what and where, from its diagnostics).
    """
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d

    if output_type not in _PIPELINES:
        raise ValueError(f"unknown output type {output_type!r}; expected one of {', '.join(OUTPUT_TYPES)}")
    context = ir.Context()
    torch_d.register_dialect(context)
    importer = _block_located_importer(context)
    try:
        importer.import_frozen_program(program, func_name=func_name)
    except Exception as error:  # an FX node the importer has no rule for
        raise LoweringFailure("torch-mlir FX import", [("", f"{type(error).__name__}: {error}")]) from error
    module = importer.module
    _run_pipeline(module, _BACKEND_PIPELINE, "torch-mlir: FX graph → torch backend IR")
    pipeline = _PIPELINES[output_type]
    if pipeline is not None:
        _run_pipeline(module, pipeline, f"torch-mlir: torch backend IR → {output_type}")
    return module
