"""linear (+bias, +ReLU or another activation) forward and all gradients against eager PyTorch, in the interpreter."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tritonkit.functional as TF
from tritonkit.runtime import INTERPRET
from tritonkit.testing import assert_close, check_against_eager

ops = torch.ops.tritonkit
aten = torch.ops.aten


def _run(lead, k, n, *, bias=True, relu=False, dtype=torch.float32, transposed_weight=False, strided_input=False):
    x = torch.randn(*lead, k * 2 if strided_input else k, dtype=dtype, requires_grad=True)
    w = torch.randn(k, n, dtype=dtype) if transposed_weight else torch.randn(n, k, dtype=dtype)
    w = (w / k**0.5).requires_grad_()
    b = torch.randn(n, dtype=dtype, requires_grad=True) if bias else None
    views = [(lambda t: t[..., ::2]) if strided_input else None, (lambda t: t.t()) if transposed_weight else None, None]
    activation = "relu" if relu else None
    check_against_eager(
        lambda x, w, b: TF.linear(x, w, b, activation=activation),
        lambda x, w, b: F.relu(F.linear(x, w, b)) if relu else F.linear(x, w, b),
        [x, w, b], views,
    )


@pytest.mark.parametrize("lead,k,n", [((8,), 400, 120), ((8,), 120, 84), ((8,), 84, 10), ((37,), 53, 29),
                                      ((3, 5), 17, 9), ((), 23, 7), ((2, 0), 5, 3), ((4,), 0, 3), ((1,), 1, 1)],
                         ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_sweep(lead, k, n, relu):
    _run(lead, k, n, relu=relu)


def test_no_bias():
    _run((6,), 19, 11, bias=False, relu=True)


def test_strided_operands():
    _run((4, 3), 21, 13, transposed_weight=True, strided_input=True, relu=True)


@pytest.mark.parametrize("relu", [False, True])
def test_float16(relu):
    _run((33,), 70, 45, dtype=torch.float16, relu=relu)


@settings(max_examples=15, deadline=None)
@given(lead=st.lists(st.integers(1, 9), min_size=0, max_size=2), k=st.integers(1, 70), n=st.integers(1, 70),
       bias=st.booleans(), relu=st.booleans(), transposed=st.booleans())
def test_fuzz(lead, k, n, bias, relu, transposed):
    _run(tuple(lead), k, n, bias=bias, relu=relu, transposed_weight=transposed)


def test_mm_as_linear():
    a, b = torch.randn(13, 7), torch.randn(7, 11)
    assert_close(ops.linear(a, b.t(), None, False), a @ b)


def test_opcheck():
    x, w, b = torch.randn(3, 5, 7), torch.randn(6, 7), torch.randn(6)
    torch.library.opcheck(ops.linear.default, (x, w, b, True))
    y = ops.linear(x, w, b, True)
    g = torch.randn_like(y)
    torch.library.opcheck(ops.linear_input_grad.default, (g, w, y))
    torch.library.opcheck(ops.linear_weight_grad.default, (g, x, y))
    torch.library.opcheck(ops.linear_weight_grad.default, (g, x, None))


BAD = [
    ("features", dict(x=(4, 6))),
    ("weight", dict(w=(3, 5, 2))),
    ("bias", dict(b=(4,))),
    ("dtype", dict(w_dtype=torch.float16)),
    ("input", dict(x=())),
]


@pytest.mark.parametrize("needle,bad", BAD, ids=[n for n, _ in BAD])
def test_bad_input_raises_like_torch(needle, bad):
    x = torch.randn(bad.get("x", (4, 5)))
    w = torch.randn(*bad.get("w", (3, 5)), dtype=bad.get("w_dtype", torch.float32))
    b = torch.randn(*bad.get("b", (3,)))
    with pytest.raises(Exception) as expected:
        F.linear(x, w, b)
    with pytest.raises(expected.type) as got:
        TF.linear(x, w, b)
    assert needle.lower() in str(got.value).lower(), str(got.value)


# (kind, min_val, max_val, eager) of the epilogue activations beside ReLU
EPILOGUE_ACTIVATIONS = {
    "relu6": ("hardtanh", 0.0, 6.0, F.relu6), "hardswish": ("hardswish", 0.0, 0.0, F.hardswish),
    "hardsigmoid": ("hardsigmoid", 0.0, 0.0, F.hardsigmoid), "silu": ("silu", 0.0, 0.0, F.silu),
    "sigmoid": ("sigmoid", 0.0, 0.0, torch.sigmoid), "gelu": ("gelu", 0.0, 0.0, F.gelu),
    "gelu_tanh": ("gelu_tanh", 0.0, 0.0, lambda t: F.gelu(t, approximate="tanh"))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", EPILOGUE_ACTIVATIONS)
@pytest.mark.parametrize("lead,k", [((3, 37), 53), ((4,), 0)], ids=str)
def test_activation_epilogue(case, dtype, lead, k):
    """Each activation on the float32 result before the one rounding, as eager's activation of the float32
    linear (the results span every kink: -3, 0, 3, 6); with K = 0 of the bias alone."""
    kind, lo, hi, act = EPILOGUE_ACTIVATIONS[case]
    x, w = torch.randn(*lead, k).to(dtype), (4 * torch.randn(29, k) / max(k, 1) ** 0.5).to(dtype)
    b = torch.linspace(-8, 8, 29)[torch.randperm(29)].to(dtype)
    ref = F.linear(x.float(), w.float(), b.float())
    assert (ref < -3).any() and (ref > 6).any() and ((ref > 0) & (ref < 3)).any()
    assert_close(ops.linear(x, w, b, False, kind, lo, hi), act(ref).to(dtype))


@pytest.mark.parametrize("case", ["gelu", "sigmoid"])
def test_activation_epilogue_gradients(case):
    """``tritonkit::linear(activation=...)`` called directly is differentiable (the activation's backward
    from the output for sigmoid, from the recomputed pre-activation otherwise)."""
    kind, lo, hi, act = EPILOGUE_ACTIVATIONS[case]
    x, w, b = torch.randn(3, 7, 19), torch.randn(11, 19) / 19**0.5, torch.randn(11)
    check_against_eager(lambda x, w, b: ops.linear(x, w, b, False, kind, lo, hi),
                        lambda x, w, b: act(F.linear(x, w, b)), [t.requires_grad_() for t in (x, w, b)])
    torch.library.opcheck(ops.linear.default, (x, w, b, False, kind, lo, hi))


def test_bad_activation_raises():
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.linear(x, w, None, False, "tanh")
    with pytest.raises(ValueError, match="both given"):
        ops.linear(x, w, None, True, "silu")


def test_nan_propagates_through_fused_relu():
    x = torch.randn(4, 6)
    x[2, 1] = float("nan")
    w = torch.randn(5, 6)
    assert torch.equal(TF.linear(x, w, activation="relu").isnan(), F.relu(F.linear(x, w)).isnan())


@pytest.mark.skipif(INTERPRET, reason="Triton's interpreter computes tl.dot on bfloat16 wrongly (triton#4972, "
                    "#11584); bfloat16 GEMM numerics run on a GPU, and the AOT gate compiles them for sm_80/sm_90")
@pytest.mark.parametrize("relu", [False, True])
def test_bfloat16_on_gpu(relu):
    _run((67,), 130, 90, dtype=torch.bfloat16, relu=relu)


# --- tritonkit::linear_weight_bias_grad: dW and db from one GEMM launch ---------------------------------------


def _weight_bias_grad_case(lead, k, n, relu, dtype, strided_input=False):
    """The op's (dW, db) against eager autograd of F.linear (+ ReLU) in float32 on the same rounded values."""
    x = torch.randn(*lead, k * 2 if strided_input else k).to(dtype)
    x = x[..., ::2] if strided_input else x
    w = (torch.randn(n, k) / max(k, 1) ** 0.5).to(dtype)
    b = torch.randn(n).to(dtype)
    x32, w32, b32 = (t.float().requires_grad_() for t in (x, w, b))
    y32 = F.linear(x32, w32, b32)
    y32 = F.relu(y32) if relu else y32
    g = torch.randn(y32.shape).to(dtype)
    y32.backward(g.float())
    relu_output = y32.detach().to(dtype) if relu else None
    dw, db = ops.linear_weight_bias_grad(g, x, relu_output)
    assert dw.shape == (n, k) and db.shape == (n,) and db.dtype == dtype
    assert_close(dw, w32.grad.to(dtype), grad=True, msg="grad_weight")
    assert_close(db, b32.grad.to(dtype), grad=True, msg="grad_bias")
    assert torch.equal(dw, ops.linear_weight_grad(g, x, relu_output))  # the same GEMM, bitwise


@pytest.mark.parametrize("lead,k,n", [((37,), 53, 29), ((3, 5), 17, 9), ((300,), 400, 120), ((2, 150), 70, 45),
                                      ((), 23, 7), ((2, 0), 5, 3), ((4,), 0, 3), ((1,), 1, 1)], ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_weight_bias_grad(lead, k, n, relu):
    """Leading dims (none, one, two, empty), reduction over rows in several K blocks with a tail (300 rows),
    several column blocks (400 in-features) of which only the first writes db, sizes off every block."""
    _weight_bias_grad_case(lead, k, n, relu, torch.float32)


@pytest.mark.parametrize("relu", [False, True])
def test_weight_bias_grad_float16(relu):
    _weight_bias_grad_case((3, 41), 70, 45, relu, torch.float16)


@pytest.mark.skipif(INTERPRET, reason="the interpreter's bfloat16 tl.dot is wrong (see test_bfloat16_on_gpu)")
def test_weight_bias_grad_bfloat16_on_gpu():
    _weight_bias_grad_case((67,), 130, 90, True, torch.bfloat16)


def test_weight_bias_grad_strided_input():
    _weight_bias_grad_case((4, 3), 21, 13, True, torch.float32, strided_input=True)


def test_weight_bias_grad_nan_relu_output_passes_gradient():
    """threshold_backward's rule: a NaN ReLU output is not <= 0, so its gradient passes (into dW and db)."""
    g, x, y = torch.randn(6, 4), torch.randn(6, 5), torch.randn(6, 4)
    y[2, 1] = float("nan")
    dy = aten.threshold_backward(g, y, 0)
    dw, db = ops.linear_weight_bias_grad(g, x, y)
    assert_close(dw, dy.t() @ x, grad=True)
    assert_close(db, dy.sum(0), grad=True)


def test_weight_bias_grad_opcheck():
    x, w, b = torch.randn(3, 5, 7), torch.randn(6, 7), torch.randn(6)
    y = ops.linear(x, w, b, True)
    g = torch.randn_like(y)
    torch.library.opcheck(ops.linear_weight_bias_grad.default, (g, x, y))
    torch.library.opcheck(ops.linear_weight_bias_grad.default, (g, x, None))


WEIGHT_GRAD_BAD = [
    ("relu_output", dict(y=(4, 2))),
    ("leading dimensions", dict(x=(5, 5))),
    ("input dtype", dict(x_dtype=torch.float16)),
    ("grad_output must be float32", dict(g_dtype=torch.int64)),
]


@pytest.mark.parametrize("needle,bad", WEIGHT_GRAD_BAD, ids=[n for n, _ in WEIGHT_GRAD_BAD])
def test_weight_bias_grad_bad_input(needle, bad):
    """linear_weight_grad's checks, named for the op, in the real and the fake impl, before any launch."""
    g = torch.randn(4, 3).to(bad.get("g_dtype", torch.float32))
    x = torch.randn(*bad.get("x", (4, 5)), dtype=bad.get("x_dtype", torch.float32))
    y = torch.randn(*bad.get("y", (4, 3)))
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    for mode, args in ((None, (g, x, y)), (fake, tuple(fake.from_tensor(t) for t in (g, x, y)))):
        with mode or contextlib.nullcontext(), pytest.raises(RuntimeError, match=needle) as got:
            ops.linear_weight_bias_grad(*args)
        assert "linear_weight_bias_grad" in str(got.value)


# --- tritonkit::linear_backward: dx, dW and db from one launch --------------------------------------------------


def _backward_case(lead, k, n, relu, bias, dtype, strided_input=False, transposed_weight=False):
    """The op's (dx, dW, db) against eager autograd of F.linear (+ ReLU) in float32 on the same rounded values."""
    x = torch.randn(*lead, k * 2 if strided_input else k).to(dtype)
    x = x[..., ::2] if strided_input else x
    w = (torch.randn(k, n) if transposed_weight else torch.randn(n, k)) / max(k, 1) ** 0.5
    w = (w.t() if transposed_weight else w).to(dtype)
    x32, w32, b32 = (t.float().requires_grad_() for t in (x, w, torch.randn(n).to(dtype)))
    y32 = F.linear(x32, w32, b32)
    y32 = F.relu(y32) if relu else y32
    g = torch.randn(y32.shape).to(dtype)
    y32.backward(g.float())
    relu_output = y32.detach().to(dtype) if relu else None
    dx, dw, db = ops.linear_backward(g, x, w, relu_output, bias)
    assert dx.shape == x.shape and dw.shape == (n, k) and dx.dtype == dw.dtype == dtype
    assert_close(dx, x32.grad.to(dtype), grad=True, msg="grad_input")
    assert_close(dw, w32.grad.to(dtype), grad=True, msg="grad_weight")
    if bias:
        assert db.shape == (n,) and db.dtype == dtype
        assert_close(db, b32.grad.to(dtype), grad=True, msg="grad_bias")
    else:
        assert db is None
    if INTERPRET:  # the same tiles as the two launches it replaces (a GPU's autotuner may pick others)
        assert torch.equal(dx, ops.linear_input_grad(g, w, relu_output))
        assert torch.equal(dw, ops.linear_weight_grad(g, x, relu_output))


@pytest.mark.parametrize("lead,k,n", [((37,), 53, 29), ((3, 5), 17, 9), ((300,), 400, 120), ((), 23, 7)], ids=str)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_backward(lead, k, n, relu, bias):
    """Several dx and dW tiles in one grid (300 rows, 400 in-features: column blocks and K blocks with tails),
    leading dims none, one, two, sizes off every block."""
    _backward_case(lead, k, n, relu, bias, torch.float32)


@pytest.mark.parametrize("lead,k,n", [((2, 0), 5, 3), ((4,), 0, 3), ((4,), 5, 0), ((1,), 1, 1)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_backward_empty_dims(lead, k, n, bias):
    """No rows (dW, db zeros), no in-features (only db's programs), no out-features (dx zeros)."""
    _backward_case(lead, k, n, True, bias, torch.float32)


@pytest.mark.parametrize("relu", [False, True])
def test_backward_float16(relu):
    _backward_case((3, 41), 70, 45, relu, True, torch.float16)


@pytest.mark.skipif(INTERPRET, reason="the interpreter's bfloat16 tl.dot is wrong (see test_bfloat16_on_gpu)")
def test_backward_bfloat16_on_gpu():
    _backward_case((67,), 130, 90, True, True, torch.bfloat16)


def test_backward_strided_operands():
    _backward_case((4, 3), 21, 13, True, True, torch.float32, strided_input=True, transposed_weight=True)


def test_backward_nan_relu_output_passes_gradient():
    g, x, w, y = torch.randn(6, 4), torch.randn(6, 5), torch.randn(4, 5), torch.randn(6, 4)
    y[2, 1] = float("nan")
    dy = aten.threshold_backward(g, y, 0)
    dx, dw, db = ops.linear_backward(g, x, w, y, True)
    assert_close(dx, dy @ w, grad=True)
    assert_close(dw, dy.t() @ x, grad=True)
    assert_close(db, dy.sum(0), grad=True)


def test_backward_opcheck():
    x, w, b = torch.randn(3, 5, 7), torch.randn(6, 7), torch.randn(6)
    y = ops.linear(x, w, b, True)
    g = torch.randn_like(y)
    torch.library.opcheck(ops.linear_backward.default, (g, x, w, y, True))
    torch.library.opcheck(ops.linear_backward.default, (g, x, w, None, False))


BACKWARD_BAD = [
    ("features", dict(x=(4, 6))),
    ("weight", dict(w=(3, 5, 2))),
    ("grad_output with last dimension 3", dict(g=(4, 2), y=(4, 2))),
    ("relu_output", dict(y=(4, 2))),
    ("leading dimensions", dict(x=(5, 5))),
    ("weight dtype", dict(w_dtype=torch.float16)),
    ("grad_output must be float32", dict(g_dtype=torch.int64)),
]


@pytest.mark.parametrize("needle,bad", BACKWARD_BAD, ids=[n for n, _ in BACKWARD_BAD])
def test_backward_bad_input(needle, bad):
    """The checks of the ops it replaces, named for the op, in the real and the fake impl, before any launch."""
    g = torch.randn(*bad.get("g", (4, 3))).to(bad.get("g_dtype", torch.float32))
    x = torch.randn(*bad.get("x", (4, 5)))
    w = torch.randn(*bad.get("w", (3, 5)), dtype=bad.get("w_dtype", torch.float32))
    y = torch.randn(*bad.get("y", (4, 3)))
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    for mode, args in ((None, (g, x, w, y)), (fake, tuple(fake.from_tensor(t) for t in (g, x, w, y)))):
        with mode or contextlib.nullcontext(), pytest.raises(RuntimeError, match=needle) as got:
            ops.linear_backward(*args, True)
        assert "linear_backward" in str(got.value)
