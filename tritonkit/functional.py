"""``torch.nn.functional``-style entry points over tritonkit's autograd Functions.

Signatures match ``torch.nn.functional``; ``activation`` (None or ``"relu"``) fuses a ReLU into the
conv or linear epilogue. ``inplace=True`` (where ``torch.nn.functional`` has it) writes the result into
``input`` and returns ``input``, with eager's errors (a leaf that requires grad, overlapping memory);
the gradient then comes from a copy of the original input, as eager's in-place backward does.
Unbatched (C, H, W) inputs and string paddings are resolved here, so the custom ops only
ever see 4-D inputs and numeric paddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tritonkit import autograd

_ACTIVATIONS = (None, "relu")


def _pair(name: str, value) -> list[int]:
    if isinstance(value, int):
        return [value, value]
    value = list(value)
    if len(value) == 1:
        return value * 2
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise RuntimeError(f"expected {name} to be a single integer value or a list of 2 values, got {name}={value}")
    return value


def _check_activation(activation) -> bool:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def _batched(input: torch.Tensor, op: str) -> tuple[torch.Tensor, bool]:
    if input.dim() == 3:
        return input.unsqueeze(0), True
    if input.dim() == 4:
        return input, False
    raise RuntimeError(
        f"Expected 3D (unbatched) or 4D (batched) input to {op}, but got input of size: {list(input.shape)}")


def _same_padding(input, weight, stride, dilation) -> tuple[torch.Tensor, list[int]]:
    """Padding for ``padding="same"``; odd total padding puts the extra row/column last, as PyTorch does."""
    if stride != [1, 1]:
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    left = [t // 2 for t in total]
    extra = [t - 2 * lo for t, lo in zip(total, left)]
    if any(extra):
        input = F.pad(input, [0, extra[1], 0, extra[0]])
    return input, left


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, activation=None):
    """2-D convolution, ``torch.nn.functional.conv2d``'s signature, with an optional fused ReLU; a depthwise
    convolution (``groups`` == input channels, one input channel per filter) runs on the direct depthwise
    kernels, any other on the implicit GEMM."""
    relu = _check_activation(activation)
    x, unbatched = _batched(input, "conv2d")
    stride, dilation = _pair("stride", stride), _pair("dilation", dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same":
            x, padding = _same_padding(x, weight, stride, dilation)
        else:
            raise ValueError(f"Invalid padding string {padding!r}, should be one of {{'valid', 'same'}}")
    else:
        padding = _pair("padding", padding)
    if groups > 1 and groups == x.shape[1] and weight.dim() == 4 and weight.shape[1] == 1:  # depthwise
        y = autograd.DepthwiseConv2d.apply(x, weight, bias, stride, padding, dilation, "relu" if relu else "none")
    else:
        y = autograd.Conv2d.apply(x, weight, bias, stride, padding, dilation, groups, relu)
    return y.squeeze(0) if unbatched else y


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``relu(conv2d(...))`` as one kernel."""
    return conv2d(input, weight, bias, stride, padding, dilation, groups, activation="relu")


def conv2d_relu_maxpool(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                        pool_kernel_size=2, pool_stride=None, pool_padding=0, pool_dilation=1, ceil_mode=False):
    """``max_pool2d(relu(conv2d(...)), pool_kernel_size, ...)``.

    Without autograd (inference) this is one kernel that never writes the unpooled activation; when a
    gradient is needed it is ``conv2d_relu`` followed by ``max_pool2d``, which backward needs anyway.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias))
    if needs_grad or isinstance(padding, str):
        y = conv2d(input, weight, bias, stride, padding, dilation, groups, activation="relu")
        return max_pool2d(y, pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode)
    x, unbatched = _batched(input, "conv2d")
    pool_kernel_size = _pair("pool_kernel_size", pool_kernel_size)
    pool_stride = pool_kernel_size if pool_stride is None else _pair("pool_stride", pool_stride)
    y = torch.ops.tritonkit.conv2d_relu_maxpool(
        x, weight, bias, _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation), groups,
        pool_kernel_size, pool_stride, _pair("pool_padding", pool_padding), _pair("pool_dilation", pool_dilation),
        bool(ceil_mode))
    return y.squeeze(0) if unbatched else y


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling, ``torch.nn.functional.max_pool2d``'s signature."""
    x, unbatched = _batched(input, "max_pool2d")
    kernel_size = _pair("kernel_size", kernel_size)
    no_stride = stride is None or (not isinstance(stride, int) and len(stride) == 0)
    stride = kernel_size if no_stride else _pair("stride", stride)
    out, indices = autograd.MaxPool2d.apply(x, kernel_size, stride, _pair("padding", padding),
                                            _pair("dilation", dilation), bool(ceil_mode))
    if unbatched:
        out, indices = out.squeeze(0), indices.squeeze(0)
    return (out, indices) if return_indices else out


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """2-D average pooling, ``torch.nn.functional.avg_pool2d``'s signature."""
    kernel_size = _pair("kernel_size", kernel_size)
    no_stride = stride is None or (not isinstance(stride, int) and len(stride) == 0)
    stride = kernel_size if no_stride else _pair("stride", stride)
    return autograd.AvgPool2d.apply(input, kernel_size, stride, _pair("padding", padding), bool(ceil_mode),
                                    bool(count_include_pad), divisor_override)


def adaptive_avg_pool2d(input, output_size):
    """``torch.nn.functional.adaptive_avg_pool2d``: any output size (None keeps that input dimension)."""
    size = [output_size, output_size] if isinstance(output_size, int) else list(output_size)
    if len(size) != 2:
        raise ValueError(f"adaptive_avg_pool2d: output_size must be 2, got {len(size)}")
    size = [input.shape[d - 2] if s is None else s for d, s in enumerate(size)]
    return autograd.AdaptiveAvgPool2d.apply(input, size)


def linear(input, weight, bias=None, *, activation=None):
    """``input @ weight.T + bias`` over any leading dims, with an optional fused ReLU."""
    return autograd.Linear.apply(input, weight, bias, _check_activation(activation))


def relu(input):
    """``max(input, 0)``."""
    return autograd.ReLU.apply(input)


def _activation(input, kind, min_val=-1.0, max_val=1.0, inplace=False):
    if not inplace:
        return autograd.Activation.apply(input, kind, min_val, max_val)
    records = torch.is_grad_enabled() and input.requires_grad
    out = autograd.Activation.apply(input.clone() if records else input, kind, min_val, max_val)
    return input.copy_(out)


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    """``clamp(input, min_val, max_val)``; gradient 0 at both bounds, as ``hardtanh_backward``."""
    if min_val > max_val:
        raise ValueError("min_val cannot be greater than max_val")
    return _activation(input, "hardtanh", float(min_val), float(max_val), inplace)


def relu6(input, inplace=False):
    """``hardtanh(input, 0, 6)``."""
    return _activation(input, "hardtanh", 0.0, 6.0, inplace)


def hardswish(input, inplace=False):
    """``input * clamp(input + 3, 0, 6) / 6``."""
    return _activation(input, "hardswish", inplace=inplace)


def hardsigmoid(input, inplace=False):
    """``clamp(input + 3, 0, 6) / 6``."""
    return _activation(input, "hardsigmoid", inplace=inplace)


def silu(input, inplace=False):
    """``input * sigmoid(input)``."""
    return _activation(input, "silu", inplace=inplace)


def sigmoid(input):
    """``1 / (1 + exp(-input))``; its gradient is computed from the output."""
    return _activation(input, "sigmoid")


def gelu(input, approximate="none"):
    """``input * Phi(input)`` (``approximate="none"``) or its tanh approximation (``"tanh"``)."""
    if approximate not in ("none", "tanh"):
        raise RuntimeError("approximate argument must be either none or tanh.")
    return _activation(input, "gelu" if approximate == "none" else "gelu_tanh")
