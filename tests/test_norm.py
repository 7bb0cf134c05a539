"""BatchNorm2d ops (tritonkit::batch_norm_stats / _train / _eval / _backward) against eager PyTorch.

Values are compared with eager evaluated in float32 on the same (already rounded) inputs at the dtype's
tolerance; statistics also against float64 (tritonkit.testing explains both). Output metadata (dtype,
strides) is compared with eager run on the real dtype. Outputs are NaN-poisoned before every launch
(tests/conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

import tritonkit.ops.conv  # noqa: F401  (conv2d_bn_stats builds the partials)
import tritonkit.ops.norm  # noqa: F401  (registers the ops)
from tritonkit.kernels import conv as conv_kernels
from tritonkit.kernels import norm as kernels
from tritonkit.kernels.pool import output_memory_format
from tritonkit.runtime import default_device
from tritonkit.testing import (
    BN_INVSTD_RTOL,
    BN_MEAN_RTOL,
    TOLERANCES,
    assert_batch_norm_stats_close,
    assert_close,
    batch_norm_output_atol,
    batch_norm_reference,
    reference_dtype_cast,
)

ops = torch.ops.tritonkit
aten = torch.ops.aten
DEVICE = default_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last"]
EPS = 1e-5


def same(first, again) -> bool:
    """Two runs' outputs are bit-identical (None where one is None)."""
    return all(p is q is None or torch.equal(p, q) for p, q in zip(first, again, strict=True))


def make(shape, layout="contiguous", dtype=torch.float32, scale=1.0, shift=0.0):
    """Random normal values (``* scale + shift``) of 4-D ``shape`` in a memory layout."""
    n, c, h, w = shape
    if layout == "sliced":  # not dense: every other channel, one row cut off
        x = torch.randn(n, 2 * c, h + 1, w)[:, ::2, 1:]
    elif layout == "permuted":  # dense, in an unusual order
        x = torch.randn(w, c, n, h).permute(2, 1, 3, 0)
    else:
        x = torch.randn(shape)
    x = x * scale + shift
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype).to(DEVICE)


def vec(c, dtype=torch.float32, positive=False):
    v = torch.rand(c) + 0.5 if positive else torch.randn(c)
    return v.to(dtype).to(DEVICE)


def params(c, dtype, affine=True, running=True):
    w, b = (vec(c, dtype), vec(c, dtype)) if affine else (None, None)
    rm, rv = (vec(c, dtype), vec(c, dtype, positive=True)) if running else (None, None)
    return w, b, rm, rv


def eager_train(x, w, b, rm, rv, momentum, eps=EPS, residual=None, relu=False):
    """aten's functional training batch norm (+ residual, relu) in float32; None running stats allowed."""
    def fn(x, w, b, rm, rv, residual):
        if rm is None:
            out, mean, invstd = aten._native_batch_norm_legit.no_stats(x, w, b, True, momentum, eps)
            new_rm = new_rv = None
        else:
            out, mean, invstd, new_rm, new_rv = aten._native_batch_norm_legit_functional(
                x, w, b, rm, rv, True, momentum, eps)
        if residual is not None:
            out = out + residual
        if relu:
            out = torch.relu(out)
        return out, mean, invstd, new_rm, new_rv

    tensors = [x.cpu(), *(None if t is None else t.cpu() for t in (w, b, rm, rv, residual))]
    values = fn(*(None if t is None else t.float() for t in tensors))
    meta = fn(*tensors)  # eager on the real dtype: output dtypes and strides
    return values, meta


def check_outputs(result, values, meta):
    """Training-op outputs against eager's values (float32) and metadata (the real dtype)."""
    names = ["out", "save_mean", "save_invstd", "running_mean", "running_var"]
    for name, got, ref, m in zip(names, result, values, meta):
        if ref is None:
            assert got is None, name
            continue
        assert got.dtype == m.dtype and got.shape == m.shape, (name, got.dtype, m.dtype, got.shape, m.shape)
        assert got.stride() == m.stride(), (name, got.stride(), m.stride())
        assert_close(got.cpu(), ref.to(got.dtype), msg=name)


def check_train(x, w, b, rm, rv, momentum, residual=None, relu=False):
    result = ops.batch_norm_train(x, w, b, rm, rv, None, momentum, EPS, residual, relu)
    assert len(result) == 7 and result[5] is None  # no num_batches_tracked given: no counter output
    assert result[6] is None  # no activation: no pre-activation output
    check_outputs(result, *eager_train(x, w, b, rm, rv, momentum, residual=residual, relu=relu))
    return result


# ------------------------------------------------------------------------------------ training forward


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,running", [(True, True), (False, True), (True, False), (False, False)])
def test_train_forward(layout, dtype, affine, running):
    x = make((3, 5, 7, 9), layout, dtype, scale=2.0, shift=0.5)
    check_train(x, *params(5, dtype, affine, running), momentum=0.1)


@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 7, 1, 1), (3, 1, 4, 3), (1, 6, 1, 2), (2, 11, 13, 1),
                                   (3, 9, 17, 3)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_forward_shapes(shape, layout):
    """Sizes that are not multiples of any block; size-1 dims with ambiguous strides."""
    x = make(shape, layout)
    check_train(x, *params(shape[1], torch.float32), momentum=0.1)


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.37, 1.0])
def test_running_stat_update(momentum):
    """new = (1 - momentum) * old + momentum * batch, the unbiased variance in running_var."""
    x = make((2, 4, 3, 5))
    w, b, rm, rv = params(4, torch.float32)
    _, _, _, new_rm, new_rv, *_ = check_train(x, w, b, rm, rv, momentum)
    _, _, _, ref_rm, ref_rv = batch_norm_reference(x, w, b, rm, rv, momentum=momentum)
    assert_close(new_rm, ref_rm.float())
    assert_close(new_rv, ref_rv.float())


@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                     ("contiguous", "channels_last"), ("channels_last", "sliced")])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_forward_residual_relu(layouts, relu, dtype):
    """out = relu(bn(x) + residual), the residual in the same or another layout."""
    x = make((2, 6, 5, 7), layouts[0], dtype)
    residual = make((2, 6, 5, 7), layouts[1], dtype)
    check_train(x, *params(6, dtype), momentum=0.1, residual=residual, relu=relu)


def test_train_forward_relu_only_and_nan():
    """ReLU without a residual; a NaN in the input makes its channel's statistics NaN, as eager."""
    x = make((2, 3, 4, 5), "channels_last")
    check_train(x, *params(3, torch.float32), momentum=0.1, relu=True)
    x[1, 1, 2, 3] = float("nan")
    out, mean, invstd, rm, *_ = ops.batch_norm_train(x, *params(3, torch.float32), None, 0.1, EPS)
    assert out[:, 1].isnan().all() and mean[1].isnan() and rm[1].isnan()
    assert out[:, [0, 2]].isfinite().all() and mean[[0, 2]].isfinite().all()


@pytest.mark.parametrize("layout", ["sliced", "permuted"])
def test_train_forward_other_layouts(layout):
    """Inputs in no standard layout are read through a copy; out takes eager's memory format."""
    check_train(make((3, 4, 5, 6), layout), *params(4, torch.float32), momentum=0.2)


# ---------------------------------------------------------------------------------- num_batches_tracked


def run_module_steps(module, batches, step, counter_shape=()):
    """Train-mode nn.BatchNorm2d ``module`` against ``step(x, w, b, rm, rv, nbt, momentum)`` (a tritonkit
    training op, returning its six outputs) over ``batches``, feeding the new running stats and counter
    (of ``counter_shape``) back; outputs, running stats and counter are compared after every step."""
    w, b = module.weight, module.bias
    rm, rv = (t.detach().clone() for t in (module.running_mean, module.running_var))
    nbt = module.num_batches_tracked.detach().clone().reshape(counter_shape)
    for x in batches:
        nbt_in = nbt.clone()
        out, _, _, rm, rv, nbt, _ = step(x, w.detach(), b.detach(), rm, rv, nbt, module.momentum)
        assert torch.equal(nbt_in, nbt - 1)  # a new tensor; the input is not mutated
        with torch.no_grad():
            ref = module(x)
        assert nbt.dtype == torch.int64 and nbt.shape == counter_shape
        assert torch.equal(nbt.reshape(()), module.num_batches_tracked)
        assert_close(out, ref, msg="out")
        assert_close(rm, module.running_mean, msg="running_mean")
        assert_close(rv, module.running_var, msg="running_var")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("counter_shape", [(), (1,)], ids=["0-d", "1-element"])
def test_num_batches_tracked_matches_nn_batchnorm(momentum, counter_shape):
    """Four steps of nn.BatchNorm2d(momentum=0.1 or None: the cumulative average 1 / num_batches_tracked):
    running stats and the counter as eager's module, the counter in the shape it was given."""
    module = torch.nn.BatchNorm2d(5, momentum=momentum).to(DEVICE).train()
    with torch.no_grad():
        module.weight.copy_(vec(5))
        module.bias.copy_(vec(5))
        module.running_mean.copy_(vec(5))
        module.running_var.copy_(vec(5, positive=True))
        module.num_batches_tracked.fill_(3)
    batches = [make((3, 5, 4, 7), layout, scale=2.0, shift=s) for s, layout in
               zip([0.5, -1.0, 3.0, 0.0], LAYOUTS * 2)]

    def step(x, w, b, rm, rv, nbt, momentum):
        return ops.batch_norm_train(x, w, b, rm, rv, nbt, momentum, EPS)

    run_module_steps(module, batches, step, counter_shape)


def test_num_batches_tracked_without_running_stats():
    """The counter output without running stats (momentum=None is then unused, as in eager)."""
    x = make((2, 4, 3, 5))
    nbt = torch.tensor(41, device=DEVICE)
    out, mean, invstd, rm, rv, new, _ = ops.batch_norm_train(x, None, None, None, None, nbt, None, EPS, None, True)
    assert rm is None and rv is None and new.item() == 42 and nbt.item() == 41
    check_outputs((out, mean, invstd), *eager_train(x, None, None, None, None, 0.1, relu=True))


def test_num_batches_tracked_bad_arguments(monkeypatch):
    monkeypatch.setattr(kernels, "batch_norm_train", lambda *a, **k: pytest.fail("a kernel was launched"))
    x = make((2, 3, 4, 5))
    w, b, rm, rv = params(3, torch.float32)
    with pytest.raises(RuntimeError, match="num_batches_tracked must be int64"):
        ops.batch_norm_train(x, w, b, rm, rv, torch.tensor(1, dtype=torch.int32), 0.1, EPS)
    with pytest.raises(RuntimeError, match="num_batches_tracked must have one element"):
        ops.batch_norm_train(x, w, b, rm, rv, torch.zeros(2, dtype=torch.int64), 0.1, EPS)
    with pytest.raises(TypeError, match="momentum"):
        torch.nn.functional.batch_norm(x, rm, rv, training=True, momentum=None)
    with pytest.raises(TypeError, match="momentum=None .* needs num_batches_tracked"):
        ops.batch_norm_train(x, w, b, rm, rv, None, None, EPS)


# ------------------------------------------------------------------- statistics from a conv's partials


def conv_with_partials(shape, oc, layout="contiguous", dtype=torch.float32, shift=0.0, scale=1.0, eager=False):
    """``(out, partials)`` of tritonkit::conv2d_bn_stats (3x3, padding 1) on random inputs; ``out`` ~
    ``scale * randn + shift`` per channel (weights scaled to unit output variance, bias ``shift``).
    ``eager``: also eager's ``F.conv2d`` of the same inputs, in float32."""
    x = make(shape, layout, dtype)
    w = (torch.randn(oc, shape[1], 3, 3) * (scale / (9 * shape[1]) ** 0.5)).to(dtype).to(DEVICE)
    b = (torch.randn(oc) * scale + shift).to(dtype).to(DEVICE)
    out, partials = ops.conv2d_bn_stats(x, w, b, [1, 1], [1, 1], [1, 1], 1)
    if not eager:
        return out, partials
    return out, partials, torch.nn.functional.conv2d(x.float(), w.float(), b.float(), padding=1)


def reference_partials(y):
    """The conv2d_bn_stats tile format written in torch: per BN_STAT_ROWS-pixel tile of the (n, h, w) rows
    of ``y`` and channel, (count, mean, M2) in float64, rounded to float32, shape [T, 3, C]."""
    rows = y.double().permute(0, 2, 3, 1).reshape(-1, y.shape[1])
    tiles = rows.split(conv_kernels.BN_STAT_ROWS)
    means = torch.stack([t.mean(0) for t in tiles])
    m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
    counts = torch.tensor([float(len(t)) for t in tiles], dtype=torch.float64)[:, None].expand_as(means)
    return torch.stack([counts, means, m2], 1).float().to(y.device)


def check_from_partials(y, partials, w, b, rm, rv, momentum=0.1, nbt=None, residual=None, relu=False, split=None):
    """batch_norm_train_from_partials against eager's training batch norm of ``y`` and against
    tritonkit's batch_norm_train (same metadata; statistics within the float32 tolerance)."""
    args = (y, partials, w, b, rm, rv, nbt, momentum, EPS, residual, relu)
    result = (ops.batch_norm_train_from_partials(*args) if split is None
              else kernels.batch_norm_train_from_partials(*args, split=split))
    check_outputs(result, *eager_train(y, w, b, rm, rv, 0.0 if momentum is None else momentum, residual=residual,
                                       relu=relu))
    direct = ops.batch_norm_train(y, w, b, rm, rv, nbt, momentum, EPS, residual, relu)
    for got, ref in zip(result, direct, strict=True):
        assert (got is None) == (ref is None)
        if got is not None:
            assert got.dtype == ref.dtype and got.shape == ref.shape and got.stride() == ref.stride()
            assert_close(got, ref)
    if nbt is not None:
        assert torch.equal(result[5], nbt + 1) and result[5].shape == nbt.shape
    return result


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("affine,running", [(True, True), (False, True), (True, False)])
def test_from_partials_conv(layout, dtype, affine, running):
    """Partials of the real conv2d_bn_stats (3*9*11 = 297 pixels: five tiles, the last of 41) against eager
    batch norm of the conv output and of eager's F.conv2d; for half the partials come from the float32
    accumulator, eager normalises the rounded output."""
    y, partials, conv = conv_with_partials((3, 4, 9, 11), 6, layout, dtype, shift=0.5, scale=2.0, eager=True)
    w, b, rm, rv = params(6, dtype, affine, running)
    nbt = torch.tensor(7, device=DEVICE) if running else None
    result = check_from_partials(y, partials, w, b, rm, rv, nbt=nbt)
    check_outputs(result, *eager_train(conv.to(dtype), w, b, rm, rv, 0.1))  # eager F.conv2d + batch norm


@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 5, 8, 4), (3, 7, 13, 11), (2, 70, 3, 17)], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_from_partials_reference_tiles(shape, layout):
    """Partials from the torch reference of the tile format: one partial tile (35 pixels), whole tiles
    only (64), many tiles (429), more channels than a GPU channel block (70)."""
    y = make(shape, layout, scale=3.0, shift=-1.0)
    check_from_partials(y, reference_partials(y), *params(shape[1], torch.float32), nbt=torch.tensor([3]))


@pytest.mark.parametrize("split", [2, 3, 7, 12])
def test_from_partials_two_level(split):
    """The tiles combine kernel (split runs of tiles, then the finalize over the runs) as a GPU launch of
    large T uses it; 12 > T = 7 leaves runs without tiles. Bit-identical on a rerun."""
    y = make((2, 5, 13, 17), "channels_last", scale=0.5, shift=7.0)
    partials = reference_partials(y)
    w, b, rm, rv = params(5, torch.float32)
    first = check_from_partials(y, partials, w, b, rm, rv, nbt=torch.tensor(0), split=split)
    again = kernels.batch_norm_train_from_partials(y, partials, w, b, rm, rv, torch.tensor(0), 0.1, EPS, split=split)
    assert same(first, again)
    assert_batch_norm_stats_close(first[1], first[2], y, EPS)


def chan_reference(partials):
    """float64 ``(n, mean, biased variance)`` per channel of the [T, 3, C] tiles as given (Chan's formula)."""
    count, mean, m2 = partials.double().unbind(1)
    n = count.sum(0)
    total = (count * mean).sum(0) / n
    return n, total, (m2.sum(0) + (count * (mean - total) ** 2).sum(0)) / n


@pytest.mark.parametrize("source", ["conv", "reference"])
@pytest.mark.parametrize("split", [1, 3])
def test_from_partials_large_mean(source, split):
    """Activations ~ 100 + 0.01 * randn: the combination shifted by the first tile's mean does not cancel
    (a float32 sum of n_t * mean_t would lose the spread). The statistics against float64 Chan of the
    same float32 tiles at the BN_* tolerances; the output at what the float32 mean's rounding allows.
    (Against float64 statistics of y itself the tiles' float32 means, each rounded at magnitude 100
    against a spread of ~1e-3 between tile means, already differ by ~1e-5 relative in the variance.)"""
    if source == "conv":
        y, partials = conv_with_partials((3, 4, 9, 11), 5, shift=100.0, scale=0.01)
    else:
        y = make((3, 5, 9, 11), scale=0.01, shift=100.0)
        partials = reference_partials(y)
    w, b, rm, rv = params(5, torch.float32)
    out, mean, invstd, _, new_rv, *_ = kernels.batch_norm_train_from_partials(
        y, partials, w, b, rm, rv, None, 0.1, EPS, split=split)
    n, ref_mean, ref_var = chan_reference(partials)
    ref_invstd = 1 / torch.sqrt(ref_var + EPS)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=BN_MEAN_RTOL, atol=0)
    torch.testing.assert_close(invstd.double(), ref_invstd, rtol=BN_INVSTD_RTOL, atol=0)
    ref_rv = 0.9 * rv.double() + 0.1 * ref_var * n / (n - 1)
    torch.testing.assert_close(new_rv.double(), ref_rv, rtol=BN_INVSTD_RTOL, atol=0)
    ref_out = ((y.double() - ref_mean[:, None, None]) * (ref_invstd * w.double())[:, None, None]
               + b.double()[:, None, None])
    atol = batch_norm_output_atol(ref_mean, ref_invstd, w)
    torch.testing.assert_close(out.double(), ref_out, rtol=TOLERANCES[torch.float32]["rtol"], atol=atol)


@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                     ("channels_last", "contiguous")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_from_partials_residual_relu(layouts, dtype):
    y, partials = conv_with_partials((2, 3, 7, 6), 5, layouts[0], dtype)
    residual = make(y.shape, layouts[1], dtype)
    check_from_partials(y, partials, *params(5, dtype), residual=residual, relu=True)


def test_from_partials_no_running_stats():
    """track_running_stats=False (no running stats, no counter): those outputs are None; momentum=None is
    then unused, as in eager."""
    y, partials = conv_with_partials((2, 3, 5, 7), 4, "channels_last")
    check_from_partials(y, partials, *params(4, torch.float32, running=False), momentum=None, relu=True)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_from_partials_matches_nn_batchnorm(momentum):
    """Three nn.BatchNorm2d training steps (momentum=None: cumulative) on conv outputs through their
    partials: outputs, running stats and the counter as eager's module."""
    module = torch.nn.BatchNorm2d(6, momentum=momentum).to(DEVICE).train()
    with torch.no_grad():
        module.weight.copy_(vec(6))
        module.bias.copy_(vec(6))
    convs = [conv_with_partials((2, 3, 6, 7), 6, layout, shift=s) for s, layout in zip([1.0, -2.0, 0.0], LAYOUTS * 2)]
    partials = {id(y): p for y, p in convs}

    def step(y, w, b, rm, rv, nbt, momentum):
        return ops.batch_norm_train_from_partials(y, partials[id(y)], w, b, rm, rv, nbt, momentum, EPS)

    run_module_steps(module, [y for y, _ in convs], step)


def test_from_partials_deterministic():
    y, partials = conv_with_partials((3, 4, 8, 9), 7, "channels_last", shift=3.0)
    w, b, rm, rv = params(7, torch.float32)
    first, again = (ops.batch_norm_train_from_partials(y, partials, w, b, rm, rv, torch.tensor(5), None, EPS)
                    for _ in range(2))
    assert same(first, again)


_FORWARD_KERNELS = ("batch_norm_stats_partial_kernel", "batch_norm_tiles_combine_kernel",
                    "batch_norm_stats_finalize_kernel", "batch_norm_apply_kernel")


@pytest.mark.parametrize("split,expected", [(1, {"finalize": 1, "apply": 1}),
                                            (3, {"combine": 1, "finalize": 1, "apply": 1})])
def test_from_partials_launches(monkeypatch, split, expected):
    """No statistics pass over the input; the counter and the running stats cost no launch of their own;
    the tiles combine kernel only for split > 1. batch_norm_train with a counter: partial, finalize, apply."""
    y, partials = conv_with_partials((2, 3, 6, 7), 4)
    w, b, rm, rv = params(4, torch.float32)
    launches = _Launches(monkeypatch, _FORWARD_KERNELS)
    kernels.batch_norm_train_from_partials(y, partials, w, b, rm, rv, torch.tensor(1), None, EPS, split=split)
    assert {k.split("_")[-2]: v for k, v in launches.count.items()} == expected
    launches.count.clear()
    ops.batch_norm_train(y, w, b, rm, rv, torch.tensor(1), None, EPS)
    assert {k.split("_")[-2]: v for k, v in launches.count.items()} == {"partial": 1, "finalize": 1, "apply": 1}


def test_from_partials_opcheck():
    y, partials = conv_with_partials((2, 3, 4, 5), 3, "channels_last")
    w, b, rm, rv = params(3, torch.float32)
    torch.library.opcheck(ops.batch_norm_train_from_partials, (y, partials, w, b, rm, rv, torch.tensor(2), None, EPS))
    torch.library.opcheck(ops.batch_norm_train_from_partials,
                          (y, partials, None, None, None, None, None, 0.1, EPS, make((2, 3, 4, 5)), True))


def test_from_partials_bad_arguments(monkeypatch):
    monkeypatch.setattr(kernels, "batch_norm_train_from_partials", lambda *a, **k: pytest.fail("a kernel was launched"))
    y = make((2, 3, 9, 8))  # 144 pixels: 3 tiles
    good = reference_partials(y)
    w, b, rm, rv = params(3, torch.float32)

    def call(x=y, partials=good, **kw):
        a = {"w": w, "b": b, "rm": rm, "rv": rv, "nbt": None, "momentum": 0.1, **kw}
        return ops.batch_norm_train_from_partials(x, partials, a["w"], a["b"], a["rm"], a["rv"], a["nbt"],
                                                  a["momentum"], EPS)

    for bad in [good[:2], good[:, :2], torch.cat([good, good], 2), good[0]]:
        with pytest.raises(RuntimeError, match=r"partials shape .* = \[3, 3, 3\] for input shape"):
            call(partials=bad)
    with pytest.raises(RuntimeError, match="partials must be float32"):
        call(partials=good.half())
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements not 4"):
        call(rv=vec(4))
    with pytest.raises(ValueError, match="expected 4D input"):
        call(x=y[0])
    with pytest.raises(RuntimeError, match="residual shape"):
        ops.batch_norm_train_from_partials(y, good, w, b, rm, rv, None, 0.1, EPS, make((2, 3, 9, 7)))
    with pytest.raises(TypeError, match="needs num_batches_tracked"):
        call(momentum=None)
    with pytest.raises(RuntimeError, match="num_batches_tracked must be int64"):
        call(nbt=torch.tensor(1.0))
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    fake_y, fake_partials = fake.from_tensor(y), fake.from_tensor(good[1:])
    with fake, pytest.raises(RuntimeError, match="partials shape"):  # the fake impl checks too
        call(x=fake_y, partials=fake_partials, w=None, b=None, rm=None, rv=None)


# ------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_stats(layout, dtype):
    x = make((3, 6, 5, 7), layout, dtype, scale=3.0, shift=-1.0)
    mean, invstd = ops.batch_norm_stats(x, EPS)
    assert mean.shape == invstd.shape == (6,)
    assert_batch_norm_stats_close(mean, invstd, x, EPS)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", [1, 3])
def test_large_mean_precision(layout, split):
    """x = 100 + 0.01 * randn: float32 statistics within a few ulps of float64 (no cancellation), and
    outputs within what the float32 mean's own rounding allows."""
    x = make((3, 5, 17, 11), layout, scale=0.01, shift=100.0)
    mean, invstd = kernels.batch_norm_stats(x, EPS, split=split)
    assert_batch_norm_stats_close(mean, invstd, x, EPS)
    w, b, rm, rv = params(5, torch.float32)
    out, save_mean, save_invstd, _, new_rv, *_ = kernels.batch_norm_train(x, w, b, rm, rv, None, 0.1, EPS, split=split)
    ref_out, ref_mean, ref_invstd, _, ref_rv = batch_norm_reference(x, w, b, rm, rv)
    assert_batch_norm_stats_close(save_mean, save_invstd, x, EPS)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=batch_norm_output_atol(ref_mean, ref_invstd, w))
    torch.testing.assert_close(new_rv.double(), ref_rv, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_mean_half_statistics_are_float32(dtype):
    """Half-precision inputs far from zero: statistics are float32-exact on the rounded values."""
    x = make((2, 3, 9, 13), "channels_last", dtype, scale=4.0, shift=1000.0)
    mean, invstd = ops.batch_norm_stats(x, EPS)
    assert_batch_norm_stats_close(mean, invstd, x, EPS)


def test_stats_many_channels_and_rows():
    """More channels than one interpreter channel block, and more rows than one tile."""
    x = make((2, 1100, 1, 3), "channels_last")
    assert_batch_norm_stats_close(*ops.batch_norm_stats(x, EPS), x, EPS)
    x = make((1, 1, 1030, 1025), scale=0.5, shift=3.0)  # B = 2**20 + 9070: two interpreter tiles
    assert_batch_norm_stats_close(*ops.batch_norm_stats(x, EPS), x, EPS)


@pytest.mark.parametrize("layout,split", [("contiguous", 2), ("contiguous", 7), ("channels_last", 2),
                                          ("channels_last", 7), ("channels_last", 32)])
def test_split_partials(layout, split):
    """Several partials per channel block combined by the finalize kernel, including splits with no tiles
    (channels_last at 32: 18 tiles); same statistics as one partial, and bit-identical on a rerun."""
    x = make((3, 5, 4, 6), layout, scale=0.5, shift=7.0)
    w, b, rm, rv = params(5, torch.float32)
    first = kernels.batch_norm_train(x, w, b, rm, rv, None, 0.1, EPS, split=split)
    assert_batch_norm_stats_close(first[1], first[2], x, EPS)
    again = kernels.batch_norm_train(x, w, b, rm, rv, None, 0.1, EPS, split=split)
    assert same(first, again)
    g = make((3, 5, 4, 6), layout)
    grads = kernels.batch_norm_backward(g, x, w, rm, rv, first[1], first[2], True, EPS, [True] * 3, split=split)
    ref = aten.native_batch_norm_backward(g, x, w, rm, rv, first[1], first[2], True, EPS, [True] * 3)
    for got, r in zip(grads, ref):
        assert_close(got, r, grad=True)
    regrads = kernels.batch_norm_backward(g, x, w, rm, rv, first[1], first[2], True, EPS, [True] * 3, split=split)
    assert same(grads, regrads)


def test_deterministic():
    """No atomics: two runs of every op give identical bits."""
    x = make((3, 7, 6, 5), "channels_last", scale=0.1, shift=2.0)
    w, b, rm, rv = params(7, torch.float32)
    assert same(ops.batch_norm_stats(x, EPS), ops.batch_norm_stats(x, EPS))
    first, again = (ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, EPS) for _ in range(2))
    assert same(first, again)
    g = make((3, 7, 6, 5))
    first, again = (ops.batch_norm_backward(g, x, w, rm, rv, first[1], first[2], True, EPS, [True] * 3)
                    for _ in range(2))
    assert same(first, again)


# ------------------------------------------------------------------------------------------ eval forward


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_eval_forward(layout, dtype, affine):
    x = make((3, 5, 7, 9), layout, dtype)
    w, b, rm, rv = params(5, dtype, affine)
    out = ops.batch_norm_eval(x, w, b, rm, rv, EPS)
    ref = reference_dtype_cast(
        lambda *t: aten._native_batch_norm_legit_no_training(*t, 0.1, EPS)[0], x, w, b, rm, rv)
    meta = aten._native_batch_norm_legit_no_training(x, w, b, rm, rv, 0.1, EPS)[0]
    assert out.stride() == meta.stride() and out.dtype == meta.dtype
    assert_close(out, ref)


@pytest.mark.parametrize("layouts", [("contiguous", "channels_last"), ("channels_last", "channels_last")])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eval_forward_residual_relu(layouts, relu, dtype):
    x, residual = make((2, 6, 3, 5), layouts[0], dtype), make((2, 6, 3, 5), layouts[1], dtype)
    w, b, rm, rv = params(6, dtype)
    out = ops.batch_norm_eval(x, w, b, rm, rv, EPS, residual, relu)
    ref = batch_norm_reference(x.float(), w.float(), b.float(), rm.float(), rv.float(), training=False,
                               residual=residual.float(), relu=relu)[0]
    assert_close(out, ref.to(dtype))
    assert out.stride() == x.stride()


ACTIVATION_CASES = {"relu6": ("hardtanh", 0.0, 6.0, F.relu6), "hardswish": ("hardswish", 0.0, 0.0, F.hardswish),
                    "silu": ("silu", 0.0, 0.0, F.silu), "sigmoid": ("sigmoid", 0.0, 0.0, torch.sigmoid),
                    "gelu_tanh": ("gelu_tanh", 0.0, 0.0, lambda t: F.gelu(t, approximate="tanh"))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_forward_activation_epilogue(case, dtype):
    """act(bn(x) [+ residual]) in the apply pass, training (from partials too) and eval, as eager's BN then
    activation on the BN output rounded to the dtype; training also returns that BN output (``pre``) for the
    kinds whose backward reads it. BN outputs span every kink (0 and 6; -3 and 3)."""
    kind, lo, hi, act = ACTIVATION_CASES[case]
    x, residual = make((2, 6, 5, 7), "channels_last", dtype, scale=2.0, shift=0.5), make((2, 6, 5, 7), dtype=dtype)
    w, b, rm, rv = params(6, dtype)
    w = w * 4
    values, meta = eager_train(x, w, b, rm, rv, 0.1, residual=residual)
    result = ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, EPS, residual, False, kind, lo, hi)
    bn_out = values[0].to(dtype)
    assert ((bn_out < -3) | (bn_out > 6)).any() and ((bn_out > 0) & (bn_out < 3)).any()
    check_outputs((result[0], *result[1:5]), (act(bn_out.float()), *values[1:]), meta)
    if kind in kernels.SAVES_INPUT:
        assert_close(result[6].cpu(), bn_out)
        assert result[6].stride() == result[0].stride() == x.stride()
    else:
        assert result[6] is None
    partials = conv_kernels.conv2d(x, torch.eye(6, dtype=dtype).reshape(6, 6, 1, 1), None, (1, 1), (0, 0), (1, 1),
                                   1, allow_tf32=False, stats=True)[1]
    again = ops.batch_norm_train_from_partials(x, partials, w, b, rm, rv, None, 0.1, EPS, residual, False, kind, lo,
                                               hi)
    assert_close(again[0], result[0])
    out = ops.batch_norm_eval(x, w, b, rm, rv, EPS, residual, False, kind, lo, hi)
    ref = batch_norm_reference(x.float(), w.float(), b.float(), rm.float(), rv.float(), training=False,
                               residual=residual.float())[0]
    assert_close(out, act(ref.to(dtype).float()).to(dtype))


def test_forward_activation_bad_arguments():
    x = make((2, 3, 4, 4))
    w, b, rm, rv = params(3, torch.float32)
    with pytest.raises(ValueError, match="activation must be one of 'none', 'relu', 'hardtanh'"):
        ops.batch_norm_eval(x, w, b, rm, rv, EPS, None, False, "tanh")
    with pytest.raises(ValueError, match="relu=True and activation='silu' both given"):
        ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, EPS, None, True, "silu")


def test_eval_forward_one_value_per_channel():
    """Eval needs no batch statistics: one value per channel is fine (training refuses it)."""
    x = make((1, 4, 1, 1))
    w, b, rm, rv = params(4, torch.float32)
    assert_close(ops.batch_norm_eval(x, w, b, rm, rv, EPS),
                 aten._native_batch_norm_legit_no_training(x, w, b, rm, rv, 0.1, EPS)[0])


# ---------------------------------------------------------------------------------------------- backward


def eager_mask(g, relu_output, activation="relu"):
    """grad_out as AOTAutograd's graph masks it: threshold_backward (relu) or hardtanh_backward(g, y, 0, 6)
    (relu6). A NaN y passes its gradient, as aten's CUDA kernel, its scalar CPU loop and torch._decomp's
    hardtanh_backward do; aten's vectorized CPU loop drops it, so that one case follows the decomposition."""
    if activation == "relu6":
        return torch.where(relu_output.isnan(), g, aten.hardtanh_backward(g, relu_output, 0.0, 6.0))
    return aten.threshold_backward(g, relu_output, 0)


def eager_backward(g, x, w, rm, rv, save_mean, save_invstd, train, mask, relu_output=None, activation="relu"):
    """aten's backward in float32 on the same rounded values (masked as :func:`eager_mask`)."""
    g, x = g.float(), x.float()
    if relu_output is not None:
        g = eager_mask(g, relu_output.float(), activation)
    up = [None if t is None else t.float() for t in (w, rm, rv, save_mean, save_invstd)]
    return aten.native_batch_norm_backward(g, x, *up, train, EPS, mask)


def check_backward(g, x, w, rm, rv, train, mask=(True, True, True), relu_output=None, save=None, activation=None):
    if save is None:  # float32 batch statistics from eager on the same rounded input
        save = aten._native_batch_norm_legit.no_stats(x.float(), None, None, True, 0.1, EPS)[1:]
    extra = () if activation is None else (activation,)  # None: the schema's default
    result = ops.batch_norm_backward(g, x, w, rm, rv, *save, train, EPS, list(mask), relu_output, *extra)
    ref = eager_backward(g, x, w, rm, rv, *save, train, list(mask), relu_output, activation or "relu")
    for name, got, r, want in zip(["grad_input", "grad_weight", "grad_bias"], result, ref, mask):
        if not want:
            assert got is None, name
            continue
        assert got.dtype == x.dtype and got.shape == r.shape, (name, got.dtype, got.shape)
        assert_close(got, r.to(x.dtype), grad=True, msg=name)
    meta = aten.native_batch_norm_backward(g, x, w, rm, rv, *(s.to(x.dtype) for s in save), train, EPS,
                                           [True] * 3)[0]
    if mask[0]:
        assert result[0].stride() == meta.stride(), (result[0].stride(), meta.stride())
    return result


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_train(layout, dtype, affine):
    x = make((3, 5, 7, 9), layout, dtype, scale=2.0, shift=1.0)
    w, _, rm, rv = params(5, dtype, affine)
    check_backward(make((3, 5, 7, 9), layout, dtype), x, w, rm, rv, True)


@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 7, 1, 1), (3, 1, 4, 3), (3, 9, 17, 3)], ids=str)
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                     ("channels_last", "contiguous"), ("sliced", "channels_last")])
def test_backward_shapes_and_layouts(shape, layouts):
    """grad_out in the input's or another layout; grad_input takes the input's memory format."""
    x = make(shape, layouts[1])
    check_backward(make(shape, layouts[0]), x, vec(shape[1]), None, None, True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_eval(layout, dtype):
    """train=False: grad_input = g * w / sqrt(running_var + eps); the save stats are ignored."""
    x = make((2, 5, 6, 7), layout, dtype)
    w, _, rm, rv = params(5, dtype)
    check_backward(make((2, 5, 6, 7), layout, dtype), x, w, rm, rv, False)


@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "contiguous")])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_relu_mask(layouts, train, dtype):
    """relu_output masks grad_out as threshold_backward(g, y, 0): NaN gradients where y <= 0 vanish, a
    NaN output lets its gradient through."""
    x = make((3, 4, 5, 6), layouts[1], dtype)
    y = make((3, 4, 5, 6), layouts[0], dtype).relu()
    g = make((3, 4, 5, 6), layouts[1], dtype)
    dead = (y == 0) & (torch.rand(y.shape, device=DEVICE) < 0.5)
    g = torch.where(dead, float("nan"), g)
    y = torch.where(~dead & (torch.rand(y.shape, device=DEVICE) < 0.1), float("nan"), y)
    w, _, rm, rv = params(4, dtype)
    result = check_backward(g, x, w, rm, rv, train, relu_output=y)
    assert all(r.isfinite().all() for r in result)


def relu6_input(shape, layout, dtype, shift=3.0):
    """A ReLU6 input y (the BN output) around [0, 6], with exact 0, -0, 6, their nearest kept neighbours
    (just inside (0, 6)), values past both ends and NaN at random places."""
    y = make(shape, "contiguous", torch.float32, scale=3.0, shift=shift)
    inside = 6.0 * (1 - torch.finfo(dtype).eps)
    assert 0 < torch.tensor(inside).to(dtype) < 6
    specials = torch.tensor([0.0, -0.0, 6.0, torch.finfo(dtype).tiny, inside, 6.5, -0.5, float("nan")])
    pick = torch.randint(0, 2 * len(specials), shape)  # about half the elements special
    y = torch.where(pick < len(specials), specials[pick.clamp(max=len(specials) - 1)].to(DEVICE), y)
    y = y.to(dtype)
    return y.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else y


@pytest.mark.parametrize("layouts", [("channels_last", "channels_last"), ("contiguous", "channels_last"),
                                     ("contiguous", "contiguous")])
@pytest.mark.parametrize("train,affine", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_relu6_mask(layouts, train, affine, dtype):
    """activation="relu6": relu_output is the hardtanh's input y, grad_out masked as hardtanh_backward(g, y,
    0, 6) in both stages: NaN gradients where y <= 0 or y >= 6 (exactly 0 and 6 included) vanish from the
    sums and from grad_input, a NaN y lets its gradient through."""
    shape = (3, 5, 6, 7)
    x = make(shape, layouts[1], dtype)
    y = relu6_input(shape, layouts[0], dtype)
    dead = ((y <= 0) | (y >= 6)) & (torch.rand(shape, device=DEVICE) < 0.5)
    g = torch.where(dead, float("nan"), make(shape, layouts[1], dtype))
    w, _, rm, rv = params(5, dtype, affine)
    decomposition = torch._decomp.decomposition_table[aten.hardtanh_backward.default]
    torch.testing.assert_close(eager_mask(g, y, "relu6"), decomposition(g, y, 0.0, 6.0), equal_nan=True, rtol=0, atol=0)
    result = check_backward(g, x, w, rm, rv, train, relu_output=y, activation="relu6")
    assert all(r.isfinite().all() for r in result)


def own_output(x, save, w, b, relu=True):
    """relu(bn(x)) as tritonkit::batch_norm_apply computes it (float32, rounded to x's dtype)."""
    mean, invstd = (t.float()[None, :, None, None] for t in save)
    k = invstd * (1.0 if w is None else w.float()[None, :, None, None])
    v = (x.float() - mean) * k + (0.0 if b is None else b.float()[None, :, None, None])
    return (v.relu() if relu else v).to(x.dtype)


@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                     ("contiguous", "channels_last")])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_mask_from_its_output(layouts, affine, dtype):
    """mask_from_output: the ReLU mask is the BN output recomputed from the input (the joint-graph pass's
    batch_norm_apply) instead of a stored relu_output; the same result as passing that output, and
    NaN gradients where it is <= 0 vanish."""
    shape = (3, 5, 6, 7)
    x = make(shape, layouts[1], dtype)
    save = [t.to(dtype) if DEVICE.type == "cpu" else t
            for t in aten._native_batch_norm_legit.no_stats(x.float(), None, None, True, 0.1, EPS)[1:]]
    w, b, rm, rv = params(5, dtype, affine)
    y = own_output(x, save, w, b)
    torch.testing.assert_close(ops.batch_norm_apply(x, *save, w, b, True), y, rtol=0, atol=0)
    g = torch.where((y == 0) & (torch.rand(shape, device=DEVICE) < 0.5), float("nan"), make(shape, layouts[0], dtype))
    result = ops.batch_norm_backward(g, x, w, rm, rv, *save, True, EPS, [True] * 3, None, "relu", b, True)
    ref = check_backward(g, x, w, rm, rv, True, relu_output=y, save=save)
    for got, want in zip(result, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(r.isfinite().all() for r in result)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("summed_first", [False, True])
def test_backward_from_grad_partials(monkeypatch, layout, dtype, summed_first):
    """grad_partials (the producer's reductions, any split of them into rows): the result eager gives,
    and no reduction launch; past the finalize's share of partials they are summed first."""
    shape = (3, 5, 6, 7)
    x = make(shape, layout, dtype, scale=2.0, shift=1.0)
    g = make(shape, layout, dtype)
    w, _, rm, rv = params(5, dtype)
    save = aten._native_batch_norm_legit.no_stats(x.float(), None, None, True, 0.1, EPS)[1:]
    rows = torch.stack([g.float(), g.float() * (x.float() - save[0][None, :, None, None])], 1)  # [N, 2, C, H, W]
    partials = rows.reshape(3, 2, 5, 42).permute(0, 3, 1, 2).reshape(3 * 42, 2, 5).contiguous()
    if summed_first:
        monkeypatch.setattr(kernels, "_FINALIZE_PARTIALS", 16)
    launches = _Launches(monkeypatch)
    got = ops.batch_norm_backward(g, x, w, rm, rv, *save, True, EPS, [True] * 3, grad_partials=partials)
    assert {k.split("_")[3] for k in launches.count} == {"finalize", "apply"}, launches.count
    ref = eager_backward(g, x, w, rm, rv, *save, True, [True] * 3)
    for name, a, r in zip(["grad_input", "grad_weight", "grad_bias"], got, ref):
        assert_close(a, r.to(dtype), grad=True, msg=name)


@pytest.mark.parametrize("needle,kwargs", [
    ("grad_partials are the reductions of a grad_out already", dict(relu_output=True)),
    ("grad_partials are the reductions of a grad_out already", dict(train=False)),
    ("grad_partials must be a float32 tensor of shape \\[T, 2, 5\\]", dict(partials=torch.zeros(4, 2, 4))),
    ("grad_partials must be a float32 tensor", dict(partials=torch.zeros(4, 2, 5, dtype=torch.float64))),
], ids=str)
def test_backward_grad_partials_bad_arguments(needle, kwargs):
    x = make((2, 5, 3, 3))
    save = aten._native_batch_norm_legit.no_stats(x, None, None, True, 0.1, EPS)[1:]
    partials = kwargs.get("partials", torch.zeros(4, 2, 5)).to(DEVICE)
    relu_output = x.relu() if kwargs.get("relu_output") else None
    with pytest.raises(RuntimeError, match=needle):
        ops.batch_norm_backward(x, x, vec(5), vec(5), vec(5, positive=True), *save, kwargs.get("train", True), EPS,
                                [True] * 3, relu_output, grad_partials=partials)


@pytest.mark.parametrize("needle,kwargs", [
    ("mask_from_output recomputes", dict(relu_output=True, mask_from_output=True)),
    ("mask_from_output recomputes", dict(train=False, mask_from_output=True)),
    ("mask_from_output recomputes", dict(activation="sigmoid", mask_from_output=True)),
    ("output_bias is read only with mask_from_output", dict(output_bias=True)),
    ("output_bias should contain 5 elements", dict(output_bias=torch.ones(4), mask_from_output=True)),
], ids=str)
def test_backward_mask_from_output_bad_arguments(needle, kwargs):
    x = make((2, 5, 3, 3))
    save = aten._native_batch_norm_legit.no_stats(x, None, None, True, 0.1, EPS)[1:]
    args = dict(relu_output=None, activation="relu", output_bias=None, mask_from_output=False, train=True) | kwargs
    args["relu_output"] = x.relu() if args["relu_output"] is True else None
    args["output_bias"] = vec(5) if args["output_bias"] is True else args["output_bias"]
    rm, rv = vec(5), vec(5, positive=True)
    with pytest.raises(RuntimeError, match=needle):
        ops.batch_norm_backward(x, x, vec(5), rm, rv, *save, args["train"], EPS, [True] * 3, args["relu_output"],
                                args["activation"], args["output_bias"], args["mask_from_output"])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [True, False])
def test_batch_norm_apply(layout, dtype, relu):
    x = make((2, 6, 5, 7), layout, dtype, scale=2.0, shift=1.0)
    save = (vec(6), vec(6, positive=True))
    w, b, _, _ = params(6, dtype)
    out = ops.batch_norm_apply(x, *save, w, b, relu)
    assert out.is_contiguous(memory_format=output_memory_format(x))
    ref = (x.float() - save[0][None, :, None, None]) * (save[1] * w.float())[None, :, None, None]
    ref = ref + b.float()[None, :, None, None]
    assert_close(out, (ref.relu() if relu else ref).to(dtype))
    torch.library.opcheck(ops.batch_norm_apply.default, (x, *save, None, None, relu))


@pytest.mark.parametrize("needle,bad", [
    ("mean should contain 6 elements", dict(mean=torch.zeros(5))),
    ("invstd must be float32 or the input's dtype", dict(invstd=torch.ones(6, dtype=torch.float64))),
    ("weight", dict(weight=torch.ones(7))),
], ids=str)
def test_batch_norm_apply_bad_arguments(needle, bad):
    args = dict(mean=torch.zeros(6), invstd=torch.ones(6), weight=None, bias=None) | bad
    with pytest.raises(RuntimeError, match=needle):
        ops.batch_norm_apply(make((2, 6, 3, 3)), *args.values())


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stats_from_partials_are_from_partials_without_the_apply(momentum, dtype):
    y, partials = conv_with_partials((2, 4, 9, 11), 6, "channels_last", dtype, shift=3.0)
    _, _, rm, rv = params(6, torch.float32)
    nbt = torch.tensor(4, device=DEVICE)
    stats = ops.batch_norm_stats_from_partials(y, partials, rm, rv, nbt, momentum, EPS)
    full = ops.batch_norm_train_from_partials(y, partials, None, None, rm, rv, nbt, momentum, EPS)
    assert len(stats) == 5
    for got, ref in zip(stats, full[1:6], strict=True):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.library.opcheck(ops.batch_norm_stats_from_partials.default, (y, partials, rm, rv, nbt, momentum, EPS))
    with pytest.raises(RuntimeError, match="partials shape"):
        ops.batch_norm_stats_from_partials(y, partials[1:], rm, rv, nbt, momentum, EPS)


def test_backward_relu6_matches_autograd_chain():
    """relu6(bn(x)) through eager autograd (the graph AOTAutograd traces) vs the op fed the BN output."""
    x = make((2, 6, 5, 9), "channels_last", shift=0.5)
    w, b = vec(6), vec(6)
    mean, invstd = ops.batch_norm_stats(x, EPS)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = torch.nn.functional.batch_norm(xr, None, None, wr, br, training=True, eps=EPS)
    g = make((2, 6, 5, 9), "channels_last")
    torch.nn.functional.relu6(y).backward(g)
    assert ((y > 0) & (y < 6)).any() and ((y <= 0) | (y >= 6)).any()
    result = ops.batch_norm_backward(g, x, w, None, None, mean, invstd, True, EPS, [True] * 3, y.detach(), "relu6")
    for got, want in zip(result, (xr.grad, wr.grad, br.grad)):
        assert_close(got, want, grad=True)


EAGER_ACTIVATIONS = {"hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "silu": F.silu, "sigmoid": torch.sigmoid,
                     "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("kind", EAGER_ACTIVATIONS)
def test_backward_activation_matches_autograd_chain(kind, layout):
    """act(bn(x)) through eager autograd vs the op fed what aten's activation backward saves (the BN output;
    sigmoid: its output), both stages applying the activation's gradient; the BN output spans the kinks
    of hardswish / hardsigmoid (+-3)."""
    x = make((2, 6, 5, 9), layout, scale=3.0, shift=0.5)
    w, b = vec(6) * 3, vec(6)
    mean, invstd = ops.batch_norm_stats(x, EPS)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = F.batch_norm(xr, None, None, wr, br, training=True, eps=EPS)
    out = EAGER_ACTIVATIONS[kind](y)
    g = make((2, 6, 5, 9), layout)
    out.backward(g)
    saved = (out if kind == "sigmoid" else y).detach()
    assert ((y > -3) & (y < 3)).any() and ((y <= -3) | (y >= 3)).any()
    result = ops.batch_norm_backward(g, x, w, None, None, mean, invstd, True, EPS, [True] * 3, saved, kind)
    for got, want in zip(result, (xr.grad, wr.grad, br.grad)):
        assert_close(got, want, grad=True)


MASKS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (True, True, False), (False, True, True), (True, False, True), (False, False, False)]


@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("train", [True, False])
def test_backward_output_mask(mask, train):
    x = make((2, 5, 3, 7), "channels_last")
    w, _, rm, rv = params(5, torch.float32)
    check_backward(make((2, 5, 3, 7), "channels_last"), x, w, rm, rv, train, mask)


class _Launches:
    """Counts the launches of kernels ``names`` (default: the backward's; monkeypatched into the kernel module)."""

    def __init__(self, monkeypatch, names=("batch_norm_bwd_reduce_kernel", "batch_norm_bwd_finalize_kernel",
                                           "batch_norm_bwd_apply_kernel")):
        self.count = {}
        for name in names:
            monkeypatch.setattr(kernels, name, self._wrap(name, getattr(kernels, name)))

    def _wrap(self, name, kernel):
        counts = self.count

        class Wrapped:
            def __getitem__(self, grid):
                counts[name] = counts.get(name, 0) + 1
                return kernel[grid]

        return Wrapped()


@pytest.mark.parametrize("train,mask,expected", [
    (False, (True, False, False), {"finalize", "apply"}),  # eval grad_input: no reduction
    (True, (False, False, True), {"reduce", "finalize"}),
    (True, (True, True, True), {"reduce", "finalize", "apply"}),
])
def test_backward_launches_only_what_output_mask_needs(monkeypatch, train, mask, expected):
    launches = _Launches(monkeypatch)
    x = make((2, 3, 4, 5))
    w, _, rm, rv = params(3, torch.float32)
    mean, invstd = ops.batch_norm_stats(x, EPS)
    ops.batch_norm_backward(make((2, 3, 4, 5)), x, w, rm, rv, mean, invstd, train, EPS, list(mask))
    assert {k.split("_")[3] for k in launches.count} == expected, launches.count


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_chain(dtype):
    """The backward fed with the forward's own save stats (the input's dtype on the CPU) matches eager's
    chain; the ReLU output of the fused forward masks the gradient."""
    x = make((3, 4, 6, 5), "channels_last", dtype)
    w, b, rm, rv = params(4, dtype)
    out, save_mean, save_invstd, *_ = ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, EPS, None, True)
    assert save_mean.dtype == kernels.save_stats_dtype(x)
    g = make((3, 4, 6, 5), "channels_last", dtype)
    result = ops.batch_norm_backward(g, x, w, rm, rv, save_mean, save_invstd, True, EPS, [True] * 3, out)
    ref = eager_backward(g, x, w, rm, rv, save_mean, save_invstd, True, [True] * 3, out)
    for got, r in zip(result, ref):
        assert_close(got, r.to(dtype), grad=True)


@pytest.mark.parametrize("activation", [None, "relu6"])
def test_backward_large_mean(activation):
    """Training gradients for x = 100 + 0.01 * randn against float64 (the centring is exact); relu6: g
    masked by a ReLU6 input as hardtanh_backward."""
    x = make((2, 3, 11, 7), scale=0.01, shift=100.0)
    w = vec(3)
    mean, invstd = ops.batch_norm_stats(x, EPS)
    g = make((2, 3, 11, 7))
    y = None if activation is None else relu6_input((2, 3, 11, 7), "contiguous", torch.float32)
    gi, gw, gb = ops.batch_norm_backward(g, x, w, None, None, mean, invstd, True, EPS, [True] * 3, y,
                                         activation or "relu")
    if y is not None:
        g = eager_mask(g, y, activation)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    torch.nn.functional.batch_norm(x64, None, None, w64, None, training=True, eps=EPS).backward(g.double())
    scale = float(invstd.max() * w.abs().max())  # grad_input ~ w * invstd * g
    torch.testing.assert_close(gi.double(), x64.grad, rtol=1e-3, atol=1e-3 * scale)
    torch.testing.assert_close(gw.double(), w64.grad, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(gb.double(), g.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------ opcheck, errors


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    x = make((2, 3, 4, 5), layout)
    w, b, rm, rv = params(3, torch.float32)
    torch.library.opcheck(ops.batch_norm_stats, (x, EPS))
    torch.library.opcheck(ops.batch_norm_train, (x, w, b, rm, rv, None, 0.1, EPS))
    torch.library.opcheck(ops.batch_norm_train, (x, None, None, None, None, None, 0.1, EPS, make((2, 3, 4, 5)), True))
    torch.library.opcheck(ops.batch_norm_train, (x, w, b, rm, rv, torch.tensor(2), None, EPS))
    torch.library.opcheck(ops.batch_norm_eval, (x, w, b, rm, rv, EPS, x.relu(), True))
    mean, invstd = ops.batch_norm_stats(x, EPS)
    torch.library.opcheck(ops.batch_norm_backward, (make((2, 3, 4, 5)), x, w, rm, rv, mean, invstd, True, EPS,
                                                    [True, True, True], x.relu()))
    torch.library.opcheck(ops.batch_norm_backward, (make((2, 3, 4, 5)), x, w, rm, rv, None, None, False, EPS,
                                                    [True, False, True]))
    torch.library.opcheck(ops.batch_norm_backward, (make((2, 3, 4, 5)), x, w, rm, rv, mean, invstd, True, EPS,
                                                    [True, True, True], 3 * x + 3, "relu6"))


def test_opcheck_half_save_stats():
    x = make((2, 3, 4, 5), dtype=torch.bfloat16)
    torch.library.opcheck(ops.batch_norm_train, (x, *params(3, torch.bfloat16), None, 0.1, EPS))


def _errors(x, w=None, b=None, rm=None, rv=None, training=True):
    """(eager error, ours): F.batch_norm's exception next to tritonkit's for the same arguments."""
    try:
        torch.nn.functional.batch_norm(x, rm, rv, w, b, training=training)
    except Exception as err:  # noqa: BLE001
        eager = err
    else:
        eager = None
    try:
        if training:
            ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, EPS)
        else:
            ops.batch_norm_eval(x, w, b, rm, rv, EPS)
    except Exception as err:  # noqa: BLE001
        return eager, err
    return eager, None


@pytest.mark.parametrize("case", ["running_mean", "running_var", "weight", "bias"])
def test_wrong_vector_length(case):
    x = make((2, 3, 4, 5))
    args = {"w": vec(3), "b": vec(3), "rm": vec(3), "rv": vec(3, positive=True)}
    key = {"running_mean": "rm", "running_var": "rv", "weight": "w", "bias": "b"}[case]
    args[key] = vec(4, positive=True)
    for training in (True, False):
        eager, ours = _errors(x, **args, training=training)
        assert type(ours) is type(eager) is RuntimeError, (eager, ours)
        assert f"{case} should contain 3 elements not 4" in str(ours) and f"{case} should contain" in str(eager)


def test_one_value_per_channel_when_training():
    x = make((1, 3, 1, 1))
    eager, ours = _errors(x, rm=vec(3), rv=vec(3, positive=True))
    assert type(ours) is type(eager) is ValueError
    assert str(eager) in str(ours)  # "Expected more than 1 value per channel when training, got input size ..."
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.batch_norm_train(x, None, None, None, None, None, 0.1, EPS)


def test_non_4d_input():
    with pytest.raises(ValueError, match="expected 4D input"):
        torch.nn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    for shape in [(2, 3, 4), (2, 3, 4, 5, 6)]:
        x = torch.randn(shape).to(DEVICE)
        with pytest.raises(ValueError, match=f"expected 4D input \\(got {len(shape)}D input\\)"):
            ops.batch_norm_train(x, None, None, None, None, None, 0.1, EPS)
        with pytest.raises(ValueError, match="expected 4D input"):
            ops.batch_norm_stats(x, EPS)
        with pytest.raises(ValueError, match="expected 4D input"):
            ops.batch_norm_backward(x, x, None, None, None, vec(3), vec(3), True, EPS, [True] * 3)


def test_empty_input():
    x = make((0, 3, 2, 2))
    with pytest.raises(RuntimeError, match="at least one element"):
        aten.native_batch_norm(x, None, None, None, None, True, 0.1, EPS)
    with pytest.raises(RuntimeError, match="at least one element"):
        ops.batch_norm_train(x, None, None, None, None, None, 0.1, EPS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_parameters_of_a_half_input(dtype):
    """Eager's mixed-type BatchNorm (autocast): half input and output, float32 weight, bias and running
    statistics; the running outputs and the parameter gradients float32, as aten's."""
    x, g = make((2, 3, 4, 5), "channels_last", dtype), make((2, 3, 4, 5), "channels_last", dtype)
    w, b, rm, rv = vec(3), vec(3), vec(3), vec(3, positive=True)
    ours = ops.batch_norm_train(x, w, b, rm, rv, None, 0.1, EPS)
    ref = aten._native_batch_norm_legit_functional(x.float(), w, b, rm, rv, True, 0.1, EPS)
    assert [t.dtype for t in ours[:5]] == [dtype, dtype, dtype, torch.float32, torch.float32]  # save_*: fake's
    for got, want in zip((ours[0], ours[3], ours[4]), (ref[0].to(dtype), ref[3], ref[4])):
        assert_close(got.cpu(), want)
    eval_ref = F.batch_norm(x.float(), rm, rv, w, b, eps=EPS).to(dtype)
    assert_close(ops.batch_norm_eval(x, w, b, rm, rv, EPS).cpu(), eval_ref)
    dx, dw, db = ops.batch_norm_backward(g, x, w, rm, rv, ours[1], ours[2], True, EPS, [True] * 3)
    saved = [t.float() for t in ours[1:3]]  # the input's dtype on the CPU (as aten's fake tensors record it)
    want = aten.native_batch_norm_backward(g.float(), x.float(), w, rm, rv, *saved, True, EPS, [True] * 3)
    assert (dw.dtype, db.dtype) == (torch.float32, torch.float32)
    assert_close(dx.cpu(), want[0].to(dtype))
    for got, expected in zip((dw, db), want[1:]):
        assert_close(got.cpu(), expected, grad=True)


def test_mixed_dtypes():
    x = make((2, 3, 4, 5), dtype=torch.float16)
    with pytest.raises(RuntimeError, match="all of the input's dtype torch.float16 or all float32, got weight "
                                           "torch.bfloat16"):
        ops.batch_norm_train(x, vec(3, torch.bfloat16), None, None, None, None, 0.1, EPS)
    with pytest.raises(RuntimeError, match="running_mean torch.float16, running_var torch.float32"):
        ops.batch_norm_eval(x, None, None, vec(3, torch.float16), vec(3), EPS)
    with pytest.raises(RuntimeError, match="residual dtype"):
        ops.batch_norm_train(x, None, None, None, None, None, 0.1, EPS, make((2, 3, 4, 5)))
    with pytest.raises(RuntimeError, match="grad_out dtype"):
        ops.batch_norm_backward(make((2, 3, 4, 5)), x, None, None, None, vec(3), vec(3), True, EPS, [True] * 3)
    with pytest.raises(RuntimeError, match="save_mean must be float32 or"):
        ops.batch_norm_backward(x, x, None, None, None, vec(3, torch.bfloat16), vec(3), True, EPS, [True] * 3)
    with pytest.raises(RuntimeError, match="must be float32, float16 or bfloat16"):
        ops.batch_norm_stats(x.to(torch.float64), EPS)


def test_other_bad_arguments():
    x = make((2, 3, 4, 5))
    with pytest.raises(ValueError, match="both be None or neither"):
        ops.batch_norm_train(x, None, None, vec(3), None, None, 0.1, EPS)
    with pytest.raises(RuntimeError, match="residual shape"):
        ops.batch_norm_train(x, None, None, None, None, None, 0.1, EPS, make((2, 3, 4, 4)))
    with pytest.raises(RuntimeError, match="grad_out shape"):
        ops.batch_norm_backward(make((2, 3, 4, 4)), x, None, None, None, vec(3), vec(3), True, EPS, [True] * 3)
    with pytest.raises(RuntimeError, match="relu_output shape"):
        ops.batch_norm_backward(x, x, None, None, None, vec(3), vec(3), True, EPS, [True] * 3, make((1, 3, 4, 5)))
    with pytest.raises(RuntimeError, match="save_mean and save_invstd must be given"):
        ops.batch_norm_backward(x, x, None, None, None, None, None, True, EPS, [True] * 3)
    with pytest.raises(RuntimeError, match="running_mean and running_var must be given"):
        ops.batch_norm_backward(x, x, None, None, None, vec(3), vec(3), False, EPS, [True] * 3)
    with pytest.raises(RuntimeError, match="save_invstd should contain 3 elements not 2"):
        ops.batch_norm_backward(x, x, None, None, None, vec(3), vec(2), True, EPS, [True] * 3)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake, pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):  # fake impl too
        ops.batch_norm_train(fake.from_tensor(x), None, None, fake.from_tensor(vec(4)), fake.from_tensor(vec(4)),
                             None, 0.1, EPS)


def test_errors_come_before_any_launch(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    for name in ("batch_norm_train", "batch_norm_stats", "batch_norm_backward"):
        monkeypatch.setattr(kernels, name, no_launch)
    x = make((1, 3, 1, 1))
    with pytest.raises(ValueError):
        ops.batch_norm_train(x, None, None, None, None, None, 0.1, EPS)
    with pytest.raises(RuntimeError):
        ops.batch_norm_backward(x, x, vec(2), None, None, vec(3), vec(3), True, EPS, [True] * 3)
    x = make((2, 3, 4, 5))
    for relu_output in (x, None):
        with pytest.raises(ValueError, match="activation must be one of 'relu', 'relu6', .*, got 'hardtanh'"):
            ops.batch_norm_backward(x, x, None, None, None, vec(3), vec(3), True, EPS, [True] * 3, relu_output,
                                    "hardtanh")
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake, pytest.raises(ValueError, match="activation must be one of"):  # the fake impl too
        ops.batch_norm_backward(*(fake.from_tensor(t) for t in (x, x)), None, None, None,
                                *(fake.from_tensor(vec(3)) for _ in range(2)), True, EPS, [True] * 3,
                                fake.from_tensor(x), "hardtanh")
