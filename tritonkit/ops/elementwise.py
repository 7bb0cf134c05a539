"""``tritonkit::relu``, ``tritonkit::relu_backward``, ``tritonkit::bias_grad``, ``tritonkit::add_relu``,
``tritonkit::activation``, ``tritonkit::activation_backward``, ``tritonkit::channel_scale`` and
``tritonkit::channel_scale_backward`` custom ops.

* ``relu(input)``: ``torch.relu``; the result has ``input``'s strides when ``input`` is dense
  (``torch.empty_like`` strides otherwise).
* ``relu_backward(grad_output, output)``: ``aten.threshold_backward(grad_output, output, 0)``, i.e.
  the gradient where ``output > 0`` (or NaN), 0 elsewhere; laid out like ``grad_output``.
* ``bias_grad(grad_output, relu_output, dim)``: ``grad_output`` (ReLU-masked as above when
  ``relu_output`` is given) summed over every dim but ``dim``; float32 accumulation, result of shape
  ``(grad_output.shape[dim],)`` in ``grad_output``'s dtype. Conv bias: ``dim=1``; linear: ``dim=-1``.

* ``add_relu(a, b)``: ``torch.relu(a + b)`` for ``a``, ``b`` of one shape and dtype (no broadcasting or
  type promotion), laid out as eager's ``torch.add(a, b)``. Its backward is ``relu_backward(g, output)``
  (aten's ``threshold_backward`` on the output), the gradient of both operands.

* ``activation(input, kind, min_val=-1., max_val=1.)``: ``kind`` one of ``KINDS`` = hardtanh (bounds
  ``min_val``/``max_val``; relu6 is hardtanh(0, 6)), hardswish, hardsigmoid, silu, sigmoid, gelu
  (erf form) and gelu_tanh (``approximate="tanh"``); computed in float32, laid out like ``relu``.
* ``activation_backward(grad_output, saved, kind, min_val=-1., max_val=1.)``: aten's
  ``<kind>_backward``, with ``saved`` what aten's backward op takes: the forward's input, or for
  sigmoid (``SAVES_OUTPUT``) its output. Kinks and NaN as aten (``tritonkit.kernels.elementwise``).
* ``channel_scale(input, scale)``: ``input * scale`` for ``input`` [N, C, H, W] and ``scale`` [N, C, 1, 1]
  (a squeeze-excitation gate), laid out like ``relu``'s result.
* ``channel_scale_backward(grad_output, input, scale) -> (grad_input, grad_scale)``: ``grad_output *
  scale`` (laid out like ``grad_output``) and ``sum of grad_output * input over H, W`` of ``scale``'s
  shape (contiguous), in one pass.

Inputs are validated (in the real and the fake impl, before any launch) with the exception types
PyTorch raises for the same mistakes.
"""

from __future__ import annotations

import torch

from tritonkit.kernels import elementwise as kernels
from tritonkit.ops.checks import check_float_tensors


def _check_same_shape(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.shape != ref.shape:
        raise RuntimeError(
            f"{op}: {name} shape {tuple(t.shape)} must match {ref_name} shape {tuple(ref.shape)}"
        )


def _check_relu(input: torch.Tensor) -> None:
    check_float_tensors("tritonkit::relu", input=input)


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
    check_float_tensors(op, grad_output=grad_output, output=output)
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
    check_float_tensors(op, grad_output=grad_output, relu_output=relu_output)
    if grad_output.dim() == 0:
        raise IndexError(f"{op}: dim {dim} given but grad_output has no dimensions")
    if not -grad_output.dim() <= dim < grad_output.dim():
        raise IndexError(
            f"{op}: dim out of range (expected to be in range of [{-grad_output.dim()}, "
            f"{grad_output.dim() - 1}], but got {dim})"
        )
    if relu_output is not None:
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


def _check_add_relu(a: torch.Tensor, b: torch.Tensor) -> None:
    op = "tritonkit::add_relu"
    check_float_tensors(op, a=a, b=b)
    _check_same_shape(op, "b", b, "a", a)


@torch.library.custom_op("tritonkit::add_relu", mutates_args=(), schema="(Tensor a, Tensor b) -> Tensor")
def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_add_relu(a, b)
    return kernels.add_relu(a, b)


@add_relu.register_fake
def _(a, b):
    _check_add_relu(a, b)
    return torch.empty_strided(a.shape, torch.add(a, b).stride(), dtype=a.dtype, device=a.device)


KINDS = kernels.ACTIVATIONS[1:]  # relu has tritonkit::relu
SAVES_OUTPUT = kernels.SAVES_OUTPUT


def _check_kind(op: str, kind: str, min_val: float, max_val: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "hardtanh" and min_val > max_val:
        raise ValueError(f"{op}: min_val cannot be greater than max_val, got min_val={min_val}, max_val={max_val}")


def _check_activation(input: torch.Tensor, kind: str, min_val: float, max_val: float) -> None:
    op = "tritonkit::activation"
    check_float_tensors(op, input=input)
    _check_kind(op, kind, min_val, max_val)


@torch.library.custom_op(
    "tritonkit::activation", mutates_args=(),
    schema="(Tensor input, str kind, float min_val=-1., float max_val=1.) -> Tensor",
)
def activation(input: torch.Tensor, kind: str, min_val: float = -1.0, max_val: float = 1.0) -> torch.Tensor:
    _check_activation(input, kind, min_val, max_val)
    return kernels.activation(input, kind, min_val, max_val)


@activation.register_fake
def _(input, kind, min_val=-1.0, max_val=1.0):
    _check_activation(input, kind, min_val, max_val)
    return torch.empty_like(input)


def _check_activation_backward(grad_output, saved, kind, min_val, max_val) -> None:
    op = "tritonkit::activation_backward"
    check_float_tensors(op, grad_output=grad_output, saved=saved)
    _check_same_shape(op, "saved", saved, "grad_output", grad_output)
    _check_kind(op, kind, min_val, max_val)


@torch.library.custom_op(
    "tritonkit::activation_backward", mutates_args=(),
    schema="(Tensor grad_output, Tensor saved, str kind, float min_val=-1., float max_val=1.) -> Tensor",
)
def activation_backward(grad_output: torch.Tensor, saved: torch.Tensor, kind: str, min_val: float = -1.0,
                        max_val: float = 1.0) -> torch.Tensor:
    _check_activation_backward(grad_output, saved, kind, min_val, max_val)
    return kernels.activation_backward(grad_output, saved, kind, min_val, max_val)


@activation_backward.register_fake
def _(grad_output, saved, kind, min_val=-1.0, max_val=1.0):
    _check_activation_backward(grad_output, saved, kind, min_val, max_val)
    return torch.empty_like(grad_output)


def _check_channel_scale(op: str, input: torch.Tensor, scale: torch.Tensor, **more: torch.Tensor) -> None:
    check_float_tensors(op, **more, input=input, scale=scale)
    if input.dim() != 4:
        raise RuntimeError(f"{op}: expected a 4-D input [N, C, H, W], got input of size {list(input.shape)}")
    want = (input.shape[0], input.shape[1], 1, 1)
    if tuple(scale.shape) != want:
        raise RuntimeError(f"{op}: scale shape {tuple(scale.shape)} must be {want}, [N, C, 1, 1] of the input")
    for name, t in more.items():
        _check_same_shape(op, name, t, "input", input)


@torch.library.custom_op("tritonkit::channel_scale", mutates_args=(), schema="(Tensor input, Tensor scale) -> Tensor")
def channel_scale(input: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    _check_channel_scale("tritonkit::channel_scale", input, scale)
    return kernels.channel_scale(input, scale)


@channel_scale.register_fake
def _(input, scale):
    _check_channel_scale("tritonkit::channel_scale", input, scale)
    return torch.empty_like(input)


@torch.library.custom_op(
    "tritonkit::channel_scale_backward", mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor scale) -> (Tensor, Tensor)",
)
def channel_scale_backward(grad_output: torch.Tensor, input: torch.Tensor,
                           scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_channel_scale("tritonkit::channel_scale_backward", input, scale, grad_output=grad_output)
    return kernels.channel_scale_backward(grad_output, input, scale)


@channel_scale_backward.register_fake
def _(grad_output, input, scale):
    _check_channel_scale("tritonkit::channel_scale_backward", input, scale, grad_output=grad_output)
    return torch.empty_like(grad_output), grad_output.new_empty(scale.shape)


__all__ = ["KINDS", "SAVES_OUTPUT", "activation", "activation_backward", "add_relu", "bias_grad", "channel_scale",
           "channel_scale_backward", "relu", "relu_backward"]
