"""BatchNorm rules.

===================================================================  ==========================================
ATen (AOTAutograd, torch 2.11-2.14)                                  tritonkit
===================================================================  ==========================================
``_native_batch_norm_legit_functional`` (training, running stats)     ``batch_norm_train`` [+ ``relu``]
``_native_batch_norm_legit.no_stats`` (``track_running_stats=False``)   [+ ``add`` + ``relu``: residual fused]
``_native_batch_norm_legit_no_training`` (eval)                       ``batch_norm_eval`` [+ add] [+ relu]
``native_batch_norm_backward``                                        ``batch_norm_backward``
``threshold_backward`` feeding only BN backward (and other consumers   folded: ``relu_output=`` of the
that take the mask)                                                   BN backward
===================================================================  ==========================================

The ReLU after a BatchNorm is fused only when it is the BN output's only consumer (optionally through a
residual ``add`` whose other operand is computed before the BatchNorm, so the fused call can take it),
so what the partitioner saves for backward is the ReLU output, as for a conv.
"""

from __future__ import annotations

import operator

from tritonkit.lowering.graph import Fail, New, Rewrite, Spec, aten, bind, is_call, only_user, val
from tritonkit.lowering.rules import mask_consumer, rule


def _outputs(node) -> dict[int, object]:
    users = list(node.users)
    if not all(is_call(u, operator.getitem) for u in users):
        raise Fail("an output is used other than through getitem")
    return {u.args[1]: u for u in users}


def _epilogue(lw, bn, out):
    """``(residual, relu, last)``: what follows the BN output ``out`` that the BN call can fuse, and the
    last node it then replaces (``out`` itself when nothing is fused)."""
    relu = lw.relu_after(out)
    if relu is not None and relu.args[0] is out:
        return None, True, relu
    add = only_user(out)
    if not lw.opts.fuse_relu or not is_call(add, aten.add.Tensor) or add.kwargs.get("alpha", 1) != 1:
        return None, False, out
    other = add.args[1] if add.args[0] is out else add.args[0]
    relu = lw.relu_after(add)
    if (relu is None or relu.args[0] is not add or other is out or not hasattr(val(other), "shape")
            or tuple(val(other).shape) != tuple(val(out).shape) or not lw.defined_before(other, bn)):
        return None, False, out
    return other, True, relu


def _train_rewrite(lw, node, x, w, b, rm, rv, momentum, eps):
    lw.checker.tensors_ok(input=x, weight=w, bias=b, running_mean=rm, running_var=rv)
    outs = _outputs(node)
    residual, relu, last = (None, False, None) if 0 not in outs else _epilogue(lw, node, outs[0])
    if residual is not None:
        lw.checker.tensors_ok(input=x, residual=residual)
    call = New(lw.tk.batch_norm_train.default, (x, w, b, rm, rv, momentum, eps, residual, relu))
    label = "batch_norm_train" + ("(residual, relu=True)" if residual is not None else "(relu=True)" if relu else "")
    specs = lw.in_graph_order([Spec(operator.getitem, (call, i), last if i == 0 else outs[i], label) for i in outs])
    for spec in specs:
        lw.checker.check(spec)
    absorbed = (node,) if last is None else tuple(dict.fromkeys((node, outs[0], *_between(outs[0], last))))
    return Rewrite(specs, absorbed)


def _between(first, last) -> list:
    """The nodes from ``first``'s user up to ``last`` along single-user links (add, views, relu)."""
    chain, node = [], first
    while node is not last:
        node = only_user(node)
        chain.append(node)
    return chain


@rule(aten._native_batch_norm_legit_functional.default)
def batch_norm_functional(lw, node):
    x, w, b, rm, rv, training, momentum, eps = node.args
    if not training:
        raise Fail("training=False with running statistics (eval graphs trace _native_batch_norm_legit_no_training)")
    return _train_rewrite(lw, node, x, w, b, rm, rv, momentum, eps)


@rule(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats(lw, node):
    x, w, b, training, momentum, eps = node.args
    if not training:
        raise Fail("training=False without running statistics")
    return _train_rewrite(lw, node, x, w, b, None, None, momentum, eps)


@rule(aten._native_batch_norm_legit_no_training.default)
def batch_norm_eval(lw, node):
    x, w, b, rm, rv, _momentum, eps = node.args
    lw.checker.tensors_ok(input=x, weight=w, bias=b, running_mean=rm, running_var=rv)
    outs = _outputs(node)
    if 0 not in outs:
        return None
    residual, relu, last = _epilogue(lw, node, outs[0])
    label = "batch_norm_eval" + ("(residual, relu=True)" if residual is not None else "(relu=True)" if relu else "")
    specs = [lw.spec("batch_norm_eval", (x, w, b, rm, rv, eps, residual, relu), last, label)]
    for i in sorted(set(outs) - {0}):  # eval-mode backward reads only the running statistics: empty
        specs.append(Spec(aten.new_empty.default, (x, [0]), outs[i], label))
        lw.checker.check(specs[-1])
    return Rewrite(specs, tuple(dict.fromkeys((node, outs[0], *_between(outs[0], last)))))


def _backward_specs(lw, node, grad=None, relu_output=None):
    a = bind(node)
    x, w = a["input"], a["weight"]
    grad = a["grad_out"] if grad is None else grad
    lw.checker.tensors_ok(grad_out=a["grad_out"], input=x, weight=w)
    outs = _outputs(node)
    mask = list(a["output_mask"])
    for i in outs:
        if not mask[i]:
            raise Fail(f"output {i} is used but output_mask does not ask for it")
    mask = [i in outs for i in range(3)]  # compute only what is used
    saved = (a["save_mean"], a["save_invstd"]) if a["train"] else (None, None)  # eval: empty, unused
    call = New(lw.tk.batch_norm_backward.default,
               (grad, x, w, a["running_mean"], a["running_var"], *saved, a["train"], a["eps"], mask, relu_output))
    specs = [Spec(operator.getitem, (call, i), outs[i], "batch_norm_backward") for i in sorted(outs)]
    for spec in specs:
        lw.checker.check(spec)
    return specs


@rule(aten.native_batch_norm_backward.default)
def batch_norm_backward(lw, node):
    specs = _backward_specs(lw, node)
    return Rewrite(specs, (node,)) if specs else None


@mask_consumer(aten.native_batch_norm_backward.default)
def batch_norm_backward_masked(lw, user, grad, g, y):
    if user.args[0] is not grad or grad in user.args[1:]:
        return None
    specs = _backward_specs(lw, user, g, y)
    return {user: specs} if specs else None
