"""The joint-graph pass: a training BatchNorm's ReLU'd output recomputed where it is read, never stored.

AOTAutograd traces one joint forward+backward graph and a partitioner splits it; the default one saves
for the backward every forward value the backward reads. In ``conv -> BatchNorm -> ReLU -> conv``
that is the normalised activation ``a = relu(bn(y))``, which the second conv's weight gradient and the
ReLU's backward read, so the forward must write ``a`` even when the second conv could normalise ``y``
as it loads it (the ResNet stem's max-pool too). This pass, run on the joint graph before the default partitioner
(:func:`partition`), rewrites ``relu(getitem(bn, 0))`` as ``tritonkit::batch_norm_apply(y, save_mean,
save_invstd, weight, bias, relu=True)`` and tags it (and the ``detach`` views of it) for recomputation,
the tag ``torch.utils.checkpoint``'s selective checkpointing uses. The partitioner then saves ``y`` and the
per-channel statistics, which the BatchNorm backward reads anyway, and copies the apply into the
backward graph. The lowering of each graph folds it into what reads it:

* forward: the consuming conv's or max-pool's input prologue (``conv2d_bn_stats(y, ...,
  input_mean=save_mean, ...)``, ``max_pool2d(y, ..., input_mean=...)``); the BatchNorm itself computes only
  its statistics (``batch_norm_stats_from_partials``);
* backward: the consuming conv's weight gradient recomputes ``a`` from ``y`` as it loads it; its input
  gradient (or the max-pool's) goes on through the ReLU, the mask from the BN output recomputed in the
  epilogue, and computes the BatchNorm backward's two reductions there
  (``conv2d_backward_bn_partials``, ``max_pool2d_backward_bn_partials``), so the BatchNorm backward only
  applies (``batch_norm_backward(..., grad_partials=...)``). Where the gradient has other readers the
  BatchNorm backward takes the mask from its own output, recomputed the same way
  (``mask_from_output=True``).

The pass also points every ReLU backward of the joint graph at the ReLU output itself rather than at
``detach`` views of it (:func:`read_masks_directly`), so the backward graph shows where the mask of a
residual block's ReLU is the next conv's input (``conv2d_backward_residual_bn_partials``).

So a conv + BN + ReLU layer whose consumers are convs or max-pools never writes its normalised
activation. The rewrite is made only where every forward reader of ``a`` is a (non-depthwise)
convolution whose output feeds a training BatchNorm (what ``conv2d_bn_stats`` fuses) or a max-pool, and
the BatchNorm's input is a convolution (whose epilogue gives the statistics). Where a graph's lowering
then cannot fold the apply (a dtype the interpreter cannot run, ``fallback`` leaving a conv in ATen), it
runs as its own tritonkit launch: the values are the same either way.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.utils.checkpoint import CheckpointPolicy

from tritonkit.lowering import depthwise
from tritonkit.lowering.graph import DETACH, aten, is_call, val

TRAIN_BN = aten._native_batch_norm_legit_functional.default
RECOMPUTED = "tritonkit_recomputed"  # meta key of the nodes this pass added (kept by the partitioner's copies)


def _forward(node: fx.Node) -> bool:
    return node.meta.get("partitioner_tag") != "is_backward"


def _convolution_reading(node: fx.Node, value: fx.Node) -> bool:
    """``node`` is a 2-D, not transposed, non-depthwise convolution of ``value`` whose output feeds a
    training BatchNorm."""
    if not is_call(node, aten.convolution.default) or node.args[0] is not value or node.args[6]:
        return False
    if val(value).dim() != 4 or depthwise.is_depthwise(value, node.args[1], node.args[8]):
        return False
    return any(is_call(u, TRAIN_BN) and u.args[0] is node for u in node.users)


def _max_pool_reading(node: fx.Node, value: fx.Node) -> bool:
    return is_call(node, aten.max_pool2d_with_indices.default) and node.args[0] is value


def _candidate(bn: fx.Node):
    """``(relu, save_mean, save_invstd)`` when ``bn``'s output is read only by a ReLU whose forward
    readers are all convolutions that ``conv2d_bn_stats`` fuses with its input prologue or max-pools
    (``max_pool2d``'s prologue; its backward reads only the indices), else None."""
    if not is_call(bn.args[0], aten.convolution.default) or not bn.args[5]:
        return None
    users = list(bn.users)
    if not all(is_call(u, operator.getitem) for u in users):
        return None
    outs = {u.args[1]: u for u in users}
    if not {0, 1, 2} <= set(outs) or len(outs[0].users) != 1:
        return None
    relu = next(iter(outs[0].users))
    if not is_call(relu, aten.relu.default) or not _forward(relu):
        return None
    readers = [u for u in relu.users if _forward(u) and not is_call(u, *DETACH)]
    if not readers or not all(_convolution_reading(u, relu) or _max_pool_reading(u, relu) for u in readers):
        return None
    return relu, outs[1], outs[2]


def recompute_batch_norm_outputs(joint: fx.GraphModule) -> int:
    """Rewrite every candidate ``relu(bn(y))`` of the joint graph ``joint`` as a recomputed
    ``tritonkit::batch_norm_apply`` (module doc); returns how many."""
    import tritonkit.ops  # noqa: F401  (registers torch.ops.tritonkit.*)

    graph, count = joint.graph, 0
    for bn in list(graph.nodes):
        if not is_call(bn, TRAIN_BN):
            continue
        found = _candidate(bn)
        if found is None:
            continue
        relu, mean, invstd = found
        x, weight, bias = bn.args[:3]
        args = (x, mean, invstd, weight, bias, True)
        with graph.inserting_before(relu):
            apply = graph.call_function(torch.ops.tritonkit.batch_norm_apply.default, args)
        apply.meta.update(relu.meta)
        fake = [val(a) for a in args if isinstance(a, fx.Node)]
        with detect_fake_mode(fake):
            apply.meta["val"] = torch.ops.tritonkit.batch_norm_apply.default(*(val(a) for a in args))
        relu.replace_all_uses_with(apply)
        out = relu.args[0]
        graph.erase_node(relu)
        graph.erase_node(out)
        _tag(apply)
        count += 1
    if count:
        graph.lint()
        joint.recompile()
    return count


def _tag(node: fx.Node) -> None:
    """Mark ``node`` and the forward ``detach`` views of it for recomputation in the backward."""
    node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    node.meta[RECOMPUTED] = True
    for user in node.users:
        if is_call(user, *DETACH) and _forward(user):
            _tag(user)


def _recomputation_allowed(graph: fx.Graph) -> bool:
    """The default partitioner refuses recomputation tags in a graph with an impure op (a mutation, a
    collective other than ``wait_tensor``): such graphs are partitioned as they are."""
    wait = getattr(getattr(torch.ops, "_c10d_functional", None), "wait_tensor", None)
    for node in graph.nodes:
        if node.op in ("placeholder", "output") or (wait is not None and node.target is wait.default):
            continue
        try:
            impure = node.is_impure(impure_random=False)
        except TypeError:  # torch without the argument: random ops count as impure there
            impure = node.is_impure()
        if impure:
            return False
    return True


def read_masks_directly(joint: fx.GraphModule) -> int:
    """Point every ``threshold_backward(g, detach(...detach(y)), t)`` of the joint graph at ``y`` itself
    (``detach`` is the identity on values there); returns how many. The partitioner then saves ``y`` once
    instead of ``y`` and its ``detach`` as two backward inputs, so the backward graph shows where the ReLU
    output a gradient goes through is also a conv's input (a residual block's output:
    ``conv2d_backward_residual_bn_partials``)."""
    graph, count = joint.graph, 0
    for node in list(graph.nodes):
        if not is_call(node, aten.threshold_backward.default) or not is_call(node.args[1], *DETACH):
            continue
        views, root = [], node.args[1]
        while is_call(root, *DETACH):
            views.append(root)
            root = root.args[0]
        node.update_arg(1, root)
        for view in views:
            if not view.users:
                graph.erase_node(view)
        count += 1
    if count:
        graph.lint()
        joint.recompile()
    return count


def partition(joint: fx.GraphModule, joint_inputs, **kwargs):
    """AOTAutograd's ``partition_fn``: :func:`recompute_batch_norm_outputs` (where the graph allows
    recomputation) and :func:`read_masks_directly`, then the default partitioner."""
    from torch._functorch.partitioners import default_partition

    if _recomputation_allowed(joint.graph):
        recompute_batch_norm_outputs(joint)
    read_masks_directly(joint)
    return default_partition(joint, joint_inputs, **kwargs)


__all__ = ["RECOMPUTED", "partition", "read_masks_directly", "recompute_batch_norm_outputs"]
