"""torch.compile(backend="tritonkit"): training and inference graphs lowered onto tritonkit ops match eager.

Every compiled run is compared with the same model in eager PyTorch; reports (``explain`` and the
``collect`` option) show which ATen nodes became tritonkit ops, so a test cannot pass by silently
falling back. Interpreter kernels are slow: shapes are small and LeNet runs at batch 4.
"""

import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonkit.lowering import LoweringError, backend, explain
from tritonkit.models import LeNet
from tritonkit.runtime import INTERPRET, default_device
from tritonkit.testing import HANG_TIMEOUT_S, TRAINING_TOLERANCES, assert_close

DEVICE = default_device()


def randn(*shape, **kwargs):
    return torch.randn(*shape, device=DEVICE, **kwargs)


LOWERED_ATEN = ("aten::convolution", "aten::convolution_backward", "aten::max_pool2d_with_indices",
                "aten::max_pool2d_with_indices_backward", "aten::addmm", "aten::mm", "aten::relu",
                "aten::threshold_backward")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_(model, reports=None, **options):
    """torch.compile with the tritonkit backend; every graph's report is appended to ``reports``."""
    if reports is not None:
        options["collect"] = reports
    return torch.compile(model, backend=backend, options=options)


def lowered_ops(reports) -> set[str]:
    return {op.split("(")[0] for r in reports for entry in r.lowered for op in entry.tritonkit}


class ResBlockNet(torch.nn.Module):
    """Stem conv, a residual block with batch norm, a strided 1x1 conv, adaptive avg pool, linear."""

    def __init__(self, c=4, classes=3):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.down = torch.nn.Conv2d(c, 2 * c, 1, stride=2)
        self.fc = torch.nn.Linear(2 * c, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        x = F.adaptive_avg_pool2d(self.down(x), 1).flatten(1)
        return self.fc(x)


class SmallConvNet(torch.nn.Module):
    """Conv/ReLU/pool/linear on any input size (adaptive pooling before the classifier)."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def train(run, params, loss_fn, optimizer, batches):
    opt = optimizer(params)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(run(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def close(actual, expected, msg=""):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{msg}\n{m}", **TRAINING_TOLERANCES)


def check_step(model, inputs, reports=None, **options):
    """One forward+backward of ``model`` compiled vs eager: outputs, parameter and input gradients."""
    eager = copy.deepcopy(model)
    compiled = compile_(model, reports, **options)
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    ref_leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out, ref = compiled(*leaves), eager(*ref_leaves)
    assert_close(out, ref, msg="forward")
    seed = torch.randn_like(ref)
    out.backward(seed)
    ref.backward(seed)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_close(p.grad, q.grad, grad=True, msg=name)
    for i, (x, r) in enumerate(zip(leaves, ref_leaves)):
        if r.grad is not None:
            assert_close(x.grad, r.grad, grad=True, msg=f"input {i}")


# --------------------------------------------------------------------------------- registration
def test_backend_name_works_in_a_fresh_process_without_importing_tritonkit():
    script = textwrap.dedent("""
        import sys, torch
        DEVICE = "%s"
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        assert "tritonkit" not in sys.modules
        compiled = torch.compile(model, backend="tritonkit", options={"report": True})
        assert "tritonkit.lowering" in sys.modules  # loaded through the torch_dynamo_backends entry point
        x = torch.randn(2, 3, 7, 6, device=DEVICE)
        model.to(DEVICE)
        from tritonkit.testing import assert_close  # tritonkit is imported by now
        with torch.no_grad():
            assert_close(compiled(x), model(x))
        print("OK")
    """) % DEVICE
    env = {**os.environ, "TRITONKIT_LOG": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=HANG_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout
    assert "convolution + relu -> tritonkit.conv2d(relu=True)" in done.stderr


def test_options_are_validated():
    model = torch.nn.Linear(3, 2).to(DEVICE)
    with pytest.raises(Exception, match="unknown option"):
        compile_(model, fallbak="eager")(randn(2, 3))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="fallback must be one of"):
        compile_(model, fallback="ignore")(randn(2, 3))


# ------------------------------------------------------------------------------------ LeNet end to end
def sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def tritonkit_sgd_momentum(params):
    import tritonkit.optim

    return tritonkit.optim.SGD(params, lr=0.05, momentum=0.9)


def mse(out, y):
    return F.mse_loss(out, y)


def cross_entropy(out, y):
    return F.cross_entropy(out, y.argmax(1))


@pytest.mark.parametrize("loss_fn,optimizer,steps", [
    (mse, sgd_momentum, 20),
    (cross_entropy, sgd_momentum, 8),
    (cross_entropy, tritonkit_sgd_momentum, 8),
], ids=["mse-sgd-20", "ce-sgd-8", "ce-tritonkit_sgd-8"])
def test_lenet_trains_like_eager(loss_fn, optimizer, steps):
    torch.manual_seed(0)
    eager = LeNet().to(DEVICE)
    model = copy.deepcopy(eager)
    batches = [(randn(4, 3, 32, 32), randn(4, 10)) for _ in range(steps)]
    reports = []
    compiled = compile_(model, reports, fallback="error")  # every candidate node must lower
    losses = train(compiled, model.parameters(), loss_fn, optimizer, batches)
    ref_losses = train(eager, eager.parameters(), loss_fn, optimizer, batches)
    close(losses, ref_losses, "losses")
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        close(p, q, name)
    assert [r.kind for r in reports] == ["forward", "backward"]
    assert all(not r.eager_ops and not r.fallbacks for r in reports), "\n".join(map(str, reports))
    # eval output, from the inference graph
    model.eval(), eager.eval()
    x = randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(compiled(x), eager(x))
    assert reports[-1].kind == "inference" and not reports[-1].eager_ops


def test_explain_lenet_training_step_counts_launches():
    torch.manual_seed(0)
    model = LeNet().to(DEVICE)
    report = explain(model, randn(4, 3, 32, 32))
    assert [g.kind for g in report.graphs] == ["forward", "backward"]
    assert not report.fallbacks and all(not g.eager_ops for g in report.graphs)
    assert report.launches < report.launches_eager
    torch._dynamo.reset()
    target = torch.randint(0, 10, (4,), device=DEVICE)
    step = explain(lambda x, t: F.cross_entropy(model(x), t).backward(), randn(4, 3, 32, 32), target)
    assert not step.fallbacks and all(not g.eager_ops for g in step.graphs), str(step)
    assert step.launches <= 0.5 * step.launches_eager, str(step)  # 16 of eager's 35
    text = str(report)
    for piece in ("convolution + relu -> tritonkit.conv2d(relu=True)",
                  "addmm + relu_2 -> tritonkit.linear(relu=True)",
                  "max_pool2d_with_indices_backward -> tritonkit.max_pool2d_backward",
                  "threshold_backward_2 + convolution_backward -> tritonkit.conv2d_backward(relu_output=",
                  "per step:"):
        assert piece in text, text
    # no threshold_backward survives: every ReLU mask is folded into a backward kernel
    assert "relu_backward" not in text
    # each layer's gradients come from one launch (the first conv needs no input gradient)
    assert lowered_ops(report.graphs) == {
        "conv2d", "max_pool2d", "linear", "linear_backward", "max_pool2d_backward", "conv2d_backward",
        "conv2d_weight_bias_grad"}


def test_profiler_shows_tritonkit_ops_replace_aten_in_the_training_step():
    torch.manual_seed(0)
    model = LeNet().to(DEVICE)
    compiled = compile_(model)
    x, y = randn(4, 3, 32, 32), randn(4, 10)
    F.mse_loss(compiled(x), y).backward()  # compile outside the profiled step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.mse_loss(compiled(x), y).backward()
    names = {e.name for e in prof.events()}
    assert not names & set(LOWERED_ATEN), sorted(names & set(LOWERED_ATEN))
    for op in ("conv2d", "conv2d_backward", "conv2d_weight_bias_grad", "max_pool2d", "max_pool2d_backward",
               "linear", "linear_backward"):
        assert f"tritonkit::{op}" in names, sorted(n for n in names if "tritonkit" in n)
    # the same step in eager runs the aten kernels
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.mse_loss(model(x), y).backward()
    assert {"aten::convolution", "aten::max_pool2d_with_indices", "aten::addmm", "aten::relu"} <= \
        {e.name for e in prof.events()}


def test_no_graph_breaks():
    for model, x in ((LeNet().to(DEVICE), randn(2, 3, 32, 32)),
                     (ResBlockNet().to(DEVICE), randn(2, 3, 8, 8))):
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        torch._dynamo.reset()
        reports = []
        with torch.no_grad():
            compile_(model, reports)(x)
        assert [r.kind for r in reports] == ["inference"]  # one graph for the whole model


# -------------------------------------------------------------------------------- ResNet-style block
def test_resnet_block_trains_with_batch_norm_and_adds_lowered():
    torch.manual_seed(0)
    eager = ResBlockNet().to(DEVICE)
    model = copy.deepcopy(eager)
    batches = [(randn(4, 3, 8, 8), torch.randint(0, 3, (4,), device=DEVICE)) for _ in range(3)]
    reports = []
    losses = train(compile_(model, reports), model.parameters(), F.cross_entropy, sgd_momentum, batches)
    ref_losses = train(eager, eager.parameters(), F.cross_entropy, sgd_momentum, batches)
    close(losses, ref_losses, "losses")
    for (name, p), q in zip(model.state_dict().items(), eager.state_dict().values()):
        close(p, q, name)  # parameters and batch-norm running statistics
    forward, backward = reports
    assert not any("batch_norm" in op for op in forward.eager_ops | backward.eager_ops)
    # the convs before a batch norm write its statistics; the ReLUs after batch norm and after the
    # residual add are fused into the batch-norm call
    assert {"conv2d", "conv2d_bn_stats", "batch_norm_train_from_partials", "linear"} <= lowered_ops([forward])
    assert {"batch_norm_backward", "conv2d_backward", "conv2d_weight_bias_grad"} <= lowered_ops([backward])
    assert not forward.fallbacks and not backward.fallbacks


def test_explain_leaves_model_state_alone():
    model = ResBlockNet().to(DEVICE)
    state = copy.deepcopy(model.state_dict())
    report = explain(model, randn(2, 3, 6, 6))
    assert [g.kind for g in report.graphs] == ["forward", "backward"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        report = explain(model, randn(2, 3, 6, 6))
    assert [g.kind for g in report.graphs] == ["inference"]


# ---------------------------------------------------------------------------------- shapes change
@pytest.mark.parametrize("dynamic", [None, True])
def test_batch_and_input_size_changes(dynamic):
    torch.manual_seed(0)
    model = SmallConvNet().to(DEVICE)
    eager = copy.deepcopy(model)
    reports = []
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, options={"collect": reports})
    for shape in ((2, 3, 8, 8), (3, 3, 8, 8), (2, 3, 10, 12)):
        x = randn(shape)
        out, ref = compiled(x), eager(x)
        assert_close(out, ref, msg=str(shape))
        g = torch.randn_like(ref)
        out.backward(g), ref.backward(g)
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert_close(p.grad, q.grad, grad=True, msg=f"{name} {shape}")
            p.grad, q.grad = None, None
    assert all(not r.fallbacks for r in reports), "\n".join(map(str, reports))
    assert lowered_ops(reports) >= {"conv2d", "max_pool2d", "linear", "conv2d_backward"}


# ----------------------------------------------------------------------------- lowering, piece by piece
@settings(max_examples=4, deadline=None)
@given(stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), bias=st.booleans(), channels_last=st.booleans())
def test_conv_geometry_training(stride, padding, dilation, groups, bias, channels_last):
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(4, 6, 3, stride, padding, dilation, groups, bias)
    model = torch.nn.Sequential(conv, torch.nn.ReLU()).to(DEVICE)
    x = randn(2, 4, 9, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    reports = []
    check_step(model, [x], reports)
    assert "conv2d" in lowered_ops(reports)


def test_float16_network_lowers():
    torch.manual_seed(0)
    half = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(36, 5), torch.nn.ReLU(),
                               torch.nn.Linear(5, 2)).half().to(DEVICE)
    reference = copy.deepcopy(half).float()  # the same fp16-rounded weights, evaluated in float32
    x = randn(2, 3, 8, 8).half()
    reports = []
    out = compile_(half, reports, fallback="error")(x)
    ref = reference(x.float())
    assert_close(out, ref.half())
    seed = randn(out.shape)
    out.backward(seed.half())
    ref.backward(seed)
    for (name, p), q in zip(half.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad.half(), grad=True, msg=name)
    assert lowered_ops(reports) >= {"conv2d", "linear", "max_pool2d_backward", "conv2d_weight_bias_grad"}


class Linear3d(torch.nn.Module):
    """Linear layers on (B, T, K) input: views around addmm, a ReLU after the view, bias-free mm."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 6)
        self.b = torch.nn.Linear(6, 5, bias=False)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_linear_on_3d_input_fuses_relu_through_views():
    reports = []
    check_step(Linear3d().to(DEVICE), [randn(2, 3, 8)], reports, fallback="error")
    text = "\n".join(map(str, reports))
    assert "-> tritonkit.linear(relu=True)" in text
    # threshold_backward reaches its mm/sum consumers through a view and is folded
    assert "relu_backward" not in text and "linear_backward(relu_output=" in text


class MatmulNet(torch.nn.Module):
    """``x @ W`` (no transpose), ``t(x) @ y``, and addmm with a 2-D bias (stays ATen)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(5, 4))
        self.bias2d = torch.nn.Parameter(torch.randn(3, 4))

    def forward(self, x, y):
        a = torch.mm(x, self.w)  # (3, 4)
        b = torch.mm(x.t(), y)  # (5, 4)
        c = torch.addmm(self.bias2d, x, self.w)
        return a.sum(0) + b.sum(0) + c.sum(0) + torch.relu(a).mean(0)


def test_general_matmuls_and_addmm_with_full_bias():
    reports = []
    check_step(MatmulNet().to(DEVICE), [randn(3, 5), randn(3, 4)], reports)
    fallbacks = [f for r in reports for f in r.fallbacks]
    assert any(f.target == "aten.addmm.default" and "not a per-column 1-D bias" in f.reason
               for f in fallbacks)
    assert {"linear", "linear_weight_grad", "relu"} <= lowered_ops(reports)


def test_conv_output_used_twice_is_not_fused():
    class TwoUses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y * 0.5 + F.relu(y)

    reports = []
    check_step(TwoUses().to(DEVICE), [randn(2, 3, 6, 6)], reports)
    text = str(reports[0])
    assert "convolution -> tritonkit.conv2d" in text and "relu -> tritonkit.relu" in text
    assert "conv2d(relu=True)" not in text


# -------------------------------------------------------------------------------------------- fallback
def test_error_policy_raises_naming_the_node():
    model = torch.nn.Conv2d(3, 4, 3).double().to(DEVICE)
    compiled = compile_(model, fallback="error")
    with pytest.raises(Exception, match=r"convolution.*float64") as info:
        compiled(randn(2, 3, 6, 6, dtype=torch.float64))
    chain = []
    error = info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, LoweringError) for e in chain) or "LoweringError" in str(info.value)


UNSUPPORTED = [
    ("float64 conv", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).double(),
     (2, 3, 6, 6), torch.float64, "float64"),
    ("transposed conv", torch.nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5), torch.float32, "transposed"),
    ("conv1d", torch.nn.Conv1d(3, 4, 3), (2, 3, 9), torch.float32, "1-D convolution"),
    ("conv3d", torch.nn.Conv3d(3, 2, 2), (1, 3, 3, 3, 3), torch.float32, "3-D convolution"),
    ("float64 linear", torch.nn.Linear(4, 3).double(), (2, 4), torch.float64, "float64"),
]


@pytest.mark.parametrize("name,model,shape,dtype,reason", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_nodes_fall_back_to_eager(name, model, shape, dtype, reason):
    reports = []
    check_step(model.to(DEVICE), [randn(shape, dtype=dtype)], reports)
    fallbacks = [f for r in reports for f in r.fallbacks]
    assert fallbacks and all(reason in f.reason for f in fallbacks if "convolution" in f.target
                             or "mm" in f.target), "\n".join(map(str, reports))


def test_bfloat16_gemms_stay_aten_in_the_interpreter():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).bfloat16().to(DEVICE)
    x = randn(2, 4, dtype=torch.bfloat16)
    reports = []
    with torch.no_grad():
        out = compile_(model, reports)(x)
    torch.testing.assert_close(out, model(x))
    (report,) = reports
    if INTERPRET:
        assert any("bfloat16 GEMM" in f.reason for f in report.fallbacks)
        assert "relu -> tritonkit.relu" in str(report)  # the elementwise kernel is fine in bfloat16
    else:
        assert "linear(relu=True)" in str(report)


# ------------------------------------------------------------------ inference conv+ReLU+pool fusion
def test_inference_conv_relu_pool_fusion():
    torch.manual_seed(0)
    model = LeNet().to(DEVICE).eval()
    x = randn(2, 3, 32, 32)
    reports = []
    with torch.no_grad():
        assert_close(compile_(model, reports)(x), model(x))
    text = str(reports[0])
    assert text.count("-> tritonkit.conv2d_relu_maxpool") == 2, text
    # in training the unpooled activation is saved for backward: no fusion
    torch._dynamo.reset()
    reports = []
    compile_(model, reports)(x)
    assert "conv2d_relu_maxpool" not in str(reports[0]) and "conv2d(relu=True)" in str(reports[0])


# --------------------------------------------------------------------------------------- logging
def test_tritonkit_log_env_reports_each_graph(monkeypatch, capfd):
    monkeypatch.setenv("TRITONKIT_LOG", "info")
    logger = logging.getLogger("tritonkit.lowering")
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    with torch.no_grad():
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).to(DEVICE)
        compile_(model)(randn(2, 4))
    err = capfd.readouterr().err
    assert "inference: 2 kernel launches in eager -> 1 with tritonkit" in err, err
    assert "addmm + relu -> tritonkit.linear(relu=True)" in err


def test_fuse_relu_off_keeps_standalone_relu_kernels():
    reports = []
    check_step(SmallConvNet().to(DEVICE), [randn(2, 3, 8, 8)], reports, fuse_relu=False)
    text = "\n".join(map(str, reports))
    assert "relu=True" not in text and "relu_output=" not in text, text
    assert {"relu", "relu_backward", "conv2d", "conv2d_backward"} <= lowered_ops(reports)


def test_dynamic_shapes_keepdim_sum_and_plain_mm():
    def f(x, w):
        return torch.mm(x, w).sum(1, keepdim=True) * 2

    reports = []
    compiled = torch.compile(f, backend=backend, dynamic=True, options={"collect": reports})
    for n in (3, 5):
        x, w = randn(n, 4, requires_grad=True), randn(4, 6, requires_grad=True)
        x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out, ref = compiled(x, w), f(x_ref, w_ref)
        assert_close(out, ref)
        out.sum().backward(), ref.sum().backward()
        assert_close(x.grad, x_ref.grad, grad=True)
        assert_close(w.grad, w_ref.grad, grad=True)
    assert len(reports) == 2  # one forward, one backward: no recompile for the second size
    assert {"linear", "bias_grad", "linear_weight_grad"} <= lowered_ops(reports)


def test_conv_and_its_relu_in_different_graphs():
    """What DDPOptimizer does when a bucket boundary falls between a conv and its ReLU."""

    class Split(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            y = self.conv(x)
            torch._dynamo.graph_break()
            return self.fc(F.relu(y).flatten(1))

    reports = []
    check_step(Split().to(DEVICE), [randn(2, 3, 6, 6)], reports)
    text = "\n".join(map(str, reports))
    assert [r.kind for r in reports].count("forward") == 2, text
    assert "convolution -> tritonkit.conv2d\n" in text and "relu -> tritonkit.relu" in text
    assert "relu=True" not in text and "tritonkit.relu_backward" in text
