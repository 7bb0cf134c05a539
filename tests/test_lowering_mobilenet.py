"""MobileNetV2-style nets through the backend: depthwise convs on the direct kernels, BatchNorm statistics
from their epilogue, ReLU6, inverted residuals; training and inference against eager, judged against a
float64 copy of the model (``tritonkit.testing``'s BatchNorm-net checks, as for the ResNets)."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tritonkit.lowering import explain
from tritonkit.runtime import default_device
from tritonkit.testing import assert_bn_net_infers_like_eager, assert_bn_net_trains_like_eager, train_steps

DEVICE = default_device()


def conv_bn(cin, cout, k=1, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN, and the
    identity added when the shape allows."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class TinyMobileNetV2(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8, 3, 2), InvertedResidual(8, 8, 1, 1),
                                      InvertedResidual(8, 12, 2, 4), InvertedResidual(12, 12, 1, 4),
                                      conv_bn(12, 16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(2)
    xs = [torch.randn(4, 3, 16, 16, device=DEVICE) for _ in range(3)]
    ts = [torch.randint(0, 5, (4,), device=DEVICE) for _ in range(3)]
    return xs, ts


def test_mobilenet_v2_trains_like_eager(data):
    torch._dynamo.reset()
    xs, ts = data
    torch.manual_seed(0)
    assert_bn_net_trains_like_eager(TinyMobileNetV2().to(DEVICE), xs, ts)


def test_mobilenet_v2_inference_matches_eager(data):
    torch._dynamo.reset()
    xs, ts = data
    torch.manual_seed(0)
    model = TinyMobileNetV2().to(DEVICE)
    train_steps(model, xs, ts, False, 2)  # running statistics that are not the initial 0 / 1
    assert_bn_net_infers_like_eager(model.eval(), xs[0])


def _labels(report) -> str:
    return "\n".join(op for g in report.graphs for entry in g.lowered for op in entry.tritonkit)


def test_explain_lowers_every_layer_of_a_mobilenet_v2(data):
    """Every conv (depthwise ones on the direct kernels), BatchNorm, ReLU6, add, pool, the linear and
    the loss are tritonkit launches in training, each ReLU6 applied in its BatchNorm's pass (which also writes
    the BN output its backward reads), the ReLU6 masks folded into the BatchNorm backwards and the
    branch-gradient sums into the input gradients; inference is one launch per conv (its BatchNorm and
    ReLU6 in the epilogue, the 1x1 convs' as the depthwise ones') plus the pool and the classifier."""
    torch._dynamo.reset()
    xs, ts = data
    model = TinyMobileNetV2().to(DEVICE)
    report = explain(lambda x, t: F.cross_entropy(model(x), t).backward(), xs[0], ts[0])
    assert not report.fallbacks and not any(g.eager_ops for g in report.graphs), str(report)
    labels = _labels(report)
    for op in ("depthwise_conv2d_bn_stats", "depthwise_conv2d_input_grad(+ residual)", "depthwise_conv2d_weight_grad",
               "conv2d_bn_stats", "batch_norm_train_from_partials(residual", "conv2d_backward(+ residual)",
               "batch_norm_backward(relu6 mask)"):
        assert op in labels, labels
    assert "activation_backward" not in labels, labels
    assert report.launches <= 0.57 * report.launches_eager, str(report)  # 49 of eager's 87
    torch._dynamo.reset()
    model.eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        report = explain(model, xs[0])
    assert not report.fallbacks and not report.graphs[0].eager_ops, str(report)
    labels = _labels(report)
    for op in ("depthwise_conv2d_batch_norm(activation=relu6)", "conv2d_batch_norm(activation=relu6)"):
        assert op in labels, labels
    assert report.launches == len(convs) + 2, str(report)
