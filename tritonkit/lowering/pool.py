"""Pooling rules: ``max_pool2d_with_indices`` and its backward; the global average pool (``mean`` over
H and W, what ``adaptive_avg_pool2d(x, 1)`` traces to) and its backward (``div(expand(g), H*W)``);
``avg_pool2d`` and ``_adaptive_avg_pool2d`` and their backwards (a 4-D 1x1 adaptive pool as the global
one)."""

from __future__ import annotations

import operator

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from tritonkit.kernels.pool import output_memory_format
from tritonkit.lowering import norm
from tritonkit.lowering.graph import Fail, New, Rewrite, Spec, aten, bind, input_prologue, is_call, sum_with, val
from tritonkit.lowering.rules import rule


@rule(aten.max_pool2d_with_indices.default)
def max_pool2d(lw, node):
    """``max_pool2d_with_indices`` -> ``max_pool2d``; an input that is a recomputed BatchNorm apply (the
    joint-graph pass's) is pooled through the pool's input prologue, never stored."""
    a = bind(node)
    lw.checker.tensors_ok(input=a["self"])
    source, prologue = input_prologue(a["self"])
    args = (source, list(a["kernel_size"]), list(a["stride"]), list(a["padding"]),
            list(a["dilation"]), a["ceil_mode"], *prologue)
    return Rewrite([lw.spec("max_pool2d", args, node, "max_pool2d(input prologue)" if prologue else None)],
                   (node,))


@rule(aten.max_pool2d_with_indices_backward.default)
def max_pool2d_backward(lw, node):
    """The gradient scattered to the indices; the input gives only its shape and layout, so a recomputed
    BatchNorm apply there is replaced by its input (the same shape and memory format) and never runs.
    When only that BatchNorm's backward reads the gradient (through the ReLU's mask),
    ``max_pool2d_backward_bn_partials`` takes it on through the mask and computes the BN backward's two
    reductions, which ``batch_norm_backward(grad_partials=)`` then only applies (the ResNet stem)."""
    a = bind(node)
    lw.checker.tensors_ok(grad_output=a["grad_output"], input=a["self"])
    source, prologue = input_prologue(a["self"])
    args = (a["grad_output"], source, a["indices"], list(a["kernel_size"]), list(a["stride"]),
            list(a["padding"]), list(a["dilation"]), a["ceil_mode"])
    found = norm.backward_reading(node, a["self"], source, prologue) if prologue else None
    if found is None:
        return Rewrite([lw.spec("max_pool2d_backward", args, node)], (node,))
    mask, bn_bwd = found
    call = New(lw.tk.max_pool2d_backward_bn_partials.default, (*args, *prologue))
    grad_bn = mask if mask is not None else node
    spec = Spec(operator.getitem, (call, 0), grad_bn, "max_pool2d_backward_bn_partials(input prologue)")
    lw.checker.check(spec)
    specs = [spec, *norm.backward_specs(lw, bn_bwd, grad=grad_bn, partials=New(operator.getitem, (call, 1)))]
    return Rewrite(specs, (node, *(() if mask is None else (mask,)), bn_bwd))


@rule(aten.mean.dim)
def global_avg_pool(lw, node):
    a = bind(node)
    x = a["self"]
    value = val(x)
    if not hasattr(value, "dim") or value.dim() != 4 or {d % 4 for d in a["dim"] or ()} != {2, 3}:
        return None
    lw.checker.tensors_ok(input=x)
    if a.get("dtype") is not None:
        raise Fail(f"mean with dtype={a['dtype']}")
    post = [] if a["keepdim"] else [(aten.view.default, (lw.sizes(x)[:2],), {})]
    return Rewrite([lw.spec("global_avg_pool2d", (x,), node, post=post)], (node,))


def _channels_last(value) -> bool:
    return value.dim() == 4 and not value.is_contiguous() and value.is_contiguous(memory_format=torch.channels_last)


@rule(aten.div.Scalar)
def global_avg_pool_backward(lw, node):
    """``div(expand(g[N, C, 1, 1], [N, C, H, W]), H * W)``: the gradient of a global average pool, with the
    ``add`` of the pooled tensor's other gradient (a squeeze-excitation gate's) when that is its only use."""
    expand, divisor = node.args
    if not is_call(expand, aten.expand.default):
        return None
    g, size = expand.args
    gval, out = val(g), val(node)
    if not hasattr(gval, "shape") or len(size) != 4 or tuple(gval.shape[2:]) != (1, 1):
        return None
    if tuple(gval.shape[:2]) != tuple(out.shape[:2]) or divisor != out.shape[2] * out.shape[3]:
        return None
    lw.checker.tensors_ok(grad_output=g)
    found = sum_with(node)
    if found is not None:
        add, other = found
        summed = val(add)
        if summed.is_contiguous() or _channels_last(summed):
            try:
                lw.checker.tensors_ok(residual=other)
                spec = lw.spec("global_avg_pool2d_backward", (g, list(size), _channels_last(summed), other), add,
                               "global_avg_pool2d_backward(+ residual)")
                return Rewrite([spec], (node, add))
            except Fail:
                pass
    return Rewrite([lw.spec("global_avg_pool2d_backward", (g, list(size), _channels_last(out)), node)], (node,))


_AVG_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _avg_args(a) -> tuple:
    return tuple(list(a[k]) if k in _AVG_ARGS[:3] else a[k] for k in _AVG_ARGS)


@rule(aten.avg_pool2d.default)
def avg_pool2d(lw, node):
    a = bind(node)
    lw.checker.tensors_ok(input=a["self"])
    return Rewrite([lw.spec("avg_pool2d", (a["self"], *_avg_args(a)), node)], (node,))


@rule(aten.avg_pool2d_backward.default)
def avg_pool2d_backward(lw, node):
    a = bind(node)
    lw.checker.tensors_ok(grad_output=a["grad_output"], input=a["self"])
    return Rewrite([lw.spec("avg_pool2d_backward", (a["grad_output"], a["self"], *_avg_args(a)), node)], (node,))


def _is_global(x, output_size) -> bool:
    """A 4-D adaptive pool to 1x1: the global average pool."""
    return val(x).dim() == 4 and len(output_size) == 2 and all(is_concrete_int(s) and s == 1 for s in output_size)


@rule(aten._adaptive_avg_pool2d.default)
def adaptive_avg_pool2d(lw, node):
    x, output_size = node.args
    lw.checker.tensors_ok(input=x)
    if _is_global(x, output_size):
        return Rewrite([lw.spec("global_avg_pool2d", (x,), node)], (node,))
    return Rewrite([lw.spec("adaptive_avg_pool2d", (x, list(output_size)), node)], (node,))


@rule(aten._adaptive_avg_pool2d_backward.default)
def adaptive_avg_pool2d_backward(lw, node):
    g, x = node.args
    lw.checker.tensors_ok(grad_output=g, input=x)
    if _is_global(x, val(g).shape[-2:]):
        channels_last = output_memory_format(val(x)) == torch.channels_last
        spec = lw.spec("global_avg_pool2d_backward", (g, lw.sizes(x), channels_last), node)
        return Rewrite([spec], (node,))
    return Rewrite([lw.spec("adaptive_avg_pool2d_backward", (g, x), node)], (node,))
