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
