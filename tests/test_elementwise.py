"""tritonkit::relu, tritonkit::relu_backward, tritonkit::bias_grad, tritonkit::add_relu and
tritonkit::activation(_backward) against eager PyTorch.

ReLU is exact, so it is compared bit for bit (NaN included); bias_grad is a float32-accumulated sum
compared with eager's float32 sum of the same values at the gradient tolerance. Outputs are
NaN-poisoned before every launch (tests/conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tritonkit.ops.elementwise  # noqa: F401  (registers the ops)
from tritonkit.kernels import elementwise as kernels
from tritonkit.runtime import default_device
from tritonkit.testing import assert_close

ops = torch.ops.tritonkit
aten = torch.ops.aten
DEVICE = default_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced", "permuted", "expanded"]


def random_values(*shape, specials=False):
    """Standard normal values; with ``specials`` a tenth each of NaN, +inf, -inf and exact zeros."""
    x = torch.randn(shape)
    if specials and x.numel():
        flat = x.view(-1)
        for value in [float("nan"), float("inf"), float("-inf"), 0.0]:
            flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 10),))] = value
    return x


def make(shape, layout="contiguous", dtype=torch.float32, specials=False):
    """Random values of logical 4-D ``shape`` in a memory layout (values drawn before the view is taken)."""
    n, c, h, w = shape

    def values(*s):
        return random_values(*s, specials=specials)

    if layout == "contiguous":
        x = values(n, c, h, w)
    elif layout == "channels_last":
        x = values(n, c, h, w).contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # not dense: every other channel, one row cut off
        x = values(n, 2 * c, h + 1, w)[:, ::2, 1:]
    elif layout == "permuted":  # dense, in an unusual order
        x = values(w, c, n, h).permute(2, 1, 3, 0)
    elif layout == "expanded":  # overlapping: the same values for every batch entry
        x = values(1, c, h, w).expand(n, c, h, w)
    else:
        raise ValueError(layout)
    return x.to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------- relu


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu(layout, dtype):
    x = make((2, 3, 7, 9), layout, dtype, specials=True)
    y = ops.relu(x)
    ref = torch.relu(x.cpu())
    assert torch.equal(y.cpu().isnan(), ref.isnan())
    assert_close(y.cpu(), ref)
    assert y.stride() == ref.stride() or layout in ("sliced", "expanded"), (y.stride(), ref.stride())
    assert y.stride() == torch.empty_like(x).stride()  # what the fake impl promises


@pytest.mark.parametrize("shape", [(0,), (1,), (1000,), (3, 5, 7), (2**20 + 3,)], ids=str)
def test_relu_sizes(shape):
    """Empty, tiny, off-block and bigger-than-one-interpreter-block sizes (tail masking)."""
    x = torch.randn(shape).to(DEVICE)
    assert torch.equal(ops.relu(x).cpu(), torch.relu(x.cpu()))


@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                     ("contiguous", "channels_last"), ("sliced", "permuted"),
                                     ("expanded", "sliced")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward(layouts, dtype):
    grad = make((2, 3, 7, 9), layouts[0], dtype, specials=True)
    output = make((2, 3, 7, 9), layouts[1], dtype, specials=True).clamp_min(0)  # keeps NaN, layout
    result = ops.relu_backward(grad, output)
    ref = aten.threshold_backward(grad.cpu(), output.cpu(), 0)
    assert torch.equal(result.cpu().isnan(), ref.isnan())
    assert_close(result.cpu(), ref)
    assert result.stride() == torch.empty_like(grad).stride()


def test_relu_backward_sizes():
    for shape in [(0, 4), (5,), (2**20 + 5,)]:
        grad, output = torch.randn(shape).to(DEVICE), torch.randn(shape).relu().to(DEVICE)
        ref = aten.threshold_backward(grad.cpu(), output.cpu(), 0)
        assert torch.equal(ops.relu_backward(grad, output).cpu(), ref)


# ----------------------------------------------------------------------------------- bias_grad


def eager_bias_grad(grad, relu_output, dim):
    g = grad.cpu().float()
    if relu_output is not None:
        g = aten.threshold_backward(g, relu_output.cpu().float(), 0)
    dims = [d for d in range(g.dim()) if d != dim % g.dim()]
    return (g.sum(dims) if dims else g).to(grad.dtype)


def check_bias_grad(grad, relu_output, dim):
    result = ops.bias_grad(grad, relu_output, dim)
    assert_close(result.cpu(), eager_bias_grad(grad, relu_output, dim), grad=True)
    return result


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_bias_grad_conv(layout, dtype, masked):
    """Conv bias: NCHW-like 4-D gradients, channel dim 1, in every layout (the relu output in another)."""
    grad = make((3, 5, 7, 9), layout, dtype)
    relu_output = make((3, 5, 7, 9), "channels_last" if layout != "channels_last" else "sliced", dtype).relu()
    check_bias_grad(grad, relu_output if masked else None, 1)


@pytest.mark.parametrize("shape", [(37, 11), (4, 9, 13), (1, 1), (300, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_bias_grad_linear(shape, dtype, masked):
    """Linear bias: (*, N) gradients, dim -1; also a transposed (column-major) gradient."""
    grad = torch.randn(shape, dtype=dtype).to(DEVICE)
    relu_output = torch.randn(shape, dtype=dtype).relu().to(DEVICE) if masked else None
    check_bias_grad(grad, relu_output, -1)
    check_bias_grad(torch.randn(shape[::-1], dtype=dtype).to(DEVICE).transpose(0, -1), relu_output, -1)


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_bias_grad_any_dim(dim):
    check_bias_grad(make((3, 4, 5, 6), "sliced"), make((3, 4, 5, 6)).relu(), dim)


def test_bias_grad_fragmented_layout():
    """Five dims that coalesce into more than three groups (read through a contiguous copy)."""
    grad = torch.randn(3, 4, 5, 6, 7)[:, ::2, :, 1:, ::2].permute(0, 3, 1, 4, 2).to(DEVICE)
    check_bias_grad(grad, None, 2)
    check_bias_grad(grad, torch.randn(grad.shape).relu().to(DEVICE), 2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bias_grad_nan_and_masking(layout):
    """As threshold_backward: NaN gradients are zeroed where relu_output <= 0, a NaN relu_output
    lets its gradient through. Both are set up so that the expected sums stay finite."""
    relu_output = make((2, 6, 5, 5), layout).relu()
    grad = make((2, 6, 5, 5), "channels_last" if layout == "contiguous" else "contiguous")
    dead = (relu_output == 0) & (torch.rand(grad.shape, device=DEVICE) < 0.5)
    grad = torch.where(dead, float("nan"), grad)
    alive_nan = ~dead & (torch.rand(grad.shape, device=DEVICE) < 0.2)
    relu_output = torch.where(alive_nan, float("nan"), relu_output)
    result = check_bias_grad(grad, relu_output, 1)
    assert result.isfinite().all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_bias_grad_specials():
    """NaN and infinities in both inputs propagate like eager's sum (NaN where eager has NaN)."""
    grad = make((2, 6, 5, 5), specials=True)
    relu_output = make((2, 6, 5, 5), "channels_last", specials=True).clamp_min(0)
    check_bias_grad(grad, relu_output, 1)


def test_bias_grad_many_channels_and_rows():
    """More channels and rows than one interpreter tile: several channel blocks, row-tile loop, tails."""
    check_bias_grad(torch.randn(1100, 1500).to(DEVICE), None, -1)
    check_bias_grad(make((2, 1500, 3, 3), "channels_last"), make((2, 1500, 3, 3)).relu(), 1)


@pytest.mark.parametrize("split", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_grad_split(split, dtype):
    """Split reductions (float32 partials + a fixed-order second pass), including splits with no rows."""
    grad = make((3, 5, 4, 6), "contiguous", dtype)
    relu_output = make((3, 5, 4, 6), "channels_last", dtype).relu()
    result = kernels.bias_grad(grad, relu_output, 1, split=split)
    assert_close(result.cpu(), eager_bias_grad(grad, relu_output, 1), grad=True)
    assert torch.equal(result, kernels.bias_grad(grad, relu_output, 1, split=split))  # deterministic


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bias_grad_empty(layout):
    grad = make((0, 4, 3, 3), layout)
    assert torch.equal(ops.bias_grad(grad, None, 1).cpu(), torch.zeros(4))
    assert ops.bias_grad(make((2, 0, 3, 3), layout), None, 1).shape == (0,)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    data=st.data(),
    masked=st.booleans(),
    dtype=st.sampled_from(DTYPES),
)
def test_bias_grad_fuzz(shape, data, masked, dtype):
    """Random ranks, sizes, dims, dim permutations and slicing."""
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    perm = data.draw(st.permutations(range(len(shape))))
    step = data.draw(st.integers(1, 2))
    base = torch.randn([s * step for s in shape], dtype=dtype)
    grad = base[(slice(None, None, step),) * len(shape)].permute(*perm).to(DEVICE)
    relu_output = torch.randn(grad.shape, dtype=dtype).relu().to(DEVICE) if masked else None
    check_bias_grad(grad, relu_output, dim)


# ------------------------------------------------------------------------------------ add_relu


@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                     ("contiguous", "channels_last"), ("channels_last", "contiguous"),
                                     ("sliced", "permuted"), ("expanded", "channels_last")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf + -inf
def test_add_relu(layouts, dtype):
    """relu(a + b) as eager computes it (NaN and infinities included), laid out as eager's torch.add."""
    a = make((2, 3, 7, 9), layouts[0], dtype, specials=True)
    b = make((2, 3, 7, 9), layouts[1], dtype, specials=True)
    y = ops.add_relu(a, b)
    ref = torch.relu(a.cpu().float() + b.cpu().float()).to(dtype)
    assert torch.equal(y.cpu().isnan(), ref.isnan())
    assert_close(y.cpu(), ref)
    assert y.stride() == torch.add(a.cpu(), b.cpu()).stride(), (y.stride(), torch.add(a.cpu(), b.cpu()).stride())


@pytest.mark.parametrize("shape", [(0, 3), (1,), (1000,), (3, 1, 7), (2**20 + 3,)], ids=str)
def test_add_relu_sizes(shape):
    """Empty, tiny, off-block and bigger-than-one-interpreter-block sizes; size-1 dims' strides as eager."""
    a, b = torch.randn(shape).to(DEVICE), torch.randn(shape).to(DEVICE)
    y = ops.add_relu(a, b)
    assert torch.equal(y.cpu(), torch.relu(a.cpu() + b.cpu()))
    assert y.stride() == torch.add(a, b).stride()


def test_add_relu_output_strides():
    """Where eager's torch.add does not simply copy the first operand's strides."""
    cases = [
        (torch.randn(3, 7).as_strided((3, 1, 7), (7, 100, 1)), torch.randn(3, 1, 7)),  # odd size-1 stride
        (torch.randn(2, 3, 1, 5).expand(2, 3, 4, 5),  # a broadcast dim: the other operand's order decides it
         torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)),
    ]
    for a, b in cases:
        a, b = a.to(DEVICE), b.to(DEVICE)
        y = ops.add_relu(a, b)
        assert y.stride() == torch.add(a, b).stride() != torch.empty_like(a).stride()
        assert torch.equal(y.cpu(), torch.relu(a.cpu() + b.cpu()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_relu_backward_is_relu_backward(dtype):
    """The gradient of both operands is relu_backward(g, add_relu(a, b)): no kernel of its own."""
    a = make((2, 5, 6, 7), "channels_last", dtype).requires_grad_()
    b = make((2, 5, 6, 7), "channels_last", dtype).requires_grad_()
    grad = make((2, 5, 6, 7), "channels_last", dtype)
    a32, b32 = (t.detach().cpu().float().requires_grad_() for t in (a, b))
    torch.relu(a32 + b32).backward(grad.cpu().float())
    dx = ops.relu_backward(grad, ops.add_relu(a.detach(), b.detach()))
    assert_close(dx.cpu(), a32.grad.to(dtype), grad=True)
    assert_close(dx.cpu(), b32.grad.to(dtype), grad=True)


def test_add_relu_bad_arguments():
    a = make((2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="b shape"):
        ops.add_relu(a, make((2, 3, 4, 4)))
    with pytest.raises(RuntimeError, match="b dtype"):
        ops.add_relu(a, make((2, 3, 4, 5), dtype=torch.float16))
    with pytest.raises(RuntimeError, match="a must be float32"):
        ops.add_relu(a.long(), a.long())
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake, pytest.raises(RuntimeError, match="b shape"):  # the fake impl checks too
        ops.add_relu(fake.from_tensor(a), fake.from_tensor(make((2, 3, 4, 4))))


# ------------------------------------------------------------------------------- opcheck, errors


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_opcheck(layout):
    x = make((2, 3, 5, 4), layout)
    torch.library.opcheck(ops.relu, (x,))
    torch.library.opcheck(ops.relu_backward, (make((2, 3, 5, 4)), x.relu()))
    torch.library.opcheck(ops.bias_grad, (x, make((2, 3, 5, 4)).relu(), 1))
    torch.library.opcheck(ops.bias_grad, (x, None, -1))
    torch.library.opcheck(ops.add_relu, (x, make((2, 3, 5, 4), "channels_last")))


def test_relu_refuses_integer_input():
    with pytest.raises(RuntimeError, match="input must be float32"):
        ops.relu(torch.ones(3, dtype=torch.int32, device=DEVICE))


def test_relu_backward_shape_mismatch():
    grad, output = make((2, 3, 4, 5)), make((2, 3, 4, 4))
    with pytest.raises(RuntimeError):
        aten.threshold_backward(grad.cpu(), output.cpu(), 0)
    with pytest.raises(RuntimeError, match="output shape"):
        ops.relu_backward(grad, output)


def test_relu_backward_dtype_mismatch():
    with pytest.raises(RuntimeError, match="output dtype"):
        ops.relu_backward(make((2, 3, 4, 5)), make((2, 3, 4, 5), dtype=torch.float16))


def test_bias_grad_dim_out_of_range():
    grad = make((2, 3, 4, 5))
    for dim in (4, -5):
        with pytest.raises(IndexError):
            grad.cpu().sum(dim)
        with pytest.raises(IndexError, match="dim"):
            ops.bias_grad(grad, None, dim)
    with pytest.raises(IndexError, match="dim"):
        ops.bias_grad(torch.tensor(1.0, device=DEVICE), None, 0)


def test_bias_grad_relu_output_mismatch():
    grad = make((2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="relu_output shape"):
        ops.bias_grad(grad, make((2, 3, 4, 4)), 1)
    with pytest.raises(RuntimeError, match="relu_output dtype"):
        ops.bias_grad(grad, make((2, 3, 4, 5), dtype=torch.bfloat16), 1)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake, pytest.raises(RuntimeError, match="relu_output shape"):  # the fake impl checks too
        ops.bias_grad(fake.from_tensor(grad), fake.from_tensor(make((2, 3, 4, 4))), 1)


# --------------------------------------------------------------------------------- activations
# Compared with eager's float32 kernels on the same (rounded) inputs; NaN positions must agree exactly.
# The interpreter's numpy warns on the NaN and infinities these tests feed on purpose.
SPECIALS = pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:overflow encountered")
BOUNDS = (-0.5, 2.0)  # hardtanh's, off the defaults
EAGER_ACTIVATIONS = {  # kind -> (forward, backward(grad, saved)), saved as tritonkit::activation_backward takes it
    "hardtanh": (lambda x: F.hardtanh(x, *BOUNDS), lambda g, x: aten.hardtanh_backward(g, x, *BOUNDS)),
    "hardswish": (F.hardswish, aten.hardswish_backward),
    "hardsigmoid": (F.hardsigmoid, aten.hardsigmoid_backward),
    "silu": (F.silu, aten.silu_backward),
    "sigmoid": (torch.sigmoid, aten.sigmoid_backward),
    "gelu": (F.gelu, aten.gelu_backward),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda g, x: aten.gelu_backward(g, x, approximate="tanh")),
}
KINDS = list(EAGER_ACTIVATIONS)
KINKS = [-3.0, 3.0, 0.0, -0.0, *BOUNDS, 6.0, -6.0]


def act_input(kind, layout="contiguous", dtype=torch.float32, shape=(2, 3, 7, 9)):
    """Values over [-12, 12] (every piece of the piecewise activations), the kinks, NaN and infinities
    (not +inf for gelu, where eager's float32 CPU kernel gives NaN and its float16 one inf)."""
    x = make(shape, layout, torch.float32) * 4
    if layout != "expanded":  # the first elements in logical order, whatever the layout
        specials = KINKS + [float("nan"), float("-inf")] + ([] if kind == "gelu" else [float("inf")])
        x[torch.unravel_index(torch.arange(len(specials)), shape)] = torch.tensor(specials)
    return x.to(dtype)


def eager_flat(fn, *tensors):
    """Eager ``fn`` in float32 on flat copies padded to a multiple of 64 elements: every element then
    takes eager's vectorized CPU path (its scalar tail gives some NaN inputs other gradients)."""
    shape, n = tensors[0].shape, tensors[0].numel()
    flat = [F.pad(t.detach().cpu().float().reshape(-1), (0, (-n) % 64)) for t in tensors]
    return fn(*flat)[:n].reshape(shape)


def args_of(kind):
    return (kind, *BOUNDS) if kind == "hardtanh" else (kind,)


def check_same(result, expected):
    assert torch.equal(result.cpu().isnan(), expected.isnan()), "NaN positions differ"
    assert_close(result.cpu(), expected)


@SPECIALS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_activation(kind, dtype):
    x = act_input(kind, "channels_last", dtype)
    y = ops.activation(x, *args_of(kind))
    check_same(y, eager_flat(EAGER_ACTIVATIONS[kind][0], x).to(dtype))
    assert y.stride() == x.stride()


@SPECIALS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_activation_backward(kind, dtype):
    forward, backward = EAGER_ACTIVATIONS[kind]
    x = act_input(kind, "contiguous", dtype)
    saved = forward(x.float()).to(dtype) if kind == "sigmoid" else x
    grad = make(x.shape, "channels_last", dtype)
    dx = ops.activation_backward(grad, saved, *args_of(kind))
    check_same(dx, eager_flat(backward, grad, saved).to(dtype))
    assert dx.stride() == grad.stride()


@SPECIALS
@pytest.mark.parametrize("layouts", [("sliced", "permuted"), ("expanded", "channels_last"), ("permuted", "sliced")])
@pytest.mark.parametrize("kind", ["hardswish", "gelu"])
def test_activation_layouts(kind, layouts):
    """Non-dense inputs are read through a dense copy; a saved tensor in another layout is copied."""
    x = act_input(kind, layouts[0])
    forward, backward = EAGER_ACTIVATIONS[kind]
    y = ops.activation(x, kind)
    check_same(y, eager_flat(forward, x))
    assert y.stride() == torch.empty_like(x).stride()
    grad = make(x.shape, layouts[1])
    dx = ops.activation_backward(grad, x, kind)
    check_same(dx, eager_flat(backward, grad, x))
    assert dx.stride() == torch.empty_like(grad).stride()


KINK_GRADIENTS = {  # gradient / g at each of KINKS, as aten computes it
    "hardtanh": [0, 0, 1, 1, 0, 0, 0, 0],  # 0 at min_val = -0.5 and max_val = 2 themselves
    "hardswish": [0, 1, 0.5, 0.5, 1 / 3, 7 / 6, 1, 0],  # 0 at -3, g at 3
    "hardsigmoid": [0, 0, 1 / 6, 1 / 6, 1 / 6, 1 / 6, 0, 0],  # 0 at -3 and 3
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(KINK_GRADIENTS))
def test_activation_gradient_at_kinks(kind, dtype):
    x = torch.tensor(KINKS, dtype=dtype, device=DEVICE)
    grad = torch.full_like(x, 3.0)
    dx = ops.activation_backward(grad, x, *args_of(kind)).cpu()
    expected = torch.tensor(KINK_GRADIENTS[kind]) * 3.0
    assert_close(dx, expected.to(dtype))
    assert_close(dx, eager_flat(EAGER_ACTIVATIONS[kind][1], grad, x).to(dtype))


@pytest.mark.parametrize("shape", [(0,), (1,), (1000,), (2**20 + 3,)], ids=str)
def test_activation_sizes(shape):
    """Empty, tiny, off-block and bigger-than-one-interpreter-block sizes (tail masking)."""
    x, grad = (torch.randn(shape).to(DEVICE) * 4 for _ in range(2))
    assert_close(ops.activation(x, "hardswish").cpu(), F.hardswish(x.cpu()))
    assert_close(ops.activation_backward(grad, x, "hardswish").cpu(), eager_flat(aten.hardswish_backward, grad, x))


@SPECIALS
def test_activation_opcheck():
    x = make((2, 3, 5, 4), "channels_last") * 4
    for kind in ["hardtanh", "sigmoid", "gelu_tanh"]:  # bounds, output-saved, a transcendental
        torch.library.opcheck(ops.activation, (x, *args_of(kind)))
        torch.library.opcheck(ops.activation_backward, (make((2, 3, 5, 4)), x, *args_of(kind)))


def test_activation_bad_arguments():
    x = make((2, 3, 4, 5))
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.activation(x, "relu")
    with pytest.raises(ValueError):
        F.hardtanh(x.cpu(), 2.0, 1.0)
    with pytest.raises(ValueError, match="min_val cannot be greater than max_val"):
        ops.activation(x, "hardtanh", 2.0, 1.0)
    with pytest.raises(RuntimeError, match="input must be float32"):
        ops.activation(x.long(), "silu")
    with pytest.raises(RuntimeError):
        aten.silu_backward(x.cpu(), make((2, 3, 4, 4)).cpu())
    with pytest.raises(RuntimeError, match="saved shape"):
        ops.activation_backward(x, make((2, 3, 4, 4)), "silu")
    with pytest.raises(RuntimeError, match="saved dtype"):
        ops.activation_backward(x, x.half(), "gelu")
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake, pytest.raises(ValueError, match="kind must be one of"):  # the fake impls check too
        ops.activation(fake.from_tensor(x), "swish")
    with fake, pytest.raises(RuntimeError, match="saved shape"):
        ops.activation_backward(fake.from_tensor(x), fake.from_tensor(make((2, 3, 4, 4))), "sigmoid")


# ------------------------------------------------------------------------------- channel_scale
@pytest.mark.parametrize("layouts", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                     ("channels_last", "contiguous"), ("sliced", "permuted")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_scale(layouts, dtype):
    """x * s for s [N, C, 1, 1] and its backward (g * s, sum over H, W of g * x) against eager in float32."""
    x, grad = make((3, 5, 7, 6), layouts[0], dtype, specials=True), make((3, 5, 7, 6), layouts[1], dtype)
    s = make((3, 5, 1, 1), "contiguous", dtype).sigmoid()
    y = ops.channel_scale(x, s)
    ref = (x.cpu().float() * s.cpu().float()).to(dtype)
    check_same(y, ref)
    assert y.stride() == torch.empty_like(x).stride()
    x = make((3, 5, 7, 6), layouts[0], dtype)  # finite values: eager's sums of them are finite too
    dx, ds = ops.channel_scale_backward(grad, x, s)
    assert_close(dx.cpu(), (grad.cpu().float() * s.cpu().float()).to(dtype))
    assert_close(ds.cpu(), (grad.cpu().float() * x.cpu().float()).sum((2, 3), keepdim=True).to(dtype), grad=True)
    assert dx.stride() == torch.empty_like(grad).stride() and ds.is_contiguous()


def test_channel_scale_sizes_and_opcheck():
    for shape in [(2, 3, 0, 4), (0, 3, 2, 2), (1, 1, 1, 1), (2, 600, 1, 1), (1, 2, 300, 301)]:
        x, grad = torch.randn(shape).to(DEVICE), torch.randn(shape).to(DEVICE)
        s = torch.randn(shape[0], shape[1], 1, 1).to(DEVICE)
        assert_close(ops.channel_scale(x, s).cpu(), (x * s).cpu())
        dx, ds = ops.channel_scale_backward(grad, x, s)
        assert_close(dx.cpu(), (grad * s).cpu())
        assert_close(ds.cpu(), (grad * x).sum((2, 3), keepdim=True).cpu(), grad=True)
    x, s = make((2, 3, 4, 5), "channels_last"), make((2, 3, 1, 1))
    torch.library.opcheck(ops.channel_scale, (x, s))
    torch.library.opcheck(ops.channel_scale_backward, (make((2, 3, 4, 5)), x, s))


def test_channel_scale_bad_arguments():
    x = make((2, 3, 4, 5))
    with pytest.raises(RuntimeError, match=r"scale shape \(2, 3, 4, 5\) must be \(2, 3, 1, 1\)"):
        ops.channel_scale(x, x)
    with pytest.raises(RuntimeError, match="expected a 4-D input"):
        ops.channel_scale(x[0], make((2, 3, 1, 1)))
    with pytest.raises(RuntimeError, match="scale dtype"):
        ops.channel_scale(x, make((2, 3, 1, 1), dtype=torch.float16))
    with pytest.raises(RuntimeError, match="grad_output shape"):
        ops.channel_scale_backward(make((2, 3, 4, 4)), x, make((2, 3, 1, 1)))
