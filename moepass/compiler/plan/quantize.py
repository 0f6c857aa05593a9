"""The quantize stages: rewritten blocks' experts run on int8 / int4 weights.

For a graph compiled with ``options={"experts_dtype": "int8" | "int4", "group_size": G}``
the backend runs two stages of this module (see :data:`moepass.compiler.backend.STAGES`)::

    detect ─► resolve ─► quantize_inputs ─► validate ─► rewrite ─► quantize ─► (offload) ─► finish

``quantize``
    for each rewritten block: quantizes its two expert projections by
    round-to-nearest (:func:`moepass.quantize.quantize_rtn`: int8 per output
    channel, int4 per group with integer zero points) — once per weight
    tensor and scheme, cached across recompiles — into the packed layout,
    puts it in the form the ``cpu`` lowering measured fastest on this machine
    (:mod:`moepass.lowering.cpu_quantized_tuning`: the ATen CPU kernels'
    operands, or the packed layout itself — for moepass's native kernel only where
    it was measured faster, never with tuning off), and replaces the
    block's ``moepass.experts`` op (or its split form, in grad mode) by
    ``moepass.quantized_experts``.  The new op is checked on a random input
    against the *dequantized reference* — the float op on the same codes
    dequantized in float32 — to round-off (``tolerance_for`` the dtype); a
    block that fails, or whose shapes the scheme cannot take, keeps its float
    experts with the reason in its report.  Routers, shared experts and
    everything outside the routed experts stay as they are.
``quantize_inputs`` (with ``experts_float="release"``)
    on a recompile, gives validation the dequantized weights of experts an
    earlier compile released (the original block cannot run on a tensor
    with no data).

**The float weights' memory.**  By default (``experts_float="keep"``) the
model's float expert weights stay in memory untouched: the model still runs
eagerly, can be compiled again without quantization, exported or saved; the
compiled graph reads only the quantized copies, so the process holds both.
With ``experts_float="release"`` each quantized weight's storage is freed once
nothing else in the graph reads it (the tensor keeps its shape, so guards do
not change; its data is gone: the eager model can no longer run those
experts, and reading them fails loudly) — the process then holds the
quantized bytes only.

**Gradients.**  Quantized experts are frozen (:mod:`moepass.runtime.quantized_ops`):
in grad mode the tokens, routing weights and biases get gradients, the
experts' float weights none (their ``.grad`` stays None; the report says so).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from moepass.compiler.dataflow import example_value
from moepass.compiler.rewrite import remove_dead_nodes
from moepass.compiler.stages import BlockState, GraphState
from moepass.compiler.validate import relative_error, tolerance_for
from moepass.lowering import resolve_lowering
from moepass.lowering.cpu_quantized import PLAIN_FORMS, to_aten_cpu
from moepass.quantize.layout import QuantizedWeight, dequantize, quantize_rtn
from moepass.quantize.scheme import QuantizeError, QuantScheme
from moepass.runtime.ops import ExpertsConfig, parse_experts_config
from moepass.runtime.quantized_ops import QuantizedExpertsConfig

__all__ = [
    "quantize_stage", "quantize_inputs_stage", "quantized_layout", "EXPERTS_FLOAT", "register_standin", "has_standins",
]

logger = logging.getLogger(__name__)

#: What happens to the float expert weights once quantized (see the module docstring).
EXPERTS_FLOAT = ("keep", "release")

#: model weight → {(scheme, transposed): QuantizedWeight, (scheme, transposed, form, dtype): operands}
_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: float weight without data → the QuantizedWeight it stands for: a weight ``experts_float="release"``
#: freed, or a stand-in :func:`moepass.adapt_quantized_experts` made for a quantized checkpoint's experts
_released: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: the stand-ins among them (the rest were released by ``experts_float="release"``)
_standins: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_standin(tensor: torch.Tensor, layout: QuantizedWeight) -> None:
    """Make ``tensor`` (a float tensor [E, out, in] without data) stand for ``layout`` in compiled graphs.

    The quantize stage runs a block whose experts read stand-ins on the
    layout itself (no quantization of its own: the checkpoint's codes), and
    validation runs the original block on the layout dequantized.
    """
    _released[tensor] = layout
    _standins[tensor] = True


def has_standins() -> bool:
    """Whether any stand-in or released weight exists (the quantize stages then run on every compile)."""
    return len(_released) > 0


def _model_tensor(state: GraphState, item: Any) -> torch.Tensor | None:
    """The model's own tensor behind a weight (a placeholder's example input, a get_attr's attribute)."""
    if isinstance(item, torch.Tensor):
        return item
    if not isinstance(item, fx.Node):
        return None
    if item.op == "get_attr":
        target = state.gm
        for part in item.target.split("."):
            target = getattr(target, part, None)
        return target if isinstance(target, torch.Tensor) else None
    if item.op == "placeholder":  # the graph input itself (validation's env may hold a dequantized copy)
        placeholders = [n for n in state.gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, state.example_inputs):
            if node is item:
                return value if isinstance(value, torch.Tensor) else None
    value = state.env.get(item)
    return value if isinstance(value, torch.Tensor) else None


def quantized_layout(weight: torch.Tensor, scheme: QuantScheme, transposed: bool) -> QuantizedWeight:
    """``weight`` [E, out, in] (or [E, in, out]) in the packed layout: quantized once per tensor and scheme.

    A weight updated in place (its version counter moved) is quantized again;
    a released one (``experts_float="release"``) answers with the layout it was released for.
    """
    if weight in _released:
        return _released[weight]
    entries = _cache.setdefault(weight, {})
    key = (scheme, transposed, weight._version)
    layout = entries.get(key)
    if layout is None:
        for old in [k for k in entries if k[:2] == key[:2] or isinstance(k[0], int)]:  # an older version
            del entries[old]
        layout = entries[key] = quantize_rtn(weight, scheme, transposed)
    return layout


def _operands(weight: torch.Tensor, layout: QuantizedWeight, form: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """The op's tensors for ``layout`` in ``form`` (cached beside the layout)."""
    if form in PLAIN_FORMS:
        return list(layout.tensors().values())
    entries = _cache.get(weight)
    key = (id(layout), form, dtype)
    if entries is not None and key in entries:
        return entries[key]
    operands = to_aten_cpu(layout, dtype)
    if entries is not None:
        entries[key] = operands
    return operands


def quantize_inputs_stage(state: GraphState) -> None:
    """On a recompile, give validation dequantized copies of float weights an earlier compile released."""
    for block in state.open_blocks():
        if block.plan is None or block.item.experts is None:
            continue
        for name in ("w1", "w2"):
            node = block.plan.weights.get(name)
            tensor = _model_tensor(state, node)
            if tensor is not None and tensor in _released and isinstance(node, fx.Node):
                layout = _released[tensor]
                dense = dequantize(layout, tensor.dtype)
                state.env[node] = dense.transpose(1, 2) if block.item.spec.experts.transposed else dense


def quantize_stage(state: GraphState) -> None:
    """Replace each rewritten block's float experts op by ``moepass.quantized_experts`` (see the module docstring).

    Without ``experts_dtype``, only blocks whose experts are stand-ins of a quantized checkpoint
    (:func:`register_standin`) change.
    """
    scheme: QuantScheme | None = state.options.quantize
    for block in state.rewritten_blocks():
        reason = _quantize_block(state, block, scheme)
        if reason:
            block.report.notes.append(f"experts not quantized: {reason}")
            logger.warning("moepass: experts of %s not quantized: %s", block.report.display_path, reason)
    if has_standins():
        _quantize_leftover_standins(state)


def _experts_call(block: BlockState) -> tuple[fx.Node, tuple, list[fx.Node]] | None:
    """(the node whose value is the experts' output, (x, ids, weights, w1, w2, b1, b2, config), nodes it replaces)."""
    fused = block.experts_node()
    if fused is not None:
        return fused, tuple(fused.args), [fused]
    ops = torch.ops.moepass
    by_target = {n.target: n for n in block.inserted if n.op == "call_function"}
    rows, up, down = (by_target.get(t) for t in (ops.expert_rows.default, ops.experts_up.default, ops.experts_down.default))
    if rows is None or up is None or down is None:
        return None
    x, _, _, _, weights, w1, b1, config = up.args
    w2, b2 = down.args[5], down.args[6]
    return down, (x, rows.args[0], weights, w1, w2, b1, b2, config), [down, up, rows]


def _quantize_block(state: GraphState, block: BlockState, scheme: QuantScheme | None) -> str:
    """Quantize one rewritten block's experts; returns why not ("" when done, or nothing to do)."""
    if block.item.experts is None:
        return ""  # router only: the experts run outside the graph
    call = _experts_call(block)
    if call is None:
        return "the rewritten block has no experts op to replace" if scheme is not None else ""
    reason, node = _quantize_call(state, call, scheme, block.report.notes, block.report.path)
    if node is not None:
        block.inserted = [n for n in block.inserted if n not in call[2]] + [node]
    return reason


def _quantize_leftover_standins(state: GraphState) -> None:
    """Experts ops still reading stand-ins (a block detection or validation left as it was) run the codes too:
    a stand-in has no data, so the float op could not run."""
    for node in list(state.gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.moepass.experts.default:
            continue
        weights = [_model_tensor(state, a) for a in node.args[3:5]]
        if not all(w is not None and w in _released for w in weights):
            continue
        block = parse_experts_config(node.args[7]).block
        notes: list[str] = []
        reason, _ = _quantize_call(state, (node, tuple(node.args), [node]), None, notes, block)
        if reason:
            raise QuantizeError(f"block {block or '<root>'}: its experts, adapted from a quantized checkpoint, cannot "
                                f"run here: {reason}")
        logger.info("moepass: %s (not rewritten) runs its quantized checkpoint's codes: %s", block, "; ".join(notes))


def _quantize_call(state: GraphState, call, scheme: QuantScheme | None, notes: list[str],
                   path: str) -> tuple[str, fx.Node | None]:
    """Replace one float experts call by ``moepass.quantized_experts``: (why not or "", the new node)."""
    output, (x, ids, weights, w1_node, w2_node, b1, b2, config_text), replaced = call
    config = parse_experts_config(config_text)
    spec = config.spec
    x_value = example_value(x)
    device = x_value.device if isinstance(x_value, torch.Tensor) else torch.device("cpu")
    dtype = x_value.dtype if isinstance(x_value, torch.Tensor) else torch.float32
    lowering = resolve_lowering(config.lowering, device)
    if config.slots_per_token:  # the op computes each slot's rows for moepass.expert_output (Ergo, Muse Spark)
        return ("its experts apply a function to each slot's output before the routing weight (a per-expert output "
                "norm); quantized experts do not run that form yet, so they stay in float"), None
    if lowering not in ("cpu", "reference") or device.type != "cpu":
        return f"quantized experts run on the CPU (ATen's int8/int4 kernels); this block runs {lowering} on {device.type}", None
    w1, w2 = _model_tensor(state, w1_node), _model_tensor(state, w2_node)
    checkpoint = w1 is not None and w2 is not None and w1 in _released and w2 in _released
    if scheme is None and not checkpoint:
        return "", None  # a float block in a graph compiled without experts_dtype
    if w1 is None or w2 is None:
        return "its expert weights are computed in the graph, not parameters", None
    if any(type(w).__name__ == "DTensor" for w in (w1, w2)):
        return "its experts are split over ranks (expert parallelism): quantized experts are not sharded yet", None
    if checkpoint:  # a quantized checkpoint's experts: its own codes, never quantized again
        layouts = [_released[w1], _released[w2]]
        if scheme is not None and layouts[0].scheme != scheme:
            notes.append(
                f"experts_dtype {scheme.describe()} not applied: the experts came quantized "
                f"({layouts[0].scheme.describe()}), and requantizing would round them twice"
            )
        scheme = layouts[0].scheme
    else:
        try:
            scheme.check_shape(spec.hidden_size, "the gate/up projection")
            scheme.check_shape(w2.shape[1] if spec.transposed else w2.shape[2], "the down projection")
            layouts = [quantized_layout(w, scheme, spec.transposed) for w in (w1, w2)]
        except QuantizeError as error:
            return str(error), None
    form, kernels = "plain", ""
    if state.options.quantized_form != "plain" and lowering == "cpu":
        # this machine's choice: ATen's operands (16-bit activations), or the plain layout with the native
        # kernel where measured faster, and the kernel per row count — its table, or measured now
        from moepass.lowering.cpu_quantized_tuning import choose_form

        form, how = choose_form(scheme, layouts, dtype, state.options.cpu_tuning, path or "<root>",
                                spec=dataclasses.replace(spec, transposed=False))
        kernels = f"; {how}" if how else ""
    operands = [_operands(w, lay, form, dtype) for w, lay in zip((w1, w2), layouts)]
    new_spec = dataclasses.replace(spec, transposed=False)
    qconfig = QuantizedExpertsConfig(dataclasses.replace(config, spec=new_spec), scheme, form)
    error = _check_against_dequantized(state, x, b1, b2, layouts, operands, qconfig, spec.num_experts)
    if not error <= tolerance_for(dtype):
        return (f"the quantized op differs from its dequantized reference by {error:.2e} on a random input "
                "(a moepass bug; the float experts run)"), None
    gm = state.gm
    bound = [[_bind(gm, t, f"{_safe(path)}_{name}_q{i}") for i, t in enumerate(ops)]
             for name, ops in zip(("w1", "w2"), operands)]
    with gm.graph.inserting_after(output):
        node = gm.graph.call_function(
            torch.ops.moepass.quantized_experts.default,
            (x, ids, weights, bound[0], bound[1], b1, b2, qconfig.to_json()),
        )
    node.meta.update({k: v for k, v in output.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
    output.replace_all_uses_with(node)
    remove_dead_nodes(gm.graph, set(replaced) | {n for n in (w1_node, w2_node) if isinstance(n, fx.Node) and n.op == "get_attr"})
    before = sum(w.numel() * w.element_size() for w in (w1, w2))
    after = sum(t.numel() * t.element_size() for ops in operands for t in ops)
    if checkpoint and w1 in _standins:
        note = f"experts {scheme.describe()} ({form}) as the checkpoint stores them: {after / 1e6:.2f} MB"
    elif checkpoint:
        note = (f"experts {scheme.describe()} ({form}): {after / 1e6:.2f} MB; float weights released by an earlier "
                "compile (experts_float='release')")
    else:
        note = f"experts {scheme.describe()} ({form}): {before / 1e6:.2f} MB → {after / 1e6:.2f} MB"
        note += _float_weights(state, (w1_node, w2_node), (w1, w2), layouts)
    note += kernels
    if state.differentiable:
        note += "; frozen: the experts' float weights get no gradient"
    notes.append(note)
    return "", node


def _float_weights(state: GraphState, nodes, tensors, layouts) -> str:
    """Keep or release the float weights (``experts_float``); the words for the report."""
    if state.options.experts_float != "release":
        return "; float weights kept in memory (experts_float='release' frees them)"
    gm = state.gm
    freed = 0
    for node, tensor, layout in zip(nodes, tensors, layouts):
        readers = [u for u in node.users] if isinstance(node, fx.Node) and node.graph is gm.graph else []
        if readers:
            logger.info("moepass: float experts %s stay in memory: %s reads them", getattr(node, "name", "?"), readers[0].name)
            continue
        if tensor.untyped_storage().nbytes() == 0:
            continue
        freed += tensor.numel() * tensor.element_size()
        _released[tensor] = layout
        _release(tensor)
    return f"; {freed / 1e6:.2f} MB of float weights released" if freed else "; float weights kept (the graph reads them elsewhere)"


def _release(tensor: torch.Tensor) -> None:
    """Free ``tensor``'s data in place; its object, shape and strides stay (dynamo's guards do not move)."""
    empty = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)
    empty.untyped_storage().resize_(0)
    tensor.data = empty


def _check_against_dequantized(state, x, b1, b2, layouts, operands, qconfig, num_experts) -> float:
    """Max relative error of the quantized op against the float op on the dequantized codes (random input)."""
    spec = qconfig.experts.spec
    dtype = example_value(x).dtype
    generator = torch.Generator().manual_seed(0)
    tokens, depth = 9, 2
    x_random = torch.randn(tokens, spec.hidden_size, generator=generator).to(dtype)
    ids = torch.randint(0, num_experts, (tokens, depth), generator=generator)
    ids[0, 1] = num_experts  # an empty slot
    weights = torch.rand(tokens, depth, generator=generator)
    biases = [None if b is None else _model_tensor(state, b) for b in (b1, b2)]
    biases = [None if b is None else b.detach() for b in biases]
    reference_config = ExpertsConfig(spec=spec, lowering="reference").to_json()
    with torch.no_grad():
        got = torch.ops.moepass.quantized_experts(x_random, ids, weights, operands[0], operands[1], *biases,
                                                  qconfig.to_json())
        expected = torch.ops.moepass.experts(
            x_random.float(), ids, weights, dequantize(layouts[0]), dequantize(layouts[1]),
            *[None if b is None else b.float() for b in biases], reference_config,
        )
    return relative_error(got, expected)


def _safe(path: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in path) or "root"


def _bind(gm: fx.GraphModule, tensor: torch.Tensor, name: str) -> fx.Node:
    """A ``get_attr`` node for ``tensor``, registered as a buffer of ``gm`` (fake value in its metadata)."""
    attr, index = f"_moepass_{name}", 0
    while hasattr(gm, f"{attr}_{index}"):
        index += 1
    attr = f"{attr}_{index}"
    gm.register_buffer(attr, tensor)
    sources = getattr(gm, "_param_name_to_source", None)
    if isinstance(sources, dict):  # dynamo's map of the graph's parameters to their sources (AOTAutograd reads it)
        from torch._dynamo.source import ConstantSource

        sources[attr] = ConstantSource(attr)
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        node = gm.graph.get_attr(attr)
    fake_mode = next((getattr(example_value(n), "fake_mode", None) for n in gm.graph.nodes
                      if getattr(example_value(n), "fake_mode", None) is not None), None)
    node.meta["example_value"] = fake_mode.from_tensor(tensor) if fake_mode is not None else tensor
    return node

