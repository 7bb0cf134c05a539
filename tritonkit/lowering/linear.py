"""GEMM rules: ``addmm`` / ``mm`` [+ views + ``relu``] as ``linear``, ``mm(t(g), x)`` as ``linear_weight_grad``,
and with the bias gradient ``sum(g, [0])`` of the same layer as one ``linear_weight_bias_grad``."""

from __future__ import annotations

import operator

from tritonkit.lowering.graph import Fail, New, Rewrite, Spec, aten, bind, is_call, transposed, val
from tritonkit.lowering.rules import mask_consumer, rule


def _row_sum(node, grad) -> bool:
    """``sum(grad, [0])`` (keepdim or not) of a 2-D ``grad``: a linear layer's bias gradient."""
    a = bind(node)
    value = val(grad)
    return (a["self"] is grad and hasattr(value, "dim") and value.dim() == 2 and a.get("dtype") is None
            and [d % 2 for d in a["dim"] or ()] == [0])


def weight_bias_pair(grad):
    """``(mm, sum)``: the weight gradient ``mm(t(grad), x)`` and the bias gradient ``sum(grad, [0])`` of one
    linear layer, when ``grad`` has exactly one of each; else None."""
    mms = [m for t in grad.users if transposed(t) is grad
           for m in t.users if is_call(m, aten.mm.default) and m.args[0] is t and m.args[1] is not t]
    sums = [s for s in grad.users if is_call(s, aten.sum.dim_IntList) and _row_sum(s, grad)]
    return (mms[0], sums[0]) if len(mms) == 1 and len(sums) == 1 else None


def weight_bias_specs(lw, mm_node, sum_node, g, mask) -> list[Spec] | None:
    """Both gradients from one ``linear_weight_bias_grad(g, x, mask)`` call (None when ``x`` is computed
    after the first of the two nodes, where the call is emitted)."""
    x = mm_node.args[1]
    first = mm_node if lw.defined_before(mm_node, sum_node) else sum_node
    if not lw.defined_before(x, first):
        return None
    lw.checker.tensors_ok(gemm=True, grad_output=sum_node.args[0], input=x)
    call = New(lw.tk.linear_weight_bias_grad.default, (g, x, mask))
    label = "linear_weight_bias_grad"
    post = [(aten.view.default, ([1, lw.sizes(sum_node.args[0], g)[1]],), {})] if bind(sum_node)["keepdim"] else []
    specs = [Spec(operator.getitem, (call, 0), mm_node, label),
             Spec(operator.getitem, (call, 1), sum_node, label, post)]
    for spec in specs:
        lw.checker.check(spec)
    return lw.in_graph_order(specs)


def _gemm(lw, node, x, mat2, bias):
    """``x @ mat2 (+ bias)`` as ``linear`` (fusing a ReLU after it); ``mm(t(g), y)`` as
    ``linear_weight_grad``."""
    weight = transposed(mat2)
    g = transposed(x)
    if bias is None and g is not None and weight is None:
        pair = weight_bias_pair(g)
        specs = None if pair is None or pair[0] is not node else weight_bias_specs(lw, *pair, g, None)
        if specs is not None:
            return Rewrite(specs, pair)
        return Rewrite([lw.spec("linear_weight_grad", (g, mat2, None), node)], (node,))
    if weight is None:
        weight = New(aten.t.default, (mat2,))
    relu = lw.relu_after(node)
    if relu is not None:
        spec = lw.spec("linear", (x, weight, bias, True), node, "linear(relu=True)")
        # the ReLU (after any views) is replaced by its input: the (viewed) fused result
        return Rewrite([spec, Spec(None, (), relu, "")], (node, relu))
    return Rewrite([lw.spec("linear", (x, weight, bias, False), node)], (node,))


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
    lw.checker.tensors_ok(gemm=True, mat1=grad, mat2=user.args[1])
    return {user: [lw.spec("linear_input_grad", (g, user.args[1], y), user)]}


@mask_consumer(aten.t.default, aten.permute.default, aten.transpose.int)
def transposed_masked(lw, user, grad, g, y):
    """``mm(t(grad), x)``: the weight gradient of a linear."""
    if transposed(user) is not grad:
        return None
    pair = weight_bias_pair(grad)
    specs = None if pair is None or pair[0].args[0] is not user else weight_bias_specs(lw, *pair, g, y)
    if specs is not None:
        return {s.replaces: [s] for s in specs}
    out = {}
    for mm_node in user.users:
        if not is_call(mm_node, aten.mm.default) or mm_node.args[0] is not user or mm_node.args[1] is user:
            return None
        lw.checker.tensors_ok(gemm=True, mat1=mm_node.args[0], mat2=mm_node.args[1])
        out[mm_node] = [lw.spec("linear_weight_grad", (g, mm_node.args[1], y), mm_node)]
    return out
