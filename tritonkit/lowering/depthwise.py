"""Depthwise convolution (``groups`` == input channels, weight [C * M, 1, KH, KW]): direct kernels, no GEMM.

The conv family's rules hand a depthwise ``convolution`` / ``convolution_backward`` to this module.

=======================================================  ===================================================
ATen                                                      tritonkit
=======================================================  ===================================================
``convolution`` [+ activation]                            ``depthwise_conv2d(activation=...)``
  + eval BatchNorm [+ activation]                         ``depthwise_conv2d_batch_norm`` (one kernel)
  + training BatchNorm [+ ``add``] [+ ``relu``]           ``depthwise_conv2d_bn_stats`` (statistics in the
                                                          epilogue) + ``batch_norm_train_from_partials``
``convolution_backward`` [ReLU mask folded]               ``depthwise_conv2d_input_grad`` +
                                                          ``depthwise_conv2d_weight_grad`` (weight and bias)
  + ``add`` of the input gradient and another gradient    the sum in the input gradient's epilogue
=======================================================  ===================================================

The activation is a ReLU, ``hardtanh(0, 6)`` (ReLU6) or another of the forward kernel's kinds (hardswish,
SiLU, ...: ``kernels.depthwise.FORWARD_ACTIVATIONS``), fused only where the conv (or BN) output has no other
use: in training graphs the partitioner saves the input of an activation whose backward reads it (ReLU6's
``hardtanh_backward`` too), so that activation stays a launch of its own.
"""

from __future__ import annotations

import operator

from tritonkit.kernels.depthwise import FORWARD_ACTIVATIONS
from tritonkit.lowering import norm
from tritonkit.lowering.graph import New, Rewrite, Spec, aten, only_user, val


def is_depthwise(x, w, groups) -> bool:
    return groups > 1 and val(x).shape[1] == groups and val(w).shape[1] == 1


def activation_after(lw, node):
    """``(node's only user, kind)`` when that user is an activation of it that the forward kernel applies: a
    ReLU (``"relu"``), ``hardtanh(0, 6)`` (``"relu6"``) or another kind of ``FORWARD_ACTIVATIONS``, else
    ``(None, "none")``."""
    relu = lw.relu_after(node)
    if relu is not None and relu.args[0] is node:
        return relu, "relu"
    found = norm.activation_epilogue(lw, node, pre=False)
    if found is None:
        return None, "none"
    user, (kind, min_val, max_val) = found
    if kind == "hardtanh":
        return (user, "relu6") if (min_val, max_val) == (0, 6) else (None, "none")
    return (user, kind) if kind in FORWARD_ACTIVATIONS else (None, "none")


def forward(lw, conv, x, w, b, geo) -> Rewrite:
    """A depthwise ``convolution`` with what follows it fused (module table)."""
    stride, padding, dilation, _groups = geo
    for fusion in (_bn_eval, _bn_train):
        fused = fusion(lw, conv, x, w, b, (stride, padding, dilation))
        if fused is not None:
            return fused
    act, kind = activation_after(lw, conv)
    label = f"depthwise_conv2d(activation={kind})" if act is not None else "depthwise_conv2d"
    spec = lw.spec("depthwise_conv2d", (x, w, b, stride, padding, dilation, kind), act or conv, label)
    return Rewrite([spec], (conv, *([act] if act is not None else [])))


def _bn_eval(lw, conv, x, w, b, geo):
    bn = norm.user_of(conv, (norm.EVAL,))
    if bn is None or only_user(conv) is not bn:
        return None
    _, bn_w, bn_b, rm, rv, eps = norm.eval_args(bn)
    lw.checker.tensors_ok(bn_weight=bn_w, bn_bias=bn_b, running_mean=rm, running_var=rv)
    outs = norm.outputs(bn)
    if 0 not in outs:
        return None
    act, kind = activation_after(lw, outs[0])
    last = act or outs[0]
    label = "depthwise_conv2d_batch_norm" + (f"(activation={kind})" if act is not None else "")
    specs = [lw.spec("depthwise_conv2d_batch_norm", (x, w, b, bn_w, bn_b, rm, rv, eps, *geo, kind), last, label)]
    for i in sorted(set(outs) - {0}):  # the saved statistics an eval-mode backward never reads
        specs.append(Spec(aten.new_empty.default, (x, [0]), outs[i], label))
        lw.checker.check(specs[-1])
    return Rewrite(specs, tuple(dict.fromkeys((conv, bn, outs[0], *norm.between(outs[0], last)))))


def _bn_train(lw, conv, x, w, b, geo):
    bn = norm.user_of(conv, norm.TRAIN)
    if bn is None:
        return None
    call = New(lw.tk.depthwise_conv2d_bn_stats.default, (x, w, b, *geo))
    return norm.from_partials_rewrite(lw, conv, bn, call, "depthwise_conv2d_bn_stats")


def backward_specs(lw, outs, g, x, w, mask, geo, residual) -> list[Spec] | None:
    """Specs for the used outputs ``outs`` ({index: getitem}) of a depthwise ``convolution_backward`` whose
    gradient is ``g`` (masked by ``mask`` > 0 when given); ``residual``: ``(add, tensor, its mask)``, the sum
    of the input gradient and ``tensor`` that replaces ``add`` (the two branch gradients of an inverted
    residual block), added in the input gradient's epilogue; None when it has a mask (not fused here)."""
    if residual is not None and residual[2] is not None:
        return None
    stride, padding, dilation, _groups = geo
    specs = []
    if 0 in outs:
        target, extra = (outs[0], ()) if residual is None else (residual[0], (residual[1],))
        label = "depthwise_conv2d_input_grad" + ("(+ residual)" if extra else "")
        args = (g, w, mask, lw.sizes(x), stride, padding, dilation, "relu", *extra)
        specs.append(lw.spec("depthwise_conv2d_input_grad", args, target, label))
    if 1 in outs:
        call = New(lw.tk.depthwise_conv2d_weight_grad.default,
                   (g, x, mask, lw.sizes(w), stride, padding, dilation, "relu", 2 in outs))
        for i in (1, 2):
            if i in outs:
                specs.append(Spec(operator.getitem, (call, i - 1), outs[i], "depthwise_conv2d_weight_grad"))
                lw.checker.check(specs[-1])
    elif 2 in outs:
        specs.append(lw.spec("bias_grad", (g, mask, 1), outs[2]))
    return specs
