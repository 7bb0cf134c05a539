"""BatchNorm ResNets under ``torch.compile(backend="tritonkit")``: training steps and inference against
eager, judged against a float64 copy of the model (BatchNorm over small batches amplifies rounding, so
float32 eager itself is off there; tritonkit must stay within a small factor of eager's own error)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tritonkit.lowering import explain
from tritonkit.models import resnet18
from tritonkit.runtime import default_device
from tritonkit.testing import (
    assert_bn_net_infers_like_eager,
    assert_bn_net_trains_like_eager,
    assert_states_like_eager,
    train_steps,
)

DEVICE = default_device()


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    def __init__(self, cin, width, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class SmallResNet(nn.Module):
    """A ResNet in miniature: 7x7/2 stem + BN + ReLU + 3x3/2 max-pool, basic blocks (one with the
    stride-2 downsample branch), a bottleneck, global average pool, linear classifier."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2), Bottleneck(16, 4, 16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(1)
    xs = [torch.randn(4, 3, 20, 20, device=DEVICE) for _ in range(3)]
    ts = [torch.randint(0, 5, (4,), device=DEVICE) for _ in range(3)]
    return xs, ts


def test_small_resnet_trains_like_eager(data):
    torch._dynamo.reset()
    xs, ts = data
    torch.manual_seed(0)
    assert_bn_net_trains_like_eager(SmallResNet().to(DEVICE), xs, ts)


def test_small_resnet_inference_matches_eager(data):
    torch._dynamo.reset()
    xs, ts = data
    torch.manual_seed(0)
    model = SmallResNet().to(DEVICE)
    train_steps(model, xs, ts, False, 2)  # running statistics that are not the initial 0 / 1
    assert_bn_net_infers_like_eager(model.eval(), xs[0])


def _labels(report) -> str:
    return "\n".join(op for g in report.graphs for entry in g.lowered for op in entry.tritonkit)


def test_explain_lowers_every_layer_of_a_resnet(data):
    torch._dynamo.reset()
    xs, ts = data
    model = SmallResNet().to(DEVICE)
    report = explain(lambda x, t: F.cross_entropy(model(x), t).backward(), xs[0], ts[0])
    assert not report.fallbacks and not any(g.eager_ops for g in report.graphs), str(report)
    labels = _labels(report)
    # training: every conv before a BN writes the BN statistics' partials; the counter increment, the
    # block-end add + ReLU, the log-softmax and the sum of a block's two branch gradients are fused; the
    # conv reading a block's output takes the gradient on through its ReLU and computes the reductions of
    # the BN backwards there (the basic block's bn2; the downsample block's bn2 and downsample BN)
    assert "conv2d_bn_stats" in labels and "conv2d_batch_norm" not in labels
    assert "batch_norm_train_from_partials(residual, relu=True, num_batches_tracked += 1)" in labels
    assert "cross_entropy(write_log_probs=True)" in labels
    assert "conv2d_backward(+ residual)" in labels  # the first block's conv1, its input the max-pool's output
    assert "conv2d_backward_residual_bn_partials\n" in labels + "\n"
    assert "conv2d_backward_residual_bn_partials(two BatchNorms)" in labels
    assert "relu_backward" not in labels

    torch._dynamo.reset()
    model.eval()
    with torch.no_grad():
        report = explain(model, xs[0])
    assert not report.fallbacks and not report.graphs[0].eager_ops, str(report)
    labels = _labels(report)
    # inference: the stem is one kernel, every other conv carries its BN (+ residual) (+ ReLU)
    assert "conv2d_relu_maxpool(batch_norm)" in labels and "conv2d_batch_norm(residual, relu=True)" in labels
    assert "batch_norm_eval" not in labels and "batch_norm_train" not in labels


def test_resnet18_launches_per_step():
    """torchvision-layout ResNet-18: every layer a tritonkit launch; inference one launch per conv plus
    the pool and the classifier; the training step at most 0.5x eager's launches (88 of 181 here)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = resnet18(num_classes=10).to(DEVICE)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    x, t = torch.randn(2, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (2,), device=DEVICE)
    report = explain(lambda x, t: F.cross_entropy(model(x), t).backward(), x, t)
    assert [g.kind for g in report.graphs] == ["forward", "backward"]
    assert not report.fallbacks and not any(g.eager_ops for g in report.graphs), str(report)
    assert report.launches <= 0.5 * report.launches_eager, str(report)
    torch._dynamo.reset()
    model.eval()
    with torch.no_grad():
        report = explain(model, x)
    assert not report.fallbacks and not report.graphs[0].eager_ops, str(report)
    assert report.launches <= convs + 2, str(report)


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"track_running_stats": False}, {"momentum": 0.3}])
def test_batch_norm_variants_train_like_eager(kwargs):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6, **kwargs), nn.ReLU(),
                          nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4, **kwargs)).to(DEVICE)
    ref64, ours, eager = copy.deepcopy(model).double(), copy.deepcopy(model), copy.deepcopy(model)
    xs = [torch.randn(3, 3, 9, 9, device=DEVICE) for _ in range(3)]
    probe = torch.randn(3, 4, 5, 5, device=DEVICE)  # a loss whose gradient is not ~0 through the last BN
    run = torch.compile(ours, backend="tritonkit")
    for x in xs:
        for m, f, inp in ((ref64, ref64, x.double()), (eager, eager, x), (ours, run, x)):
            m.zero_grad()
            (f(inp) * probe.to(inp.dtype)).sum().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
    assert_states_like_eager(ours, eager, ref64)


def test_eval_mode_graph_with_backward_matches_eager():
    """model.eval() still traces forward + backward when inputs need grad (frozen BN fine-tuning)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1)).to(DEVICE)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 7, 7, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ours = copy.deepcopy(model)
    report = explain(ours, x)
    assert not report.fallbacks, str(report)
    torch.compile(ours, backend="tritonkit")(x).sum().backward()
    model(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for p, q in zip(ours.parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)


def test_momentum_none_cumulative_average_matches_eager():
    """``momentum=None``: torch's BatchNorm reads ``float(num_batches_tracked)``, where dynamo breaks the
    graph; that BatchNorm runs in eager PyTorch, the conv before it on tritonkit, and the cumulative
    running statistics and the counter equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5, momentum=None), nn.ReLU()).to(DEVICE)
    eager = copy.deepcopy(model)
    run = torch.compile(model, backend="tritonkit")
    for step in range(3):
        x = torch.randn(3, 3, 8, 8, device=DEVICE) * (step + 1) + step
        run(x).sum().backward()
        eager(x).sum().backward()
    got, want = model[1].state_dict(), eager[1].state_dict()
    assert torch.equal(got["num_batches_tracked"], want["num_batches_tracked"])
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["one_value_per_channel", "running_mean_length"])
def test_batch_norm_bad_input_raises_what_eager_raises(case):
    """Under the backend the mistake surfaces as eager's message, raised while dynamo traces (wrapped in
    dynamo's TorchRuntimeError, a RuntimeError) before any tritonkit kernel launches."""
    torch._dynamo.reset()
    if case == "one_value_per_channel":
        model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(1, 3, 3, 3)
        error, message = ValueError, "Expected more than 1 value per channel when training"
    else:
        bn = nn.BatchNorm2d(4)
        bn.running_mean = torch.zeros(3)
        model, x = nn.Sequential(nn.Conv2d(3, 4, 3), bn), torch.randn(2, 3, 5, 5)
        error, message = RuntimeError, "running_mean should contain 4 elements not 3"
    model = model.to(DEVICE)
    x = x.to(DEVICE)
    with pytest.raises(error, match=message):
        copy.deepcopy(model)(x)
    with pytest.raises((error, torch._dynamo.exc.TorchRuntimeError), match=message):
        torch.compile(model, backend="tritonkit")(x)
