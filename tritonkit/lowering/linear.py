"""GEMM rules: ``addmm`` / ``mm`` [+ views + ``relu``] as ``linear``, ``mm(t(g), x)`` as ``linear_weight_grad``."""

from __future__ import annotations

from tritonkit.lowering.graph import Fail, New, Rewrite, Spec, aten, bind, is_call, transposed, val
from tritonkit.lowering.rules import mask_consumer, rule


def _gemm(lw, node, x, mat2, bias):
    """``x @ mat2 (+ bias)`` as ``linear`` (fusing a ReLU after it); ``mm(t(g), y)`` as
    ``linear_weight_grad``."""
    weight = transposed(mat2)
    g = transposed(x)
    if bias is None and g is not None and weight is None:
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
    out = {}
    for mm_node in user.users:
        if not is_call(mm_node, aten.mm.default) or mm_node.args[0] is not user or mm_node.args[1] is user:
            return None
        lw.checker.tensors_ok(gemm=True, mat1=mm_node.args[0], mat2=mm_node.args[1])
        out[mm_node] = [lw.spec("linear_weight_grad", (g, mm_node.args[1], y), mm_node)]
    return out
