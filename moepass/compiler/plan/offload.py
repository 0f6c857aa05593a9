"""The offload stages: rewritten blocks' experts read their weights from an expert store.

For a graph compiled with ``options={"offload": ...}`` the backend runs two
stages of this module (see :data:`moepass.compiler.backend.STAGES`)::

    detect ─► resolve ─► offload_inputs ─► validate ─► rewrite ─► offload ─► finish

``offload_inputs``
    starts the compile's offload session (inference only) and, for a block
    whose weights an earlier compile already released to the store (a
    recompile), reads them back for validation — the original block cannot
    run on a tensor with no data.
``offload``
    for each rewritten block: checks the store holds its experts with the
    model's shapes and dtypes and — when the weights are still in memory —
    the same bytes (CRC-32 per expert); registers its gate and routing for
    prefetch; points the ``moepass.experts`` op at the store (the session key
    in the op's config); checks the offloaded op against the in-memory op on
    a random input; then releases each offloaded weight (see
    :mod:`moepass.runtime.offload.release`) once nothing in the graph reads it
    but offloaded experts ops, and refuses a graph that would read a released
    weight anywhere else.

A store written quantized (``moepass offload --experts-dtype int4``) is checked
against the model's weights quantized the same way (CRC-32 per expert), and its
blocks' experts op becomes ``moepass.quantized_experts`` reading the codes from
the store (checked on a random input against the store's codes dequantized);
the store's quantization decides, and ``experts_dtype`` naming another is an
error.

A block that cannot be offloaded stays in memory, with the reason in its
report's notes.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Any

import torch
import torch.fx as fx

from moepass.compiler.dataflow import example_value
from moepass.compiler.stages import BlockState, GraphState
from moepass.compiler.validate import relative_error, tolerance_for
from moepass.runtime.offload.release import check_resident_weights, is_released, release_tensor, released_from
from moepass.runtime.offload.session import NextRouter, OffloadError, OffloadSession, session_for
from moepass.quantize.layout import (
    QuantizedWeight,
    dequantize,
    pack_int4,
    pack_int4_row_blocks,
    quantize_rtn,
    unpack_int4_row_blocks,
)
from moepass.quantize.scheme import QuantScheme
from moepass.runtime.offload.store import expert_bytes
from moepass.runtime.ops import ExpertsConfig, parse_experts_config
from moepass.runtime.quantized_ops import QuantizedExpertsConfig, parse_quantized_config

__all__ = ["offload_inputs_stage", "offload_stage"]

logger = logging.getLogger(__name__)

_SESSION = "offload.session"
_OFFLOADED = "offload.blocks"


@dataclasses.dataclass
class _Offloaded:
    path: str
    nodes: dict[str, fx.Node]
    values: dict[str, torch.Tensor]


def _value(item: Any, env: dict[fx.Node, Any]) -> Any:
    """A node's example value (what validation runs on), or the attribute a ``get_attr`` names."""
    if not isinstance(item, fx.Node):
        return item
    value = env.get(item)
    return _model_tensor_of_attr(item) if value is None and item.op == "get_attr" else value


def _model_tensor_of_attr(node: fx.Node) -> Any:
    target = node.graph.owning_module
    for part in node.target.split("."):
        target = getattr(target, part, None)
    return target


def _model_tensor(state: GraphState, node: fx.Node) -> torch.Tensor | None:
    """The model's own tensor behind a weight node (not validation's copy read back from the store)."""
    if node.op == "get_attr":
        value = _model_tensor_of_attr(node)
    else:
        placeholders = [n for n in state.gm.graph.nodes if n.op == "placeholder"]
        value = next((v for n, v in zip(placeholders, state.example_inputs) if n is node), state.env.get(node))
    return value if isinstance(value, torch.Tensor) else None


def _released(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and is_released(tensor)


def offload_inputs_stage(state: GraphState) -> None:
    """Start the offload session; give validation the store's copy of weights already released."""
    if torch.is_grad_enabled():
        raise OffloadError(
            "offloaded experts are inference-only: call the compiled model under torch.no_grad() or "
            "torch.inference_mode()"
        )
    session = session_for(state.options.offload)
    state.scratch[_SESSION] = session
    for block in state.open_blocks():
        stored = session.manifest.block(block.item.path)
        if block.item.experts is None or stored is None or block.plan is None:
            continue
        released = {
            name: node for name, node in block.plan.weights.items()
            if isinstance(node, fx.Node) and _released(_model_tensor(state, node))
        }
        if released:  # a recompile: an earlier compile of this model released them
            dtype = _model_tensor(state, next(iter(released.values()))).dtype
            stacked = _stacked_float(session, stored, block.item.spec.experts.transposed, dtype)
            for name, node in released.items():
                state.env[node] = stacked[name]


def _store_scheme(stored) -> QuantScheme | None:
    """The quantization of a stored block's experts (None: float)."""
    if not stored.quant:
        return None
    return QuantScheme.from_dict({k: v for k, v in stored.quant.items() if k != "row_block"})


def _stored_layouts(stored, tensors: dict[str, torch.Tensor]) -> list[QuantizedWeight]:
    """The stored block's two projections as :class:`QuantizedWeight` (int4 codes back in plain order)."""
    scheme = _store_scheme(stored)
    row_block = int(stored.quant.get("row_block", 0))
    layouts = []
    for name in ("w1", "w2"):
        codes = tensors[f"{name}.codes"]
        if scheme.bits == 4 and row_block:
            codes = pack_int4(unpack_int4_row_blocks(codes, row_block))
        scales = tensors[f"{name}.scales"]
        shape = (codes.shape[0], codes.shape[1], codes.shape[2] * (2 if scheme.bits == 4 else 1))
        layouts.append(QuantizedWeight(codes, scales, tensors.get(f"{name}.zeros"), scheme, shape))
    return layouts


def _stacked_float(session: OffloadSession, stored, transposed: bool,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The store's experts as the float tensors the model's block reads (quantized ones dequantized to ``dtype``)."""
    stacked = session.reader.read_stacked(stored)
    if not stored.quant:
        return stacked
    floats = {}
    for name, layout in zip(("w1", "w2"), _stored_layouts(stored, stacked)):
        dense = dequantize(layout, dtype)
        floats[name] = dense.transpose(1, 2) if transposed else dense
    floats.update({k: v for k, v in stacked.items() if k in ("b1", "b2")})
    return floats


def _check_quantized_store(stored, values: dict[str, torch.Tensor], scheme: QuantScheme, transposed: bool,
                           root) -> None:
    """Raise ValueError unless quantizing the in-memory weights gives the store's bytes, expert by expert."""
    row_block = int(stored.quant.get("row_block", 0))
    for expert in range(stored.num_experts):
        tensors = {}
        for name in ("w1", "w2"):
            layout = quantize_rtn(values[name][expert : expert + 1], scheme, transposed)
            codes = layout.codes
            if scheme.bits == 4 and row_block:
                codes = pack_int4_row_blocks(layout.integer_codes(), row_block)
            tensors.update({f"{name}.codes": codes, f"{name}.scales": layout.scales})
            if layout.zeros is not None:
                tensors[f"{name}.zeros"] = layout.zeros
        for name in ("b1", "b2"):
            if values.get(name) is not None:
                tensors[name] = values[name][expert : expert + 1]
        crc = 0
        for tensor in stored.tensors:
            if tensor.name not in tensors:
                raise ValueError(f"block {stored.path}: the store holds {tensor.name}, the model has nothing for it")
            crc = zlib.crc32(expert_bytes(tensors[tensor.name][0]), crc)
        if crc != stored.crc32[expert]:
            raise ValueError(
                f"block {stored.path}: expert {expert}'s weights in memory, quantized {scheme.describe()}, differ "
                f"from the store {root} (the store was written from another model or checkpoint)"
            )


def offload_stage(state: GraphState) -> None:
    """Point each rewritten block's experts op at the store; release the weights nothing else reads."""
    session: OffloadSession = state.scratch[_SESSION]
    offloaded: dict[str, _Offloaded] = {}
    for block in state.rewritten_blocks():
        result = _offload_block(state, session, block)
        if isinstance(result, str):
            block.report.notes.append(f"not offloaded: {result}")
        elif result is not None:
            offloaded[block.report.path] = result
            block.report.notes.append(f"experts offloaded to {session.root}")
    for block in state.blocks:
        if block.rewritten or block.plan is None:
            continue
        weights = [_model_tensor(state, n) for n in block.plan.weights.values() if isinstance(n, fx.Node)]
        if any(_released(w) for w in weights):
            raise OffloadError(
                f"block {block.report.display_path} could not be rewritten ({block.report.reason}) and its expert "
                f"weights are only in the store {session.root}: the original block cannot run"
            )
    _release(state, session, offloaded)


def _offload_block(state: GraphState, session: OffloadSession, block: BlockState) -> _Offloaded | str | None:
    """Offload one rewritten block: the record, a reason it stays in memory, or None (nothing to offload)."""
    match, plan = block.item, block.plan
    node = block.experts_node()
    if match.experts is None or node is None:
        return None
    stored = session.manifest.block(match.path)
    if stored is None:
        return f"the store {session.root} has no block {match.path or '<root>'}"
    if match.spec.experts.stacked_from_modules:
        return "its experts are separate modules (offloading needs stacked weights)"
    nodes, values = {}, {}
    for name, item in plan.weights.items():
        if item is None:
            continue
        if not isinstance(item, fx.Node) or item.op not in ("placeholder", "get_attr"):
            return f"its {name} is computed in the graph, not a parameter"
        value = _model_tensor(state, item)
        if value is None:
            return f"no value for its {name}"
        nodes[name], values[name] = item, value
    released = [n for n, v in values.items() if is_released(v)]
    if released and len(released) != len(values):
        raise OffloadError(f"block {match.path}: only some of its expert weights ({', '.join(released)}) are released")
    scheme = _store_scheme(stored)
    wanted = state.options.quantize
    if scheme is None and wanted is not None:
        raise OffloadError(
            f"the options ask for {wanted.describe()} experts and the store {session.root} holds {match.path}'s in "
            f"{stored.tensors[0].dtype}: write a quantized store (`moepass offload --experts-dtype {wanted.name}`)"
        )
    if scheme is not None and wanted is not None and wanted != scheme:
        raise OffloadError(
            f"the options ask for {wanted.describe()} experts and the store {session.root} holds {match.path}'s as "
            f"{scheme.describe()}; drop experts_dtype (the store decides) or write the store again"
        )
    try:
        if released:
            if scheme is None:
                _check_released(session, stored, values)
        elif scheme is None:
            check_resident_weights(stored, values, session.root)
        else:
            _check_quantized_store(stored, values, scheme, match.spec.experts.transposed, session.root)
    except ValueError as error:
        raise OffloadError(f"{error}; write the store again with `moepass offload`") from None
    session.register_block(match.path, _next_router(block, state.env))
    in_memory = node.args[7]
    key = f"{session.key}|{match.path}"
    if scheme is None:
        config = dataclasses.replace(parse_experts_config(in_memory), offload=key)
        node.update_arg(7, config.to_json())
        _check_against_memory(session, block, node, in_memory, state.env)
    else:
        node = _quantized_offload_node(state, block, node, scheme, key)
        _check_quantized_against_store(session, block, node, stored, state.env)
        block.report.notes.append(f"experts {scheme.describe()} from the store")
    return _Offloaded(match.path, nodes, values)


def _quantized_offload_node(state: GraphState, block: BlockState, node: fx.Node, scheme: QuantScheme,
                            key: str) -> fx.Node:
    """Replace the float experts node by ``moepass.quantized_experts`` reading the store ``key`` names."""
    x, ids, weights, _, _, b1, b2, config_text = node.args
    config = parse_experts_config(config_text)
    experts = dataclasses.replace(config, spec=dataclasses.replace(config.spec, transposed=False), offload=key)
    qconfig = QuantizedExpertsConfig(experts, scheme, "plain")
    graph = state.gm.graph
    with graph.inserting_after(node):
        new = graph.call_function(torch.ops.moepass.quantized_experts.default,
                                  (x, ids, weights, [], [], b1, b2, qconfig.to_json()))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    block.inserted = [new if n is node else n for n in block.inserted]
    return new


def _check_quantized_against_store(session: OffloadSession, block: BlockState, node: fx.Node, stored,
                                   env: dict[fx.Node, Any]) -> None:
    """The offloaded quantized op equals the float op on the store's codes dequantized (a random input)."""
    config = parse_quantized_config(node.args[7])
    spec = config.experts.spec
    floats = _stacked_float(session, stored, transposed=False)
    biases = [_value(b, env) for b in node.args[5:7]]
    dtype = example_value(node.args[0]).dtype
    generator = torch.Generator().manual_seed(0)
    tokens, depth = 5, max(1, block.plan.route_config.depth)
    x = torch.randn(tokens, spec.hidden_size, generator=generator).to(dtype)
    ids = torch.randint(0, spec.num_experts, (tokens, depth), generator=generator)
    weights = torch.rand(tokens, depth, generator=generator)
    reference = ExpertsConfig(spec=spec, lowering="reference").to_json()
    with torch.no_grad():
        expected = torch.ops.moepass.experts.default(
            x.float(), ids, weights, floats["w1"].float(), floats["w2"].float(),
            *[None if b is None else b.float() for b in biases], reference,
        )
        with session.validating():
            got = torch.ops.moepass.quantized_experts.default(x, ids, weights, [], [], *biases, node.args[7])
    error = relative_error(got, expected)
    if not error <= tolerance_for(dtype):
        raise OffloadError(
            f"block {block.report.display_path}: its offloaded quantized experts differ from the store's codes "
            f"dequantized by {error:.2e} on a random input (a moepass bug; run without offload)"
        )


def _check_released(session: OffloadSession, stored, values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        stored_tensor = stored.tensor(name)
        if stored_tensor is None or tuple(value.shape) != stored.stacked_shape(name):
            raise ValueError(f"block {stored.path}: {name} does not match the store {session.root}")
        origin = released_from(value)
        if origin is None:
            continue  # read back from the store for validation, or released by someone else: shapes are all we check
        if origin[0] != str(session.root) or origin[1] != stored.path or origin[2] != name:
            raise ValueError(
                f"block {stored.path}: its {name} was released to the store {origin[0]} (block {origin[1]}), "
                f"not to {session.root}"
            )


def _next_router(block: BlockState, env: dict[fx.Node, Any]) -> NextRouter:
    router, plan = block.item.router, block.plan
    weight = _value(router.weight, env)
    bias = _value(router.bias, env) if router.bias is not None else None
    tensors = [_value(t, env) for t in plan.route_tensors]
    return NextRouter(
        weight=weight.detach(),
        bias=bias.detach() if bias is not None else None,
        route_config=plan.route_config.to_json(),
        route_tensors=[t.detach() if isinstance(t, torch.Tensor) else t for t in tensors],
        uses_x=plan.route_config.uses_x,
        depth=plan.route_config.depth,
    )


def _check_against_memory(
    session: OffloadSession, block: BlockState, node: fx.Node, in_memory: str, env: dict[fx.Node, Any]
) -> None:
    """The offloaded op equals the in-memory op on a random input (the store's bytes, read back, run)."""
    spec = parse_experts_config(in_memory).spec
    args = [_value(a, env) for a in node.args[3:7]]  # released weights: validation's copy from the store
    dtype = example_value(node.args[0]).dtype
    generator = torch.Generator().manual_seed(0)
    tokens, depth = 5, max(1, block.plan.route_config.depth)
    x = torch.randn(tokens, spec.hidden_size, generator=generator).to(dtype)
    ids = torch.randint(0, spec.num_experts, (tokens, depth), generator=generator)
    weights = torch.rand(tokens, depth, generator=generator)
    with torch.no_grad():
        expected = torch.ops.moepass.experts.default(x, ids, weights, *args, in_memory)
        with session.validating():
            got = torch.ops.moepass.experts.default(x, ids, weights, *args, node.args[7])
    error = relative_error(got, expected)
    if not error <= tolerance_for(dtype):
        raise OffloadError(
            f"block {block.report.display_path}: its offloaded experts differ from the in-memory ones by "
            f"{error:.2e} on a random input (a moepass bug; run without offload)"
        )


def _offload_key(node: fx.Node) -> str:
    """The offload key of an experts node (float or quantized), "" for any other node."""
    if node.op != "call_function":
        return ""
    if node.target is torch.ops.moepass.experts.default:
        return parse_experts_config(node.args[7]).offload
    if node.target is torch.ops.moepass.quantized_experts.default:
        return parse_quantized_config(node.args[7]).experts.offload
    return ""


def _release(state: GraphState, session: OffloadSession, offloaded: dict[str, _Offloaded]) -> None:
    """Free the offloaded weights; refuse a graph that reads a released weight outside an offloaded op."""
    gm = state.gm
    offload_users = {n for n in gm.graph.nodes if _offload_key(n).startswith(session.key + "|")}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, state.example_inputs):
        if not isinstance(value, torch.Tensor) or not is_released(value):
            continue
        outside = [u for u in node.users if u not in offload_users]
        if outside:
            raise OffloadError(
                f"graph input {node.name} has no data (its expert weights live in an expert store) but "
                f"{outside[0].name} reads it outside an offloaded experts op"
            )
    freed = 0
    for path, record in offloaded.items():
        for name, node in record.nodes.items():
            value = record.values[name]
            if value is None or is_released(value):
                continue
            if any(u not in offload_users for u in node.users):
                logger.info("moepass: %s of %s stays in memory: the graph reads it elsewhere", name, path)
                continue
            freed += value.numel() * value.element_size()
            release_tensor(value, session.root, path, name)
    if freed:
        logger.info("moepass: released %.1f MB of expert weights to %s", freed / 1e6, session.root)
