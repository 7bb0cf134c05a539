"""GEMM rules: ``addmm`` / ``mm`` [+ views + ``relu`` or another activation, its only use] as ``linear``,
``mm(t(g), x)`` as ``linear_weight_grad``, and with the bias gradient ``sum(g, [0])`` of the same layer as one
``linear_weight_bias_grad``."""

from __future__ import annotations

import operator

from tritonkit.lowering import norm
from tritonkit.lowering.graph import VIEWS, Fail, New, Rewrite, Spec, aten, bind, is_call, only_user, transposed, val
from tritonkit.lowering.rules import mask_consumer, rule


def _row_sum(node, grad) -> bool:
    """``sum(grad, [0])`` (keepdim or not) of a 2-D ``grad``: a linear layer's bias gradient."""
    a = bind(node)
    value = val(grad)
    return (a["self"] is grad and hasattr(value, "dim") and value.dim() == 2 and a.get("dtype") is None
            and [d % 2 for d in a["dim"] or ()] == [0])


def _weight_grad_mm(grad):
    """The one ``mm(t(grad), x)`` (a linear's weight gradient) among ``grad``'s users, if exactly one."""
    mms = [m for t in grad.users if transposed(t) is grad
           for m in t.users if is_call(m, aten.mm.default) and m.args[0] is t and m.args[1] is not t]
    return mms[0] if len(mms) == 1 else None


def _input_grad_mm(grad, x):
    """The one ``mm(grad, W)`` (the same linear's input gradient, ``W`` of shape [out, in] for its input ``x``)
    among ``grad``'s users, if exactly one."""
    mms = [m for m in grad.users if is_call(m, aten.mm.default) and m.args[0] is grad and m.args[1] is not grad]
    if len(mms) != 1:
        return None
    shape = tuple(val(mms[0].args[1]).shape)
    return mms[0] if shape == (val(grad).shape[1], val(x).shape[1]) else None


def weight_bias_pair(grad):
    """``(mm, sum)``: the weight gradient ``mm(t(grad), x)`` and the bias gradient ``sum(grad, [0])`` of one
    linear layer, when ``grad`` has exactly one of each; else None."""
    sums = [s for s in grad.users if is_call(s, aten.sum.dim_IntList) and _row_sum(s, grad)]
    mm = _weight_grad_mm(grad)
    return (mm, sums[0]) if mm is not None and len(sums) == 1 else None


def backward_specs(lw, grad, g, mask) -> list[Spec] | None:
    """The gradients of the linear layer whose output gradient is ``grad`` (= ``g`` masked by ``mask`` > 0
    when a ReLU's backward is folded) from one launch: ``linear_backward`` for the input gradient
    ``mm(grad, W)`` with the weight gradient ``mm(t(grad), x)`` [and the bias gradient ``sum(grad, [0])``],
    ``linear_weight_bias_grad`` for the last two without the first. None when ``grad`` has no weight
    gradient, or when an operand is computed after the first of the nodes, where the call is emitted.
    Memoised per graph: each consumer of ``grad`` that asks with the same ``g`` and ``mask`` gets the same
    specs (one call)."""
    key = ("linear backward", grad, g, mask)
    if key not in lw.memo:
        lw.memo[key] = _backward_specs(lw, grad, g, mask)
    return lw.memo[key]


def _backward_specs(lw, grad, g, mask):
    mm_w = _weight_grad_mm(grad)
    if mm_w is None:
        return None
    x = mm_w.args[1]
    pair = weight_bias_pair(grad)
    sum_node = pair[1] if pair is not None else None
    mm_x = _input_grad_mm(grad, x)
    nodes = [n for n in (mm_x, mm_w, sum_node) if n is not None]
    first = min(nodes, key=lambda n: lw.order(n))
    weight = mm_x.args[1] if mm_x is not None else None
    if not lw.defined_before(x, first) or not lw.defined_before(weight, first):
        return None
    lw.checker.tensors_ok(gemm=True, grad_output=grad, input=x, weight=weight)
    if mm_x is None and sum_node is None:
        return None
    if mm_x is None:
        call, label, outputs = New(lw.tk.linear_weight_bias_grad.default, (g, x, mask)), "linear_weight_bias_grad", {}
    else:
        call = New(lw.tk.linear_backward.default, (g, x, weight, mask, sum_node is not None))
        label, outputs = "linear_backward", {mm_x: 0}
    outputs.update({mm_w: len(outputs), **({sum_node: len(outputs) + 1} if sum_node is not None else {})})
    specs = []
    for node, index in outputs.items():
        post = []
        if node is sum_node and bind(sum_node)["keepdim"]:
            post = [(aten.view.default, ([1, lw.sizes(grad, g)[1]],), {})]
        specs.append(Spec(operator.getitem, (call, index), node, label, post))
        specs[-1].masked = mask is not None
        lw.checker.check(specs[-1])
    return lw.in_graph_order(specs)


def weight_bias_specs(lw, mm_node, sum_node, g, mask) -> list[Spec] | None:
    """The specs of :func:`backward_specs` when the layer's weight and bias gradients are ``mm_node`` and
    ``sum_node`` (the rules that meet either ask through this)."""
    return backward_specs(lw, sum_node.args[0], g, mask)


def _layer_specs(lw, grad, node, g=None, mask=None) -> dict | None:
    """``{node: [spec]}`` for every gradient :func:`backward_specs` gives when one of them replaces ``node``."""
    specs = backward_specs(lw, grad, grad if g is None else g, mask)
    if specs is None or node not in {s.replaces for s in specs}:
        return None
    return {s.replaces: [s] for s in specs}


def _gemm(lw, node, x, mat2, bias):
    """``x @ mat2 (+ bias)`` as ``linear`` (fusing a ReLU after it); a linear layer's gradients
    ``mm(g, W)``, ``mm(t(g), y)`` [, ``sum(g, [0])``] as one :func:`backward_specs` launch, or
    ``mm(t(g), y)`` alone as ``linear_weight_grad``."""
    weight = transposed(mat2)
    g = transposed(x)
    if bias is None:
        layer = _layer_specs(lw, x, node) or (_layer_specs(lw, g, node) if g is not None else None)
        if layer is not None:
            specs = [s for specs in layer.values() for s in specs]
            return Rewrite(specs, tuple(layer))
    if bias is None and g is not None and weight is None:
        return Rewrite([lw.spec("linear_weight_grad", (g, mat2, None), node)], (node,))
    if weight is None:
        weight = New(aten.t.default, (mat2,))
    relu = lw.relu_after(node)
    if relu is not None:
        spec = lw.spec("linear", (x, weight, bias, True), node, "linear(relu=True)")
        # the ReLU (after any views) is replaced by its input: the (viewed) fused result
        return Rewrite([spec, Spec(None, (), relu, "")], (node, relu))
    act = _activation_after(lw, node)
    if act is not None:
        label = f"linear({norm.activation_label(act)[0]})"
        spec = lw.spec("linear", (x, weight, bias, False, *act[1]), node, label)
        return Rewrite([spec, Spec(None, (), act[0], "")], (node, act[0]))
    return Rewrite([lw.spec("linear", (x, weight, bias, False), node)], (node,))


def _activation_after(lw, node):
    """``(activation node, (kind, min_val, max_val))`` for the activation that is the only consumer of
    ``node`` through single-user views (a linear over the last dim of a 3-D or 4-D input), or None."""
    user = only_user(node)
    while is_call(user, *VIEWS) and user.args[0] is node:
        node, user = user, only_user(user)
    return norm.activation_epilogue(lw, node, pre=False)


@rule(aten.mm.default)
def mm(lw, node):
    x, mat2 = node.args
    lw.checker.tensors_ok(gemm=True, mat1=x, mat2=mat2)
    return _gemm(lw, node, x, mat2, None)


@rule(aten.addmm.default)
def addmm(lw, node):
    a = bind(node)
    bias, x, mat2 = a["self"], a["mat1"], a["mat2"]
    lw.checker.tensors_ok(gemm=True, bias=bias, mat1=x, mat2=mat2)
    if a["beta"] != 1 or a["alpha"] != 1:
        raise Fail(f"addmm with beta={a['beta']}, alpha={a['alpha']}")
    if val(bias).dim() != 1:
        raise Fail(f"addmm bias of shape {tuple(val(bias).shape)} is not a per-column 1-D bias")
    return _gemm(lw, node, x, mat2, bias)


@mask_consumer(aten.mm.default)
def mm_masked(lw, user, grad, g, y):
    """``mm(grad, W)``: the input gradient of a linear, with the mask in its A-operand loads."""
    if user.args[0] is not grad or user.args[1] is grad:
        return None
    layer = _layer_specs(lw, grad, user, g, y)
    if layer is not None:
        return layer
    lw.checker.tensors_ok(gemm=True, mat1=grad, mat2=user.args[1])
    return {user: [lw.spec("linear_input_grad", (g, user.args[1], y), user)]}


@mask_consumer(aten.t.default, aten.permute.default, aten.transpose.int)
def transposed_masked(lw, user, grad, g, y):
    """``mm(t(grad), x)``: the weight gradient of a linear."""
    if transposed(user) is not grad:
        return None
    mm_w = _weight_grad_mm(grad)
    layer = None if mm_w is None or mm_w.args[0] is not user else _layer_specs(lw, grad, mm_w, g, y)
    if layer is not None:
        return layer
    out = {}
    for mm_node in user.users:
        if not is_call(mm_node, aten.mm.default) or mm_node.args[0] is not user or mm_node.args[1] is user:
            return None
        lw.checker.tensors_ok(gemm=True, mat1=mm_node.args[0], mat2=mm_node.args[1])
        out[mm_node] = [lw.spec("linear_weight_grad", (g, mm_node.args[1], y), mm_node)]
    return out
