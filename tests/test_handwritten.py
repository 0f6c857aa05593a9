"""The reference-style MoE (ModuleList experts, Python loop with torch.where/index_add_)."""

from __future__ import annotations

import pytest
import torch
from conftest import Recorder, rel_err

from moepass.zoo import ReferenceMoE


@pytest.mark.parametrize("softmax_first", [True, False], ids=["softmax-topk", "topk-softmax"])
def test_fullgraph_module_loop_is_rewritten(softmax_first):
    model = ReferenceMoE(softmax_first=softmax_first).eval()
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        for tokens in (5, 9):
            x = torch.randn(2, tokens, 32)
            assert rel_err(compiled(x), model(x)) <= 1e-5
    (block,) = rec.reports[0]
    assert block.rewritten and block.dispatch == "module_loop"
    assert block.spec.experts.stacked_from_modules
    assert block.router == ("softmax_topk" if softmax_first else "topk_softmax")
    ops = rec.ops()
    assert ops.count("moepass::experts") == len(rec.graphs)
    assert "linear" in ops  # the router linear stays
    assert ops.count("linear") == len(rec.graphs)  # ...and only it: 12 expert linears are gone
    assert "index_add_" not in ops and "nonzero" not in ops and "where" not in ops


def test_capture_flag_is_enough_without_fullgraph():
    model = ReferenceMoE().eval()
    rec = Recorder()
    x = torch.randn(3, 4, 32)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        out = torch.compile(model, backend=rec)(x)
    assert rel_err(out, model(x)) <= 1e-5
    assert [b.rewritten for b in rec.reports[0]] == [True]


def test_without_capture_the_loop_breaks_and_the_block_is_reported():
    """Dynamo skips the block's frame; the pass sees only expert MLPs, rewrites nothing, and says why."""
    model = ReferenceMoE().eval()
    rec = Recorder()
    x = torch.randn(3, 4, 32)
    with torch.no_grad():
        out = torch.compile(model, backend=rec)(x)
    assert torch.equal(out, model(x))
    entries = [b for blocks in rec.reports for b in blocks]
    assert entries and all(not b.rewritten and b.reason_code == "graph_break" for b in entries)
    assert "ReferenceMoE.forward" in entries[0].reason and "make_traceable" in entries[0].reason
