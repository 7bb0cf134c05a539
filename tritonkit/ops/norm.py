"""BatchNorm2d custom ops: ``tritonkit::batch_norm_stats``, ``batch_norm_train``,
``batch_norm_train_from_partials``, ``batch_norm_stats_from_partials``, ``batch_norm_apply``,
``batch_norm_eval``, ``batch_norm_backward``.

* ``batch_norm_stats(input, eps) -> (mean, invstd)``: per-channel float32 statistics of 4-D
  ``input`` (any float dtype), ``invstd = 1 / sqrt(biased_var + eps)``; deterministic (no atomics).
* ``batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
  residual=None, relu=False, activation="none", min_val=0., max_val=6.) -> (out, save_mean, save_invstd,
  running_mean_out, running_var_out, num_batches_tracked_out, pre)``: eager's
  ``aten._native_batch_norm_legit_functional(..., training=True, ...)`` (and nn.BatchNorm2d's counter
  increment), with ``residual`` / ``relu`` the ResNet block end ``relu(bn(x) + residual)`` in one pass.
  ``activation`` (one of ``tritonkit.ops.checks.EPILOGUE_ACTIVATIONS``: ``tritonkit::activation``'s kinds;
  hardtanh's bounds ``min_val``/``max_val``, ReLU6 is hardtanh(0, 6)) is applied instead of ``relu`` (both: ValueError);
  ``pre`` is the value before it (``bn(x) [+ residual]``, rounded to the input's dtype) for the kinds whose
  backward reads their input (``kernels.norm.SAVES_INPUT``), None otherwise: eager's BN output and
  activation output from one pass. The running outputs are new tensors (``(1 - momentum) * old +
  momentum * batch``, unbiased variance), None when the running stats are None
  (``track_running_stats=False``). ``num_batches_tracked`` (None, or int64 with one element: 0-d as
  nn.BatchNorm2d holds it, or shape [1]) gives ``num_batches_tracked_out = num_batches_tracked + 1``, a
  new tensor of its shape (the input is not mutated), written by the statistics' finalize launch (no
  launch of its own); without it that output is None. ``momentum=None`` is nn.BatchNorm2d's cumulative
  moving average, the factor ``1 / num_batches_tracked_out`` computed on the device (so it needs
  ``num_batches_tracked`` when there are running stats; TypeError otherwise, as ``F.batch_norm`` raises
  for a None momentum). ``save_*`` are float32 on a GPU and in the input's dtype on the CPU, as eager
  returns them on each device.
* ``batch_norm_train_from_partials(input, partials, weight, bias, running_mean, running_var,
  num_batches_tracked, momentum, eps, residual=None, relu=False)``: ``batch_norm_train``, same
  outputs, with ``input`` a conv output and ``partials`` its float32 tiles ``[T, 3, C]`` = (count, mean,
  M2) per 64 output pixels from ``tritonkit::conv2d_bn_stats`` (``T = ceil(N*H*W / 64)``, the
  ``kernels.conv.BN_STAT_ROWS`` of ``bn_stat_tiles``): no statistics pass over ``input``; the tiles are
  combined with Chan's formula in a fixed order (bit-identical reruns; kernels.norm explains the
  two-level tree for large T). RuntimeError before any launch for partials of another shape, dtype or
  device.
* ``batch_norm_stats_from_partials(input, partials, running_mean, running_var, num_batches_tracked, momentum,
  eps) -> (save_mean, save_invstd, running_mean_out, running_var_out, num_batches_tracked_out)``: the
  statistics of ``batch_norm_train_from_partials`` (one finalize launch; ``input``, the conv output, is not
  read) for a BatchNorm whose output is never stored: its consumers apply it as they load ``input`` (a conv's
  input prologue, ``tritonkit::conv2d_bn_stats``'s ``input_mean``...), or ``batch_norm_apply`` does.
* ``batch_norm_apply(input, mean, invstd, weight, bias, relu=False) -> out``: ``relu((input - mean[c]) *
  invstd[c] * weight[c] + bias[c])`` (weight, bias optional), a training BatchNorm's output from given
  statistics, in float32 as the conv input prologue computes it (bit for bit: a recomputed activation is
  the stored one). The lowering writes it into the joint graph so the partitioner recomputes the
  normalised activation in the backward instead of saving it.
* ``batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual=None, relu=False,
  activation="none", min_val=0., max_val=6.) -> out``: ``act((x - running_mean) / sqrt(running_var + eps) *
  weight + bias [+ residual])``, ``act`` ReLU or ``activation`` as in ``batch_norm_train``.
* ``batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd,
  train, eps, output_mask, relu_output=None, activation="relu") -> (grad_input?, grad_weight?, grad_bias?)``:
  ``aten.native_batch_norm_backward``; each output is None unless ``output_mask`` asks for it. With
  ``relu_output`` ``grad_out`` is first masked inside the kernels (reduction and apply alike), by
  ``activation``: ``"relu"``, ``relu_output`` the forward's ``relu=True`` output (or ``relu(bn(x))``):
  ``threshold_backward(grad_out, relu_output, 0)``, grad where ``relu_output > 0``; ``"relu6"``
  (MobileNetV2's ``hardtanh(bn(x), 0, 6)``), ``relu_output`` the BN *output*, the hardtanh's input:
  ``hardtanh_backward(grad_out, relu_output, 0, 6)``, grad where ``0 < relu_output < 6`` (0 at exactly 0
  and 6). A NaN ``relu_output`` passes its gradient under both, as aten's CUDA kernels and torch._decomp
  do (aten's vectorized CPU hardtanh_backward drops it, its scalar loop passes it). ``"hardswish"``,
  ``"hardsigmoid"``, ``"silu"``, ``"gelu"``, ``"gelu_tanh"``: ``relu_output`` the BN output (the
  activation's input), ``"sigmoid"``: the sigmoid's output; ``grad_out`` goes through that activation's
  backward first, as ``activation_backward(grad_out, relu_output, kind)`` computes it. Without
  ``relu_output`` ``activation`` is unused (still checked: another value is a ValueError). A residual
  branch's gradient is that masked gradient itself: a caller that needs it computes ``relu_backward``
  once and passes it here with ``relu_output=None``. ``mask_from_output=True`` (training, any activation
  but sigmoid, no ``relu_output``): the activation's input is this BatchNorm's own output, recomputed from
  ``input``, ``save_mean``, ``save_invstd``, ``weight`` and ``output_bias`` (None: 0) as ``batch_norm_apply``
  computes it, for a forward that never stored it. ``grad_partials`` (training, no mask): float32 ``[T, 2,
  C]`` whose sums over T are the backward's two reductions of ``grad_out`` (sum ``grad_out`` and sum
  ``grad_out * (input - save_mean)``), computed by the kernel that produced ``grad_out``
  (``conv2d_backward_bn_partials``), so only the apply pass reads the activations.

``out`` and ``grad_input`` take the input's memory format (``suggest_memory_format``: channels_last in,
channels_last out; otherwise contiguous), as eager's CPU and cuDNN kernels allocate them. Every tensor
argument is on the input's device; the activations (input, residual, grad_out, relu_output) share its dtype,
the per-channel parameters (weight, bias, running statistics) are all of it or all float32 (eager's
mixed-type BatchNorm, as under autocast: the running outputs and the parameter gradients then float32
too), ``save_*`` float32 or the input's dtype.
Arguments are checked before any launch (real and fake impl) with eager's exception types and messages:
``F.batch_norm``'s RuntimeError for vectors of the wrong length and ValueError for one value per channel
when training, ``nn.BatchNorm2d``'s ValueError for a non-4-D input, aten's RuntimeError for an empty one.
"""

from __future__ import annotations

import torch

from tritonkit.kernels import norm as kernels
from tritonkit.kernels.conv import bn_stat_tiles
from tritonkit.kernels.pool import output_memory_format
from tritonkit.ops.checks import check_float_tensors, epilogue_activation

_STATS, _TRAIN, _EVAL, _BWD = ("tritonkit::batch_norm_stats", "tritonkit::batch_norm_train",
                               "tritonkit::batch_norm_eval", "tritonkit::batch_norm_backward")
_PARTIALS = "tritonkit::batch_norm_train_from_partials"
_ACT_ARGS = 'str activation="none", float min_val=0., float max_val=6.'
_TRAIN_ARGS = ("Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, Tensor? num_batches_tracked, "
               f"float? momentum, float eps, Tensor? residual=None, bool relu=False, {_ACT_ARGS}) "
               "-> (Tensor, Tensor, Tensor, Tensor?, Tensor?, Tensor?, Tensor?)")


def _check_input(op: str, input: torch.Tensor) -> int:
    """4-D, non-empty; returns C."""
    if input.dim() != 4:
        raise ValueError(f"{op}: expected 4D input (got {input.dim()}D input)")
    if input.numel() == 0:
        raise RuntimeError(f"{op}: input tensor must have at least one element, but got input_sizes = "
                           f"{list(input.shape)}")
    return input.shape[1]


def _check_vectors(op: str, C: int, **vectors: torch.Tensor | None) -> None:
    for name, t in vectors.items():
        if t is not None and t.numel() != C:
            raise RuntimeError(f"{op}: {name} should contain {C} elements not {t.numel()}")


def _check_params(op: str, input: torch.Tensor, **params: torch.Tensor | None) -> None:
    """Per-channel parameters (weight, bias, running statistics) on the input's device, all of the input's
    dtype or all float32 (eager's mixed-type BatchNorm: a half input under autocast keeps float32 ones)."""
    given = {name: t for name, t in params.items() if t is not None}
    for name, t in given.items():
        if t.device != input.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but input is on {input.device}; expected one device")
    dtypes = {t.dtype for t in given.values()}
    if dtypes and (len(dtypes) > 1 or dtypes.pop() not in (input.dtype, torch.float32)):
        listed = ", ".join(f"{name} {t.dtype}" for name, t in given.items())
        raise RuntimeError(f"{op}: expected the parameters to be all of the input's dtype {input.dtype} or all "
                           f"float32, got {listed}")


def _check_running(op: str, running_mean, running_var) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must either both be None or neither be None")


def _check_same_shape(op: str, name: str, t: torch.Tensor | None, input: torch.Tensor) -> None:
    if t is not None and t.shape != input.shape:
        raise RuntimeError(f"{op}: {name} shape {tuple(t.shape)} must match input shape {tuple(input.shape)}")


def _check_training_size(op: str, input: torch.Tensor) -> None:
    if input.numel() // input.shape[1] == 1:
        raise ValueError(f"{op}: Expected more than 1 value per channel when training, got input size "
                         f"{input.shape}")


def _out_like(input: torch.Tensor) -> torch.Tensor:
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=output_memory_format(input))


# --- batch_norm_stats ---------------------------------------------------------------------------------------


def _check_stats(input):
    check_float_tensors(_STATS, input=input)
    return _check_input(_STATS, input)


@torch.library.custom_op(_STATS, mutates_args=(), schema="(Tensor input, float eps) -> (Tensor, Tensor)")
def batch_norm_stats(input: torch.Tensor, eps: float):
    _check_stats(input)
    return kernels.batch_norm_stats(input, eps)


@batch_norm_stats.register_fake
def _(input, eps):
    C = _check_stats(input)
    return input.new_empty((C,), dtype=torch.float32), input.new_empty((C,), dtype=torch.float32)


# --- batch_norm_train ---------------------------------------------------------------------------------------


def _activation(op, relu, activation, min_val, max_val):
    """The kernels' ``activation`` argument beside their ``relu``: None or ``(kind, min_val, max_val)``."""
    act = epilogue_activation(op, relu, activation, min_val, max_val)
    return None if relu else act


def _check_forward(op, input, weight, bias, running_mean, running_var, residual, training):
    check_float_tensors(op, input=input, residual=residual)
    _check_params(op, input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    C = _check_input(op, input)
    _check_running(op, running_mean, running_var)
    _check_vectors(op, C, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    _check_same_shape(op, "residual", residual, input)
    if training:
        _check_training_size(op, input)
    return C


def _check_counter(op, input, running_mean, num_batches_tracked, momentum) -> None:
    """num_batches_tracked: one int64 element on the input's device; momentum=None needs it (with running
    stats)."""
    t = num_batches_tracked
    if t is not None:
        if t.dtype != torch.int64:
            raise RuntimeError(f"{op}: num_batches_tracked must be int64 (torch.long), got {t.dtype}")
        if t.numel() != 1:
            raise RuntimeError(f"{op}: num_batches_tracked must have one element, got shape {tuple(t.shape)}")
        if t.device != input.device:
            raise RuntimeError(f"{op}: num_batches_tracked is on {t.device} but input is on {input.device}; "
                               "expected one device")
    if momentum is None and running_mean is not None and t is None:
        raise TypeError(f"{op}: momentum=None (cumulative moving average) needs num_batches_tracked")


def _train_outputs(input, C, running_mean, running_var, num_batches_tracked, activation):
    """Fake outputs of the training ops: (out, save_mean, save_invstd, rm_out?, rv_out?, nbt_out?, pre?)."""
    save_dtype = kernels.save_stats_dtype(input)
    running = [None if t is None else t.new_empty((C,)) for t in (running_mean, running_var)]
    counter = None if num_batches_tracked is None else torch.empty_like(num_batches_tracked)
    pre = _out_like(input) if activation is not None and activation[0] in kernels.SAVES_INPUT else None
    return (_out_like(input), input.new_empty((C,), dtype=save_dtype), input.new_empty((C,), dtype=save_dtype),
            *running, counter, pre)


def _check_train(input, weight, bias, running_mean, running_var, momentum, residual, num_batches_tracked,
                 op=_TRAIN):
    C = _check_forward(op, input, weight, bias, running_mean, running_var, residual, True)
    _check_counter(op, input, running_mean, num_batches_tracked, momentum)
    return C


@torch.library.custom_op(_TRAIN, mutates_args=(), schema="(Tensor input, " + _TRAIN_ARGS)
def batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                     residual=None, relu=False, activation="none", min_val=0.0, max_val=6.0):
    act = _activation(_TRAIN, relu, activation, min_val, max_val)
    _check_train(input, weight, bias, running_mean, running_var, momentum, residual, num_batches_tracked)
    return kernels.batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                    eps, residual, relu, activation=act)


@batch_norm_train.register_fake
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, residual=None,
      relu=False, activation="none", min_val=0.0, max_val=6.0):
    act = _activation(_TRAIN, relu, activation, min_val, max_val)
    C = _check_train(input, weight, bias, running_mean, running_var, momentum, residual, num_batches_tracked)
    return _train_outputs(input, C, running_mean, running_var, num_batches_tracked, act)


# --- batch_norm_train_from_partials ---------------------------------------------------------------------------


def _check_from_partials(input, partials, weight, bias, running_mean, running_var, momentum, residual,
                         num_batches_tracked, op=_PARTIALS):
    C = _check_train(input, weight, bias, running_mean, running_var, momentum, residual, num_batches_tracked, op)
    if partials.dtype != torch.float32:
        raise RuntimeError(f"{op}: partials must be float32 (conv2d_bn_stats' tiles), got {partials.dtype}")
    if partials.device != input.device:
        raise RuntimeError(f"{op}: partials is on {partials.device} but input is on {input.device}; expected one "
                           "device")
    N, _, H, W = input.shape
    expected = (bn_stat_tiles(N * H * W), 3, C)
    if tuple(partials.shape) != expected:
        raise RuntimeError(f"{op}: partials shape {tuple(partials.shape)} must be [ceil(N*H*W / 64), 3, C] = "
                           f"{list(expected)} for input shape {tuple(input.shape)}")
    return C


@torch.library.custom_op(_PARTIALS, mutates_args=(), schema="(Tensor input, Tensor partials, " + _TRAIN_ARGS)
def batch_norm_train_from_partials(input, partials, weight, bias, running_mean, running_var, num_batches_tracked,
                                   momentum, eps, residual=None, relu=False, activation="none", min_val=0.0,
                                   max_val=6.0):
    act = _activation(_PARTIALS, relu, activation, min_val, max_val)
    _check_from_partials(input, partials, weight, bias, running_mean, running_var, momentum, residual,
                         num_batches_tracked)
    return kernels.batch_norm_train_from_partials(input, partials, weight, bias, running_mean, running_var,
                                                  num_batches_tracked, momentum, eps, residual, relu, activation=act)


@batch_norm_train_from_partials.register_fake
def _(input, partials, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, residual=None,
      relu=False, activation="none", min_val=0.0, max_val=6.0):
    act = _activation(_PARTIALS, relu, activation, min_val, max_val)
    C = _check_from_partials(input, partials, weight, bias, running_mean, running_var, momentum, residual,
                             num_batches_tracked)
    return _train_outputs(input, C, running_mean, running_var, num_batches_tracked, act)


_STATS_PARTIALS, _APPLY = "tritonkit::batch_norm_stats_from_partials", "tritonkit::batch_norm_apply"


@torch.library.custom_op(
    _STATS_PARTIALS, mutates_args=(),
    schema="(Tensor input, Tensor partials, Tensor? running_mean, Tensor? running_var, Tensor? num_batches_tracked, "
           "float? momentum, float eps) -> (Tensor, Tensor, Tensor?, Tensor?, Tensor?)")
def batch_norm_stats_from_partials(input, partials, running_mean, running_var, num_batches_tracked, momentum, eps):
    _check_from_partials(input, partials, None, None, running_mean, running_var, momentum, None, num_batches_tracked,
                         _STATS_PARTIALS)
    return kernels.batch_norm_stats_from_partials(input, partials, running_mean, running_var, num_batches_tracked,
                                                  momentum, eps)


@batch_norm_stats_from_partials.register_fake
def _(input, partials, running_mean, running_var, num_batches_tracked, momentum, eps):
    C = _check_from_partials(input, partials, None, None, running_mean, running_var, momentum, None,
                             num_batches_tracked, _STATS_PARTIALS)
    return _train_outputs(input, C, running_mean, running_var, num_batches_tracked, None)[1:6]


# --- batch_norm_apply -------------------------------------------------------------------------------------------


def _check_apply(input, mean, invstd, weight, bias):
    check_float_tensors(_APPLY, input=input)
    _check_params(_APPLY, input, weight=weight, bias=bias)
    C = _check_input(_APPLY, input)
    for name, t in (("mean", mean), ("invstd", invstd)):
        if t.dtype not in (torch.float32, input.dtype):
            raise RuntimeError(f"{_APPLY}: {name} must be float32 or the input's dtype {input.dtype}, got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"{_APPLY}: {name} is on {t.device} but input is on {input.device}; expected one "
                               "device")
    _check_vectors(_APPLY, C, mean=mean, invstd=invstd, weight=weight, bias=bias)


@torch.library.custom_op(
    _APPLY, mutates_args=(),
    schema="(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, bool relu=False) -> Tensor")
def batch_norm_apply(input, mean, invstd, weight, bias, relu=False):
    _check_apply(input, mean, invstd, weight, bias)
    return kernels.batch_norm_apply(input, mean, invstd, weight, bias, relu)


@batch_norm_apply.register_fake
def _(input, mean, invstd, weight, bias, relu=False):
    _check_apply(input, mean, invstd, weight, bias)
    return _out_like(input)


# --- batch_norm_eval ----------------------------------------------------------------------------------------


@torch.library.custom_op(
    _EVAL,
    mutates_args=(),
    schema="(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps, "
           f"Tensor? residual=None, bool relu=False, {_ACT_ARGS}) -> Tensor",
)
def batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual=None, relu=False, activation="none",
                    min_val=0.0, max_val=6.0):
    act = _activation(_EVAL, relu, activation, min_val, max_val)
    _check_forward(_EVAL, input, weight, bias, running_mean, running_var, residual, False)
    return kernels.batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual, relu, activation=act)


@batch_norm_eval.register_fake
def _(input, weight, bias, running_mean, running_var, eps, residual=None, relu=False, activation="none", min_val=0.0,
      max_val=6.0):
    _activation(_EVAL, relu, activation, min_val, max_val)
    _check_forward(_EVAL, input, weight, bias, running_mean, running_var, residual, False)
    return _out_like(input)


# --- batch_norm_backward ------------------------------------------------------------------------------------


def _check_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train,
                    output_mask, relu_output, activation, output_bias, mask_from_output, grad_partials):
    op = _BWD
    if activation not in kernels.ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(map(repr, kernels.ACTIVATIONS))}, got "
                         f"{activation!r}")
    if mask_from_output and (relu_output is not None or not train or activation == "sigmoid"):
        raise RuntimeError(f"{op}: mask_from_output recomputes the activation's input, the training BatchNorm's "
                           f"output: it takes no relu_output, train=True and an activation other than sigmoid "
                           f"(got relu_output {'given' if relu_output is not None else 'None'}, train={train}, "
                           f"activation={activation!r})")
    if output_bias is not None and not mask_from_output:
        raise RuntimeError(f"{op}: output_bias is read only with mask_from_output=True")
    check_float_tensors(op, input=input, grad_out=grad_out, relu_output=relu_output)
    _check_params(op, input, weight=weight, bias=output_bias, running_mean=running_mean, running_var=running_var)
    C = _check_input(op, input)
    _check_same_shape(op, "grad_out", grad_out, input)
    _check_same_shape(op, "relu_output", relu_output, input)
    if len(output_mask) != 3:
        raise RuntimeError(f"{op}: output_mask must have 3 entries, got {list(output_mask)}")
    for name, t in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if t is None:
            continue
        if t.dtype not in (torch.float32, input.dtype):
            raise RuntimeError(f"{op}: {name} must be float32 or the input's dtype {input.dtype}, got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but input is on {input.device}; expected one device")
    if train and (save_mean is None or save_invstd is None):
        raise RuntimeError(f"{op}: save_mean and save_invstd must be given when train=True")
    if not train and (running_mean is None or running_var is None):
        raise RuntimeError(f"{op}: running_mean and running_var must be given when train=False")
    _check_vectors(op, C, weight=weight, output_bias=output_bias, running_mean=running_mean,
                   running_var=running_var, save_mean=save_mean, save_invstd=save_invstd)
    if grad_partials is not None:
        if not train or relu_output is not None or mask_from_output:
            raise RuntimeError(f"{op}: grad_partials are the reductions of a grad_out already through its "
                               f"activation: they take train=True, no relu_output and mask_from_output=False")
        if (grad_partials.dim() != 3 or grad_partials.shape[0] < 1 or tuple(grad_partials.shape[1:]) != (2, C)
                or grad_partials.dtype != torch.float32 or grad_partials.device != input.device):
            raise RuntimeError(f"{op}: grad_partials must be a float32 tensor of shape [T, 2, {C}] (T >= 1) on "
                               f"{input.device}, got {grad_partials.dtype} of shape {list(grad_partials.shape)} "
                               f"on {grad_partials.device}")
    return C


@torch.library.custom_op(
    _BWD,
    mutates_args=(),
    schema="(Tensor grad_out, Tensor input, Tensor? weight, Tensor? running_mean, Tensor? running_var, "
           "Tensor? save_mean, Tensor? save_invstd, bool train, float eps, bool[3] output_mask, "
           "Tensor? relu_output=None, str activation=\"relu\", Tensor? output_bias=None, "
           "bool mask_from_output=False, Tensor? grad_partials=None) -> (Tensor?, Tensor?, Tensor?)",
)
def batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps,
                        output_mask, relu_output=None, activation="relu", output_bias=None, mask_from_output=False,
                        grad_partials=None):
    _check_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train,
                    output_mask, relu_output, activation, output_bias, mask_from_output, grad_partials)
    return kernels.batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd,
                                       train, eps, output_mask, relu_output, activation=activation,
                                       output_bias=output_bias, mask_from_output=mask_from_output,
                                       grad_partials=grad_partials)


@batch_norm_backward.register_fake
def _(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps, output_mask,
      relu_output=None, activation="relu", output_bias=None, mask_from_output=False, grad_partials=None):
    C = _check_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train,
                        output_mask, relu_output, activation, output_bias, mask_from_output, grad_partials)
    want_dx, want_gw, want_gb = output_mask
    param_dtype = weight.dtype if weight is not None else input.dtype
    return (_out_like(input) if want_dx else None,
            input.new_empty((C,), dtype=param_dtype) if want_gw else None,
            input.new_empty((C,), dtype=param_dtype) if want_gb else None)


__all__ = ["batch_norm_apply", "batch_norm_backward", "batch_norm_eval", "batch_norm_stats",
           "batch_norm_stats_from_partials", "batch_norm_train", "batch_norm_train_from_partials"]
