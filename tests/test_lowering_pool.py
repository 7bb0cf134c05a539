"""torch.compile(backend="tritonkit") lowers average pools (``avg_pool2d``, ``_adaptive_avg_pool2d``) and their
backwards onto tritonkit ops; every compiled step is compared with eager (outputs, parameter and input
gradients) and ``explain`` must show the nodes lowered, none left to ATen."""

import copy

import pytest
import torch

from tritonkit.lowering import backend, explain
from tritonkit.runtime import default_device
from tritonkit.testing import assert_close

DEVICE = default_device()
aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class PoolNet(torch.nn.Module):
    """A pool (or a chain of them) between a 1x1 conv and a linear classifier."""

    def __init__(self, pool, features):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.pool = pool
        self.fc = torch.nn.Linear(features, 3)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


class GlobalAdaptive(torch.nn.Module):
    """``_adaptive_avg_pool2d(x, [1, 1])`` called directly (``F.adaptive_avg_pool2d(x, 1)`` traces to mean)."""

    def forward(self, x):
        return aten._adaptive_avg_pool2d(x, [1, 1])


# (pool, flattened features for 4 channels of a 9 x 11 input, the tritonkit ops it must lower to)
AVG = ("avg_pool2d", "avg_pool2d_backward")
ADAPTIVE = ("adaptive_avg_pool2d", "adaptive_avg_pool2d_backward")
CASES = {
    "3x3/2 pad ceil no-pad-count": (torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), 4 * 5 * 6,
                                    AVG),
    "2x2 default": (torch.nn.AvgPool2d(2), 4 * 4 * 5, AVG),
    "(3,2)/(2,1) divisor": (torch.nn.AvgPool2d((3, 2), (2, 1), (1, 0), divisor_override=3), 4 * 5 * 10, AVG),
    "adaptive (2,3)": (torch.nn.AdaptiveAvgPool2d((2, 3)), 4 * 2 * 3, ADAPTIVE),
    "avg then adaptive (2,3)": (torch.nn.Sequential(torch.nn.AvgPool2d(3, 1, 1), torch.nn.AdaptiveAvgPool2d((2, 3))),
                                4 * 2 * 3, AVG + ADAPTIVE),
    "adaptive 1x1": (GlobalAdaptive(), 4, ("global_avg_pool2d", "global_avg_pool2d_backward")),
}


def lowered_ops(reports) -> set[str]:
    return {op.split("(")[0] for r in reports for entry in r.lowered for op in entry.tritonkit}


def _step(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    seed = torch.ones_like(out) + torch.arange(out.numel(), dtype=out.dtype).view(out.shape) / out.numel()
    out.backward(seed)
    return out, x.grad


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_training_step_matches_eager_and_pools_are_lowered(name, layout):
    pool, features, expected = CASES[name]
    torch.manual_seed(0)
    model = PoolNet(copy.deepcopy(pool), features).to(DEVICE)
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 9, 11, device=DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    reports = []
    out, dx = _step(torch.compile(model, backend=backend, options={"collect": reports}), x)
    ref, ref_dx = _step(eager, x)
    assert_close(out, ref, msg="forward")
    assert_close(dx, ref_dx, grad=True, msg="input gradient")
    for (param, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, grad=True, msg=param)
    assert [r.kind for r in reports] == ["forward", "backward"]
    # flatten(1) of a channels_last activation is a copy (aten.clone), in eager too: no tritonkit candidate
    allowed = {"aten.clone.default"} if layout == "channels_last" else set()
    assert all(set(r.eager_ops) <= allowed and not r.fallbacks for r in reports), "\n".join(map(str, reports))
    assert set(expected) <= lowered_ops(reports), lowered_ops(reports)


def test_explain_reports_the_pool_nodes_lowered():
    model = PoolNet(torch.nn.Sequential(torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True),
                                        torch.nn.AdaptiveAvgPool2d((2, 3))), 4 * 2 * 3).to(DEVICE)
    report = explain(model, torch.randn(2, 3, 9, 11, device=DEVICE, requires_grad=True))
    assert not report.fallbacks and all(not g.eager_ops for g in report.graphs), str(report)
    text = str(report)
    for piece in ("avg_pool2d -> tritonkit.avg_pool2d", "avg_pool2d_backward -> tritonkit.avg_pool2d_backward",
                  "_adaptive_avg_pool2d -> tritonkit.adaptive_avg_pool2d",
                  "_adaptive_avg_pool2d_backward -> tritonkit.adaptive_avg_pool2d_backward"):
        assert piece in text, text
    with torch.no_grad():
        inference = explain(model, torch.randn(2, 3, 9, 11, device=DEVICE))
    assert [g.kind for g in inference.graphs] == ["inference"]
    assert {"avg_pool2d", "adaptive_avg_pool2d"} <= lowered_ops(inference.graphs)
    assert not inference.fallbacks and not inference.graphs[0].eager_ops, str(inference)


def test_inference_matches_eager():
    model = PoolNet(torch.nn.Sequential(torch.nn.AvgPool2d(2, 2, 1, ceil_mode=True, count_include_pad=False),
                                        torch.nn.AdaptiveAvgPool2d((2, 3))), 4 * 2 * 3).to(DEVICE).eval()
    x = torch.randn(3, 3, 9, 11, device=DEVICE)
    with torch.no_grad():
        assert_close(torch.compile(model, backend=backend)(x), model(x))
