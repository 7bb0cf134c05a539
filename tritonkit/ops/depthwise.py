"""Depthwise conv2d custom ops over ``tritonkit.kernels.depthwise`` (groups == C input channels,
weight [OC, 1, KH, KW] with OC = C * M, M >= 1 the channel multiplier; direct kernels, no GEMM):

* ``depthwise_conv2d(input, weight, bias, stride, padding, dilation, activation="none") -> Tensor``:
  ``act(F.conv2d(input, weight, bias, stride, padding, dilation, groups=C))``, act one of
  "none", "relu", "relu6" (``F.relu6``: hardtanh(0, 6)) or another kind of ``tritonkit::activation``
  ("hardswish", "hardsigmoid", "silu", "sigmoid", "gelu", "gelu_tanh"), in float32, rounded once.
* ``depthwise_conv2d_batch_norm(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
  stride, padding, dilation, activation="none") -> Tensor``: ``act(BN_eval(conv + bias))`` in one
  kernel, BN exactly as ``conv2d_batch_norm`` computes it: ``((conv + bias[oc]) - running_mean[oc]) *
  (bn_weight[oc] / sqrt(running_var[oc] + eps)) + bn_bias[oc]``, centred first, float32 (bn_weight,
  bn_bias optional: affine=False).
* ``depthwise_conv2d_bn_stats(input, weight, bias, stride, padding, dilation) -> (out, partials)``:
  ``out = conv + bias`` and its float32 BatchNorm partials [T, 3, OC] in ``conv2d_bn_stats``' layout
  (count, mean, M2 per 64-pixel tile, ``T = kernels.conv.bn_stat_tiles(N*OH*OW)``), from the float32
  accumulator; ``batch_norm_train_from_partials(out, partials, ...)`` consumes them unchanged.
* ``depthwise_conv2d_input_grad(grad_output, weight, relu_output, input_size, stride, padding, dilation,
  activation="relu", residual=None) -> Tensor``: the input gradient; ``relu_output`` (optional) is the
  forward's output under ``activation`` ("relu": grad where relu_output > 0; "relu6": where
  0 < relu_output < 6, as threshold_backward / hardtanh_backward, a NaN output passing its gradient);
  ``residual`` (optional, the input's shape and dtype, any layout) is added in float32 before the one
  rounding: an inverted residual block's grad_x = the identity branch's gradient + this conv's.
* ``depthwise_conv2d_weight_grad(grad_output, input, relu_output, weight_size, stride, padding, dilation,
  activation="relu", bias_grad=False) -> (grad_weight, grad_bias?)``: the weight gradient, and with
  ``bias_grad`` the bias gradient from the same launch (else None), summed in float32 in a fixed
  order (no atomics: bit-identical reruns).

Outputs take the input's (input gradient: grad_output's) memory format, as eager's. Arguments are
checked before any launch, raising what eager's ``F.conv2d(..., groups=C)`` / ``F.batch_norm`` raise
for the same mistake (RuntimeError; an unknown activation: ValueError); the fake implementations
compute the same shapes and memory formats.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tritonkit.kernels import depthwise as kernels
from tritonkit.kernels.conv import bn_stat_tiles, output_size, suggest_memory_format
from tritonkit.ops.checks import check_channel_vectors, check_float_tensors
from tritonkit.ops.conv import check_conv_args

_MASKS = ("relu", "relu6")


def _check_activation(op, activation, allowed):
    if activation not in allowed:
        raise ValueError(f"{op}: activation must be one of {', '.join(map(repr, allowed))}, got {activation!r}")


def _check_geometry(op, input_size, weight_size, bias, stride, padding, dilation):
    """check_conv_args with groups = C (a 4-D input's channels): a depthwise conv's weight is [C*M, 1, KH, KW]."""
    groups = input_size[1] if len(input_size) == 4 else 1
    return check_conv_args(op, input_size, weight_size, bias, stride, padding, dilation, groups)


def _output_shape(input_size, weight_size, stride, padding, dilation):
    n, _, h, w = input_size
    oc, _, kh, kw = weight_size
    return (n, oc, output_size(h, kh, stride[0], padding[0], dilation[0]),
            output_size(w, kw, stride[1], padding[1], dilation[1]))


def _check_forward(op, input, weight, bias, stride, padding, dilation, activation):
    check_float_tensors(op, input=input, weight=weight, bias=bias)
    _check_activation(op, activation, tuple(kernels.FORWARD_ACTIVATIONS))
    geometry = _check_geometry(op, input.shape, weight.shape, bias, stride, padding, dilation)
    return geometry, _output_shape(input.shape, weight.shape, *geometry)


def _like_input(input, shape):
    return input.new_empty(shape).contiguous(memory_format=suggest_memory_format(input))


# ----------------------------------------------------------------------------------------- forward
@torch.library.custom_op("tritonkit::depthwise_conv2d", mutates_args=())
def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], activation: str = "none") -> torch.Tensor:
    """``act(depthwise conv2d(input, weight) + bias)`` (module doc); 4-D input, any strides."""
    geometry, _ = _check_forward("tritonkit.depthwise_conv2d", input, weight, bias, stride, padding, dilation,
                                 activation)
    return kernels.depthwise_conv2d(input, weight, bias, *geometry, activation=activation)


@depthwise_conv2d.register_fake
def _(input, weight, bias, stride, padding, dilation, activation="none"):
    _, shape = _check_forward("tritonkit.depthwise_conv2d", input, weight, bias, stride, padding, dilation,
                              activation)
    return _like_input(input, shape)


def _check_batch_norm(op, input, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                      dilation, activation):
    geometry, shape = _check_forward(op, input, weight, bias, stride, padding, dilation, activation)
    check_channel_vectors(op, input, weight.shape[0], "output channel", bn_weight=bn_weight, bn_bias=bn_bias,
                          running_mean=running_mean, running_var=running_var)
    return geometry, shape


@torch.library.custom_op("tritonkit::depthwise_conv2d_batch_norm", mutates_args=())
def depthwise_conv2d_batch_norm(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                                running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
                                stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                activation: str = "none") -> torch.Tensor:
    """``act(BN_eval(depthwise conv2d(input, weight) + bias))`` in one kernel (module doc)."""
    geometry, _ = _check_batch_norm("tritonkit.depthwise_conv2d_batch_norm", input, weight, bias, bn_weight, bn_bias,
                                    running_mean, running_var, stride, padding, dilation, activation)
    return kernels.depthwise_conv2d(input, weight, bias, *geometry, activation=activation, bn_weight=bn_weight,
                                    bn_bias=bn_bias, running_mean=running_mean, running_var=running_var, eps=eps)


@depthwise_conv2d_batch_norm.register_fake
def _(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
      activation="none"):
    _, shape = _check_batch_norm("tritonkit.depthwise_conv2d_batch_norm", input, weight, bias, bn_weight, bn_bias,
                                 running_mean, running_var, stride, padding, dilation, activation)
    return _like_input(input, shape)


@torch.library.custom_op("tritonkit::depthwise_conv2d_bn_stats", mutates_args=())
def depthwise_conv2d_bn_stats(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              stride: Sequence[int], padding: Sequence[int],
                              dilation: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(depthwise conv2d(input, weight) + bias, partials)``: the output and its float32 BatchNorm
    partials [T, 3, OC] = (count, mean, M2) per 64-pixel tile and channel (module doc)."""
    geometry, _ = _check_forward("tritonkit.depthwise_conv2d_bn_stats", input, weight, bias, stride, padding,
                                 dilation, "none")
    return kernels.depthwise_conv2d(input, weight, bias, *geometry, stats=True)


@depthwise_conv2d_bn_stats.register_fake
def _(input, weight, bias, stride, padding, dilation):
    _, shape = _check_forward("tritonkit.depthwise_conv2d_bn_stats", input, weight, bias, stride, padding, dilation,
                              "none")
    tiles = bn_stat_tiles(shape[0] * shape[2] * shape[3])
    return _like_input(input, shape), input.new_empty((tiles, 3, shape[1]), dtype=torch.float32)


# ------------------------------------------------------------------------------------------ gradients
def _check_grad(op, grad_output, relu_output, activation, expected_shape, other_name, other):
    check_float_tensors(op, grad_output=grad_output, **{other_name: other}, relu_output=relu_output)
    _check_activation(op, activation, _MASKS)
    if tuple(grad_output.shape) != tuple(expected_shape):
        raise RuntimeError(f"{op}: expected grad_output of size {list(expected_shape)}, got {list(grad_output.shape)}")
    if relu_output is not None and relu_output.shape != grad_output.shape:
        raise RuntimeError(f"{op}: relu_output of size {list(relu_output.shape)} must match grad_output "
                           f"{list(grad_output.shape)}")


def _check_input_grad(grad_output, weight, relu_output, input_size, stride, padding, dilation, activation,
                      residual):
    op = "tritonkit.depthwise_conv2d_input_grad"
    geometry = _check_geometry(op, input_size, weight.shape, None, stride, padding, dilation)
    _check_grad(op, grad_output, relu_output, activation, _output_shape(input_size, weight.shape, *geometry),
                "weight", weight)
    check_float_tensors(op, grad_output=grad_output, residual=residual)
    if residual is not None and tuple(residual.shape) != tuple(input_size):
        raise RuntimeError(f"{op}: residual of size {list(residual.shape)} must match the input gradient "
                           f"{list(input_size)}")
    return geometry


@torch.library.custom_op("tritonkit::depthwise_conv2d_input_grad", mutates_args=())
def depthwise_conv2d_input_grad(grad_output: torch.Tensor, weight: torch.Tensor, relu_output: Optional[torch.Tensor],
                                input_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                                dilation: Sequence[int], activation: str = "relu",
                                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of the depthwise conv with respect to its input; ``relu_output`` (the forward's
    ``activation`` output) masks ``grad_output`` if given; ``residual`` (the input's shape, any layout)
    is added in the epilogue, in float32 before the one rounding."""
    geometry = _check_input_grad(grad_output, weight, relu_output, input_size, stride, padding, dilation, activation,
                                 residual)
    return kernels.depthwise_conv2d_input_grad(grad_output, weight, relu_output, input_size, *geometry,
                                               activation=activation, residual=residual)


@depthwise_conv2d_input_grad.register_fake
def _(grad_output, weight, relu_output, input_size, stride, padding, dilation, activation="relu", residual=None):
    _check_input_grad(grad_output, weight, relu_output, input_size, stride, padding, dilation, activation, residual)
    return grad_output.new_empty(tuple(input_size)).contiguous(memory_format=suggest_memory_format(grad_output))


def _check_weight_grad(grad_output, input, relu_output, weight_size, stride, padding, dilation, activation):
    op = "tritonkit.depthwise_conv2d_weight_grad"
    geometry = _check_geometry(op, input.shape, weight_size, None, stride, padding, dilation)
    _check_grad(op, grad_output, relu_output, activation, _output_shape(input.shape, weight_size, *geometry),
                "input", input)
    return geometry


@torch.library.custom_op(
    "tritonkit::depthwise_conv2d_weight_grad",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor? relu_output, SymInt[] weight_size, SymInt[] stride, "
           "SymInt[] padding, SymInt[] dilation, str activation=\"relu\", bool bias_grad=False) -> (Tensor, Tensor?)",
)
def depthwise_conv2d_weight_grad(grad_output, input, relu_output, weight_size, stride, padding, dilation,
                                 activation="relu", bias_grad=False):
    """``(grad_weight, grad_bias)`` of the depthwise conv in one launch; grad_bias (the sum of dy' over
    n, oh, ow, in grad_output's dtype) only with ``bias_grad``, else None."""
    geometry = _check_weight_grad(grad_output, input, relu_output, weight_size, stride, padding, dilation, activation)
    return kernels.depthwise_conv2d_weight_grad(grad_output, input, relu_output, weight_size, *geometry,
                                                activation=activation, bias_grad=bias_grad)


@depthwise_conv2d_weight_grad.register_fake
def _(grad_output, input, relu_output, weight_size, stride, padding, dilation, activation="relu", bias_grad=False):
    _check_weight_grad(grad_output, input, relu_output, weight_size, stride, padding, dilation, activation)
    dw = grad_output.new_empty(tuple(weight_size)).contiguous(memory_format=suggest_memory_format(input))
    return dw, grad_output.new_empty((weight_size[0],)) if bias_grad else None
