"""The FX op chains of one MoE block per family, as dynamo's torch-level graph shows them.

    python benchmarks/zoo_regions.py qwen3_next ernie4_5_moe   # some families
    python benchmarks/zoo_regions.py --all > regions.txt        # every discovered family

For each family: the tiny model of moepass.zoo.discovery runs once eagerly;
its first MoE block (the parent of the first routed-experts module that ran)
is compiled *on its own* on the input it received, with a backend that only
records the graphs.  Printed, per graph of that block:

- ``router``: the nodes from the router's linear to the expert selection
  (topk / sort / argmax / max);
- ``after selection``: the nodes that use the selection's outputs before the
  expert GEMMs (routing weights, dispatch);
- ``between GEMMs``: the nodes between the first and the last expert GEMM
  (the activation), with what else they read;
- ``after GEMMs``: the nodes after the last expert GEMM (scales, biases,
  combine);
- the expert weights (shape, source path) and dynamo's graph-break reasons
  for the block (``torch._dynamo.explain``).

A diagnostic for designing detection (see notes/zoo-survey.md), not a benchmark.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402

from moepass.compiler.dataflow import example_value  # noqa: E402

_SELECTION = {"topk", "sort", "argsort", "argmax", "max", "kthvalue", "multinomial"}
_GEMM = {"linear", "matmul", "mm", "bmm", "baddbmm", "einsum", "_grouped_mm", "grouped_mm", "transformers::grouped_mm_fallback"}


def _short(node: fx.Node, names: dict) -> str:
    return names.get(node, node.name)


def _fmt_arg(value, names) -> str:
    if isinstance(value, fx.Node):
        return _short(value, names)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_fmt_arg(v, names) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, slice):
        return f"{'' if value.start is None else value.start}:{'' if value.stop is None else value.stop}" + (
            "" if value.step is None else f":{value.step}"
        )
    text = repr(value)
    return text if len(text) < 40 else text[:37] + "..."


def format_node(node: fx.Node, names: dict) -> str:
    """``name = op(args, k=v) -> shape``."""
    from moepass.compiler.dataflow import op_name, tensor_shape

    args = [_fmt_arg(a, names) for a in node.args]
    args += [f"{k}={_fmt_arg(v, names)}" for k, v in node.kwargs.items()]
    shape = tensor_shape(node)
    out = f" -> {list(shape)}" if shape is not None else ""
    return f"{node.name} = {op_name(node)}({', '.join(args)}){out}"


def _param_names(gm: fx.GraphModule) -> dict:
    """Parameter placeholders named by their module path (``<experts.gate_up_proj>``)."""
    from moepass.compiler.detect.common import source_path

    names = {}
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr"):
            continue
        path = source_path(node)
        if path is None and re.search(r"_(parameters|buffers)_", node.name):
            # l_self_modules_experts_parameters_gate_up_proj_ -> experts.gate_up_proj
            body = re.sub(r"^l_+self_+", "", node.name).rstrip("_")
            body = re.sub(r"^modules_", "", body)
            path = re.sub(r"_(modules|parameters|buffers)_", ".", body)
        if path is not None and (node.op == "get_attr" or re.search(r"(parameters|buffers)", node.name)):
            names[node] = f"<{path}>"
    return names


def _origin(node: fx.Node, names: dict, depth: int = 5) -> str:
    """Where an input comes from: ``squeeze<-view<-<gate.e_score_correction_bias>``."""
    from moepass.compiler.dataflow import op_name

    steps = [node.name]
    current = node
    for _ in range(depth):
        if current in names:
            steps[-1] = names[current]
            break
        inputs = current.all_input_nodes
        if current.op == "placeholder" or len(inputs) != 1:
            break
        current = inputs[0]
        steps.append(current.name if current not in names else names[current])
        if op_name(current) == "placeholder":
            break
    return "<-".join(steps)


def _external_inputs(section: list[fx.Node], names: dict, exclude: set) -> list[str]:
    outside = {a for n in section for a in n.all_input_nodes if a not in section and a not in exclude}
    return sorted(_origin(a, names) for a in outside)


_RESIDUAL_STOP = {"add", "iadd", "cat", "embedding"}


def _input_chain(node: fx.Node, names: dict, limit: int = 14) -> list[fx.Node]:
    """The ops that prepare a router's input (a norm, a scale), back to a residual sum or an input."""
    from moepass.compiler.dataflow import op_name

    chain = []
    current = node
    for _ in range(limit):
        if current.op == "placeholder" or current in names or op_name(current) in _RESIDUAL_STOP:
            break
        chain.append(current)
        inputs = [a for a in current.all_input_nodes if a not in names]
        if not inputs:
            break
        # follow the widest non-parameter input (the hidden states, not an eps or a scale)
        current = max(inputs, key=lambda a: len(getattr(example_value(a), "shape", ())) or 0)
    return list(reversed(chain))


def _uses_through_views(node: fx.Node, depth: int = 4) -> list[fx.Node]:
    from moepass.compiler.dataflow import op_name

    found, frontier = [], [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if op_name(user) in _GEMM:
                    found.append(user)
                else:
                    nxt.append(user)
        frontier = nxt
    return found


def describe_graph(gm: fx.GraphModule, num_experts: int) -> list[str]:
    """The sections of one recorded graph of an MoE block."""
    from moepass.compiler.dataflow import Dataflow, example_value, op_name, tensor_shape

    flow = Dataflow(gm.graph)
    names = _param_names(gm)
    nodes = list(gm.graph.nodes)
    lines = []
    expert_params = [
        n
        for n in nodes
        if n in names
        and re.search(r"(^<|\.)experts\.", names[n])
        and "shared" not in names[n]
        and tensor_shape(n) is not None
        and len(tensor_shape(n)) >= 2
    ]
    for p in expert_params:
        lines.append(f"  expert weight {names[p]} {list(tensor_shape(p))}")
    gemms = sorted({g for p in expert_params for g in _uses_through_views(p)}, key=nodes.index)
    # selections over scores (float); the dispatch's sort over expert ids is not one
    selections = [
        n
        for n in nodes
        if op_name(n) in _SELECTION
        and n.args
        and isinstance(n.args[0], fx.Node)
        and getattr(example_value(n.args[0]), "is_floating_point", lambda: False)()
    ]
    router_linears = [
        n
        for n in nodes
        if op_name(n) in ("linear", "matmul", "mm")
        and n not in gemms
        and tensor_shape(n) is not None
        and len(tensor_shape(n)) >= 1
        and tensor_shape(n)[-1] is not None
        and isinstance(tensor_shape(n)[-1], int)
        and num_experts <= tensor_shape(n)[-1] <= 2 * num_experts + 2
        and any(s in flow.descendants(n) for s in selections)
    ]
    after_nodes: list[fx.Node] = []
    gemm_desc = set().union(*(flow.descendants(g) for g in gemms)) if gemms else set()
    if router_linears and selections:
        linear = router_linears[0]
        last_sel = max((s for s in selections if s in flow.descendants(linear)), key=nodes.index)
        chain = [n for n in nodes if n is linear or (n in flow.descendants(linear) and n in flow.ancestors(last_sel)) or n is last_sel]
        lines.append("  router:")
        prep = _input_chain(linear.args[0], names) if linear.args and isinstance(linear.args[0], fx.Node) else []
        if prep:
            lines.append("    (router input prepared by:)")
            lines += [f"      {format_node(n, names)}" for n in prep]
        lines += [f"    {format_node(n, names)}" for n in chain]
        lines.append("    (reads: " + ", ".join(_external_inputs(chain, names, set())) + ")")
        after = [
            n
            for n in nodes
            if n in flow.descendants(last_sel)
            and n not in gemm_desc
            and n not in gemms
            and n.op != "output"
        ]
        after_nodes = after
        lines.append(f"  after selection ({len(after)} nodes):")
        lines += [f"    {format_node(n, names)}" for n in after[:60]]
        if len(after) > 60:
            lines.append(f"    ... {len(after) - 60} more")
    elif selections:
        lines.append("  selection without a router linear:")
        lines += [f"    {format_node(n, names)}" for n in selections]
    else:
        lines.append("  no selection op (topk/sort/argmax/max) in this graph")
    if gemms:
        lines.append("  expert GEMMs:")
        lines += [f"    {format_node(g, names)}" for g in gemms]
        first, last = gemms[0], gemms[-1]
        if first is not last:
            between = [n for n in nodes if n in flow.descendants(first) and n in flow.ancestors(last) and n not in gemms]
            lines.append("  between GEMMs:")
            lines += [f"    {format_node(n, names)}" for n in between]
            extra = _external_inputs(between, names, set(gemms))
            if extra:
                lines.append("    (also reads: " + ", ".join(extra) + ")")
        tail = [n for n in nodes if n in flow.descendants(last) and n.op != "output"]
        lines.append(f"  after GEMMs ({len(tail)} nodes):")
        lines += [f"    {format_node(n, names)}" for n in tail[:40]]
        extra = _external_inputs(tail, names, set(gemms) | set(after_nodes))
        if extra:
            lines.append("    (also reads: " + ", ".join(extra) + ")")
        if len(tail) > 40:
            lines.append(f"    ... {len(tail) - 40} more")
    else:
        lines.append("  no expert GEMM in this graph")
    lines += _detector_view(gm, flow)
    return lines


def _detector_view(gm: fx.GraphModule, flow) -> list[str]:
    """What moepass's detector says about this graph of the block compiled alone."""
    from moepass.compiler.detect import BlockMatch, find_moe_blocks
    from moepass.compiler.detect.common import Mismatch
    from moepass.compiler.detect.router import is_topk, match_router

    lines = []
    for node in gm.graph.nodes:
        if is_topk(node):
            try:
                match = match_router(node, flow)
                lines.append(f"  moepass match_router({node.name}): {match.spec.kind} ({match.spec.description})")
            except Mismatch as error:
                lines.append(f"  moepass match_router({node.name}): Mismatch: {error}")
    for item in find_moe_blocks(gm, flow):
        if isinstance(item, BlockMatch):
            experts = item.spec.experts.description if item.spec.experts is not None else "router only"
            lines.append(f"  moepass find_moe_blocks (block alone): match: {item.spec.router.description}; {experts}")
        else:
            lines.append(f"  moepass find_moe_blocks (block alone): left alone: {item.reason}")
    return lines


def describe_family(name: str) -> str:
    """The report of one family's first MoE block (see the module docstring)."""
    from moepass.zoo.discovery import moe_family, tiny_family_model
    from moepass.zoo.survey import _expert_modules, family_inputs

    family = moe_family(name)
    model = tiny_family_model(family)
    inputs = family_inputs(model, 8)
    experts = _expert_modules(model)
    captured = {}

    def grab(module, args, kwargs, path):
        captured.setdefault(path, (args, kwargs))

    handles = []
    for path in experts:
        block_path = path.rsplit(".", 1)[0]
        block = model.get_submodule(block_path)
        handles.append(
            block.register_forward_pre_hook(lambda m, a, k, p=block_path: grab(m, a, k, p), with_kwargs=True)
        )
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    if not captured:  # no routed-experts module (e.g. product-key experts): the *MoE block instead
        for path, module in model.named_modules():
            if re.search(r"(MoE|Moe)$", type(module).__name__):
                handles.append(
                    module.register_forward_pre_hook(lambda m, a, k, p=path: grab(m, a, k, p), with_kwargs=True)
                )
        with torch.no_grad():
            model(**inputs)
        for h in handles:
            h.remove()
    if not captured:
        return f"## {name}\n  no routed-experts module ran\n"
    block_path = next(iter(captured))
    args, kwargs = captured[block_path]
    block = model.get_submodule(block_path)
    config = family_config_numbers(model)
    out = [f"## {name} ({family.kind}): block {block_path} ({type(block).__name__})"]
    out.append("  children: " + ", ".join(f"{n}={type(m).__name__}" for n, m in block.named_children()))
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(block, backend=record)(*args, **kwargs)
        explanation = torch._dynamo.explain(block)(*args, **kwargs)
    torch._dynamo.reset()
    out.append(f"  graphs: {len(graphs)}; graph breaks: {explanation.graph_break_count}")
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`" if frame else ""
        out.append(f"  break: {reason.reason.splitlines()[0][:200]}{where}")
    for i, gm in enumerate(graphs):
        out.append(f" graph {i} ({len(gm.graph.nodes)} nodes):")
        out += describe_graph(gm, config)
    return "\n".join(out) + "\n"


def family_config_numbers(model) -> int:
    """The tiny models' number of routed experts."""
    from moepass.zoo.discovery import EXPERTS

    return EXPERTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*")
    parser.add_argument("--all", action="store_true", help="every discovered family")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    from moepass.zoo.discovery import discover_moe_families

    names = [f.name for f in discover_moe_families()] if args.all else args.families
    for name in names:
        try:
            print(describe_family(name), flush=True)
        except Exception as error:  # keep going: one family's failure is itself information
            print(f"## {name}\n  failed: {type(error).__name__}: {str(error)[:300]}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
