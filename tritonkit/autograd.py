"""Autograd for tritonkit's ops: each Function composes ``torch.ops.tritonkit.*`` custom ops and never
launches a kernel itself, so ``torch.compile`` traces straight through it.

The same ``setup_context``/``backward`` pair is also registered on each forward custom op with
``torch.library.register_autograd``, so ``torch.ops.tritonkit.conv2d`` and friends are
differentiable when called directly (and pass ``torch.library.opcheck``'s autograd tests).

When the forward fused a ReLU, backward hands the ReLU *output* to the gradient ops, which mask the
incoming gradient (``grad * (out > 0)``, what ``threshold_backward`` computes) inside their loads.
"""

from __future__ import annotations

import torch

import tritonkit.ops  # noqa: F401  (registers torch.ops.tritonkit.*)
from tritonkit.ops.elementwise import SAVES_OUTPUT

ops = torch.ops.tritonkit


def _epilogue_context(ctx, relu, activation, output):
    """Record a fused epilogue activation (``activation``: the op's trailing ``activation, min_val, max_val``
    arguments as given, defaults for those left out); returns the tensor its backward reads from the forward:
    the output for ReLU (the gradient ops mask by it) and sigmoid, else None (the pre-activation is recomputed)."""
    ctx.relu, ctx.activation = relu, (*activation, *("none", 0.0, 6.0)[len(activation):])
    return output if relu or ctx.activation[0] in SAVES_OUTPUT else None


def _through_activation(ctx, grad, saved, pre_activation):
    """``(dy', mask)``: the gradient the op's gradient ops take and the ReLU output they mask it by. Another
    activation's backward runs first, from the saved output or the recomputed ``pre_activation()``."""
    if ctx.relu or ctx.activation[0] == "none":
        return grad, saved
    return ops.activation_backward(grad, saved if saved is not None else pre_activation(), *ctx.activation), None


class Conv2d(torch.autograd.Function):
    """``y = act(conv2d(x, w) + b)`` for 4-D ``x``.

    dx = conv2d_input_grad(dy * (y > 0), w); dw = conv2d_weight_grad(dy * (y > 0), x);
    db = sum of dy * (y > 0) over N, H, W; when dx and dw are both needed, all three come from one
    ``conv2d_backward`` launch. Another epilogue activation (``tritonkit::conv2d``'s ``activation=``, called
    directly) goes through its ``activation_backward`` first: from the output for sigmoid, else from the
    pre-activation, recomputed (one more conv launch).
    """

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups, relu, activation="none", min_val=0.0,
                max_val=6.0):
        return ops.conv2d(input, weight, bias, stride, padding, dilation, groups, relu, activation, min_val, max_val)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, relu, *act = inputs
        ctx.conv = (list(stride), list(padding), list(dilation), groups)
        ctx.has_bias = bias is not None
        saved = _epilogue_context(ctx, relu, act, output)
        ctx.save_for_backward(input, weight, bias, saved)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        input, weight, bias, saved = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad, relu_out = _through_activation(
            ctx, grad, saved, lambda: ops.conv2d(input, weight, bias, stride, padding, dilation, groups, False))
        needs = ctx.needs_input_grad
        none = (None,) * (len(needs) - 3)
        dx = dw = db = None
        if needs[0] and needs[1]:
            dx, dw, db = ops.conv2d_backward(grad, input, weight, relu_out, stride, padding, dilation, groups,
                                             None, None, ctx.has_bias and needs[2])
            return dx, dw, db, *none
        if needs[0]:
            dx = ops.conv2d_input_grad(grad, weight, relu_out, list(input.shape), stride, padding, dilation, groups)
        if needs[1]:
            dw = ops.conv2d_weight_grad(grad, input, relu_out, list(weight.shape), stride, padding, dilation, groups)
        if ctx.has_bias and needs[2]:
            db = ops.bias_grad(grad, relu_out, 1)
        return dx, dw, db, *none


class Linear(torch.autograd.Function):
    """``y = act(x @ w.T + b)``: dx = (dy * (y > 0)) @ w, dw = (dy * (y > 0)).T @ x, db = sum of dy * (y > 0)
    (all three from one ``linear_backward`` launch when dx and dw are both needed); another epilogue
    activation as in :class:`Conv2d`."""

    @staticmethod
    def forward(input, weight, bias, relu, activation="none", min_val=0.0, max_val=6.0):
        return ops.linear(input, weight, bias, relu, activation, min_val, max_val)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, relu, *act = inputs
        ctx.has_bias = bias is not None
        saved = _epilogue_context(ctx, relu, act, output)
        ctx.save_for_backward(input, weight, bias, saved)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        input, weight, bias, saved = ctx.saved_tensors
        grad, relu_out = _through_activation(ctx, grad, saved, lambda: ops.linear(input, weight, bias, False))
        needs = ctx.needs_input_grad
        none = (None,) * (len(needs) - 3)
        if needs[0] and needs[1]:
            return (*ops.linear_backward(grad, input, weight, relu_out, ctx.has_bias and needs[2]), *none)
        dx = ops.linear_input_grad(grad, weight, relu_out) if needs[0] else None
        dw = ops.linear_weight_grad(grad, input, relu_out) if needs[1] else None
        db = ops.bias_grad(grad, relu_out, -1) if ctx.has_bias and needs[2] else None
        return dx, dw, db, *none


class DepthwiseConv2d(torch.autograd.Function):
    """``y = act(depthwise conv2d(x, w) + b)`` (groups == input channels, ``act`` none / relu / relu6) on
    the direct kernels: dx = depthwise_conv2d_input_grad(dy masked by y), (dw, db) = depthwise_conv2d_weight_grad."""

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, activation):
        return ops.depthwise_conv2d(input, weight, bias, stride, padding, dilation, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, activation = inputs
        ctx.conv = (list(stride), list(padding), list(dilation))
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(input, weight, output if activation != "none" else None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        input, weight, out = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask_kind = ctx.activation if out is not None else "relu"
        dx = dw = db = None
        if needs[0]:
            dx = ops.depthwise_conv2d_input_grad(grad, weight, out, list(input.shape), *ctx.conv, mask_kind)
        if needs[1] or (ctx.has_bias and needs[2]):
            dw, db = ops.depthwise_conv2d_weight_grad(grad, input, out, list(weight.shape), *ctx.conv, mask_kind,
                                                      ctx.has_bias and needs[2])
        return dx, dw if needs[1] else None, db, None, None, None, None


class AvgPool2d(torch.autograd.Function):
    """``y = avg_pool2d(x)`` (eager's windows, ``ceil_mode``, ``count_include_pad``, ``divisor_override``);
    dx spreads each dy over its window with the same divisor."""

    @staticmethod
    def forward(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        return ops.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.pool = inputs[1:]
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (input,) = ctx.saved_tensors
        return ops.avg_pool2d_backward(grad, input, *ctx.pool), None, None, None, None, None, None


class AdaptiveAvgPool2d(torch.autograd.Function):
    """``y = adaptive_avg_pool2d(x, output_size)`` (PyTorch's floor/ceil windows); dx spreads dy back."""

    @staticmethod
    def forward(input, output_size):
        return ops.adaptive_avg_pool2d(input, output_size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (input,) = ctx.saved_tensors
        return ops.adaptive_avg_pool2d_backward(grad, input), None


class MaxPool2d(torch.autograd.Function):
    """``(y, idx) = max_pool2d(x)``; dx scatters dy to the positions in ``idx`` (a gather in the kernel)."""

    @staticmethod
    def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
        return ops.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kernel_size, stride, padding, dilation, ceil_mode, *prologue = inputs
        if any(t is not None and t is not False for t in prologue):
            raise NotImplementedError("tritonkit::max_pool2d: the input prologue (input_mean, ...) has no autograd "
                                      "formula; it is for lowered graphs, whose backward the lowering builds")
        ctx.pool = (list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(input, output[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_indices):
        input, indices = ctx.saved_tensors
        return ops.max_pool2d_backward(grad, input, indices, *ctx.pool), *([None] * 10)


class ReLU(torch.autograd.Function):
    """``y = max(x, 0)``; dx = dy * (y > 0)."""

    @staticmethod
    def forward(input):
        return ops.relu(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (output,) = ctx.saved_tensors
        return ops.relu_backward(grad, output)


class Activation(torch.autograd.Function):
    """``y = kind(x)`` (``tritonkit::activation``); dx = activation_backward(dy, x) from the input, or from
    the output y for sigmoid, as aten's backward ops take them."""

    @staticmethod
    def forward(input, kind, min_val, max_val):
        return ops.activation(input, kind, min_val, max_val)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, kind, min_val, max_val = inputs
        ctx.activation = (kind, min_val, max_val)
        ctx.save_for_backward(output if kind in SAVES_OUTPUT else input)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        return ops.activation_backward(grad, saved, *ctx.activation), None, None, None


class ChannelScale(torch.autograd.Function):
    """``y = x * s`` for s [N, C, 1, 1]: (dx, ds) = channel_scale_backward(dy, x, s) = (dy * s, sum_hw dy * x)."""

    @staticmethod
    def forward(input, scale):
        return ops.channel_scale(input, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return ops.channel_scale_backward(grad, *ctx.saved_tensors)


def _register(op_name: str, function: type[torch.autograd.Function]) -> None:
    torch.library.register_autograd(f"tritonkit::{op_name}", function.backward, setup_context=function.setup_context)


for _name, _function in (("conv2d", Conv2d), ("linear", Linear), ("max_pool2d", MaxPool2d), ("relu", ReLU),
                         ("activation", Activation), ("channel_scale", ChannelScale),
                         ("depthwise_conv2d", DepthwiseConv2d), ("avg_pool2d", AvgPool2d),
                         ("adaptive_avg_pool2d", AdaptiveAvgPool2d)):
    _register(_name, _function)
