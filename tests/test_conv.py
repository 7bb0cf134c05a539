"""conv2d (+bias, +ReLU) forward and all gradients against eager PyTorch, in the interpreter.

Outputs are NaN-poisoned before every launch (tests/conftest.py), so an unwritten element fails.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tritonkit.functional as TF
from tritonkit.kernels import conv as conv_kernels
from tritonkit.runtime import INTERPRET
from tritonkit.testing import assert_close, check_against_eager

ops = torch.ops.tritonkit


def _eager(relu):
    def fn(x, w, b, stride, padding, dilation, groups):
        y = F.conv2d(x, w, b, stride, padding, dilation, groups)
        return F.relu(y) if relu else y

    return fn


def _tritonkit(relu):
    def fn(x, w, b, stride, padding, dilation, groups):
        return TF.conv2d(x, w, b, stride, padding, dilation, groups, activation="relu" if relu else None)

    return fn


def _run(n, c, h, w, oc, k, stride=1, padding=0, dilation=1, groups=1, bias=True, relu=True,
         layout="contiguous", dtype=torch.float32, input_grad=True):
    x = torch.randn(n, c, h, w if layout != "strided" else 2 * w + 1, dtype=dtype, requires_grad=input_grad)
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_(input_grad)
    kh, kw = (k, k) if isinstance(k, int) else k
    weight = (torch.randn(oc, c // groups, kh, kw, dtype=dtype) / (c // groups * kh * kw) ** 0.5).requires_grad_()
    b = torch.randn(oc, dtype=dtype, requires_grad=True) if bias else None
    views = [(lambda t: t[..., 1::2]) if layout == "strided" else None, None, None]
    extra = (stride, padding, dilation, groups)
    return check_against_eager(
        lambda x, w, b: _tritonkit(relu)(x, w, b, *extra),
        lambda x, w, b: _eager(relu)(x, w, b, *extra),
        [x, weight, b], views,
    )


# (n, c, h, w, oc, k, stride, padding, dilation, groups): sizes deliberately off every block size.
SWEEP = [
    (2, 3, 32, 32, 6, 5, 1, 0, 1, 1),  # LeNet conv1
    (3, 6, 14, 14, 16, 5, 1, 0, 1, 1),  # LeNet conv2
    (2, 5, 11, 13, 7, 3, 2, 1, 1, 1),
    (1, 4, 10, 9, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (2, 6, 9, 12, 6, 3, 1, 2, 2, 6),  # depthwise
    (2, 8, 7, 7, 12, 1, 1, 0, 1, 4),  # grouped 1x1
    (1, 3, 17, 5, 4, 3, 3, 1, 1, 1),  # stride 3: most input pixels get no gradient
    (2, 3, 13, 11, 5, 1, 2, 0, 1, 1),  # 1x1 stride 2: three of four input-gradient phases have no taps
    (1, 4, 15, 14, 3, 3, (2, 3), (1, 2), 2, 1),  # dilation shares a factor with stride in h, not in w
    (1, 2, 19, 17, 3, (3, 2), 4, 1, 2, 1),  # stride 4, dilation 2: every second phase has taps
    (2, 2, 6, 6, 3, 6, 1, 0, 1, 1),  # kernel == input
    # from 32 channels per group the forward (input channels) and the input gradient (output channels)
    # reduce per tap over channel chunks (CHANNEL_INNER)
    (2, 40, 9, 11, 36, 3, 2, 1, 1, 1),  # channel tails masked, padding per tap, input-gradient phases
    (1, 130, 6, 5, 8, 3, 1, 1, 1, 1),  # two input-channel chunks per tap even at the interpreter's 128
    (1, 300, 5, 4, 8, 3, 1, 1, 1, 1),  # three input-channel chunks per tap; 2700 weight-gradient columns
    (1, 12, 8, 7, 140, 3, 1, 1, 1, 1),  # two output-channel chunks per tap in the input gradient
    (1, 64, 7, 7, 64, 3, 1, 1, 1, 2),  # 32 channels per group
    (1, 33, 9, 8, 40, 3, 1, 2, 2, 1),  # dilated
]


@pytest.mark.parametrize("case", SWEEP, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_sweep_float32(case, relu):
    n, c, h, w, oc, k, stride, padding, dilation, groups = case
    _run(n, c, h, w, oc, k, stride, padding, dilation, groups, relu=relu)


# In the interpreter a launch's tiles cover as much of the problem as they can (one program, one chunk
# per tap for the sweep's shapes); with tiles capped, the same convolutions run several row and column
# programs and several channel chunks per tap in the forward and both gradients, as GPU tiles do.
@pytest.mark.parametrize("case,limit", [(SWEEP[2], 32), (SWEEP[11], 32), (SWEEP[12], 64), (SWEEP[13], 128),
                                        (SWEEP[14], 64)], ids=str)
def test_sweep_small_interpreter_tiles(case, limit):
    with conv_kernels.interp_block_limit(limit):
        _run(*case, relu=True)


def test_interpreter_tiles_cover_small_spatial_layers():
    tiles = conv_kernels._interp_tiles
    assert tiles(2, 512, 512, 9) == (16, 512, 512)  # ResNet-18 layer 4 at 32x32 input: one program, 9 steps
    assert tiles(512, 4608, 2) == (512, 2048, 16)  # its weight gradient: 3 programs of one step
    assert tiles(2, 512, 512, 9, limit=16) == (16, 16, 16)
    assert tiles(2, 512, 512, 9, 64, limit=16) == (64, 16, 16)
    for rows, cols, red, passes in ((12544, 6, 75, 1), (100000, 300, 2700, 1), (7, 3, 5000, 49)):
        bm, bn, bk = tiles(rows, cols, red, passes)
        assert max(bm * bn, bm * bk, bk * bn) <= conv_kernels.INTERP_TILE


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("relu", [False, True])
def test_layouts(layout, relu):
    _run(2, 5, 11, 9, 6, 3, 2, 1, 1, 1, relu=relu, layout=layout)


def test_channels_last_output_follows_input():
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    y = TF.conv2d(x, torch.randn(6, 4, 3, 3))
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", [SWEEP[1], SWEEP[3], SWEEP[4]], ids=str)
def test_float16(case):
    n, c, h, w, oc, k, stride, padding, dilation, groups = case
    _run(n, c, h, w, oc, k, stride, padding, dilation, groups, dtype=torch.float16)


@pytest.mark.parametrize("c", [8, 48])
def test_float16_channels_last(c):
    _run(2, c, 9, 9, 8, 3, 1, 1, layout="channels_last", dtype=torch.float16)


def test_no_bias_and_no_input_grad():
    _run(2, 3, 10, 10, 4, 3, bias=False, input_grad=False)


def test_unbatched():
    x = torch.randn(3, 12, 11, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    check_against_eager(lambda x, w: TF.conv2d(x, w, padding=1), lambda x, w: F.conv2d(x, w, padding=1), [x, w])


def test_empty_batch():
    x = torch.randn(0, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    out = check_against_eager(lambda *a: TF.conv2d(*a), lambda *a: F.conv2d(*a), [x, w, b])
    assert out.shape == (0, 4, 6, 6)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("k", [3, 4])
def test_string_padding(padding, k):
    x = torch.randn(2, 3, 9, 10, requires_grad=True)
    w = torch.randn(4, 3, k, k, requires_grad=True)
    check_against_eager(lambda x, w: TF.conv2d(x, w, padding=padding, dilation=2),
                        lambda x, w: F.conv2d(x, w, padding=padding, dilation=2), [x, w])


def test_conv2d_relu_matches_activation():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    assert_close(TF.conv2d_relu(x, w), F.relu(F.conv2d(x, w)))


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 3), cg=st.integers(1, 4), ocg=st.integers(1, 5), groups=st.integers(1, 3),
    h=st.integers(1, 12), w=st.integers(1, 12), kh=st.integers(1, 4), kw=st.integers(1, 4),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), bias=st.booleans(), relu=st.booleans(),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
)
def test_fuzz(n, cg, ocg, groups, h, w, kh, kw, stride, padding, dilation, bias, relu, layout):
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    h, w = max(h, span_h - 2 * padding[0]), max(w, span_w - 2 * padding[1])
    _run(n, cg * groups, h, w, ocg * groups, (kh, kw), stride, padding, dilation, groups, bias, relu, layout)


def test_opcheck():
    x = torch.randn(2, 4, 7, 9)
    w = torch.randn(6, 2, 3, 2)
    b = torch.randn(6)
    geometry = ([2, 1], [1, 0], [1, 2], 2)
    torch.library.opcheck(ops.conv2d.default, (x, w, b, *geometry[:3], 2, True))
    y = ops.conv2d(x, w, b, *geometry, True)
    g = torch.randn_like(y)
    torch.library.opcheck(ops.conv2d_input_grad.default, (g, w, y, list(x.shape), *geometry))
    torch.library.opcheck(ops.conv2d_weight_grad.default, (g, x, y, list(w.shape), *geometry))
    torch.library.opcheck(ops.conv2d_input_grad.default, (g, w, None, list(x.shape), *geometry))


# Each bad call must fail in tritonkit exactly as it fails in eager PyTorch (same exception type),
# with a message that names the offending argument.
BAD = [
    ("input", dict(x=(2, 3, 4, 8, 8))),
    ("channels", dict(x=(2, 4, 8, 8))),
    ("groups", dict(w=(5, 1, 3, 3), groups=3, x=(2, 3, 8, 8))),
    ("Kernel size", dict(x=(2, 3, 4, 4), w=(6, 3, 5, 5))),
    ("stride", dict(stride=0)),
    ("stride", dict(stride=-1)),
    ("padding", dict(padding=-1)),
    ("dilation", dict(dilation=0)),
    ("groups", dict(groups=0)),
    ("bias", dict(b=(5,))),
    ("dtype", dict(w_dtype=torch.float16)),
    ("weight", dict(w=(6, 3, 3))),
]


@pytest.mark.parametrize("needle,bad", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_raises_like_torch(needle, bad):
    x = torch.randn(*bad.get("x", (2, 3, 8, 8)))
    w = torch.randn(*bad.get("w", (6, 3, 3, 3)), dtype=bad.get("w_dtype", torch.float32))
    b = torch.randn(*bad.get("b", (w.shape[0],)))
    kwargs = {k: bad[k] for k in ("stride", "padding", "dilation", "groups") if k in bad}
    with pytest.raises(Exception) as expected:
        F.conv2d(x, w, b, **kwargs)
    with pytest.raises(expected.type) as got:
        TF.conv2d(x, w, b, **kwargs)
    assert needle.lower() in str(got.value).lower(), str(got.value)


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        TF.conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3), activation="gelu")


def test_nan_propagates_through_fused_relu():
    x = torch.randn(1, 2, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    w = torch.randn(3, 2, 3, 3)
    assert torch.equal(TF.conv2d_relu(x, w).isnan(), F.relu(F.conv2d(x, w)).isnan())


# conv -> ReLU -> max-pool fused for inference: (n, c, h, w, oc, k, stride, padding, pool k, pool stride,
# pool padding, ceil_mode); overlapping windows recompute conv tiles and must still agree.
FUSED_POOL = [
    (3, 3, 32, 32, 6, 5, 1, 0, 2, 2, 0, False),  # LeNet conv1 + pool
    (2, 6, 14, 14, 16, 5, 1, 0, 2, 2, 0, False),  # LeNet conv2 + pool
    (2, 4, 13, 11, 5, 3, 1, 1, 3, 2, 1, True),  # ResNet-stem style overlapping windows, ceil mode
    (1, 3, 9, 10, 4, 3, 2, 1, 3, 2, 1, False),
    (1, 36, 12, 10, 8, 3, 1, 1, 3, 2, 1, True),  # channel-chunked reduction
]


@pytest.mark.parametrize("case,limit", [(case, None) for case in FUSED_POOL] + [(FUSED_POOL[4], 16)], ids=str)
def test_conv_relu_maxpool_inference(case, limit):
    n, c, h, w, oc, k, stride, padding, pk, ps, pp, ceil = case
    x, weight, b = torch.randn(n, c, h, w), torch.randn(oc, c, k, k), torch.randn(oc)
    with torch.no_grad(), conv_kernels.interp_block_limit(limit):
        out = TF.conv2d_relu_maxpool(x, weight, b, stride, padding, pool_kernel_size=pk, pool_stride=ps,
                                     pool_padding=pp, ceil_mode=ceil)
    ref = F.max_pool2d(F.relu(F.conv2d(x, weight, b, stride, padding)), pk, ps, pp, ceil_mode=ceil)
    assert_close(out, ref)


def test_conv_relu_maxpool_training_path_has_gradients():
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    check_against_eager(lambda x, w: TF.conv2d_relu_maxpool(x, w),
                        lambda x, w: F.max_pool2d(F.relu(F.conv2d(x, w)), 2), [x, w])


def test_conv_relu_maxpool_opcheck():
    args = (torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3), torch.randn(4), [1, 1], [1, 1], [1, 1], 1,
            [3, 3], [2, 2], [1, 1], [1, 1], True)
    torch.library.opcheck(ops.conv2d_relu_maxpool.default, args)


@pytest.mark.skipif(INTERPRET, reason="Triton's interpreter computes tl.dot on bfloat16 wrongly (triton#4972, "
                    "#11584); bfloat16 conv numerics run on a GPU, and the AOT gate compiles them for sm_80/sm_90")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bfloat16_on_gpu(layout):
    _run(4, 16, 15, 13, 24, 3, 1, 1, layout=layout, dtype=torch.bfloat16)


@pytest.mark.parametrize("pool", [dict(pool_kernel_size=2, pool_padding=2), dict(pool_kernel_size=0),
                                  dict(pool_kernel_size=2, pool_stride=0), dict(pool_kernel_size=9)], ids=str)
def test_conv_relu_maxpool_bad_pool_args_raise_like_torch(pool):
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    args = (pool["pool_kernel_size"], pool.get("pool_stride"), pool.get("pool_padding", 0))
    with pytest.raises(Exception) as expected:
        F.max_pool2d(F.relu(F.conv2d(x, w)), *args)
    with torch.no_grad(), pytest.raises(expected.type):
        TF.conv2d_relu_maxpool(x, w, **pool)


# --- BatchNorm-network fusions: eval-mode BN (+ residual) (+ ReLU) epilogue, BN statistics, input prologue
HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="Triton's interpreter computes tl.dot on bfloat16 wrongly (triton#4972, #11584)"))]
# (n, c, h, w, oc, k, stride, padding, dilation, groups): channel-chunked with tails, few channels, grouped
BN_CASES = [(2, 40, 9, 11, 36, 3, 2, 1, 1, 1), (2, 5, 11, 13, 7, 3, 1, 1, 1, 1),
            (1, 4, 10, 9, 6, (3, 2), 1, (1, 0), 2, 2)]


def _conv_inputs(case, dtype, layout="contiguous", bias=True):
    n, c, h, w, oc, k, stride, padding, dilation, groups = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = (torch.randn(oc, c // groups, kh, kw) / (c // groups * kh * kw) ** 0.5).to(dtype)
    b = torch.randn(oc).to(dtype) if bias else None
    pairs = [[v, v] if isinstance(v, int) else list(v) for v in (stride, padding, dilation)]
    return x, weight, b, (*pairs, groups)


def _eval_bn(channels, dtype=torch.float32, affine=True):
    """Random eval-mode BatchNorm (bn_weight, bn_bias, running_mean, running_var, eps); no affine
    parameters (None) when not ``affine``."""
    weight, bias = (torch.randn(channels).to(dtype), torch.randn(channels).to(dtype)) if affine else (None, None)
    return weight, bias, torch.randn(channels).to(dtype), (torch.rand(channels) + 0.5).to(dtype), 1e-3


def _batch_norm_ref(v, bn):
    """Eager eval-mode F.batch_norm of ``v`` with ``_eval_bn``'s parameters, in ``v``'s dtype."""
    weight, bias, mean, var, eps = bn
    up = [t.to(v.dtype) if t is not None else None for t in (mean, var, weight, bias)]
    return F.batch_norm(v, *up, training=False, eps=eps)


def _input_transform(c, relu, dtype=torch.float32):
    """A training BatchNorm's per-input-channel (mean, invstd, weight, bias), biases mostly positive so that
    the transform of 0 is not 0 (a padding tap that contributed it instead of 0 would show), and the
    activation it gives as eager stores it in x's dtype (read back in float32)."""
    norm = (torch.randn(c) * 0.3, torch.rand(c) + 0.5, torch.randn(c), torch.randn(c) * 0.5 + 1.0)
    norm = tuple(v.to(dtype) for v in norm)

    def apply(x):
        mean, invstd, weight, bias = (v.float()[None, :, None, None] for v in norm)
        v = (x.float() - mean) * (invstd * weight) + bias
        return (F.relu(v) if relu else v).to(x.dtype).float()

    return norm, apply


def _conv_batch_norm(x, w, b, bn, res, geo, relu):
    weight, bias, mean, var, eps = bn
    return ops.conv2d_batch_norm(x, w, b, weight, bias, mean, var, eps, res, *geo, relu)


@pytest.mark.parametrize("case", BN_CASES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("residual,relu,bias,affine", [(False, True, True, True), (True, True, True, True),
                                                       (True, False, False, True), (True, True, True, False)])
def test_conv_batch_norm_matches_eager(case, layout, residual, relu, bias, affine):
    x, w, b, geo = _conv_inputs(case, torch.float32, layout, bias)
    bn = _eval_bn(w.shape[0], affine=affine)
    ref = _batch_norm_ref(F.conv2d(x, w, b, *geo), bn)
    # any dense residual layout: the other memory format than the input's
    res = torch.randn(ref.shape).to(memory_format=torch.channels_last if layout == "contiguous" else
                                    torch.contiguous_format) if residual else None
    ref = ref + res if residual else ref
    out = _conv_batch_norm(x, w, b, bn, res, geo, relu)
    assert_close(out, F.relu(ref) if relu else ref)
    assert out.is_contiguous(memory_format=conv_kernels.suggest_memory_format(x))


def test_conv_batch_norm_several_programs_and_chunks():
    x, w, b, geo = _conv_inputs(BN_CASES[0], torch.float32, "channels_last")
    bn = _eval_bn(w.shape[0])
    res = torch.randn(F.conv2d(x, w, b, *geo).shape)
    ref = F.relu(_batch_norm_ref(F.conv2d(x, w, b, *geo), bn) + res)
    with conv_kernels.interp_block_limit(16):
        assert_close(_conv_batch_norm(x, w, b, bn, res, geo, True), ref)


def test_conv_batch_norm_strided_residual():
    x, w, b, geo = _conv_inputs(BN_CASES[1], torch.float32)
    bn = _eval_bn(w.shape[0])
    ref = _batch_norm_ref(F.conv2d(x, w, b, *geo), bn)
    res = torch.randn(*ref.shape[:3], 2 * ref.shape[3])[..., ::2]  # a non-dense view, read in place
    assert_close(_conv_batch_norm(x, w, b, bn, res, geo, True), F.relu(ref + res))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", BN_CASES[:2], ids=str)
@pytest.mark.parametrize("stats_dtype", ["float32", "input"])
def test_conv_batch_norm_half(dtype, layout, case, stats_dtype):
    """Half inputs; BatchNorm parameters and running statistics float32 (as under autocast) or the
    input's dtype. The reference is eager in float32 on the same rounded values, rounded once."""
    x, w, b, geo = _conv_inputs(case, dtype, layout)
    bn = _eval_bn(w.shape[0], torch.float32 if stats_dtype == "float32" else dtype)
    res = torch.randn(F.conv2d(x.float(), w.float(), None, *geo).shape).to(dtype)
    ref = F.relu(_batch_norm_ref(F.conv2d(x.float(), w.float(), b.float(), *geo), bn) + res.float())
    assert_close(_conv_batch_norm(x, w, b, bn, res, geo, True), ref.to(dtype))


# (kind, min_val, max_val, eager) of every epilogue activation; ReLU6 and another hardtanh among them
EPILOGUE_ACTIVATIONS = {
    "relu6": ("hardtanh", 0.0, 6.0, F.relu6), "hardtanh": ("hardtanh", -0.5, 1.5, lambda t: F.hardtanh(t, -0.5, 1.5)),
    "hardswish": ("hardswish", 0.0, 0.0, F.hardswish), "hardsigmoid": ("hardsigmoid", 0.0, 0.0, F.hardsigmoid),
    "silu": ("silu", 0.0, 0.0, F.silu), "sigmoid": ("sigmoid", 0.0, 0.0, torch.sigmoid),
    "gelu": ("gelu", 0.0, 0.0, F.gelu), "gelu_tanh": ("gelu_tanh", 0.0, 0.0, lambda t: F.gelu(t, approximate="tanh"))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", EPILOGUE_ACTIVATIONS)
def test_activation_epilogue(case, dtype):
    """conv2d (the plain kernel; grouped, few channels) and conv2d_batch_norm (+ residual; channel-chunked,
    strided) apply each activation to the float32 result before the one rounding: eager's activation of the
    float32 result, rounded. The results span every kink (-3, 0, 3, 6)."""
    kind, lo, hi, act = EPILOGUE_ACTIVATIONS[case]
    x, w, b, geo = _conv_inputs(BN_CASES[2], dtype, "channels_last")
    ref = F.conv2d(4 * x.float(), w.float(), b.float(), *geo)
    assert (ref < -3).any() and (ref > 6).any() and ((ref > 0) & (ref < 3)).any()
    assert_close(ops.conv2d(4 * x, w, b, *geo, False, kind, lo, hi), act(ref).to(dtype))
    x, w, b, geo = _conv_inputs(BN_CASES[0], dtype, "channels_last")
    bn = _eval_bn(w.shape[0])
    res = torch.randn(F.conv2d(x.float(), w.float(), None, *geo).shape).to(dtype)
    ref = _batch_norm_ref(F.conv2d(x.float(), w.float(), b.float(), *geo), bn) * 4 + res.float()
    bn = (bn[0] * 4, bn[1] * 4, *bn[2:])
    out = ops.conv2d_batch_norm(x, w, b, *bn[:4], bn[4], res, *geo, False, kind, lo, hi)
    assert_close(out, act(ref).to(dtype))


@pytest.mark.parametrize("case", ["silu", "sigmoid", "hardtanh"])
def test_activation_epilogue_gradients(case):
    """``tritonkit::conv2d(activation=...)`` called directly is differentiable: the activation's backward from
    the output (sigmoid) or the recomputed pre-activation (the others), then the conv's gradients."""
    kind, lo, hi, act = EPILOGUE_ACTIVATIONS[case]
    x, w, b, geo = _conv_inputs(BN_CASES[1], torch.float32)
    check_against_eager(lambda x, w, b: ops.conv2d(4 * x, w, b, *geo, False, kind, lo, hi),
                        lambda x, w, b: act(F.conv2d(4 * x, w, b, *geo)), [t.requires_grad_() for t in (x, w, b)])
    torch.library.opcheck(ops.conv2d.default, (x, w, b, *geo, False, kind, lo, hi))


@pytest.mark.parametrize("op", ["conv2d", "conv2d_batch_norm"])
@pytest.mark.parametrize("activation,relu,needle", [("tanh", False, "activation must be one of"),
                                                    ("silu", True, "relu=True and activation='silu' both given")])
def test_bad_activation_raises(op, activation, relu, needle, monkeypatch):
    x, w, b, geo = _conv_inputs(BN_CASES[1], torch.float32)
    monkeypatch.setattr(conv_kernels, "conv2d_fwd_kernel", None)  # launching either kernel would fail
    monkeypatch.setattr(conv_kernels, "conv2d_fwd_bn_kernel", None)
    args = (x, w, b, *geo, relu, activation) if op == "conv2d" else (
        x, w, b, *_eval_bn(w.shape[0])[:4], 1e-5, None, *geo, relu, activation)
    with pytest.raises(ValueError, match=needle):
        getattr(ops, op)(*args)



def _large_mean_case():
    """conv outputs 100 + ~0.01 * N(0, 1) per channel, exact in float32 (integer inputs, weights
    multiples of 2**-14, bias 100: every product and partial sum is representable), with running
    statistics those of the activation (mean ~100, var ~1e-4), so BatchNorm scales by ~100."""
    x = torch.randint(-8, 9, (2, 4, 9, 11)).float()
    w = torch.randint(-8, 9, (6, 4, 3, 3)).float() / 2**14
    b = torch.full((6,), 100.0)
    geo = ([1, 1], [1, 1], [1, 1], 1)
    y = F.conv2d(x, w, b, *geo)
    assert torch.equal(y.double(), F.conv2d(x.double(), w.double(), b.double(), *geo))  # exact
    mean, var = y.double().mean((0, 2, 3)).float(), y.double().var((0, 2, 3)).float()
    return x, w, b, geo, y, (torch.rand(6) + 0.5, torch.randn(6), mean, var, 1e-5)


def test_conv_batch_norm_large_mean_is_centred():
    """Centred first, (v - mean) is exact here (Sterbenz) and the output agrees with a float64
    BatchNorm of the (exact) conv output to float32 rounding; the folded v * k + (beta - mean * k)
    loses ~1e-3 absolute to cancellation at v * k ~ 1e4 (shown for the record)."""
    x, w, b, geo, y, bn = _large_mean_case()
    weight, bias, mean, var, eps = bn
    ref = F.batch_norm(y.double(), mean.double(), var.double(), weight.double(), bias.double(), False, 0.0, eps)
    res = torch.randn(y.shape)
    out = _conv_batch_norm(x, w, b, bn, res, geo, False)
    assert_close(out, (ref + res.double()).float())
    k = weight * torch.rsqrt(var + eps)
    folded = y * k[None, :, None, None] + (bias - mean * k)[None, :, None, None]
    assert (folded.double() - ref).abs().max() > 10 * (out.double() - res.double() - ref).abs().max()


def test_conv_bn_relu_maxpool_large_mean():
    x, w, b, geo, y, bn = _large_mean_case()
    weight, bias, mean, var, eps = bn
    ref = F.batch_norm(y.double(), mean.double(), var.double(), weight.double(), bias.double(), False, 0.0, eps)
    out = ops.conv2d_relu_maxpool(x, w, b, *geo, [3, 3], [2, 2], [1, 1], [1, 1], False, *bn)
    assert_close(out, F.max_pool2d(F.relu(ref), 3, 2, 1).float())


STEM_CASES = [FUSED_POOL[2], FUSED_POOL[4], (2, 3, 20, 18, 8, 7, 2, 3, 3, 2, 1, False)]


@pytest.mark.parametrize("case", STEM_CASES, ids=str)
@pytest.mark.parametrize("affine,bias", [(True, False), (False, True)])
def test_conv_bn_relu_maxpool_stem(case, affine, bias):
    n, c, h, w, oc, k, stride, padding, pk, ps, pp, ceil = case
    x, weight = torch.randn(n, c, h, w), torch.randn(oc, c, k, k)
    b = torch.randn(oc) if bias else None
    bn = _eval_bn(oc, affine=affine)
    out = ops.conv2d_relu_maxpool(x, weight, b, [stride] * 2, [padding] * 2, [1, 1], 1, [pk] * 2, [ps] * 2,
                                  [pp] * 2, [1, 1], ceil, *bn)
    ref = _batch_norm_ref(F.conv2d(x, weight, b, stride, padding), bn)
    assert_close(out, F.max_pool2d(F.relu(ref), pk, ps, pp, ceil_mode=ceil))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_bn_relu_maxpool_stem_half(dtype, layout):
    x, w, b, geo = _conv_inputs((2, 3, 20, 18, 8, 7, 2, 3, 1, 1), dtype, layout, bias=False)
    bn = _eval_bn(w.shape[0])  # float32 parameters under a half input, as autocast keeps them
    out = ops.conv2d_relu_maxpool(x, w, None, *geo, [3, 3], [2, 2], [1, 1], [1, 1], False, *bn)
    ref = F.max_pool2d(F.relu(_batch_norm_ref(F.conv2d(x.float(), w.float(), None, *geo), bn)), 3, 2, 1)
    assert_close(out, ref.to(dtype))
    assert out.is_contiguous(memory_format=conv_kernels.suggest_memory_format(x))


def _combine(partials):
    """Chan's formula over the tiles, in float64: (count, mean, biased variance) per channel."""
    p = partials.double()
    count, mean, m2 = p[:, 0], p[:, 1], p[:, 2]
    total = count.sum(0)
    batch_mean = (count * mean).sum(0) / total
    return total, batch_mean, (m2.sum(0) + (count * (mean - batch_mean) ** 2).sum(0)) / total


def _tile_stats(ref):
    """(count, mean, M2) per BN_STAT_ROWS-pixel tile of the (n, oh, ow) rows of ``ref``, float64."""
    rows = ref.double().permute(0, 2, 3, 1).reshape(-1, ref.shape[1])
    tiles = rows.split(conv_kernels.BN_STAT_ROWS)
    means = torch.stack([t.mean(0) for t in tiles])
    m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
    counts = torch.tensor([float(len(t)) for t in tiles], dtype=torch.float64)[:, None].expand_as(means)
    return torch.stack([counts, means, m2], 1)


# (case, bias offset): rows N*OH*OW = 60 (one partial tile), 286, 90 (grouped); bias 100 makes the mean
# large against the spread, where a float32 sum of squares would cancel.
BN_STATS_CASES = [(BN_CASES[0], 0.0), (BN_CASES[1], 100.0), (BN_CASES[2], 100.0), (BN_CASES[1], 0.0)]


@pytest.mark.parametrize("case,offset", BN_STATS_CASES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_bn_stats(case, offset, layout):
    x, w, b, geo = _conv_inputs(case, torch.float32, layout)
    b = b + offset
    out, partials = ops.conv2d_bn_stats(x, w, b, *geo)
    ref = F.conv2d(x, w, b, *geo)
    assert_close(out, ref)
    rows = ref.shape[0] * ref.shape[2] * ref.shape[3]
    assert partials.shape == (conv_kernels.bn_stat_tiles(rows), 3, ref.shape[1])
    assert partials.dtype == torch.float32
    # per tile: exact counts, and mean / M2 of the tile's rows (the layout the finalize kernel reads)
    tiles = _tile_stats(ref)
    assert torch.equal(partials[:, 0].double(), tiles[:, 0])
    torch.testing.assert_close(partials[:, 1].double(), tiles[:, 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partials[:, 2].double(), tiles[:, 2], rtol=1e-4, atol=1e-4)
    count, mean, var = _combine(partials)
    assert torch.all(count == rows)
    r64 = ref.double()
    torch.testing.assert_close(mean, r64.mean((0, 2, 3)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var, r64.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("limit", [16, 64])
def test_conv_bn_stats_partials_do_not_depend_on_the_tile(limit):
    # 2 x 12 x 13 = 312 rows: five 64-row partials, the last of 56; one program of 512 rows by default,
    # five of 64 rows (BLOCK_M never drops below BN_STAT_ROWS) under the limit
    x, w, b, geo = _conv_inputs((2, 6, 12, 13, 40, 3, 1, 1, 1, 1), torch.float32)
    out, partials = ops.conv2d_bn_stats(x, w, b + 100, *geo)
    with conv_kernels.interp_block_limit(limit):
        out_small, partials_small = ops.conv2d_bn_stats(x, w, b + 100, *geo)
    assert_close(out_small, out)
    torch.testing.assert_close(partials_small, partials, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(partials[:, 2].double(), _tile_stats(F.conv2d(x, w, b + 100, *geo))[:, 2],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_conv_bn_stats_half_uses_the_float32_accumulator(dtype):
    x, w, b, geo = _conv_inputs(BN_CASES[0], dtype, "channels_last")
    out, partials = ops.conv2d_bn_stats(x, w, b, *geo)
    ref = F.conv2d(x.float(), w.float(), b.float(), *geo)
    assert_close(out, ref.to(dtype))
    _, mean, var = _combine(partials)
    r64 = ref.double()  # before rounding to dtype: float32 agreement, not half
    torch.testing.assert_close(mean, r64.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, r64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", BN_CASES + [SWEEP[0], SWEEP[12]], ids=str)
@pytest.mark.parametrize("input_relu", [True, False])
def test_input_prologue(case, input_relu):
    x, w, b, geo = _conv_inputs(case, torch.float32, "channels_last" if input_relu else "contiguous")
    norm, transform = _input_transform(x.shape[1], input_relu)
    ref = F.conv2d(transform(x), w, b, *geo)  # F.conv2d zero-pads the transformed input
    out, partials = ops.conv2d_bn_stats(x, w, b, *geo, *norm, input_relu)
    _, mean, var = _combine(partials)
    torch.testing.assert_close(mean, ref.double().mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_input_prologue_half(dtype):
    x, w, b, geo = _conv_inputs(BN_CASES[0], dtype, "channels_last")
    norm, transform = _input_transform(x.shape[1], True, dtype)
    out, _ = ops.conv2d_bn_stats(x, w, b, *geo, *norm, True)
    ref = F.conv2d(transform(x), w.float(), b.float(), *geo)
    assert_close(out, ref.to(dtype))


def test_input_prologue_without_affine_and_the_standalone_apply_agree():
    """weight/bias None mean 1 and 0; the prologue's x' is tritonkit::batch_norm_apply's, bit for bit."""
    x, w, b, geo = _conv_inputs(BN_CASES[0], torch.float32, "channels_last")
    (mean, invstd, _, _), _ = _input_transform(x.shape[1], True)
    applied = ops.batch_norm_apply(x, mean, invstd, None, None, True)
    out, _ = ops.conv2d_bn_stats(x, w, b, *geo, mean, invstd, None, None, True)
    ref, _ = ops.conv2d_bn_stats(applied, w, b, *geo)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_fused_opcheck():
    x, w, b, geo = _conv_inputs(BN_CASES[2], torch.float32)
    weight, bias, mean, var, eps = _eval_bn(w.shape[0])
    norm, _ = _input_transform(x.shape[1], True)
    res = torch.randn(F.conv2d(x, w, None, *geo).shape)
    torch.library.opcheck(ops.conv2d_batch_norm.default, (x, w, b, weight, bias, mean, var, eps, res, *geo, True))
    torch.library.opcheck(ops.conv2d_batch_norm.default, (x, w, None, None, None, mean, var, eps, None, *geo, False))
    torch.library.opcheck(ops.conv2d_bn_stats.default, (x, w, b, *geo))
    torch.library.opcheck(ops.conv2d_bn_stats.default, (x, w, None, *geo, *norm, False))
    args = (torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, [3, 3], [2, 2],
            [1, 1], [1, 1], True, *_eval_bn(4))
    torch.library.opcheck(ops.conv2d_relu_maxpool.default, args)


# Bad BatchNorm arguments: (needle, overrides of (bn_weight, bn_bias, running_mean, running_var) for a
# 6-channel conv output). Each fails before any launch with the exception eager's F.batch_norm raises
# for the same mistake (checked), naming the argument and what was expected.
BN_BAD = [
    ("running_mean should be 1-D and contain 6 elements", dict(running_mean=torch.zeros(5))),
    ("running_var should be 1-D and contain 6 elements", dict(running_var=torch.ones(7))),
    ("bn_weight should be 1-D and contain 6 elements", dict(bn_weight=torch.ones(5))),
    ("bn_bias should be 1-D and contain 6 elements", dict(bn_bias=torch.ones(4))),
    ("running_mean should be 1-D", dict(running_mean=torch.zeros(6, 1))),
    ("running_var must be float32", dict(running_var=torch.ones(6, dtype=torch.float64))),
    ("running_mean must be float32", dict(running_mean=torch.zeros(6, dtype=torch.int64))),
]


@pytest.mark.parametrize("needle,bad", BN_BAD, ids=[f"{n.split()[0]}-{i}" for i, (n, _) in enumerate(BN_BAD)])
@pytest.mark.parametrize("op", ["conv2d_batch_norm", "conv2d_relu_maxpool"])
def test_batch_norm_bad_arguments_raise_like_torch(needle, bad, op):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 3, 3)
    bn = dict(bn_weight=torch.ones(6), bn_bias=torch.zeros(6), running_mean=torch.zeros(6), running_var=torch.ones(6))
    bn |= bad
    with pytest.raises(Exception) as expected:
        F.batch_norm(F.conv2d(x, w), bn["running_mean"], bn["running_var"], bn["bn_weight"], bn["bn_bias"], False)
    with pytest.raises(expected.type, match=needle):
        if op == "conv2d_batch_norm":
            ops.conv2d_batch_norm(x, w, None, *bn.values(), 1e-5, None, [1, 1], [0, 0], [1, 1], 1, True)
        else:
            ops.conv2d_relu_maxpool(x, w, None, [1, 1], [0, 0], [1, 1], 1, [2, 2], [2, 2], [0, 0], [1, 1], False,
                                    *bn.values())


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_conv_relu_maxpool_running_stats_given_together(missing):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 3, 3)
    stats = dict(running_mean=torch.zeros(6), running_var=torch.ones(6)) | {missing: None}
    with pytest.raises(Exception) as expected:
        F.batch_norm(F.conv2d(x, w), *stats.values(), training=False)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(expected.type, match=f"{missing} must be defined in evaluation mode"):
        ops.conv2d_relu_maxpool(x, w, None, [1, 1], [0, 0], [1, 1], 1, *pool, **stats)
    with pytest.raises(RuntimeError, match="bn_weight and bn_bias need running_mean and running_var"):
        ops.conv2d_relu_maxpool(x, w, None, [1, 1], [0, 0], [1, 1], 1, *pool, torch.ones(6))


FUSED_BAD = [
    ("residual", dict(residual=torch.ones(2, 6, 6, 7))),
    ("residual", dict(residual=torch.ones(2, 6, 6, 6, dtype=torch.float16))),
    ("bias", dict(bias=torch.ones(5))),
]


@pytest.mark.parametrize("needle,bad", FUSED_BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FUSED_BAD)])
def test_conv_batch_norm_bad_arguments_raise(needle, bad):
    x, w = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 3, 3)
    args = dict(bias=None, residual=None) | bad
    with pytest.raises(RuntimeError, match=needle):
        ops.conv2d_batch_norm(x, w, args["bias"], None, None, torch.zeros(6), torch.ones(6), 1e-5, args["residual"],
                              [1, 1], [0, 0], [1, 1], 1, True)


PROLOGUE_BAD = [
    ("input_mean should be 1-D and contain 3 elements", dict(input_mean=torch.ones(4), input_invstd=torch.ones(3))),
    ("input_mean and input_invstd must be given together", dict(input_mean=torch.ones(3))),
    ("input_relu, input_weight and input_bias need input_mean", dict(input_relu=True)),
    ("input_relu, input_weight and input_bias need input_mean", dict(input_bias=torch.ones(3))),
    ("input_weight must be float32 or the input's dtype", dict(input_mean=torch.ones(3), input_invstd=torch.ones(3),
                                                               input_weight=torch.ones(3, dtype=torch.float64))),
]


@pytest.mark.parametrize("needle,prologue", PROLOGUE_BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PROLOGUE_BAD)])
@pytest.mark.parametrize("op", ["conv2d_bn_stats", "conv2d_backward", "conv2d_weight_grad"])
def test_prologue_bad_arguments_raise(needle, prologue, op):
    x, w, g = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 3, 3), torch.randn(2, 6, 6, 6)
    geo = ([1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match=needle):
        if op == "conv2d_bn_stats":
            ops.conv2d_bn_stats(x, w, None, *geo, **prologue)
        elif op == "conv2d_backward":
            ops.conv2d_backward(g, x, w, None, *geo, **prologue)
        else:
            ops.conv2d_weight_grad(g, x, None, [6, 3, 3, 3], *geo, **prologue)


# --- input gradient + residual gradient (a ResNet block's grad_x) in one launch
def _input_grad_ref(g, x, w, y, geo):
    """Eager's conv input gradient of dy' = threshold_backward(g, y, 0) (y: the ReLU output, or None)."""
    stride, padding, dilation, groups = geo
    g = torch.ops.aten.threshold_backward(g, y, 0) if y is not None else g
    return torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                                               [True, False, False])[0]


def _layout(t, name):
    if name == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if name == "strided":  # a non-dense view: every other element of a twice-as-wide buffer
        wide = torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


# strides 1 and 2 (2: phase-split rows, 1x1 stride 2: phases without taps), dilation, groups, channel chunks
DGRAD_RESIDUAL_CASES = [SWEEP[1], SWEEP[2], SWEEP[3], SWEEP[4], SWEEP[7], SWEEP[8], SWEEP[11], SWEEP[9]]
# (grad_output, residual, residual_mask) layouts
DGRAD_LAYOUTS = [("contiguous", "channels_last", "strided"), ("channels_last", "contiguous", "channels_last")]


@pytest.mark.parametrize("case", DGRAD_RESIDUAL_CASES, ids=str)
@pytest.mark.parametrize("layouts", DGRAD_LAYOUTS, ids=str)
@pytest.mark.parametrize("relu_mask,residual_mask", [(True, True), (False, False)])
def test_input_grad_plus_residual(case, layouts, relu_mask, residual_mask):
    x, w, _, geo = _conv_inputs(case, torch.float32)
    y = F.relu(F.conv2d(x, w, None, *geo)) if relu_mask else None
    g = _layout(torch.randn(F.conv2d(x, w, None, *geo).shape), layouts[0])
    res = _layout(torch.randn(x.shape), layouts[1])
    mask = _layout(torch.randn(x.shape), layouts[2]) if residual_mask else None
    ref = _input_grad_ref(g, x, w, y, geo) + (torch.ops.aten.threshold_backward(res, mask, 0) if residual_mask
                                              else res)
    out = ops.conv2d_input_grad(g, w, y, list(x.shape), *geo, res, mask)
    assert_close(out, ref, grad=True)
    assert out.is_contiguous(memory_format=conv_kernels.suggest_memory_format(g))


@pytest.mark.parametrize("case,limit", [(SWEEP[2], 16), (SWEEP[11], 32)], ids=str)
def test_input_grad_plus_residual_several_programs(case, limit):
    x, w, _, geo = _conv_inputs(case, torch.float32, "channels_last")
    y = F.relu(F.conv2d(x, w, None, *geo))
    g, res, mask = torch.randn(y.shape), torch.randn(x.shape), torch.randn(x.shape)
    with conv_kernels.interp_block_limit(limit):
        out = ops.conv2d_input_grad(g, w, y, list(x.shape), *geo, res, mask)
    assert_close(out, _input_grad_ref(g, x, w, y, geo) + torch.ops.aten.threshold_backward(res, mask, 0), grad=True)


def test_input_grad_residual_mask_passes_nan_like_threshold_backward():
    x, w, _, geo = _conv_inputs(SWEEP[2], torch.float32)
    g, res, mask = torch.randn(F.conv2d(x, w, None, *geo).shape), torch.randn(x.shape), torch.randn(x.shape)
    mask[0, 1, 2, 3] = float("nan")
    out = ops.conv2d_input_grad(g, w, None, list(x.shape), *geo, res, mask)
    assert_close(out, _input_grad_ref(g, x, w, None, geo) + torch.ops.aten.threshold_backward(res, mask, 0), grad=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", [SWEEP[2], SWEEP[11]], ids=str)
def test_input_grad_plus_residual_half(dtype, case):
    x, w, _, geo = _conv_inputs(case, dtype, "channels_last")
    y = F.relu(F.conv2d(x.float(), w.float(), None, *geo)).to(dtype)
    g, res, mask = (torch.randn(t).to(dtype) for t in (y.shape, x.shape, x.shape))
    out = ops.conv2d_input_grad(g, w, y, list(x.shape), *geo, res, mask)
    ref = _input_grad_ref(g.float(), x.float(), w.float(), y.float(), geo)
    assert_close(out, (ref + torch.ops.aten.threshold_backward(res.float(), mask.float(), 0)).to(dtype), grad=True)


def test_input_grad_residual_opcheck():
    x, w, _, geo = _conv_inputs(SWEEP[3], torch.float32)
    y = F.relu(F.conv2d(x, w, None, *geo))
    g, res, mask = torch.randn(y.shape), torch.randn(x.shape), torch.randn(x.shape)
    torch.library.opcheck(ops.conv2d_input_grad.default, (g, w, y, list(x.shape), *geo, res, mask))
    torch.library.opcheck(ops.conv2d_input_grad.default, (g, w, None, list(x.shape), *geo, res))


@pytest.mark.parametrize("needle,bad", [
    ("residual_mask needs a residual", dict(residual_mask=torch.ones(2, 3, 8, 8))),
    ("residual of size", dict(residual=torch.ones(2, 3, 8, 7))),
    ("residual_mask of size", dict(residual=torch.ones(2, 3, 8, 8), residual_mask=torch.ones(2, 3, 8))),
    ("residual dtype", dict(residual=torch.ones(2, 3, 8, 8, dtype=torch.float16))),
], ids=str)
def test_input_grad_bad_residual_raises(needle, bad):
    w = torch.randn(6, 3, 3, 3)
    with pytest.raises(RuntimeError, match=needle):
        ops.conv2d_input_grad(torch.randn(2, 6, 6, 6), w, None, [2, 3, 8, 8], [1, 1], [0, 0], [1, 1], 1, **bad)


# --- weight + bias gradient in one launch
def _weight_bias_grad_ref(g, x, w, y, geo):
    stride, padding, dilation, groups = geo
    g = torch.ops.aten.threshold_backward(g, y, 0) if y is not None else g
    _, dw, db = torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]], stride, padding, dilation, False, [0, 0],
                                                    groups, [False, True, True])
    return dw, db


def _check_weight_bias_grad(case, relu_mask=True, layout="contiguous", dtype=torch.float32):
    x, w, _, geo = _conv_inputs(case, dtype, layout)
    y = F.relu(F.conv2d(x.float(), w.float(), None, *geo)).to(dtype) if relu_mask else None
    g = torch.randn(F.conv2d(x.float(), w.float(), None, *geo).shape).to(dtype)
    dw, db = ops.conv2d_weight_bias_grad(g, x, y, list(w.shape), *geo)
    ref_dw, ref_db = _weight_bias_grad_ref(g.float(), x.float(), w.float(), y.float() if relu_mask else None, geo)
    assert_close(dw, ref_dw.to(dtype), grad=True)
    assert_close(db, ref_db.to(dtype), grad=True)
    assert dw.is_contiguous(memory_format=conv_kernels.suggest_memory_format(x))
    return dw, db


# LeNet conv1/conv2, grouped with dilation and stride, depthwise, channel chunks, 2700 weight columns
WGRAD_BIAS_CASES = [SWEEP[0], SWEEP[1], SWEEP[3], SWEEP[4], SWEEP[12], SWEEP[14]]


@pytest.mark.parametrize("case", WGRAD_BIAS_CASES, ids=str)
@pytest.mark.parametrize("relu_mask", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_weight_bias_grad(case, relu_mask, layout):
    _check_weight_bias_grad(case, relu_mask, layout)


# Several row and column programs (only the first column block sums the bias), several reduction
# steps, and split-K: few tiles, a long reduction split 3 ways (some splits with no steps at all when
# the steps are few), bias partials reduced beside the weight's.
@pytest.mark.parametrize("case,limit,split", [
    (SWEEP[14], 32, 1), (SWEEP[12], 16, 1),
    ((2, 3, 20, 21, 4, 3, 1, 0, 1, 1), 64, 3), ((2, 3, 20, 21, 4, 3, 1, 0, 1, 1), None, 3),
    ((1, 6, 17, 15, 6, 3, 1, 1, 1, 3), 32, 4), (SWEEP[12], 32, 2),
], ids=str)
def test_weight_bias_grad_tiles_and_split_k(case, limit, split):
    with conv_kernels.interp_block_limit(limit), conv_kernels.weight_grad_split(split):
        _check_weight_bias_grad(case, relu_mask=True, layout="channels_last")


@pytest.mark.parametrize("split", [1, 3])
def test_weight_bias_grad_is_deterministic(split):
    """No atomics, one fixed reduction order: bitwise the same twice."""
    x, w, _, geo = _conv_inputs((2, 3, 20, 21, 4, 3, 1, 0, 1, 1), torch.float32)
    y = F.relu(F.conv2d(x, w, None, *geo))
    g = torch.randn(y.shape)
    with conv_kernels.interp_block_limit(64), conv_kernels.weight_grad_split(split):
        first, second = (ops.conv2d_weight_bias_grad(g, x, y, list(w.shape), *geo) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("split", [1, 3])
def test_weight_grad_split_k(split):
    """The plain weight gradient through the same split-K partial layout."""
    x, w, _, geo = _conv_inputs((2, 3, 20, 21, 4, 3, 1, 0, 1, 1), torch.float32, "channels_last")
    y = F.relu(F.conv2d(x, w, None, *geo))
    g = torch.randn(y.shape)
    with conv_kernels.interp_block_limit(64), conv_kernels.weight_grad_split(split):
        dw = ops.conv2d_weight_grad(g, x, y, list(w.shape), *geo)
    assert_close(dw, _weight_bias_grad_ref(g, x, w, y, geo)[0], grad=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("split", [1, 2])
def test_weight_bias_grad_half(dtype, split):
    with conv_kernels.weight_grad_split(split):
        _, db = _check_weight_bias_grad(SWEEP[1], relu_mask=True, layout="channels_last", dtype=dtype)
    assert db.dtype == dtype


def test_weight_bias_grad_empty_batch():
    x, w = torch.randn(0, 3, 8, 8), torch.randn(4, 3, 3, 3)
    dw, db = ops.conv2d_weight_bias_grad(torch.randn(0, 4, 6, 6), x, None, [4, 3, 3, 3], [1, 1], [0, 0], [1, 1], 1)
    assert torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros(4))


def test_weight_bias_grad_opcheck():
    x, w, _, geo = _conv_inputs(SWEEP[3], torch.float32, "channels_last")
    y = F.relu(F.conv2d(x, w, None, *geo))
    g = torch.randn(y.shape)
    torch.library.opcheck(ops.conv2d_weight_bias_grad.default, (g, x, y, list(w.shape), *geo))
    torch.library.opcheck(ops.conv2d_weight_bias_grad.default, (g, x, None, list(w.shape), *geo))


@pytest.mark.parametrize("needle,bad", [("grad_output of size", dict(g=(2, 6, 6, 5))),
                                        ("relu_output of size", dict(y=(2, 6, 6, 7))),
                                        ("dtype", dict(g_dtype=torch.float16))], ids=str)
def test_weight_bias_grad_bad_arguments_raise(needle, bad):
    x = torch.randn(2, 3, 8, 8)
    g = torch.randn(*bad.get("g", (2, 6, 6, 6)), dtype=bad.get("g_dtype", torch.float32))
    y = torch.randn(*bad["y"]) if "y" in bad else None
    with pytest.raises(RuntimeError, match=needle):
        ops.conv2d_weight_bias_grad(g, x, y, [6, 3, 3, 3], [1, 1], [0, 0], [1, 1], 1)


# --- input, weight and bias gradient in one launch (conv2d_backward)
def _backward_ref(g, x, w, y, geo, res=None, mask=None, bias_grad=True):
    """Eager's (dx + residual', dw, db) of dy' = threshold_backward(g, y, 0), residual' =
    threshold_backward(res, mask, 0) (or res, or nothing)."""
    stride, padding, dilation, groups = geo
    g = torch.ops.aten.threshold_backward(g, y, 0) if y is not None else g
    dx, dw, db = torch.ops.aten.convolution_backward(g, x, w, [w.shape[0]], stride, padding, dilation, False, [0, 0],
                                                     groups, [True, True, bias_grad])
    if res is not None:
        dx = dx + (torch.ops.aten.threshold_backward(res, mask, 0) if mask is not None else res)
    return dx, dw, db


def _check_backward(case, dtype=torch.float32, layouts=("contiguous",) * 4, relu_mask=True, residual="masked",
                    bias_grad=True):
    """layouts: of (x, grad_output, residual, residual_mask)."""
    x, w, _, geo = _conv_inputs(case, dtype)
    x = _layout(x, layouts[0])
    y = F.relu(F.conv2d(x.float(), w.float(), None, *geo)).to(dtype) if relu_mask else None
    g = _layout(torch.randn(F.conv2d(x.float(), w.float(), None, *geo).shape).to(dtype), layouts[1])
    res = _layout(torch.randn(x.shape).to(dtype), layouts[2]) if residual else None
    mask = _layout(torch.randn(x.shape).to(dtype), layouts[3]) if residual == "masked" else None
    dx, dw, db = ops.conv2d_backward(g, x, w, y, *geo, res, mask, bias_grad)
    ref = _backward_ref(*(t.float() if t is not None else None for t in (g, x, w, y)), geo,
                        *(t.float() if t is not None else None for t in (res, mask)), bias_grad)
    assert_close(dx, ref[0].to(dtype), grad=True)
    assert_close(dw, ref[1].to(dtype), grad=True)
    assert dx.is_contiguous(memory_format=conv_kernels.suggest_memory_format(g))
    assert dw.is_contiguous(memory_format=conv_kernels.suggest_memory_format(x))
    if bias_grad:
        assert_close(db, ref[2].to(dtype), grad=True)
    else:
        assert db is None


# few channels (flattened reductions), stride 2 with padding, grouped with dilation and unequal strides,
# depthwise, 1x1 stride 2 (phases without taps), channel chunks (CHANNEL_INNER) with a strided input gradient
BACKWARD_CASES = [SWEEP[1], SWEEP[2], SWEEP[3], SWEEP[4], SWEEP[7], SWEEP[11]]
# (x, grad_output, residual, residual_mask) layouts, relu mask, residual, bias gradient
BACKWARD_FLAGS = [(("contiguous",) * 4, True, "masked", True),
                  (("channels_last", "channels_last", "strided", "contiguous"), False, "plain", False),
                  (("channels_last", "contiguous", "channels_last", "channels_last"), True, None, True)]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
@pytest.mark.parametrize("layouts,relu_mask,residual,bias_grad", BACKWARD_FLAGS, ids=str)
def test_backward_matches_eager(case, layouts, relu_mask, residual, bias_grad):
    _check_backward(case, layouts=layouts, relu_mask=relu_mask, residual=residual, bias_grad=bias_grad)


# Several input-gradient programs (rows, channel blocks, groups x phases) and weight-gradient programs
# (tiles, groups, splits) in the one grid: every program finds its own tile.
@pytest.mark.parametrize("case,limit,split", [
    (SWEEP[2], 16, 3), (SWEEP[3], 16, 2), ((2, 3, 20, 21, 4, 3, 1, 0, 1, 1), 64, 3),
], ids=str)
def test_backward_several_programs_and_split_k(case, limit, split):
    with conv_kernels.interp_block_limit(limit), conv_kernels.weight_grad_split(split):
        _check_backward(case, layouts=("channels_last",) * 4)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case,split", [(SWEEP[1], 2), (SWEEP[11], 1)], ids=str)
def test_backward_half(dtype, case, split):
    with conv_kernels.weight_grad_split(split):
        _check_backward(case, dtype, layouts=("channels_last",) * 4)


def test_backward_is_one_launch(monkeypatch):
    for name in ("conv2d_input_grad_kernel", "conv2d_weight_grad_kernel"):
        monkeypatch.setattr(conv_kernels, name, None)  # launching either would fail
    _check_backward(SWEEP[2])


def test_backward_empty_batch():
    x, w = torch.randn(0, 3, 8, 8), torch.randn(4, 3, 3, 3)
    dx, dw, db = ops.conv2d_backward(torch.randn(0, 4, 6, 6), x, w, None, [1, 1], [0, 0], [1, 1], 1, bias_grad=True)
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros(4))


def test_backward_opcheck():
    x, w, _, geo = _conv_inputs(SWEEP[3], torch.float32, "channels_last")
    y = F.relu(F.conv2d(x, w, None, *geo))
    g, res, mask = torch.randn(y.shape), torch.randn(x.shape), torch.randn(x.shape)
    torch.library.opcheck(ops.conv2d_backward.default, (g, x, w, y, *geo, res, mask, True))
    torch.library.opcheck(ops.conv2d_backward.default, (g, x, w, None, *geo), {"bias_grad": False})


@pytest.mark.parametrize("needle,bad", [
    ("conv2d_backward: expected grad_output of size", dict(g=torch.ones(2, 6, 6, 5))),
    ("relu_output of size", dict(y=torch.ones(2, 6, 6, 7))),
    ("input dtype", dict(x=torch.ones(2, 3, 8, 8, dtype=torch.float16))),
    ("expected input", dict(x=torch.ones(2, 4, 8, 8))),
    ("expected 4-D input", dict(x=torch.ones(3, 8, 8))),
    ("residual_mask needs a residual", dict(residual_mask=torch.ones(2, 3, 8, 8))),
    ("residual of size", dict(residual=torch.ones(2, 3, 8, 7))),
    ("residual dtype", dict(residual=torch.ones(2, 3, 8, 8, dtype=torch.float16))),
], ids=str)
def test_backward_bad_arguments_raise(needle, bad):
    args = dict(g=torch.randn(2, 6, 6, 6), x=torch.randn(2, 3, 8, 8), y=None)
    args.update({k: bad.pop(k) for k in ("g", "x", "y") if k in bad})
    with pytest.raises(RuntimeError, match=needle):
        ops.conv2d_backward(args["g"], args["x"], torch.randn(6, 3, 3, 3), args["y"], [1, 1], [0, 0], [1, 1], 1, **bad)


# The input prologue in the gradients: the forward read x' = relu(bn(x)) through its prologue, so the
# weight gradient recomputes x' from x as it loads it (dx is the gradient of x').
PROLOGUE_BACKWARD_CASES = [SWEEP[1], SWEEP[2], SWEEP[3], SWEEP[11], BN_CASES[0]]


@pytest.mark.parametrize("case", PROLOGUE_BACKWARD_CASES, ids=str)
@pytest.mark.parametrize("op", ["conv2d_backward", "conv2d_weight_bias_grad", "conv2d_weight_grad"])
@pytest.mark.parametrize("input_relu", [True, False])
def test_backward_input_prologue_matches_eager(case, op, input_relu):
    x, w, _, geo = _conv_inputs(case, torch.float32, "channels_last")
    norm, transform = _input_transform(x.shape[1], input_relu)
    xp = transform(x)
    y = F.relu(F.conv2d(xp, w, None, *geo))
    g = torch.randn(y.shape)
    ref = _backward_ref(g, xp, w, y, geo)
    prologue = dict(zip(("input_mean", "input_invstd", "input_weight", "input_bias"), norm), input_relu=input_relu)
    if op == "conv2d_backward":
        with conv_kernels.weight_grad_split(2):
            got = ops.conv2d_backward(g, x, w, y, *geo, bias_grad=True, **prologue)
        assert_close(got[0], ref[0], grad=True)
    elif op == "conv2d_weight_bias_grad":
        got = (None, *ops.conv2d_weight_bias_grad(g, x, y, list(w.shape), *geo, **prologue))
    else:
        got = (None, ops.conv2d_weight_grad(g, x, y, list(w.shape), *geo, **prologue), ref[2])
    assert_close(got[1], ref[1], grad=True)
    assert_close(got[2], ref[2], grad=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_backward_input_prologue_half(dtype):
    x, w, _, geo = _conv_inputs(SWEEP[2], dtype, "channels_last")
    norm, transform = _input_transform(x.shape[1], True, dtype)
    xp = transform(x)
    g = torch.randn(F.conv2d(xp, w.float(), None, *geo).shape).to(dtype)
    ref = _backward_ref(g.float(), xp, w.float(), None, geo)
    dx, dw, _ = ops.conv2d_backward(g, x, w, None, *geo, None, None, False, *norm, True)
    assert_close(dx, ref[0].to(dtype), grad=True)
    assert_close(dw, ref[1].to(dtype), grad=True)


def test_backward_input_prologue_opcheck():
    x, w, _, geo = _conv_inputs(SWEEP[3], torch.float32, "channels_last")
    norm, _ = _input_transform(x.shape[1], True)
    g = torch.randn(F.conv2d(x, w, None, *geo).shape)
    torch.library.opcheck(ops.conv2d_backward.default, (g, x, w, None, *geo, None, None, True, *norm, True))
    torch.library.opcheck(ops.conv2d_weight_grad.default, (g, x, None, list(w.shape), *geo, *norm, True))
    torch.library.opcheck(ops.conv2d_weight_bias_grad.default, (g, x, None, list(w.shape), *geo, *norm, False))


# --- the input gradient that starts a BatchNorm backward (conv2d_backward_bn_partials)
def _bn_partials_ref(g, x, w, geo, norm, relu):
    """Eager's gradient with respect to the BN output x' (through the ReLU), the two sums of the BN backward
    over it, dw and db, for a conv of relu(x') with x' = (x - mean) * invstd * weight + bias."""
    mean, invstd, weight, bias = (v.float()[None, :, None, None] for v in norm)
    xp = ((x.float() - mean) * (invstd * weight) + bias).to(x.dtype).float()
    a = (F.relu(xp) if relu else xp).to(x.dtype).float()
    dx, dw, db = _backward_ref(g.float(), a, w.float(), None, geo)
    dx = dx.to(x.dtype).float()  # as the unfused input gradient stores it
    grad_bn = torch.ops.aten.threshold_backward(dx, xp, 0) if relu else dx
    sums = torch.stack([grad_bn.sum((0, 2, 3)), (grad_bn * (x.float() - mean)).sum((0, 2, 3))])
    return grad_bn, sums, dw, db


BN_PARTIALS_CASES = [SWEEP[2], SWEEP[3], SWEEP[11], BN_CASES[0], (2, 6, 9, 9, 5, 3, 1, 1, 1, 1)]


@pytest.mark.parametrize("case", BN_PARTIALS_CASES, ids=str)
@pytest.mark.parametrize("input_relu", [True, False])
@pytest.mark.parametrize("launch", ["one", "two"])
def test_backward_bn_partials_matches_eager(case, input_relu, launch, monkeypatch):
    """The gradient reaches the BN output through the recomputed ReLU's mask, and the partials' sums over
    T are the BN backward's two reductions, in the one-launch kernel and in the two launches a GPU without
    a fitting config pair runs; tiles of at most 64 rows in the interpreter (several stats tiles and
    phases: SWEEP[2] and [3] are strided, the last case has 162 rows)."""
    x, w, _, geo = _conv_inputs(case, torch.float32, "channels_last")
    norm, _ = _input_transform(x.shape[1], input_relu)
    g = torch.randn(F.conv2d(x, w, None, *geo).shape).to(memory_format=torch.channels_last)
    grad_bn, sums, dw, db = _bn_partials_ref(g, x, w, geo, norm, input_relu)
    if launch == "two":
        monkeypatch.setattr(conv_kernels, "INTERPRET", False)
        monkeypatch.setattr(conv_kernels, "backward_config_for", lambda *args: False)
        monkeypatch.setattr(conv_kernels, "conv2d_backward_kernel", None)  # launching it would fail
    with conv_kernels.interp_block_limit(64), conv_kernels.weight_grad_split(1):
        got = ops.conv2d_backward_bn_partials(g, x, w, None, *geo, True, *norm, input_relu)
    assert got[3].shape == (conv_kernels.grad_stat_tiles(x.shape, geo[0]), 2, x.shape[1])
    assert_close(got[0], grad_bn, grad=True)
    assert_close(got[3].sum(0), sums, grad=True)
    assert_close(got[1], dw, grad=True)
    assert_close(got[2], db, grad=True)


def _assert_same_bits(first, second):
    """Two runs' outputs (None where an output is absent) are equal bit for bit."""
    for a, b in zip(first, second):
        if a is not None:
            assert torch.equal(a.view(torch.int16 if a.dtype == torch.float16 else torch.int32),
                               b.view(torch.int16 if b.dtype == torch.float16 else torch.int32))


def test_backward_bn_partials_half_and_same_bits_every_run():
    """float16 (the interpreter's bfloat16 dot is wrong: triton#4972): the partials, float32, sum the
    float16 gradient as stored; no atomics, so a second run gives the same bits."""
    x, w, _, geo = _conv_inputs(BN_PARTIALS_CASES[-1], torch.float16, "channels_last")
    norm, _ = _input_transform(x.shape[1], True)
    g = torch.randn(F.conv2d(x.float(), w.float(), None, *geo).shape).to(torch.float16)
    grad_bn, sums, dw, _ = _bn_partials_ref(g, x, w, geo, norm, True)
    with conv_kernels.interp_block_limit(64):
        first = ops.conv2d_backward_bn_partials(g, x, w, None, *geo, False, *norm, True)
        second = ops.conv2d_backward_bn_partials(g, x, w, None, *geo, False, *norm, True)
    assert_close(first[0], grad_bn.half(), grad=True)
    assert_close(first[3].sum(0), sums, grad=True)
    assert_close(first[1], dw.half(), grad=True)
    assert first[2] is None
    _assert_same_bits(first, second)


def test_backward_bn_partials_opcheck_and_bad_input():
    x, w, _, geo = _conv_inputs(SWEEP[2], torch.float32, "channels_last")
    norm, _ = _input_transform(x.shape[1], True)
    g = torch.randn(F.conv2d(x, w, None, *geo).shape)
    torch.library.opcheck(ops.conv2d_backward_bn_partials.default, (g, x, w, None, *geo, True, *norm, True))
    with pytest.raises(RuntimeError, match="conv2d_backward_bn_partials: input_mean should be 1-D and contain 5"):
        ops.conv2d_backward_bn_partials(g, x, w, None, *geo, True, norm[0][:3], *norm[1:], True)
    with pytest.raises(RuntimeError, match="conv2d_backward_bn_partials: expected grad_output of size"):
        ops.conv2d_backward_bn_partials(g[:, :, 1:], x, w, None, *geo, True, *norm, True)


# --- the input gradient at a residual block's end (conv2d_backward_residual_bn_partials)
def _residual_bn_inputs(x, dual, layout):
    """A block output x (ReLU'd, with zeros and a NaN), the identity gradient and its mask, and the inputs and
    means of the one or two BatchNorms that read the gradient at x."""
    x = F.relu(x)
    x[0, 0, 0, 1] = float("nan")  # threshold_backward passes the gradient where its output is NaN
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    residual, residual_mask = (torch.randn(x.shape).to(x.dtype).contiguous(memory_format=fmt) for _ in range(2))
    bns = [(torch.randn(x.shape).to(x.dtype) + 3, torch.randn(x.shape[1]) + 3) for _ in range(1 + dual)]
    return x, residual, residual_mask, bns


def _residual_bn_ref(g, x, w, geo, residual, residual_mask, bns):
    dx, dw, db = _backward_ref(g.float(), x.float(), w.float(), None, geo)
    s = (dx + torch.ops.aten.threshold_backward(residual.float(), residual_mask.float(), 0)).to(x.dtype).float()
    grad_bn = torch.ops.aten.threshold_backward(s, x.float(), 0)
    sums = [torch.stack([grad_bn.sum((0, 2, 3)), (grad_bn * (z.float() - m[:, None, None])).sum((0, 2, 3))])
            for z, m in bns]
    return grad_bn, sums, dw, db


@pytest.mark.parametrize("case", BN_PARTIALS_CASES, ids=str)
@pytest.mark.parametrize("dual", [False, True], ids=["one_bn", "two_bns"])
@pytest.mark.parametrize("launch", ["one", "two"])
def test_backward_residual_bn_partials_matches_eager(case, dual, launch, monkeypatch):
    """At a residual block's end: the input gradient plus the identity branch's (masked) gradient goes on
    through the block input's ReLU, and each BatchNorm reading it gets its two reductions as partials, in the
    one-launch kernel and in the two launches; tiles of at most 64 rows (several stats tiles, strided
    phases); inputs of a third layout (the BN inputs NCHW beside a channels_last conv)."""
    x, w, _, geo = _conv_inputs(case, torch.float32, "channels_last")
    x, residual, residual_mask, bns = _residual_bn_inputs(x, dual, "contiguous")
    g = torch.randn(F.conv2d(x, w, None, *geo).shape).to(memory_format=torch.channels_last)
    grad_bn, sums, dw, db = _residual_bn_ref(g, x, w, geo, residual, residual_mask, bns)
    if launch == "two":
        monkeypatch.setattr(conv_kernels, "INTERPRET", False)
        monkeypatch.setattr(conv_kernels, "backward_config_for", lambda *args: False)
        monkeypatch.setattr(conv_kernels, "conv2d_backward_kernel", None)  # launching it would fail
    bn_args = [t for z, m in bns for t in (z, m)]
    with conv_kernels.interp_block_limit(64), conv_kernels.weight_grad_split(1):
        got = ops.conv2d_backward_residual_bn_partials(g, x, w, None, *geo, residual, residual_mask, True, *bn_args)
    tiles = conv_kernels.grad_stat_tiles(x.shape, geo[0])
    assert_close(got[0], grad_bn, grad=True)
    assert grad_bn[0, 0, 0, 1] != 0  # NaN in the block output: the gradient passed (and matched, above)
    for partials, ref in zip(got[3:], sums):
        assert partials.shape == (tiles, 2, x.shape[1])
        assert_close(partials.sum(0), ref, grad=True)
    assert (got[4] is None) != dual
    assert_close(got[1], dw, grad=True)
    assert_close(got[2], db, grad=True)


def test_backward_residual_bn_partials_half_unmasked_residual_same_bits():
    """float16, an unmasked residual (the other conv gradient at a downsample block's input) and no bias
    gradient; a second run gives the same bits (no atomics)."""
    x, w, _, geo = _conv_inputs(BN_PARTIALS_CASES[0], torch.float16, "channels_last")
    x, residual, _, bns = _residual_bn_inputs(x, True, "channels_last")
    g = torch.randn(F.conv2d(x.float(), w.float(), None, *geo).shape).to(torch.float16)
    grad_bn, sums, dw, _ = _residual_bn_ref(g, x, w, geo, residual, torch.ones_like(residual), bns)
    args = (g, x, w, None, *geo, residual, None, False, *[t for z, m in bns for t in (z, m)])
    with conv_kernels.interp_block_limit(64):
        first = ops.conv2d_backward_residual_bn_partials(*args)
        second = ops.conv2d_backward_residual_bn_partials(*args)
    assert_close(first[0], grad_bn.half(), grad=True)
    assert_close(first[3].sum(0), sums[0], grad=True)
    assert_close(first[4].sum(0), sums[1], grad=True)
    assert_close(first[1], dw.half(), grad=True)
    assert first[2] is None
    _assert_same_bits(first, second)


def test_backward_residual_bn_partials_opcheck_and_bad_input():
    x, w, _, geo = _conv_inputs(SWEEP[2], torch.float32, "channels_last")
    _, residual, residual_mask, bns = _residual_bn_inputs(x, True, "channels_last")
    x = F.relu(x)  # no NaN: opcheck compares the weight gradient, which the NaN would make NaN
    g = torch.randn(F.conv2d(x, w, None, *geo).shape)
    (z, mean), (z2, mean2) = bns
    op = ops.conv2d_backward_residual_bn_partials
    torch.library.opcheck(op.default, (g, x, w, None, *geo, residual, residual_mask, True, z, mean, z2, mean2))
    torch.library.opcheck(op.default, (g, x, w, None, *geo, None, None, False, z, mean))
    with pytest.raises(RuntimeError, match="residual_bn_partials: expected bn_input2 of size"):
        op(g, x, w, None, *geo, None, None, False, z, mean, z2[:, :, 1:], mean2)
    with pytest.raises(RuntimeError, match="residual_bn_partials: bn_mean should be 1-D and contain 5"):
        op(g, x, w, None, *geo, None, None, False, z, mean[:4])
    with pytest.raises(RuntimeError, match="residual_bn_partials: bn_input2 and bn_mean2 must be given together"):
        op(g, x, w, None, *geo, None, None, False, z, mean, z2)
    with pytest.raises(RuntimeError, match="residual_bn_partials: bn_input dtype torch.float16 must match"):
        op(g, x, w, None, *geo, None, None, False, z.half(), mean)


def test_backward_without_a_fitting_pair_runs_two_launches(monkeypatch):
    """On a GPU no config pair fits beside float32's flattened input-gradient tile (few output channels
    per group): the launcher runs the two gradient launches instead."""
    def pairs(dtype, **launch):
        return [c for c in conv_kernels.BACKWARD_GPU_CONFIGS if conv_kernels.backward_config_for(c, dtype, 80, launch)]

    assert not pairs(torch.float32, CHANNEL_INNER=False) and not pairs(torch.float32, CHANNEL_INNER=False,
                                                                       PRECISION="tf32")
    assert pairs(torch.float16, CHANNEL_INNER=False, HAS_BIAS_GRAD=True) and pairs(torch.float32, CHANNEL_INNER=True)
    monkeypatch.setattr(conv_kernels, "INTERPRET", False)
    monkeypatch.setattr(conv_kernels, "conv2d_backward_kernel", None)  # launching it would fail
    with conv_kernels.weight_grad_split(1):
        _check_backward(SWEEP[1])
