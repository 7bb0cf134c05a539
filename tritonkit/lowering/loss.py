"""Loss rules: ``_log_softmax`` + ``nll_loss_forward`` (what ``F.cross_entropy`` traces to) as
``cross_entropy``, and ``nll_loss_backward`` + ``_log_softmax_backward_data`` as one
``cross_entropy_backward``. Label smoothing traces to a decomposition around these nodes; it stays ATen."""

from __future__ import annotations

import operator

from tritonkit.lowering.graph import Fail, New, Rewrite, Spec, aten, bind, is_call, only_user, val
from tritonkit.lowering.rules import rule


def _class_dim_ok(logits, dim) -> None:
    if val(logits).dim() != 2 or dim % 2 != 1:
        raise Fail(f"log-softmax over dim {dim} of a {val(logits).dim()}-D tensor (tritonkit: class dim 1 of [N, C])")


@rule(aten.nll_loss_forward.default)
def nll_loss_forward(lw, node):
    """``nll_loss_forward(_log_softmax(x))`` -> ``cross_entropy(x)``: the log-probabilities are never
    written when nothing else uses them, and written by the same launch (``write_log_probs``) when the
    graph also returns them (training graphs save them for the backward). Log-probabilities from
    elsewhere: ``cross_entropy`` of them (their log-sum-exp is 0)."""
    a = bind(node)
    logp, target, weight = a["self"], a["target"], a["weight"]
    lw.checker.tensors_ok(input=logp, weight=weight)
    getitems = list(node.users)
    if not all(is_call(u, operator.getitem) for u in getitems):
        raise Fail("an output is used other than through getitem")
    replaced = {0 if u.args[1] == 0 else 2: u for u in getitems}  # (loss, total_weight): outputs 0 and 2
    logits, write_log_probs = logp, False
    if is_call(logp, aten._log_softmax.default) and all(lw.defined_before(t, logp) for t in (target, weight)):
        x, dim, half_to_float = logp.args
        _class_dim_ok(x, dim)
        if half_to_float:
            raise Fail("log-softmax with half_to_float")
        logits, write_log_probs = x, only_user(logp) is not node
        if write_log_probs:
            replaced[4] = logp
    if not replaced:
        return None
    call = New(lw.tk.cross_entropy.default,
               (logits, target, weight, a["reduction"], a["ignore_index"], 0.0, False, write_log_probs))
    label = "cross_entropy(write_log_probs=True)" if write_log_probs else "cross_entropy"
    specs = lw.in_graph_order([Spec(operator.getitem, (call, i), u, label) for i, u in replaced.items()])
    for spec in specs:
        lw.checker.check(spec)
    absorbed = (node,) if logits is logp else (logp, node)
    return Rewrite(specs, absorbed)


@rule(aten.nll_loss_backward.default)
def nll_loss_backward(lw, node):
    """``_log_softmax_backward_data(nll_loss_backward(g, ...), logp)`` -> ``cross_entropy_backward(g,
    logp)``: the softmax of the log-probabilities is the softmax of the logits."""
    a = bind(node)
    user = only_user(node)
    if not is_call(user, aten._log_softmax_backward_data.default) or user.args[0] is not node:
        return None
    _, logp, dim, _input_dtype = user.args
    _class_dim_ok(logp, dim)
    lw.checker.tensors_ok(grad_output=a["grad_output"], output=logp, weight=a["weight"])
    args = (a["grad_output"], logp, a["target"], a["weight"], None, a["total_weight"], a["reduction"],
            a["ignore_index"], 0.0)
    return Rewrite([lw.spec("cross_entropy_backward", args, user)], (node, user))
