"""LayerNorm over the last dimension (``F.layer_norm(x, [C], weight, bias, eps)``, what ConvNeXt applies to
its channels-last activations), forward and backward.

For each row ``x`` (length ``C``) of the input viewed as ``[M, C]``, in float32:

    mean = sum(x) / C,   rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),   xhat = (x - mean) * rstd
    y = xhat * w + b                                            (w, b optional: elementwise_affine)

the mean summed as ``x[0] + sum(x - x[0]) / C`` (the differences of nearby values are exact and small, so a
large common offset costs no bits) and the variance around it in a second pass over the row in registers
(no cancellation at a large mean), ``rstd`` correctly rounded. The backward of row ``m`` from ``dy`` (``g = dy * w``):

    dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))
    dw = sum over rows of dy * xhat,   db = sum over rows of dy

Kernels: ``layer_norm_fwd`` (``BLOCK_M`` rows per program, a whole row of ``BLOCK_C = next_power_of_2(C)``
columns in registers, coalesced along C) writes y and the per-row ``mean``/``rstd`` the backward reads.
``layer_norm_bwd`` runs ``P`` programs, each over a fixed run of rows in ``BLOCK_M``-row blocks: dx per
row, and the column sums of ``dy * xhat`` and ``dy`` over its rows as float32 partials ``[P, 2, C]``, which
the launcher adds in a fixed order (``sum(0)``): deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonkit.kernels.common import (
    INTERP_TILE,
    TRITON_TYPE,
    check_int32_indexing,
    empty,
    empty_strided,
    interp_block,
    tuned_kernel,
)
from tritonkit.runtime import INTERPRET

MAX_C = 65536  # a row must fit one program's registers (spilling beyond some thousands on a GPU)


def _cfg(block_m, warps):
    return triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=1)


GPU_CONFIGS = [_cfg(1, 4), _cfg(1, 8), _cfg(4, 4), _cfg(8, 4), _cfg(16, 8)]


def _config_for(config, dtype, arch=None, launch=None) -> bool:
    """At most 64 float32 values of a row block per thread (more spill); one-row tiles always (a row longer
    than that spills, but runs)."""
    block_c = (launch or {}).get("BLOCK_C", 1024)
    return config.kwargs["BLOCK_M"] == 1 or config.kwargs["BLOCK_M"] * block_c <= 64 * 32 * config.num_warps


_INTERP = {"BLOCK_M": lambda a: interp_block(a["M"], 1, max(1, INTERP_TILE // a["BLOCK_C"]))}


def _signature(pointers, ints):
    def signature(dtype):
        t = "*" + TRITON_TYPE[dtype]
        sig = {p: ("*fp32" if p.startswith("part") else t) for p in pointers}
        sig |= {name: "i32" for name in ints}
        return sig | {"eps": "fp32", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_C": "constexpr",
                      "BLOCK_M": "constexpr"}

    return signature


def _typical(C=384, M=32 * 14 * 14, strides=("s_xm", "s_ym")):  # ConvNeXt-T's third stage: 384 at 14x14
    return {"M": M, "C": C, **dict.fromkeys(strides, C), "HAS_WEIGHT": True, "HAS_BIAS": True,
            "BLOCK_C": triton.next_power_of_2(C)}


@tuned_kernel(
    "layer_norm_fwd",
    gpu_configs=GPU_CONFIGS,
    config_for_dtype=_config_for,
    interp_heuristics=_INTERP,
    key=["M", "C", "HAS_WEIGHT", "HAS_BIAS"],
    signature=_signature(("x_ptr", "w_ptr", "b_ptr", "y_ptr", "mean_ptr", "rstd_ptr"), ("M", "C", "s_xm", "s_ym")),
    constexprs=lambda dtype: _typical(),
    variants={"96": lambda dtype: _typical(96, 32 * 56 * 56)},  # its first stage
)
@triton.jit
def layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, C, s_xm, s_ym, eps,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    r_ok = rows < M
    c_ok = cols < C
    ok = r_ok[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * s_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    shift = tl.sum(tl.where(cols[None, :] == 0, x, 0.0), axis=1)  # the row's first element
    mean = shift + tl.sum(tl.where(ok, x - shift[:, None], 0.0), axis=1) / C
    dev = tl.where(ok, x - mean[:, None], 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(dev * dev, axis=1) / C + eps))
    y = dev * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * s_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean.to(mean_ptr.dtype.element_ty), mask=r_ok)
    tl.store(rstd_ptr + rows, rstd.to(rstd_ptr.dtype.element_ty), mask=r_ok)


@tuned_kernel(
    "layer_norm_bwd",
    gpu_configs=GPU_CONFIGS,
    config_for_dtype=_config_for,
    interp_heuristics=_INTERP,
    key=["M", "C", "HAS_WEIGHT"],
    signature=_signature(("g_ptr", "x_ptr", "w_ptr", "mean_ptr", "rstd_ptr", "dx_ptr", "part_ptr"),
                         ("M", "C", "s_gm", "s_xm", "rows_per_program")),
    constexprs=lambda dtype: {**_typical(strides=("s_gm", "s_xm")), "HAS_BIAS": False,
                              "rows_per_program": 32 * 14 * 14 // 264},
)
@triton.jit
def layer_norm_bwd_kernel(g_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, M, C, s_gm, s_xm,
                          rows_per_program, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """dx of rows [pid * rows_per_program, (pid + 1) * rows_per_program) (dx row-major [M, C]) and this run's
    column sums of dy * xhat and dy into part[pid, 0/1, :] (module doc). ``eps``/``HAS_BIAS`` unused (the
    signature's)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(c_ok, 1.0, 0.0)
    sum_dw = tl.zeros((BLOCK_C,), tl.float32)
    sum_db = tl.zeros((BLOCK_C,), tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for r0 in range(first, last, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        r_ok = rows < last
        ok = r_ok[:, None] & c_ok[None, :]
        rows64 = rows[:, None].to(tl.int64)
        dy = tl.load(g_ptr + rows64 * s_gm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows64 * s_xm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        mean_g = tl.sum(g, axis=1) / C
        mean_gx = tl.sum(g * xhat, axis=1) / C
        dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(dx_ptr + rows64 * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)
        sum_dw += tl.sum(dy * xhat, axis=0)
        sum_db += tl.sum(dy, axis=0)
    tl.store(part_ptr + pid * 2 * C + cols, sum_dw, mask=c_ok)
    tl.store(part_ptr + pid * 2 * C + C + cols, sum_db, mask=c_ok)


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of ``mean``/``rstd``: the input's on the CPU, float32 elsewhere (aten's fake tensors on each)."""
    return x.dtype if x.device.type == "cpu" else torch.float32


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[M, C]`` with unit column stride (a copy only when its rows cannot be viewed so)."""
    rows = t.reshape(-1, t.shape[-1]) if t.numel() else t.reshape(0, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def layer_norm(x, weight, bias, eps):
    """``(y, mean, rstd)`` as ``aten.native_layer_norm(x, [C], weight, bias, eps)``: y contiguous in x's
    dtype, mean/rstd of shape ``[*x.shape[:-1], 1]`` in :func:`stats_dtype`."""
    C = x.shape[-1]
    rows = _rows(x)
    M = rows.shape[0]
    y = empty(tuple(x.shape), dtype=x.dtype, device=x.device)
    mean = empty((*x.shape[:-1], 1), dtype=stats_dtype(x), device=x.device)
    rstd = empty((*x.shape[:-1], 1), dtype=stats_dtype(x), device=x.device)
    check_int32_indexing(rows, y)
    if M and C:
        layer_norm_fwd_kernel[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)](
            rows, weight if weight is not None else rows, bias if bias is not None else rows, y, mean, rstd,
            M, C, rows.stride(0), C, float(eps), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_C=triton.next_power_of_2(C))
    return y, mean, rstd


def _dense_strides(t: torch.Tensor) -> tuple:
    """The strides ``torch.empty_like(t)`` gives (``t``'s own when it is dense in any dim order)."""
    return torch.empty_like(t, device="meta").stride()


def _programs(M: int, device: torch.device) -> int:
    """Row runs of the backward: one in the interpreter (cost per program), else enough to fill the GPU."""
    if INTERPRET:
        return 1
    return max(1, min(M, 2 * torch.cuda.get_device_properties(device).multi_processor_count))


def layer_norm_backward(grad_out, x, mean, rstd, weight, output_mask):
    """``(dx, dw, db)`` as ``aten.native_layer_norm_backward`` (None where ``output_mask`` says so); dx in
    x's dtype and layout (a dense one; its rows written through a contiguous buffer when they are not
    contiguous), dw/db in weight's dtype."""
    C = x.shape[-1]
    rows, g = _rows(x), _rows(grad_out)
    M = rows.shape[0]
    P = _programs(M, x.device)
    dx = empty_strided(tuple(x.shape), _dense_strides(x), dtype=x.dtype, device=x.device)  # aten's empty_like
    dx_rows = dx.view(M, C) if dx.is_contiguous() else empty((M, C), dtype=x.dtype, device=x.device)
    part = empty((P, 2, C), dtype=torch.float32, device=x.device)
    check_int32_indexing(rows, g, dx)
    if M and C:
        layer_norm_bwd_kernel[(P,)](
            g, rows, weight if weight is not None else rows, mean, rstd, dx_rows, part, M, C, g.stride(0),
            rows.stride(0), triton.cdiv(M, P), 0.0, HAS_WEIGHT=weight is not None, HAS_BIAS=False,
            BLOCK_C=triton.next_power_of_2(C))
        if dx_rows.data_ptr() != dx.data_ptr():  # an input in another layout (a permuted NCHW activation)
            dx.copy_(dx_rows.view(x.shape))
    else:
        part.zero_()
    sums = part.sum(0)  # fixed order over the runs
    param_dtype = weight.dtype if weight is not None else x.dtype
    want_dx, want_dw, want_db = output_mask
    return (dx if want_dx else None, sums[0].to(param_dtype, copy=True) if want_dw else None,
            sums[1].to(param_dtype, copy=True) if want_db else None)


__all__ = ["MAX_C", "layer_norm", "layer_norm_backward", "stats_dtype"]
