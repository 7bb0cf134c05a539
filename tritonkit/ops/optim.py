"""Fused multi-tensor optimizer updates as custom ops that mutate parameters and state in place.

* ``tritonkit::sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers,
  Tensor coefs, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()``
* ``tritonkit::adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs,
  Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor coefs, Tensor? grad_scale=None,
  Tensor? found_inf=None) -> ()``
* ``tritonkit::rmsprop_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs,
  Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, Tensor coefs, Tensor? grad_scale=None,
  Tensor? found_inf=None) -> ()``
* ``tritonkit::adagrad_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums,
  Tensor coefs, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()``

Each call is one kernel launch over all its tensors, which share one device and one floating dtype;
every gradient and state tensor has its parameter's shape and memory layout, and parameters are dense
(non-overlapping, no gaps: contiguous, channels_last or any permutation). An empty optional state
list switches that buffer off (no momentum, no AMSGrad maximum, not centered). ``coefs`` is a float32
``[len(params), K]`` table of per-tensor hyperparameters whose columns the ``*_COEFS`` tuples name
(defined with the kernels, which read the columns by these names, and re-exported here for the
optimizers): runtime values, so new hyperparameters never recompile anything.

``grad_scale`` / ``found_inf`` are ``torch.amp.GradScaler``'s (float32, one element, on the params'
device): with ``grad_scale`` each gradient is divided by it in the kernel and written back unscaled
(hence ``grads`` is mutable, as in torch's ``_fused_adam_``); ``found_inf`` != 0 makes the launch leave
everything untouched, decided on the device.

``mutates_args`` names the parameter, gradient and state lists, so ``torch.compile`` traces a step through these
ops (functionalizing them) without a graph break. Arguments are checked in the real and the fake impl,
before any launch, raising RuntimeError (as torch's ``_foreach``/fused optimizer ops do) with a message
naming the argument.
"""

from __future__ import annotations

import torch

from tritonkit.kernels import optim as kernels
from tritonkit.kernels.common import FLOAT_DTYPES
from tritonkit.kernels.optim import ADAGRAD_COEFS, ADAM_COEFS, RMSPROP_COEFS, SGD_COEFS
from tritonkit.runtime import default_device


def is_dense(shape, stride) -> bool:
    """True when a tensor with this shape and stride covers one gap-free block of memory exactly once."""
    expected = 1
    for stride_, size in sorted((st, n) for n, st in zip(shape, stride) if n != 1):
        if stride_ != expected:
            return False
        expected *= size
    return True


def same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same shape and the same strides on every dimension of size > 1."""
    if t.shape != ref.shape:
        return False
    return t.stride() == ref.stride() or all(
        a == b for a, b, n in zip(t.stride(), ref.stride(), ref.shape) if n != 1)


def _check_step(op: str, params, grads, states: dict, optional: tuple, coefs: torch.Tensor,
                n_coefs: int, grad_scale, found_inf) -> None:
    """``states``: name -> list, in stream order; lists named in ``optional`` may be empty."""
    check_amp(op, grad_scale, found_inf)
    n = len(params)
    for name, lst in (("grads", grads), *states.items()):
        if len(lst) != n and not (name in optional and len(lst) == 0):
            expected = f"{n} (one per parameter)" + (" or 0" if name in optional else "")
            raise RuntimeError(f"{op}: {name} has {len(lst)} tensors, expected {expected}")
    if coefs.dtype != torch.float32 or coefs.dim() != 2 or tuple(coefs.shape) != (n, n_coefs):
        raise RuntimeError(f"{op}: coefs must be a float32 tensor of shape [{n}, {n_coefs}], got "
                           f"{coefs.dtype} of shape {list(coefs.shape)}")
    if n == 0:
        return
    dtype, device = params[0].dtype, params[0].device
    if dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{op}: params must be float32, float16 or bfloat16, got {dtype}")
    if device.type not in (default_device().type, "meta"):
        raise RuntimeError(f"{op}: params must be on {default_device().type} where the kernels run, "
                           f"got {device}")
    for name, t in (("coefs", coefs), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and t.device != device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but params are on {device}")
    for name, lst in (("params", params), ("grads", grads), *states.items()):
        for i, t in enumerate(lst):  # the common case costs a few attribute reads per tensor
            p = params[i]
            if (t.dtype != dtype or t.device != device or t.layout != torch.strided or t.shape != p.shape
                    or not (t.stride() == p.stride() or same_layout(t, p))
                    or (t is p and not (p.is_contiguous() or is_dense(p.shape, p.stride())))):
                _explain(op, name, i, t, p, dtype, device)


def check_amp(op: str, grad_scale, found_inf) -> None:
    """GradScaler's tensors: float32 with one element (torch's fused optimizers read them as float too)."""
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1):
            raise RuntimeError(f"{op}: {name} must be a float32 tensor with one element, got {t.dtype} of "
                               f"shape {list(t.shape)}")


def _explain(op: str, name: str, i: int, t: torch.Tensor, p: torch.Tensor, dtype, device) -> None:
    if t.dtype != dtype or t.device != device:
        raise RuntimeError(f"{op}: {name}[{i}] is {t.dtype} on {t.device}, but params[0] is {dtype} on "
                           f"{device}; one launch needs one dtype and one device")
    if t.layout != torch.strided:
        raise RuntimeError(f"{op}: {name}[{i}] must be a strided (dense) tensor, got layout {t.layout}")
    if t is p:
        raise RuntimeError(f"{op}: params[{i}] must be dense (non-overlapping, no gaps), got shape "
                           f"{list(p.shape)} with strides {list(p.stride())}")
    raise RuntimeError(f"{op}: {name}[{i}] (shape {list(t.shape)}, strides {list(t.stride())}) must have the "
                       f"layout of params[{i}] (shape {list(p.shape)}, strides {list(p.stride())})")

_SGD, _ADAM = "tritonkit.sgd_step_", "tritonkit.adam_step_"
_RMSPROP, _ADAGRAD = "tritonkit.rmsprop_step_", "tritonkit.adagrad_step_"


def _check_sgd(params, grads, momentum_buffers, coefs, grad_scale, found_inf):
    _check_step(_SGD, params, grads, {"momentum_buffers": momentum_buffers}, ("momentum_buffers",), coefs,
                len(SGD_COEFS), grad_scale, found_inf)


def _check_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, coefs, grad_scale, found_inf):
    _check_step(_ADAM, params, grads,
                {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "max_exp_avg_sqs": max_exp_avg_sqs},
                ("max_exp_avg_sqs",), coefs, len(ADAM_COEFS), grad_scale, found_inf)


def _check_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, coefs, grad_scale, found_inf):
    _check_step(_RMSPROP, params, grads,
                {"square_avgs": square_avgs, "grad_avgs": grad_avgs, "momentum_buffers": momentum_buffers},
                ("grad_avgs", "momentum_buffers"), coefs, len(RMSPROP_COEFS), grad_scale, found_inf)


def _check_adagrad(params, grads, state_sums, coefs, grad_scale, found_inf):
    _check_step(_ADAGRAD, params, grads, {"state_sums": state_sums}, (), coefs, len(ADAGRAD_COEFS),
                grad_scale, found_inf)


@torch.library.custom_op("tritonkit::sgd_step_", mutates_args=("params", "grads", "momentum_buffers"))
def sgd_step_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
              coefs: torch.Tensor, grad_scale: torch.Tensor | None = None,
              found_inf: torch.Tensor | None = None) -> None:
    """SGD (momentum, dampening, Nesterov, weight decay, maximize) on every tensor in one launch."""
    _check_sgd(params, grads, momentum_buffers, coefs, grad_scale, found_inf)
    kernels.sgd_step_(params, grads, momentum_buffers, coefs.contiguous(), grad_scale, found_inf)


@sgd_step_.register_fake
def _(params, grads, momentum_buffers, coefs, grad_scale=None, found_inf=None):
    _check_sgd(params, grads, momentum_buffers, coefs, grad_scale, found_inf)


@torch.library.custom_op("tritonkit::adam_step_",
                         mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
def adam_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
               coefs: torch.Tensor, grad_scale: torch.Tensor | None = None,
               found_inf: torch.Tensor | None = None) -> None:
    """Adam / AdamW (L2 or decoupled weight decay, AMSGrad, maximize) on every tensor in one launch."""
    _check_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, coefs, grad_scale, found_inf)
    kernels.adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, coefs.contiguous(), grad_scale, found_inf)


@adam_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, coefs, grad_scale=None, found_inf=None):
    _check_adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, coefs, grad_scale, found_inf)


@torch.library.custom_op("tritonkit::rmsprop_step_",
                         mutates_args=("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers"))
def rmsprop_step_(params: list[torch.Tensor], grads: list[torch.Tensor], square_avgs: list[torch.Tensor],
                  grad_avgs: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                  coefs: torch.Tensor, grad_scale: torch.Tensor | None = None,
                  found_inf: torch.Tensor | None = None) -> None:
    """RMSprop (centered, momentum, weight decay, maximize) on every tensor in one launch."""
    _check_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, coefs, grad_scale, found_inf)
    kernels.rmsprop_step_(params, grads, square_avgs, grad_avgs, momentum_buffers, coefs.contiguous(), grad_scale,
                          found_inf)


@rmsprop_step_.register_fake
def _(params, grads, square_avgs, grad_avgs, momentum_buffers, coefs, grad_scale=None, found_inf=None):
    _check_rmsprop(params, grads, square_avgs, grad_avgs, momentum_buffers, coefs, grad_scale, found_inf)


@torch.library.custom_op("tritonkit::adagrad_step_", mutates_args=("params", "grads", "state_sums"))
def adagrad_step_(params: list[torch.Tensor], grads: list[torch.Tensor], state_sums: list[torch.Tensor],
                  coefs: torch.Tensor, grad_scale: torch.Tensor | None = None,
                  found_inf: torch.Tensor | None = None) -> None:
    """Adagrad (lr decay, weight decay, maximize) on every tensor in one launch."""
    _check_adagrad(params, grads, state_sums, coefs, grad_scale, found_inf)
    kernels.adagrad_step_(params, grads, state_sums, coefs.contiguous(), grad_scale, found_inf)


@adagrad_step_.register_fake
def _(params, grads, state_sums, coefs, grad_scale=None, found_inf=None):
    _check_adagrad(params, grads, state_sums, coefs, grad_scale, found_inf)
