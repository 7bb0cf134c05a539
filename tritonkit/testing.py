"""Numerical checks shared by every test: the per-dtype tolerances, in one place, and their reasons.

Each kernel is compared with eager PyTorch evaluated in float32 on the *same* (already rounded)
inputs, so the only differences are (a) summation order inside the kernel and (b) the final rounding
of the output to its dtype.

* float32: tritonkit accumulates in float32 like eager; reductions of K terms reorder sums, giving a
  relative error that grows like sqrt(K) * 2**-24. For the K <= ~5000 in the tests that is < 1e-5;
  1e-4 relative plus 1e-5 absolute leaves a margin of 10 for cancellation. Tests turn TF32 off.
* float16: the output is rounded once to fp16 (half an ulp, 2**-11 ~ 4.9e-4 relative) on top of the
  float32 error above; eager's own fp16 result rounds too, so two roundings apart: 2e-3 relative,
  and 1e-3 absolute for the values near zero where relative error means little.
* bfloat16: the same argument with bf16's 8-bit mantissa (2**-8 ~ 3.9e-3 per rounding): 1.6e-2
  relative, 1e-2 absolute.

Optimizer trajectories compound error over steps; their tests use ``OPTIM_TOLERANCES``. Whole
training runs (20 steps of a float32 network) use ``TRAINING_TOLERANCES``.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
}

# Gradients are sums over the batch and spatial positions of products of two rounded values, so
# they get the same relative bound scaled by the magnitude of the summed terms: an atol that is 10x
# the forward's keeps checks tight without flagging summation-order noise on near-zero sums.
GRAD_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 4e-3, "atol": 1e-2},
    torch.bfloat16: {"rtol": 3e-2, "atol": 1e-1},
}

# Optimizers: float32 updates follow torch's formulas operation by operation, but fused
# multiply-adds and a different evaluation order differ in the last bit per step; over 50 steps
# that stays below 1e-5 relative. Half-precision parameters are updated in float32 and rounded once
# per step, like torch's fused implementations, so they drift by about one ulp per step at most.
# Half-precision optimizer *state* is compared only through the parameters it drives: a momentum
# buffer (about g / (1 - momentum)) reaches magnitudes where one bf16 ulp exceeds these atols, and a
# single rounding flip there moves later updates by lr * ulp / (1 - momentum); the half-precision
# trajectory tests therefore run at a quarter of the float32 tests' learning rate.
OPTIM_TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float16: {"rtol": 1e-2, "atol": 1e-3},
    torch.bfloat16: {"rtol": 5e-2, "atol": 1e-2},
}

# Training: each step's float32 rounding differences (1e-6 relative) feed the next step through the
# weights; over 20 SGD-momentum steps of LeNet they were measured below 1e-5 relative on losses and
# weights. 1e-4 relative keeps a 10x margin while still catching a wrong gradient, which moves the
# loss curve at the 1e-2 level within a few steps.
TRAINING_TOLERANCES: dict[str, float] = {"rtol": 1e-4, "atol": 1e-5}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, grad: bool = False, msg: str = "") -> None:
    """Compare a tritonkit result with eager PyTorch at the tolerance of ``actual``'s dtype.

    NaN in ``actual`` where ``expected`` has none fails, which is how unwritten (poisoned) output
    elements show up.
    """
    table = GRAD_TOLERANCES if grad else TOLERANCES
    tol = table[actual.dtype] if actual.dtype in table else {"rtol": 0.0, "atol": 0.0}
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg} dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{msg}\n{m}", **tol)


def reference_dtype_cast(fn, *tensors: torch.Tensor, **kwargs):
    """Run eager ``fn`` in float32 on half-precision inputs and cast float results back.

    Eager PyTorch has no half-precision conv/matmul on the CPU for every op, and where it has one it
    may accumulate in lower precision; evaluating in float32 on the same rounded inputs is the exact
    answer the kernel must approach.
    """
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if dtypes <= {torch.float32}:
        return fn(*tensors, **kwargs)
    (dtype,) = dtypes
    up = [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]
    out = fn(*up, **kwargs)
    if isinstance(out, tuple):
        return tuple(o.to(dtype) if o.is_floating_point() else o for o in out)
    return out.to(dtype)


def check_against_eager(tk_fn, eager_fn, leaves, views=None, *, backward=True, seed_grad=None):
    """Run ``tk_fn`` and ``eager_fn`` on the same inputs and compare outputs and input gradients.

    ``leaves`` are the tensors that own gradients (any float dtype); ``views[i]`` turns leaf ``i``
    into the argument actually passed (e.g. a strided slice), so layouts that are not dense still
    send their gradient to a leaf. ``eager_fn`` runs in float32 on float32 copies of the same
    (already rounded) values. Returns the tritonkit output.
    """
    views = views or [None] * len(leaves)

    def args(tensors):
        return [v(t) if v is not None else t for t, v in zip(tensors, views)]

    def copy(t, dtype=None):
        if not isinstance(t, torch.Tensor):
            return t
        c = t.detach().to(dtype or t.dtype, memory_format=torch.preserve_format, copy=True)
        return c.requires_grad_(t.requires_grad)

    tk_leaves = [copy(t) for t in leaves]
    ref_leaves = [copy(t, torch.float32) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t in leaves]
    out = tk_fn(*args(tk_leaves))
    ref = eager_fn(*args(ref_leaves))
    assert_close(out, ref.to(out.dtype), msg="forward")
    if not backward or not out.requires_grad:
        return out
    grad = seed_grad if seed_grad is not None else torch.randn(ref.shape, dtype=out.dtype)
    out.backward(grad)
    ref.backward(grad.float())
    for i, (t, r) in enumerate(zip(tk_leaves, ref_leaves)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            assert t.grad is not None, f"input {i} got no gradient"
            assert_close(t.grad, r.grad.to(t.dtype), grad=True, msg=f"gradient of input {i}")
    return out

# Subprocess tests (the CLI, a compiled-mode child, a gloo run) pass or fail on what the child prints
# and returns, never on time: this limit only stops a hung child. The slowest child (a cold AOT gate
# table, ~5 min on a quiet 2-core machine) gets six times that, room for a machine 2-3x slower that is
# also running another job.
HANG_TIMEOUT_S = 1800


# --- BatchNorm ----------------------------------------------------------------------------------------
# Statistics are float32 for every input dtype and are checked against float64 (not against eager's own
# float32 statistics, which are no more exact). The mean comes out within a few float32 ulps of its
# magnitude: shifted Welford keeps the running means small, so the only sizeable rounding is the final
# ``ref + mean'`` (half an ulp); 1e-6 relative to (|mean| + std) is ~16 ulps. The variance is a sum of
# K squared deviations whose float32 rounding grows like sqrt(K) * 2**-24 (K <= ~1e6 in the tests:
# < 2e-5 at worst, measured ~1e-7 at K ~ 200); invstd halves that relative error; 2e-5 relative.
BN_MEAN_RTOL = 1e-6
BN_INVSTD_RTOL = 2e-5


def batch_norm_reference(input, weight=None, bias=None, running_mean=None, running_var=None, *, training=True,
                         momentum=0.1, eps=1e-5, residual=None, relu=False):
    """BatchNorm2d in float64 on the given (already rounded) values: ``(out, mean, invstd, running_mean,
    running_var)``, all float64 (running stats None when not given); ``out = relu?(bn(x) + residual)``."""
    x = input.double()
    dims = (0, 2, 3)
    if training:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        n = x.numel() // x.shape[1]
        new_rm = None if running_mean is None else (1 - momentum) * running_mean.double() + momentum * mean
        new_rv = None if running_var is None else (1 - momentum) * running_var.double() + momentum * var * n / (n - 1)
    else:
        mean, var = running_mean.double(), running_var.double()
        new_rm, new_rv = mean, var
    invstd = 1 / torch.sqrt(var + eps)
    out = (x - mean[:, None, None]) * invstd[:, None, None]
    if weight is not None:
        out = out * weight.double()[:, None, None]
    if bias is not None:
        out = out + bias.double()[:, None, None]
    if residual is not None:
        out = out + residual.double()
    if relu:
        out = out.clamp_min(0)
    return out, mean, invstd, new_rm, new_rv


def assert_batch_norm_stats_close(mean: torch.Tensor, invstd: torch.Tensor, input: torch.Tensor, eps: float,
                                  msg: str = "") -> None:
    """float32 ``mean`` / ``invstd`` against float64 statistics of ``input`` at ``BN_*_RTOL`` (see above)."""
    assert mean.dtype == invstd.dtype == torch.float32, f"{msg} stats must be float32, got {mean.dtype}"
    x = input.double()
    ref_mean, ref_std = x.mean((0, 2, 3)), x.std((0, 2, 3), unbiased=False)
    ref_invstd = 1 / torch.sqrt(x.var((0, 2, 3), unbiased=False) + eps)
    err = (mean.double() - ref_mean).abs()
    bound = BN_MEAN_RTOL * (ref_mean.abs() + ref_std)
    assert bool((err <= bound).all()), f"{msg} mean: error {err.max().item():.3g} > bound {bound.min().item():.3g}"
    torch.testing.assert_close(invstd.double(), ref_invstd, rtol=BN_INVSTD_RTOL, atol=0,
                               msg=lambda m: f"{msg} invstd\n{m}")


def batch_norm_output_atol(mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None) -> float:
    """Absolute error the float32 mean's own rounding puts on a normalised output: the output is
    ``(x - mean32) * invstd * w``, and ``mean32`` may sit up to 2 float32 ulps of ``|mean|`` from the exact
    mean (half an ulp is unavoidable), so large-mean inputs (x ~ 100 + 0.01 * randn: mean ulp 7.6e-6 against
    std 0.01) carry ~1e-3 of it in every output element; eager's float32 path carries at least as much."""
    w = weight.double().abs() if weight is not None else torch.ones_like(mean, dtype=torch.float64)
    return float((2 * 2**-23 * mean.double().abs() * invstd.double() * w).max()) + 1e-5


# --- whole BatchNorm networks ----------------------------------------------------------------------------
# A float32 network with BatchNorm over a small batch is judged against a float64 copy of it: the
# normalisation divides by a batch standard deviation, so rounding in any layer before it is amplified
# (with 2 samples at 1x1 some gradients of float32 eager are off by 100%). Eager float32 and tritonkit
# round at different points (fused epilogues, other summation orders), so their errors are of the same
# size but not equal; measured on the tests' ResNets they stay within 2x of each other. A factor of 4
# leaves room and still catches a wrong kernel, whose error is of order 1, not a multiple of 1e-6.
BN_ERROR_FACTOR = 4.0

# Some tensors of a BatchNorm net are 0 in exact arithmetic: the bias gradient of a BN whose output feeds a
# 1x1 conv and then another training BN (that BN's input gradient sums to 0 per channel, and the conv is
# linear per pixel), or the running mean of a 1x1 conv of a zero-mean block sum. In float32 they are ~1e-8
# of rounding, whose relative error says nothing; they are judged against the unit scale of the
# activations instead, floored here at 1e-3 (a real gradient of a BN net is rarely smaller at its largest).
BN_ZERO_SCALE = 1e-3


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (a NaN anywhere gives inf)."""
    return _scaled_error(actual, expected, 0.0)


def bn_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max(max |expected|, BN_ZERO_SCALE)``: the error measure of whole BatchNorm
    nets (a NaN anywhere gives inf)."""
    return _scaled_error(actual, expected, BN_ZERO_SCALE)


def _scaled_error(actual: torch.Tensor, expected: torch.Tensor, floor: float) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


# --- whole BatchNorm networks, trained and evaluated through the backend ---------------------------------
def train_steps(model, xs, ts, compiled: bool, steps: int = 3, autocast: torch.dtype | None = None) -> torch.Tensor:
    """``steps`` SGD (lr 0.05, momentum 0.9) cross-entropy steps of ``model`` on ``xs``/``ts``, through
    ``torch.compile(backend="tritonkit")`` when ``compiled``, the forward under ``torch.autocast`` to
    ``autocast`` when given; the losses."""
    import contextlib

    import torch.nn.functional as F

    run = torch.compile(model, backend="tritonkit") if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, t in zip(xs[:steps], ts[:steps]):
        opt.zero_grad()
        with torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss = F.cross_entropy(run(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _state(model) -> dict:
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def assert_states_like_eager(ours, eager, ref64) -> None:
    """Every parameter and buffer of ``ours`` within ``BN_ERROR_FACTOR`` of ``eager``'s own ``bn_error``
    against the float64 copy ``ref64``; ``num_batches_tracked`` exactly."""
    want, base, got = _state(ref64), _state(eager), _state(ours)
    assert want.keys() == got.keys()
    for name in want:
        if name.endswith("num_batches_tracked"):
            assert torch.equal(got[name], want[name]), name
            continue
        bound = BN_ERROR_FACTOR * bn_error(base[name], want[name]) + 1e-5
        assert bn_error(got[name], want[name]) <= bound, name


def assert_bn_net_trains_like_eager(model, xs, ts, steps: int = 3, autocast: torch.dtype | None = None) -> None:
    """``model`` trained ``steps`` steps through the backend, eagerly in float32 (both under ``autocast``
    when given) and in float64 from the same weights: its losses, parameters and BatchNorm buffers within
    ``BN_ERROR_FACTOR`` of eager's error."""
    import copy

    ref64, eager, ours = copy.deepcopy(model).double(), copy.deepcopy(model), copy.deepcopy(model)
    losses64 = train_steps(ref64, [x.double() for x in xs], ts, False, steps)
    losses_eager = train_steps(eager, xs, ts, False, steps, autocast)
    losses_ours = train_steps(ours, xs, ts, True, steps, autocast)
    assert relative_error(losses_ours, losses64) <= BN_ERROR_FACTOR * relative_error(losses_eager, losses64) + 1e-5
    assert_states_like_eager(ours, eager, ref64)


def assert_bn_net_infers_like_eager(model, x) -> None:
    """``model`` (in eval mode) through the backend within ``BN_ERROR_FACTOR`` of eager's error against float64."""
    import copy

    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref64(x.double())
        got = torch.compile(model, backend="tritonkit")(x)
        eager = model(x)
    assert relative_error(got, want) <= BN_ERROR_FACTOR * relative_error(eager, want) + 1e-5
