"""transformers' eager experts graph-break inside the loop: the router alone is rewritten."""

from __future__ import annotations

import pytest
import torch
from conftest import Recorder, rel_err, token_ids

import moepass
from moepass.zoo import tiny_model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_router_only_rewrite(family):
    model = tiny_model(family, "eager")
    rec = Recorder()
    compiled = torch.compile(model, backend=rec)
    ids = token_ids(2, 7)
    with torch.no_grad():
        assert rel_err(compiled(ids, use_cache=False).logits, model(ids, use_cache=False).logits) <= 1e-5
    blocks = [b for graph in rec.reports for b in graph]
    assert len(blocks) == 1  # the block's own frame, compiled once and shared by every layer
    (block,) = blocks
    assert block.rewritten and block.dispatch == "eager_loop"
    assert "router only" in block.notes[0]
    ops = rec.ops()
    assert ops.count("moepass::route") == 1 and "moepass::experts" not in ops
    # the loop that reads the ids runs outside this graph: it gets the model's own ids, from its own top-k
    assert "topk" in ops and block.spec.router.kind != "lifted"


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_adaptive_router_only_equals_full_rewrite(family):
    """Router-only routing must give the same model as the full rewrite with the same policy.

    gpt-oss's eager loop uses one_hot(num_classes=E) and cannot take the
    sentinel id E; the router-only rewrite writes empty slots as a repeated
    id with weight 0, which every loop handles.
    """
    options = {"policy": "top_p", "p": 0.45, "inner": "eager"}
    ids = token_ids(2, 9)
    with torch.no_grad():
        full = torch.compile(tiny_model(family), backend="adaptive_moe", options=options)(ids, use_cache=False).logits
        torch._dynamo.reset()
        broken = torch.compile(tiny_model(family, "eager"), backend="adaptive_moe", options=options)
        router_only = broken(ids, use_cache=False).logits
    assert rel_err(router_only, full) <= 1e-5
    report = moepass.report(broken)
    # the loop's frame is compiled once and serves every layer: each is listed under its full path
    assert [b.path for b in report.blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for block in report.blocks:
        assert block.rewritten and any("save no compute" in note for note in block.notes)
