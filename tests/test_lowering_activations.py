"""torch.compile(backend="tritonkit") on conv/linear nets with every activation: hardtanh (relu6),
hardswish, hardsigmoid, silu, sigmoid, gelu (both forms), their in-place module forms included. The
training step (forward + backward) and inference match eager, and the reports show every activation
and activation-backward node lowered (none left ATen), in float32 and float16. Shapes are small for
the interpreter.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from tritonkit.lowering import backend, explain
from tritonkit.runtime import default_device
from tritonkit.testing import assert_close

DEVICE = default_device()
ACTIVATION_ATEN = {f"aten.{name}.default" for act in ("hardtanh", "hardswish", "hardsigmoid", "silu", "sigmoid", "gelu")
                   for name in (act, f"{act}_backward", f"{act}_")}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class ActivationNet(torch.nn.Module):
    """conv -> ReLU6 -> conv -> Hardswish(inplace) -> pool -> SiLU(inplace) -> conv -> hardtanh(-0.5, 2)
    -> GELU; flatten -> linear -> sigmoid -> linear -> hardsigmoid -> linear -> GELU(tanh)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu6 = torch.nn.ReLU6()
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.hardswish = torch.nn.Hardswish(inplace=True)
        self.conv3 = torch.nn.Conv2d(4, 3, 1)
        self.fc1 = torch.nn.Linear(3 * 3 * 3, 8)
        self.fc2 = torch.nn.Linear(8, 8)
        self.fc3 = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.hardswish(self.conv2(self.relu6(self.conv1(x) * 3)))
        x = F.silu(F.max_pool2d(x, 2), inplace=True)
        x = F.gelu(F.hardtanh(self.conv3(x), -0.5, 2.0))
        x = torch.sigmoid(self.fc1(x.flatten(1)))
        x = F.hardsigmoid(self.fc2(x) * 4)
        return F.gelu(self.fc3(x), approximate="tanh")


def no_activation_left(reports):
    for report in reports:
        left = ACTIVATION_ATEN & set(report.eager_ops)
        assert not left, f"{report.name}: {left} stayed ATen\n{report}"
        assert not [f for f in report.fallbacks if f.target in ACTIVATION_ATEN], str(report)


def lowered_kinds(reports) -> set[str]:
    """``activation(kind)`` / ``activation_backward(kind)`` for each activation launch, and ``activation(kind)``
    for each one applied in a conv's or linear's epilogue (``conv2d(activation=kind)``)."""
    ops = [op for r in reports for entry in r.lowered for op in entry.tritonkit]
    return ({op for op in ops if op.startswith("activation")}
            | {f"activation({op.split('activation=')[1].rstrip(')')})" for op in ops if "(activation=" in op})


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_training_step_matches_eager_and_lowers_every_activation():
    torch.manual_seed(0)
    model = ActivationNet().to(DEVICE)
    eager = copy.deepcopy(model)
    reports = []
    compiled = torch.compile(model, backend=backend, options={"collect": reports})
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    out, ref = compiled(x), eager(x)
    assert_close(out, ref, msg="forward")
    seed = torch.randn_like(ref)
    out.backward(seed)
    ref.backward(seed)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, grad=True, msg=name)
    assert [r.kind for r in reports] == ["forward", "backward"]
    no_activation_left(reports)
    kinds = {"hardtanh", "hardswish", "hardsigmoid", "silu", "sigmoid", "gelu", "gelu_tanh"}
    assert {f"activation_backward({k})" for k in kinds} <= lowered_kinds(reports[1:])
    # forward: every activation but a ReLU6 some conv epilogue may have absorbed (a sigmoid, whose backward reads
    # its output, in the linear's epilogue)
    assert {f"activation({k})" for k in kinds - {"hardtanh"}} <= lowered_kinds(reports[:1])
    assert "addmm + sigmoid -> tritonkit.linear(activation=sigmoid)" in str(reports[0]), str(reports[0])


def test_inference_matches_eager_and_explain_shows_the_activations():
    torch.manual_seed(0)
    model = ActivationNet().to(DEVICE)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
        reports = []
        out = torch.compile(model, backend=backend, options={"collect": reports})(x)
        assert_close(out, expected)
        assert [r.kind for r in reports] == ["inference"]
        no_activation_left(reports)
        torch._dynamo.reset()
        report = explain(model, x)
    text = str(report)
    # each activation that is its conv's or linear's only use is in that kernel's epilogue
    for piece in ("convolution_1 + hardswish -> tritonkit.conv2d(activation=hardswish)",
                  "silu -> tritonkit.activation(silu)", "addmm + sigmoid -> tritonkit.linear(activation=sigmoid)",
                  "addmm_2 + gelu_1 -> tritonkit.linear(activation=gelu_tanh)",
                  "convolution_2 + hardtanh_1 -> tritonkit.conv2d(activation=hardtanh)"):
        assert piece in text, text


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_float16_training_step_lowers_activations():
    torch.manual_seed(0)
    half = ActivationNet().half().to(DEVICE)
    reference = copy.deepcopy(half).float()  # the same fp16-rounded weights, evaluated in float32
    x = torch.randn(2, 3, 6, 6, device=DEVICE).half()
    reports = []
    out = torch.compile(half, backend=backend, options={"collect": reports, "fallback": "error"})(x)
    ref = reference(x.float())
    assert_close(out, ref.half())
    seed = torch.randn(out.shape, device=DEVICE)
    out.backward(seed.half())
    ref.backward(seed)
    for (name, p), q in zip(half.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad.half(), grad=True, msg=name)
    no_activation_left(reports)


class SqueezeExcite(torch.nn.Module):
    """conv -> SiLU, then the gate: x * sigmoid(fc2(relu(fc1(avg_pool(x))))) (or gate * x); conv."""

    def __init__(self, gate_first=False):
        super().__init__()
        self.gate_first = gate_first
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = torch.nn.Conv2d(8, 2, 1)
        self.fc2 = torch.nn.Conv2d(2, 8, 1)
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.silu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(s * x if self.gate_first else x * s)


@pytest.mark.parametrize("gate_first,channels_last", [(False, False), (True, True)], ids=["x*s", "s*x-channels_last"])
def test_squeeze_excitation_gate_lowered(gate_first, channels_last):
    """The gate's mul is channel_scale; its backward's mul(g, s) + sum(mul(g, x), [2, 3]) one
    channel_scale_backward; training step and inference match eager."""
    torch.manual_seed(0)
    model = SqueezeExcite(gate_first).to(DEVICE)
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 5, 6, device=DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reports = []
    out = torch.compile(model, backend=backend, options={"collect": reports})(x)
    ref = eager(x)
    assert_close(out, ref, msg="forward")
    seed = torch.randn_like(ref)
    out.backward(seed)
    ref.backward(seed)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, grad=True, msg=name)
    forward, backward = reports
    assert "aten.mul.Tensor" not in forward.eager_ops and "aten.mul.Tensor" not in backward.eager_ops, str(backward)
    assert any(e.tritonkit == ("channel_scale",) for e in forward.lowered), str(forward)
    assert any(e.tritonkit == ("channel_scale_backward",) and len(e.aten) == 3 for e in backward.lowered), str(backward)
    no_activation_left(reports)
    with torch.no_grad():
        torch._dynamo.reset()
        reports = []
        assert_close(torch.compile(model, backend=backend, options={"collect": reports})(x), eager(x))
    assert "aten.mul.Tensor" not in reports[0].eager_ops
