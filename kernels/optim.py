"""Multi-tensor optimizer updates: one launch updates every tensor of a (device, dtype) group.

An optimizer step is pure memory traffic, so each kernel is one flat pass over many tensors at once.
The launcher describes the tensors with small tables, built on the host and cached (rebuilt only when
the set of tensors, i.e. their addresses or sizes, changes):

* ``addrs``  int64 ``[S, T]``: data address of stream ``s`` of tensor ``t``. Stream 0 is the
  parameter, 1 its gradient, 2.. its state buffers in the order of the launcher's arguments (SGD:
  momentum buffer; Adam: exp_avg, exp_avg_sq, max_exp_avg_sq; RMSprop: square_avg, grad_avg,
  momentum buffer; Adagrad: sum); a stream the flags switch off holds zeros and is never touched.
* ``numels`` int64 ``[T]``.
* ``blocks`` int32 ``[2, P]``: program ``i`` updates elements ``[BLOCK*j, BLOCK*(j+1))`` (masked to
  the tensor's numel) of tensor ``blocks[0, i]``, where ``j = blocks[1, i]``.

A kernel loads an address and casts it to a typed pointer (``int64 -> tl.pointer_type(DTYPE)``): with
CPU tensors in Triton's interpreter the addresses are host addresses, compiled for a GPU they are
device addresses, and the same code serves both. Every stream of a tensor has the parameter's dtype
and memory layout (same strides, non-overlapping and dense; ``tritonkit.ops.optim`` checks), so
element ``i`` of each stream is at ``address + i * itemsize`` and one flat index serves all streams.
Each element of the parameter and of every state buffer is read once and written once per step, the
gradient read once: the traffic floor.

Hyperparameters are runtime values: ``coefs`` fp32 ``[T, K]`` holds one row per tensor, columns named by
the kernel's ``*_COEFS`` (lr, bias corrections computed from that tensor's own step count, the
gradient's sign for ``maximize``, ...) and read by those names (``*_COL``), so changing lr never
recompiles and param groups with different hyperparameters share one launch. Constexpr flags only decide
which state streams exist (momentum buffer, AMSGrad maximum, centered average). Math runs in float32 and
is rounded once to the parameter's dtype per stored value, following torch.optim's formulas operation by
operation (sqrt and division IEEE-rounded, ``lerp`` with aten's two-branch formula).

Mixed precision (``torch.amp.GradScaler``): every kernel also takes GradScaler's ``grad_scale`` and
``found_inf`` (float32 one-element tensors). The gradient is divided by ``grad_scale`` as it is loaded
(``UNSCALE``; the unscaled value is also stored back to the gradient, as torch's fused optimizers leave
``p.grad``), and when ``found_inf`` != 0 each program returns before loading anything: the skip is
decided on the device, so the host never waits for the inf check. Without GradScaler the launcher passes
a cached 1.0 / 0.0 and ``UNSCALE=False``.

Not autotuned: the update is in place through addresses that ``triton.autotune``'s ``restore_value``
cannot see, so benchmarking configs on the live buffers would apply the step several times. The block
size is fixed per dtype instead (it also fixes the ``blocks`` table): 32 bytes per thread per stream,
which is what a streaming kernel needs for full-width vector accesses. When every address is 16-byte
aligned (``ALIGNED``) the kernel says so with ``tl.multiple_of`` so the compiler can emit 128-bit
loads and stores through the loaded pointers.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import torch
import triton
import triton.language as tl

from tritonkit.kernels.common import tuned_kernel
from tritonkit.runtime import INTERPRET

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Elements per program: 4 warps x 32 threads x 32 bytes on a GPU; large in the interpreter, whose cost
# is per program instance.
GPU_BLOCK = {torch.float32: 1024, torch.float16: 2048, torch.bfloat16: 2048}
INTERP_BLOCK = 4096
_GPU_CONFIGS = [triton.Config({}, num_warps=4)]
_INTERP_CONFIGS = [triton.Config({})]

# Coefficient columns per kernel: the one list of names. The optimizers fill the columns by name and the
# kernels read them by name through the ``*_COL`` constexprs built from the same tuples.
SGD_COEFS = ("lr", "grad_sign", "weight_decay", "momentum", "buf_decay", "buf_grad", "nesterov")
ADAM_COEFS = ("grad_sign", "weight_decay", "param_scale", "beta1_weight", "beta2", "one_minus_beta2",
              "step_size", "bias_correction2_sqrt", "eps")
RMSPROP_COEFS = ("lr", "grad_sign", "weight_decay", "alpha", "one_minus_alpha", "eps", "momentum")
ADAGRAD_COEFS = ("clr", "grad_sign", "weight_decay", "eps")


class Columns(tl.constexpr):
    """Column indices of a coefficient row, by name: ``row + SGD_COL.buf_decay`` reads that column and
    ``row`` is row ``t``. A global constexpr, so a kernel may read it: compiled,
    Triton unwraps it to the namedtuple ``value``; the interpreter runs plain Python, hence ``__getattr__``."""

    def __init__(self, names: tuple):
        super().__init__(namedtuple("Columns", (*names, "width"))(*range(len(names)), len(names)))

    def __getattr__(self, name):
        if name.startswith("_") or name in ("value", "type"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.value, name)


SGD_COL, ADAM_COL = Columns(SGD_COEFS), Columns(ADAM_COEFS)
RMSPROP_COL, ADAGRAD_COL = Columns(RMSPROP_COEFS), Columns(ADAGRAD_COEFS)


def _signature(flags):
    def signature(dtype):
        return {"addrs": "*i64", "numels": "*i64", "blocks": "*i32", "coefs": "*fp32", "grad_scale": "*fp32",
                "found_inf": "*fp32", "n_tensors": "i32", **{f: "constexpr" for f in flags},
                "UNSCALE": "constexpr", "DTYPE": "constexpr", "ALIGNED": "constexpr", "BLOCK": "constexpr"}

    return signature


def _constexprs(**flags):
    def constexprs(dtype):
        return {**flags, "UNSCALE": True, "DTYPE": TL_DTYPE[dtype], "ALIGNED": True, "BLOCK": GPU_BLOCK[dtype]}

    return constexprs


# --- shared pieces of the kernels ------------------------------------------------------------------
# Each kernel's per-block update is one @triton.jit helper (``_sgd``, ``_adam``, ...), called once per
# program: with the tail block's mask, or with ``mask=None`` on a full block so that the compiled loads
# and stores are unpredicated vectors. Inside it the math is written out inline rather than in further
# helpers: in Triton's interpreter every helper call costs about a millisecond (it re-patches
# triton.language), more than the arithmetic of a block. ``_bf16`` is the one exception (bfloat16 only).
@triton.jit
def _bf16(x):
    """float32 -> bfloat16 rounded to nearest-even, by hand: Triton's interpreter truncates (and its
    "rtne" mode loses the carry into the exponent). Compiled it is a few integer ops beside the memory
    traffic; NaN stays NaN, overflow rounds to inf as IEEE does."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return tl.where(x != x, 0x7FC0, bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)  # noqa: PLR0124


# --- SGD -------------------------------------------------------------------------------------------
@triton.jit
def _sgd(p_ptrs, g_ptrs, b_ptrs, row, grad_scale, mask, MOMENTUM: tl.constexpr, UNSCALE: tl.constexpr,
         DTYPE: tl.constexpr):
    p = tl.load(p_ptrs, mask=mask).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask).to(tl.float32)
    if UNSCALE:  # GradScaler's gradient: unscaled here, and written back unscaled (as torch's fused kernels)
        g = tl.div_rn(g, tl.load(grad_scale))
        tl.store(g_ptrs, _bf16(g) if DTYPE == tl.bfloat16 else g.to(DTYPE), mask=mask)
    g = tl.load(row + SGD_COL.grad_sign) * g
    weight_decay = tl.load(row + SGD_COL.weight_decay)
    if weight_decay != 0.0:
        g = g + weight_decay * p
    b = g
    if MOMENTUM:
        b_old = tl.load(b_ptrs, mask=mask).to(tl.float32)
        b = tl.load(row + SGD_COL.buf_decay) * b_old + tl.load(row + SGD_COL.buf_grad) * g
        if tl.load(row + SGD_COL.nesterov) != 0.0:
            g = g + tl.load(row + SGD_COL.momentum) * b
        else:
            g = b
    p = p - tl.load(row + SGD_COL.lr) * g
    if DTYPE == tl.bfloat16:
        p_out, b_out = _bf16(p), _bf16(b)
    else:
        p_out, b_out = p.to(DTYPE), b.to(DTYPE)
    if MOMENTUM:
        tl.store(b_ptrs, b_out, mask=mask)
    tl.store(p_ptrs, p_out, mask=mask)


@tuned_kernel("optim_sgd", gpu_configs=_GPU_CONFIGS, interp_configs=_INTERP_CONFIGS, key=[],
              signature=_signature(["MOMENTUM"]), constexprs=_constexprs(MOMENTUM=True))
@triton.jit
def sgd_kernel(addrs, numels, blocks, coefs, grad_scale, found_inf, n_tensors, MOMENTUM: tl.constexpr,
               UNSCALE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """g = sign*grad + wd*p;  b = buf_decay*b + buf_grad*g;  g = nesterov ? g + mu*b : b;  p -= lr*g.

    On a buffer's first step the optimizer passes buf_decay = 0, buf_grad = 1 (a zero-filled buffer),
    so b = g as in torch; afterwards buf_decay = momentum, buf_grad = 1 - dampening.
    """
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.multiple_of(tl.load(blocks + tl.num_programs(0) + pid).to(tl.int64) * BLOCK, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    full, mask = start + BLOCK <= numel, offs < numel
    p_base = tl.load(addrs + t).to(tl.pointer_type(DTYPE))
    g_base = tl.load(addrs + t + n_tensors).to(tl.pointer_type(DTYPE))
    b_base = tl.load(addrs + t + 2 * n_tensors).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address is 16-byte aligned: 128-bit loads and stores on full blocks
        p_base = tl.multiple_of(p_base, 16)
        g_base = tl.multiple_of(g_base, 16)
        b_base = tl.multiple_of(b_base, 16)
    row = coefs + t * SGD_COL.width  # this tensor's coefficients
    if tl.load(found_inf) == 0.0:  # GradScaler's found_inf: a nonzero value skips the whole update
        if full:
            _sgd(p_base + offs, g_base + offs, b_base + offs, row, grad_scale, None, MOMENTUM, UNSCALE,
                 DTYPE)
        else:
            _sgd(p_base + offs, g_base + offs, b_base + offs, row, grad_scale, mask, MOMENTUM, UNSCALE,
                 DTYPE)


# --- Adam / AdamW ----------------------------------------------------------------------------------
@triton.jit
def _adam(p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, row, grad_scale, mask, AMSGRAD: tl.constexpr,
          UNSCALE: tl.constexpr, DTYPE: tl.constexpr):
    p = tl.load(p_ptrs, mask=mask).to(tl.float32) * tl.load(row + ADAM_COL.param_scale)
    g = tl.load(g_ptrs, mask=mask).to(tl.float32)
    if UNSCALE:  # GradScaler's gradient: unscaled here, and written back unscaled (as torch's fused kernels)
        g = tl.div_rn(g, tl.load(grad_scale))
        tl.store(g_ptrs, _bf16(g) if DTYPE == tl.bfloat16 else g.to(DTYPE), mask=mask)
    g = tl.load(row + ADAM_COL.grad_sign) * g
    weight_decay = tl.load(row + ADAM_COL.weight_decay)
    if weight_decay != 0.0:
        g = g + weight_decay * p
    m = tl.load(m_ptrs, mask=mask).to(tl.float32)
    w = tl.load(row + ADAM_COL.beta1_weight)
    m = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1.0 - w))  # aten's lerp(m, g, w)
    v = tl.load(v_ptrs, mask=mask).to(tl.float32)
    v = v * tl.load(row + ADAM_COL.beta2) + tl.load(row + ADAM_COL.one_minus_beta2) * g * g
    v_hat = v
    if AMSGRAD:
        v_hat = tl.maximum(tl.load(vmax_ptrs, mask=mask).to(tl.float32), v)
    denom = tl.div_rn(tl.sqrt_rn(v_hat), tl.load(row + ADAM_COL.bias_correction2_sqrt))
    denom = denom + tl.load(row + ADAM_COL.eps)
    p = p - tl.load(row + ADAM_COL.step_size) * tl.div_rn(m, denom)
    if DTYPE == tl.bfloat16:
        p_out, m_out, v_out, vmax_out = _bf16(p), _bf16(m), _bf16(v), _bf16(v_hat)
    else:
        p_out, m_out, v_out, vmax_out = p.to(DTYPE), m.to(DTYPE), v.to(DTYPE), v_hat.to(DTYPE)
    tl.store(m_ptrs, m_out, mask=mask)
    tl.store(v_ptrs, v_out, mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptrs, vmax_out, mask=mask)
    tl.store(p_ptrs, p_out, mask=mask)


@tuned_kernel("optim_adam", gpu_configs=_GPU_CONFIGS, interp_configs=_INTERP_CONFIGS, key=[],
              signature=_signature(["AMSGRAD"]), constexprs=_constexprs(AMSGRAD=False))
@triton.jit
def adam_kernel(addrs, numels, blocks, coefs, grad_scale, found_inf, n_tensors, AMSGRAD: tl.constexpr,
                UNSCALE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """p *= param_scale;  g = sign*grad + wd*p;  m = lerp(m, g, 1-b1);  v = b2*v + (1-b2)*g*g;
    vmax = max(vmax, v) (AMSGrad);  p -= step_size * m / (sqrt(v or vmax)/sqrt(1-b2^t) + eps).

    Adam: param_scale = 1, wd = weight_decay; AdamW (decoupled): param_scale = 1 - lr*weight_decay,
    wd = 0. step_size = lr / (1 - b1^t) with t the tensor's own step count.
    """
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.multiple_of(tl.load(blocks + tl.num_programs(0) + pid).to(tl.int64) * BLOCK, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    full, mask = start + BLOCK <= numel, offs < numel
    p_base = tl.load(addrs + t).to(tl.pointer_type(DTYPE))
    g_base = tl.load(addrs + t + n_tensors).to(tl.pointer_type(DTYPE))
    m_base = tl.load(addrs + t + 2 * n_tensors).to(tl.pointer_type(DTYPE))
    v_base = tl.load(addrs + t + 3 * n_tensors).to(tl.pointer_type(DTYPE))
    vmax_base = tl.load(addrs + t + 4 * n_tensors).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address is 16-byte aligned: 128-bit loads and stores on full blocks
        p_base = tl.multiple_of(p_base, 16)
        g_base = tl.multiple_of(g_base, 16)
        m_base = tl.multiple_of(m_base, 16)
        v_base = tl.multiple_of(v_base, 16)
        vmax_base = tl.multiple_of(vmax_base, 16)
    row = coefs + t * ADAM_COL.width  # this tensor's coefficients
    if tl.load(found_inf) == 0.0:  # GradScaler's found_inf: a nonzero value skips the whole update
        if full:
            _adam(p_base + offs, g_base + offs, m_base + offs, v_base + offs, vmax_base + offs, row,
                  grad_scale, None, AMSGRAD, UNSCALE, DTYPE)
        else:
            _adam(p_base + offs, g_base + offs, m_base + offs, v_base + offs, vmax_base + offs, row,
                  grad_scale, mask, AMSGRAD, UNSCALE, DTYPE)


# --- RMSprop ---------------------------------------------------------------------------------------
@triton.jit
def _rmsprop(p_ptrs, g_ptrs, v_ptrs, ga_ptrs, b_ptrs, row, grad_scale, mask, CENTERED: tl.constexpr,
             MOMENTUM: tl.constexpr, UNSCALE: tl.constexpr, DTYPE: tl.constexpr):
    p = tl.load(p_ptrs, mask=mask).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask).to(tl.float32)
    if UNSCALE:  # GradScaler's gradient: unscaled here, and written back unscaled (as torch's fused kernels)
        g = tl.div_rn(g, tl.load(grad_scale))
        tl.store(g_ptrs, _bf16(g) if DTYPE == tl.bfloat16 else g.to(DTYPE), mask=mask)
    g = tl.load(row + RMSPROP_COL.grad_sign) * g
    weight_decay = tl.load(row + RMSPROP_COL.weight_decay)
    if weight_decay != 0.0:
        g = g + weight_decay * p
    w = tl.load(row + RMSPROP_COL.one_minus_alpha)
    v = tl.load(v_ptrs, mask=mask).to(tl.float32) * tl.load(row + RMSPROP_COL.alpha) + w * g * g
    v_tilde = v
    ga = g
    if CENTERED:
        ga = tl.load(ga_ptrs, mask=mask).to(tl.float32)
        ga = tl.where(w < 0.5, ga + w * (g - ga), g - (g - ga) * (1.0 - w))  # aten's lerp(ga, g, w)
        v_tilde = v - ga * ga
    step = tl.div_rn(g, tl.sqrt_rn(v_tilde) + tl.load(row + RMSPROP_COL.eps))
    b = step
    if MOMENTUM:
        b = tl.load(b_ptrs, mask=mask).to(tl.float32) * tl.load(row + RMSPROP_COL.momentum) + step
    p = p - tl.load(row + RMSPROP_COL.lr) * b
    if DTYPE == tl.bfloat16:
        p_out, v_out, ga_out, b_out = _bf16(p), _bf16(v), _bf16(ga), _bf16(b)
    else:
        p_out, v_out, ga_out, b_out = p.to(DTYPE), v.to(DTYPE), ga.to(DTYPE), b.to(DTYPE)
    tl.store(v_ptrs, v_out, mask=mask)
    if CENTERED:
        tl.store(ga_ptrs, ga_out, mask=mask)
    if MOMENTUM:
        tl.store(b_ptrs, b_out, mask=mask)
    tl.store(p_ptrs, p_out, mask=mask)


@tuned_kernel("optim_rmsprop", gpu_configs=_GPU_CONFIGS, interp_configs=_INTERP_CONFIGS, key=[],
              signature=_signature(["CENTERED", "MOMENTUM"]),
              constexprs=_constexprs(CENTERED=False, MOMENTUM=False))
@triton.jit
def rmsprop_kernel(addrs, numels, blocks, coefs, grad_scale, found_inf, n_tensors, CENTERED: tl.constexpr,
                   MOMENTUM: tl.constexpr, UNSCALE: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK: tl.constexpr):
    """g = sign*grad + wd*p;  v = alpha*v + (1-alpha)*g*g;  ga = lerp(ga, g, 1-alpha) (centered);
    avg = sqrt(v - ga*ga or v) + eps;  b = mu*b + g/avg, p -= lr*b (momentum) or p -= lr * g/avg.
    """
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.multiple_of(tl.load(blocks + tl.num_programs(0) + pid).to(tl.int64) * BLOCK, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    full, mask = start + BLOCK <= numel, offs < numel
    p_base = tl.load(addrs + t).to(tl.pointer_type(DTYPE))
    g_base = tl.load(addrs + t + n_tensors).to(tl.pointer_type(DTYPE))
    v_base = tl.load(addrs + t + 2 * n_tensors).to(tl.pointer_type(DTYPE))
    ga_base = tl.load(addrs + t + 3 * n_tensors).to(tl.pointer_type(DTYPE))
    b_base = tl.load(addrs + t + 4 * n_tensors).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address is 16-byte aligned: 128-bit loads and stores on full blocks
        p_base = tl.multiple_of(p_base, 16)
        g_base = tl.multiple_of(g_base, 16)
        v_base = tl.multiple_of(v_base, 16)
        ga_base = tl.multiple_of(ga_base, 16)
        b_base = tl.multiple_of(b_base, 16)
    row = coefs + t * RMSPROP_COL.width  # this tensor's coefficients
    if tl.load(found_inf) == 0.0:  # GradScaler's found_inf: a nonzero value skips the whole update
        if full:
            _rmsprop(p_base + offs, g_base + offs, v_base + offs, ga_base + offs, b_base + offs, row,
                     grad_scale, None, CENTERED, MOMENTUM, UNSCALE, DTYPE)
        else:
            _rmsprop(p_base + offs, g_base + offs, v_base + offs, ga_base + offs, b_base + offs, row,
                     grad_scale, mask, CENTERED, MOMENTUM, UNSCALE, DTYPE)


# --- Adagrad ---------------------------------------------------------------------------------------
@triton.jit
def _adagrad(p_ptrs, g_ptrs, s_ptrs, row, grad_scale, mask, UNSCALE: tl.constexpr, DTYPE: tl.constexpr):
    p = tl.load(p_ptrs, mask=mask).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask).to(tl.float32)
    if UNSCALE:  # GradScaler's gradient: unscaled here, and written back unscaled (as torch's fused kernels)
        g = tl.div_rn(g, tl.load(grad_scale))
        tl.store(g_ptrs, _bf16(g) if DTYPE == tl.bfloat16 else g.to(DTYPE), mask=mask)
    g = tl.load(row + ADAGRAD_COL.grad_sign) * g
    weight_decay = tl.load(row + ADAGRAD_COL.weight_decay)
    if weight_decay != 0.0:
        g = g + weight_decay * p
    s = tl.load(s_ptrs, mask=mask).to(tl.float32) + g * g
    p = p - tl.load(row + ADAGRAD_COL.clr) * tl.div_rn(g, tl.sqrt_rn(s) + tl.load(row + ADAGRAD_COL.eps))
    if DTYPE == tl.bfloat16:
        p_out, s_out = _bf16(p), _bf16(s)
    else:
        p_out, s_out = p.to(DTYPE), s.to(DTYPE)
    tl.store(s_ptrs, s_out, mask=mask)
    tl.store(p_ptrs, p_out, mask=mask)


@tuned_kernel("optim_adagrad", gpu_configs=_GPU_CONFIGS, interp_configs=_INTERP_CONFIGS, key=[],
              signature=_signature([]), constexprs=_constexprs())
@triton.jit
def adagrad_kernel(addrs, numels, blocks, coefs, grad_scale, found_inf, n_tensors, UNSCALE: tl.constexpr,
                   DTYPE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """g = sign*grad + wd*p;  s += g*g;  p -= clr * g / (sqrt(s) + eps),  clr = lr / (1 + (t-1) lr_decay)."""
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.multiple_of(tl.load(blocks + tl.num_programs(0) + pid).to(tl.int64) * BLOCK, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    numel = tl.load(numels + t)
    full, mask = start + BLOCK <= numel, offs < numel
    p_base = tl.load(addrs + t).to(tl.pointer_type(DTYPE))
    g_base = tl.load(addrs + t + n_tensors).to(tl.pointer_type(DTYPE))
    s_base = tl.load(addrs + t + 2 * n_tensors).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address is 16-byte aligned: 128-bit loads and stores on full blocks
        p_base = tl.multiple_of(p_base, 16)
        g_base = tl.multiple_of(g_base, 16)
        s_base = tl.multiple_of(s_base, 16)
    row = coefs + t * ADAGRAD_COL.width  # this tensor's coefficients
    if tl.load(found_inf) == 0.0:  # GradScaler's found_inf: a nonzero value skips the whole update
        if full:
            _adagrad(p_base + offs, g_base + offs, s_base + offs, row, grad_scale, None, UNSCALE, DTYPE)
        else:
            _adagrad(p_base + offs, g_base + offs, s_base + offs, row, grad_scale, mask, UNSCALE, DTYPE)


# --- launch tables ---------------------------------------------------------------------------------
_CACHE_SIZE = 16
_addr_tables: OrderedDict = OrderedDict()  # (device, addresses) -> int64 [S, T]
_block_tables: OrderedDict = OrderedDict()  # (device, BLOCK, numels) -> (numels [T], blocks [2, P])
_scalars: OrderedDict = OrderedDict()  # (device, value) -> float32 [1]
_captured: dict = {}  # id -> table read by a captured CUDA graph: kept as long as the process (never evicted)


def _cached(cache: OrderedDict, key, build, capturing: bool = False):
    """The table for ``key``, built (from host data, copied asynchronously) on a miss. Under CUDA graph
    capture a miss is refused: the graph would record the host-to-device copy of a temporary buffer."""
    value = cache.get(key)
    if value is None:
        if capturing:
            raise RuntimeError(
                "tritonkit.optim: this step's tensors (parameter, gradient and state addresses, or sizes) are "
                "not the ones of an earlier step, and their launch table cannot be built during CUDA graph "
                "capture. Run the step once before capturing on the tensors the graph will use: keep "
                "gradients allocated (zero_grad(set_to_none=False) in the warm-up and inside the graph).")
        value = cache[key] = build()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    if capturing:
        _captured[id(value)] = value
    return value


def _build_blocks(numels: tuple, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side Python ints only (no tensor read back), copied to ``device`` asynchronously."""
    counts = [triton.cdiv(n, block) for n in numels]
    blocks = torch.tensor([[t for t, c in enumerate(counts) for _ in range(c)],
                           [j for c in counts for j in range(c)]], dtype=torch.int32)
    return (torch.tensor(numels, dtype=torch.int64).to(device, non_blocking=True),
            blocks.to(device, non_blocking=True))


def _scalar(device, value: float) -> torch.Tensor:
    """A cached float32 1.0 or 0.0 on ``device``: the grad_scale / found_inf a launch without GradScaler reads."""
    return _cached(_scalars, (device, value), lambda: torch.full((1,), value, dtype=torch.float32, device=device),
                   _capturing(device))


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def launch(kernel, streams: list[list[torch.Tensor]], coefs: torch.Tensor, grad_scale=None, found_inf=None,
           **flags) -> int:
    """Update every tensor of ``streams`` (``[params, grads, *state streams]``, a state stream ``[]``
    when its flag is off) in one launch of ``kernel``; returns the number of programs launched.

    ``grad_scale`` / ``found_inf``: GradScaler's float32 one-element tensors on the params' device, or
    None. With ``grad_scale`` the kernel divides each gradient by it and writes the unscaled gradient back;
    with ``found_inf`` != 0 every program returns without touching anything (no host sync either way)."""
    params = streams[0]
    numels = tuple(p.numel() for p in params)
    if sum(numels) == 0:
        return 0
    device, dtype = params[0].device, params[0].dtype
    block = INTERP_BLOCK if INTERPRET else GPU_BLOCK[dtype]
    n_tensors = len(params)
    addresses = tuple(a for stream in streams for a in ([t.data_ptr() for t in stream] or [0] * n_tensors))
    aligned = all(a % 16 == 0 for a in addresses)
    capturing = _capturing(device)
    addrs = _cached(_addr_tables, (device, addresses),
                    lambda: torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=True), capturing)
    numel_t, blocks = _cached(_block_tables, (device, block, numels),
                              lambda: _build_blocks(numels, block, device), capturing)
    n_programs = blocks.shape[1]
    unscale = grad_scale is not None
    grad_scale = grad_scale if unscale else _scalar(device, 1.0)
    found_inf = _scalar(device, 0.0) if found_inf is None else found_inf
    kernel[(n_programs,)](addrs, numel_t, blocks, coefs, grad_scale, found_inf, n_tensors, **flags,
                          UNSCALE=unscale, DTYPE=TL_DTYPE[dtype], ALIGNED=aligned, BLOCK=block)
    return n_programs


def sgd_step_(params, grads, momentum_buffers, coefs, grad_scale=None, found_inf=None) -> int:
    return launch(sgd_kernel, [params, grads, momentum_buffers], coefs, grad_scale, found_inf,
                  MOMENTUM=bool(momentum_buffers))


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, coefs, grad_scale=None,
               found_inf=None) -> int:
    return launch(adam_kernel, [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs], coefs, grad_scale,
                  found_inf, AMSGRAD=bool(max_exp_avg_sqs))


def rmsprop_step_(params, grads, square_avgs, grad_avgs, momentum_buffers, coefs, grad_scale=None,
                  found_inf=None) -> int:
    return launch(rmsprop_kernel, [params, grads, square_avgs, grad_avgs, momentum_buffers], coefs, grad_scale,
                  found_inf, CENTERED=bool(grad_avgs), MOMENTUM=bool(momentum_buffers))


def adagrad_step_(params, grads, state_sums, coefs, grad_scale=None, found_inf=None) -> int:
    return launch(adagrad_kernel, [params, grads, state_sums], coefs, grad_scale, found_inf)


__all__ = ["adagrad_step_", "adam_step_", "launch", "rmsprop_step_", "sgd_step_"]
