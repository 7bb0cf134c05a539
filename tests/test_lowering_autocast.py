"""BatchNorm nets under ``torch.autocast`` (float16) through the backend. Autocast runs the convs and
linears in half precision while BatchNorm keeps its float32 weight, bias and running statistics (eager's
mixed-type BatchNorm: half input and output, float32 parameters and parameter gradients); every BN is
lowered onto tritonkit (with its conv's statistics epilogue) instead of falling back, and the training
step and inference are judged like the float32 ones: against a float64 copy, within ``BN_ERROR_FACTOR`` of
eager autocast's own error."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tritonkit.lowering import explain
from tritonkit.runtime import default_device
from tritonkit.testing import BN_ERROR_FACTOR, assert_bn_net_trains_like_eager, relative_error, train_steps

DEVICE = default_device()


class Block(nn.Module):
    """conv-BN-ReLU, conv-BN, + identity, ReLU (a ResNet basic block)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), Block(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(5)
    return ([torch.randn(4, 3, 8, 8, device=DEVICE) for _ in range(2)],
            [torch.randint(0, 5, (4,), device=DEVICE) for _ in range(2)])


def test_autocast_training_lowers_every_batch_norm(data):
    torch._dynamo.reset()
    xs, ts = data
    model = tiny_net().to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        report = explain(lambda x, t: F.cross_entropy(model(x), t).backward(), xs[0], ts[0])
    assert not report.fallbacks, str(report)
    ops = "\n".join(op for g in report.graphs for entry in g.lowered for op in entry.tritonkit)
    # the block's bn1 -> ReLU -> conv2: conv2 normalises its input as it loads it (lowering.joint)
    assert ops.count("batch_norm_train_from_partials") == 2 and ops.count("batch_norm_stats_from_partials") == 1, ops
    assert ops.count("conv2d_bn_stats(input prologue)") == 1, ops
    # conv2's input gradient goes on through bn1's ReLU and gives bn1's backward its reductions; conv1's
    # (+ the identity branch's) goes on through the stem's ReLU and gives the stem BN's backward its own
    assert ops.count("conv2d_backward_bn_partials(input prologue)") == 1, ops
    assert ops.count("conv2d_backward_residual_bn_partials") == 1, ops
    assert ops.count("batch_norm_backward") == 3, ops
    assert ops.count("batch_norm_backward(reductions from the input gradient)") == 2, ops
    # what is left is autocast's casts of the float32 weights and input to half
    assert {op for g in report.graphs for op in g.eager_ops} == {"aten._to_copy.default"}, str(report)


def test_autocast_training_matches_eager(data):
    torch._dynamo.reset()
    xs, ts = data
    torch.manual_seed(0)
    assert_bn_net_trains_like_eager(tiny_net().to(DEVICE), xs, ts, steps=2, autocast=torch.float16)


def test_autocast_inference_matches_eager(data):
    torch._dynamo.reset()
    xs, ts = data
    torch.manual_seed(0)
    model = tiny_net().to(DEVICE)
    train_steps(model, xs, ts, False, 2)  # running statistics that are not the initial 0 / 1
    model.eval()
    with torch.no_grad():
        want = copy.deepcopy(model).double()(xs[0].double())
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            eager = model(xs[0])
            got = torch.compile(model, backend="tritonkit")(xs[0])
            torch._dynamo.reset()
            report = explain(model, xs[0])
    assert got.dtype == eager.dtype
    assert relative_error(got, want) <= BN_ERROR_FACTOR * relative_error(eager, want) + 1e-5
    assert not report.fallbacks, str(report)
    assert "conv2d_batch_norm" in str(report), str(report)
