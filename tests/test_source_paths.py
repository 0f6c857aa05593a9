"""Module paths of graph placeholders, as detection names blocks and per-layer policies look them up."""

from __future__ import annotations

import torch.fx as fx

from moepass.compiler.detect.common import source_path


def _placeholder(source_name: str) -> fx.Node:
    class Source:
        name = source_name

    class GraphArg:
        source = Source()

    node = fx.Graph().placeholder("w")
    node.meta["grapharg"] = GraphArg()
    return node


def test_paths_of_a_compiled_module_and_of_a_compiled_bound_method_agree():
    """``L['fn'].__self__`` (the model of a compiled bound method) is the root, as ``L['self']`` is."""
    tail = "._modules['model']._modules['layers']._modules['0']._parameters['weight']"
    assert source_path(_placeholder("L['self']" + tail)) == "model.layers.0.weight"
    assert source_path(_placeholder("L['fn'].__self__" + tail)) == "model.layers.0.weight"
