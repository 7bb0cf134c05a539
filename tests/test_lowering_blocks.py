"""The blocks of MobileNetV3, EfficientNet, RegNet and ConvNeXt through the backend, each in a tiny net
(stem, two blocks, global pool, classifier): training and inference against eager, judged against a float64
copy of the model (``tritonkit.testing``'s BatchNorm-net checks), and what ``explain`` lowers.

MobileNetV3, EfficientNet and RegNet run every conv (depthwise, grouped, 1x1), BatchNorm, activation
(hardswish, hardsigmoid, SiLU, sigmoid, ReLU), squeeze-excitation gate, pool, residual add, the classifier
and the loss on tritonkit kernels, with no ATen compute op left. ConvNeXt's layer-scale multiply over the
channel-last dim and its residual add of two tensors in different memory layouts stay eager; its 7x7
depthwise conv, LayerNorm over channels, GELU MLP (``nn.Linear`` over channels) and the pool, classifier
and loss are tritonkit's."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tritonkit.lowering import explain
from tritonkit.runtime import default_device
from tritonkit.testing import assert_bn_net_infers_like_eager, assert_bn_net_trains_like_eager, train_steps

DEVICE = default_device()


def conv_bn(cin, cout, k=1, stride=1, groups=1, act=None):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class SqueezeExcite(nn.Module):
    """Global average pool, 1x1 conv, activation, 1x1 conv, gate, channel-wise multiply."""

    def __init__(self, channels, squeeze, act=nn.ReLU, gate=nn.Hardsigmoid):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = act(), gate()

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class InvertedResidual(nn.Module):
    """MobileNetV3's block (hardswish, SE with ReLU and hardsigmoid) or EfficientNet's MBConv (SiLU, SE
    with SiLU and sigmoid, stochastic depth off): 1x1 expand, kxk depthwise, SE, 1x1 project, identity."""

    def __init__(self, cin, cout, k, stride, expand, act, se_act, gate):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, act=act)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, k, stride, hidden, act),
                   SqueezeExcite(hidden, max(hidden // 4, 2), se_act, gate), conv_bn(hidden, cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class RegNetBlock(nn.Module):
    """RegNetY's bottleneck: 1x1, 3x3 grouped (group width 4), SE, 1x1, each with BN; a 1x1 stride-2 downsample."""

    def __init__(self, cin, cout, stride, group_width=4):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, act=nn.ReLU),
                                  conv_bn(cout, cout, 3, stride, cout // group_width, nn.ReLU),
                                  SqueezeExcite(cout, max(cin // 4, 2), nn.ReLU, nn.Sigmoid), conv_bn(cout, cout))
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.body(x) + self.down(x))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise, LayerNorm over channels, Linear expand + GELU, Linear project, layer scale, residual."""

    def __init__(self, dim):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self, stem, blocks, width, classes=5):
        super().__init__()
        self.stem, self.blocks, self.fc = stem, nn.Sequential(*blocks), nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def mobilenet_v3():
    block = dict(act=nn.Hardswish, se_act=nn.ReLU, gate=nn.Hardsigmoid)
    return Net(conv_bn(3, 8, 3, 2, act=nn.Hardswish),
               [InvertedResidual(8, 8, 3, 1, 2, **block), InvertedResidual(8, 12, 5, 2, 3, **block)], 12)


def efficientnet():
    block = dict(act=nn.SiLU, se_act=nn.SiLU, gate=nn.Sigmoid)
    return Net(conv_bn(3, 8, 3, 2, act=nn.SiLU),
               [InvertedResidual(8, 8, 3, 1, 1, **block), InvertedResidual(8, 12, 5, 2, 4, **block)], 12)


def regnet():
    return Net(conv_bn(3, 8, 3, 2, act=nn.ReLU), [RegNetBlock(8, 8, 1), RegNetBlock(8, 16, 2)], 16)


def convnext():
    return Net(nn.Sequential(nn.Conv2d(3, 8, 4, 4), LayerNorm2d(8)), [ConvNeXtBlock(8), ConvNeXtBlock(8)], 8)


NETS = {"mobilenet_v3": mobilenet_v3, "efficientnet": efficientnet, "regnet": regnet, "convnext": convnext}
# What stays eager, per graph kind: ConvNeXt's LayerNorm and what surrounds it (module doc).
CONVNEXT_EAGER = {
    "forward": {"aten.mul.Tensor", "aten.add.Tensor"},
    "backward": {"aten.mul.Tensor", "aten.clone.default", "aten.new_zeros.default", "aten.copy.default",
                 "aten.as_strided_scatter.default"},
    "inference": {"aten.mul.Tensor", "aten.add.Tensor"},
}


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(3)
    return [torch.randn(2, 3, 16, 16, device=DEVICE) for _ in range(2)], [torch.randint(0, 5, (2,), device=DEVICE)
                                                                           for _ in range(2)]


@pytest.mark.parametrize("name", NETS)
def test_block_net_trains_and_infers_like_eager(name, data):
    xs, ts = data
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NETS[name]().to(DEVICE)
    assert_bn_net_trains_like_eager(model, xs, ts, steps=2)
    torch._dynamo.reset()
    train_steps(model, xs, ts, False, 2)  # running statistics that are not the initial 0 / 1
    assert_bn_net_infers_like_eager(model.eval(), xs[0])


def _eager_ops(report, kind):
    return {op for g in report.graphs if g.kind == kind for op in g.eager_ops}


@pytest.mark.parametrize("name", NETS)
def test_explain_lowers_every_block_layer(name, data):
    """Nothing falls back; no ATen compute op is left but ConvNeXt's documented ones; fewer launches than eager."""
    xs, ts = data
    torch._dynamo.reset()
    model = NETS[name]().to(DEVICE)
    train = explain(lambda x, t: F.cross_entropy(model(x), t).backward(), xs[0], ts[0])
    torch._dynamo.reset()
    with torch.no_grad():
        infer = explain(model.eval(), xs[0])
    for report, kinds in ((train, ("forward", "backward")), (infer, ("inference",))):
        assert not report.fallbacks, str(report)
        for kind in kinds:
            assert _eager_ops(report, kind) == (CONVNEXT_EAGER[kind] if name == "convnext" else set()), str(report)
        assert report.launches <= report.launches_eager - (name != "convnext"), str(report)
    labels = "\n".join(op for g in train.graphs for entry in g.lowered for op in entry.tritonkit)
    expected = {"mobilenet_v3": ("depthwise_conv2d_weight_grad", "batch_norm_backward(hardswish mask)"),
                "efficientnet": ("depthwise_conv2d_weight_grad", "batch_norm_backward(silu mask)"),
                "regnet": ("conv2d_backward_residual_bn_partials",),
                "convnext": ("depthwise_conv2d_weight_grad", "layer_norm", "layer_norm_backward")}[name]
    if name != "convnext":  # the squeeze-excitation gate's backward, its add in the pool's gradient
        expected += ("channel_scale_backward", "global_avg_pool2d_backward(+ residual)")
    for op in expected:
        assert op in labels, labels
