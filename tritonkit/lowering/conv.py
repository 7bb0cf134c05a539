"""Convolution rules: ``convolution`` [+ ``relu``] [+ ``max_pool2d``], and ``convolution_backward``."""

from __future__ import annotations

import logging
import operator

from tritonkit.lowering.graph import Fail, Rewrite, Spec, aten, bind, is_call, only_user, val
from tritonkit.lowering.rules import mask_consumer, rule

log = logging.getLogger("tritonkit.lowering")


def geometry(a: dict, x) -> tuple:
    """(stride, padding, dilation, groups) of a bound convolution / convolution_backward node that
    tritonkit can run (2-D, not transposed); ``Fail`` otherwise."""
    if a["transposed"]:
        raise Fail("transposed convolution")
    if val(x).dim() != 4:
        raise Fail(f"{val(x).dim() - 2}-D convolution (tritonkit has 2-D)")
    if any(p != 0 for p in a["output_padding"]):
        raise Fail(f"output_padding {list(a['output_padding'])}")
    return list(a["stride"]), list(a["padding"]), list(a["dilation"]), a["groups"]


@rule(aten.convolution.default)
def convolution(lw, node):
    """``convolution`` -> ``conv2d``, with the ReLU after it fused (and, in inference, the max-pool)."""
    a = bind(node)
    x, w, b = a["input"], a["weight"], a["bias"]
    lw.checker.tensors_ok(gemm=True, input=x, weight=w, bias=b)
    geo = geometry(a, x)
    relu = lw.relu_after(node)
    if relu is not None and relu.args[0] is node:
        fused = _conv_relu_pool(lw, node, relu, x, w, b, geo)
        if fused is not None:
            return fused
        return Rewrite([lw.spec("conv2d", (x, w, b, *geo, True), relu, "conv2d(relu=True)")], (node, relu))
    return Rewrite([lw.spec("conv2d", (x, w, b, *geo, False), node)], (node,))


def _conv_relu_pool(lw, conv, relu, x, w, b, geo):
    """Inference: conv -> ReLU -> max-pool values only (the unpooled activation has no other use)
    as one kernel that never writes the unpooled activation."""
    pool = only_user(relu)
    if not is_call(pool, aten.max_pool2d_with_indices.default):
        return None
    getitems = list(pool.users)
    if len(getitems) != 1 or not is_call(getitems[0], operator.getitem) or getitems[0].args[1] != 0:
        return None
    p = bind(pool)
    args = (x, w, b, *geo, list(p["kernel_size"]), list(p["stride"]), list(p["padding"]),
            list(p["dilation"]), p["ceil_mode"])
    spec = Spec(lw.tk.conv2d_relu_maxpool.default, args, getitems[0], "conv2d_relu_maxpool")
    try:
        lw.checker.check(spec)
    except Fail as why:
        log.debug("conv+relu+max-pool not fused at %s: %s", conv.name, why)
        return None
    return Rewrite([spec], (conv, relu, pool))


def _backward_specs(lw, node, g=None, mask=None) -> list[Spec] | None:
    a = bind(node)
    grad, x, w = a["grad_output"], a["input"], a["weight"]
    lw.checker.tensors_ok(gemm=True, grad_output=grad, input=x, weight=w)
    geo = geometry(a, x)
    users = list(node.users)
    if not users:
        return None
    if not all(is_call(u, operator.getitem) for u in users):
        raise Fail("an output is used other than through getitem")
    g = grad if g is None else g
    specs = []
    for u in sorted(users, key=lambda u: u.args[1]):
        if not a["output_mask"][u.args[1]]:
            raise Fail(f"output {u.args[1]} is used but output_mask does not ask for it")
        if u.args[1] == 0:
            specs.append(lw.spec("conv2d_input_grad", (g, w, mask, lw.sizes(x), *geo), u))
        elif u.args[1] == 1:
            specs.append(lw.spec("conv2d_weight_grad", (g, x, mask, lw.sizes(w), *geo), u))
        else:
            specs.append(lw.spec("bias_grad", (g, mask, 1), u))
    return specs


@rule(aten.convolution_backward.default)
def convolution_backward(lw, node):
    """``convolution_backward`` -> ``conv2d_input_grad`` / ``conv2d_weight_grad`` / ``bias_grad``."""
    specs = _backward_specs(lw, node)
    return None if specs is None else Rewrite(specs, (node,))


@mask_consumer(aten.convolution_backward.default)
def convolution_backward_masked(lw, user, grad, g, y):
    if user.args[0] is not grad or grad in user.args[1:]:
        return None
    specs = _backward_specs(lw, user, g, y)
    return None if specs is None else {user: specs}
