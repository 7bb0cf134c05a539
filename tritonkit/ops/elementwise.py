"""``tritonkit::relu``, ``tritonkit::relu_backward`` and ``tritonkit::bias_grad`` custom ops.

* ``relu(input)``: ``torch.relu``; the result has ``input``'s strides when ``input`` is dense
  (``torch.empty_like`` strides otherwise).
* ``relu_backward(grad_output, output)``: ``aten.threshold_backward(grad_output, output, 0)``, i.e.
  the gradient where ``output > 0`` (or NaN), 0 elsewhere; laid out like ``grad_output``.
* ``bias_grad(grad_output, relu_output, dim)``: ``grad_output`` (ReLU-masked as above when
  ``relu_output`` is given) summed over every dim but ``dim``; float32 accumulation, result of shape
  ``(grad_output.shape[dim],)`` in ``grad_output``'s dtype. Conv bias: ``dim=1``; linear: ``dim=-1``.

Inputs are validated (in the real and the fake impl, before any launch) with the exception types
PyTorch raises for the same mistakes.
"""

from __future__ import annotations

import torch

from tritonkit.kernels import elementwise as kernels
from tritonkit.kernels.common import FLOAT_DTYPES
from tritonkit.runtime import default_device


def check_float_tensor(op: str, name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    """``t`` must be a float32/float16/bfloat16 tensor on the kernels' device (and match ``like``)."""
    if t.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device.type not in (default_device().type, "meta"):
        where = default_device().type
        raise RuntimeError(f"{op}: {name} must be on {where} (where the kernels run), got {t.device}")
    if like is not None:
        if t.dtype != like.dtype:
            raise RuntimeError(f"{op}: {name} dtype {t.dtype} must match {like.dtype}")
        if t.device != like.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but the other tensors are on {like.device}")


def _check_same_shape(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise RuntimeError(
            f"{op}: {name} shape {tuple(t.shape)} must match {ref_name} shape {tuple(ref.shape)}"
        )


def _check_relu(input: torch.Tensor) -> None:
    check_float_tensor("tritonkit::relu", "input", input)


@torch.library.custom_op("tritonkit::relu", mutates_args=(), schema="(Tensor input) -> Tensor")
def relu(input: torch.Tensor) -> torch.Tensor:
    _check_relu(input)
    return kernels.relu(input)


@relu.register_fake
def _(input):
    _check_relu(input)
    return torch.empty_like(input)


def _check_relu_backward(grad_output: torch.Tensor, output: torch.Tensor) -> None:
    op = "tritonkit::relu_backward"
    check_float_tensor(op, "grad_output", grad_output)
    check_float_tensor(op, "output", output, like=grad_output)
    _check_same_shape(op, "output", output, "grad_output", grad_output)


@torch.library.custom_op(
    "tritonkit::relu_backward", mutates_args=(), schema="(Tensor grad_output, Tensor output) -> Tensor"
)
def relu_backward(grad_output: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    _check_relu_backward(grad_output, output)
    return kernels.relu_backward(grad_output, output)


@relu_backward.register_fake
def _(grad_output, output):
    _check_relu_backward(grad_output, output)
    return torch.empty_like(grad_output)


def _check_bias_grad(grad_output: torch.Tensor, relu_output: torch.Tensor | None, dim: int) -> None:
    op = "tritonkit::bias_grad"
    check_float_tensor(op, "grad_output", grad_output)
    if grad_output.dim() == 0:
        raise IndexError(f"{op}: dim {dim} given but grad_output has no dimensions")
    if not -grad_output.dim() <= dim < grad_output.dim():
        raise IndexError(
            f"{op}: dim out of range (expected to be in range of [{-grad_output.dim()}, "
            f"{grad_output.dim() - 1}], but got {dim})"
        )
    if relu_output is not None:
        check_float_tensor(op, "relu_output", relu_output, like=grad_output)
        _check_same_shape(op, "relu_output", relu_output, "grad_output", grad_output)


@torch.library.custom_op(
    "tritonkit::bias_grad",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor? relu_output, int dim) -> Tensor",
)
def bias_grad(grad_output: torch.Tensor, relu_output: torch.Tensor | None, dim: int) -> torch.Tensor:
    _check_bias_grad(grad_output, relu_output, dim)
    return kernels.bias_grad(grad_output, relu_output, dim)


@bias_grad.register_fake
def _(grad_output, relu_output, dim):
    _check_bias_grad(grad_output, relu_output, dim)
    return grad_output.new_empty((grad_output.shape[dim],))


__all__ = ["bias_grad", "check_float_tensor", "relu", "relu_backward"]
