"""tritonkit::cross_entropy and tritonkit::cross_entropy_backward against eager F.cross_entropy.

References are eager in float32 on the same (already rounded) logits and weights, with autograd for the
gradient; half-precision results are compared at their dtype's tolerance. Outputs are NaN-poisoned
before every launch (tests/conftest.py), so rows or classes a kernel skips fail.
"""

import pytest
import torch
import torch.nn.functional as F

import tritonkit.ops.loss  # noqa: F401  (registers the ops)
from tritonkit.runtime import default_device
from tritonkit.testing import assert_close

ops = torch.ops.tritonkit
aten = torch.ops.aten
DEVICE = default_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}
IGNORE = -100


def make(N, C, dtype=torch.float32, weighted=False, ignore_index=IGNORE, ignored=0.2, scale=2.0):
    """Random logits (N, C), int64 targets with a fraction ``ignored`` set to ``ignore_index``, weights."""
    logits = (torch.randn(N, C) * scale).to(dtype)
    target = torch.randint(0, C, (N,))
    target[torch.rand(N) < ignored] = ignore_index
    weight = (torch.rand(C) + 0.1).to(dtype) if weighted else None
    return logits.to(DEVICE), target.to(DEVICE), weight.to(DEVICE) if weighted else None


def eager(logits, target, weight, reduction, ignore_index, eps, grad_output=None):
    """Eager loss (float32 math, cast to logits' dtype) and, given grad_output, the logits' gradient."""
    x = logits.detach().cpu().float().requires_grad_()
    w = weight.cpu().float() if weight is not None else None
    loss = F.cross_entropy(x, target.cpu(), weight=w, reduction=REDUCTIONS[reduction], ignore_index=ignore_index,
                           label_smoothing=eps)
    if grad_output is None:
        return loss.detach().to(logits.dtype), None
    loss.backward(grad_output.cpu().float())
    return loss.detach().to(logits.dtype), x.grad.to(logits.dtype)


def upstream(reduction, N, dtype):
    """A fresh random upstream gradient of the loss's shape."""
    return torch.randn((N,) if reduction == 0 else (), dtype=dtype).to(DEVICE)


def check(logits, target, weight, reduction, eps, ignore_index=IGNORE):
    """Forward and (with the saved lse) backward against eager; returns the op's outputs."""
    N = logits.shape[0]
    loss, lse, total_weight, grad, log_probs = ops.cross_entropy(logits, target, weight, reduction, ignore_index, eps,
                                                                 False)
    go = upstream(reduction, N, logits.dtype)
    ref_loss, ref_grad = eager(logits, target, weight, reduction, ignore_index, eps, go)
    assert_close(loss.cpu(), ref_loss, msg="loss")
    assert grad.shape == (0,) and log_probs.shape == (0,)
    assert lse.dtype == torch.float32 and lse.shape == (N,)
    assert_close(lse.cpu(), torch.logsumexp(logits.cpu().float(), 1), msg="lse")
    dx = ops.cross_entropy_backward(go, logits, target, weight, lse, total_weight, reduction, ignore_index, eps)
    assert_close(dx.cpu(), ref_grad, grad=True, msg="grad")
    assert dx.is_contiguous()
    return loss, lse, total_weight, dx


@pytest.mark.parametrize("smoothing", [0.0, 0.15], ids=["plain", "smoothed"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=REDUCTIONS.values())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy(dtype, reduction, weighted, smoothing):
    """Every reduction, with and without class weights and label smoothing, ignored rows present."""
    logits, target, weight = make(37, 13, dtype, weighted)
    assert (target == IGNORE).any() and (target != IGNORE).any()
    _, _, total_weight, _ = check(logits, target, weight, reduction, smoothing)
    kept = target != IGNORE
    expected = weight.float()[target[kept]].sum() if weighted else kept.sum().float()
    assert_close(total_weight.cpu(), expected, msg="total_weight")


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_gradient_in_forward(reduction, weighted, smoothing):
    """compute_grad: the forward's gradient (upstream 1) equals eager's, and the loss is unchanged."""
    dtype = torch.bfloat16 if weighted and smoothing else torch.float32
    logits, target, weight = make(41, 300, dtype, weighted)
    loss, _, _, grad, _ = ops.cross_entropy(logits, target, weight, reduction, IGNORE, smoothing, True)
    ones = torch.ones((41,) if reduction == 0 else (), dtype=dtype, device=DEVICE)
    ref_loss, ref_grad = eager(logits, target, weight, reduction, IGNORE, smoothing, ones)
    assert_close(loss.cpu(), ref_loss)
    assert grad.shape == logits.shape and grad.is_contiguous()
    assert_close(grad.cpu(), ref_grad, grad=True)
    plain = ops.cross_entropy(logits, target, weight, reduction, IGNORE, smoothing, False)[0]
    assert torch.equal(loss, plain)


@pytest.mark.parametrize("weighted, smoothing", [(False, 0.0), (True, 0.0), (True, 0.2)])
@pytest.mark.parametrize("reduction", [0, 1])
def test_backward_from_saved_log_softmax(reduction, weighted, smoothing):
    """What the compile backend substitutes for nll_loss_backward + _log_softmax_backward_data: the
    backward graph's saved _log_softmax and nll_loss_forward's total_weight, lse recomputed."""
    logits, target, weight = make(29, 70, torch.float32, weighted)
    log_probs = aten._log_softmax(logits, 1, False)
    _, total_weight = aten.nll_loss_forward(log_probs, target, weight, reduction, IGNORE)
    go = upstream(reduction, 29, logits.dtype)
    _, ref_grad = eager(logits, target, weight, reduction, IGNORE, smoothing, go)
    dx = ops.cross_entropy_backward(go, log_probs, target, weight, None, total_weight, reduction, IGNORE, smoothing)
    assert_close(dx.cpu(), ref_grad, grad=True)
    if reduction == 1:  # and from the raw logits without lse: the kernel computes lse itself
        dx = ops.cross_entropy_backward(go, logits, target, weight, None, total_weight, reduction, IGNORE, smoothing)
        assert_close(dx.cpu(), ref_grad, grad=True)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=REDUCTIONS.values())
@pytest.mark.parametrize("N, C", [(37, 300), (5, 5000)], ids=str)  # one class chunk; two, the second partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_log_probs_in_forward(dtype, N, C, reduction, weighted):
    """write_log_probs: the launch that makes the loss also writes log_softmax(logits) (eager's, rounded
    once to the logits' dtype); loss, lse and total_weight are bitwise those of the launch without it, and
    the backward from the written log-probabilities (the training graph's pair) is eager's gradient."""
    logits, target, weight = make(N, C, dtype, weighted)
    loss, lse, total_weight, grad, log_probs = ops.cross_entropy(logits, target, weight, reduction, IGNORE, 0.0,
                                                                 False, True)
    assert grad.shape == (0,)
    assert log_probs.shape == (N, C) and log_probs.dtype == dtype and log_probs.is_contiguous()
    assert_close(log_probs.cpu(), F.log_softmax(logits.cpu().float(), 1).to(dtype), msg="log_probs")
    plain = ops.cross_entropy(logits, target, weight, reduction, IGNORE, 0.0, False)
    for name, got, expected in zip(("loss", "lse", "total_weight"), (loss, lse, total_weight), plain):
        assert torch.equal(got, expected), name
    go = upstream(reduction, N, dtype)
    ref_loss, ref_grad = eager(logits, target, weight, reduction, IGNORE, 0.0, go)
    assert_close(loss.cpu(), ref_loss, msg="loss")
    dx = ops.cross_entropy_backward(go, log_probs, target, weight, None, total_weight, reduction, IGNORE, 0.0)
    assert_close(dx.cpu(), ref_grad, grad=True, msg="grad")


@pytest.mark.parametrize("reduction", [0, 1], ids=["none", "mean"])
def test_log_probs_and_gradient_in_one_pass(reduction):
    """compute_grad and write_log_probs together (one second pass over C writes both), with weights, label
    smoothing and ignored rows, in bfloat16."""
    logits, target, weight = make(23, 130, torch.bfloat16, weighted=True)
    loss, _, _, grad, log_probs = ops.cross_entropy(logits, target, weight, reduction, IGNORE, 0.2, True, True)
    ones = torch.ones((23,) if reduction == 0 else (), dtype=logits.dtype, device=DEVICE)
    ref_loss, ref_grad = eager(logits, target, weight, reduction, IGNORE, 0.2, ones)
    assert_close(loss.cpu(), ref_loss)
    assert_close(grad.cpu(), ref_grad, grad=True)
    assert_close(log_probs.cpu(), F.log_softmax(logits.cpu().float(), 1).to(logits.dtype))


@pytest.mark.parametrize("N, C", [(1, 1), (5, 2), (70, 10), (1500, 7), (33, 1000), (3, 50_001)], ids=str)
def test_class_counts(N, C):
    """C from 1 to a vocabulary (several C chunks with a tail), row counts off every block size."""
    logits, target, weight = make(N, C, torch.float32, weighted=True, ignored=0.1)
    check(logits, target, weight, 1, 0.1)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_logits(layout):
    """Logits read in place with their strides: column-major, or every other class of a wider tensor (the
    log-probabilities are written contiguous)."""
    base = torch.randn(300, 21) if layout == "transposed" else torch.randn(21, 600)
    logits = (base.t() if layout == "transposed" else base[:, ::2]).to(DEVICE)
    target = torch.randint(0, 300, (21,)).to(DEVICE)
    target[3] = IGNORE
    for reduction in (0, 1):
        check(logits, target, None, reduction, 0.1)
    log_probs = ops.cross_entropy(logits, target, None, 1, IGNORE, 0.0, False, True)[4]
    assert log_probs.is_contiguous()
    assert_close(log_probs.cpu(), F.log_softmax(logits.cpu(), 1))


def test_large_logit_offset():
    """A large common offset (1e5: float32 spacing 0.008 there): the loss keeps max and log-sum apart and
    sums the smoothing term relative to the row's first logit, so nothing cancels; the gradients made
    from the logits alone (in the forward, or recomputing lse) are as exact as eager's, and so are the
    log-probabilities (x - max, then - log sum: no 1e5-sized intermediate)."""
    logits, target, weight = make(17, 2000, torch.float32, weighted=True)
    logits = logits + 1e5
    go = upstream(0, 17, torch.float32)
    ref_loss, ref_grad = eager(logits, target, weight, 0, IGNORE, 0.25, go)
    loss, _, total_weight, grad, log_probs = ops.cross_entropy(logits, target, weight, 0, IGNORE, 0.25, True, True)
    assert_close(loss.cpu(), ref_loss)
    assert_close((grad * go[:, None]).cpu(), ref_grad, grad=True)
    assert_close(log_probs.cpu(), F.log_softmax(logits.cpu(), 1))
    dx = ops.cross_entropy_backward(go, logits, target, weight, None, total_weight, 0, IGNORE, 0.25)
    assert_close(dx.cpu(), ref_grad, grad=True)


def test_masked_classes():
    """-inf logits (masked classes), also a whole first chunk of them: finite loss, zero gradient and -inf
    log-probabilities there."""
    logits, target, _ = make(6, 5000, torch.float32, ignored=0.0)
    logits[:, :4500] = float("-inf")
    logits[2, 4500:4700] = float("-inf")
    target = torch.randint(4700, 5000, (6,)).to(DEVICE)
    loss, _, _, dx = check(logits, target, None, 0, 0.0)
    assert loss.isfinite().all() and (dx[:, :4500] == 0).all()
    log_probs = ops.cross_entropy(logits, target, None, 0, IGNORE, 0.0, False, True)[4]
    assert_close(log_probs.cpu(), F.log_softmax(logits.cpu(), 1))
    assert (log_probs[:, :4500] == float("-inf")).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered", "ignore:divide by zero")  # 0 / 0, as eager
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_every_row_ignored(smoothing):
    """All rows ignored: mean is 0 / 0 = NaN and sum 0, as eager; the gradient is exactly zero."""
    logits, _, weight = make(9, 7, weighted=True)
    target = torch.full((9,), IGNORE, device=DEVICE)
    for reduction in (0, 1, 2):
        loss, _, total_weight, dx = check(logits, target, weight, reduction, smoothing)
        assert total_weight.item() == 0.0
        assert (dx == 0).all()
        if reduction == 1:
            assert loss.isnan()


def test_ignore_index_is_a_class():
    """ignore_index may name a real class: its rows are skipped, including in the smoothing term."""
    logits, target, weight = make(40, 6, weighted=True, ignored=0.0)
    target[::3] = 3
    for reduction in (0, 1):
        check(logits, target, weight, reduction, 0.2, ignore_index=3)


def test_negative_smoothing_means_none():
    logits, target, _ = make(20, 9)
    loss = ops.cross_entropy(logits, target, None, 1, IGNORE, -0.3, False)[0]
    assert_close(loss.cpu(), ops.cross_entropy(logits, target, None, 1, IGNORE, 0.0, False)[0].cpu())
    check(logits, target, None, 1, -0.3)


def test_mean_is_deterministic():
    """The mean is a fixed-order two-stage sum: bitwise the same on every call (no atomics)."""
    logits, target, weight = make(3000, 37, weighted=True)
    first = ops.cross_entropy(logits, target, weight, 1, IGNORE, 0.1, True)
    for _ in range(2):
        again = ops.cross_entropy(logits, target, weight, 1, IGNORE, 0.1, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    assert_close(first[0].cpu(), eager(logits, target, weight, 1, IGNORE, 0.1)[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the mean of no rows: 0 / 0, as eager
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_empty_batch(reduction):
    logits, target, _ = make(0, 5)
    loss, lse, total_weight, grad, log_probs = ops.cross_entropy(logits, target, None, reduction, IGNORE, 0.0, True,
                                                                 True)
    assert_close(loss.cpu(), eager(logits, target, None, reduction, IGNORE, 0.0)[0])  # mean: NaN
    assert lse.shape == (0,) and grad.shape == log_probs.shape == (0, 5) and total_weight.item() == 0
    go = upstream(reduction, 0, torch.float32)
    dx = ops.cross_entropy_backward(go, logits, target, None, lse, total_weight, reduction, IGNORE, 0.0)
    assert dx.shape == (0, 5)


# ------------------------------------------------------------------------------- opcheck, errors


@pytest.mark.parametrize("weighted, reduction, compute_grad, log_probs",
                         [(False, 1, False, False), (True, 0, True, False), (True, 2, False, True),
                          (False, 1, True, True)])
def test_opcheck(weighted, reduction, compute_grad, log_probs):
    logits, target, weight = make(11, 6, weighted=weighted)
    torch.library.opcheck(ops.cross_entropy,
                          (logits, target, weight, reduction, IGNORE, 0.1, compute_grad, log_probs))
    _, lse, total_weight, _, _ = ops.cross_entropy(logits, target, weight, reduction, IGNORE, 0.1, False)
    go = upstream(reduction, 11, torch.float32)
    for saved in (lse, None):
        torch.library.opcheck(ops.cross_entropy_backward,
                              (go, logits, target, weight, saved, total_weight, reduction, IGNORE, 0.1))


@pytest.mark.parametrize("bad", [7, -1])
def test_out_of_range_target(bad):
    """A target outside [0, C) that is not ignore_index: eager's IndexError, before any launch."""
    logits, target, weight = make(5, 7, weighted=True, ignored=0.0)
    target[3] = bad
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        F.cross_entropy(logits.cpu(), target.cpu())
    for w, eps in [(None, 0.0), (weight, 0.1)]:
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
            ops.cross_entropy(logits, target, w, 1, IGNORE, eps, False)
    lse, total_weight = torch.zeros(5, device=DEVICE), torch.ones((), device=DEVICE)
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds."):
        ops.cross_entropy_backward(torch.ones((), device=DEVICE), logits, target, None, lse, total_weight, 1,
                                   IGNORE, 0.0)
    target[3] = IGNORE  # out of range but ignored: fine
    check(logits, target, None, 1, 0.0)


# (what the message must name, exception type, changes to the arguments); eager raises the same type.
BAD_ARGS = [
    ("target dtype", RuntimeError, {"target": lambda t: t.int()}),
    ("target dtype", RuntimeError, {"target": lambda t: t.float()}),
    ("batch_size", ValueError, {"target": lambda t: t[:-1]}),
    ("target", RuntimeError, {"target": lambda t: t[:, None]}),
    ("weight tensor should be defined", RuntimeError, {"weight": lambda w: w[:-1]}),
    ("weight tensor should be defined", RuntimeError, {"weight": lambda w: w[None]}),
    ("weight must be float32", RuntimeError, {"weight": lambda w: w.double()}),
    ("weight dtype", RuntimeError, {"weight": lambda w: w.half()}),
    ("label_smoothing", RuntimeError, {"label_smoothing": lambda e: 1.5}),
    ("reduction", ValueError, {"reduction": lambda r: 3}),
    ("logits must be float32", RuntimeError, {"logits": lambda x: x.long()}),
    ("2-D logits", RuntimeError, {"logits": lambda x: x[None]}),
]


def _args(**changes):
    logits, target, weight = make(6, 5, weighted=True)
    args = {"logits": logits, "target": target, "weight": weight, "reduction": 1, "ignore_index": IGNORE,
            "label_smoothing": 0.1}
    args.update({name: change(args[name]) for name, change in changes.items()})
    return args


@pytest.mark.parametrize("case", BAD_ARGS, ids=lambda c: f"{c[0]}-{list(c[2])[0]}")
def test_bad_arguments(case):
    what, error, changes = case
    a = _args(**changes)
    if "reduction" not in changes and "logits" not in changes:  # eager: string reductions, N-D logits
        with pytest.raises(error):
            F.cross_entropy(a["logits"].cpu(), a["target"].cpu(), weight=a["weight"].cpu(),
                            label_smoothing=a["label_smoothing"])
    args = tuple(a.values())
    with pytest.raises(error, match=what):
        ops.cross_entropy(*args, False)
    fake = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake, pytest.raises(error, match=what):  # the fake impl validates the same way
        ops.cross_entropy(*(fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args), False)
    total_weight = torch.ones((), device=DEVICE)
    with pytest.raises(error, match=what):
        ops.cross_entropy_backward(torch.ones((), device=DEVICE), a["logits"], a["target"], a["weight"], None,
                                   total_weight, *args[3:])


@pytest.mark.parametrize(
    "what, reduction, change",
    [
        ("grad_output of shape", 0, {"go": lambda g: g[:-1]}),
        ("single element grad_output", 1, {"go": lambda g: g.expand(2)}),
        ("grad_output dtype", 1, {"go": lambda g: g.half()}),
        ("lse", 1, {"lse": lambda s: s.double()}),
        ("lse", 1, {"lse": lambda s: s[:-1]}),
        ("total_weight", 1, {"total_weight": lambda t: t.expand(2)}),
        ("total_weight", 1, {"total_weight": lambda t: t.long()}),
    ],
)
def test_backward_bad_arguments(what, reduction, change):
    logits, target, weight = make(6, 5, weighted=True)
    _, lse, total_weight, _, _ = ops.cross_entropy(logits, target, weight, reduction, IGNORE, 0.0, False)
    a = {"go": upstream(reduction, 6, torch.float32), "lse": lse, "total_weight": total_weight}
    a.update({name: fn(a[name]) for name, fn in change.items()})
    with pytest.raises(RuntimeError, match=what):
        ops.cross_entropy_backward(a["go"], logits, target, weight, a["lse"], a["total_weight"], reduction, IGNORE, 0.0)
