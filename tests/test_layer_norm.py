"""LayerNorm over the last dimension (``tritonkit::layer_norm`` / ``layer_norm_backward``) against aten's
``native_layer_norm`` / ``native_layer_norm_backward``, in the interpreter. Outputs are NaN-poisoned before
every launch (tests/conftest.py), so an unwritten element fails; row lengths are off every block size."""

import pytest
import torch

from tritonkit.runtime import default_device
from tritonkit.testing import assert_close, relative_error

ops = torch.ops.tritonkit
aten = torch.ops.aten
DEVICE = default_device()
EPS = 1e-5


def _input(shape, layout, dtype, scale=3.0, shift=2.0):
    """``layout``: "rows" (contiguous), "nchw" (an NCHW tensor permuted to N, H, W, C: rows not contiguous),
    "nhwc" (a channels_last one permuted: contiguous rows), "strided" (every other row of a wider tensor)."""
    if layout in ("nchw", "nhwc"):
        n, h, w, c = shape
        x = torch.randn(n, c, h, w)
        x = (x.to(memory_format=torch.channels_last) if layout == "nhwc" else x).permute(0, 2, 3, 1)
    elif layout == "strided":
        x = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    else:
        x = torch.randn(shape)
    return (x * scale + shift).to(dtype).to(DEVICE)


def _params(c, dtype, affine):
    if affine == "none":
        return None, None
    w = torch.randn(c).to(dtype).to(DEVICE)
    return w, (torch.randn(c).to(dtype).to(DEVICE) if affine == "both" else None)


def _check(shape, layout, dtype=torch.float32, affine="both", scale=3.0, shift=2.0):
    x = _input(shape, layout, dtype, scale, shift)
    C = x.shape[-1]
    w, b = _params(C, dtype, affine)
    out = ops.layer_norm(x, w, b, EPS)
    up = [t.float() if t is not None else None for t in (x, w, b)]
    want = aten.native_layer_norm(up[0], [C], up[1], up[2], EPS)
    assert out[0].stride() == aten.native_layer_norm(x, [C], w, b, EPS)[0].stride()
    assert_close(out[0], want[0].to(dtype))
    for got, ref in zip(out[1:], want[1:]):  # mean, rstd: the input's dtype on the CPU, float32 on a GPU
        assert got.shape == ref.shape
        assert_close(got, ref.to(got.dtype))
    g = torch.randn(x.shape).to(dtype).to(DEVICE)
    mask = [True, w is not None, b is not None]
    grads = ops.layer_norm_backward(g, x, out[1], out[2], w, mask)
    ref = aten.native_layer_norm_backward(g.float(), up[0], [C], out[1].float(), out[2].float(), up[1], up[2], mask)
    assert grads[0].stride() == torch.empty_like(x).stride()
    assert_close(grads[0], ref[0].to(dtype), grad=True)
    for got, expected in zip(grads[1:], ref[1:]):
        if expected is None:
            assert got is None
        else:
            assert got.dtype == dtype
            assert_close(got, expected.to(dtype), grad=True)


@pytest.mark.parametrize("shape,layout", [((2, 5, 7, 37), "rows"), ((3, 130), "rows"), ((2, 4, 3, 24), "nchw"),
                                          ((2, 5, 3, 20), "nhwc"), ((9, 17), "strided"), ((4, 1), "rows"),
                                          ((300, 6), "rows")], ids=str)
def test_matches_aten(shape, layout):
    _check(shape, layout)


@pytest.mark.parametrize("affine", ["none", "weight"])
def test_without_affine_parameters(affine):
    _check((3, 4, 29), "rows", affine=affine)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half(dtype):
    _check((2, 6, 5, 48), "nhwc", dtype)


def test_large_mean_is_centred():
    """Rows ~ 100 + 0.01 N(0, 1): the shifted mean and the variance around it keep the output and the input
    gradient within eager float32's own error against float64 (a one-pass sum of squares would lose it all)."""
    x, g = _input((6, 96), "rows", torch.float32, 0.01, 100.0), torch.randn(6, 96, device=DEVICE)
    w, b = _params(96, torch.float32, "both")
    y64, mean64, rstd64 = aten.native_layer_norm(x.double(), [96], w.double(), b.double(), EPS)
    dx64 = aten.native_layer_norm_backward(g.double(), x.double(), [96], mean64, rstd64, w.double(), b.double(),
                                           [True, False, False])[0]
    eager = aten.native_layer_norm(x, [96], w, b, EPS)
    ours = ops.layer_norm(x, w, b, EPS)
    dx_eager = aten.native_layer_norm_backward(g, x, [96], *eager[1:], w, b, [True, False, False])[0]
    dx_ours = ops.layer_norm_backward(g, x, *ours[1:], w, [True, False, False])[0]
    for got, base, want in ((ours[0], eager[0], y64), (dx_ours, dx_eager, dx64)):
        assert relative_error(got, want) <= 2 * relative_error(base, want) + 1e-6


def test_float32_parameters_of_a_half_input():
    x = _input((4, 3, 40), "rows", torch.float16)
    w, b = _params(40, torch.float32, "both")
    y, mean, rstd = ops.layer_norm(x, w, b, EPS)
    assert_close(y, aten.native_layer_norm(x.float(), [40], w, b, EPS)[0].half())
    _, dw, db = ops.layer_norm_backward(torch.randn_like(x), x, mean, rstd, w, [True, True, True])
    assert (dw.dtype, db.dtype) == (torch.float32, torch.float32)


def test_empty_rows():
    x = torch.randn(0, 7, device=DEVICE)
    w = torch.randn(7, device=DEVICE)
    y, mean, rstd = ops.layer_norm(x, w, None, EPS)
    assert y.shape == (0, 7) and mean.shape == (0, 1)
    dx, dw, db = ops.layer_norm_backward(x, x, mean, rstd, w, [True, True, False])
    assert dx.shape == (0, 7) and torch.equal(dw, torch.zeros_like(w)) and db is None


def test_opcheck():
    x, w, b = torch.randn(3, 5, 11), torch.randn(11), torch.randn(11)
    torch.library.opcheck(ops.layer_norm.default, (x, w, b, EPS))
    _, mean, rstd = ops.layer_norm(x, w, b, EPS)
    torch.library.opcheck(ops.layer_norm_backward.default, (torch.randn_like(x), x, mean, rstd, w, [True] * 3))


def test_bad_arguments_raise_like_aten():
    x = torch.randn(2, 5)
    for fn in (lambda: aten.native_layer_norm(x, [5], torch.randn(4), None, EPS),
               lambda: ops.layer_norm(x, torch.randn(4), None, EPS)):
        with pytest.raises(RuntimeError, match="Expected weight to be of same shape as normalized_shape"):
            fn()
    with pytest.raises(RuntimeError, match="bias dtype torch.float16 must match|float32 or the input's dtype"):
        ops.layer_norm(x.half(), None, torch.randn(5, dtype=torch.bfloat16), EPS)
    with pytest.raises(RuntimeError, match="grad_out of size"):
        ops.layer_norm_backward(torch.randn(2, 4), x, torch.ones(2, 1), torch.ones(2, 1), None, [True] * 3)
    with pytest.raises(RuntimeError, match="mean must be of shape"):
        ops.layer_norm_backward(x, x, torch.ones(2), torch.ones(2, 1), None, [True] * 3)
