"""``tritonkit::cross_entropy`` and ``tritonkit::cross_entropy_backward`` custom ops.

``cross_entropy(logits, target, weight, reduction, ignore_index, label_smoothing, compute_grad,
write_log_probs=False) -> (loss, lse, total_weight, grad, log_probs)`` is eager ``F.cross_entropy`` on
``[N, C]`` logits with int64 class-index targets ``[N]``: ``reduction`` is aten's enum (0 none, 1 mean,
2 sum), ``label_smoothing`` <= 0 means none (as eager). Outputs:

* ``loss``: ``[N]`` for none, else 0-d; logits' dtype (float32 math throughout);
* ``lse``: float32 ``[N]``, each row's log-sum-exp (saved for the backward);
* ``total_weight``: float32 0-d, the sum of ``weight[target]`` (1 without weight) over non-ignored rows
  (aten's ``total_weight`` for mean and sum; aten reports 0 for none, this op the same sum);
* ``grad``: with ``compute_grad``, the contiguous ``[N, C]`` gradient w.r.t. logits for an upstream
  gradient of 1 (Liger-style, in the forward's pass); otherwise an empty ``(0,)`` tensor;
* ``log_probs``: with ``write_log_probs``, the contiguous ``[N, C]`` ``log_softmax(logits, 1)`` in logits'
  dtype (``(x - max) - log sum exp(x - max)`` in float32, rounded once: eager's ``_log_softmax``), from
  the same launch; otherwise an empty ``(0,)`` tensor. A training graph saves ``_log_softmax(logits)``
  for the backward: with it, ``_log_softmax`` + ``nll_loss_forward`` become this one call, whose loss is
  computed from the logits themselves.

``cross_entropy_backward(grad_output, logits, target, weight, lse, total_weight, reduction, ignore_index,
label_smoothing) -> grad_logits`` recomputes the gradient from ``logits`` and the saved ``lse`` and
scales it by ``grad_output`` (0-d for mean/sum, ``[N]`` for none), divided by ``total_weight`` for mean.

Design (backward by recomputation): ``grad_output`` is known only in the backward graph, so a gradient
made in the forward (``compute_grad``) must still be multiplied by it there, which costs a read and
a write of ``[N, C]`` on top of the forward's extra write; recomputing reads the logits once and
writes the gradient once, the same memory between the passes (logits + ``lse`` instead of the
gradient), and needs no host sync. It also replaces aten's backward nodes without changing what the
forward graph saves: ``nll_loss_backward`` + ``_log_softmax_backward_data`` (and, with label
smoothing, the decomposed smoothing terms between them) become one call with ``logits`` = the saved
``_log_softmax`` output, ``lse=None`` (the kernel recomputes a log-sum-exp, ~0 for log-probabilities,
in one extra read: the softmax of log-probabilities is the softmax of the logits) and aten's
``total_weight``. ``compute_grad`` is for the eager face with a mean/sum loss whose upstream gradient
is known to be 1, where the saved gradient is the answer.

Out-of-range targets: eager raises ``IndexError("Target X is out of bounds.")``. The real impl checks
before launch when the targets are on the CPU (no device-to-host sync); on a GPU it does not check,
and the kernels give such rows a NaN loss and NaN gradient instead of reading out of bounds.

Every other argument is checked in the real and the fake impl, before any launch, with the exception
types eager raises. Differences from eager: logits must be 2-D (the functional face flattens), targets
must be int64 (eager also accepts uint8), and class-probability targets are not supported.
"""

from __future__ import annotations

import torch

from tritonkit.kernels import loss as kernels
from tritonkit.ops.checks import check_float_tensors

_FWD, _BWD = "tritonkit::cross_entropy", "tritonkit::cross_entropy_backward"
_REDUCTIONS = {kernels.REDUCTION_NONE: "none", kernels.REDUCTION_MEAN: "mean", kernels.REDUCTION_SUM: "sum"}


def _check_common(op, logits, target, weight, reduction, label_smoothing):
    check_float_tensors(op, logits=logits, weight=weight)
    if logits.dim() != 2:
        raise RuntimeError(f"{op}: expected 2-D logits (N, C), got shape {tuple(logits.shape)}")
    N, C = logits.shape
    if target.dtype != torch.int64:
        raise RuntimeError(f"{op}: expected target dtype to be Long (int64), but got {target.dtype}")
    if target.device != logits.device:
        raise RuntimeError(f"{op}: target is on {target.device} but logits is on {logits.device}; "
                           "expected one device")
    if target.dim() != 1:
        raise RuntimeError(f"{op}: expected a 1-D target (N,) of class indices, got shape {tuple(target.shape)}; "
                           "multi-target and class probabilities are not supported")
    if target.shape[0] != N:
        raise ValueError(f"{op}: Expected input batch_size ({N}) to match target batch_size ({target.shape[0]}).")
    if weight is not None and tuple(weight.shape) != (C,):
        raise RuntimeError(f"{op}: weight tensor should be defined either for all {C} classes or no classes "
                           f"but got weight tensor of shape: {list(weight.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    if label_smoothing > 1.0:
        raise RuntimeError(f"{op}: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")


def _check_target_values(target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Eager's IndexError for a target outside [0, C) that is not ignore_index; CPU only (no sync)."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")


@torch.library.custom_op(
    _FWD,
    mutates_args=(),
    schema="(Tensor logits, Tensor target, Tensor? weight, int reduction, int ignore_index, float label_smoothing, "
    "bool compute_grad, bool write_log_probs=False) -> (Tensor loss, Tensor lse, Tensor total_weight, Tensor grad, "
    "Tensor log_probs)",
)
def cross_entropy(logits, target, weight, reduction, ignore_index, label_smoothing, compute_grad,
                  write_log_probs=False):
    _check_common(_FWD, logits, target, weight, reduction, label_smoothing)
    _check_target_values(target, logits.shape[1], ignore_index)
    return kernels.cross_entropy_forward(logits, target, weight, reduction, ignore_index, label_smoothing,
                                         compute_grad, write_log_probs)


@cross_entropy.register_fake
def _(logits, target, weight, reduction, ignore_index, label_smoothing, compute_grad, write_log_probs=False):
    _check_common(_FWD, logits, target, weight, reduction, label_smoothing)
    N, C = logits.shape
    loss = logits.new_empty((N,) if reduction == kernels.REDUCTION_NONE else ())
    lse = logits.new_empty((N,), dtype=torch.float32)
    total_weight = logits.new_empty((), dtype=torch.float32)
    grad = logits.new_empty((N, C) if compute_grad else (0,))
    log_probs = logits.new_empty((N, C) if write_log_probs else (0,))
    return loss, lse, total_weight, grad, log_probs


def _check_backward(grad_output, logits, target, weight, lse, total_weight, reduction, label_smoothing):
    op = _BWD
    _check_common(op, logits, target, weight, reduction, label_smoothing)
    check_float_tensors(op, logits=logits, grad_output=grad_output)
    N = logits.shape[0]
    if reduction == kernels.REDUCTION_NONE:
        if tuple(grad_output.shape) != (N,):
            raise RuntimeError(f"{op}: with reduction 'none' expected grad_output of shape ({N},), "
                               f"got {tuple(grad_output.shape)}")
    elif grad_output.dim() > 1 or grad_output.numel() != 1:
        raise RuntimeError(f"{op}: with reduction '{_REDUCTIONS[reduction]}' expected a single element "
                           f"grad_output, got shape {tuple(grad_output.shape)}")
    if lse is not None:
        if lse.dtype != torch.float32 or tuple(lse.shape) != (N,) or lse.device != logits.device:
            raise RuntimeError(f"{op}: expected lse to be float32 of shape ({N},) on {logits.device} (as "
                               f"tritonkit::cross_entropy returns it), got {lse.dtype} {tuple(lse.shape)} "
                               f"on {lse.device}")
    if not total_weight.is_floating_point() or total_weight.numel() != 1 or total_weight.device != logits.device:
        raise RuntimeError(f"{op}: expected total_weight to be a single-element floating tensor on "
                           f"{logits.device}, got {total_weight.dtype} {tuple(total_weight.shape)} "
                           f"on {total_weight.device}")


@torch.library.custom_op(
    _BWD,
    mutates_args=(),
    schema="(Tensor grad_output, Tensor logits, Tensor target, Tensor? weight, Tensor? lse, Tensor total_weight, "
    "int reduction, int ignore_index, float label_smoothing) -> Tensor",
)
def cross_entropy_backward(grad_output, logits, target, weight, lse, total_weight, reduction, ignore_index,
                           label_smoothing):
    _check_backward(grad_output, logits, target, weight, lse, total_weight, reduction, label_smoothing)
    _check_target_values(target, logits.shape[1], ignore_index)
    return kernels.cross_entropy_backward(grad_output, logits, target, weight, lse, total_weight, reduction,
                                          ignore_index, label_smoothing)


@cross_entropy_backward.register_fake
def _(grad_output, logits, target, weight, lse, total_weight, reduction, ignore_index, label_smoothing):
    _check_backward(grad_output, logits, target, weight, lse, total_weight, reduction, label_smoothing)
    return logits.new_empty(logits.shape)


__all__ = ["cross_entropy", "cross_entropy_backward"]
