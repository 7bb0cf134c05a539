"""Depthwise conv2d (groups == C, multiplier M) forward, epilogues and gradients against eager PyTorch
(``F.conv2d(..., groups=C)`` and autograd), in the interpreter; outputs NaN-poisoned (conftest)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from tritonkit.kernels import conv as conv_kernels
from tritonkit.kernels import depthwise as kernels
from tritonkit.testing import (
    assert_batch_norm_stats_close,
    assert_close,
    batch_norm_output_atol,
    batch_norm_reference,
)

ops = torch.ops.tritonkit
ACT = {"none": lambda v: v, "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
       "silu": F.silu, "sigmoid": torch.sigmoid, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}

# (n, c, h, w, multiplier, kernel, stride, padding, dilation): sizes off every block size
CASES = [
    (2, 5, 9, 11, 1, 3, 1, 1, 1),  # MobileNet's 3x3
    (2, 6, 12, 13, 1, 3, 2, 1, 1),  # its stride-2 block, even input
    (1, 7, 11, 10, 2, 5, 1, 2, 1),  # EfficientNet's 5x5, multiplier 2
    (1, 3, 15, 13, 1, 7, 2, 3, 1),  # 7x7 stride 2
    (2, 4, 9, 8, 1, (1, 3), 1, (0, 1), 1),  # 1x3, padding only along w
    (1, 5, 13, 12, 2, 3, (2, 1), (2, 1), 2),  # dilation 2, strides and paddings differ per axis
    (1, 300, 5, 4, 1, 3, 1, 1, 1),  # two channel blocks of the interpreter's 256, the second a tail
]


def _pairs(*values):
    return [[v, v] if isinstance(v, int) else list(v) for v in values]


def _inputs(case, dtype=torch.float32, layout="contiguous", bias=True):
    n, c, h, w, m, k, stride, padding, dilation = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider tensor, read in place
        x = torch.randn(n, c, h, 2 * w).to(dtype)[..., ::2]
    weight = (torch.randn(c * m, 1, kh, kw) / (kh * kw) ** 0.5).to(dtype)
    b = torch.randn(c * m).to(dtype) if bias else None
    return x, weight, b, _pairs(stride, padding, dilation)


def _eager_grads(x, w, b, geo, activation, g):
    """Eager float32 (output, dx, dw, db) of act(F.conv2d(x, w, b, groups=C)) for the seed gradient g."""
    leaves = [t.detach().float().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = ACT[activation](F.conv2d(*leaves, *geo, groups=x.shape[1]))
    y.backward(g.float())
    return (y.detach(), *(t.grad if t is not None else None for t in leaves))


def _check(case, activation, dtype=torch.float32, layout="contiguous", bias=True, split=None):
    x, w, b, geo = _inputs(case, dtype, layout, bias)
    y = ops.depthwise_conv2d(x, w, b, *geo, activation)
    g = torch.randn(y.shape).to(dtype)
    ref, dx_ref, dw_ref, db_ref = _eager_grads(x, w, b, geo, activation, g)
    assert_close(y, ref.to(dtype), msg="forward")
    assert y.stride() == ref.stride(), "output memory format follows the input's"
    # the backward masks dy with the forward's (tritonkit) output, as a lowering would
    mask, mask_act = (y, activation) if activation != "none" else (None, "relu")
    dx = ops.depthwise_conv2d_input_grad(g, w, mask, list(x.shape), *geo, mask_act)
    assert_close(dx, dx_ref.to(dtype), grad=True, msg="input gradient")
    assert dx.is_contiguous(memory_format=conv_kernels.suggest_memory_format(g))
    dw, db = kernels.depthwise_conv2d_weight_grad(g, x, mask, list(w.shape), *geo, activation=mask_act,
                                                  bias_grad=bias, split=split)
    assert_close(dw, dw_ref.to(dtype), grad=True, msg="weight gradient")
    if bias:
        assert_close(db, db_ref.to(dtype), grad=True, msg="bias gradient")
    else:
        assert db is None


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("layout,activation", [("contiguous", "none"), ("channels_last", "relu6")])
def test_matches_eager(case, layout, activation):
    _check(case, activation, layout=layout)


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=str)
def test_relu_strided_input_no_bias(case):
    _check(case, "relu", layout="strided", bias=False)


@pytest.mark.parametrize("case,limit", [(CASES[1], 16), (CASES[5], 16)], ids=str)
def test_several_programs_and_split_weight_grad(case, limit):
    """Small tiles: pixel and channel tails in several programs; the weight gradient over 3 splits."""
    with kernels.interp_block_limit(limit):
        _check(case, "relu6", layout="channels_last", split=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half(dtype, case, layout):
    _check(case, "relu6", dtype, layout)


def test_tap_major_weight_is_read_through_its_strides():
    x, w, b, geo = _inputs(CASES[2], layout="channels_last")
    tap_major = w.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)  # [KH, KW, OC] in memory
    y = ops.depthwise_conv2d(x, tap_major, b, *geo, "relu")
    assert_close(y, F.relu(F.conv2d(x, w, b, *geo, groups=7)))
    g = torch.randn(y.shape)
    dx = ops.depthwise_conv2d_input_grad(g, tap_major, y, list(x.shape), *geo)
    assert_close(dx, ops.depthwise_conv2d_input_grad(g, w, y, list(x.shape), *geo), grad=True)


def test_weight_grad_is_deterministic_across_splits():
    x, w, b, geo = _inputs(CASES[1], layout="channels_last")
    g = torch.randn(F.conv2d(x, w, b, *geo, groups=x.shape[1]).shape)
    first = kernels.depthwise_conv2d_weight_grad(g, x, None, list(w.shape), *geo, bias_grad=True, split=4)
    again = kernels.depthwise_conv2d_weight_grad(g, x, None, list(w.shape), *geo, bias_grad=True, split=4)
    one = ops.depthwise_conv2d_weight_grad(g, x, None, list(w.shape), *geo, "relu", True)
    for a, b_, c in zip(first, again, one):
        assert torch.equal(a, b_)  # bit-identical reruns
        assert_close(a, c, grad=True)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_nan_propagates_through_the_activation_and_its_mask(activation):
    """NaN outputs stay NaN and pass their gradient, as threshold_backward and CUDA's hardtanh_backward
    do (CPU's vectorized hardtanh_backward zeroes it, its scalar path passes it)."""
    x, w, _, geo = _inputs(CASES[0])
    x[0, 1, 2, 3] = float("nan")
    y = ops.depthwise_conv2d(x, w, None, *geo, activation)
    assert torch.equal(y.isnan(), ACT[activation](F.conv2d(x, w, None, *geo, groups=5)).isnan())
    g = torch.randn(y.shape)
    dx = ops.depthwise_conv2d_input_grad(g, w, y, list(x.shape), *geo, activation)
    g_masked = torch.where((y <= 0) | ((y >= 6) if activation == "relu6" else False), 0.0, g)
    assert_close(dx, F.conv_transpose2d(g_masked, w, None, *geo[:2], 0, 5, geo[2]), grad=True)


def test_empty_batch():
    x, w, b, geo = _inputs((0, 4, 7, 7, 1, 3, 1, 1, 1))
    assert ops.depthwise_conv2d(x, w, b, *geo).shape == (0, 4, 7, 7)
    g = torch.randn(0, 4, 7, 7)
    dw, db = ops.depthwise_conv2d_weight_grad(g, x, None, list(w.shape), *geo, "relu", True)
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros(4))


def test_opcheck():
    x, w, b, geo = _inputs((1, 3, 6, 5, 2, 3, 2, 1, 1))
    y = ops.depthwise_conv2d(x, w, b, *geo, "relu")
    g = torch.randn(y.shape)
    torch.library.opcheck(ops.depthwise_conv2d.default, (x, w, b, *geo, "relu6"))
    torch.library.opcheck(ops.depthwise_conv2d_input_grad.default, (g, w, y, list(x.shape), *geo))
    torch.library.opcheck(ops.depthwise_conv2d_input_grad.default, (g, w, None, list(x.shape), *geo))
    torch.library.opcheck(ops.depthwise_conv2d_weight_grad.default, (g, x, y, list(w.shape), *geo, "relu", True))
    torch.library.opcheck(ops.depthwise_conv2d_weight_grad.default, (g, x, None, list(w.shape), *geo))


# Each bad call fails as eager's F.conv2d(groups=C) fails (same exception type), naming the argument.
BAD = [
    ("input", dict(x=(2, 3, 4, 8, 8))),
    ("weight", dict(w=(8, 1, 3, 3), x=(2, 3, 8, 8))),  # 8 output channels are not a multiple of 3
    ("channels", dict(w=(6, 2, 3, 3))),  # a grouped conv's weight, not a depthwise one
    ("Kernel size", dict(x=(2, 3, 4, 4), w=(3, 1, 5, 5))),
    ("stride", dict(stride=0)),
    ("padding", dict(padding=-1)),
    ("dilation", dict(dilation=0)),
    ("bias", dict(b=(5,))),
    ("dtype", dict(w_dtype=torch.float16)),
    ("weight", dict(w=(6, 1, 3))),
]


@pytest.mark.parametrize("needle,bad", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_raises_like_torch(needle, bad):
    x = torch.randn(*bad.get("x", (2, 3, 8, 8)))
    w = torch.randn(*bad.get("w", (6, 1, 3, 3)), dtype=bad.get("w_dtype", torch.float32))
    b = torch.randn(*bad.get("b", (w.shape[0],)))
    stride, padding, dilation = _pairs(bad.get("stride", 1), bad.get("padding", 0), bad.get("dilation", 1))
    with pytest.raises(Exception) as expected:
        F.conv2d(x, w, b, stride, padding, dilation, groups=x.shape[1])
    with pytest.raises(expected.type) as got:
        ops.depthwise_conv2d(x, w, b, stride, padding, dilation)
    assert needle.lower() in str(got.value).lower(), str(got.value)


def test_bad_activation_and_gradient_shapes():
    x, w, _, geo = _inputs(CASES[0])
    with pytest.raises(ValueError, match="activation"):
        ops.depthwise_conv2d(x, w, None, *geo, "tanh")
    g = torch.randn(2, 5, 9, 11)
    with pytest.raises(ValueError, match="activation"):
        ops.depthwise_conv2d_input_grad(g, w, g, list(x.shape), *geo, "none")
    with pytest.raises(RuntimeError, match="grad_output of size"):
        ops.depthwise_conv2d_input_grad(g[..., :5], w, None, list(x.shape), *geo)
    with pytest.raises(RuntimeError, match="relu_output of size"):
        ops.depthwise_conv2d_weight_grad(g, x, g[:1], list(w.shape), *geo)


# --- input gradient + residual (an inverted residual block's identity-branch gradient) in the epilogue
def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


# (case, grad_output layout (dx's), residual layout, relu6 mask, dtype, interpreter block limit)
RESIDUAL_CASES = [
    (CASES[0], "contiguous", "contiguous", True, torch.float32, None),
    (CASES[0], "channels_last", "channels_last", False, torch.float32, None),
    (CASES[0], "channels_last", "contiguous", True, torch.float32, 16),  # tails in several programs
    (CASES[1], "contiguous", "channels_last", False, torch.float32, None),
    (CASES[1], "channels_last", "strided", True, torch.float32, None),
    (CASES[2], "channels_last", "contiguous", True, torch.float32, None),  # multiplier 2
    (CASES[0], "channels_last", "contiguous", True, torch.float16, None),
    (CASES[1], "contiguous", "channels_last", False, torch.float16, None),
]


@pytest.mark.parametrize("case,g_layout,res_layout,relu_mask,dtype,limit", RESIDUAL_CASES, ids=str)
def test_input_grad_plus_residual(case, g_layout, res_layout, relu_mask, dtype, limit):
    """dx + residual against eager autograd of F.conv2d(groups=C) (+ relu6) plus the residual, in
    float32 on the same rounded values, rounded once."""
    x, w, _, geo = _inputs(case, dtype, bias=False)
    activation = "relu6" if relu_mask else "none"
    y = ops.depthwise_conv2d(x, w, None, *geo, activation)
    g = _layout(torch.randn(y.shape).to(dtype), g_layout)
    res = _layout(torch.randn(x.shape).to(dtype), res_layout)
    _, dx_ref, _, _ = _eager_grads(x, w, None, geo, activation, g)
    with kernels.interp_block_limit(limit) if limit else contextlib.nullcontext():
        dx = ops.depthwise_conv2d_input_grad(g, w, y if relu_mask else None, list(x.shape), *geo, "relu6", res)
    assert_close(dx, (dx_ref + res.float()).to(dtype), grad=True)
    assert dx.is_contiguous(memory_format=conv_kernels.suggest_memory_format(g))


def test_input_grad_residual_opcheck():
    x, w, _, geo = _inputs((1, 3, 6, 5, 2, 3, 2, 1, 1))
    y = ops.depthwise_conv2d(x, w, None, *geo, "relu")
    res = torch.randn(x.shape).to(memory_format=torch.channels_last)
    torch.library.opcheck(ops.depthwise_conv2d_input_grad.default, (torch.randn(y.shape), w, y, list(x.shape), *geo,
                                                                    "relu", res))


@pytest.mark.parametrize("needle,residual", [
    ("residual of size", torch.ones(2, 5, 9, 10)),
    ("residual of size", torch.ones(5, 9, 11)),
    ("residual dtype", torch.ones(2, 5, 9, 11, dtype=torch.float16)),
    ("residual must be float32, float16 or bfloat16", torch.ones(2, 5, 9, 11, dtype=torch.float64)),
    ("residual is on meta", torch.ones(2, 5, 9, 11, device="meta")),
], ids=str)
def test_input_grad_bad_residual_raises(needle, residual, monkeypatch):
    x, w, _, geo = _inputs(CASES[0])
    monkeypatch.setattr(kernels, "depthwise_conv2d_input_grad_kernel", None)  # launching it would fail
    with pytest.raises(RuntimeError, match=needle):
        ops.depthwise_conv2d_input_grad(torch.randn(2, 5, 9, 11), w, None, list(x.shape), *geo, "relu", residual)


# --- eval BatchNorm epilogue
def _eval_bn(channels, dtype=torch.float32, affine=True):
    """(bn_weight, bn_bias, running_mean, running_var, eps), the affine pair None unless ``affine``."""
    weight, bias = (torch.randn(channels).to(dtype), torch.randn(channels).to(dtype)) if affine else (None, None)
    return weight, bias, torch.randn(channels).to(dtype), (torch.rand(channels) + 0.5).to(dtype), 1e-3


def _bn_ref(v, bn, activation):
    weight, bias, mean, var, eps = bn
    up = [t.to(v.dtype) if t is not None else None for t in (mean, var, weight, bias)]
    return ACT[activation](F.batch_norm(v, *up, training=False, eps=eps))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation,bias,affine", [("relu6", True, True), ("none", False, False),
                                                    ("relu", True, False), ("hardswish", True, True)])
def test_batch_norm_eval(case, layout, activation, bias, affine):
    x, w, b, geo = _inputs(case, layout=layout, bias=bias)
    bn = _eval_bn(w.shape[0], affine=affine)
    out = ops.depthwise_conv2d_batch_norm(x, w, b, *bn, *geo, activation)
    ref = _bn_ref(F.conv2d(x, w, b, *geo, groups=x.shape[1]), bn, activation)
    assert_close(out, ref)
    assert out.stride() == ref.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["hardsigmoid", "silu", "sigmoid", "gelu", "gelu_tanh"])
def test_batch_norm_eval_activations(activation, dtype):
    """Each other epilogue activation after BN(depthwise conv) (scaled so its kinks are crossed) as eager's
    activation of the float32 result, rounded once."""
    x, w, b, geo = _inputs(CASES[2], dtype, "channels_last")
    weight, bias, mean, var, eps = _eval_bn(w.shape[0])
    bn = (4 * weight, 4 * bias, mean, var, eps)
    ref = _bn_ref(F.conv2d(x.float(), w.float(), b.float(), *geo, groups=7), bn, activation)
    assert_close(ops.depthwise_conv2d_batch_norm(x, w, b, *bn, *geo, activation), ref.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stats_dtype", ["float32", "input"])
def test_batch_norm_eval_half(dtype, stats_dtype):
    """Half inputs; BatchNorm parameters float32 (as under autocast) or the input's dtype; the
    reference is eager float32 on the same rounded values, rounded once."""
    x, w, b, geo = _inputs(CASES[2], dtype, "channels_last")
    bn = _eval_bn(w.shape[0], torch.float32 if stats_dtype == "float32" else dtype)
    out = ops.depthwise_conv2d_batch_norm(x, w, b, *bn, *geo, "relu6")
    assert_close(out, _bn_ref(F.conv2d(x.float(), w.float(), b.float(), *geo, groups=7), bn, "relu6").to(dtype))


def test_batch_norm_eval_large_mean_is_centred():
    """conv outputs 100 + ~0.01 * N(0, 1), exact in float32 (integer inputs, weights multiples of 2**-12),
    with running statistics those of the output: centred first, (v - mean) is exact and the output
    agrees with a float64 BatchNorm to float32 rounding (a folded v * k + (beta - mean * k) would not)."""
    x = torch.randint(-8, 9, (2, 4, 9, 11)).float()
    w = torch.randint(-8, 9, (4, 1, 3, 3)).float() / 2**12
    b = torch.full((4,), 100.0)
    geo = _pairs(1, 1, 1)
    y = F.conv2d(x, w, b, *geo, groups=4)
    assert torch.equal(y.double(), F.conv2d(x.double(), w.double(), b.double(), *geo, groups=4))  # exact
    bn = (torch.rand(4) + 0.5, torch.randn(4), y.double().mean((0, 2, 3)).float(), y.double().var((0, 2, 3)).float(),
          1e-5)
    weight, bias, mean, var, eps = bn
    ref = F.batch_norm(y.double(), mean.double(), var.double(), weight.double(), bias.double(), False, 0.0, eps)
    assert_close(ops.depthwise_conv2d_batch_norm(x, w, b, *bn, *geo), ref.float())


# --- training BatchNorm statistics epilogue
def _tile_stats(ref):
    """(count, mean, M2) per BN_STAT_ROWS-pixel tile of the (n, oh, ow) rows of ``ref``, float64."""
    rows = ref.double().permute(0, 2, 3, 1).reshape(-1, ref.shape[1])
    tiles = rows.split(conv_kernels.BN_STAT_ROWS)
    means = torch.stack([t.mean(0) for t in tiles])
    m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
    counts = torch.tensor([float(len(t)) for t in tiles], dtype=torch.float64)[:, None].expand_as(means)
    return torch.stack([counts, means, m2], 1)


def _check_partials(partials, ref):
    rows = ref.shape[0] * ref.shape[2] * ref.shape[3]
    assert partials.shape == (conv_kernels.bn_stat_tiles(rows), 3, ref.shape[1])
    assert partials.dtype == torch.float32
    tiles = _tile_stats(ref)
    assert torch.equal(partials[:, 0].double(), tiles[:, 0])
    torch.testing.assert_close(partials[:, 1].double(), tiles[:, 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partials[:, 2].double(), tiles[:, 2], rtol=1e-4, atol=1e-4)


# (case, bias offset): 2*9*11 = 198 pixels (four tiles, the last of 6), 110 (two), 84 (two); offset 100:
# a large mean against the spread, where a float32 sum of squares would cancel
STATS_CASES = [(CASES[0], 0.0), (CASES[2], 100.0), (CASES[5], 100.0)]


@pytest.mark.parametrize("case,offset", STATS_CASES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_stats_feed_batch_norm_from_partials(case, offset, layout):
    """Partials in conv2d_bn_stats' layout, and batch_norm_train_from_partials on them (unchanged)
    against eager's training batch norm of the conv output."""
    x, w, b, geo = _inputs(case, layout=layout)
    b = b + offset
    y, partials = ops.depthwise_conv2d_bn_stats(x, w, b, *geo)
    ref = F.conv2d(x, w, b, *geo, groups=x.shape[1])
    assert_close(y, ref)
    assert y.stride() == ref.stride()
    _check_partials(partials, ref)
    oc = ref.shape[1]
    weight, bias, rm, rv = torch.rand(oc) + 0.5, torch.randn(oc), torch.randn(oc), torch.rand(oc) + 0.5
    out, mean, invstd, rm_out, rv_out, nbt, _ = ops.batch_norm_train_from_partials(
        y, partials, weight, bias, rm, rv, torch.tensor(3), 0.1, 1e-5, None, True)
    assert_batch_norm_stats_close(mean, invstd, y, 1e-5)
    atol = batch_norm_output_atol(mean, invstd, weight)  # the float32 mean's rounding, large with the offset
    torch.testing.assert_close(out.double(), batch_norm_reference(y, weight, bias, relu=True)[0], rtol=1e-4, atol=atol)
    eager_rm, eager_rv = rm.clone(), rv.clone()
    eager = F.relu(F.batch_norm(ref, eager_rm, eager_rv, weight, bias, True, 0.1, 1e-5))
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=atol)
    assert_close(rm_out, eager_rm)
    assert_close(rv_out, eager_rv)
    assert torch.equal(nbt, torch.tensor(4))


def test_bn_stats_partials_do_not_depend_on_the_tile():
    """Several 64-pixel programs and channel blocks (BLOCK_P never drops below BN_STAT_ROWS) write the
    partials one whole-problem program writes."""
    x, w, b, geo = _inputs((2, 12, 12, 13, 2, 3, 1, 1, 1), layout="channels_last")
    y, partials = ops.depthwise_conv2d_bn_stats(x, w, b + 100, *geo)
    with kernels.interp_block_limit(16):
        y_small, partials_small = ops.depthwise_conv2d_bn_stats(x, w, b + 100, *geo)
    assert_close(y_small, y)
    torch.testing.assert_close(partials_small, partials, rtol=1e-5, atol=1e-4)
    _check_partials(partials, F.conv2d(x, w, b + 100, *geo, groups=12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bn_stats_half_uses_the_float32_accumulator(dtype):
    x, w, b, geo = _inputs(CASES[0], dtype, "channels_last")
    y, partials = ops.depthwise_conv2d_bn_stats(x, w, b, *geo)
    ref = F.conv2d(x.float(), w.float(), b.float(), *geo, groups=5)
    assert_close(y, ref.to(dtype))
    _check_partials(partials, ref)  # before rounding to dtype: float32 agreement, not half


def test_batch_norm_opcheck():
    x, w, b, geo = _inputs((1, 3, 6, 5, 2, 3, 2, 1, 1))
    torch.library.opcheck(ops.depthwise_conv2d_batch_norm.default, (x, w, b, *_eval_bn(6), *geo, "relu6"))
    torch.library.opcheck(ops.depthwise_conv2d_batch_norm.default, (x, w, None, *_eval_bn(6, affine=False), *geo))
    torch.library.opcheck(ops.depthwise_conv2d_bn_stats.default, (x, w, b, *geo))


# Bad BatchNorm arguments for a 6-channel output: eager F.batch_norm's exception, naming the argument.
BN_BAD = [
    ("running_mean should be 1-D and contain 6 elements", dict(running_mean=torch.zeros(5))),
    ("running_var should be 1-D and contain 6 elements", dict(running_var=torch.ones(7))),
    ("bn_weight should be 1-D and contain 6 elements", dict(bn_weight=torch.ones(5))),
    ("bn_bias should be 1-D and contain 6 elements", dict(bn_bias=torch.ones(4))),
    ("running_var must be float32", dict(running_var=torch.ones(6, dtype=torch.float64))),
]


@pytest.mark.parametrize("needle,bad", BN_BAD, ids=[f"{n.split()[0]}-{i}" for i, (n, _) in enumerate(BN_BAD)])
def test_batch_norm_bad_arguments_raise_like_torch(needle, bad):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(6, 1, 3, 3)
    bn = dict(bn_weight=torch.ones(6), bn_bias=torch.zeros(6), running_mean=torch.zeros(6), running_var=torch.ones(6))
    bn |= bad
    with pytest.raises(Exception) as expected:
        F.batch_norm(F.conv2d(x, w, groups=3), bn["running_mean"], bn["running_var"], bn["bn_weight"], bn["bn_bias"])
    with pytest.raises(expected.type, match=needle):
        ops.depthwise_conv2d_batch_norm(x, w, None, *bn.values(), 1e-5, [1, 1], [0, 0], [1, 1])
