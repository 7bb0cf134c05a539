"""Convolution rules.

=======================================================  ===================================================
ATen                                                      tritonkit
=======================================================  ===================================================
``convolution`` [+ ``relu``]                              ``conv2d`` [relu=True]
  + another activation, its only use                      ``conv2d(activation=...)``
  + ``relu`` + ``max_pool2d`` values only (inference)     ``conv2d_relu_maxpool``
  + eval BatchNorm [+ ``add``] [+ activation]             ``conv2d_batch_norm`` (BN in the epilogue)
  + eval BatchNorm + ``relu`` + ``max_pool2d`` (stem)     ``conv2d_relu_maxpool`` with the BN parameters
  + training BatchNorm [+ ``add``] [+ ``relu``]           ``conv2d_bn_stats`` (statistics in the epilogue) +
                                                          ``batch_norm_train_from_partials``
``convolution_backward``                                  ``conv2d_backward`` (input, weight [and bias]
                                                          gradients in one launch), or ``conv2d_weight_grad``
                                                          / ``conv2d_weight_bias_grad`` without the input's
  + ``add`` of the input gradient and another gradient    the sum in the input gradient's epilogue
    (a residual block's two branches)                     (``residual=``; a ReLU mask on it folded too)
  of a recomputed BN + ReLU input, the input gradient     ``conv2d_backward_bn_partials`` (the ReLU mask and
    read only by that BN's backward                       the BN backward's reductions in its epilogue) +
                                                          ``batch_norm_backward(grad_partials=)``
  of a residual block's output, the input gradient (+     ``conv2d_backward_residual_bn_partials`` (the ReLU
    residual) read only by that block's ReLU backward,    mask from its own input, the reductions of the 1-2
    itself read by 1-2 BN backwards (bn2, downsample)     BN backwards) + ``batch_norm_backward(grad_partials=)``
=======================================================  ===================================================

Depthwise convolutions (``groups`` == input channels) go to :mod:`tritonkit.lowering.depthwise`.
"""

from __future__ import annotations

import logging
import operator

from tritonkit.lowering import depthwise, norm
from tritonkit.lowering.graph import (
    Fail,
    New,
    Rewrite,
    Spec,
    aten,
    bind,
    getitem_users,
    input_prologue,
    is_call,
    only_user,
    sum_with,
    val,
)
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
    """``convolution`` -> ``conv2d``, with what follows it fused where one kernel can do it."""
    a = bind(node)
    x, w, b = a["input"], a["weight"], a["bias"]
    lw.checker.tensors_ok(gemm=True, input=x, weight=w, bias=b)
    geo = geometry(a, x)
    if depthwise.is_depthwise(x, w, geo[3]):
        return depthwise.forward(lw, node, x, w, b, geo)
    for fusion in (_conv_bn_eval, _conv_bn_train):
        fused = _try(fusion, lw, node, x, w, b, geo)
        if fused is not None:
            return fused
    relu = lw.relu_after(node)
    if relu is not None and relu.args[0] is node:
        fused = _try(_conv_relu_pool, lw, node, relu, x, w, b, geo)
        if fused is not None:
            return fused
        return Rewrite([lw.spec("conv2d", (x, w, b, *geo, True), relu, "conv2d(relu=True)")], (node, relu))
    act = norm.activation_epilogue(lw, node, pre=False)
    if act is not None:
        label = norm.epilogue_label("conv2d", None, False, *norm.activation_label(act))
        return Rewrite([lw.spec("conv2d", (x, w, b, *geo, False, *act[1]), act[0], label)], (node, act[0]))
    return Rewrite([lw.spec("conv2d", (x, w, b, *geo, False), node)], (node,))


def _try(fusion, lw, conv, *args):
    """A fusion's rewrite, or None when it does not apply (the plain conv is lowered instead)."""
    try:
        return fusion(lw, conv, *args)
    except Fail as why:
        log.debug("%s: %s not applied at %s: %s", lw.name, fusion.__name__.strip("_"), conv.name, why)
        return None


def _pooled(relu):
    """``(pool node, its values getitem)`` when ``relu``'s only use is a max-pool whose indices are unused."""
    pool = only_user(relu)
    if not is_call(pool, aten.max_pool2d_with_indices.default):
        return None
    getitems = list(pool.users)
    if len(getitems) != 1 or not is_call(getitems[0], operator.getitem) or getitems[0].args[1] != 0:
        return None
    return pool, getitems[0]


def _pool_args(pool) -> tuple:
    p = bind(pool)
    return (list(p["kernel_size"]), list(p["stride"]), list(p["padding"]), list(p["dilation"]), p["ceil_mode"])


def _conv_relu_pool(lw, conv, relu, x, w, b, geo):
    """Inference: conv -> ReLU -> max-pool values only (the unpooled activation has no other use)
    as one kernel that never writes the unpooled activation."""
    pooled = _pooled(relu)
    if pooled is None:
        return None
    pool, values = pooled
    spec = lw.spec("conv2d_relu_maxpool", (x, w, b, *geo, *_pool_args(pool)), values)
    return Rewrite([spec], (conv, relu, pool))


def _conv_bn_eval(lw, conv, x, w, b, geo):
    """conv -> eval BatchNorm [-> + residual] [-> ReLU] as ``conv2d_batch_norm``, or with a max-pool
    after the ReLU (the ResNet stem) ``conv2d_relu_maxpool`` with the BN parameters: one kernel."""
    bn = norm.user_of(conv, (norm.EVAL,))
    if bn is None or only_user(conv) is not bn:
        return None
    _, bn_w, bn_b, rm, rv, eps = norm.eval_args(bn)

    def make_spec(residual, relu, last, act):
        pooled = _pooled(last) if relu and residual is None else None
        if pooled is not None:
            pool, values = pooled
            args = (x, w, b, *geo, *_pool_args(pool), bn_w, bn_b, rm, rv, eps)
            return lw.spec("conv2d_relu_maxpool", args, values, "conv2d_relu_maxpool(batch_norm)"), (pool,)
        label = norm.epilogue_label("conv2d_batch_norm", residual, relu, *norm.activation_label(act))
        args = (x, w, b, bn_w, bn_b, rm, rv, eps, residual, *geo, relu, *(() if act is None else act[1]))
        return lw.spec("conv2d_batch_norm", args, last if act is None else act[0], label), ()

    rewrite = norm.eval_rewrite(lw, bn, make_spec, activations=True)
    return None if rewrite is None else Rewrite(rewrite.specs, (conv, *rewrite.absorbed))


def _conv_bn_train(lw, conv, x, w, b, geo):
    """conv -> training BatchNorm: the conv writes the BN statistics' per-tile partials in its epilogue
    (``conv2d_bn_stats``) and the BatchNorm call combines them instead of reading the output again; an
    input that is a recomputed BatchNorm apply is read through the conv's input prologue."""
    bn = norm.user_of(conv, norm.TRAIN)
    if bn is None:
        return None
    source, prologue = input_prologue(x)
    label = "conv2d_bn_stats(input prologue)" if prologue else "conv2d_bn_stats"
    return norm.from_partials_rewrite(lw, conv, bn, New(lw.tk.conv2d_bn_stats.default, (source, w, b, *geo, *prologue)),
                                      label)


# ------------------------------------------------------------------------------------------ backward
def _backward_specs(lw, node, g=None, mask=None, residual=None) -> list[Spec] | None:
    """Specs for the used outputs of ``convolution_backward`` ``node``; ``g``/``mask``: its gradient is
    ``g`` masked by ``mask > 0``; ``residual``: ``(add, tensor, tensor's mask)`` to sum into the input
    gradient in its epilogue, replacing ``add``."""
    a = bind(node)
    grad, x, w = a["grad_output"], a["input"], a["weight"]
    lw.checker.tensors_ok(gemm=True, grad_output=grad, input=x, weight=w)
    geo = geometry(a, x)
    outs = norm.outputs(node)
    if not outs:
        return None
    for i in outs:
        if not a["output_mask"][i]:
            raise Fail(f"output {i} is used but output_mask does not ask for it")
    g = grad if g is None else g
    source, prologue = input_prologue(x)
    if prologue and 1 not in outs:  # the input gradient alone does not read the input
        source, prologue = x, ()
    if depthwise.is_depthwise(x, w, geo[3]):
        found = sum_with(outs[0]) if 0 in outs and residual is None else None
        specs = depthwise.backward_specs(lw, outs, g, x, w, mask, geo, residual or found and (*found, None))
        for spec in specs or ():
            spec.masked = mask is not None
        return None if specs is None else lw.in_graph_order(specs)
    specs, combined = [], False
    if 0 in outs:
        first = min(outs.values(), key=lw.order)  # where a launch giving several gradients is emitted
        if residual is None and 1 in outs:
            found = sum_with(outs[0])
            # a sum with a gradient computed later is left to that gradient's convolution_backward
            residual = None if found is None or not lw.defined_before(found[1], first) else (*found, None)
        elif residual is None:
            found = sum_with(outs[0])
            residual = None if found is None else (*found, None)
        target, extra = (outs[0], ()) if residual is None else (residual[0], residual[1:])
        note = "" if not extra else "(+ masked residual)" if extra[1] is not None else "(+ residual)"
        combined = 1 in outs and all(lw.defined_before(t, first) for t in extra)
        fused = None if not combined or residual is None or prologue else _try(
            _residual_bn_partials, lw, node, outs, g, mask, geo, residual)
        if fused is not None:
            return fused
        if combined:  # one launch for all the gradients; its emission point must see the residual
            call = New(lw.tk.conv2d_backward.default,
                       (g, source, w, mask, *geo, *(extra or (None, None)), 2 in outs, *prologue))
            label = "conv2d_backward" + note + ("(input prologue)" if prologue else "")
            specs = [Spec(operator.getitem, (call, i), target if i == 0 else outs[i], label) for i in sorted(outs)]
            for spec in specs:
                lw.checker.check(spec)
        else:
            args = (g, w, mask, lw.sizes(x), *geo, *extra)
            specs.append(lw.spec("conv2d_input_grad", args, target, "conv2d_input_grad" + note))
    if combined:
        pass
    elif 1 in outs and 2 in outs:
        call = New(lw.tk.conv2d_weight_bias_grad.default, (g, source, mask, lw.sizes(w), *geo, *prologue))
        specs += [Spec(operator.getitem, (call, i - 1), outs[i], "conv2d_weight_bias_grad") for i in (1, 2)]
        for spec in specs[-2:]:
            lw.checker.check(spec)
    elif 1 in outs:
        specs.append(lw.spec("conv2d_weight_grad", (g, source, mask, lw.sizes(w), *geo, *prologue), outs[1]))
    elif 2 in outs:
        specs.append(lw.spec("bias_grad", (g, mask, 1), outs[2]))
    for spec in specs:
        spec.masked = mask is not None
    return lw.in_graph_order(specs)


def _residual_bn_partials(lw, node, outs, g, mask, geo, residual) -> list[Spec] | None:
    """A conv whose input x is a residual block's output, ``relu(bn(z) + identity)``, and whose input
    gradient summed with ``residual`` (``(add, tensor, its mask)``) is read only by that ReLU's
    ``threshold_backward`` against x: ``conv2d_backward_residual_bn_partials`` takes the sum on through
    the ReLU and computes the reductions of the one or two training BatchNorm backwards reading the
    masked gradient (bn2, and a downsample branch's BN), which then only apply (``grad_partials``); the
    identity branch reads the masked gradient as stored. Specs, or None where that does not hold."""
    a = bind(node)
    x, w = a["input"], a["weight"]
    add = residual[0]
    relu_bwd = only_user(add)
    if (not is_call(relu_bwd, aten.threshold_backward.default) or relu_bwd.args[0] is not add
            or relu_bwd.args[1] is not x or relu_bwd.args[2] != 0):
        return None
    bns = [u for u in relu_bwd.users if is_call(u, aten.native_batch_norm_backward.default)
           and u.args[0] is relu_bwd and relu_bwd not in u.args[1:] and bind(u)["train"]]
    if not bns or len(bns) > 2 or tuple(val(relu_bwd).shape) != tuple(val(x).shape):
        return None
    bn_args = [t for bn in bns for t in (bind(bn)["input"], bind(bn)["save_mean"])]
    first = min(outs.values(), key=lw.order)  # where the call is emitted
    if not all(lw.defined_before(t, first) for t in bn_args):
        return None
    call = New(lw.tk.conv2d_backward_residual_bn_partials.default,
               (g, x, w, mask, *geo, *residual[1:], 2 in outs, *bn_args))
    label = "conv2d_backward_residual_bn_partials" + ("(two BatchNorms)" if len(bns) == 2 else "")
    specs = [Spec(operator.getitem, (call, 0), relu_bwd, label, absorbs=(add, *bns))]
    specs += [Spec(operator.getitem, (call, i), outs[i], label) for i in sorted(outs) if i]
    for spec in specs:
        lw.checker.check(spec)
    for i, bn in enumerate(bns):
        specs += norm.backward_specs(lw, bn, grad=relu_bwd, partials=New(operator.getitem, (call, 3 + i)))
    for spec in specs:
        spec.masked = mask is not None
    return lw.in_graph_order(specs)


def _backward_bn_partials(lw, node) -> Rewrite | None:
    """A conv whose input is a recomputed training BatchNorm (+ ReLU) output (the joint-graph pass's) and
    whose input gradient only that BatchNorm's backward reads: ``conv2d_backward_bn_partials`` takes the
    gradient on through the ReLU and computes the BN backward's two reductions in its epilogue, so the BN
    backward (``grad_partials=``) reads the activations once, in its apply pass. None where that does not
    hold (the plain rewrite then runs)."""
    a = bind(node)
    grad, x, w = a["grad_output"], a["input"], a["weight"]
    source, prologue = input_prologue(x)
    outs = getitem_users(node)
    if not prologue or outs is None or not {0, 1} <= set(outs) or not all(a["output_mask"][i] for i in outs):
        return None
    found = norm.backward_reading(outs[0], x, source, prologue)
    if found is None:
        return None
    mask, bn_bwd = found
    lw.checker.tensors_ok(gemm=True, grad_output=grad, input=x, weight=w)
    geo = geometry(a, x)
    if depthwise.is_depthwise(x, w, geo[3]):
        return None
    call = New(lw.tk.conv2d_backward_bn_partials.default, (grad, source, w, None, *geo, 2 in outs, *prologue))
    label = "conv2d_backward_bn_partials(input prologue)"
    grad_bn = mask if mask is not None else outs[0]
    specs = [Spec(operator.getitem, (call, i), grad_bn if i == 0 else outs[i], label) for i in sorted(outs)]
    for spec in specs:
        lw.checker.check(spec)
    specs += norm.backward_specs(lw, bn_bwd, grad=grad_bn, partials=New(operator.getitem, (call, 3)))
    absorbed = (node, outs[0], *(() if mask is None else (mask,)), bn_bwd)
    return Rewrite(lw.in_graph_order(specs), absorbed)


@rule(aten.convolution_backward.default)
def convolution_backward(lw, node):
    """``convolution_backward`` -> the gradient ops (module table)."""
    fused = _try(_backward_bn_partials, lw, node)
    if fused is not None:
        return fused
    specs = _backward_specs(lw, node)
    if specs is None:
        return None
    return Rewrite(specs, tuple(dict.fromkeys((node, *(n for s in specs for n in (s.replaces, *s.absorbs))))))


@mask_consumer(aten.convolution_backward.default)
def convolution_backward_masked(lw, user, grad, g, y):
    if user.args[0] is not grad or grad in user.args[1:]:
        return None
    specs = _backward_specs(lw, user, g, y)
    return None if specs is None else {user: specs}


@mask_consumer(aten.add.Tensor)
def input_grad_plus_masked(lw, user, grad, g, y):
    """``add(conv input gradient, grad)``: the identity branch's ReLU gradient summed in the epilogue of the
    conv input gradient it meets, as ``residual=g, residual_mask=y``."""
    if bind(user).get("alpha", 1) != 1:
        return None
    other = user.args[1] if user.args[0] is grad else user.args[0]
    if other is grad or not is_call(other, operator.getitem) or other.args[1] != 0 or only_user(other) is not user:
        return None
    conv_bwd = other.args[0]
    if not is_call(conv_bwd, aten.convolution_backward.default) or conv_bwd in lw.consumed or conv_bwd in lw.planned:
        return None
    if tuple(val(grad).shape) != tuple(val(other).shape) or val(grad).dtype != val(other).dtype:
        return None
    specs = _backward_specs(lw, conv_bwd, residual=(user, g, y))
    return None if specs is None else {conv_bwd: specs}
