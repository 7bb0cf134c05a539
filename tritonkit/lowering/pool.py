"""Pooling rules: ``max_pool2d_with_indices`` and its backward."""

from __future__ import annotations

from tritonkit.lowering.graph import Rewrite, aten, bind
from tritonkit.lowering.rules import rule


@rule(aten.max_pool2d_with_indices.default)
def max_pool2d(lw, node):
    a = bind(node)
    lw.checker.tensors_ok(input=a["self"])
    args = (a["self"], list(a["kernel_size"]), list(a["stride"]), list(a["padding"]),
            list(a["dilation"]), a["ceil_mode"])
    return Rewrite([lw.spec("max_pool2d", args, node)], (node,))


@rule(aten.max_pool2d_with_indices_backward.default)
def max_pool2d_backward(lw, node):
    a = bind(node)
    lw.checker.tensors_ok(grad_output=a["grad_output"], input=a["self"])
    args = (a["grad_output"], a["self"], a["indices"], list(a["kernel_size"]), list(a["stride"]),
            list(a["padding"]), list(a["dilation"]), a["ceil_mode"])
    return Rewrite([lw.spec("max_pool2d_backward", args, node)], (node,))
