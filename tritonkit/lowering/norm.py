"""BatchNorm and LayerNorm rules.

===================================================================  ==========================================
ATen (AOTAutograd, torch 2.11-2.14)                                  tritonkit
===================================================================  ==========================================
``_native_batch_norm_legit_functional`` (training, running stats)     ``batch_norm_train`` [+ ``relu``]
``_native_batch_norm_legit.no_stats`` (``track_running_stats=False``)   [+ ``add`` [+ ``relu``]: residual fused]
``add(num_batches_tracked, 1)`` of the same module                    folded: the counter output of the call
``convolution`` feeding the training BatchNorm (conv family)          ``conv2d_bn_stats`` +
                                                                      ``batch_norm_train_from_partials``
``_native_batch_norm_legit_no_training`` (eval)                       ``batch_norm_eval`` [+ add] [+ relu]
                                                                      (after a conv: ``conv2d_batch_norm``)
``native_batch_norm_backward``                                        ``batch_norm_backward``
``threshold_backward`` feeding only BN backward (and other consumers   folded: ``relu_output=`` of the
that take the mask)                                                   BN backward
``hardtanh_backward(g, y, 0, 6)`` (ReLU6), ``hardswish_backward``,   folded: ``activation="relu6"``,
``silu_backward``, ... feeding only BN backward                       ``"hardswish"``, ``"silu"``, ...
``native_layer_norm`` / ``native_layer_norm_backward`` over the       ``layer_norm`` / ``layer_norm_backward``
last dim (ConvNeXt's channels-last LayerNorm)
===================================================================  ==========================================

The ReLU after a BatchNorm is fused only when it is the BN output's only consumer (optionally through a
residual ``add`` whose other operand is computed before the fused call, so the call can take it; such an
``add`` is fused without a ReLU after it too, as at the end of a MobileNetV2 block), so
what the partitioner saves for backward is the ReLU output, as for a conv. ``momentum=None`` (the
cumulative average) never reaches a graph: torch's BatchNorm reads ``float(num_batches_tracked)``,
where dynamo breaks the graph, so that BatchNorm runs in eager PyTorch.
"""

from __future__ import annotations

import operator

import torch

from tritonkit.kernels.norm import SAVES_INPUT
from tritonkit.lowering.graph import (
    DETACH,
    Fail,
    New,
    Rewrite,
    Spec,
    activation_after,
    aten,
    bind,
    input_prologue,
    is_call,
    only_user,
    val,
)
from tritonkit.lowering.rules import mask_consumer, rule

TRAIN = (aten._native_batch_norm_legit_functional.default, aten._native_batch_norm_legit.no_stats)
EVAL = aten._native_batch_norm_legit_no_training.default


def outputs(node) -> dict[int, object]:
    """``{index: getitem}`` of a multi-output node; ``Fail`` when an output is used otherwise."""
    users = list(node.users)
    if not all(is_call(u, operator.getitem) for u in users):
        raise Fail("an output is used other than through getitem")
    return {u.args[1]: u for u in users}


def epilogue(lw, bn, out):
    """``(residual, relu, last)``: what follows the BN output ``out`` that one call can fuse, and the
    last node it then replaces (``out`` itself when nothing is fused)."""
    relu = lw.relu_after(out)
    if relu is not None and relu.args[0] is out:
        return None, True, relu
    add = only_user(out)
    if not lw.opts.fuse_relu or not is_call(add, aten.add.Tensor) or add.kwargs.get("alpha", 1) != 1:
        return None, False, out
    other = add.args[1] if add.args[0] is out else add.args[0]
    if (other is out or not hasattr(val(other), "shape") or tuple(val(other).shape) != tuple(val(out).shape)
            or val(other).dtype != val(out).dtype or not lw.defined_before(other, bn)):
        return None, False, out
    lw.checker.tensors_ok(input=out, residual=other)
    relu = lw.relu_after(add)
    return (other, True, relu) if relu is not None and relu.args[0] is add else (other, False, add)


def activation_epilogue(lw, last, pre: bool):
    """``(activation node, (kind, min_val, max_val))`` for the activation applied to ``last`` (the BN output,
    or its residual sum) that the BN call can fuse, or None: ``last``'s only use, or with ``pre`` (the call
    also writes ``last`` itself, training) any one of its uses when that activation's backward reads its
    input (the partitioner saves ``last`` for it)."""
    found = activation_after(last) if lw.opts.fuse_relu else None
    if found is None:
        return None
    node, args = found
    if only_user(last) is not node and not (pre and args[0] in SAVES_INPUT):
        return None
    try:
        lw.checker.tensors_ok(input=node)
    except Fail:
        return None
    return found


def between(first, last) -> list:
    """The nodes from ``first``'s user up to ``last`` along single-user links (add, views, relu)."""
    chain, node = [], first
    while node is not last:
        node = only_user(node)
        chain.append(node)
    return chain


def activation_label(act) -> list[str]:
    return [] if act is None else [f"activation={'relu6' if act[1][1:] == (0.0, 6.0) else act[1][0]}"]


def epilogue_label(name: str, residual, relu: bool, *more: str) -> str:
    flags = ["residual"] * (residual is not None) + ["relu=True"] * relu + list(more)
    return f"{name}({', '.join(flags)})" if flags else name


def _module(node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else None


def counter_add(lw, bn):
    """``add(num_batches_tracked, 1)`` of ``bn``'s module (the nearest one before it, same
    ``nn_module_stack``, an int64 0-d graph input, not lowered yet), or None."""
    module = _module(bn)
    node = bn.prev
    while module is not None and node.op != "root":
        counter = node.args[0] if is_call(node, aten.add.Tensor) and len(node.args) == 2 else None
        if (node.args[1:] == (1,) and getattr(counter, "op", None) == "placeholder" and node not in lw.consumed
                and val(counter).dtype == torch.int64 and val(counter).dim() == 0 and not node.kwargs
                and _module(node) == module):
            return node
        node = node.prev
    return None


def _train_args(node):
    if node.target is aten._native_batch_norm_legit.no_stats:
        x, w, b, training, momentum, eps = node.args
        rm = rv = None
    else:
        x, w, b, rm, rv, training, momentum, eps = node.args
    if not training:
        raise Fail("training=False in a training BatchNorm op (eval graphs trace _native_batch_norm_legit_no_training)")
    return x, w, b, rm, rv, momentum, eps


def train_rewrite(lw, node, partials=None) -> Rewrite:
    """``batch_norm_train`` (or, given the producing conv's ``partials``, ``batch_norm_train_from_partials``)
    for the training BatchNorm ``node``, with its epilogue and its module's counter increment fused."""
    x, w, b, rm, rv, momentum, eps = _train_args(node)
    lw.checker.tensors_ok(input=x)
    lw.checker.params_ok(x, weight=w, bias=b, running_mean=rm, running_var=rv)
    outs = outputs(node)
    residual, relu, last = (None, False, None) if 0 not in outs else epilogue(lw, node, outs[0])
    act = activation_epilogue(lw, last, pre=True) if last is not None and not relu else None
    counter = counter_add(lw, node) if rm is not None else None
    if counter is not None and not all(lw.defined_before(a, counter) for a in (x, w, b, rm, rv, residual)):
        counter = None  # the fused call is emitted where the increment is: its inputs must exist there
    nbt = None if counter is None else counter.args[0]
    shift = 0  # output i of the ATen op is output i - shift of the tritonkit call
    if partials is not None and 0 not in outs:  # its readers apply it as they load its input (lowering.joint)
        name, shift = "batch_norm_stats_from_partials", 1
        call = New(lw.tk.batch_norm_stats_from_partials.default, (x, partials, rm, rv, nbt, momentum, eps))
    else:
        name, head = ("batch_norm_train", (x,)) if partials is None else \
            ("batch_norm_train_from_partials", (x, partials))
        kind = () if act is None else act[1]
        call = New(getattr(lw.tk, name).default, (*head, w, b, rm, rv, nbt, momentum, eps, residual, relu, *kind))
    label = epilogue_label(name, residual, relu, *activation_label(act),
                           *["num_batches_tracked += 1"] * (counter is not None))
    replaced = {i: last if i == 0 else outs[i] for i in outs}
    if act is not None:
        replaced[0] = act[0]
        if act[1][0] in SAVES_INPUT and only_user(last) is not act[0]:
            replaced[6] = last  # the BN output, saved for the activation's backward
    if counter is not None:
        replaced[5] = counter
    specs = lw.in_graph_order([Spec(operator.getitem, (call, i - shift), n, label) for i, n in replaced.items()])
    for spec in specs:
        lw.checker.check(spec)
    absorbed = (node,) if last is None else (node, outs[0], *between(outs[0], last))
    absorbed += () if act is None else (act[0],)
    return Rewrite(specs, tuple(dict.fromkeys((*absorbed, *(() if counter is None else (counter,))))))


def user_of(conv, targets):
    """The BatchNorm of one of ``targets`` that normalises ``conv``'s output, if any."""
    return next((u for u in conv.users if is_call(u, *targets) and u.args[0] is conv), None)


def from_partials_rewrite(lw, conv, bn, call, label) -> Rewrite:
    """``conv`` replaced by output 0 of ``call`` (a conv that also writes the BN statistics' per-tile
    partials, output 1) and the training BatchNorm ``bn`` by ``batch_norm_train_from_partials`` over them."""
    spec = Spec(operator.getitem, (call, 0), conv, label)
    lw.checker.check(spec)
    rewrite = train_rewrite(lw, bn, partials=New(operator.getitem, (call, 1)))
    return Rewrite([spec, *rewrite.specs], (conv, *rewrite.absorbed))


@rule(*TRAIN)
def batch_norm_train(lw, node):
    return train_rewrite(lw, node)


def eval_args(node):
    x, w, b, rm, rv, _momentum, eps = node.args
    return x, w, b, rm, rv, eps


def eval_rewrite(lw, node, make_spec, activations: bool = False) -> Rewrite | None:
    """The eval BatchNorm ``node`` and its epilogue replaced by the spec of ``make_spec(residual, relu,
    last, act) -> (spec, further absorbed nodes)`` (``act``: the activation after it, see
    :func:`activation_epilogue`, when ``activations`` says ``make_spec`` takes one, else None; the spec
    then replaces ``act``'s node); the saved statistics an eval-mode backward never reads become empty
    tensors."""
    x, w, b, rm, rv, _eps = eval_args(node)
    lw.checker.tensors_ok(input=x)
    lw.checker.params_ok(x, weight=w, bias=b, running_mean=rm, running_var=rv)
    outs = outputs(node)
    if 0 not in outs:
        return None
    residual, relu, last = epilogue(lw, node, outs[0])
    act = activation_epilogue(lw, last, pre=False) if activations and not relu else None
    spec, further = make_spec(residual, relu, last, act)
    specs = [spec]
    for i in sorted(set(outs) - {0}):
        specs.append(Spec(aten.new_empty.default, (x, [0]), outs[i], spec.label))
        lw.checker.check(specs[-1])
    absorbed = (node, outs[0], *between(outs[0], last), *(() if act is None else (act[0],)), *further)
    return Rewrite(specs, tuple(dict.fromkeys(absorbed)))


@rule(EVAL)
def batch_norm_eval(lw, node):
    x, w, b, rm, rv, eps = eval_args(node)

    def make_spec(residual, relu, last, act):
        label = epilogue_label("batch_norm_eval", residual, relu, *activation_label(act))
        kind = () if act is None else act[1]
        args = (x, w, b, rm, rv, eps, residual, relu, *kind)
        return lw.spec("batch_norm_eval", args, last if act is None else act[0], label), ()

    return eval_rewrite(lw, node, make_spec, activations=True)


def backward_specs(lw, node, grad=None, relu_output=None, activation="relu", partials=None):
    """Specs for the used outputs of ``native_batch_norm_backward`` ``node``; ``grad``/``relu_output``: its
    gradient is ``grad`` through ``activation``'s backward from ``relu_output`` (``"relu"``: the ReLU output,
    > 0; ``"relu6"``: the hardtanh(0, 6) input, strictly inside (0, 6); the others: what aten's backward of
    that activation saves, ``tritonkit::batch_norm_backward``'s doc). ``partials``: the two reductions of
    ``grad``, computed where it was (``grad_partials``)."""
    a = bind(node)
    x, w = a["input"], a["weight"]
    grad = a["grad_out"] if grad is None else grad
    lw.checker.tensors_ok(grad_out=a["grad_out"], input=x)
    lw.checker.params_ok(x, weight=w, running_mean=a["running_mean"], running_var=a["running_var"])
    outs = outputs(node)
    mask = list(a["output_mask"])
    for i in outs:
        if not mask[i]:
            raise Fail(f"output {i} is used but output_mask does not ask for it")
    mask = [i in outs for i in range(3)]  # compute only what is used
    saved = (a["save_mean"], a["save_invstd"]) if a["train"] else (None, None)  # eval: empty, unused
    own = own_output_bias(relu_output, x, w, *saved) if activation == "relu" else None
    tail = (relu_output, activation) if own is None else (None, activation, own[0], True)
    if partials is not None:
        tail = (None, activation, None, False, partials)
    call = New(lw.tk.batch_norm_backward.default, (grad, x, w, a["running_mean"], a["running_var"], *saved,
                                                   a["train"], a["eps"], mask, *tail))
    label = "batch_norm_backward" + (f"({activation} mask)" if activation != "relu" else "")
    label += "(mask from its output)" if own is not None else ""
    label += "(reductions from the input gradient)" if partials is not None else ""
    specs = [Spec(operator.getitem, (call, i), outs[i], label, masked=own is None) for i in sorted(outs)]
    for spec in specs:
        lw.checker.check(spec)
    return specs


def own_output_bias(y, x, weight, save_mean, save_invstd) -> tuple | None:
    """``(bias,)`` when ``y`` (through ``detach`` views) is ``relu(bn(x))`` recomputed as
    ``tritonkit::batch_norm_apply(x, save_mean, save_invstd, weight, bias, relu=True)`` (the joint-graph
    pass's, :mod:`tritonkit.lowering.joint`): the BatchNorm backward of ``x`` then takes the ReLU mask from
    its own output (``mask_from_output``) and the apply need not run. Else None."""
    while is_call(y, *DETACH):
        y = y.args[0]
    source, prologue = input_prologue(y)
    if not prologue or save_mean is None:
        return None
    mean, invstd, w, bias, relu = prologue
    if (source, mean, invstd, w) != (x, save_mean, save_invstd, weight) or not relu:
        return None
    return (bias,)


def backward_reading(grad_input, x, source, prologue):
    """``(mask, bn_backward)`` when the input gradient ``grad_input`` of a conv or max-pool whose input ``x``
    is a recomputed ``relu(bn(source))`` (``prologue``: its statistics and parameters, the joint-graph pass's
    apply) is the gradient that ``bn``'s training backward takes, through the ReLU's ``threshold_backward``
    ``mask`` (None without a ReLU), with nothing else reading it; else None. The producer can then take the
    gradient on through the ReLU and compute the BN backward's reductions (``grad_partials``)."""
    mean, invstd, weight, _bias, relu = prologue
    mask, user = None, only_user(grad_input)
    if relu:
        if not is_call(user, aten.threshold_backward.default) or user.args[0] is not grad_input or user.args[2] != 0:
            return None
        y = user.args[1]
        while is_call(y, *DETACH):
            y = y.args[0]
        if y is not x:
            return None
        mask, user = user, only_user(user)
    if not is_call(user, aten.native_batch_norm_backward.default):
        return None
    b = bind(user)
    grad = mask if relu else grad_input
    if (b["grad_out"] is not grad or grad in user.args[1:] or b["input"] is not source or not b["train"]
            or (b["weight"], b["save_mean"], b["save_invstd"]) != (weight, mean, invstd)):
        return None
    return mask, user


@rule(aten.native_batch_norm_backward.default)
def batch_norm_backward(lw, node):
    specs = backward_specs(lw, node)
    return Rewrite(specs, (node,)) if specs else None


@mask_consumer(aten.native_batch_norm_backward.default)
def batch_norm_backward_masked(lw, user, grad, g, y):
    if user.args[0] is not grad or grad in user.args[1:]:
        return None
    specs = backward_specs(lw, user, g, y)
    return {user: specs} if specs else None


# --------------------------------------------------------------------------------------------- LayerNorm
def _layer_norm_specs(lw, node, op: str, args: tuple) -> Rewrite | None:
    """``node``'s used outputs (getitems) replaced by those of ``tritonkit::<op>(*args)``."""
    outs = outputs(node)
    if not outs:
        return None
    call = New(getattr(lw.tk, op).default, args)
    specs = [Spec(operator.getitem, (call, i), outs[i], op) for i in sorted(outs)]
    for spec in specs:
        lw.checker.check(spec)
    return Rewrite(specs, (node,))


def _normalized_last_dim(a) -> None:
    if len(a["normalized_shape"]) != 1:
        raise Fail(f"LayerNorm over the last {len(a['normalized_shape'])} dims (tritonkit normalises the last one)")


@rule(aten.native_layer_norm.default)
def layer_norm(lw, node):
    a = bind(node)
    _normalized_last_dim(a)
    x = a["input"]
    lw.checker.tensors_ok(input=x)
    lw.checker.params_ok(x, weight=a["weight"], bias=a["bias"])
    return _layer_norm_specs(lw, node, "layer_norm", (x, a["weight"], a["bias"], a["eps"]))


@rule(aten.native_layer_norm_backward.default)
def layer_norm_backward(lw, node):
    a = bind(node)
    _normalized_last_dim(a)
    x = a["input"]
    lw.checker.tensors_ok(grad_out=a["grad_out"], input=x)
    lw.checker.params_ok(x, weight=a["weight"])
    mask = [i in outputs(node) for i in range(3)]  # compute only what is used
    return _layer_norm_specs(lw, node, "layer_norm_backward",
                             (a["grad_out"], x, a["mean"], a["rstd"], a["weight"], mask))
