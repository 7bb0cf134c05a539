"""tritonkit's pooling ops (max, global average, windowed and adaptive average) against eager PyTorch.

Reference values come from eager on the CPU in float32 on the same (already rounded) inputs; the
memory format of each result is compared with what eager returns for the same input layout. Outputs
are NaN-poisoned (indices: INT_POISON) before every launch (tests/conftest.py).
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tritonkit.ops.norm  # noqa: F401  (batch_norm_apply)
import tritonkit.ops.pool  # noqa: F401  (registers the ops)
from tritonkit.runtime import default_device
from tritonkit.testing import assert_close

ops = torch.ops.tritonkit
aten = torch.ops.aten
DEVICE = default_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed"]


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def make_input(shape, layout, dtype=torch.float32, values=None):
    """A tensor of logical ``shape`` in the given memory layout (values: a generator of a dense tensor)."""
    n, c, h, w = shape
    values = values or torch.randn
    if layout == "contiguous":
        x = values(n, c, h, w)
    elif layout == "channels_last":
        x = values(n, c, h, w).contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other channel and column of a bigger tensor, one row cut off
        x = values(n, 2 * c, h + 1, 2 * w)[:, ::2, 1:, 1::2]
    elif layout == "transposed":  # H and W swapped in memory
        x = values(n, c, w, h).transpose(2, 3)
    else:
        raise ValueError(layout)
    return x.to(dtype).to(DEVICE)


def eager_pool(x, k, s, p, d, ceil):
    """Eager values/indices (float32 math on CPU) and the strides eager gives the outputs for x's layout."""
    values, indices = F.max_pool2d(x.cpu().float(), k, s, p, d, ceil, return_indices=True)
    layout_ref, _ = F.max_pool2d(x.cpu(), k, s, p, d, ceil, return_indices=True)
    return values.to(x.dtype), indices, layout_ref.stride()


def eager_pool_grad(grad, x, indices, k, s, p, d, ceil):
    """Eager autograd gradient (float32, CPU) of max_pool2d, and eager's grad_input strides."""
    x32 = x.detach().cpu().float().requires_grad_()
    F.max_pool2d(x32, k, s, p, d, ceil).backward(grad.cpu().float())
    strided = aten.max_pool2d_with_indices_backward(
        grad.cpu(), x.cpu(), _pair(k), _pair(s), _pair(p), _pair(d), ceil, indices.cpu()
    )
    return x32.grad.to(x.dtype), strided.stride()


def check_pool(x, k, s, p, d, ceil, backward=True):
    args = (_pair(k), _pair(s), _pair(p), _pair(d), ceil)
    values, indices = ops.max_pool2d(x, *args)
    ref_values, ref_indices, ref_stride = eager_pool(x, k, s, p, d, ceil)
    assert_close(values.cpu(), ref_values, msg="values")
    assert indices.dtype == torch.int64
    assert torch.equal(indices.cpu(), ref_indices), f"indices differ:\n{indices}\n{ref_indices}"
    assert values.stride() == ref_stride and indices.stride() == ref_stride, (values.stride(), ref_stride)
    if not backward:
        return values, indices
    grad = torch.randn(values.shape, dtype=x.dtype).to(DEVICE)
    grad_input = ops.max_pool2d_backward(grad, x, indices, *args)
    ref_grad, ref_grad_stride = eager_pool_grad(grad, x, ref_indices, k, s, p, d, ceil)
    assert_close(grad_input.cpu(), ref_grad, grad=True, msg="grad_input")
    assert grad_input.stride() == ref_grad_stride, (grad_input.stride(), ref_grad_stride)
    return values, indices


# (shape, kernel_size, stride, padding, dilation, ceil_mode): sizes off every power of two.
SWEEP = [
    ((2, 3, 9, 11), 3, 2, 1, 1, False),  # the usual 3x3/2 pool with padding
    ((2, 3, 9, 11), 3, 2, 1, 1, True),
    ((1, 4, 8, 8), 2, 2, 0, 1, False),  # LeNet-style 2x2/2
    ((2, 5, 7, 10), (3, 2), (1, 2), (1, 0), (2, 1), True),  # asymmetric everything, dilation
    ((1, 3, 6, 7), 3, 1, 1, 1, False),  # stride 1: every input in up to 9 windows
    ((2, 2, 5, 5), 2, 3, 1, 1, True),  # ceil mode drops the window that would start in right padding
    ((3, 1, 4, 13), (1, 3), (1, 2), (0, 1), 1, False),  # 1-wide kernel along H
    ((2, 3, 8, 9), 3, 2, 1, 2, True),  # dilation 2 with padding and ceil
    ((1, 2, 5, 5), 5, 1, 2, 1, False),  # window as big as the input
]


@pytest.mark.parametrize("case", SWEEP, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sweep_float32(case, layout):
    shape, k, s, p, d, ceil = case
    check_pool(make_input(shape, layout), k, s, p, d, ceil)


@pytest.mark.parametrize("case", SWEEP[:4], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sweep_half(case, layout, dtype):
    shape, k, s, p, d, ceil = case
    check_pool(make_input(shape, layout, dtype), k, s, p, d, ceil)


def test_many_channels_and_positions():
    """More channels and positions than one interpreter tile row/column: several programs, tails."""
    check_pool(make_input((3, 300, 13, 11), "channels_last"), 3, 2, 1, 1, True)
    check_pool(make_input((2, 3, 67, 61), "contiguous"), 2, 2, 0, 1, False)


def test_ties_report_first_maximum():
    def few_values(*shape):  # many equal values per window
        return torch.randint(-2, 3, shape).float()

    for layout in ["contiguous", "channels_last"]:
        for dtype in [torch.float32, torch.float16]:
            check_pool(make_input((2, 3, 9, 10), layout, dtype, few_values), 3, 1, 1, 1, False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf(layout, dtype):
    """NaN wins its window (the last NaN's index, as aten); all -inf windows give -inf and a valid index."""

    def special(*shape):
        x = torch.randn(shape)
        flat = x.view(-1)
        flat[torch.randperm(flat.numel())[: flat.numel() // 8]] = float("nan")
        flat[torch.randperm(flat.numel())[: flat.numel() // 8]] = float("inf")
        x[:, :, :4, :4] = float("-inf")  # whole windows of -inf
        x[0, 0, 5, 5:8] = float("nan")  # several NaNs in one window
        return x

    values, indices = check_pool(make_input((2, 3, 9, 10), layout, dtype, special), 3, 2, 1, 1, True)
    assert values.isnan().any() and values.isneginf().any()
    assert ((indices >= 0) & (indices < 9 * 10)).all()


def test_window_without_input_tap():
    """Dilation can put every tap of a window in the padding; aten reports -inf and the nominal tap."""
    x = make_input((1, 2, 1, 1), "contiguous")
    values, _ = check_pool(x, 2, 1, 1, 2, False, backward=False)
    assert values.isneginf().all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch(layout):
    x = make_input((0, 3, 7, 6), layout)
    values, indices = ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    assert values.shape == indices.shape == (0, 3, 4, 3)
    pool = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    grad_input = ops.max_pool2d_backward(torch.randn_like(values), x, indices, *pool)
    assert grad_input.shape == x.shape


def test_short_argument_forms():
    """One-int lists and an empty stride (= kernel_size) mean what they mean to aten."""
    x = make_input((2, 3, 9, 8), "contiguous")
    values, indices = ops.max_pool2d(x, [3], [], [1], [1], True)
    ref_values, ref_indices = aten.max_pool2d_with_indices(x.cpu(), [3], [], [1], [1], True)
    assert_close(values.cpu(), ref_values)
    assert torch.equal(indices.cpu(), ref_indices)
    grad = torch.randn_like(values)
    grad_input = ops.max_pool2d_backward(grad, x, indices, [3], [], [1], [1], True)
    ref = aten.max_pool2d_with_indices_backward(grad.cpu(), x.cpu(), [3], [], [1], [1], True, ref_indices)
    assert_close(grad_input.cpu(), ref, grad=True)


def test_backward_deterministic():
    x = make_input((2, 4, 11, 9), "channels_last")
    args = ([3, 3], [1, 1], [1, 1], [1, 1], False)
    values, indices = ops.max_pool2d(x, *args)
    grad = torch.randn_like(values)
    first = ops.max_pool2d_backward(grad, x, indices, *args)
    assert torch.equal(first, ops.max_pool2d_backward(grad, x, indices, *args))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 2),
    c=st.integers(1, 4),
    k=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    d=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    ceil=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_fuzz(n, c, k, s, d, ceil, layout, dtype, data):
    """Random geometry: where eager accepts it we match it, where eager refuses it we raise the same type.

    Padding goes up to one past k // 2 and sizes down to below the window, so some draws are invalid.
    """
    p = tuple(data.draw(st.integers(0, ki // 2 + 1)) for ki in k)
    h, w = (data.draw(st.integers(max(1, (ki - 1) * di + 1 - 2 * pi - 1), 14)) for ki, di, pi in zip(k, d, p))
    x = make_input((n, c, h, w), layout, dtype)
    try:
        F.max_pool2d(x.cpu(), k, s, p, d, ceil)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            ops.max_pool2d(x, list(k), list(s), list(p), list(d), ceil)
        return
    out = F.max_pool2d(x.cpu(), k, s, p, d, ceil).shape[2:]
    # A window with no in-range tap makes aten's CPU backward write outside the plane; skip its backward.
    empty_window = any(
        not any(0 <= o * s[i] - p[i] + j * d[i] < size for j in range(k[i]))
        for i, size in enumerate((h, w))
        for o in range(out[i])
    )
    check_pool(x, k, s, p, d, ceil, backward=not empty_window)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x = make_input((2, 3, 9, 8), layout)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    torch.library.opcheck(ops.max_pool2d, (x, *args))
    values, indices = ops.max_pool2d(x, *args)
    torch.library.opcheck(ops.max_pool2d_backward, (torch.randn_like(values), x, indices, *args))


# --- the input prologue: a training BatchNorm (+ ReLU) applied as the pool loads its input
def bn_transform(c, dtype, relu):
    """Per-channel (mean, invstd, weight, bias) with mostly positive biases (a padded tap taking the
    transform of 0 would win the max) and the activation it gives, rounded to ``dtype`` as stored."""
    norm = (torch.randn(c) * 0.3, torch.rand(c) + 0.5, torch.randn(c), torch.randn(c) * 0.5 + 1.0)

    def apply(x):
        mean, invstd, weight, bias = (v[None, :, None, None].to(DEVICE) for v in norm)
        v = (x.float() - mean) * (invstd * weight) + bias
        return (F.relu(v) if relu else v).to(dtype)

    return tuple(v.to(DEVICE) for v in norm), apply


@pytest.mark.parametrize("case", SWEEP[:4] + SWEEP[7:], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("relu", [True, False])
def test_input_prologue(case, layout, relu):
    """Values and indices those of eager's pool of the transformed input (ties, padding and all)."""
    shape, k, s, p, d, ceil = case
    x = make_input(shape, layout)
    norm, transform = bn_transform(shape[1], torch.float32, relu)
    args = (_pair(k), _pair(s), _pair(p), _pair(d), ceil)
    values, indices = ops.max_pool2d(x, *args, *norm, relu)
    ref_values, ref_indices, ref_stride = eager_pool(transform(x), k, s, p, d, ceil)
    assert_close(values.cpu(), ref_values)
    assert torch.equal(indices.cpu(), ref_indices)
    assert values.stride() == ref_stride


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_input_prologue_half(dtype):
    """Half input: the pooled activation is the one tritonkit::batch_norm_apply stores (indices and values
    exactly; Triton's interpreter rounds float32 to bfloat16 toward zero, eager to nearest), within the
    dtype's tolerance of eager's transform."""
    shape, k, s, p, d, ceil = SWEEP[0]
    x = make_input(shape, "channels_last", dtype)
    norm, transform = bn_transform(shape[1], dtype, True)
    values, indices = ops.max_pool2d(x, _pair(k), _pair(s), _pair(p), _pair(d), ceil, *norm, True)
    stored = ops.batch_norm_apply(x, *norm, True)
    assert_close(stored, transform(x))
    ref_values, ref_indices, _ = eager_pool(stored, k, s, p, d, ceil)
    torch.testing.assert_close(values.cpu(), ref_values, rtol=0, atol=0)
    assert torch.equal(indices.cpu(), ref_indices)


def test_input_prologue_opcheck_and_bad_arguments():
    x = make_input((2, 3, 9, 8), "channels_last")
    norm, _ = bn_transform(3, torch.float32, True)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True)
    torch.library.opcheck(ops.max_pool2d, (x, *args, *norm, True))
    with pytest.raises(RuntimeError, match="input_mean should be 1-D and contain 3 elements"):
        ops.max_pool2d(x, *args, norm[0][:2], *norm[1:], True)
    with pytest.raises(RuntimeError, match="input_mean and input_invstd must be given together"):
        ops.max_pool2d(x, *args, norm[0])
    with pytest.raises(NotImplementedError, match="the input prologue .* has no autograd formula"):
        ops.max_pool2d(x.detach().requires_grad_(), *args, *norm, True)


def _bn_partials_ref(g, x, indices, args, norm, relu):
    """Eager's gradient with respect to the BN output (the pool's, as stored, through the recomputed ReLU's
    mask) and the BN backward's two sums over it."""
    mean, invstd, weight, bias = (v[None, :, None, None].to(DEVICE) for v in norm)
    xp = ((x.float() - mean) * (invstd * weight) + bias).to(x.dtype).float()
    dx = torch.ops.aten.max_pool2d_with_indices_backward(g.float(), xp, *args[:4], args[4], indices)
    dx = dx.to(x.dtype).float()
    grad_bn = torch.ops.aten.threshold_backward(dx, xp, 0) if relu else dx
    return grad_bn, torch.stack([grad_bn.sum((0, 2, 3)), (grad_bn * (x.float() - mean)).sum((0, 2, 3))])


@pytest.mark.parametrize("case", SWEEP[:4] + SWEEP[7:], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("relu", [True, False])
def test_backward_bn_partials(case, layout, relu):
    """The pool backward of a prologue'd pool taken on through the ReLU to the BN output, and the partials'
    sums over T the BN backward's reductions (poisoned outputs: every partial is written)."""
    shape, k, s, p, d, ceil = case
    x = make_input(shape, layout)
    norm, _ = bn_transform(shape[1], torch.float32, relu)
    args = (_pair(k), _pair(s), _pair(p), _pair(d), ceil)
    values, indices = ops.max_pool2d(x, *args, *norm, relu)
    g = torch.randn(values.shape, device=DEVICE)
    grad_bn, partials = ops.max_pool2d_backward_bn_partials(g, x, indices, *args, *norm, relu)
    ref, sums = _bn_partials_ref(g, x, indices, args, norm, relu)
    n, _, h, w = shape
    assert partials.shape == (-(-n * h * w // 64), 2, shape[1])
    assert_close(grad_bn, ref, grad=True)
    assert_close(partials.sum(0), sums, grad=True)
    assert grad_bn.stride() == ops.max_pool2d_backward(g, x, indices, *args).stride()


def test_backward_bn_partials_half_opcheck_and_bad_arguments():
    """float16 (the BN output rounded as stored; float32 partials); the same bits on a second run; the op
    checks its prologue as max_pool2d does."""
    x = make_input((2, 3, 13, 11), "channels_last", torch.float16)
    norm, _ = bn_transform(3, torch.float16, True)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    values, indices = ops.max_pool2d(x, *args, *norm, True)
    g = torch.randn(values.shape, device=DEVICE).half()
    first = ops.max_pool2d_backward_bn_partials(g, x, indices, *args, *norm, True)
    ref, sums = _bn_partials_ref(g, x, indices, args, norm, True)
    assert_close(first[0], ref.half(), grad=True)
    assert_close(first[1].sum(0), sums, grad=True)
    second = ops.max_pool2d_backward_bn_partials(g, x, indices, *args, *norm, True)
    assert torch.equal(first[0].view(torch.int16), second[0].view(torch.int16))
    assert torch.equal(first[1].view(torch.int32), second[1].view(torch.int32))
    x32 = x.float()
    values, indices = ops.max_pool2d(x32, *args, *norm, True)
    torch.library.opcheck(ops.max_pool2d_backward_bn_partials, (torch.randn_like(values), x32, indices, *args, *norm,
                                                                True))
    with pytest.raises(RuntimeError, match="max_pool2d_backward_bn_partials: input_mean should be 1-D and contain 3"):
        ops.max_pool2d_backward_bn_partials(torch.randn_like(values), x32, indices, *args, norm[0][:2], *norm[1:])


# (what, input shape, kernel_size, stride, padding, dilation): eager refuses each with RuntimeError,
# and our message names the offending argument.
BAD_ARGS = [
    ("kernel_size", (1, 2, 8, 8), [0, 2], [1, 1], [0, 0], [1, 1]),
    ("kernel_size", (1, 2, 8, 8), [2, -1], [1, 1], [0, 0], [1, 1]),
    ("kernel_size", (1, 2, 8, 8), [2, 2, 2], [1, 1], [0, 0], [1, 1]),
    ("stride", (1, 2, 8, 8), [2, 2], [0, 1], [0, 0], [1, 1]),
    ("stride", (1, 2, 8, 8), [2, 2], [2, -1], [0, 0], [1, 1]),
    ("stride", (1, 2, 8, 8), [2, 2], [1, 1, 1], [0, 0], [1, 1]),
    ("padding", (1, 2, 8, 8), [2, 2], [2, 2], [2, 1], [1, 1]),
    ("padding", (1, 2, 8, 8), [3, 3], [2, 2], [1, 2], [2, 2]),  # within the effective extent, not k/2
    ("padding", (1, 2, 8, 8), [2, 2], [2, 2], [-1, 0], [1, 1]),
    ("padding", (1, 2, 8, 8), [2, 2], [2, 2], [0, 0, 0], [1, 1]),
    ("dilation", (1, 2, 8, 8), [2, 2], [2, 2], [0, 0], [0, 1]),
    ("dilation", (1, 2, 8, 8), [2, 2], [2, 2], [0, 0], [1, 1, 1]),
    ("output size", (1, 2, 2, 2), [3, 3], [1, 1], [0, 0], [1, 1]),
    ("output size", (1, 2, 9, 9), [3, 3], [1, 1], [0, 0], [5, 1]),
    ("input", (2, 0, 4, 4), [2, 2], [2, 2], [0, 0], [1, 1]),
    ("input", (2, 3, 0, 4), [2, 2], [2, 2], [0, 0], [1, 1]),
    ("input", (1, 1, 2, 8, 8), [2, 2], [2, 2], [0, 0], [1, 1]),
    ("input", (8, 8), [2, 2], [2, 2], [0, 0], [1, 1]),
]


@pytest.mark.parametrize("case", BAD_ARGS, ids=lambda c: f"{c[0]}-{c[1:]}")
def test_bad_arguments(case):
    what, shape, k, s, p, d = case
    x = torch.randn(shape).to(DEVICE)
    with pytest.raises(RuntimeError):
        aten.max_pool2d_with_indices(x.cpu(), k, s, p, d, False)
    with pytest.raises(RuntimeError, match=what):
        ops.max_pool2d(x, k, s, p, d, False)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake, pytest.raises(RuntimeError, match=what):  # the fake impl validates the same way
        ops.max_pool2d(fake.from_tensor(x), k, s, p, d, False)


def test_unbatched_input_is_refused():
    """The op takes 4-D input only (tritonkit.functional unsqueezes 3-D input before calling it)."""
    with pytest.raises(RuntimeError, match="4-D"):
        ops.max_pool2d(make_input((1, 2, 6, 6), "contiguous")[0], [2, 2], [2, 2], [0, 0], [1, 1], False)


def test_non_float_input_is_refused():
    with pytest.raises(RuntimeError, match="input must be float32"):
        x = torch.ones(1, 1, 4, 4, dtype=torch.int64, device=DEVICE)
        ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)


def _backward_args(**changes):
    x = make_input((2, 3, 8, 8), "contiguous")
    values, indices = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    args = {"grad_output": torch.randn_like(values), "input": x, "indices": indices}
    args.update({name: change(args[name]) for name, change in changes.items()})
    return args


@pytest.mark.parametrize(
    "what, changes",
    [
        ("grad_output", {"grad_output": lambda g: g[:, :, :3]}),
        ("indices", {"indices": lambda i: i[:, :2]}),
        ("indices must be int64", {"indices": lambda i: i.int()}),
        ("grad_output dtype", {"grad_output": lambda g: g.half()}),
    ],
)
def test_backward_bad_arguments(what, changes):
    args = _backward_args(**changes)
    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    if what in ("grad_output", "indices"):  # eager refuses a wrongly shaped gradient or index too
        with pytest.raises(RuntimeError):
            aten.max_pool2d_with_indices_backward(
                args["grad_output"].cpu(), args["input"].cpu(), *pool, args["indices"].cpu().long()
            )
    with pytest.raises(RuntimeError, match=what):
        ops.max_pool2d_backward(args["grad_output"], args["input"], args["indices"], *pool)


# ------------------------------------------------------------------------------ global average pool


def eager_gap_grad(grad, x):
    """Eager autograd gradient (float32, CPU) of mean(x, [-1, -2], keepdim=True) for ``grad``."""
    x32 = x.detach().cpu().float().requires_grad_()
    x32.mean([-1, -2], keepdim=True).backward(grad.cpu().float())
    return x32.grad.to(x.dtype)


def check_gap(x):
    out = ops.global_avg_pool2d(x)
    ref = x.cpu().float().mean([-1, -2], keepdim=True).to(x.dtype)
    assert_close(out.cpu(), ref)
    assert out.stride() == x.cpu().mean([-1, -2], keepdim=True).stride() == torch.empty_like(ref).stride()
    assert_close(out.cpu(), F.adaptive_avg_pool2d(x.cpu().float(), 1).to(x.dtype))
    grad = torch.randn(out.shape, dtype=x.dtype).to(DEVICE)
    ref_grad = eager_gap_grad(grad, x)
    eager_layout = grad.cpu().expand(x.shape).div(x.shape[2] * x.shape[3])  # the backward graph's div
    for channels_last in (False, True):
        grad_input = ops.global_avg_pool2d_backward(grad, list(x.shape), channels_last)
        assert_close(grad_input.cpu(), ref_grad, grad=True)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert grad_input.is_contiguous(memory_format=fmt)
        if not channels_last:
            assert grad_input.stride() == eager_layout.stride()
        # the other gradient of the pooled tensor (a squeeze-excitation gate's) summed in the same pass
        other = make_input(tuple(x.shape), "channels_last" if channels_last else "sliced", x.dtype)
        summed = ops.global_avg_pool2d_backward(grad, list(x.shape), channels_last, other)
        assert_close(summed.cpu(), (ref_grad.float() + other.cpu().float()).to(x.dtype), grad=True)
        assert summed.stride() == grad_input.stride()
    return out


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (3, 300, 5, 3), (2, 5, 1, 1), (1, 2, 1, 9), (2, 3, 9, 1),
                                   (1, 4, 37, 41)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_global_avg_pool2d(shape, layout):
    """Plane sizes and channel counts off the block sizes (7x7 as ResNet's last stage), in every layout."""
    check_gap(make_input(shape, layout))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_global_avg_pool2d_half(layout, dtype):
    check_gap(make_input((2, 70, 7, 7), layout, dtype, values=lambda *s: torch.randn(s) + 3.0))


def test_global_avg_pool2d_gradient_of_other_layouts():
    """grad_output read with its own strides (a channels_last pooled gradient, a column of a wider one)."""
    x = make_input((3, 5, 4, 6), "contiguous")
    for grad in (torch.randn(3, 5, 1, 1).contiguous(memory_format=torch.channels_last).as_strided((3, 5, 1, 1),
                                                                                                   (5, 1, 5, 5)),
                 torch.randn(3, 10, 1, 1)[:, ::2]):
        grad_input = ops.global_avg_pool2d_backward(grad.to(DEVICE), [3, 5, 4, 6], False)
        assert_close(grad_input.cpu(), eager_gap_grad(grad, x), grad=True)


def test_global_avg_pool2d_empty():
    assert ops.global_avg_pool2d(make_input((0, 3, 4, 4), "contiguous")).shape == (0, 3, 1, 1)
    grad = torch.randn(0, 3, 1, 1).to(DEVICE)
    assert ops.global_avg_pool2d_backward(grad, [0, 3, 4, 4], True).shape == (0, 3, 4, 4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_global_avg_pool2d_opcheck(layout):
    x = make_input((2, 3, 5, 4), layout)
    torch.library.opcheck(ops.global_avg_pool2d, (x,))
    grad = torch.randn(2, 3, 1, 1).to(DEVICE)
    for channels_last in (False, True):
        torch.library.opcheck(ops.global_avg_pool2d_backward, (grad, [2, 3, 5, 4], channels_last))
        torch.library.opcheck(ops.global_avg_pool2d_backward, (grad, [2, 3, 5, 4], channels_last, x))


def test_global_avg_pool2d_bad_arguments():
    with pytest.raises(RuntimeError):
        torch.ones(2, 3, 4, 4, dtype=torch.int64).mean([-1, -2])
    with pytest.raises(RuntimeError, match="input must be float32"):
        ops.global_avg_pool2d(torch.ones(2, 3, 4, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(RuntimeError, match="4-D"):
        ops.global_avg_pool2d(make_input((1, 2, 6, 6), "contiguous")[0])
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake, pytest.raises(RuntimeError, match="4-D"):
        ops.global_avg_pool2d(fake.from_tensor(make_input((1, 2, 6, 6), "contiguous")[0]))
    grad = torch.randn(2, 3, 1, 1).to(DEVICE)
    with pytest.raises(RuntimeError, match="grad_output of the pooled shape"):
        ops.global_avg_pool2d_backward(grad, [2, 4, 5, 5], False)
    with pytest.raises(RuntimeError, match="grad_output of the pooled shape"):
        ops.global_avg_pool2d_backward(grad[..., 0], [2, 3, 5, 5], False)
    with pytest.raises(RuntimeError, match="input_size"):
        ops.global_avg_pool2d_backward(grad, [2, 3, 5], False)
    with pytest.raises(RuntimeError, match="grad_output must be float32"):
        ops.global_avg_pool2d_backward(grad.long(), [2, 3, 5, 5], False)
    with pytest.raises(RuntimeError, match=r"expected residual of input_size \[2, 3, 5, 5\], got \[2, 3, 5, 4\]"):
        ops.global_avg_pool2d_backward(grad, [2, 3, 5, 5], False, make_input((2, 3, 5, 4), "contiguous"))


# ------------------------------------------------------------------------ average pool: windowed, adaptive


def _eager_and_grad(forward, backward, x, grad_shape_of=None):
    """Eager float32 values and gradient (CPU) of ``forward`` on ``x``'s rounded values, with the strides eager
    gives both for ``x``'s own dtype and layout; ``backward(grad, x)`` is the aten backward."""
    x32 = x.detach().cpu().float()
    ref = forward(x32)
    grad = torch.randn(ref.shape).to(x.dtype)
    ref_grad = backward(grad.float(), x32)
    strides = forward(x.cpu()).stride(), backward(grad, x.cpu()).stride()
    return ref.to(x.dtype), grad.to(DEVICE), ref_grad.to(x.dtype), strides


def _check_against(out, grad_input, ref, ref_grad, strides):
    assert_close(out.cpu(), ref, msg="output")
    assert_close(grad_input.cpu(), ref_grad, grad=True, msg="grad_input")
    assert (out.stride(), grad_input.stride()) == strides, ((out.stride(), grad_input.stride()), strides)


def check_avg(x, k, s, p, ceil, count_include_pad, divisor):
    args = (_pair(k), _pair(s) if s != () else [], _pair(p), ceil, count_include_pad, divisor)
    ref, grad, ref_grad, strides = _eager_and_grad(lambda t: aten.avg_pool2d(t, *args),
                                                   lambda g, t: aten.avg_pool2d_backward(g, t, *args), x)
    out = ops.avg_pool2d(x, *args)
    _check_against(out, ops.avg_pool2d_backward(grad, x, *args), ref, ref_grad, strides)


# (shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override): sizes off the blocks.
AVG_SWEEP = [
    ((2, 3, 9, 11), 3, 2, 1, True, True, None),  # ceil-mode windows starting in the padding, cut at its end
    ((2, 3, 9, 11), 3, 2, 1, True, False, None),  # the same, padding not counted
    ((1, 4, 8, 8), 2, 2, 0, False, True, None),  # LeNet-style 2x2/2
    ((2, 5, 7, 10), (3, 2), (1, 2), (1, 0), True, False, None),  # asymmetric everything
    ((1, 3, 6, 7), 3, 1, 1, False, True, 4),  # stride 1 (every input in up to 9 windows), divisor_override
    ((2, 2, 5, 5), 2, 3, 1, True, True, None),  # ceil mode drops the window that would start in right padding
    ((2, 2, 5, 5), 2, 3, 1, True, False, -3),  # a negative divisor_override (eager divides by it)
    ((1, 2, 5, 3), (5, 3), 1, (2, 1), False, False, None),  # window as big as the input
    ((3, 1, 4, 13), (1, 3), (), (0, 1), True, True, None),  # stride omitted: kernel_size
]


@pytest.mark.parametrize("case", AVG_SWEEP, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_avg_pool2d(case, layout):
    shape, *args = case
    check_avg(make_input(shape, layout), *args)


@pytest.mark.parametrize("case", AVG_SWEEP[:4], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_avg_pool2d_half(case, layout, dtype):
    shape, *args = case
    check_avg(make_input(shape, layout, dtype), *args)


def test_avg_pool2d_many_channels_unbatched_and_empty():
    check_avg(make_input((2, 300, 5, 6), "channels_last"), 3, 2, 1, True, False, None)
    check_avg(make_input((1, 3, 9, 11), "contiguous")[0], 3, 2, 1, True, True, None)  # 3-D (C, H, W)
    check_avg(make_input((1, 3, 9, 11), "channels_last")[0], 2, 2, 1, False, True, None)
    check_avg(make_input((0, 3, 9, 11), "channels_last"), 3, 2, 1, True, True, None)


def check_adaptive(x, size):
    ref, grad, ref_grad, strides = _eager_and_grad(lambda t: aten._adaptive_avg_pool2d(t, size),
                                                   aten._adaptive_avg_pool2d_backward, x)
    out = ops.adaptive_avg_pool2d(x, size)
    _check_against(out, ops.adaptive_avg_pool2d_backward(grad, x), ref, ref_grad, strides)


# (input shape, output size): overlapping windows (7 -> 3, 10 -> 4), exact splits, output larger than the
# input (windows repeat: each input row in several), 1x1, identity.
ADAPTIVE_SWEEP = [((2, 3, 7, 10), [3, 4]), ((1, 4, 8, 9), [2, 3]), ((2, 3, 5, 3), [7, 8]), ((1, 5, 6, 7), [1, 1]),
                  ((2, 2, 4, 5), [4, 5]), ((1, 3, 9, 2), [4, 1])]


@pytest.mark.parametrize("case", ADAPTIVE_SWEEP, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_adaptive_avg_pool2d(case, layout):
    shape, size = case
    check_adaptive(make_input(shape, layout), size)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adaptive_avg_pool2d_half(layout, dtype):
    check_adaptive(make_input((2, 70, 7, 10), layout, dtype), [3, 4])


def test_adaptive_avg_pool2d_unbatched_and_empty():
    check_adaptive(make_input((1, 3, 7, 10), "contiguous")[0], [3, 4])
    check_adaptive(make_input((0, 3, 7, 10), "channels_last"), [3, 4])
    x = make_input((2, 0, 7, 10), "contiguous").contiguous()  # eager's backward refuses C = 0: forward only
    assert ops.adaptive_avg_pool2d(x, [3, 4]).shape == (2, 0, 3, 4)
    assert ops.adaptive_avg_pool2d(make_input((2, 3, 7, 10), "contiguous"), [0, 4]).shape == (2, 3, 0, 4)


def test_avg_pool2d_opcheck():
    x = make_input((2, 3, 7, 6), "channels_last")
    args = ([3, 3], [2, 2], [1, 1], True, False, None)
    torch.library.opcheck(ops.avg_pool2d, (x, *args))
    torch.library.opcheck(ops.avg_pool2d_backward, (torch.randn_like(ops.avg_pool2d(x, *args)), x, *args))
    torch.library.opcheck(ops.adaptive_avg_pool2d, (x, [2, 4]))
    torch.library.opcheck(ops.adaptive_avg_pool2d_backward, (torch.randn(2, 3, 2, 4), x))


# (what, input shape, kernel_size, stride, padding, divisor_override): eager refuses each with the same
# exception type, and our message names the offending argument.
AVG_BAD_ARGS = [
    ("kernel_size must either", (1, 2, 8, 8), [2, 2, 2], [1, 1], [0, 0], None),
    ("kernel size should be greater than zero", (1, 2, 8, 8), [0, 2], [1, 1], [0, 0], None),
    ("stride should not be zero", (1, 2, 8, 8), [0, 2], [], [0, 0], None),
    ("stride must either", (1, 2, 8, 8), [2, 2], [1, 1, 1], [0, 0], None),
    ("stride should be greater than zero", (1, 2, 8, 8), [2, 2], [2, -1], [0, 0], None),
    ("padding must either", (1, 2, 8, 8), [2, 2], [2, 2], [0, 0, 0], None),
    ("pad should be at most half", (1, 2, 8, 8), [3, 3], [2, 2], [1, 2], None),
    ("pad should be at most half", (1, 2, 8, 8), [-3, 3], [1, 1], [0, 0], None),
    ("pad must be non-negative", (1, 2, 8, 8), [2, 2], [2, 2], [-1, 0], None),
    ("divisor must be not zero", (1, 2, 8, 8), [2, 2], [2, 2], [0, 0], 0),
    ("Output size is too small", (1, 2, 2, 2), [3, 3], [1, 1], [0, 0], None),
    ("Expected 3D or 4D", (2, 0, 4, 4), [2, 2], [2, 2], [0, 0], None),
    ("Expected 3D or 4D", (1, 1, 2, 8, 8), [2, 2], [2, 2], [0, 0], None),
    ("Dimension out of range", (8, 8), [2, 2], [2, 2], [0, 0], None),
]


@pytest.mark.parametrize("case", AVG_BAD_ARGS, ids=lambda c: f"{c[0]}-{c[1:]}")
def test_avg_pool2d_bad_arguments(case):
    what, shape, k, s, p, divisor = case
    x = torch.randn(shape).to(DEVICE)
    args = (k, s, p, False, True, divisor)
    with pytest.raises(Exception) as expected:
        aten.avg_pool2d(x.cpu(), *args)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    for mode, t in ((None, x), (fake, fake.from_tensor(x))):  # the fake impl validates the same way
        with mode or contextlib.nullcontext(), pytest.raises(expected.type, match=what):
            ops.avg_pool2d(t, *args)
        with mode or contextlib.nullcontext(), pytest.raises(expected.type, match=what):
            ops.avg_pool2d_backward(t, t, *args)


def test_avg_pool2d_backward_bad_arguments():
    x = make_input((2, 3, 8, 8), "contiguous")
    args = ([2, 2], [2, 2], [0, 0], False, True, None)
    for grad, what in ((torch.randn(2, 3, 4, 3), "grad_output of the pooled shape"),
                       (torch.randn(2, 3, 4, 4).half(), "grad_output dtype"),
                       (torch.randn(2, 3, 4, 4).long(), "grad_output must be float32")):
        with pytest.raises(RuntimeError):
            aten.avg_pool2d_backward(grad, x.cpu(), *args)
        with pytest.raises(RuntimeError, match=what):
            ops.avg_pool2d_backward(grad.to(DEVICE), x, *args)


ADAPTIVE_BAD = [
    ("output_size must be 2", (1, 2, 8, 8), [2, 2, 2]),
    ("greater than or equal to 0", (1, 2, 8, 8), [-1, 2]),
    ("Expected 3D or 4D", (8, 8), [2, 2]),
    ("dimension 2 being empty", (1, 2, 0, 8), [2, 2]),
    ("input must be float32", (1, 2, 8, 8), [2, 2]),
]


@pytest.mark.parametrize("case", ADAPTIVE_BAD, ids=lambda c: c[0])
def test_adaptive_avg_pool2d_bad_arguments(case):
    what, shape, size = case
    x = torch.randn(shape).to(DEVICE)
    x = x.long() if "float32" in what else x
    with pytest.raises(RuntimeError):
        aten._adaptive_avg_pool2d(x.cpu(), size)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    for mode, t in ((None, x), (fake, fake.from_tensor(x))):
        with mode or contextlib.nullcontext(), pytest.raises(RuntimeError, match=what):
            ops.adaptive_avg_pool2d(t, size)


def test_adaptive_avg_pool2d_backward_bad_arguments():
    x = make_input((2, 3, 8, 8), "contiguous")
    for grad, what in ((torch.randn(2, 3, 0, 4), "dimension 2 being empty"),
                       (torch.randn(3, 2, 4), "expected grad_output of size"),
                       (torch.randn(2, 3, 2, 2).half(), "grad_output dtype")):
        with pytest.raises(RuntimeError):
            aten._adaptive_avg_pool2d_backward(grad, x.cpu())
        with pytest.raises(RuntimeError, match=what):
            ops.adaptive_avg_pool2d_backward(grad.to(DEVICE), x)
