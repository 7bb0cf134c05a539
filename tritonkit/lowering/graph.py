"""FX graph vocabulary shared by the rules: reading nodes, and the pieces a rewrite is made of."""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

VIEWS = (aten.view.default, aten._unsafe_view.default)
DETACH = (aten.detach.default, aten.alias.default)  # the same values: autograd's views in joint graphs

# Nodes that launch nothing: getitem, views of metadata, size queries, allocations left uninitialised.
_FREE = {operator.getitem, aten._unsafe_view.default, aten.sym_size.int, aten.sym_stride.int,
         aten.sym_numel.default, aten.sym_storage_offset.default, aten.new_empty.default,
         aten.empty.memory_format}


class Fail(Exception):
    """A candidate node that cannot be lowered; the message says why."""


@dataclasses.dataclass(eq=False)
class New:
    """A helper node (view, ``t``, ``sym_size``) a rewrite inserts; emitted once however often used."""

    target: Any
    args: tuple


@dataclasses.dataclass
class Spec:
    """Replace ``replaces`` with ``op(*args)`` followed by the ``post`` steps.

    ``op`` None means: ``replaces`` (a ReLU fused into the op before it) is replaced by its input.
    Each ``post`` step is ``(target, extra args, kwargs)`` applied to the result: the keepdim view of
    a bias gradient, or a copy into the memory format ATen's result has.
    """

    op: Any
    args: tuple
    replaces: fx.Node
    label: str
    post: list = dataclasses.field(default_factory=list)
    note: str = ""  # what the post steps add, for the report
    masked: bool = True  # False: a folded ReLU mask reaches this spec only as something else (a residual)
    absorbs: tuple = ()  # other nodes the rewrite leaves without a use (erased, their rules not run)

    def describe(self, relu_output: str | None = None) -> str:
        mask = f"(relu_output={relu_output})" if relu_output else ""
        return f"{self.label}{mask}{self.note}"


@dataclasses.dataclass
class Rewrite:
    """What a rule returns for its node: the ``specs`` to emit and the ATen nodes they ``absorb``
    (reported as one lowering). ``planned`` maps later nodes to specs this rule already checked for
    them (a folded ReLU mask changes how the consumers of a ``threshold_backward`` are lowered): the
    lowering emits those when it reaches them instead of running their own rules. ``report`` False:
    the rule reported the rewrite itself (folded masks are reported with their ``threshold_backward``)."""

    specs: list[Spec]
    absorbed: tuple[fx.Node, ...] = ()
    planned: dict[fx.Node, list[Spec]] = dataclasses.field(default_factory=dict)
    report: bool = True


def val(a):
    """The fake tensor (or other value) a node carries in ``meta["val"]``; non-nodes as they are."""
    return a.meta.get("val") if isinstance(a, fx.Node) else a


def is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    bound = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def is_view_op(target) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return len(returns) == 1 and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def launches(node: fx.Node) -> int:
    """Kernel launches a node costs: 0 for views, getitem and size queries, one per requested output
    of ``convolution_backward`` (eager runs a kernel for each), one for anything else."""
    if node.op != "call_function" or node.target in _FREE or is_view_op(node.target):
        return 0
    if not isinstance(node.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return 0  # Python arithmetic on sizes
    if node.target is aten.convolution_backward.default:
        return sum(bool(m) for m in bind(node)["output_mask"])
    return 1


def transposed(node) -> fx.Node | None:
    """``x`` when ``node`` is a 2-D transpose of ``x`` (``t``, ``permute [1, 0]``, ``transpose 0 1``)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    value = val(node)
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        return None
    if node.target is aten.t.default:
        return node.args[0]
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return node.args[0]
    if node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return node.args[0]
    return None


# The activations tritonkit::activation computes, by ATen op, and their backward ops.
ACTIVATION_OPS = {aten.hardtanh.default: "hardtanh", aten.hardswish.default: "hardswish",
                  aten.hardsigmoid.default: "hardsigmoid", aten.silu.default: "silu", aten.sigmoid.default: "sigmoid",
                  aten.gelu.default: "gelu"}
ACTIVATION_BACKWARDS = {aten.hardtanh_backward.default: "hardtanh", aten.hardswish_backward.default: "hardswish",
                        aten.hardsigmoid_backward.default: "hardsigmoid", aten.silu_backward.default: "silu",
                        aten.sigmoid_backward.default: "sigmoid", aten.gelu_backward.default: "gelu"}


def activation_args(kind: str, a: dict) -> tuple:
    """``(kind, min_val, max_val)`` as ``tritonkit::activation`` takes them, from the bound ATen arguments
    (``Fail`` for a GELU ``approximate`` other than "none" and "tanh")."""
    if kind == "hardtanh":
        return kind, float(a["min_val"]), float(a["max_val"])
    if kind == "gelu":
        if a["approximate"] not in ("none", "tanh"):
            raise Fail(f"gelu approximate={a['approximate']!r}")
        return ("gelu" if a["approximate"] == "none" else "gelu_tanh"), -1.0, 1.0
    return kind, -1.0, 1.0


def activation_after(node: fx.Node) -> tuple[fx.Node, tuple] | None:
    """``(activation node, (kind, min_val, max_val))`` when one user of ``node`` is an activation of it
    (``ACTIVATION_OPS``), else None."""
    for user in node.users:
        if user.target in ACTIVATION_OPS and user.args[0] is node:
            try:
                return user, activation_args(ACTIVATION_OPS[user.target], bind(user))
            except Fail:
                return None
    return None


def input_prologue(x) -> tuple:
    """``(source, prologue args)``: for ``x`` a ``tritonkit::batch_norm_apply`` (the joint-graph pass's,
    :mod:`tritonkit.lowering.joint`) its input and ``(input_mean, input_invstd, input_weight, input_bias,
    input_relu)``, so a conv or max-pool loads ``x`` through its input prologue; else ``(x, ())``."""
    if not is_call(x, torch.ops.tritonkit.batch_norm_apply.default):
        return x, ()
    source, mean, invstd, weight, bias, *relu = x.args
    return source, (mean, invstd, weight, bias, bool(relu and relu[0]))


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def sum_with(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(add, other)`` when ``node``'s only use is ``add(node, other)`` (either order, alpha 1) of two
    tensors of one shape and dtype: e.g. the sum of a residual block's two branch gradients."""
    add = only_user(node)
    if not is_call(add, aten.add.Tensor) or bind(add).get("alpha", 1) != 1:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    if other is node or not hasattr(val(other), "shape") or tuple(val(other).shape) != tuple(val(node).shape):
        return None
    return (add, other) if val(other).dtype == val(node).dtype else None


def getitem_users(node: fx.Node) -> dict[int, fx.Node] | None:
    """``{index: getitem node}`` for a multi-output node used only through ``getitem``; None otherwise."""
    users = list(node.users)
    if not all(is_call(u, operator.getitem) for u in users):
        return None
    return {u.args[1]: u for u in users}
