"""``torch.ops.tritonkit.linear`` and its gradient ops, over ``tritonkit.kernels.linear``.

* ``linear(input, weight, bias, relu, activation="none", min_val=0., max_val=6.) -> y = act(input @ weight.T
  + bias)``, act = ReLU when ``relu``, else ``activation`` (one of ``tritonkit.ops.checks.EPILOGUE_ACTIVATIONS``,
  hardtanh with ``min_val``/``max_val``) on the float32 result before its one rounding (both: ValueError);
* ``linear_input_grad(grad_output, weight, relu_output) -> dy' @ weight``;
* ``linear_weight_grad(grad_output, input, relu_output) -> dy'^T @ input``;
* ``linear_weight_bias_grad(grad_output, input, relu_output) -> (grad_weight, grad_bias)``: the weight
  gradient and ``grad_bias = sum of dy'`` over every leading dim from one GEMM launch (the programs of
  the first column block sum the dy' tiles they load, in float32; deterministic), grad_bias in
  grad_output's dtype;
* ``linear_backward(grad_output, input, weight, relu_output, bias_grad) -> (grad_input, grad_weight,
  grad_bias)``: all three from one launch (the input gradient's tiles and the weight gradient's in one
  grid); grad_bias None unless ``bias_grad``;

where ``dy' = grad_output * (relu_output > 0)`` (``threshold_backward``; just ``grad_output`` without
``relu_output``). Any number of leading batch dimensions; ``mm(a, b)`` is ``linear(a, b.t(), None, False)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from tritonkit.kernels import linear as kernels
from tritonkit.ops.checks import check_float_tensors, epilogue_activation


def matmul_allows_tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def _check_linear(op, input, weight, bias):
    check_float_tensors(op, input=input, weight=weight, bias=bias)
    if input.dim() < 1:
        raise RuntimeError(f"{op}: input must have at least 1 dimension, got a 0-D tensor")
    if weight.dim() != 2:
        raise RuntimeError(
            f"{op}: expected 2-D weight (out_features, in_features), got weight of size {list(weight.shape)}")
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"{op}: input of size {list(input.shape)} has {input.shape[-1]} features but weight of "
                           f"size {list(weight.shape)} expects {weight.shape[1]} "
                           "(mat1 and mat2 shapes cannot be multiplied)")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise RuntimeError(f"{op}: expected bias of size [{weight.shape[0]}], got bias of size {list(bias.shape)}")


def _check_grad(op, grad_output, other_name, other, relu_output, features):
    check_float_tensors(op, grad_output=grad_output, **{other_name: other}, relu_output=relu_output)
    if grad_output.dim() < 1 or grad_output.shape[-1] != features:
        raise RuntimeError(f"{op}: expected grad_output with last dimension {features}, got {list(grad_output.shape)}")
    if relu_output is not None and relu_output.shape != grad_output.shape:
        raise RuntimeError(f"{op}: relu_output of size {list(relu_output.shape)} must match grad_output "
                           f"{list(grad_output.shape)}")


@torch.library.custom_op("tritonkit::linear", mutates_args=())
def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], relu: bool,
           activation: str = "none", min_val: float = 0.0, max_val: float = 6.0) -> torch.Tensor:
    """``act(input @ weight.T + bias)``, ``act`` = ReLU when ``relu``, else ``activation`` (module doc)."""
    act = epilogue_activation("tritonkit.linear", relu, activation, min_val, max_val)
    _check_linear("tritonkit.linear", input, weight, bias)
    return kernels.linear(input, weight, bias, activation=act, allow_tf32=matmul_allows_tf32())


@linear.register_fake
def _(input, weight, bias, relu, activation="none", min_val=0.0, max_val=6.0):
    epilogue_activation("tritonkit.linear", relu, activation, min_val, max_val)
    _check_linear("tritonkit.linear", input, weight, bias)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.custom_op("tritonkit::linear_input_grad", mutates_args=())
def linear_input_grad(grad_output: torch.Tensor, weight: torch.Tensor,
                      relu_output: Optional[torch.Tensor]) -> torch.Tensor:
    """``(grad_output * (relu_output > 0)) @ weight``: the gradient of linear with respect to its input."""
    _check_grad("tritonkit.linear_input_grad", grad_output, "weight", weight, relu_output, weight.shape[0])
    return kernels.linear_input_grad(grad_output, weight, relu_output, allow_tf32=matmul_allows_tf32())


@linear_input_grad.register_fake
def _(grad_output, weight, relu_output):
    _check_grad("tritonkit.linear_input_grad", grad_output, "weight", weight, relu_output, weight.shape[0])
    return grad_output.new_empty((*grad_output.shape[:-1], weight.shape[1]))


def _check_weight_grad(op, grad_output, input, relu_output):
    _check_grad(op, grad_output, "input", input, relu_output, grad_output.shape[-1] if grad_output.dim() else -1)
    if input.shape[:-1] != grad_output.shape[:-1]:
        raise RuntimeError(f"{op}: input of size {list(input.shape)} and grad_output of size "
                           f"{list(grad_output.shape)} must share their leading dimensions")


@torch.library.custom_op("tritonkit::linear_weight_grad", mutates_args=())
def linear_weight_grad(grad_output: torch.Tensor, input: torch.Tensor,
                       relu_output: Optional[torch.Tensor]) -> torch.Tensor:
    """``(grad_output * (relu_output > 0))^T @ input`` over all leading dims: the weight's gradient."""
    _check_weight_grad("tritonkit.linear_weight_grad", grad_output, input, relu_output)
    return kernels.linear_weight_grad(grad_output, input, relu_output, allow_tf32=matmul_allows_tf32())


@linear_weight_grad.register_fake
def _(grad_output, input, relu_output):
    _check_weight_grad("tritonkit.linear_weight_grad", grad_output, input, relu_output)
    return grad_output.new_empty((grad_output.shape[-1], input.shape[-1]))


@torch.library.custom_op(
    "tritonkit::linear_weight_bias_grad",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor? relu_output) -> (Tensor grad_weight, Tensor grad_bias)",
)
def linear_weight_bias_grad(grad_output, input, relu_output):
    """``(dy'^T @ input, sum of dy' over all leading dims)`` in one launch,
    ``dy' = grad_output * (relu_output > 0)``."""
    _check_weight_grad("tritonkit.linear_weight_bias_grad", grad_output, input, relu_output)
    return kernels.linear_weight_bias_grad(grad_output, input, relu_output, allow_tf32=matmul_allows_tf32())


@linear_weight_bias_grad.register_fake
def _(grad_output, input, relu_output):
    _check_weight_grad("tritonkit.linear_weight_bias_grad", grad_output, input, relu_output)
    features = grad_output.shape[-1]
    return grad_output.new_empty((features, input.shape[-1])), grad_output.new_empty((features,))


def _check_backward(op, grad_output, input, weight, relu_output):
    _check_linear(op, input, weight, None)
    _check_grad(op, grad_output, "weight", weight, relu_output, weight.shape[0])
    _check_weight_grad(op, grad_output, input, relu_output)


@torch.library.custom_op(
    "tritonkit::linear_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor weight, Tensor? relu_output, bool bias_grad) "
           "-> (Tensor grad_input, Tensor grad_weight, Tensor? grad_bias)",
)
def linear_backward(grad_output, input, weight, relu_output, bias_grad):
    """``(dy' @ weight, dy'^T @ input, sum of dy' over all leading dims or None)`` in one launch,
    ``dy' = grad_output * (relu_output > 0)``."""
    _check_backward("tritonkit.linear_backward", grad_output, input, weight, relu_output)
    return kernels.linear_backward(grad_output, input, weight, relu_output, bias_grad=bias_grad,
                                   allow_tf32=matmul_allows_tf32())


@linear_backward.register_fake
def _(grad_output, input, weight, relu_output, bias_grad):
    _check_backward("tritonkit.linear_backward", grad_output, input, weight, relu_output)
    features = weight.shape[0]
    return (grad_output.new_empty((*grad_output.shape[:-1], weight.shape[1])),
            grad_output.new_empty((features, weight.shape[1])),
            grad_output.new_empty((features,)) if bias_grad else None)
