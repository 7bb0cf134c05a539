"""``torch.ops.tritonkit.layer_norm`` / ``layer_norm_backward`` over ``tritonkit.kernels.layer_norm``:
LayerNorm over the last dimension, as aten's ``native_layer_norm(input, [C], weight, bias, eps)`` and
``native_layer_norm_backward``.

* ``layer_norm(input, weight, bias, eps) -> (out, mean, rstd)``: ``out`` contiguous in the input's dtype,
  ``mean``/``rstd`` of shape ``[*input.shape[:-1], 1]`` (the input's dtype on the CPU, float32 elsewhere,
  as aten's fake tensors record them);
* ``layer_norm_backward(grad_out, input, mean, rstd, weight, output_mask) -> (grad_input?, grad_weight?,
  grad_bias?)``: None where ``output_mask`` says so; grad_input in the input's layout (``empty_like``),
  the parameter gradients summed over every leading dim in float32 in a fixed order (deterministic), in
  weight's dtype.

The input has at least one dimension and at most ``kernels.layer_norm.MAX_C`` elements in its last;
weight and bias are 1-D of that length, float32 or the input's dtype. Arguments are checked before any
launch with the exception types aten raises for the same mistake (RuntimeError).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tritonkit.kernels import layer_norm as kernels
from tritonkit.ops.checks import check_channel_vectors, check_float_tensors


def _check(op, input, weight, bias, **others):
    check_float_tensors(op, input=input, **others)
    if input.dim() < 1:
        raise RuntimeError(f"{op}: expected an input with at least one dimension, got a 0-D input")
    C = input.shape[-1]
    if C > kernels.MAX_C:
        raise RuntimeError(f"{op}: a normalized dimension of {C} elements is over tritonkit's {kernels.MAX_C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise RuntimeError(f"{op}: Expected {name} to be of same shape as normalized_shape, but got {name} of "
                               f"shape {list(t.shape)} and normalized_shape = [{C}]")
    check_channel_vectors(op, input, C, "normalized element", weight=weight, bias=bias)
    return C


def _stats_like(input):
    return input.new_empty((*input.shape[:-1], 1), dtype=kernels.stats_dtype(input))


@torch.library.custom_op("tritonkit::layer_norm", mutates_args=())
def layer_norm(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)`` of LayerNorm over the last dimension (module doc)."""
    _check("tritonkit.layer_norm", input, weight, bias)
    return kernels.layer_norm(input, weight, bias, eps)


@layer_norm.register_fake
def _(input, weight, bias, eps):
    _check("tritonkit.layer_norm", input, weight, bias)
    return input.new_empty(input.shape), _stats_like(input), _stats_like(input)


def _check_backward(grad_out, input, mean, rstd, weight, output_mask):
    op = "tritonkit.layer_norm_backward"
    C = _check(op, input, weight, None, grad_out=grad_out)
    if tuple(grad_out.shape) != tuple(input.shape):
        raise RuntimeError(f"{op}: grad_out of size {list(grad_out.shape)} must match input {list(input.shape)}")
    want = (*input.shape[:-1], 1)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if tuple(t.shape) != want or t.dtype not in (torch.float32, input.dtype) or t.device != input.device:
            raise RuntimeError(f"{op}: {name} must be of shape {list(want)}, float32 or the input's dtype, on the "
                               f"input's device; got {t.dtype} {list(t.shape)} on {t.device}")
    if len(output_mask) != 3:
        raise RuntimeError(f"{op}: output_mask must have 3 entries, got {list(output_mask)}")
    return C


@torch.library.custom_op("tritonkit::layer_norm_backward", mutates_args=(),
                         schema="(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, "
                                "bool[3] output_mask) -> (Tensor?, Tensor?, Tensor?)")
def layer_norm_backward(grad_out, input, mean, rstd, weight, output_mask: Sequence[bool]):
    _check_backward(grad_out, input, mean, rstd, weight, output_mask)
    return kernels.layer_norm_backward(grad_out, input, mean, rstd, weight, output_mask)


@layer_norm_backward.register_fake
def _(grad_out, input, mean, rstd, weight, output_mask):
    C = _check_backward(grad_out, input, mean, rstd, weight, output_mask)
    param_dtype = weight.dtype if weight is not None else input.dtype
    want_dx, want_dw, want_db = output_mask
    return (torch.empty_like(input) if want_dx else None,
            input.new_empty((C,), dtype=param_dtype) if want_dw else None,
            input.new_empty((C,), dtype=param_dtype) if want_db else None)


__all__ = ["layer_norm", "layer_norm_backward"]
