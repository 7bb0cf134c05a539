"""Elementwise rules: ``relu``, ``sum`` over all dims but one (a bias gradient), ReLU backward
(``threshold_backward``), which is folded into its consumers' loads where every consumer can take it,
and the other activations and their backward ops as ``activation`` / ``activation_backward``:
``hardtanh`` (what ``relu6`` traces to: ``hardtanh(x, 0, 6)``), ``hardswish``, ``hardsigmoid``, ``silu``,
``sigmoid``, ``gelu`` (both ``approximate`` forms). AOTAutograd's functionalized graphs carry no in-place
variants: ``F.silu(x, inplace=True)`` traces to ``clone`` (the copy its backward reads) + ``silu``.
A squeeze-excitation gate ``mul(x, s)`` (s [N, C, 1, 1]) becomes ``channel_scale``, and its backward
``mul(g, s)`` + ``sum(mul(g, x), [2, 3])`` one ``channel_scale_backward``."""

from __future__ import annotations

import logging
import operator

from tritonkit.lowering import linear, norm
from tritonkit.lowering.graph import (
    ACTIVATION_BACKWARDS,
    ACTIVATION_OPS,
    VIEWS,
    Fail,
    New,
    Rewrite,
    Spec,
    activation_args,
    aten,
    bind,
    is_call,
    only_user,
    val,
)
from tritonkit.lowering.report import Lowered
from tritonkit.lowering.rules import MASK_CONSUMERS, mask_consumer, rule

log = logging.getLogger("tritonkit.lowering")


@rule(aten.relu.default)
def relu(lw, node):
    (x,) = node.args
    lw.checker.tensors_ok(input=x)
    return Rewrite([lw.spec("relu", (x,), node)], (node,))


@rule(aten.add.Tensor)
def add_relu(lw, node):
    """``relu(a + b)`` of two same-shape tensors (a residual block's end) -> ``add_relu``."""
    a = bind(node)
    x, y = a["self"], a["other"]
    relu = lw.relu_after(node)
    if relu is None or relu.args[0] is not node:
        return None
    if not all(hasattr(val(t), "shape") for t in (x, y)):
        return None
    lw.checker.tensors_ok(a=x, b=y)
    if a.get("alpha", 1) != 1:
        raise Fail(f"add with alpha={a['alpha']}")
    if tuple(val(x).shape) != tuple(val(y).shape):
        raise Fail("add of different shapes (broadcasting)")
    return Rewrite([lw.spec("add_relu", (x, y), relu)], (node, relu))


def _bias_dim(node) -> int | None:
    a = bind(node)
    value = val(a["self"])
    if a.get("dtype") is not None or not hasattr(value, "dim") or value.dim() < 2:
        return None
    if not a["dim"]:  # an empty dim list sums over everything
        return None
    reduced = {d % value.dim() for d in a["dim"]}
    kept = set(range(value.dim())) - reduced
    return kept.pop() if len(kept) == 1 else None


def _bias_grad_specs(lw, node, g=None, mask=None):
    dim = _bias_dim(node)
    if dim is None:
        return None
    a = bind(node)
    g = a["self"] if g is None else g
    lw.checker.tensors_ok(grad_output=a["self"])
    post = None
    if a["keepdim"]:  # (1, ..., size of dim, ..., 1)
        sizes = [1] * val(a["self"]).dim()
        sizes[dim] = lw.sizes(a["self"], g)[dim]
        post = [(aten.view.default, (sizes,), {})]
    return [lw.spec("bias_grad", (g, mask, dim), node, post=post)]


@rule(aten.sum.dim_IntList)
def sum_all_but_one(lw, node):
    """``sum`` over every dim but one: ``bias_grad`` (a keepdim result is viewed back); a linear layer's
    bias gradient with its weight gradient as one ``linear_weight_bias_grad``."""
    pair = linear.weight_bias_pair(node.args[0])
    specs = None if pair is None or pair[1] is not node else linear.weight_bias_specs(lw, *pair, node.args[0], None)
    if specs is not None:
        return Rewrite(specs, pair)
    specs = _bias_grad_specs(lw, node)
    return None if specs is None else Rewrite(specs, (node,))


@mask_consumer(aten.sum.dim_IntList)
def sum_masked(lw, user, grad, g, y):
    if user.args[0] is not grad:
        return None
    pair = linear.weight_bias_pair(grad)
    specs = None if pair is None or pair[1] is not user else linear.weight_bias_specs(lw, *pair, g, y)
    if specs is not None:
        return {s.replaces: [s] for s in specs}
    specs = _bias_grad_specs(lw, user, g, y)
    return None if specs is None else {user: specs}


@rule(aten.threshold_backward.default)
def threshold_backward(lw, node):
    """ReLU backward: folded (``relu_output=y`` of each consumer) when every consumer takes the mask
    in its loads, else ``relu_backward``."""
    g, y, threshold = node.args
    lw.checker.tensors_ok(grad_output=g, output=y)
    if threshold != 0:
        raise Fail(f"threshold {threshold} (tritonkit's ReLU backward masks at 0)")
    if tuple(val(g).shape) != tuple(val(y).shape):
        raise Fail("grad_output and output shapes differ (broadcasting)")
    if lw.opts.fuse_relu:
        planned = {}
        if _fold(lw, node, g, y, planned):
            specs = [s for specs in planned.values() for s in specs]
            names = dict.fromkeys([node.name, *(c.name for c in planned), *(n.name for s in specs for n in s.absorbs)])
            labels = dict.fromkeys(s.describe(y.name if s.masked else None) for s in specs)
            lw.lowered.append(Lowered(tuple(names), tuple(labels)))
            return Rewrite([], planned=planned, report=False)
    return Rewrite([lw.spec("relu_backward", (g, y), node)], (node,))


def _fold(lw, grad, g, y, out: dict) -> bool:
    """Can every consumer of ``grad`` (= g masked by y > 0) take g and y instead? Fills ``out``."""
    for user in grad.users:
        try:
            if is_call(user, *VIEWS) and user.args[0] is grad:
                shape = user.args[1]
                if not _fold(lw, user, New(aten.view.default, (g, shape)), New(aten.view.default, (y, shape)), out):
                    return False
                continue
            consumer = MASK_CONSUMERS.get(user.target) if user.op == "call_function" else None
            specs = consumer(lw, user, grad, g, y) if consumer is not None else None
            if specs is None:
                return False
            out.update(specs)
        except Fail as why:
            log.debug("%s: ReLU mask not folded into %s: %s", lw.name, user.name, why)
            return False
    return True


@rule(*ACTIVATION_OPS)
def activation(lw, node):
    a = bind(node)
    lw.checker.tensors_ok(input=a["self"])
    args = activation_args(ACTIVATION_OPS[node.target], a)
    return Rewrite([lw.spec("activation", (a["self"], *args), node, f"activation({args[0]})")], (node,))


@rule(*ACTIVATION_BACKWARDS)
def activation_backward(lw, node):
    """``<act>_backward(g, saved)``: ``saved`` is the input, for ``sigmoid_backward`` the output; a ReLU6's
    (``hardtanh_backward(g, y, 0, 6)``) or another activation's whose consumers are all BatchNorm backwards
    is folded into them."""
    folded = _activation_into_batch_norm(lw, node)
    if folded is not None:
        return folded
    a = bind(node)
    saved = a["output"] if node.target is aten.sigmoid_backward.default else a["self"]
    lw.checker.tensors_ok(grad_output=a["grad_output"], saved=saved)
    args = activation_args(ACTIVATION_BACKWARDS[node.target], a)
    if tuple(val(a["grad_output"]).shape) != tuple(val(saved).shape):
        raise Fail("grad_output and saved shapes differ (broadcasting)")
    spec = lw.spec("activation_backward", (a["grad_output"], saved, *args), node, f"activation_backward({args[0]})")
    return Rewrite([spec], (node,))


def _activation_into_batch_norm(lw, node):
    """An activation's backward (``<act>_backward(g, saved)``; ReLU6: ``hardtanh_backward(g, y, 0, 6)``) whose
    consumers are all BatchNorm backwards, applied in their loads (``batch_norm_backward(g, ..., relu_output=
    saved, activation=kind)``), or None."""
    if not lw.opts.fuse_relu:
        return None
    a = bind(node)
    kind = activation_args(ACTIVATION_BACKWARDS[node.target], a)[0]
    if kind == "hardtanh":
        if (a["min_val"], a["max_val"]) != (0, 6):
            return None
        kind = "relu6"
    g = a["grad_output"]
    saved = a["output"] if node.target is aten.sigmoid_backward.default else a["self"]
    if tuple(val(g).shape) != tuple(val(saved).shape) or not node.users:
        return None
    planned = {}
    for user in node.users:
        if not is_call(user, aten.native_batch_norm_backward.default) or user.args[0] is not node \
                or node in user.args[1:]:
            return None
        try:
            planned[user] = norm.backward_specs(lw, user, g, saved, kind)
        except Fail as why:
            log.debug("%s: %s backward not folded into %s: %s", lw.name, kind, user.name, why)
            return None
    labels = dict.fromkeys(s.describe(saved.name) for specs in planned.values() for s in specs)
    lw.lowered.append(Lowered((node.name, *(u.name for u in planned)), tuple(labels)))
    return Rewrite([], planned=planned, report=False)


def _gate_operands(node):
    """``(x, s)`` when ``node`` is ``mul(x, s)`` (either order) of x [N, C, H, W] and s [N, C, 1, 1], else None."""
    if not is_call(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    a, b = node.args
    for x, s in ((a, b), (b, a)):
        vx, vs = val(x), val(s)
        if (hasattr(vx, "dim") and hasattr(vs, "dim") and vx.dim() == 4 and tuple(vs.shape) != tuple(vx.shape)
                and tuple(vs.shape) == (vx.shape[0], vx.shape[1], 1, 1)):
            return x, s
    return None


def _gate_backward(gx):
    """``(dx, sum, g, x, s)`` when ``gx`` is ``mul(g, x)`` of two [N, C, H, W] tensors whose only user is
    ``sum(gx, [2, 3])`` and ``g`` has exactly one other use ``dx = mul(g, s)`` of s [N, C, 1, 1]: a
    channel-scale gate's backward. None otherwise."""
    if not is_call(gx, aten.mul.Tensor) or len(gx.args) != 2:
        return None
    total = only_user(gx)
    if not is_call(total, aten.sum.dim_IntList) or bind(total).get("dtype") is not None:
        return None
    value = val(gx)
    if not hasattr(value, "dim") or value.dim() != 4 or {d % 4 for d in bind(total)["dim"] or ()} != {2, 3}:
        return None
    for g, x in (gx.args, gx.args[::-1]):
        if not hasattr(val(x), "shape") or tuple(val(x).shape) != tuple(value.shape):
            continue
        scales = [(u, _gate_operands(u)) for u in g.users if u is not gx]
        scales = [(u, ops[1]) for u, ops in scales if ops is not None and ops[0] is g]
        if len(scales) == 1:
            return scales[0][0], total, g, x, scales[0][1]
    return None


def _gate_backward_rewrite(lw, gx):
    found = _gate_backward(gx)
    if found is None:
        return None
    dx, total, g, x, s = found
    first = dx if lw.defined_before(dx, total) else total
    if not (lw.defined_before(x, first) and lw.defined_before(s, first)):
        return None
    lw.checker.tensors_ok(grad_output=g, input=x, scale=s)
    call = New(lw.tk.channel_scale_backward.default, (g, x, s))
    post = [] if bind(total)["keepdim"] else [(aten.view.default, (lw.sizes(total),), {})]
    specs = [Spec(operator.getitem, (call, 0), dx, "channel_scale_backward"),
             Spec(operator.getitem, (call, 1), total, "channel_scale_backward", post)]
    for spec in specs:
        lw.checker.check(spec)
    return Rewrite(lw.in_graph_order(specs), (gx, total, dx))


@rule(aten.mul.Tensor)
def channel_scale(lw, node):
    """``mul(x, s)`` of x [N, C, H, W] and s [N, C, 1, 1] -> ``channel_scale``; a gate's backward (``mul(g, s)``
    and ``sum(mul(g, x), [2, 3])``, reached at either mul) -> ``channel_scale_backward``."""
    rewrite = _gate_backward_rewrite(lw, node)  # node is mul(g, x)
    if rewrite is not None:
        return rewrite
    operands = _gate_operands(node)
    if operands is None:
        return None
    for gx in operands[0].users:  # node may be mul(g, s), reached before its mul(g, x)
        found = _gate_backward(gx) if gx is not node else None
        if found is not None and found[0] is node:
            rewrite = _gate_backward_rewrite(lw, gx)
            if rewrite is not None:
                return rewrite
    lw.checker.tensors_ok(input=operands[0], scale=operands[1])
    return Rewrite([lw.spec("channel_scale", operands, node)], (node,))
