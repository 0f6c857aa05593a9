"""A small helper to write ONNX node lists by hand: fresh names, constants, ops.

::

    b = NodeBuilder("experts")
    k = b.reduce_sum(b.cast(valid, INT64), axes=[1])      # -> "experts/ReduceSum_3"
    b.nodes                                                # the NodeProtos, in order

Function bodies cannot hold initializers, so constants are ``Constant`` nodes.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["BOOL", "FLOAT", "INT64", "NodeBuilder"]

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL


class NodeBuilder:
    """Collects nodes; every value it creates gets a name unique under ``prefix``."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0
        self._constants: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        """A new value name."""
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str | None, outputs: int = 1, domain: str = "", **attrs: Any) -> Any:
        """Append one node; returns its output name (or a list of names when ``outputs`` > 1)."""
        names = [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(
                op_type,
                ["" if i is None else i for i in inputs],
                names,
                name=self.fresh(f"n_{op_type}"),
                domain=domain,
                **{k: v for k, v in attrs.items() if v is not None},
            )
        )
        return names[0] if outputs == 1 else names

    def const(self, value: Any, dtype: int = FLOAT) -> str:
        """A Constant node holding ``value`` (scalar or array) as ``dtype``; reused when asked again."""
        array = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
        key = (dtype, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.fresh("const")
            tensor = numpy_helper.from_array(array, name=name)
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("n_Constant"), value=tensor))
            self._constants[key] = name
        return self._constants[key]

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (axes, shapes, indices)."""
        return self.const(list(values), INT64)

    # --- a few ops used often enough to deserve a name ----------------------

    def cast(self, value: str, to: int) -> str:
        return self.op("Cast", value, to=to)

    def reduce_sum(self, value: str, axes: Sequence[int], keepdims: int = 0) -> str:
        return self.op("ReduceSum", value, self.ints(axes), keepdims=keepdims)

    def unsqueeze(self, value: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", value, self.ints(axes))

    def gather(self, data: str, indices: str, axis: int = 0) -> str:
        return self.op("Gather", data, indices, axis=axis)

    def slice(self, value: str, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int],
              steps: Sequence[int] | None = None) -> str:
        step_input = self.ints(steps) if steps is not None else None
        return self.op("Slice", value, self.ints(starts), self.ints(ends), self.ints(axes), step_input)

    def rows_where(self, mask: str) -> str:
        """Indices [n] of the True entries of a 1-D bool mask."""
        return self.op("Reshape", self.op("NonZero", mask), self.ints([-1]))
