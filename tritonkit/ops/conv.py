"""``torch.ops.tritonkit.conv2d`` and its gradient ops (input; weight; weight and bias in one launch:
``conv2d_weight_bias_grad``; all three in one launch: ``conv2d_backward``), over
``tritonkit.kernels.conv``, and the fused forward ops for BatchNorm networks (no autograd: inference,
or building blocks for a lowering):

* ``conv2d_batch_norm(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual,
  stride, padding, dilation, groups, relu, activation="none", min_val=0., max_val=6.) -> Tensor``: conv ->
  eval-mode BatchNorm (-> + residual) (-> activation) in one kernel, the BatchNorm computed in the
  epilogue from its parameters, per output channel oc, in float32 and rounded once:
  ``act(((conv2d(input, weight) + bias[oc]) - running_mean[oc]) * (bn_weight[oc] / sqrt(running_var[oc] + eps))
  + bn_bias[oc] (+ residual))``, centred first like eager's eval BatchNorm. ``bias``, ``bn_weight``,
  ``bn_bias`` (affine=False: 1 and 0) and ``residual`` (any layout, the output's shape and dtype)
  optional.
* ``conv2d_bn_stats(input, weight, bias, stride, padding, dilation, groups, input_mean=None,
  input_invstd=None, input_weight=None, input_bias=None, input_relu=False) -> (out, partials)``:
  ``out = conv2d(x', weight) + bias`` and the float32 BatchNorm partial statistics of ``out`` (computed
  from the float32 accumulator, before rounding to out's dtype), ``partials`` of shape ``[T, 3, OC]``,
  ``T = ceil(N*OH*OW / 64)`` (``kernels.conv.BN_STAT_ROWS`` output pixels per tile, in (n, oh, ow) order): for tile t
  and channel c, ``partials[t, 0, c]`` = the number of output pixels in the tile (64, fewer in the last),
  ``partials[t, 1, c]`` = their mean, ``partials[t, 2, c]`` = M2, the sum of squared deviations from
  that tile mean. Combining the tiles with Chan's formula gives the batch mean and biased variance.
* ``conv2d_backward_bn_partials`` and ``conv2d_backward_residual_bn_partials``: ``conv2d_backward`` whose
  input gradient starts a training BatchNorm's backward, through the input prologue's ReLU or through the
  ReLU whose output is the conv's input (a residual block's end), with that backward's two reductions as
  float32 partials (their docstrings).
* ``conv2d_relu_maxpool(..., bn_weight=None, bn_bias=None, running_mean=None, running_var=None,
  eps=1e-5)``: the fused inference conv + ReLU + max-pool, with the same eval-mode BatchNorm of
  ``conv + bias`` before the ReLU when ``running_mean``/``running_var`` are given (together): the
  ResNet stem's conv -> BN -> ReLU -> max-pool in one launch.

``conv2d`` and ``conv2d_batch_norm`` apply ReLU when ``relu``, else ``activation`` (one of
``tritonkit.ops.checks.EPILOGUE_ACTIVATIONS``, the kinds of ``tritonkit::activation``; hardtanh with
``min_val``/``max_val``, ReLU6 = hardtanh(0, 6)) to the float32 result before its one rounding, exactly
as ``tritonkit::activation`` computes it (an unknown kind, or both: ValueError).

``x'`` is the input, or with ``input_mean``/``input_invstd`` (per input channel, given together; with
``input_weight``/``input_bias``, each optional: 1 and 0) the input as the kernel loads it, a training
BatchNorm's apply ``(x - input_mean[c]) * input_invstd[c] * input_weight[c] + input_bias[c]`` computed as
``tritonkit::batch_norm_apply`` computes it, ReLU'd when ``input_relu``, with the zero padding applied
after that transform (a padding tap contributes 0), so a previous layer's normalised activation never
reaches memory. The gradient ops ``conv2d_backward``, ``conv2d_weight_grad`` and
``conv2d_weight_bias_grad`` take the same five arguments: their ``input`` is then the untransformed
tensor, ``x'`` is recomputed as the weight gradient loads it, and ``grad_input`` is the gradient with
respect to ``x'`` (what the conv read). Per-channel vectors (BatchNorm parameters and running statistics
too) are 1-D, float32 or the input's dtype; they are checked before any launch, raising what eager's
``F.batch_norm`` raises for the same mistake (RuntimeError).

Checks mirror aten's ``conv2d`` checks and exception types; the fake implementations compute the
same shapes and memory formats as the kernels' launchers, so tracing sees what running produces.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tritonkit.kernels import conv as kernels
from tritonkit.ops import pool as pool_ops
from tritonkit.ops.checks import (
    check_channel_vectors,
    check_float_tensors,
    check_given_together,
    check_input_prologue,
    check_pair,
    epilogue_activation,
)

Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def check_conv_args(op, input_size, weight_size, bias, stride, padding, dilation, groups) -> Geometry:
    stride, padding, dilation = (check_pair(op, n, v) for n, v in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    if len(input_size) != 4:
        raise RuntimeError(f"{op}: expected 4-D input (N, C, H, W), but got input of size {list(input_size)}")
    weight_size = tuple(weight_size)
    if len(weight_size) != 4:
        raise RuntimeError(
            f"{op}: expected 4-D weight (OC, C/groups, KH, KW), but got weight of size {list(weight_size)}")
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"{op}: non-positive stride is not supported (stride={list(stride)})")
    if any(p < 0 for p in padding):
        raise RuntimeError(f"{op}: negative padding is not supported (padding={list(padding)})")
    if any(d <= 0 for d in dilation):
        raise RuntimeError(f"{op}: dilation should be greater than zero (dilation={list(dilation)})")
    if groups <= 0:
        raise RuntimeError(f"{op}: non-positive groups is not supported (groups={groups})")
    oc, cg, kh, kw = weight_size
    if oc % groups != 0:
        raise RuntimeError(f"{op}: given groups={groups}, expected weight to be divisible by {groups} at "
                           f"dimension 0, but got weight of size {list(weight_size)}")
    if input_size[1] != cg * groups:
        raise RuntimeError(f"{op}: given groups={groups}, weight of size {list(weight_size)}, expected input "
                           f"{list(input_size)} to have {cg * groups} channels, but got {input_size[1]} channels")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != oc):
        raise RuntimeError(f"{op}: given weight of size {list(weight_size)}, expected bias to be 1-D with {oc} "
                           f"elements, but got bias of size {list(bias.shape)}")
    for size, k, p, d in zip(input_size[2:], (kh, kw), padding, dilation):
        if size + 2 * p < d * (k - 1) + 1:
            raise RuntimeError(
                f"{op}: calculated padded input size per channel: ({input_size[2] + 2 * padding[0]} x "
                f"{input_size[3] + 2 * padding[1]}). Kernel size: ({dilation[0] * (kh - 1) + 1} x "
                f"{dilation[1] * (kw - 1) + 1}). Kernel size can't be greater than actual input size"
            )
    return stride, padding, dilation


def _output_shape(input_size, weight_shape, stride, padding, dilation):
    n, _, h, w = input_size
    oc, _, kh, kw = weight_shape
    return (n, oc, kernels.output_size(h, kh, stride[0], padding[0], dilation[0]),
            kernels.output_size(w, kw, stride[1], padding[1], dilation[1]))


def conv_allows_tf32() -> bool:
    return bool(torch.backends.cudnn.allow_tf32)


# ----------------------------------------------------------------------------------------- forward
@torch.library.custom_op("tritonkit::conv2d", mutates_args=())
def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int, relu: bool, activation: str = "none",
           min_val: float = 0.0, max_val: float = 6.0) -> torch.Tensor:
    """``act(conv2d(input, weight) + bias)`` with ``act`` = ReLU when ``relu``, else ``activation``
    (module doc); 4-D input, any strides."""
    act = epilogue_activation("tritonkit.conv2d", relu, activation, min_val, max_val)
    check_float_tensors("tritonkit.conv2d", input=input, weight=weight, bias=bias)
    geometry = check_conv_args("tritonkit.conv2d", input.shape, weight.shape, bias, stride, padding, dilation, groups)
    return kernels.conv2d(input, weight, bias, *geometry, groups, activation=act, allow_tf32=conv_allows_tf32())


@conv2d.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, relu, activation="none", min_val=0.0, max_val=6.0):
    epilogue_activation("tritonkit.conv2d", relu, activation, min_val, max_val)
    check_float_tensors("tritonkit.conv2d", input=input, weight=weight, bias=bias)
    geometry = check_conv_args("tritonkit.conv2d", input.shape, weight.shape, bias, stride, padding, dilation, groups)
    return input.new_empty(_output_shape(input.shape, weight.shape, *geometry)).contiguous(
        memory_format=kernels.suggest_memory_format(input))


# ---------------------------------------------------------------------------------- input gradient
def _check_grad(op, grad_output, relu_output, expected_shape, other_name, other):
    check_float_tensors(op, grad_output=grad_output, **{other_name: other}, relu_output=relu_output)
    if tuple(grad_output.shape) != tuple(expected_shape):
        raise RuntimeError(f"{op}: expected grad_output of size {list(expected_shape)}, got {list(grad_output.shape)}")
    if relu_output is not None and relu_output.shape != grad_output.shape:
        raise RuntimeError(f"{op}: relu_output of size {list(relu_output.shape)} must match grad_output "
                           f"{list(grad_output.shape)}")


def _check_input_grad(grad_output, weight, relu_output, input_size, stride, padding, dilation, groups, residual,
                      residual_mask, op="tritonkit.conv2d_input_grad"):
    geometry = check_conv_args(op, input_size, weight.shape, None, stride, padding, dilation, groups)
    _check_grad(op, grad_output, relu_output, _output_shape(input_size, weight.shape, *geometry), "weight", weight)
    if residual_mask is not None and residual is None:
        raise RuntimeError(f"{op}: residual_mask needs a residual (it masks the residual)")
    check_float_tensors(op, grad_output=grad_output, residual=residual, residual_mask=residual_mask)
    for name, t in (("residual", residual), ("residual_mask", residual_mask)):
        if t is not None and tuple(t.shape) != tuple(input_size):
            raise RuntimeError(f"{op}: {name} of size {list(t.shape)} must match the input gradient "
                               f"{list(input_size)}")
    return geometry


@torch.library.custom_op("tritonkit::conv2d_input_grad", mutates_args=())
def conv2d_input_grad(grad_output: torch.Tensor, weight: torch.Tensor, relu_output: Optional[torch.Tensor],
                      input_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int, residual: Optional[torch.Tensor] = None,
                      residual_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of conv2d with respect to its input; ``relu_output > 0`` masks ``grad_output`` if given.
    ``residual`` (the input's shape, any layout) is added, where ``residual_mask > 0`` if given
    (``threshold_backward(residual, residual_mask, 0)``: a ReLU'd identity branch), in float32 before
    the one rounding: a ResNet block's grad_x = conv1's input gradient + the shortcut's gradient."""
    geometry = _check_input_grad(grad_output, weight, relu_output, input_size, stride, padding, dilation, groups,
                                 residual, residual_mask)
    return kernels.conv2d_input_grad(grad_output, weight, relu_output, input_size, *geometry, groups,
                                     allow_tf32=conv_allows_tf32(), residual=residual, residual_mask=residual_mask)


@conv2d_input_grad.register_fake
def _(grad_output, weight, relu_output, input_size, stride, padding, dilation, groups, residual=None,
      residual_mask=None):
    _check_input_grad(grad_output, weight, relu_output, input_size, stride, padding, dilation, groups, residual,
                      residual_mask)
    return grad_output.new_empty(tuple(input_size)).contiguous(
        memory_format=kernels.suggest_memory_format(grad_output))


# --------------------------------------------------------------------------------- weight gradient
_PROLOGUE_SCHEMA = ("Tensor? input_mean=None, Tensor? input_invstd=None, Tensor? input_weight=None, "
                    "Tensor? input_bias=None, bool input_relu=False")


def _check_weight_grad(op, grad_output, input, relu_output, weight_size, stride, padding, dilation, groups,
                       prologue):
    geometry = check_conv_args(op, input.shape, weight_size, None, stride, padding, dilation, groups)
    _check_grad(op, grad_output, relu_output, _output_shape(input.shape, weight_size, *geometry), "input", input)
    return geometry, check_input_prologue(op, input, *prologue)


@torch.library.custom_op(
    "tritonkit::conv2d_weight_grad", mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor? relu_output, int[] weight_size, int[] stride, int[] padding, "
           f"int[] dilation, int groups, {_PROLOGUE_SCHEMA}) -> Tensor")
def conv2d_weight_grad(grad_output, input, relu_output, weight_size, stride, padding, dilation, groups,
                       input_mean=None, input_invstd=None, input_weight=None, input_bias=None, input_relu=False):
    """Gradient of conv2d with respect to its weight; ``relu_output > 0`` masks ``grad_output`` if given;
    the input prologue (module doc) recomputes the conv's input from ``input``."""
    prologue = (input_mean, input_invstd, input_weight, input_bias, input_relu)
    geometry, norm = _check_weight_grad("tritonkit.conv2d_weight_grad", grad_output, input, relu_output, weight_size,
                                        stride, padding, dilation, groups, prologue)
    return kernels.conv2d_weight_grad(grad_output, input, relu_output, weight_size, *geometry, groups,
                                      allow_tf32=conv_allows_tf32(), input_norm=norm, input_relu=input_relu)


@conv2d_weight_grad.register_fake
def _(grad_output, input, relu_output, weight_size, stride, padding, dilation, groups, input_mean=None,
      input_invstd=None, input_weight=None, input_bias=None, input_relu=False):
    _check_weight_grad("tritonkit.conv2d_weight_grad", grad_output, input, relu_output, weight_size, stride, padding,
                       dilation, groups, (input_mean, input_invstd, input_weight, input_bias, input_relu))
    return grad_output.new_empty(tuple(weight_size)).contiguous(memory_format=kernels.suggest_memory_format(input))


@torch.library.custom_op(
    "tritonkit::conv2d_weight_bias_grad", mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor? relu_output, int[] weight_size, int[] stride, int[] padding, "
           f"int[] dilation, int groups, {_PROLOGUE_SCHEMA}) -> (Tensor, Tensor)")
def conv2d_weight_bias_grad(grad_output, input, relu_output, weight_size, stride, padding, dilation, groups,
                            input_mean=None, input_invstd=None, input_weight=None, input_bias=None, input_relu=False):
    """``(grad_weight, grad_bias)`` of conv2d in one launch: grad_weight as ``conv2d_weight_grad``,
    ``grad_bias[oc]`` = the sum over n, oh, ow of dy' (dy masked by ``relu_output > 0`` if given),
    accumulated in float32 and returned in grad_output's dtype, like eager."""
    prologue = (input_mean, input_invstd, input_weight, input_bias, input_relu)
    geometry, norm = _check_weight_grad("tritonkit.conv2d_weight_bias_grad", grad_output, input, relu_output,
                                        weight_size, stride, padding, dilation, groups, prologue)
    return kernels.conv2d_weight_grad(grad_output, input, relu_output, weight_size, *geometry, groups,
                                      allow_tf32=conv_allows_tf32(), bias_grad=True, input_norm=norm,
                                      input_relu=input_relu)


@conv2d_weight_bias_grad.register_fake
def _(grad_output, input, relu_output, weight_size, stride, padding, dilation, groups, input_mean=None,
      input_invstd=None, input_weight=None, input_bias=None, input_relu=False):
    _check_weight_grad("tritonkit.conv2d_weight_bias_grad", grad_output, input, relu_output, weight_size, stride,
                       padding, dilation, groups, (input_mean, input_invstd, input_weight, input_bias, input_relu))
    dw = grad_output.new_empty(tuple(weight_size)).contiguous(memory_format=kernels.suggest_memory_format(input))
    return dw, grad_output.new_empty((weight_size[0],))


# ------------------------------------------------------------------ input, weight and bias gradient
def _check_backward(grad_output, input, weight, relu_output, stride, padding, dilation, groups, residual,
                    residual_mask, prologue, op="tritonkit.conv2d_backward"):
    """conv2d_input_grad's checks (which cover conv2d_weight_grad's) with the input as the weight
    gradient's operand: the same dtype and device as the others; ``(geometry, input_norm)``."""
    check_float_tensors(op, grad_output=grad_output, input=input, weight=weight)
    geometry = _check_input_grad(grad_output, weight, relu_output, input.shape, stride, padding, dilation, groups,
                                 residual, residual_mask, op=op)
    return geometry, check_input_prologue(op, input, *prologue)


def _fake_gradients(grad_output, input, weight, bias_grad) -> tuple:
    """The fake ``(grad_input, grad_weight, grad_bias)`` of the conv backward ops, laid out as
    ``kernels.conv2d_backward`` lays them out (grad_bias None without ``bias_grad``)."""
    dx = grad_output.new_empty(tuple(input.shape)).contiguous(memory_format=kernels.suggest_memory_format(grad_output))
    dw = grad_output.new_empty(tuple(weight.shape)).contiguous(memory_format=kernels.suggest_memory_format(input))
    return dx, dw, grad_output.new_empty((weight.shape[0],)) if bias_grad else None


# torch.library cannot infer an optional output (Tensor?) from the annotations: the schema is spelled out.
@torch.library.custom_op(
    "tritonkit::conv2d_backward", mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor weight, Tensor? relu_output, int[] stride, int[] padding, "
           "int[] dilation, int groups, Tensor? residual=None, Tensor? residual_mask=None, bool bias_grad=False, "
           f"{_PROLOGUE_SCHEMA}) -> (Tensor, Tensor, Tensor?)")
def conv2d_backward(grad_output, input, weight, relu_output, stride, padding, dilation, groups, residual=None,
                    residual_mask=None, bias_grad=False, input_mean=None, input_invstd=None, input_weight=None,
                    input_bias=None, input_relu=False):
    """``(grad_input, grad_weight, grad_bias)`` of conv2d in ONE launch: grad_input as
    ``conv2d_input_grad`` (``residual``/``residual_mask`` epilogue included), grad_weight (and with
    ``bias_grad`` grad_bias, else None) as ``conv2d_weight_bias_grad``, all from dy' = grad_output
    masked by ``relu_output > 0`` if given; the same layouts (grad_input in grad_output's memory
    format, grad_weight channels_last when input is). The input prologue: module doc."""
    geometry, norm = _check_backward(grad_output, input, weight, relu_output, stride, padding, dilation, groups,
                                     residual, residual_mask,
                                     (input_mean, input_invstd, input_weight, input_bias, input_relu))
    return kernels.conv2d_backward(grad_output, input, weight, relu_output, *geometry, groups,
                                   allow_tf32=conv_allows_tf32(), residual=residual, residual_mask=residual_mask,
                                   bias_grad=bias_grad, input_norm=norm, input_relu=input_relu)


@conv2d_backward.register_fake
def _(grad_output, input, weight, relu_output, stride, padding, dilation, groups, residual=None, residual_mask=None,
      bias_grad=False, input_mean=None, input_invstd=None, input_weight=None, input_bias=None, input_relu=False):
    _check_backward(grad_output, input, weight, relu_output, stride, padding, dilation, groups, residual,
                    residual_mask, (input_mean, input_invstd, input_weight, input_bias, input_relu))
    return _fake_gradients(grad_output, input, weight, bias_grad)


_BN_PARTIALS = "tritonkit.conv2d_backward_bn_partials"


@torch.library.custom_op(
    "tritonkit::conv2d_backward_bn_partials", mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor weight, Tensor? relu_output, int[] stride, int[] padding, "
           "int[] dilation, int groups, bool bias_grad, Tensor input_mean, Tensor input_invstd, "
           "Tensor? input_weight=None, Tensor? input_bias=None, bool input_relu=False) "
           "-> (Tensor, Tensor, Tensor?, Tensor)")
def conv2d_backward_bn_partials(grad_output, input, weight, relu_output, stride, padding, dilation, groups, bias_grad,
                                input_mean, input_invstd, input_weight=None, input_bias=None, input_relu=False):
    """``conv2d_backward`` with its input prologue, a training BatchNorm (+ ReLU) of ``input``, whose
    backward it starts: ``(grad_bn, grad_weight, grad_bias, partials)``, ``grad_bn`` the gradient with
    respect to the BatchNorm's output (grad_input through the ReLU's mask, the output recomputed), and
    ``partials`` float32 ``[T, 2, C]`` whose sums over T are sum ``grad_bn`` and sum ``grad_bn * (input -
    input_mean)``, the two reductions ``batch_norm_backward(grad_partials=...)`` takes
    (``kernels.conv.conv2d_input_grad``'s ``grad_stats``)."""
    prologue = (input_mean, input_invstd, input_weight, input_bias, input_relu)
    geometry, norm = _check_backward(grad_output, input, weight, relu_output, stride, padding, dilation, groups,
                                     None, None, prologue, _BN_PARTIALS)
    return kernels.conv2d_backward(grad_output, input, weight, relu_output, *geometry, groups,
                                   allow_tf32=conv_allows_tf32(), bias_grad=bias_grad, input_norm=norm,
                                   input_relu=input_relu, grad_stats=True)


@conv2d_backward_bn_partials.register_fake
def _(grad_output, input, weight, relu_output, stride, padding, dilation, groups, bias_grad, input_mean,
      input_invstd, input_weight=None, input_bias=None, input_relu=False):
    prologue = (input_mean, input_invstd, input_weight, input_bias, input_relu)
    geometry, _ = _check_backward(grad_output, input, weight, relu_output, stride, padding, dilation, groups, None,
                                  None, prologue, _BN_PARTIALS)
    partials = input.new_empty((kernels.grad_stat_tiles(input.shape, geometry[0]), 2, input.shape[1]),
                               dtype=torch.float32)
    return (*_fake_gradients(grad_output, input, weight, bias_grad), partials)


_RESIDUAL_BN_PARTIALS = "tritonkit.conv2d_backward_residual_bn_partials"


def _check_bn_inputs(op, input, bn_input, bn_mean, bn_input2, bn_mean2) -> tuple:
    """The BatchNorms whose backward reductions a residual block's conv backward computes: each input of
    ``input``'s shape, dtype and device, each mean per channel; ``((z, mean), ...)`` for the kernels."""
    check_given_together(op, bn_input2, bn_mean2, ("bn_input2", "bn_mean2"))
    pairs = [("bn_input", bn_input, "bn_mean", bn_mean)] + [("bn_input2", bn_input2, "bn_mean2", bn_mean2)] * (
        bn_input2 is not None)
    for name, z, mean_name, mean in pairs:
        check_float_tensors(op, input=input, **{name: z})
        if tuple(z.shape) != tuple(input.shape):
            raise RuntimeError(f"{op}: expected {name} of size {list(input.shape)} (the input's), but got "
                               f"{name} of size {list(z.shape)}")
        check_channel_vectors(op, input, input.shape[1], "input channel", **{mean_name: mean})
    return tuple((z, mean) for _, z, _, mean in pairs)


@torch.library.custom_op(
    "tritonkit::conv2d_backward_residual_bn_partials", mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor weight, Tensor? relu_output, int[] stride, int[] padding, "
           "int[] dilation, int groups, Tensor? residual, Tensor? residual_mask, bool bias_grad, Tensor bn_input, "
           "Tensor bn_mean, Tensor? bn_input2=None, Tensor? bn_mean2=None) "
           "-> (Tensor, Tensor, Tensor?, Tensor, Tensor?)")
def conv2d_backward_residual_bn_partials(grad_output, input, weight, relu_output, stride, padding, dilation, groups,
                                         residual, residual_mask, bias_grad, bn_input, bn_mean, bn_input2=None,
                                         bn_mean2=None):
    """``conv2d_backward`` of a conv whose ``input`` is a ReLU's output, ``relu(bn(bn_input) + identity)``
    (a residual block's end), on through that ReLU: ``(grad_bn, grad_weight, grad_bias, partials,
    partials2)`` with ``grad_bn = threshold_backward(grad_input, input, 0)``, ``grad_input`` as
    ``conv2d_backward``'s (``residual``/``residual_mask`` epilogue included), the gradient both the
    BatchNorm's backward and the identity branch take, and ``partials`` float32 ``[T, 2, C]`` whose sums
    over T are sum ``grad_bn`` and sum ``grad_bn * (bn_input - bn_mean)``, that BatchNorm backward's two
    reductions (``batch_norm_backward(grad_partials=...)``); ``partials2`` the same for ``bn_input2`` /
    ``bn_mean2`` (a downsample branch's BatchNorm reading the same gradient), else None."""
    op = _RESIDUAL_BN_PARTIALS
    geometry, _ = _check_backward(grad_output, input, weight, relu_output, stride, padding, dilation, groups,
                                  residual, residual_mask, (None, None, None, None, False), op)
    bn_inputs = _check_bn_inputs(op, input, bn_input, bn_mean, bn_input2, bn_mean2)
    out = kernels.conv2d_backward(grad_output, input, weight, relu_output, *geometry, groups,
                                  allow_tf32=conv_allows_tf32(), residual=residual, residual_mask=residual_mask,
                                  bias_grad=bias_grad, bn_inputs=bn_inputs)
    return (*out, None) if bn_input2 is None else out


@conv2d_backward_residual_bn_partials.register_fake
def _(grad_output, input, weight, relu_output, stride, padding, dilation, groups, residual, residual_mask, bias_grad,
      bn_input, bn_mean, bn_input2=None, bn_mean2=None):
    op = _RESIDUAL_BN_PARTIALS
    geometry, _ = _check_backward(grad_output, input, weight, relu_output, stride, padding, dilation, groups,
                                  residual, residual_mask, (None, None, None, None, False), op)
    _check_bn_inputs(op, input, bn_input, bn_mean, bn_input2, bn_mean2)
    size = (kernels.grad_stat_tiles(input.shape, geometry[0]), 2, input.shape[1])
    partials = [input.new_empty(size, dtype=torch.float32) for _ in range(1 + (bn_input2 is not None))]
    return (*_fake_gradients(grad_output, input, weight, bias_grad), partials[0],
            partials[1] if len(partials) == 2 else None)


# ------------------------------------------------------------------- conv + ReLU + max-pool (inference)
def _check_conv_relu_maxpool(input, weight, bias, stride, padding, dilation, groups, pool_args, bn):
    op = "tritonkit.conv2d_relu_maxpool"
    check_float_tensors(op, input=input, weight=weight, bias=bias)
    geometry = check_conv_args(op, input.shape, weight.shape, bias, stride, padding, dilation, groups)
    bn_weight, bn_bias, running_mean, running_var = bn
    if (running_mean is None) != (running_var is None):
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"{op}: {missing} must be defined in evaluation mode (running_mean and running_var "
                           "are given together)")
    if running_mean is None and (bn_weight is not None or bn_bias is not None):
        raise RuntimeError(f"{op}: bn_weight and bn_bias need running_mean and running_var (eval-mode BatchNorm)")
    _check_bn_eval(op, input, weight.shape[0], *bn)
    conv_out = torch.empty(_output_shape(input.shape, weight.shape, *geometry), dtype=input.dtype, device="meta")
    pool, pooled = pool_ops._pool_geometry(op, conv_out, *pool_args)
    return geometry, pool, (conv_out.shape[0], conv_out.shape[1], *pooled)


@torch.library.custom_op("tritonkit::conv2d_relu_maxpool", mutates_args=())
def conv2d_relu_maxpool(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                        pool_kernel_size: Sequence[int], pool_stride: Sequence[int], pool_padding: Sequence[int],
                        pool_dilation: Sequence[int], ceil_mode: bool, bn_weight: Optional[torch.Tensor] = None,
                        bn_bias: Optional[torch.Tensor] = None, running_mean: Optional[torch.Tensor] = None,
                        running_var: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """``max_pool2d(relu(BN(conv2d(input, weight) + bias)))`` in one kernel, for inference (no indices);
    BN: eval-mode BatchNorm from its parameters when ``running_mean``/``running_var`` are given
    (module doc), else none."""
    pool_args = (pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode)
    bn = (bn_weight, bn_bias, running_mean, running_var)
    geometry, pool, _ = _check_conv_relu_maxpool(input, weight, bias, stride, padding, dilation, groups, pool_args,
                                                 bn)
    return kernels.conv2d_relu_maxpool(input, weight, bias, *geometry, groups, *pool, ceil_mode,
                                       allow_tf32=conv_allows_tf32(), bn_weight=bn_weight, bn_bias=bn_bias,
                                       running_mean=running_mean, running_var=running_var, eps=eps)


@conv2d_relu_maxpool.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding,
      pool_dilation, ceil_mode, bn_weight=None, bn_bias=None, running_mean=None, running_var=None, eps=1e-5):
    pool_args = (pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode)
    _, _, shape = _check_conv_relu_maxpool(input, weight, bias, stride, padding, dilation, groups, pool_args,
                                           (bn_weight, bn_bias, running_mean, running_var))
    return input.new_empty(shape).contiguous(memory_format=kernels.suggest_memory_format(input))


# ------------------------------------------------------------------------- BatchNorm prologue / epilogue
def _check_fused(op, input, weight, bias, stride, padding, dilation, groups, prologue):
    check_float_tensors(op, input=input, weight=weight, bias=bias)
    geometry = check_conv_args(op, input.shape, weight.shape, bias, stride, padding, dilation, groups)
    norm = check_input_prologue(op, input, *prologue)
    return geometry, _output_shape(input.shape, weight.shape, *geometry), norm


def _check_bn_eval(op, input, channels, bn_weight, bn_bias, running_mean, running_var):
    """Eval-mode BatchNorm's per-output-channel vectors (None: not given)."""
    check_channel_vectors(op, input, channels, "output channel", bn_weight=bn_weight, bn_bias=bn_bias,
                          running_mean=running_mean, running_var=running_var)


def _check_conv_batch_norm(op, input, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride,
                           padding, dilation, groups):
    check_float_tensors(op, input=input, weight=weight, bias=bias)
    geometry = check_conv_args(op, input.shape, weight.shape, bias, stride, padding, dilation, groups)
    shape = _output_shape(input.shape, weight.shape, *geometry)
    _check_bn_eval(op, input, weight.shape[0], bn_weight, bn_bias, running_mean, running_var)
    if residual is not None:
        check_float_tensors(op, input=input, residual=residual)
        if tuple(residual.shape) != tuple(shape):
            raise RuntimeError(f"{op}: residual of size {list(residual.shape)} must match the output "
                               f"{list(shape)}")
    return geometry, shape


@torch.library.custom_op("tritonkit::conv2d_batch_norm", mutates_args=())
def conv2d_batch_norm(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                      running_var: torch.Tensor, eps: float, residual: Optional[torch.Tensor], stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], groups: int, relu: bool,
                      activation: str = "none", min_val: float = 0.0, max_val: float = 6.0) -> torch.Tensor:
    """``act(BN_eval(conv2d(input, weight) + bias) (+ residual))`` in one kernel (module doc)."""
    act = epilogue_activation("tritonkit.conv2d_batch_norm", relu, activation, min_val, max_val)
    geometry, _ = _check_conv_batch_norm("tritonkit.conv2d_batch_norm", input, weight, bias, bn_weight, bn_bias,
                                         running_mean, running_var, residual, stride, padding, dilation, groups)
    return kernels.conv2d(input, weight, bias, *geometry, groups, activation=act, allow_tf32=conv_allows_tf32(),
                          bn_weight=bn_weight, bn_bias=bn_bias, running_mean=running_mean, running_var=running_var,
                          eps=eps, residual=residual)


@conv2d_batch_norm.register_fake
def _(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, residual, stride, padding, dilation,
      groups, relu, activation="none", min_val=0.0, max_val=6.0):
    epilogue_activation("tritonkit.conv2d_batch_norm", relu, activation, min_val, max_val)
    _, shape = _check_conv_batch_norm("tritonkit.conv2d_batch_norm", input, weight, bias, bn_weight, bn_bias,
                                      running_mean, running_var, residual, stride, padding, dilation, groups)
    return input.new_empty(shape).contiguous(memory_format=kernels.suggest_memory_format(input))


@torch.library.custom_op("tritonkit::conv2d_bn_stats", mutates_args=())
def conv2d_bn_stats(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int,
                    input_mean: Optional[torch.Tensor] = None, input_invstd: Optional[torch.Tensor] = None,
                    input_weight: Optional[torch.Tensor] = None, input_bias: Optional[torch.Tensor] = None,
                    input_relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv2d(x', weight) + bias, partials)``: the output and its float32 BatchNorm partials
    ``[T, 3, OC]`` = (count, mean, M2) per 64-pixel tile and channel (module doc)."""
    prologue = (input_mean, input_invstd, input_weight, input_bias, input_relu)
    geometry, _, norm = _check_fused("tritonkit.conv2d_bn_stats", input, weight, bias, stride, padding, dilation,
                                     groups, prologue)
    return kernels.conv2d(input, weight, bias, *geometry, groups, allow_tf32=conv_allows_tf32(), stats=True,
                          input_norm=norm, input_relu=input_relu)


@conv2d_bn_stats.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, input_mean=None, input_invstd=None, input_weight=None,
      input_bias=None, input_relu=False):
    prologue = (input_mean, input_invstd, input_weight, input_bias, input_relu)
    _, shape, _ = _check_fused("tritonkit.conv2d_bn_stats", input, weight, bias, stride, padding, dilation, groups,
                               prologue)
    out = input.new_empty(shape).contiguous(memory_format=kernels.suggest_memory_format(input))
    tiles = kernels.bn_stat_tiles(shape[0] * shape[2] * shape[3])
    return out, input.new_empty((tiles, 3, shape[1]), dtype=torch.float32)
