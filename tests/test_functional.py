"""tritonkit.functional's faces over the newer ops, forward and backward against torch.nn.functional: depthwise
convolutions through ``conv2d``, average pools, and the one-launch backward of conv and linear layers.

Outputs are NaN-poisoned before every launch (tests/conftest.py), so an unwritten element fails.
"""

import pytest
import torch
import torch.nn.functional as F

import tritonkit.functional as TF
from tritonkit.testing import assert_close, check_against_eager

ops = torch.ops.tritonkit


@pytest.mark.parametrize("stride, padding, dilation, multiplier, relu, channels_last", [
    (1, 1, 1, 1, False, False), (2, 1, 1, 1, True, True), (1, 2, 2, 2, False, True), (2, 0, 1, 2, True, False)])
def test_conv2d_runs_depthwise_on_the_direct_kernels(stride, padding, dilation, multiplier, relu, channels_last):
    c = 5
    x = torch.randn(2, c, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c * multiplier, 1, 3, 3), torch.randn(c * multiplier)

    def eager(x, w, b):
        y = F.conv2d(x, w, b, stride, padding, dilation, c)
        return F.relu(y) if relu else y

    def ours(x, w, b):
        return TF.conv2d(x, w, b, stride, padding, dilation, c, activation="relu" if relu else None)

    leaves = [t.requires_grad_() for t in (x, w, b)]
    check_against_eager(ours, eager, leaves)
    with torch.profiler.profile() as prof:
        ours(*leaves).sum().backward()
    names = {e.name for e in prof.events()}
    assert "tritonkit::depthwise_conv2d" in names and "tritonkit::depthwise_conv2d_weight_grad" in names
    assert "tritonkit::conv2d" not in names


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "ceil_mode": True, "count_include_pad": False},
    {"kernel_size": 2, "divisor_override": 3}])
def test_avg_pool2d(kwargs):
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    check_against_eager(lambda x: TF.avg_pool2d(x, **kwargs), lambda x: F.avg_pool2d(x, **kwargs), [x])


@pytest.mark.parametrize("size", [(2, 3), 1, (None, 2), 5])
def test_adaptive_avg_pool2d(size):
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    check_against_eager(lambda x: TF.adaptive_avg_pool2d(x, size), lambda x: F.adaptive_avg_pool2d(x, size), [x])


def test_adaptive_avg_pool2d_rejects_a_bad_output_size():
    with pytest.raises(ValueError, match="output_size must be 2"):
        TF.adaptive_avg_pool2d(torch.randn(1, 2, 4, 4), (1, 2, 3))


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_layer_backward_is_one_launch(layer):
    """dx, dw and db of a conv or linear layer come from one conv2d_backward / linear_backward call."""
    if layer == "conv":
        leaves = [torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)]
        ours, eager = (lambda x, w, b: TF.conv2d(x, w, b, 1, 1, activation="relu"),
                       lambda x, w, b: F.relu(F.conv2d(x, w, b, 1, 1)))
    else:
        leaves = [torch.randn(3, 5, 7), torch.randn(6, 7), torch.randn(6)]
        ours, eager = (lambda x, w, b: TF.linear(x, w, b, activation="relu"),
                       lambda x, w, b: F.relu(F.linear(x, w, b)))
    leaves = [t.requires_grad_() for t in leaves]
    check_against_eager(ours, eager, leaves)
    with torch.profiler.profile() as prof:
        ours(*leaves).sum().backward()
    backward_ops = [e.name for e in prof.events() if e.name.startswith("tritonkit::") and "grad" in e.name
                    or e.name.endswith("_backward")]
    assert backward_ops == [f"tritonkit::{layer}2d_backward" if layer == "conv" else "tritonkit::linear_backward"]


def test_convert_swaps_a_mobilenet_block_and_trains_like_torch_nn():
    """``tritonkit.nn.convert`` on a depthwise-separable block with average pools: same outputs and
    gradients as torch.nn, every layer swapped for its tritonkit class."""
    import copy

    import tritonkit.nn as tnn

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, 1, 1, groups=4), torch.nn.ReLU6(),
                                torch.nn.Conv2d(4, 6, 1), torch.nn.AvgPool2d(2, ceil_mode=True),
                                torch.nn.AdaptiveAvgPool2d((2, 1)))
    ours = tnn.convert(copy.deepcopy(block))
    assert [type(m) for m in ours] == [tnn.Conv2d, tnn.ReLU6, tnn.Conv2d, tnn.AvgPool2d, tnn.AdaptiveAvgPool2d]
    x = torch.randn(2, 4, 7, 7)
    check_against_eager(ours, block, [x.requires_grad_()])
    x.grad = None
    ours(x).sum().backward()
    block(x).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), block.parameters()):
        assert_close(p.grad, q.grad, grad=True, msg=name)
