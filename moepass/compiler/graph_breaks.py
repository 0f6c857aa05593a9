"""What broke, where: the graph break behind the graph the backend is compiling, in words.

A block whose experts loop dynamo cannot capture reaches the backend in
pieces: its router in one graph and its experts elsewhere, or — when dynamo
skips the block's whole frame (a graph break inside a ``for`` loop) — only
each expert's MLP, compiled on its own, while the router and the loop run in
eager Python.  The backend sees the piece, never the break; this module reads
the break from dynamo while the backend runs:

* :func:`graph_break_here` — why the graph being compiled ended: the reason
  dynamo gives (``Data-dependent branching``, ``Dynamic shape operator``…)
  and the user's line it broke at;
* :func:`blocks_compiled_in_pieces` — the MoE blocks (a router and a
  ``ModuleList`` of experts, :func:`moepass.compiler.traceable_lists.expert_list_block`)
  whose forward is running in eager Python around the graph being compiled,
  when that graph holds one of their experts: the block graph-broke and the
  backend would otherwise say nothing about it.

Both read dynamo's internals (its compile frames on the Python stack, its
graph-break counters) and fail closed: when anything is not where it is
expected, they return nothing and the report says less.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from moepass.compiler.traceable_lists import ExpertListBlock, expert_list_block

__all__ = ["graph_break_here", "blocks_compiled_in_pieces", "BlockInPieces"]

logger = logging.getLogger(__name__)

#: How far up the Python stack to look (dynamo's compile frames, then the model's).
_STACK_DEPTH = 200
#: Frames of torch's own code (``Module._call_impl``…) are not the model's.
_TORCH_DIR = os.path.dirname(torch.__file__)


def _short(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def graph_break_here() -> str:
    """Why the graph being compiled ends, and where, e.g. ``Data-dependent branching at model.py:260 (if count == 0:)``.

    "" when the graph ends at a return (no break) or dynamo's frames are not found.
    """
    try:
        frame = sys._getframe(1)
        for _ in range(_STACK_DEPTH):
            if frame is None:
                return ""
            if frame.f_code.co_name == "compile_subgraph" and "reason" in frame.f_locals:
                reason = frame.f_locals["reason"]
                if not getattr(reason, "graph_break", False):
                    return ""
                text = str(getattr(reason, "reason", "")).strip().splitlines()[0].strip()
                stack = list(getattr(reason, "user_stack", None) or [])
                if stack:
                    last = stack[-1]
                    line = (last.line or "").strip()
                    text += f" at {_short(last.filename)}:{last.lineno}" + (f" ({line})" if line else "")
                return text
            frame = frame.f_back
    except Exception as error:  # dynamo's internals moved: say less
        logger.debug("graph break reason not found: %s", error)
    return ""


@dataclass
class BlockInPieces:
    """An MoE block running in eager Python around a graph that holds one of its experts."""

    module: nn.Module
    shape: ExpertListBlock
    #: The block's router weight (names the block in the report: its full path is found from the model).
    router_weight: torch.Tensor
    #: The router weight's name relative to the block (``gate.weight``).
    router_weight_name: str
    #: What made dynamo leave the block's frame, when known.
    reason: str
    #: The block's method running in eager Python (``forward``, or a helper it calls such as ``moe_infer``).
    method: str = "forward"


def _skip_reason(code) -> str:
    """Dynamo's recorded reason for skipping ``code``'s frame (its graph-break counter), or ""."""
    try:
        from torch._dynamo.utils import counters

        marker = f"{code.co_name} ({code.co_filename} line {code.co_firstlineno})"
        for message in counters.get("unimplemented", {}):
            if marker in message:
                first = message.split("\n\n*** While handling", 1)[0]
                lines = [line.strip() for line in first.splitlines() if line.strip()]
                head = lines[0] if lines else ""
                explanation = next((line for line in lines if line.startswith("Explanation:")), "")
                return f"{head}: {explanation.removeprefix('Explanation:').strip()}" if explanation else head
    except Exception as error:
        logger.debug("skip reason not found: %s", error)
    return ""


def blocks_compiled_in_pieces(example_inputs: list[Any], router_too: bool = False) -> list[BlockInPieces]:
    """MoE blocks whose forward runs in eager Python around the graph being compiled, which holds their experts.

    Walks up the Python stack from the backend: the frames of ``nn.Module``
    methods that run outside dynamo (their graph broke, or dynamo skipped
    them) and hold a router and a ``ModuleList`` of experts, one of whose
    parameters is an input of this graph (or, ``router_too``, one of their
    router's: a router compiled in a frame of its own).
    """
    params = {id(v) for v in example_inputs if isinstance(v, nn.Parameter)}
    if not params:
        return []
    found: list[BlockInPieces] = []
    try:
        frame = sys._getframe(1)
        seen: set[int] = set()
        for _ in range(_STACK_DEPTH):
            if frame is None:
                break
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module) and id(module) not in seen and not frame.f_code.co_filename.startswith(
                _TORCH_DIR
            ):
                seen.add(id(module))
                shape = expert_list_block(module)
                parts = [shape.experts_name, shape.router_name] if router_too and shape is not None else [
                    shape.experts_name] if shape is not None else []
                if any(id(p) in params for part in parts for p in getattr(module, part).parameters()):
                    router = getattr(module, shape.router_name)
                    weight = router.weight if isinstance(router, nn.Linear) else None
                    if weight is None:
                        weight = next((p for p in router.parameters() if p.dim() == 2), None)
                    name = next((n for n, p in module.named_parameters() if p is weight), None)
                    if weight is not None and name is not None:
                        found.append(
                            BlockInPieces(module, shape, weight, name, _skip_reason(frame.f_code), frame.f_code.co_name)
                        )
            frame = frame.f_back
    except Exception as error:  # dynamo's internals moved: say less
        logger.debug("blocks around the graph not found: %s", error)
        return []
    return found
