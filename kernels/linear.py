"""Linear layers as one strided GEMM kernel with a fused bias + activation epilogue and a fused ReLU-mask prologue.

    C[m, n] = act( sum_k A'[m, k] * B[k, n] + bias[n] ),   A' = A * (R > 0) when a mask R is given

act is none, ReLU or any other kind of ``tritonkit.kernels.elementwise`` (its math, in float32 before
the one rounding).

Every operand is addressed through its own (row, column) strides, so one kernel serves:

* forward           y  = act(x @ W^T + b)         A = x (M, K),    B = W^T (a strided view of W)
* input gradient    dx = (dy * (y > 0)) @ W        A = dy (M, N),   R = y,   B = W (N, K)
* weight gradient   dW = (dy * (y > 0))^T @ x      A = dy^T,        R = y^T, B = x (M, K)

The mask R is the forward's ReLU output: applying it while loading dy is what ``threshold_backward``
would have done in a separate pass over memory.

With ``ROW_SUM`` the kernel also writes ``s[m] = sum_k A'[m, k]`` (float32 accumulation, rounded once
to ``s``'s dtype). For the weight gradient that is the bias gradient ``db[n] = sum over rows of
dy'[row, n]``: the programs of the first column block (``pid_n == 0``) add up the A' tiles they already
load for the dot, so ``db`` costs no extra read of ``dy`` and no extra launch. Each ``s[m]`` is made by
one program, over K in ascending blocks (the kernel does not split K): deterministic, no atomics.

The whole backward of a linear is one launch of ``linear_backward_kernel``: a 1-D grid whose first
``cdiv(M, DX_BLOCK_M) * cdiv(K, DX_BLOCK_N)`` programs are input-gradient tiles and the rest weight-gradient
tiles (with the bias gradient as ``ROW_SUM``), each computed by the same ``_gemm_tile`` as ``gemm_kernel``.
Its configs pair two of the GEMM's tiles compiled with one num_warps / num_stages.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonkit.kernels import elementwise
from tritonkit.kernels.common import (
    INTERP_TILE,
    TRITON_TYPE,
    check_int32_indexing,
    dot_precision,
    empty,
    interp_block,
    per_dtype_configs,
    tuned_kernel,
)
from tritonkit.kernels.elementwise import apply_activation


def _cfg(bm, bn, bk, warps, stages):
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Every config passes the AOT gate on sm_80 and sm_90 for the dtypes it is listed for; float32 without
# TF32 runs on FMA units and needs smaller tiles.
_C = {name: _cfg(*args) for name, args in {
    "128x128k64": (128, 128, 64, 8, 3), "128x64": (128, 64, 32, 4, 4), "64x128": (64, 128, 32, 4, 4),
    "64x64": (64, 64, 32, 4, 4), "64x32": (64, 32, 32, 2, 5), "32x64": (32, 64, 32, 2, 5),
}.items()}
_HOPPER = _cfg(128, 256, 64, 8, 3)  # two warp groups of m64n256 wgmma; spills with mma.sync
GPU_CONFIGS, _CONFIG_FOR_DTYPE = per_dtype_configs(
    half=list(_C.values()),
    float32=[_C[k] for k in ("64x64", "64x32", "32x64")],
    hopper_half=[_HOPPER],
)


def _config_for(config, dtype, arch=None, launch=None) -> bool:
    """The per-dtype lists, less the float32 64x64 tile for bias-gradient (``ROW_SUM``) launches: with the
    row sums beside the TF32 accumulator it spills 8 B on sm_80; those launches take the smaller tiles."""
    row_sum_64x64 = (dtype == torch.float32 and (launch or {}).get("ROW_SUM")
                     and (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) == (64, 64))
    return not row_sum_64x64 and _CONFIG_FOR_DTYPE(config, dtype, arch, launch)
INTERP_HEURISTICS = {
    "BLOCK_N": lambda a: interp_block(a["N"], 16, 256),
    "BLOCK_K": lambda a: interp_block(a["K"], 16, 256),
    "BLOCK_M": lambda a: interp_block(a["M"], 16, INTERP_TILE // interp_block(a["K"], 16, 256)),
    "GROUP_M": lambda a: 1,
}


def _signature(dtype):
    t = "*" + TRITON_TYPE[dtype]
    sig = {"a_ptr": t, "b_ptr": t, "bias_ptr": t, "mask_ptr": t, "c_ptr": t, "row_sum_ptr": t,
           "M": "i32", "N": "i32", "K": "i32"}
    for name in ("am", "ak", "bk", "bn", "rm", "rk", "cm", "cn"):
        sig[f"stride_{name}"] = "i32"
    sig |= {"min_val": "fp32", "max_val": "fp32"}
    for name in ("HAS_BIAS", "ACT", "HAS_MASK", "ROW_SUM", "PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
        sig[name] = "constexpr"
    return sig


def _constexprs(dtype):
    """The AOT gate's variant: a masked (input-gradient-like) launch on row-major 4096-wide operands, with
    the unit strides and multiple-of-16 sizes the JIT specializes on at such a launch."""
    typical = {"M": 4096, "N": 4096, "K": 4096, "stride_am": 4096, "stride_ak": 1, "stride_bk": 1,
               "stride_bn": 4096, "stride_rm": 4096, "stride_rk": 1, "stride_cm": 4096, "stride_cn": 1}
    return {"HAS_BIAS": True, "ACT": "relu", "HAS_MASK": True, "ROW_SUM": False, "PRECISION": "ieee", **typical}


def _weight_bias_grad_constexprs(dtype):
    """The gate's ``weight_bias_grad`` variant: dW and db of a ReLU'd 4096 x 4096 linear over 4096 rows,
    A = dy^T and R = y^T (strided views of row-major tensors), B = x."""
    typical = {"M": 4096, "N": 4096, "K": 4096, "stride_am": 1, "stride_ak": 4096, "stride_bk": 4096,
               "stride_bn": 1, "stride_rm": 1, "stride_rk": 4096, "stride_cm": 4096, "stride_cn": 1}
    return {"HAS_BIAS": False, "ACT": "", "HAS_MASK": True, "ROW_SUM": True, "PRECISION": "ieee", **typical}


@triton.jit
def _gemm_tile(
    pid, a_ptr, b_ptr, bias_ptr, mask_ptr, c_ptr, row_sum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_rm, stride_rk, stride_cm, stride_cn, min_val, max_val,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_MASK: tl.constexpr, ROW_SUM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Output tile ``pid`` of ``C = act(A' @ B + bias)`` (and of ``s``, see the module docstring); act =
    ``ACT``, "" none or a kind of ``tritonkit.kernels.elementwise`` (min_val/max_val: hardtanh's bounds)."""
    # Grouped ordering of output tiles: GROUP_M row-tiles share each column-tile of B while in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.maximum(tl.cdiv(N, BLOCK_N), 1)  # N = 0 with ROW_SUM: one column block still sums A'
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak, mask=a_mask, other=0.0)
        if HAS_MASK:
            r = tl.load(mask_ptr + rm[:, None] * stride_rm + (k0 + rk)[None, :] * stride_rk, mask=a_mask, other=0.0)
            a = tl.where(r.to(tl.float32) <= 0, tl.zeros_like(a), a)  # threshold_backward: NaN outputs pass grad
        if ROW_SUM:
            if pid_n == 0:
                row_sum += tl.sum(a.to(tl.float32), axis=1)
        b = tl.load(
            b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :] * stride_bn,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT != "":
        acc = apply_activation(acc, ACT, min_val, max_val)  # NaN stays NaN, as torch's activations keep it
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, c, mask=m_ok[:, None] & n_ok[None, :])
    if ROW_SUM:
        if pid_n == 0:
            tl.store(row_sum_ptr + rm, row_sum.to(row_sum_ptr.dtype.element_ty), mask=m_ok)


@tuned_kernel(
    "linear_gemm",
    gpu_configs=GPU_CONFIGS,
    config_for_dtype=_config_for,
    interp_heuristics=INTERP_HEURISTICS,
    key=["M", "N", "K", "HAS_MASK", "ROW_SUM"],
    signature=_signature,
    constexprs=_constexprs,
    variants={"weight_bias_grad": _weight_bias_grad_constexprs},
    tensor_core=True,
    tf32=True,
)
@triton.jit
def gemm_kernel(
    a_ptr, b_ptr, bias_ptr, mask_ptr, c_ptr, row_sum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_rm, stride_rk, stride_cm, stride_cn, min_val, max_val,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_MASK: tl.constexpr, ROW_SUM: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    _gemm_tile(
        tl.program_id(0), a_ptr, b_ptr, bias_ptr, mask_ptr, c_ptr, row_sum_ptr, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_rm, stride_rk, stride_cm, stride_cn, min_val, max_val,
        HAS_BIAS, ACT, HAS_MASK, ROW_SUM, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )


# --- the whole backward of a linear in one launch -----------------------------------------------------------
def _pair(dx, dw):
    meta = {f"{side}_{k}": v for side, tile in (("DX", dx), ("DW", dw)) for k, v in tile.kwargs.items()
            if k != "GROUP_M"}
    return triton.Config({**meta, "GROUP_M": 8}, num_warps=dx.num_warps, num_stages=dx.num_stages)


# (config, dx tile, dW tile): every pair of the GEMM's tiles compiled with the same num_warps / num_stages
# (Hopper's 128x256 only with itself); each tile must be one its own launch may use (``_config_for``).
_PAIRS = [(_pair(dx, dw), dx, dw) for dx in GPU_CONFIGS for dw in GPU_CONFIGS
          if (dx.num_warps, dx.num_stages) == (dw.num_warps, dw.num_stages)
          and (dx is dw or _HOPPER not in (dx, dw))]
BACKWARD_CONFIGS = [pair for pair, _, _ in _PAIRS]


def _backward_config_for(config, dtype, arch=None, launch=None) -> bool:
    """Each tile one its own launch may use (``_config_for``; the weight gradient's always as with the bias
    gradient's row sums, so the set does not depend on ``BIAS_GRAD``), less the pairs that spill with both
    GEMMs in one kernel: a 128x64 input-gradient tile in half precision on sm_80 (8 B) and a 64x32 one in
    float32 (16-72 B on sm_80 and sm_90)."""
    dx, dw = next((dx, dw) for pair, dx, dw in _PAIRS if pair is config)
    half = dtype != torch.float32
    spills = (dx is _C["128x64"] and half and arch is not None and arch < 90) or (dx is _C["64x32"] and not half)
    return (not spills and _config_for(dx, dtype, arch, {"ROW_SUM": False})
            and _config_for(dw, dtype, arch, {"ROW_SUM": True}))


def _dx_dims(a):
    return {"M": a["M"], "N": a["K"], "K": a["N"]}  # dx (M, K) = dy' (M, N) @ W (N, K)


def _dw_dims(a):
    return {"M": a["N"], "N": a["K"], "K": a["M"]}  # dW (N, K) = dy'^T (N, M) @ x (M, K)


# The interpreter tiles each GEMM exactly as its own launch would (the same numbers, the same programs).
BACKWARD_INTERP_HEURISTICS = {
    **{f"{side}_{k}": (lambda a, f=f, dims=dims: f(dims(a)))
       for side, dims in (("DX", _dx_dims), ("DW", _dw_dims)) for k, f in INTERP_HEURISTICS.items() if k != "GROUP_M"},
    "GROUP_M": lambda a: 1,
}


def _backward_signature(dtype):
    t = "*" + TRITON_TYPE[dtype]
    sig = {name: t for name in ("g_ptr", "x_ptr", "w_ptr", "r_ptr", "dx_ptr", "dw_ptr", "db_ptr")}
    sig |= {"M": "i32", "N": "i32", "K": "i32"}
    for name in ("gm", "gn", "rm", "rn", "xm", "xk", "wn", "wk", "dxm", "dxk", "dwn", "dwk"):
        sig[f"stride_{name}"] = "i32"
    for name in ("HAS_MASK", "BIAS_GRAD", "PRECISION", *BACKWARD_CONFIGS[0].kwargs):
        sig[name] = "constexpr"
    return sig


def _backward_constexprs(dtype):
    """The gate's variant: the backward of a ReLU'd 4096 x 4096 linear with a bias over 4096 rows, every
    operand row-major."""
    strides = {f"stride_{name}": 4096 if name.endswith(("m", "dwn", "wn")) else 1
               for name in ("gm", "gn", "rm", "rn", "xm", "xk", "wn", "wk", "dxm", "dxk", "dwn", "dwk")}
    return {"M": 4096, "N": 4096, "K": 4096, **strides, "HAS_MASK": True, "BIAS_GRAD": True, "PRECISION": "ieee"}


@tuned_kernel(
    "linear_backward",
    gpu_configs=BACKWARD_CONFIGS,
    config_for_dtype=_backward_config_for,
    interp_heuristics=BACKWARD_INTERP_HEURISTICS,
    key=["M", "N", "K", "HAS_MASK", "BIAS_GRAD"],
    signature=_backward_signature,
    constexprs=_backward_constexprs,
    tensor_core=True,
    tf32=True,
)
@triton.jit
def linear_backward_kernel(
    g_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, dw_ptr, db_ptr,
    M, N, K,
    stride_gm, stride_gn, stride_rm, stride_rn, stride_xm, stride_xk, stride_wn, stride_wk,
    stride_dxm, stride_dxk, stride_dwn, stride_dwk,
    HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    DX_BLOCK_M: tl.constexpr, DX_BLOCK_N: tl.constexpr, DX_BLOCK_K: tl.constexpr,
    DW_BLOCK_M: tl.constexpr, DW_BLOCK_N: tl.constexpr, DW_BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx, dW (and db) of ``y = act(x @ W^T + b)`` from ``dy`` (M, N): the first programs are the tiles of
    ``dx = dy' @ W`` (M, K), the rest those of ``dW = dy'^T @ x`` (N, K), whose first column block writes
    ``db = sum over rows of dy'`` as :func:`gemm_kernel`'s ``ROW_SUM``."""
    pid = tl.program_id(0)
    # cdiv by hand: each tl.cdiv is a device-function call, which the interpreter pays for per program
    num_dx = ((M + DX_BLOCK_M - 1) // DX_BLOCK_M) * ((K + DX_BLOCK_N - 1) // DX_BLOCK_N)
    if pid < num_dx:
        _gemm_tile(
            pid, g_ptr, w_ptr, dx_ptr, r_ptr, dx_ptr, dx_ptr, M, K, N,
            stride_gm, stride_gn, stride_wn, stride_wk, stride_rm, stride_rn, stride_dxm, stride_dxk, 0.0, 0.0,
            False, "", HAS_MASK, False, PRECISION, DX_BLOCK_M, DX_BLOCK_N, DX_BLOCK_K, GROUP_M,
        )
    else:
        _gemm_tile(
            pid - num_dx, g_ptr, x_ptr, dw_ptr, r_ptr, dw_ptr, db_ptr, N, K, M,
            stride_gn, stride_gm, stride_xm, stride_xk, stride_rn, stride_rm, stride_dwn, stride_dwk, 0.0, 0.0,
            False, "", HAS_MASK, BIAS_GRAD, PRECISION, DW_BLOCK_M, DW_BLOCK_N, DW_BLOCK_K, GROUP_M,
        )


def gemm(a, b, *, bias=None, activation=None, mask=None, out=None, row_sum=None, allow_tf32=False):
    """``act((a * (mask > 0)) @ b + bias)`` for 2-D ``a`` (M, K), ``b`` (K, N), any strides; ``act`` =
    ``activation``, None or ``(kind, min_val, max_val)`` (a kind of ``tritonkit.kernels.elementwise``).

    ``out`` (M, N) may be given (any strides) to write into; otherwise a contiguous one is allocated.
    ``row_sum`` (M,) given: the same launch also writes ``sum_k (a * (mask > 0))[m, k]`` into it.
    """
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = empty((M, N), dtype=a.dtype, device=a.device)
    check_int32_indexing(a, b, mask, out, row_sum)
    if M == 0 or (N == 0 and row_sum is None):
        return out
    if K == 0:
        out.copy_(bias.expand(M, N) if bias is not None else torch.zeros((), dtype=a.dtype, device=a.device))
        if activation is not None:
            out.copy_(elementwise.activation(out, *activation))
        if row_sum is not None:
            row_sum.zero_()
        return out
    r = mask if mask is not None else a
    kind_args = activation or ("", 0.0, 0.0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * max(1, triton.cdiv(N, meta["BLOCK_N"])),)

    gemm_kernel[grid](
        a, b, bias if bias is not None else out, r, out, row_sum if row_sum is not None else out,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), r.stride(0), r.stride(1), out.stride(0), out.stride(1),
        float(kind_args[1]), float(kind_args[2]), HAS_BIAS=bias is not None, ACT=kind_args[0],
        HAS_MASK=mask is not None, ROW_SUM=row_sum is not None,
        PRECISION=dot_precision(a.dtype, allow_tf32),
    )
    return out


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """View ``(*, D)`` as ``(prod(*), D)``; copies only when the leading dims cannot be merged."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])  # not -1: ambiguous when D is 0


def linear(x, weight, bias=None, *, activation=None, allow_tf32=False):
    """``act(x @ weight^T + bias)`` for ``x`` (*, K) and ``weight`` (N, K), ``act`` as in :func:`gemm`."""
    out = gemm(_as_rows(x), weight.t(), bias=bias, activation=activation, allow_tf32=allow_tf32)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_input_grad(grad_out, weight, relu_output=None, *, allow_tf32=False):
    """``dx = (dy * (y > 0)) @ weight`` for ``dy`` (*, N) and ``weight`` (N, K)."""
    g = _as_rows(grad_out)
    r = _as_rows(relu_output) if relu_output is not None else None
    out = gemm(g, weight, mask=r, allow_tf32=allow_tf32)
    return out.view(*grad_out.shape[:-1], weight.shape[1])


def linear_weight_grad(grad_out, x, relu_output=None, *, bias_grad=None, allow_tf32=False):
    """``dW = (dy * (y > 0))^T @ x`` summed over every leading dim: (N, K). Given ``bias_grad`` (N,), the
    same launch also writes ``db = sum of dy * (y > 0)`` over every leading dim into it."""
    g = _as_rows(grad_out)
    r = _as_rows(relu_output) if relu_output is not None else None
    return gemm(g.t(), _as_rows(x), mask=r.t() if r is not None else None, row_sum=bias_grad, allow_tf32=allow_tf32)


def linear_weight_bias_grad(grad_out, x, relu_output=None, *, allow_tf32=False):
    """``(dW, db)`` of a linear from one GEMM launch: ``dW`` as :func:`linear_weight_grad`, ``db`` (N,) in
    ``grad_out``'s dtype (float32 sums, as eager's ``sum``)."""
    db = empty((grad_out.shape[-1],), dtype=grad_out.dtype, device=grad_out.device)
    return linear_weight_grad(grad_out, x, relu_output, bias_grad=db, allow_tf32=allow_tf32), db


def linear_backward(grad_out, x, weight, relu_output=None, *, bias_grad=False, allow_tf32=False):
    """``(dx, dW, db)`` of ``y = act(x @ weight^T + b)`` from one launch: ``dx`` as :func:`linear_input_grad`,
    ``dW`` as :func:`linear_weight_grad`, ``db`` as :func:`linear_weight_bias_grad` when ``bias_grad``, else
    None."""
    g = _as_rows(grad_out)
    xr = _as_rows(x)
    r = _as_rows(relu_output) if relu_output is not None else g
    (M, N), K = g.shape, weight.shape[1]
    dx = empty((M, K), dtype=g.dtype, device=g.device)
    dw = empty((N, K), dtype=g.dtype, device=g.device)
    db = empty((N,), dtype=g.dtype, device=g.device) if bias_grad else None
    check_int32_indexing(g, xr, weight, r, dx, dw, db)

    def grid(meta):
        dw_n = max(1, triton.cdiv(K, meta["DW_BLOCK_N"])) if bias_grad else triton.cdiv(K, meta["DW_BLOCK_N"])
        return (triton.cdiv(M, meta["DX_BLOCK_M"]) * triton.cdiv(K, meta["DX_BLOCK_N"])
                + triton.cdiv(N, meta["DW_BLOCK_M"]) * dw_n,)

    if M * K + N * K + (N if bias_grad else 0) > 0:
        linear_backward_kernel[grid](
            g, xr, weight, r, dx, dw, db if db is not None else dw,
            M, N, K,
            g.stride(0), g.stride(1), r.stride(0), r.stride(1), xr.stride(0), xr.stride(1),
            weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1), dw.stride(0), dw.stride(1),
            HAS_MASK=relu_output is not None, BIAS_GRAD=bias_grad, PRECISION=dot_precision(g.dtype, allow_tf32),
        )
    return dx.view(*grad_out.shape[:-1], K), dw, db
