"""``tritonkit::max_pool2d`` and ``tritonkit::max_pool2d_backward`` custom ops.

``max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode) -> (values, indices)`` is
``aten.max_pool2d_with_indices`` on 4-D input (the functional layer unsqueezes 3-D input): each of
``kernel_size``, ``padding``, ``dilation`` is one int or a pair, ``stride`` may also be empty
(meaning ``kernel_size``); indices are int64 flat offsets in each ``H x W`` plane; outputs take the
memory format eager picks (channels_last in, channels_last out). With ``input_mean``/``input_invstd``
(``input_weight``/``input_bias``, ``input_relu``: ``tritonkit::conv2d_bn_stats``' input prologue) it pools
``relu((input - input_mean) * input_invstd * input_weight + input_bias)`` computed as it loads ``input``, a
training BatchNorm's output that is never stored (the ResNet stem's bn1 -> ReLU -> max-pool).

``max_pool2d_backward(grad_output, input, indices, ...)`` scatters (as a deterministic gather)
``grad_output`` to the positions ``indices`` name; the result is laid out like eager's grad_input.
``max_pool2d_backward_bn_partials(..., input_mean, input_invstd, input_weight=None, input_bias=None,
input_relu=False) -> (grad_bn, partials)``: the same for a pool that read its input through the prologue,
taken on through the ReLU to the BatchNorm's output, with that BatchNorm backward's two reductions.

``global_avg_pool2d(input) -> Tensor`` is ``aten.mean.dim(input, [-1, -2], keepdim=True)`` (what
``adaptive_avg_pool2d(input, 1)`` becomes in AOTAutograd's graphs) on 4-D input: ``[N, C, 1, 1]`` with
strides ``(C, 1, 1, 1)`` for every input layout, as eager's mean; float32 accumulation.

``global_avg_pool2d_backward(grad_output, input_size, channels_last) -> Tensor`` is the backward
graph's ``div(expand(grad_output, input_size), H * W)``: ``grad_output`` (``[N, C, 1, 1]``, any strides)
divided by ``H * W`` at every position of ``input_size``, contiguous (what eager's ``div`` of the
expanded gradient gives) or, with ``channels_last``, channels_last (what an eager-autograd face wants
for a channels_last input, as ``_adaptive_avg_pool2d_backward`` gives). ``residual`` (optional, of
``input_size``, same dtype): added in the same pass, the graph's ``add`` of the pooled tensor's other
gradient (a squeeze-excitation gate scales the tensor it pools).

``avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)`` and
``avg_pool2d_backward(grad_output, input, <the same>)`` are ``aten.avg_pool2d`` / ``avg_pool2d_backward``
(3-D or 4-D input; ``stride`` empty means ``kernel_size``); ``adaptive_avg_pool2d(input, output_size)`` and
``adaptive_avg_pool2d_backward(grad_output, input)`` are ``aten._adaptive_avg_pool2d`` and its backward for
any output size. Results are laid out as eager's (channels_last in, channels_last out; 3-D contiguous).

Arguments are checked before any launch, in the order and with the exception types aten uses.
"""

from __future__ import annotations

import torch

from tritonkit.kernels import pool as kernels
from tritonkit.ops.checks import check_float_tensors, check_input_prologue

_FWD, _BWD = "tritonkit::max_pool2d", "tritonkit::max_pool2d_backward"
_SCHEMA_ARGS = "int[] kernel_size, int[] stride, int[] padding, int[] dilation, bool ceil_mode"


def _pair(op: str, name: str, value, default=None) -> tuple:
    value = list(value)
    if not value and default is not None:
        return default
    if len(value) == 1:
        return (value[0], value[0])
    if len(value) == 2:
        return (value[0], value[1])
    allowed = "a single int or a pair of ints" if default is None else "empty, a single int or a pair of ints"
    raise RuntimeError(f"{op}: {name} must be {allowed}, got {value}")


def _pool_geometry(op: str, input: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode):
    """Validate input and pooling arguments; return ``(k, s, p, d)`` pairs and the ``(OH, OW)`` size."""
    check_float_tensors(op, input=input)
    k = _pair(op, "kernel_size", kernel_size)
    s = _pair(op, "stride", stride, default=k)
    p = _pair(op, "padding", padding)
    d = _pair(op, "dilation", dilation)
    if input.dim() != 4:
        raise RuntimeError(f"{op}: expected a 4-D (N, C, H, W) input, got shape {tuple(input.shape)}")
    if min(k) <= 0:
        raise RuntimeError(f"{op}: kernel_size should be greater than zero, but got kernel_size={list(k)}")
    if min(s) <= 0:
        raise RuntimeError(f"{op}: stride should be greater than zero, but got stride={list(s)}")
    if min(d) <= 0:
        raise RuntimeError(f"{op}: dilation should be greater than zero, but got dilation={list(d)}")
    if min(p) < 0:
        raise RuntimeError(f"{op}: padding must be non-negative, but got padding={list(p)}")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise RuntimeError(
            f"{op}: padding should be at most half of kernel_size, but got padding={list(p)}, "
            f"kernel_size={list(k)}"
        )
    C, H, W = input.shape[1:]
    if C == 0 or H == 0 or W == 0:
        raise RuntimeError(
            f"{op}: expected input (N, C, H, W) with non-zero C, H, W (optional 0 batch size), "
            f"but got: {list(input.shape)}"
        )
    OH = kernels.pool_output_size(H, k[0], s[0], p[0], d[0], ceil_mode)
    OW = kernels.pool_output_size(W, k[1], s[1], p[1], d[1], ceil_mode)
    if OH < 1 or OW < 1:
        raise RuntimeError(
            f"{op}: given input size ({C}x{H}x{W}), kernel_size={list(k)}, stride={list(s)}, "
            f"padding={list(p)}, dilation={list(d)}: calculated output size ({C}x{OH}x{OW}) is too small"
        )
    return (k, s, p, d), (OH, OW)


_PROLOGUE_SCHEMA = ("Tensor? input_mean=None, Tensor? input_invstd=None, Tensor? input_weight=None, "
                    "Tensor? input_bias=None, bool input_relu=False")


@torch.library.custom_op(
    "tritonkit::max_pool2d", mutates_args=(),
    schema=f"(Tensor input, {_SCHEMA_ARGS}, {_PROLOGUE_SCHEMA}) -> (Tensor, Tensor)"
)
def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, input_mean=None, input_invstd=None,
               input_weight=None, input_bias=None, input_relu=False):
    params, _ = _pool_geometry(_FWD, input, kernel_size, stride, padding, dilation, ceil_mode)
    norm = check_input_prologue(_FWD, input, input_mean, input_invstd, input_weight, input_bias, input_relu)
    return kernels.max_pool2d_forward(input, *params, ceil_mode, input_norm=norm, input_relu=input_relu)


@max_pool2d.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode, input_mean=None, input_invstd=None, input_weight=None,
      input_bias=None, input_relu=False):
    _, (OH, OW) = _pool_geometry(_FWD, input, kernel_size, stride, padding, dilation, ceil_mode)
    check_input_prologue(_FWD, input, input_mean, input_invstd, input_weight, input_bias, input_relu)
    fmt = kernels.output_memory_format(input)
    shape = (input.shape[0], input.shape[1], OH, OW)
    return (
        torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt),
        torch.empty(shape, dtype=torch.int64, device=input.device, memory_format=fmt),
    )


def _check_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    op = _BWD
    params, (OH, OW) = _pool_geometry(op, input, kernel_size, stride, padding, dilation, ceil_mode)
    check_float_tensors(op, input=input, grad_output=grad_output)
    expected = (input.shape[0], input.shape[1], OH, OW)
    for name, t in (("grad_output", grad_output), ("indices", indices)):
        if tuple(t.shape) != expected:
            raise RuntimeError(f"{op}: expected {name} of the pooled shape {expected}, got {tuple(t.shape)}")
    if indices.dtype != torch.int64:
        raise RuntimeError(f"{op}: indices must be int64, got {indices.dtype}")
    if indices.device != input.device:
        raise RuntimeError(f"{op}: indices is on {indices.device} but input is on {input.device}")
    return params


@torch.library.custom_op(
    "tritonkit::max_pool2d_backward",
    mutates_args=(),
    schema=f"(Tensor grad_output, Tensor input, Tensor indices, {_SCHEMA_ARGS}) -> Tensor",
)
def max_pool2d_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    params = _check_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode)
    return kernels.max_pool2d_backward(grad_output, input, indices, *params)


@max_pool2d_backward.register_fake
def _(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    _check_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode)
    return torch.empty(input.shape, dtype=input.dtype, device=input.device,
                       memory_format=kernels.output_memory_format(input))


_BWD_PARTIALS = "tritonkit::max_pool2d_backward_bn_partials"


def _check_backward_bn_partials(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode,
                                prologue):
    params = _check_backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode)
    return params, check_input_prologue(_BWD_PARTIALS, input, *prologue)


@torch.library.custom_op(
    _BWD_PARTIALS, mutates_args=(),
    schema=f"(Tensor grad_output, Tensor input, Tensor indices, {_SCHEMA_ARGS}, Tensor input_mean, "
           "Tensor input_invstd, Tensor? input_weight=None, Tensor? input_bias=None, bool input_relu=False) "
           "-> (Tensor, Tensor)",
)
def max_pool2d_backward_bn_partials(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode,
                                    input_mean, input_invstd, input_weight=None, input_bias=None, input_relu=False):
    """``max_pool2d_backward`` of a pool whose input prologue was a training BatchNorm (+ ReLU) of ``input``,
    starting that BatchNorm's backward: ``(grad_bn, partials)``, ``grad_bn`` the gradient with respect to the
    BN output (through the ReLU's mask, the output recomputed), ``partials`` float32 ``[T, 2, C]`` whose sums
    over T are sum ``grad_bn`` and sum ``grad_bn * (input - input_mean)`` (``batch_norm_backward``'s
    ``grad_partials``)."""
    prologue = (input_mean, input_invstd, input_weight, input_bias, input_relu)
    params, norm = _check_backward_bn_partials(grad_output, input, indices, kernel_size, stride, padding, dilation,
                                               ceil_mode, prologue)
    return kernels.max_pool2d_backward(grad_output, input, indices, *params, input_norm=norm, input_relu=input_relu,
                                       grad_stats=True)


@max_pool2d_backward_bn_partials.register_fake
def _(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode, input_mean, input_invstd,
      input_weight=None, input_bias=None, input_relu=False):
    prologue = (input_mean, input_invstd, input_weight, input_bias, input_relu)
    _check_backward_bn_partials(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode,
                                prologue)
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                     memory_format=kernels.output_memory_format(input))
    return dx, input.new_empty((kernels.grad_stat_tiles(input.shape), 2, input.shape[1]), dtype=torch.float32)


_GAP, _GAP_BWD = "tritonkit::global_avg_pool2d", "tritonkit::global_avg_pool2d_backward"


def _check_global_avg_pool2d(input):
    check_float_tensors(_GAP, input=input)
    if input.dim() != 4:
        raise RuntimeError(f"{_GAP}: expected a 4-D (N, C, H, W) input, got shape {tuple(input.shape)}")


@torch.library.custom_op(_GAP, mutates_args=(), schema="(Tensor input) -> Tensor")
def global_avg_pool2d(input):
    _check_global_avg_pool2d(input)
    return kernels.global_avg_pool2d(input)


@global_avg_pool2d.register_fake
def _(input):
    _check_global_avg_pool2d(input)
    return input.new_empty((input.shape[0], input.shape[1], 1, 1))


def _check_global_avg_pool2d_backward(grad_output, input_size, residual=None):
    check_float_tensors(_GAP_BWD, grad_output=grad_output, residual=residual)
    if len(input_size) != 4:
        raise RuntimeError(f"{_GAP_BWD}: expected input_size (N, C, H, W), got {list(input_size)}")
    if min(input_size) < 0:
        raise RuntimeError(f"{_GAP_BWD}: input_size must be non-negative, got {list(input_size)}")
    expected = (input_size[0], input_size[1], 1, 1)
    if tuple(grad_output.shape) != expected:
        raise RuntimeError(f"{_GAP_BWD}: expected grad_output of the pooled shape {expected}, "
                           f"got {tuple(grad_output.shape)}")
    if residual is not None and list(residual.shape) != list(input_size):
        raise RuntimeError(f"{_GAP_BWD}: expected residual of input_size {list(input_size)}, "
                           f"got {list(residual.shape)}")


@torch.library.custom_op(
    _GAP_BWD, mutates_args=(),
    schema="(Tensor grad_output, SymInt[] input_size, bool channels_last, Tensor? residual=None) -> Tensor",
)
def global_avg_pool2d_backward(grad_output, input_size, channels_last, residual=None):
    _check_global_avg_pool2d_backward(grad_output, input_size, residual)
    return kernels.global_avg_pool2d_backward(grad_output, input_size, channels_last, residual)


@global_avg_pool2d_backward.register_fake
def _(grad_output, input_size, channels_last, residual=None):
    _check_global_avg_pool2d_backward(grad_output, input_size, residual)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(list(input_size), dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)


# --- average pool: windowed and adaptive --------------------------------------------------------------
_AVG, _AVG_BWD = "tritonkit::avg_pool2d", "tritonkit::avg_pool2d_backward"
_ADAPTIVE, _ADAPTIVE_BWD = "tritonkit::adaptive_avg_pool2d", "tritonkit::adaptive_avg_pool2d_backward"
_AVG_ARGS = ("int[] kernel_size, int[] stride, int[] padding, bool ceil_mode, bool count_include_pad, "
             "int? divisor_override")


def _avg_geometry(op, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """aten's ``avg_pool2d`` checks, in its order; returns the kernel's ``params`` and ``(OH, OW)``."""
    check_float_tensors(op, input=input)
    if len(kernel_size) not in (1, 2):
        raise RuntimeError(f"{op}: kernel_size must either be a single int, or a tuple of two ints")
    k = (kernel_size[0], kernel_size[-1])
    if len(stride) not in (0, 1, 2):
        raise RuntimeError(f"{op}: stride must either be omitted, a single int, or a tuple of two ints")
    s = (stride[0], stride[-1]) if len(stride) else k
    if len(padding) not in (1, 2):
        raise RuntimeError(f"{op}: padding must either be a single int, or a tuple of two ints")
    p = (padding[0], padding[-1])
    if divisor_override == 0:
        raise RuntimeError(f"{op}: divisor must be not zero")
    if input.dim() < 3:
        raise IndexError(f"{op}: Dimension out of range: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, "
                         f"got shape {list(input.shape)}")
    for kk, ss, pp in zip(k, s, p):  # pooling_output_shape, H then W
        if ss == 0:
            raise RuntimeError(f"{op}: stride should not be zero")
        if pp < 0:
            raise RuntimeError(f"{op}: pad must be non-negative, but got pad: {pp}")
        if pp > int(kk / 2):  # C++ division: truncates toward zero
            raise RuntimeError(f"{op}: pad should be at most half of effective kernel size, but got pad={pp}, "
                               f"kernel_size={kk} and dilation=1")
    if min(k) <= 0:
        raise RuntimeError(f"{op}: kernel size should be greater than zero, but got kH: {k[0]} kW: {k[1]}")
    if min(s) <= 0:
        raise RuntimeError(f"{op}: stride should be greater than zero, but got dH: {s[0]} dW: {s[1]}")
    if input.dim() > 4 or 0 in input.shape[-3:]:
        raise RuntimeError(f"{op}: Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, "
                           f"but got:{list(input.shape)}")
    C, H, W = input.shape[-3:]
    OH = kernels.pool_output_size(H, k[0], s[0], p[0], 1, ceil_mode)
    OW = kernels.pool_output_size(W, k[1], s[1], p[1], 1, ceil_mode)
    if OH < 1 or OW < 1:
        raise RuntimeError(f"{op}: Given input size: ({C}x{H}x{W}). Calculated output size: ({C}x{OH}x{OW}). "
                           "Output size is too small")
    return (k, s, p, count_include_pad, divisor_override), (OH, OW)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """4-D input as it is; 3-D ``(C, H, W)`` as a contiguous ``(1, C, H, W)`` (eager's 3-D results are
    contiguous)."""
    return t if t.dim() == 4 else t.contiguous().unsqueeze(0)


def _like_input(input: torch.Tensor, shape) -> torch.Tensor:
    """An empty tensor of ``shape`` laid out as eager lays out a pool's results for ``input``."""
    fmt = kernels.output_memory_format(input) if input.dim() == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)


def _pooled(input: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return out if input.dim() == 4 else out.squeeze(0)


@torch.library.custom_op(_AVG, mutates_args=(), schema=f"(Tensor input, {_AVG_ARGS}) -> Tensor")
def avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    params, size = _avg_geometry(_AVG, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                 divisor_override)
    return _pooled(input, kernels.avg_pool2d_forward(_as_4d(input), size, params))


@avg_pool2d.register_fake
def _(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    _, size = _avg_geometry(_AVG, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override)
    return _like_input(input, (*input.shape[:-2], *size))


def _check_avg_backward(grad_output, input, *args):
    params, size = _avg_geometry(_AVG_BWD, input, *args)
    check_float_tensors(_AVG_BWD, input=input, grad_output=grad_output)
    expected = (*input.shape[:-2], *size)
    if tuple(grad_output.shape) != expected:
        raise RuntimeError(f"{_AVG_BWD}: expected grad_output of the pooled shape {expected}, "
                           f"got {tuple(grad_output.shape)}")
    return params


@torch.library.custom_op(_AVG_BWD, mutates_args=(), schema=f"(Tensor grad_output, Tensor input, {_AVG_ARGS}) -> Tensor")
def avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override):
    params = _check_avg_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                 divisor_override)
    return _pooled(input, kernels.avg_pool2d_backward(_as_4d(grad_output), _as_4d(input), params))


@avg_pool2d_backward.register_fake
def _(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    _check_avg_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                        divisor_override)
    return _like_input(input, input.shape)


def _check_adaptive(input, output_size):
    op = _ADAPTIVE
    check_float_tensors(op, input=input)
    if len(output_size) != 2:
        raise RuntimeError(f"{op}: output_size must be 2")
    if min(output_size) < 0:
        raise RuntimeError(f"{op}: elements of output_size must be greater than or equal to 0 but received "
                           f"{{{output_size[0]}, {output_size[1]}}}")
    if input.dim() not in (3, 4):
        raise RuntimeError(f"{op}: Expected 3D or 4D tensor, but got {list(input.shape)}")
    for i in (-2, -1):
        if input.shape[i] == 0:
            raise RuntimeError(f"{op}: Expected input to have non-zero size for non-batch dimensions, but input "
                               f"has sizes {list(input.shape)} with dimension {i + input.dim()} being empty")
    return tuple(output_size)


@torch.library.custom_op(_ADAPTIVE, mutates_args=(), schema="(Tensor input, int[] output_size) -> Tensor")
def adaptive_avg_pool2d(input, output_size):
    size = _check_adaptive(input, output_size)
    return _pooled(input, kernels.avg_pool2d_forward(_as_4d(input), size))


@adaptive_avg_pool2d.register_fake
def _(input, output_size):
    size = _check_adaptive(input, output_size)
    return _like_input(input, (*input.shape[:-2], *size))


def _check_adaptive_backward(grad_output, input):
    op = _ADAPTIVE_BWD
    check_float_tensors(op, input=input, grad_output=grad_output)
    for i in range(1, grad_output.dim()):
        if grad_output.shape[i] == 0:
            raise RuntimeError(f"{op}: Expected grad_output to have non-zero size for non-batch dimensions, but "
                               f"grad_output has sizes {list(grad_output.shape)} with dimension {i} being empty")
    if input.dim() not in (3, 4):
        raise RuntimeError(f"{op}: Expected 3D or 4D tensor, but got {list(input.shape)}")
    if grad_output.dim() != input.dim() or grad_output.shape[:-2] != input.shape[:-2]:
        raise RuntimeError(f"{op}: expected grad_output of size {[*input.shape[:-2], 'OH', 'OW']} for input of "
                           f"size {list(input.shape)}, got {list(grad_output.shape)}")
    _check_adaptive(input, grad_output.shape[-2:])


@torch.library.custom_op(_ADAPTIVE_BWD, mutates_args=(), schema="(Tensor grad_output, Tensor input) -> Tensor")
def adaptive_avg_pool2d_backward(grad_output, input):
    _check_adaptive_backward(grad_output, input)
    return _pooled(input, kernels.avg_pool2d_backward(_as_4d(grad_output), _as_4d(input)))


@adaptive_avg_pool2d_backward.register_fake
def _(grad_output, input):
    _check_adaptive_backward(grad_output, input)
    return _like_input(input, input.shape)


__all__ = ["adaptive_avg_pool2d", "adaptive_avg_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
           "global_avg_pool2d", "global_avg_pool2d_backward", "max_pool2d", "max_pool2d_backward"]
