"""conv2d forward, input gradient and weight gradient as implicit GEMMs (no im2col buffer in memory).

Shapes: input x (N, C, H, W), weight w (OC, C/G, KH, KW), output y (N, OC, OH, OW), G groups with
Cg = C/G input and OCg = OC/G output channels each. All tensors are addressed through their four
strides, so NCHW, channels_last and strided views are read in place.

forward, per group g (the grid's second axis):
    y[n, oc, oh, ow] = act( bias[oc] + sum_{c, kh, kw} x[n, c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]
                                                      * w[oc, c, kh, kw] )
    GEMM rows (n, oh, ow), columns oc, reduction k = (kh, kw, c), c fastest: contiguous in channels_last.
    The input offset of (row, k) splits into row_part[row] + k_part[k], so only the padding mask is
    computed per element.
    Fused epilogue (conv2d_fwd_bn_kernel, conv2d_relu_maxpool_fwd_kernel before its pool), float32,
    rounded once: y = act(BN(acc + bias[oc]) + residual) with eval-mode BatchNorm read from its
    parameters, BN(v) = (v - running_mean[oc]) * (bn_weight[oc] / sqrt(running_var[oc] + eps)) + bn_bias[oc],
    centred first as eager's eval BatchNorm, so large-mean activations do not cancel.

input gradient (dy' = dy * (y > 0) when the forward fused ReLU, applied while loading dy):
    dx[n, c, h, w] = sum_{oc, kh, kw} dy'[n, oc, oh, ow] * w[oc, c, kh, kw]
        where oh = (h + ph - kh*dh) / sh and ow = (w + pw - kw*dw) / sw are whole and in range.
    With stride > 1 most (h, kh) pairs give no whole oh, so the rows are split by phase (h mod sh,
    w mod sw; one grid slice each) and a phase visits only its own taps. In rows, with g = gcd(sh, dh):
    h = qh + th*sh takes the taps kh = kh0 + j*(sh/g), where kh0 in [0, sh/g) solves
    (qh + ph - kh0*dh) = 0 mod sh (none: the rows get zeros), and then oh = th + bh - j*(dh/g) with
    bh = (qh + ph - kh0*dh) / sh. Unit stride is the one-phase case (kh0 = 0, bh = ph, oh = h + ph - kh*dh).
    GEMM rows (n, th, tw), columns c, reduction k = (j, i, oc) over the phase's taps.
    Residual epilogue (a ResNet block's identity or downsample branch): dx += residual, or
    dx += threshold_backward(residual, residual_mask, 0) = residual where residual_mask > 0 (NaN passes),
    added to the float32 accumulator before the one rounding; every dx element belongs to exactly one
    phase's rows (a phase without taps stores 0 + residual), so the residual is added exactly once.

weight gradient:
    dw[oc, c, kh, kw] = sum_{n, oh, ow} dy'[n, oc, oh, ow] * x[n, c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]
    GEMM rows oc, columns (kh, kw, c), reduction over the N*OH*OW output positions, optionally split
    across programs (split-K, float32 partial sums reduced afterwards) when the GEMM has few tiles.
    With the bias gradient, db[oc] = sum_{n, oh, ow} dy'[n, oc, oh, ow] comes from the same launch: the
    programs of the first column block sum the dy' tiles they load anyway (float32, no atomics); with
    split-K its partials sit beside the weight's and are reduced with them in one fixed order."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from tritonkit.kernels.common import (
    INTERP_TILE,
    REGISTRY,
    TRITON_TYPE,
    check_int32_indexing,
    dot_precision,
    empty,
    per_dtype_configs,
    per_flag_configs,
    tuned_kernel,
)
from tritonkit.kernels.elementwise import (
    ACTIVATIONS,
    apply_activation,
    apply_prologue,
    grad_through_prologue,
    prologue_args,
    prologue_coefficients,
)
from tritonkit.kernels.pool import pool_output_size
from tritonkit.runtime import INTERPRET


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Rows are output pixels (many), columns are channels (often few). Every config here passes the AOT
# gate (no spills, shared memory in bounds) for sm_80 and sm_90 in the dtypes it is listed for:
# float32 without TF32 runs tl.dot on FMA units and spills at tile sizes that half precision handles.
_C = {name: _cfg(*args) for name, args in {
    "128x128w8": (128, 128, 32, 8, 2), "128x64w8": (128, 64, 32, 8, 2), "128x64w4": (128, 64, 32, 4, 2),
    "64x128w4": (64, 128, 32, 4, 2), "64x64w4": (64, 64, 32, 4, 2), "64x64w4s3": (64, 64, 32, 4, 3),
    "128x32w4": (128, 32, 32, 4, 2), "64x32w4": (64, 32, 32, 4, 2), "128x16w4": (128, 16, 32, 4, 2),
    "32x32w2": (32, 32, 32, 2, 2), "32x32w4": (32, 32, 32, 4, 2), "64x64w4s1": (64, 64, 32, 4, 1),
}.items()}
def _pick(*names):
    return [_C[k] for k in names]


# Each kernel's lists by reduction order (CHANNEL_INNER, see channel_inner()): the channel-chunked path
# loads whole channel vectors (cp.async, no registers held), the flattened path for few channels gathers
# element by element and holds more in registers, so it takes smaller tiles.
GPU_CONFIGS, CONFIG_FOR_DTYPE = per_flag_configs(
    "CHANNEL_INNER",
    when_set=per_dtype_configs(
        half=_pick("128x128w8", "128x64w8", "128x64w4", "64x128w4", "64x64w4", "64x64w4s3", "128x32w4", "64x32w4",
                   "128x16w4", "32x32w2"),
        float32=_pick("128x64w8", "64x64w4", "64x64w4s3", "128x16w4", "32x32w2"),
    ),
    when_clear=per_dtype_configs(
        half=_pick("64x64w4", "64x64w4s3", "64x32w4", "128x16w4", "32x32w4"),
        float32=_pick("64x64w4", "64x64w4s3"),
    ),
)
# Input gradient: the stride-1 and strided variants both pass the gate with the channel-chunked lists.
DGRAD_GPU_CONFIGS, DGRAD_CONFIG_FOR_DTYPE = per_flag_configs(
    "CHANNEL_INNER",
    when_set=per_dtype_configs(
        half=_pick("128x128w8", "128x64w8", "64x64w4", "64x64w4s3", "64x32w4", "128x16w4"),
        float32=_pick("64x64w4s1", "128x16w4", "32x32w4"),
    ),
    when_clear=per_dtype_configs(
        half=_pick("128x64w8", "64x64w4", "64x64w4s3", "64x32w4"),
        float32=_pick("64x64w4s1"),
    ),
)
# conv + ReLU + max-pool keeps a running maximum tile beside the accumulator: smaller tiles. With few
# channels one tile of six tried spills on neither arch in any dtype, and one more (wgmma-sized) on sm_90.
_POOL_FEW = _cfg(32, 32, 16, 2, 1)
POOL_GPU_CONFIGS, POOL_CONFIG_FOR_DTYPE = per_flag_configs(
    "CHANNEL_INNER",
    when_set=per_dtype_configs(
        half=_pick("128x64w8", "64x64w4", "64x64w4s3", "128x32w4", "64x32w4", "128x16w4", "32x32w2"),
        float32=[_cfg(64, 16, 32, 2, 1)],  # the one float32 tile (of 7 tried) that spills on neither arch
    ),
    when_clear=per_dtype_configs(half=[_POOL_FEW], float32=[_POOL_FEW], hopper_half=[_cfg(64, 32, 16, 4, 1)]),
)
# Weight gradient: rows are output channels, columns (kh, kw, c), reduction over pixels.
_W = {name: _cfg(*args) for name, args in {
    "64x64": (64, 64, 32, 4, 2), "64x128w8": (64, 128, 32, 8, 2),
    "128x64w8": (128, 64, 32, 8, 2), "32x64": (32, 64, 32, 4, 2), "16x64k64": (16, 64, 64, 4, 2),
    "16x128": (16, 128, 32, 4, 2), "32x32w2": (32, 32, 32, 2, 2),
    # the largest tile amortizes the per-step pixel indexing (main loop ~300 SASS instructions at either
    # size on sm_90) over 4x the MMA work of 64x64; with BLOCK_K 64 it spills in LeNet's NCHW launch
    "128x128w8": (128, 128, 32, 8, 2),
}.items()}
WGRAD_GPU_CONFIGS, _WGRAD_CONFIG_FOR_DTYPE = per_dtype_configs(
    half=list(_W.values()),
    float32=[_W[k] for k in ("64x64", "64x128w8", "32x64", "16x128", "32x32w2")],  # 16x64k64 spills in TF32
)
# Tiles whose bias-gradient launches (HAS_BIAS_GRAD: the dy' row sums held beside the accumulator) spill
# registers on sm_80 or sm_90 with Triton 3.9 (AOT gate); those launches autotune over the others.
_WGRAD_BIAS_SPILLS = {"half": ("64x64", "128x64w8", "128x128w8"), "float32": ("64x64", "64x128w8", "32x32w2")}


def _tile(config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps)


def wgrad_config_for(config, dtype, arch=None, launch=None) -> bool:
    """The weight gradient's per-dtype lists, less the tiles listed in ``_WGRAD_BIAS_SPILLS`` for
    bias-gradient launches."""
    if (launch or {}).get("HAS_BIAS_GRAD"):
        spills = _WGRAD_BIAS_SPILLS["float32" if dtype == torch.float32 else "half"]
        if _tile(config) in {_tile(_W[name]) for name in spills}:
            return False
    return _WGRAD_CONFIG_FOR_DTYPE(config, dtype, arch, launch)


# Interpreter tiles. The interpreter's cost is mostly Python work per Triton operation (0.05-0.2 ms;
# int32 arithmetic is checked for overflow, several operations more) plus numpy work per element, so
# a launch should run as few program instances and reduction steps as its shape allows, with tiles
# mostly in bounds. Capped tiles (64 columns, 128-channel steps) made ResNet-18's many-channel layers
# at small spatial size run 8-144 programs where one to five do. _interp_tiles picks, among
# power-of-two tiles of at most INTERP_TILE elements per 2-D operand, the one of lowest modelled cost
# (constants fitted on a 2-core CPU with Triton 3.9: seconds per program, per reduction step, per
# element loaded or stored, per multiply-add).
_INTERP_COST = {"program": 10e-3, "step": 5e-3, "element": 4e-8, "mac": 1e-10}
_INTERP_LIMIT = None  # set by interp_block_limit()
# Rows of the implicit GEMM (output pixels) per BatchNorm-statistics partial: a statistics launch's
# BLOCK_M is a multiple of it, so the partials' layout does not depend on the tile the autotuner picks.
BN_STAT_ROWS = 64


@contextlib.contextmanager
def interp_block_limit(limit: int):
    """Within this block interpreter tiles are at most ``limit`` (a power of two >= 16) in every
    dimension, so launches run several programs and channel chunks: tests use it to exercise the
    paths that tiles covering the whole problem skip."""
    global _INTERP_LIMIT
    previous, _INTERP_LIMIT = _INTERP_LIMIT, limit
    try:
        yield
    finally:
        _INTERP_LIMIT = previous


@functools.lru_cache(maxsize=4096)
def _interp_tiles(rows: int, cols: int, red: int, passes: int = 1, min_rows: int = 16,
                  limit: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for a GEMM of ``rows`` x ``cols`` whose reduction runs ``passes``
    times over ``red`` (the channel-chunked path: passes = taps, red = channels per tap); BLOCK_M is
    a multiple of ``min_rows`` (a power of two), which ``limit`` does not lower."""
    cost = _INTERP_COST

    def sizes(n, lo=16):
        top = max(lo, min(triton.next_power_of_2(max(int(n), lo)), limit or INTERP_TILE // 16))
        return [1 << p for p in range(lo.bit_length() - 1, top.bit_length())]

    best = None
    for bm in sizes(rows, min_rows):
        for bn in sizes(cols):
            if bm * bn > INTERP_TILE:
                break
            for bk in sizes(red):
                if bm * bk > INTERP_TILE or bk * bn > INTERP_TILE:
                    break
                steps = passes * triton.cdiv(red, bk)
                per_step = cost["step"] + cost["element"] * (bm * bk + bk * bn) + cost["mac"] * bm * bn * bk
                total = triton.cdiv(rows, bm) * triton.cdiv(cols, bn) * (
                    cost["program"] + cost["element"] * bm * bn + steps * per_step)
                if best is None or total < best[0]:
                    best = (total, (bm, bn, bk))
    return best[1]


def _gemm_heuristics(shape):
    """``triton.heuristics`` values from ``shape(args) -> (rows, cols, red, passes)``."""
    def block(i):
        return lambda a: _interp_tiles(*shape(a), limit=_INTERP_LIMIT)[i]

    return {"BLOCK_M": block(0), "BLOCK_N": block(1), "BLOCK_K": block(2)}


def _fwd_reduction(a):  # (span of one pass, passes): channels of each tap, or the whole flattened k once
    return (a["Cg"], a["KH"] * a["KW"]) if a["CHANNEL_INNER"] else (a["KH"] * a["KW"] * a["Cg"], 1)


FWD_INTERP = _gemm_heuristics(  # statistics tiles are whole BN_STAT_ROWS-row groups
    lambda a: (a["N"] * a["OH"] * a["OW"], a["OCg"], *_fwd_reduction(a), BN_STAT_ROWS if a.get("STATS") else 16))


def _dgrad_shape(a):  # per phase: rows, input channels, the phase's taps over output channels; stats tiles
    taps = triton.cdiv(a["KH"], a["tap_h"]) * triton.cdiv(a["KW"], a["tap_w"])
    rows = a["N"] * triton.cdiv(a["H"], a["stride_h"]) * triton.cdiv(a["W"], a["stride_w"])
    return (rows, a["Cg"], *((a["OCg"], taps) if a["CHANNEL_INNER"] else (a["OCg"] * taps, 1)),
            BN_STAT_ROWS if a.get("GRAD_STATS") else 16)


DGRAD_INTERP = _gemm_heuristics(_dgrad_shape)
WGRAD_INTERP = _gemm_heuristics(lambda a: (a["OCg"], a["KH"] * a["KW"] * a["Cg"], a["N"] * a["OH"] * a["OW"], 1))

_SHAPE_ARGS = ("N", "C", "H", "W", "OC", "OH", "OW", "KH", "KW", "Cg", "OCg")
_CONV_ARGS = ("stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")


def _strides(*names):
    return [f"s{n}{d}" for n in names for d in "nchw"]


def _typical(n=32, c=64, hw=56, oc=64, k=3, pad=1, **layouts):
    """The AOT gate's variant: the usual values of runtime ints at a launch, by default ResNet-style
    (batch 32, 64 -> 64 channels, 3x3, stride 1, padding 1, 56x56), so it compiles what the JIT
    specializes (unit strides become constants, multiples of 16 are marked divisible). ``layouts``
    maps each tensor's stride prefix to "nhwc" (channels_last) or "nchw" (contiguous); weights
    (prefixes w, dw: OC x C x KH x KW) are named the same way."""
    out = hw + 2 * pad - k + 1
    dims = {"x": (c, hw), "dx": (c, hw), "res": (c, hw), "rmask": (c, hw), "z": (c, hw), "z2": (c, hw),
            "y": (oc, out), "g": (oc, out), "r": (oc, out), "w": (c, k), "dw": (c, k)}
    values = {"N": n, "C": c, "H": hw, "W": hw, "OC": oc, "OH": out, "OW": out, "KH": k, "KW": k, "Cg": c,
              "OCg": oc, "stride_h": 1, "stride_w": 1, "pad_h": pad, "pad_w": pad, "dil_h": 1, "dil_w": 1}
    for prefix, layout in layouts.items():
        ch, size = dims[prefix]
        strides = (size * size * ch, 1, size * ch, ch) if layout == "nhwc" else (ch * size * size, size * size, size, 1)
        values.update(zip((f"s{prefix}{d}" for d in "nchw"), strides))
    return values


# float32 buffers whatever the activations' dtype: split-K partial sums, BN statistics; per-channel
# vectors (BatchNorm parameters and running statistics, the input prologue's statistics) may be
# float32 or the input's dtype and are float32 in the gate (BatchNorm's parameters and buffers stay
# float32 under autocast).
_BN_EVAL_POINTERS = ("bn_weight_ptr", "bn_bias_ptr", "mean_ptr", "var_ptr")
_PROLOGUE_POINTERS = ("in_mean_ptr", "in_rstd_ptr", "in_w_ptr", "in_b_ptr")
# GRAD_STATS 3, 4: the BatchNorms' inputs and means, the second's partials
_GRAD_BN_POINTERS = ("z_ptr", "z2_ptr", "z_mean_ptr", "z2_mean_ptr", "stats2_ptr")
_FLOAT32_POINTERS = ("partial_ptr", "stats_ptr", "z_mean_ptr", "z2_mean_ptr", "stats2_ptr", *_BN_EVAL_POINTERS,
                     *_PROLOGUE_POINTERS)


def _signature(pointers, strides, constexprs, extra_ints=(), floats=()):
    def signature(dtype):
        t = "*" + TRITON_TYPE[dtype]
        sig = {p: ("*fp32" if p in _FLOAT32_POINTERS else t) for p in pointers}
        sig.update({a: "i32" for a in (*_SHAPE_ARGS, *_CONV_ARGS, *extra_ints, *strides)})
        sig.update({a: "fp32" for a in floats})
        sig.update({c: "constexpr" for c in (*constexprs, "BLOCK_M", "BLOCK_N", "BLOCK_K")})
        return sig

    return signature


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _unflatten(index, middle, inner):
    """(outer, mid, in) with index = (outer * middle + mid) * inner + in: a flattened 3-D index split."""
    low = index % inner
    mid = (index // inner) % middle
    return index // (middle * inner), mid, low


@triton.jit
def _next_chunk(c0, kw, kh, C, KW, BLOCK: tl.constexpr):
    """The channel-chunked reduction's next step: channels from c0 + BLOCK, else the next tap (kh, kw)
    of a KW-wide row of taps, from channel 0. Counters, so a step divides nothing."""
    c0 += BLOCK
    next_tap = c0 >= C
    c0 = tl.where(next_tap, 0, c0)
    kw = tl.where(next_tap, kw + 1, kw)
    next_row = kw >= KW
    return c0, tl.where(next_row, 0, kw), tl.where(next_row, kh + 1, kh)


@triton.jit
def _conv_fwd_reduce(
    acc, x_row, w_ptr, ih0, iw0, m_ok, oc, n_ok,
    H, W, KH, KW, Cg, dil_h, dil_w, sxc, sxh, sxw, swn, swc, swh, sww,
    in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, c_base,
    PADDED: tl.constexpr, CHANNEL_INNER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
    PROLOGUE: tl.constexpr,
):
    """``acc`` plus the implicit-GEMM product over the whole reduction k = (kh, kw, c).

    CHANNEL_INNER (many channels): one step is one tap (kh, kw) and BLOCK_K consecutive channels, so
    the tap, its padding test and its address offset are scalars per step and only the channel tail
    is masked per column. Otherwise (few channels, e.g. 3 or 6) a step is BLOCK_K consecutive k of
    the flattened reduction, spanning taps, which wastes no lanes but splits k per column.
    PROLOGUE (1: a BatchNorm apply, 2: and ReLU) transforms x per input channel ``c_base + c`` as it is
    loaded (``kernels.elementwise.apply_prologue``).
    """
    if CHANNEL_INNER:
        rc = tl.arange(0, BLOCK_K)
        x_tile = x_row[:, None] + (rc * sxc)[None, :]
        w_tile = w_ptr + oc[None, :] * swn + (rc * swc)[:, None]
        c0 = 0  # the step's tap (kh, kw) and first channel c0 advance as counters: no division per step
        kh = 0
        kw = 0
        for _ in range(0, KH * KW * tl.cdiv(Cg, BLOCK_K)):
            row_ok = m_ok
            if PADDED:
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                row_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c_ok = (c0 + rc) < Cg
            a_mask = row_ok[:, None] & c_ok[None, :]
            a = tl.load(x_tile + (c0 * sxc + kh * dil_h * sxh + kw * dil_w * sxw), mask=a_mask, other=0.0)
            if PROLOGUE:
                mean, k, beta = prologue_coefficients(in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, c_base + c0 + rc,
                                                       c_ok)
                a = apply_prologue(a, a_mask, mean, k, beta, PROLOGUE)
            b = tl.load(w_tile + (c0 * swc + kh * swh + kw * sww), mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            c0, kw, kh = _next_chunk(c0, kw, kh, Cg, KW, BLOCK_K)
    else:
        K = KH * KW * Cg
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kh, kw, c = _unflatten(rk, KW, Cg)
            k_ok = rk < K
            a_mask = m_ok[:, None] & k_ok[None, :]
            if PADDED:  # 0 <= ih0 + kh*dil_h < H, compared without forming the sum
                kh_d = kh * dil_h
                kw_d = kw * dil_w
                a_mask = (a_mask & (ih0[:, None] >= -kh_d[None, :]) & (ih0[:, None] < (H - kh_d)[None, :])
                          & (iw0[:, None] >= -kw_d[None, :]) & (iw0[:, None] < (W - kw_d)[None, :]))
            x_col = c * sxc + kh * dil_h * sxh + kw * dil_w * sxw
            a = tl.load(x_row[:, None] + x_col[None, :], mask=a_mask, other=0.0)
            if PROLOGUE:
                mean, k, beta = prologue_coefficients(in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, c_base + c, k_ok)
                a = apply_prologue(a, a_mask, mean, k, beta, PROLOGUE)
            w_off = oc[None, :] * swn + (c * swc + kh * swh + kw * sww)[:, None]
            b = tl.load(w_ptr + w_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _add_bias(acc, b_ptr, oc, n_ok, HAS_BIAS: tl.constexpr):
    """acc + bias[oc], in float32 (bias optional)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + oc, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _bn_eval_coefficients(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, eps, oc, n_ok,
                          HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr):
    """Eval-mode BatchNorm per output channel, float32 [BLOCK_N] vectors (mean, k, beta):
    mean = running_mean[oc], k = bn_weight[oc] / sqrt(running_var[oc] + eps) (bn_weight = 1 without
    affine), beta = bn_bias[oc] (0 without affine); ``_bn_eval`` applies them. 1/sqrt is correctly
    rounded (div_rn, sqrt_rn) like eager's invstd."""
    mean = tl.load(mean_ptr + oc, mask=n_ok, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + oc, mask=n_ok, other=1.0).to(tl.float32)
    k = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if HAS_BN_WEIGHT:
        k = k * tl.load(bn_weight_ptr + oc, mask=n_ok, other=0.0).to(tl.float32)
    beta = tl.zeros_like(k)
    if HAS_BN_BIAS:
        beta = tl.load(bn_bias_ptr + oc, mask=n_ok, other=0.0).to(tl.float32)
    return mean, k, beta


@triton.jit
def _bn_eval(v, mean, k, beta):
    """(v - mean) * k + beta per column, float32: centred first, as eager's eval BatchNorm, so a
    large-mean activation keeps its low bits (v * k + (beta - mean * k) would cancel them)."""
    return (v - mean[None, :]) * k[None, :] + beta[None, :]


@triton.jit
def _activate(acc, ACT: tl.constexpr, min_val, max_val):
    """``ACT`` ("" none, else a kind of ``tritonkit.kernels.elementwise.ACTIVATIONS``) of the float32 tile."""
    if ACT != "":
        acc = apply_activation(acc, ACT, min_val, max_val)  # NaN stays NaN, as torch's activations keep it
    return acc


_STAT_ROWS = tl.constexpr(BN_STAT_ROWS)


@triton.jit
def _store_bn_partials(stats_ptr, v, pid_m, M, oc, n_ok, OC, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Welford partials of ``v`` (float32 [BLOCK_M, BLOCK_N], rows pid_m * BLOCK_M + i) per
    _STAT_ROWS-row tile t and channel oc: stats[t, 0, oc] = valid rows, [t, 1, oc] = their mean,
    [t, 2, oc] = M2 = sum of squared deviations from that mean (two passes over the tile in registers,
    so no cancellation). Rows >= M count for nothing; tiles past the last are not stored."""
    TILES: tl.constexpr = BLOCK_M // _STAT_ROWS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < M
    v = tl.where(ok[:, None], v, 0.0)
    if TILES == 1:
        count = tl.sum(ok.to(tl.float32), axis=0)
        mean = tl.sum(v, axis=0) / tl.maximum(count, 1.0)
        dev = tl.where(ok[:, None], v - mean[None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=0)
        t = pid_m
        count = tl.zeros_like(mean) + count
        t_ok = n_ok
        base = stats_ptr + t * (3 * OC) + oc
    else:
        ok3 = tl.reshape(ok, (TILES, _STAT_ROWS))
        v3 = tl.reshape(v, (TILES, _STAT_ROWS, BLOCK_N))
        count = tl.sum(ok3.to(tl.float32), axis=1)  # [TILES]
        mean = tl.sum(v3, axis=1) / tl.maximum(count, 1.0)[:, None]
        dev = tl.where(ok3[:, :, None], v3 - mean[:, None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=1)
        t = pid_m * TILES + tl.arange(0, TILES)
        count = tl.zeros_like(mean) + count[:, None]
        t_ok = (t < tl.cdiv(M, _STAT_ROWS))[:, None] & n_ok[None, :]
        base = stats_ptr + (t * (3 * OC))[:, None] + oc[None, :]
    tl.store(base, count, mask=t_ok)
    tl.store(base + OC, mean, mask=t_ok)
    tl.store(base + 2 * OC, m2, mask=t_ok)


@tuned_kernel(
    "conv2d_fwd",
    gpu_configs=GPU_CONFIGS,
    config_for_dtype=CONFIG_FOR_DTYPE,
    interp_heuristics=FWD_INTERP,
    key=["N", "C", "H", "W", "OC", "KH", "KW", "Cg"],
    signature=_signature(("x_ptr", "w_ptr", "b_ptr", "y_ptr"), _strides("x", "w", "y"),
                         ("HAS_BIAS", "ACT", "PADDED", "CHANNEL_INNER", "PRECISION"), floats=("min_val", "max_val")),
    constexprs=lambda dtype: {"HAS_BIAS": True, "ACT": "relu", "PADDED": True, "CHANNEL_INNER": True,
                              "PRECISION": "ieee", **_typical(x="nhwc", w="nhwc", y="nhwc")},
    variants={"few_channels": lambda dtype: {  # the seed's LeNet conv2 (6 -> 16, 5x5 at 14x14, NCHW)
        "HAS_BIAS": True, "ACT": "relu", "PADDED": False, "CHANNEL_INNER": False, "PRECISION": "ieee",
        **_typical(n=16, c=6, hw=14, oc=16, k=5, pad=0, x="nchw", w="nchw", y="nchw")}},
    tensor_core=True,
    tf32=True,
)
@triton.jit
def conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, swn, swc, swh, sww, syn, syc, syh, syw, min_val, max_val,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PADDED: tl.constexpr, CHANNEL_INNER: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = act(conv + bias), act = ``ACT`` (``_activate``; min_val/max_val: hardtanh's bounds). The
    fused variants (BatchNorm epilogue, residual, statistics, input prologue) are conv2d_fwd_bn_kernel,
    so this launch compiles exactly as before they existed."""
    group = tl.program_id(2)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ow = rm % OW
    oh = (rm // OW) % OH
    n = rm // (OW * OH)
    m_ok = rm < N * OH * OW
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    oc = group * OCg + rn
    n_ok = rn < OCg
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = x_ptr + n * sxn + ih0 * sxh + iw0 * sxw + group * Cg * sxc
    acc = _conv_fwd_reduce(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_row, w_ptr, ih0, iw0, m_ok, oc, n_ok,
                           H, W, KH, KW, Cg, dil_h, dil_w, sxc, sxh, sxw, swn, swc, swh, sww,
                           x_ptr, x_ptr, x_ptr, x_ptr, 0, PADDED, CHANNEL_INNER, PRECISION, BLOCK_K, 0)
    acc = _activate(_add_bias(acc, b_ptr, oc, n_ok, HAS_BIAS), ACT, min_val, max_val)
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + (oc * syc)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_FWD_POINTERS = ("x_ptr", "w_ptr", "b_ptr", "y_ptr", *_BN_EVAL_POINTERS, "r_ptr", "stats_ptr", *_PROLOGUE_POINTERS)
_BN_EVAL_FLAGS = ("BATCH_NORM", "HAS_BN_WEIGHT", "HAS_BN_BIAS")
_FWD_FLAGS = ("HAS_BIAS", "ACT", "PADDED", "CHANNEL_INNER", "PRECISION", *_BN_EVAL_FLAGS, "HAS_RESIDUAL", "STATS",
              "PROLOGUE")
_NO_BN = {"BATCH_NORM": False, "HAS_BN_WEIGHT": False, "HAS_BN_BIAS": False}
_BN_AFFINE = {"BATCH_NORM": True, "HAS_BN_WEIGHT": True, "HAS_BN_BIAS": True}
_FWD_PLAIN = {"HAS_BIAS": True, "ACT": "relu", "PADDED": True, "CHANNEL_INNER": True, "PRECISION": "ieee",
              **_NO_BN, "HAS_RESIDUAL": False, "STATS": False, "PROLOGUE": 0}


def _fwd_bn_config_for(config, dtype, arch=None, launch=None) -> bool:
    """CONFIG_FOR_DTYPE, and for statistics launches only tiles of whole BN_STAT_ROWS-row groups, less
    the float32 128x16 tile (its statistics epilogue spills 16 B on sm_80 with an FMA dot); float32
    launches with an activation beyond ReLU / hardtanh (hardswish's epilogue: 8 B on sm_80) skip the
    128x64 8-warp tile."""
    launch = launch or {}
    if launch.get("STATS") and (config.kwargs["BLOCK_M"] % BN_STAT_ROWS or (
            dtype == torch.float32 and config is _C["128x16w4"])):
        return False
    if dtype == torch.float32 and launch.get("ACT", "") not in ("", "relu", "hardtanh") and config is _C["128x64w8"]:
        return False
    return CONFIG_FOR_DTYPE(config, dtype, arch, launch)


# conv2d_fwd_bn's pattern: ResNet basic block's second conv in inference (conv + eval BatchNorm + residual + ReLU);
# variants: a pointwise conv + eval BatchNorm + hardswish (MobileNetV3, inference); training's conv writing
# BatchNorm partial statistics, ResNet-style, with its input normalised (BN + ReLU) on load, and on the stem
# (3 -> 64, 7x7 stride 2 at 224x224, NCHW input).
@tuned_kernel(
    "conv2d_fwd_bn",
    gpu_configs=GPU_CONFIGS,
    config_for_dtype=_fwd_bn_config_for,
    interp_heuristics=FWD_INTERP,
    key=["N", "C", "H", "W", "OC", "KH", "KW", "Cg", "STATS", "BATCH_NORM", "HAS_RESIDUAL", "PROLOGUE"],
    signature=_signature(_FWD_POINTERS, _strides("x", "w", "y", "r"), _FWD_FLAGS,
                         floats=("eps", "min_val", "max_val")),
    constexprs=lambda dtype: {**_FWD_PLAIN, "HAS_BIAS": False, **_BN_AFFINE, "HAS_RESIDUAL": True,
                              **_typical(x="nhwc", w="nhwc", y="nhwc", r="nhwc")},
    variants={
        "hardswish_1x1": lambda dtype: {  # MobileNetV3's expansion conv 40 -> 240 at 28x28
            **_FWD_PLAIN, "HAS_BIAS": False, **_BN_AFFINE, "ACT": "hardswish", "PADDED": False,
            **_typical(c=40, hw=28, oc=240, k=1, pad=0, x="nhwc", w="nhwc", y="nhwc", r="nhwc")},
        "stats": lambda dtype: {**_FWD_PLAIN, "HAS_BIAS": False, "ACT": "", "STATS": True,
                                **_typical(x="nhwc", w="nhwc", y="nhwc", r="nhwc")},
        "stats_prologue": lambda dtype: {**_FWD_PLAIN, "HAS_BIAS": False, "ACT": "", "STATS": True, "PROLOGUE": 2,
                                         **_typical(x="nhwc", w="nhwc", y="nhwc", r="nhwc")},
        "stats_few_channels": lambda dtype: {
            **_FWD_PLAIN, "HAS_BIAS": False, "ACT": "", "STATS": True, "PADDED": True, "CHANNEL_INNER": False,
            **_typical(n=32, c=3, hw=224, oc=64, k=7, pad=3, x="nchw", w="nchw", y="nhwc", r="nhwc"),
            "stride_h": 2, "stride_w": 2, "OH": 112, "OW": 112},
    },
    tensor_core=True,
    tf32=True,
)
@triton.jit
def conv2d_fwd_bn_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, r_ptr, stats_ptr,
    in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr,
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, swn, swc, swh, sww, syn, syc, syh, syw, srn, src, srh, srw, eps, min_val, max_val,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PADDED: tl.constexpr, CHANNEL_INNER: tl.constexpr,
    PRECISION: tl.constexpr, BATCH_NORM: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr, PROLOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = act(BN((conv + bias)) + residual) in float32, rounded once; act = ``ACT`` as in
    conv2d_fwd_kernel, every part optional (constexpr flags). BATCH_NORM is eval-mode BatchNorm read
    from its parameters, BN(v) = (v - running_mean[oc]) * (bn_weight[oc] / sqrt(running_var[oc] + eps)) + bn_bias[oc]
    (``_bn_eval``; bn_weight/bn_bias optional: HAS_BN_WEIGHT, HAS_BN_BIAS). STATS also writes the
    BatchNorm partials of conv + bias (``_store_bn_partials``); PROLOGUE transforms x per input channel
    as it is loaded (``kernels.elementwise.apply_prologue``)."""
    group = tl.program_id(2)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ow = rm % OW
    oh = (rm // OW) % OH
    n = rm // (OW * OH)
    m_ok = rm < N * OH * OW
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    oc = group * OCg + rn
    n_ok = rn < OCg
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = x_ptr + n * sxn + ih0 * sxh + iw0 * sxw + group * Cg * sxc
    acc = _conv_fwd_reduce(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_row, w_ptr, ih0, iw0, m_ok, oc, n_ok,
                           H, W, KH, KW, Cg, dil_h, dil_w, sxc, sxh, sxw, swn, swc, swh, sww,
                           in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, group * Cg, PADDED, CHANNEL_INNER, PRECISION,
                           BLOCK_K, PROLOGUE)
    acc = _add_bias(acc, b_ptr, oc, n_ok, HAS_BIAS)
    if STATS:
        _store_bn_partials(stats_ptr, acc, tl.program_id(0), N * OH * OW, oc, n_ok, OC, BLOCK_M, BLOCK_N)
    if BATCH_NORM:
        mean, k, beta = _bn_eval_coefficients(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, eps, oc, n_ok,
                                              HAS_BN_WEIGHT, HAS_BN_BIAS)
        acc = _bn_eval(acc, mean, k, beta)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        r_off = (n * srn + oh * srh + ow * srw)[:, None] + (oc * src)[None, :]
        acc += tl.load(r_ptr + r_off, mask=out_mask, other=0.0).to(tl.float32)
    acc = _activate(acc, ACT, min_val, max_val)
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + (oc * syc)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# ------------------------------------------------------------------- forward + ReLU + max-pool (inference)
POOL_INTERP = _gemm_heuristics(  # the reduction runs once per pool-window position
    lambda a: (a["N"] * a["PH"] * a["PW"], a["OCg"], _fwd_reduction(a)[0], _fwd_reduction(a)[1] * a["PKH"] * a["PKW"]))


def _pool_2x2(size):  # the typical pool arguments, as _typical gives the conv's
    return {"PH": size, "PW": size, "PKH": 2, "PKW": 2, "pstride_h": 2, "pstride_w": 2, "ppad_h": 0, "ppad_w": 0,
            "pdil_h": 1, "pdil_w": 1}


_POOL_ARGS = ("PH", "PW", "PKH", "PKW", "pstride_h", "pstride_w", "ppad_h", "ppad_w", "pdil_h", "pdil_w")


@tuned_kernel(
    "conv2d_relu_maxpool_fwd",
    gpu_configs=POOL_GPU_CONFIGS,
    config_for_dtype=POOL_CONFIG_FOR_DTYPE,
    interp_heuristics=POOL_INTERP,
    key=["N", "C", "H", "W", "OC", "KH", "KW", "Cg", "PKH", "PKW"],
    signature=_signature(("x_ptr", "w_ptr", "b_ptr", "y_ptr", *_BN_EVAL_POINTERS), _strides("x", "w", "y"),
                         ("HAS_BIAS", "PADDED", "CHANNEL_INNER", "PRECISION", *_BN_EVAL_FLAGS), _POOL_ARGS,
                         floats=("eps",)),
    constexprs=lambda dtype: {"HAS_BIAS": True, "PADDED": True, "CHANNEL_INNER": True, "PRECISION": "ieee",
                              **_NO_BN, **_typical(x="nhwc", w="nhwc", y="nhwc"), **_pool_2x2(28)},
    variants={
        "few_channels": lambda dtype: {  # the seed's LeNet conv2 + 2x2 pool, NCHW
            "HAS_BIAS": True, "PADDED": False, "CHANNEL_INNER": False, "PRECISION": "ieee", **_NO_BN,
            **_typical(n=16, c=6, hw=14, oc=16, k=5, pad=0, x="nchw", w="nchw", y="nchw"), **_pool_2x2(5)},
        "bn_stem": lambda dtype: {  # ResNet stem in inference: 7x7/2 conv + eval BatchNorm + ReLU + 3x3/2 max-pool
            "HAS_BIAS": False, "PADDED": True, "CHANNEL_INNER": False, "PRECISION": "ieee", **_BN_AFFINE,
            **_typical(n=32, c=3, hw=224, oc=64, k=7, pad=3, x="nchw", w="nchw", y="nhwc"),
            "stride_h": 2, "stride_w": 2, "OH": 112, "OW": 112, **_pool_2x2(56), "PKH": 3, "PKW": 3, "ppad_h": 1,
            "ppad_w": 1}},
    tensor_core=True,
    tf32=True,
)
@triton.jit
def conv2d_relu_maxpool_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr,
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    PH, PW, PKH, PKW, pstride_h, pstride_w, ppad_h, ppad_w, pdil_h, pdil_w,
    sxn, sxc, sxh, sxw, swn, swc, swh, sww, syn, syc, syh, syw, eps,
    HAS_BIAS: tl.constexpr, PADDED: tl.constexpr, CHANNEL_INNER: tl.constexpr, PRECISION: tl.constexpr,
    BATCH_NORM: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[n, oc, ph, pw] = max over the pool window of relu(BN(conv + bias)) at (oh, ow) inside the conv
    output, BN = eval-mode BatchNorm as in conv2d_fwd_bn_kernel (``_bn_eval``, per-channel coefficients
    loaded once per program), bias and BN optional; the unpooled activation never reaches memory.
    Overlapping windows recompute conv tiles."""
    group = tl.program_id(2)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pw = rm % PW
    ph = (rm // PW) % PH
    n = rm // (PW * PH)
    m_ok = rm < N * PH * PW
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    oc = group * OCg + rn
    n_ok = rn < OCg
    if BATCH_NORM:
        mean, k, beta = _bn_eval_coefficients(bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, eps, oc, n_ok,
                                              HAS_BN_WEIGHT, HAS_BN_BIAS)
    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    for i in range(0, PKH):
        oh = ph * pstride_h - ppad_h + i * pdil_h
        for j in range(0, PKW):
            ow = pw * pstride_w - ppad_w + j * pdil_w
            inside = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
            ih0 = oh * stride_h - pad_h
            iw0 = ow * stride_w - pad_w
            x_row = x_ptr + n * sxn + ih0 * sxh + iw0 * sxw + group * Cg * sxc
            v = _conv_fwd_reduce(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_row, w_ptr, ih0, iw0, inside, oc,
                                 n_ok, H, W, KH, KW, Cg, dil_h, dil_w, sxc, sxh, sxw, swn, swc, swh, sww,
                                 x_ptr, x_ptr, x_ptr, x_ptr, 0, PADDED, CHANNEL_INNER, PRECISION, BLOCK_K, 0)
            v = _add_bias(v, b_ptr, oc, n_ok, HAS_BIAS)
            if BATCH_NORM:
                v = _bn_eval(v, mean, k, beta)
            v = _activate(v, "relu", 0.0, 0.0)
            take = inside[:, None] & ((v > best) | (v != v))  # NaN wins, as in max_pool2d
            best = tl.where(take, v, best)
    y_off = (n * syn + ph * syh + pw * syw)[:, None] + (oc * syc)[None, :]
    tl.store(y_ptr + y_off, best.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ------------------------------------------------------------------------------------- input gradient
@triton.jit
def _first_tap(q_pad, dil, stride, tap_step, taps):
    """(kh0, number of taps) of the phase whose rows satisfy h + ph = q_pad (mod stride): kh0 is the one
    tap in [0, tap_step) with q_pad - kh0*dil a multiple of stride; none -> no taps."""
    k0 = q_pad * 0
    found = q_pad * 0
    for t in range(0, tap_step):
        hit = (q_pad - t * dil) % stride == 0
        k0 += tl.where(hit, t, 0)
        found += tl.where(hit, 1, 0)
    count = tl.where((found > 0) & (k0 < taps), (taps - k0 + tap_step - 1) // tap_step, 0)
    return k0, count


@triton.jit
def _dgrad_step(acc, g_ptr, r_ptr, w_ptr, g_row, r_row, row_h, row_w, m_ok, rn, n_ok, oc, k_ok, dh, dw, w_k, OH, OW,
                sgc, sgh, sgw, src, srh, srw, swn, swc, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """``acc`` plus one reduction step over the output channels ``oc`` (valid where ``k_ok``) at tap
    offsets oh = row_h - dh, ow = row_w - dw (``dh``/``dw``: scalars, or one value per column as
    [1, BLOCK_K]); ``w_k`` is the taps' weight offset (scalar or per column)."""
    a_mask = (m_ok[:, None] & k_ok[None, :] & (row_h[:, None] >= dh) & (row_h[:, None] < OH + dh)
              & (row_w[:, None] >= dw) & (row_w[:, None] < OW + dw))
    a = tl.load(g_ptr + g_row[:, None] + (oc * sgc)[None, :] - (dh * sgh + dw * sgw), mask=a_mask, other=0.0)
    if HAS_MASK:
        r = tl.load(r_ptr + r_row[:, None] + (oc * src)[None, :] - (dh * srh + dw * srw), mask=a_mask, other=0.0)
        a = tl.where(r.to(tl.float32) <= 0, tl.zeros_like(a), a)  # threshold_backward: NaN outputs pass grad
    b = tl.load(w_ptr + (oc * swn + w_k)[:, None] + (rn * swc)[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _dgrad_tile(
    pid_m, pid_n, pid_z, g_ptr, r_ptr, w_ptr, dx_ptr, res_ptr, rmask_ptr, x_ptr, stats_ptr, in_mean_ptr, in_rstd_ptr,
    in_w_ptr, in_b_ptr, z_ptr, z2_ptr, z_mean_ptr, z2_mean_ptr, stats2_ptr, N, C, H, W, OH, OW, KH, KW, Cg, OCg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, tap_h, tap_w, sgn, sgc, sgh, sgw, srn, src, srh, srw,
    swn, swc, swh, sww, sdxn, sdxc, sdxh, sdxw, sresn, sresc, sresh, sresw, srmaskn, srmaskc, srmaskh, srmaskw,
    sxn, sxc, sxh, sxw, szn, szc, szh, szw, sz2n, sz2c, sz2h, sz2w,
    HAS_MASK: tl.constexpr, CHANNEL_INNER: tl.constexpr, PRECISION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_RESIDUAL_MASK: tl.constexpr, GRAD_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The input-gradient tile of rows ``pid_m`` (BLOCK_M), input channels ``pid_n`` (BLOCK_N) and
    ``pid_z`` = group * stride_h * stride_w + phase (qh * stride_w + qw); ``tap_h`` = stride_h /
    gcd(stride_h, dil_h). dx = sum over the phase's taps (module doc) + residual (HAS_RESIDUAL), the
    residual zeroed where residual_mask <= 0 (HAS_RESIDUAL_MASK: threshold_backward), all in float32,
    rounded once. GRAD_STATS (the forward's input prologue's kind, 1 or 2): the conv read x' =
    act((x - mean) * k + beta), a training BatchNorm's output; dx, the gradient of x', goes on through
    the ReLU (2: zeroed where the recomputed BN output is <= 0) to the BN output, and the BatchNorm
    backward's two reductions of it are written beside it (:func:`_store_grad_partials`). GRAD_STATS 3 (4):
    the conv's own input x is a ReLU's output (a residual block's end, relu(bn(z) + identity)); dx goes on
    through that ReLU (zeroed where x <= 0) and the reductions of one BatchNorm backward (two: z2 too, a
    downsample branch's BN reading the same gradient) are written, over z with its mean (the second's
    into ``stats2_ptr``)."""
    phases = stride_h * stride_w
    group = pid_z // phases
    qh = (pid_z % phases) // stride_w
    qw = pid_z % stride_w
    kh0, TH = _first_tap(qh + pad_h, dil_h, stride_h, tap_h, KH)
    kw0, TW = _first_tap(qw + pad_w, dil_w, stride_w, tap_w, KW)
    step_h = dil_h * tap_h // stride_h  # oh moves this much per tap
    step_w = dil_w * tap_w // stride_w
    HQ = tl.cdiv(H, stride_h)
    WQ = tl.cdiv(W, stride_w)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tw = rm % WQ
    th = (rm // WQ) % HQ
    n = rm // (WQ * HQ)
    ih = qh + th * stride_h
    iw = qw + tw * stride_w
    m_ok = (rm < N * HQ * WQ) & (ih < H) & (iw < W)
    row_h = th + (qh + pad_h - kh0 * dil_h) // stride_h  # oh at the phase's first tap (exact division)
    row_w = tw + (qw + pad_w - kw0 * dil_w) // stride_w

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = group * Cg + rn
    n_ok = rn < Cg

    g_row = n * sgn + row_h * sgh + row_w * sgw
    r_row = n * srn + row_h * srh + row_w * srw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if CHANNEL_INNER:  # a step: one tap (j, i), BLOCK_K output channels from oc0; counters, no division
        rk = tl.arange(0, BLOCK_K)
        oc0 = 0
        i = 0
        j = 0
        for _ in range(0, TH * TW * tl.cdiv(OCg, BLOCK_K)):
            w_k = (kh0 + j * tap_h) * swh + (kw0 + i * tap_w) * sww
            acc = _dgrad_step(acc, g_ptr, r_ptr, w_ptr, g_row, r_row, row_h, row_w, m_ok, rn, n_ok,
                              group * OCg + oc0 + rk, (oc0 + rk) < OCg, j * step_h, i * step_w, w_k, OH, OW,
                              sgc, sgh, sgw, src, srh, srw, swn, swc, HAS_MASK, PRECISION)
            oc0, i, j = _next_chunk(oc0, i, j, OCg, TW, BLOCK_K)
    else:  # a step: BLOCK_K consecutive k = (j, i, oc) of the flattened reduction
        K = TH * TW * OCg
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            i = (rk // OCg) % TW
            j = rk // (OCg * TW)
            w_k = (kh0 + j * tap_h) * swh + (kw0 + i * tap_w) * sww
            acc = _dgrad_step(acc, g_ptr, r_ptr, w_ptr, g_row, r_row, row_h, row_w, m_ok, rn, n_ok,
                              group * OCg + rk % OCg, rk < K, (j * step_h)[None, :], (i * step_w)[None, :], w_k,
                              OH, OW, sgc, sgh, sgw, src, srh, srw, swn, swc, HAS_MASK, PRECISION)

    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:  # this phase's rows only: each dx element gets its residual exactly once
        res = tl.load(res_ptr + (n * sresn + ih * sresh + iw * sresw)[:, None] + (c * sresc)[None, :],
                      mask=out_mask, other=0.0)
        if HAS_RESIDUAL_MASK:
            keep = tl.load(rmask_ptr + (n * srmaskn + ih * srmaskh + iw * srmaskw)[:, None] + (c * srmaskc)[None, :],
                           mask=out_mask, other=0.0)
            res = tl.where(keep.to(tl.float32) <= 0, tl.zeros_like(res), res)  # threshold_backward: NaN passes
        acc += res.to(tl.float32)
    if GRAD_STATS:
        if GRAD_STATS <= 2:  # through the prologue: its coefficients, then x (this order spills nothing)
            mean, k, beta = prologue_coefficients(in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, c, n_ok)
            x = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :], mask=out_mask, other=0.0)
            g, d = grad_through_prologue(acc, x, out_mask, mean, k, beta, dx_ptr.dtype.element_ty, GRAD_STATS)
        else:
            # threshold_backward against the input (NaN passes; x loads as 0 outside the problem: g is 0 there)
            x = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :], mask=out_mask, other=0.0)
            g = tl.where(x.to(tl.float32) <= 0, 0.0, acc.to(dx_ptr.dtype.element_ty).to(tl.float32))
            d = _centred_grad(g, z_ptr, z_mean_ptr, n * szn + ih * szh + iw * szw, c * szc, c, n_ok, out_mask)
        tiles = tl.cdiv(N * HQ * WQ, _STAT_ROWS)  # per phase
        t0 = (pid_z % (stride_h * stride_w)) * tiles
        _store_grad_partials(stats_ptr, g, d, t0, pid_m, tiles, c, n_ok, C, BLOCK_M, BLOCK_N)
        if GRAD_STATS == 4:
            d = _centred_grad(g, z2_ptr, z2_mean_ptr, n * sz2n + ih * sz2h + iw * sz2w, c * sz2c, c, n_ok, out_mask)
            _store_grad_partials(stats2_ptr, g, d, t0, pid_m, tiles, c, n_ok, C, BLOCK_M, BLOCK_N)
        acc = g
    dx_off = (n * sdxn + ih * sdxh + iw * sdxw)[:, None] + (c * sdxc)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _centred_grad(g, z_ptr, mean_ptr, row, col, c, c_ok, mask):
    """g * (z - mean[c]) in float32 for the tile's rows (offsets ``row``) and channels (``col``), 0 outside
    ``mask``: a BatchNorm backward's second reduction's terms over its input z."""
    z = tl.load(z_ptr + row[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    return tl.where(mask, g * (z - mean[None, :]), 0.0)


@triton.jit
def _store_grad_partials(stats_ptr, g, d, t0, pid_m, tiles, c, c_ok, C, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """The BatchNorm backward's partials of a float32 input-gradient tile ``g`` (zero outside the problem)
    and ``d`` = g * (x - mean): per _STAT_ROWS-row group t of the tile (rows pid_m * BLOCK_M + i of
    this phase, ``tiles`` groups per phase, whose first is partial t0) and channel c, stats[t0 + t, 0,
    c] = the sum of g, [t0 + t, 1, c] = the sum of d. Every partial is written by one program, once."""
    TILES: tl.constexpr = BLOCK_M // _STAT_ROWS
    if TILES == 1:
        base = stats_ptr + (t0 + pid_m) * (2 * C) + c
        tl.store(base, tl.sum(g, axis=0), mask=c_ok)
        tl.store(base + C, tl.sum(d, axis=0), mask=c_ok)
    else:
        t = pid_m * TILES + tl.arange(0, TILES)
        base = stats_ptr + ((t0 + t) * (2 * C))[:, None] + c[None, :]
        ok = (t < tiles)[:, None] & c_ok[None, :]
        tl.store(base, tl.sum(tl.reshape(g, (TILES, _STAT_ROWS, BLOCK_N)), axis=1), mask=ok)
        tl.store(base + C, tl.sum(tl.reshape(d, (TILES, _STAT_ROWS, BLOCK_N)), axis=1), mask=ok)


def _dgrad_config_for(config, dtype, arch=None, launch=None) -> bool:
    """DGRAD_CONFIG_FOR_DTYPE; GRAD_STATS launches (BN-backward partials) take tiles of whole BN_STAT_ROWS-row
    groups, less 128x128 (its epilogue spills 88-144 B in half precision on sm_90)."""
    if (launch or {}).get("GRAD_STATS") and (config.kwargs["BLOCK_M"] % BN_STAT_ROWS or config is _C["128x128w8"]):
        return False
    return DGRAD_CONFIG_FOR_DTYPE(config, dtype, arch, launch)


_DGRAD_PLAIN = {"HAS_MASK": True, "CHANNEL_INNER": True, "PRECISION": "ieee", "tap_h": 1, "tap_w": 1,
                "HAS_RESIDUAL": False, "HAS_RESIDUAL_MASK": False, "GRAD_STATS": 0}


@tuned_kernel(
    "conv2d_input_grad",
    gpu_configs=DGRAD_GPU_CONFIGS,
    config_for_dtype=_dgrad_config_for,
    interp_heuristics=DGRAD_INTERP,
    key=["N", "C", "H", "W", "OC", "KH", "KW", "Cg", "stride_h", "stride_w", "HAS_RESIDUAL", "GRAD_STATS"],
    signature=_signature(("g_ptr", "r_ptr", "w_ptr", "dx_ptr", "res_ptr", "rmask_ptr", "x_ptr", "stats_ptr",
                          *_PROLOGUE_POINTERS, *_GRAD_BN_POINTERS), _strides("g", "r", "w", "dx", "res", "rmask", "x",
                                                                             "z", "z2"),
                         ("HAS_MASK", "CHANNEL_INNER", "PRECISION", "HAS_RESIDUAL", "HAS_RESIDUAL_MASK", "GRAD_STATS"),
                         ("tap_h", "tap_w")),
    constexprs=lambda dtype: {**_DGRAD_PLAIN, **_typical(g="nhwc", r="nhwc", w="nhwc", dx="nhwc")},
    variants={
        "strided": lambda dtype: {  # ResNet's stride-2 3x3: four phases, each with 2x2 or fewer taps
            **_DGRAD_PLAIN, **_typical(g="nhwc", r="nhwc", w="nhwc", dx="nhwc"),
            "stride_h": 2, "stride_w": 2, "tap_h": 2, "tap_w": 2, "OH": 28, "OW": 28},
        "few_channels": lambda dtype: {  # the seed's LeNet conv2 (16 output channels), NCHW
            **_DGRAD_PLAIN, "CHANNEL_INNER": False,
            **_typical(n=16, c=6, hw=14, oc=16, k=5, pad=0, g="nchw", r="nchw", w="nchw", dx="nchw")},
        # ResNet basic block's conv1 backward: + the identity branch's gradient through the block
        # input's ReLU (residual = the gradient, residual_mask = the block input), channels_last
        "residual": lambda dtype: {
            **_DGRAD_PLAIN, "HAS_RESIDUAL": True, "HAS_RESIDUAL_MASK": True,
            **_typical(g="nhwc", r="nhwc", w="nhwc", dx="nhwc", res="nhwc", rmask="nhwc")},
        # a training ResNet's conv2 whose input is bn1(conv1) + ReLU: dx through the ReLU, bn1's
        # backward reductions in the epilogue
        "bn_grad_stats": lambda dtype: {**_DGRAD_PLAIN, "HAS_MASK": False, "GRAD_STATS": 2,
                                        **_typical(g="nhwc", w="nhwc", dx="nhwc", x="nhwc")},
        # conv1 of the block after a downsample block: + the identity branch's gradient, on through the
        # block input's ReLU, and the reductions of both BNs reading that gradient (bn2, the downsample BN)
        "residual_bn_grad_stats": lambda dtype: {
            **_DGRAD_PLAIN, "HAS_MASK": False, "HAS_RESIDUAL": True, "HAS_RESIDUAL_MASK": True, "GRAD_STATS": 4,
            **_typical(g="nhwc", w="nhwc", dx="nhwc", x="nhwc", res="nhwc", rmask="nhwc", z="nhwc", z2="nhwc")},
    },
    tensor_core=True,
    tf32=True,
)
@triton.jit
def conv2d_input_grad_kernel(
    g_ptr, r_ptr, w_ptr, dx_ptr, res_ptr, rmask_ptr, x_ptr, stats_ptr, in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr,
    z_ptr, z2_ptr, z_mean_ptr, z2_mean_ptr, stats2_ptr,
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    tap_h, tap_w,
    sgn, sgc, sgh, sgw, srn, src, srh, srw, swn, swc, swh, sww, sdxn, sdxc, sdxh, sdxw,
    sresn, sresc, sresh, sresw, srmaskn, srmaskc, srmaskh, srmaskw, sxn, sxc, sxh, sxw,
    szn, szc, szh, szw, sz2n, sz2c, sz2h, sz2w,
    HAS_MASK: tl.constexpr, CHANNEL_INNER: tl.constexpr, PRECISION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_RESIDUAL_MASK: tl.constexpr, GRAD_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One phase (qh, qw) of one group per grid slice: ``_dgrad_tile`` at (program_id(0), program_id(1),
    program_id(2))."""
    _dgrad_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), g_ptr, r_ptr, w_ptr, dx_ptr, res_ptr, rmask_ptr,
                x_ptr, stats_ptr, in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, z_ptr, z2_ptr, z_mean_ptr, z2_mean_ptr,
                stats2_ptr,
                N, C, H, W, OH, OW, KH, KW, Cg, OCg, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, tap_h, tap_w,
                sgn, sgc, sgh, sgw, srn, src, srh, srw, swn, swc, swh, sww, sdxn, sdxc, sdxh, sdxw,
                sresn, sresc, sresh, sresw, srmaskn, srmaskc, srmaskh, srmaskw, sxn, sxc, sxh, sxw,
                szn, szc, szh, szw, sz2n, sz2c, sz2h, sz2w,
                HAS_MASK, CHANNEL_INNER, PRECISION, HAS_RESIDUAL, HAS_RESIDUAL_MASK, GRAD_STATS, BLOCK_M, BLOCK_N,
                BLOCK_K)


# ------------------------------------------------------------------------------------ weight gradient
@triton.jit
def _wgrad_tile(
    pid_mn, group, split, g_ptr, r_ptr, x_ptr, dw_ptr, db_ptr, partial_ptr, in_mean_ptr, in_rstd_ptr, in_w_ptr,
    in_b_ptr, N, H, W, OC, OH, OW, KH, KW, Cg, OCg, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sgn, sgc, sgh, sgw, srn, src, srh, srw, sxn, sxc, sxh, sxw, sdwn, sdwc, sdwh, sdww,
    HAS_MASK: tl.constexpr, SPLIT_K: tl.constexpr, PADDED: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr, PROLOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dw (and with HAS_BIAS_GRAD db, contiguous [OC]) for the (oc block, column block) tile ``pid_mn``
    (column blocks fastest) of ``group`` over split ``split`` of the reduction; SPLIT_K > 1 writes
    float32 partials instead: split s at partial[s * PART + i], PART = OC*Cg*KH*KW (+ OC), i the
    contiguous-dw index, then db's OC. PROLOGUE: the forward's input x' recomputed from x as it is
    loaded (``kernels.elementwise.apply_prologue``), so a BatchNorm'd input the forward never stored is never read."""
    KK = KH * KW * Cg  # GEMM columns
    P = N * OH * OW  # reduction length
    num_n = tl.cdiv(KK, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    oc = group * OCg + rm
    m_ok = rm < OCg

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = rn % Cg
    kw = (rn // Cg) % KW
    kh = rn // (Cg * KW)
    n_ok = rn < KK
    kh_d = kh * dil_h
    kw_d = kw * dil_w
    x_col = (group * Cg + c) * sxc + kh_d * sxh + kw_d * sxw
    if PROLOGUE:  # per column, so loaded once
        in_mean, in_k, in_beta = prologue_coefficients(in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, group * Cg + c,
                                                        n_ok)

    # This program's slice of the reduction, in whole BLOCK_K steps.
    steps = tl.cdiv(P, BLOCK_K)
    per_split = tl.cdiv(steps, SPLIT_K)
    p_begin = split * per_split * BLOCK_K
    p_end = tl.minimum(p_begin + per_split * BLOCK_K, P)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_K):
        rp = p0 + tl.arange(0, BLOCK_K)
        n, oh, ow = _unflatten(rp, OH, OW)
        p_ok = rp < p_end
        a_mask = m_ok[:, None] & p_ok[None, :]
        g_col = n * sgn + oh * sgh + ow * sgw
        a = tl.load(g_ptr + (oc * sgc)[:, None] + g_col[None, :], mask=a_mask, other=0.0)
        if HAS_MASK:
            r_col = n * srn + oh * srh + ow * srw
            r = tl.load(r_ptr + (oc * src)[:, None] + r_col[None, :], mask=a_mask, other=0.0)
            a = tl.where(r.to(tl.float32) <= 0, tl.zeros_like(a), a)  # threshold_backward: NaN outputs pass grad
        if HAS_BIAS_GRAD:
            if pid_n == 0:  # one column block sums the dy' rows: each db[oc] once per split
                db_acc += tl.sum(a.to(tl.float32), axis=1)
        b_mask = p_ok[:, None] & n_ok[None, :]
        if PADDED:  # 0 <= ih0 + kh*dil_h < H, compared without forming the sum
            ih0 = oh * stride_h - pad_h
            iw0 = ow * stride_w - pad_w
            b_mask = (b_mask & (ih0[:, None] >= -kh_d[None, :]) & (ih0[:, None] < (H - kh_d)[None, :])
                      & (iw0[:, None] >= -kw_d[None, :]) & (iw0[:, None] < (W - kw_d)[None, :]))
        x_row = n * sxn + (oh * stride_h - pad_h) * sxh + (ow * stride_w - pad_w) * sxw
        b = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=b_mask, other=0.0)
        if PROLOGUE:
            b = apply_prologue(b, b_mask, in_mean, in_k, in_beta, PROLOGUE)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    out_mask = m_ok[:, None] & n_ok[None, :]
    dw_off = (oc * sdwn)[:, None] + (c * sdwc + kh * sdwh + kw * sdww)[None, :]
    if SPLIT_K == 1:
        tl.store(dw_ptr + dw_off, acc.to(dw_ptr.dtype.element_ty), mask=out_mask)
        if HAS_BIAS_GRAD:
            if pid_n == 0:
                tl.store(db_ptr + oc, db_acc.to(db_ptr.dtype.element_ty), mask=m_ok)
    else:
        # partial sums, float32: per split a contiguous dw, then (HAS_BIAS_GRAD) db
        dw_numel = OC * Cg * KH * KW
        part = partial_ptr + split * (dw_numel + OC if HAS_BIAS_GRAD else dw_numel)
        p_off = (oc * (Cg * KH * KW))[:, None] + (c * (KH * KW) + kh * KW + kw)[None, :]
        tl.store(part + p_off, acc, mask=out_mask)
        if HAS_BIAS_GRAD:
            if pid_n == 0:
                tl.store(part + dw_numel + oc, db_acc, mask=m_ok)


def _wgrad_resnet(**flags):  # ResNet-style 64 -> 64 3x3, channels_last, split 4 ways
    return {"HAS_MASK": True, "SPLIT_K": 4, "PADDED": True, "PRECISION": "ieee", "HAS_BIAS_GRAD": False,
            "PROLOGUE": 0, **_typical(g="nhwc", r="nhwc", x="nhwc", dw="nchw"), **flags}


def _wgrad_lenet(**flags):  # the seed's LeNet conv2 (6 -> 16 channels), NCHW, one split
    return {"HAS_MASK": True, "SPLIT_K": 1, "PADDED": False, "PRECISION": "ieee", "HAS_BIAS_GRAD": False,
            "PROLOGUE": 0, **_typical(n=16, c=6, hw=14, oc=16, k=5, pad=0, g="nchw", r="nchw", x="nchw", dw="nchw"),
            **flags}


@tuned_kernel(
    "conv2d_weight_grad",
    gpu_configs=WGRAD_GPU_CONFIGS,
    config_for_dtype=wgrad_config_for,
    interp_heuristics=WGRAD_INTERP,
    key=["N", "C", "H", "W", "OC", "KH", "KW", "Cg", "SPLIT_K", "HAS_BIAS_GRAD", "PROLOGUE"],
    signature=_signature(("g_ptr", "r_ptr", "x_ptr", "dw_ptr", "db_ptr", "partial_ptr", *_PROLOGUE_POINTERS),
                         _strides("g", "r", "x", "dw"),
                         ("HAS_MASK", "SPLIT_K", "PADDED", "PRECISION", "HAS_BIAS_GRAD", "PROLOGUE")),
    constexprs=lambda dtype: _wgrad_resnet(),
    variants={
        # a training ResNet's conv2: its input, bn1(conv1) + ReLU, recomputed from conv1's output on load
        "prologue": lambda dtype: _wgrad_resnet(PROLOGUE=2),
        "few_channels": lambda dtype: _wgrad_lenet(),
        # with the bias gradient: LeNet's conv2 has a bias (one launch for dw and db); the split-K pattern
        # reduces the bias partials beside the weight's
        "few_channels_bias": lambda dtype: _wgrad_lenet(HAS_BIAS_GRAD=True),
        "bias": lambda dtype: _wgrad_resnet(HAS_BIAS_GRAD=True),
    },
    tensor_core=True,
    tf32=True,
)
@triton.jit
def conv2d_weight_grad_kernel(
    g_ptr, r_ptr, x_ptr, dw_ptr, db_ptr, partial_ptr, in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr,
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sgn, sgc, sgh, sgw, srn, src, srh, srw, sxn, sxc, sxh, sxw, sdwn, sdwc, sdwh, sdww,
    HAS_MASK: tl.constexpr, SPLIT_K: tl.constexpr, PADDED: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr, PROLOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``_wgrad_tile`` at (program_id(0), program_id(1), program_id(2)): (oc block, column block) tiles,
    groups, splits of the reduction."""
    _wgrad_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), g_ptr, r_ptr, x_ptr, dw_ptr, db_ptr, partial_ptr,
                in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr,
                N, H, W, OC, OH, OW, KH, KW, Cg, OCg, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                sgn, sgc, sgh, sgw, srn, src, srh, srw, sxn, sxc, sxh, sxw, sdwn, sdwc, sdwh, sdww,
                HAS_MASK, SPLIT_K, PADDED, PRECISION, HAS_BIAS_GRAD, PROLOGUE, BLOCK_M, BLOCK_N, BLOCK_K)


# --------------------------------------------------------------- input and weight gradient in one launch
# (input-gradient tile, weight-gradient tile) pairs of one warp count, compiled at the fewer of their
# stages: a launch may take a pair when the input gradient's lists allow its first tile (dtype,
# CHANNEL_INNER) and the weight gradient's its second (dtype, HAS_BIAS_GRAD: wgrad_config_for), less the
# pairs that spill in the combined kernel although either tile alone fits (AOT gate, Triton 3.9): beside
# the flattened input-gradient reduction (CHANNEL_INNER clear) all but the smallest pair (112-224 B on
# sm_80 and sm_90, half precision; float32, whose flattened tile is 64x64, has no pair and runs the two
# launches), and 128x16 + 16x128 in float32 without TF32 (72-128 B on sm_80).
_BACKWARD_PAIRS = (
    ("128x128w8", "128x128w8"), ("128x64w8", "64x128w8"), ("128x64w8", "128x64w8"), ("64x64w4", "64x64"),
    ("64x64w4s3", "32x64"), ("64x32w4", "32x64"), ("128x16w4", "16x128"), ("32x32w4", "32x64"),
)
_BACKWARD_FLATTENED = ("64x32w4", "32x64")
_BACKWARD_FP32_SPILLS = (("128x16w4", "16x128"),)


def _backward_config(dx, dw):
    assert dx.num_warps == dw.num_warps, (dx, dw)
    blocks = {**dx.kwargs, **{f"DW_{k}": v for k, v in dw.kwargs.items()}}
    return triton.Config(blocks, num_warps=dx.num_warps, num_stages=min(dx.num_stages, dw.num_stages))


BACKWARD_GPU_CONFIGS = [_backward_config(_C[dx], _W[dw]) for dx, dw in _BACKWARD_PAIRS]


def backward_config_for(config, dtype, arch=None, launch=None) -> bool:
    """Whether a launch may take the pair ``config`` stands for: both tiles allowed
    (_dgrad_config_for, wgrad_config_for) and the pair not one that spills."""
    launch = launch or {}
    pair = next(p for c, p in zip(BACKWARD_GPU_CONFIGS, _BACKWARD_PAIRS) if c is config)
    if not launch.get("CHANNEL_INNER", True) and pair != _BACKWARD_FLATTENED:
        return False
    if dtype == torch.float32 and launch.get("PRECISION") != "tf32" and pair in _BACKWARD_FP32_SPILLS:
        return False
    return (_dgrad_config_for(_C[pair[0]], dtype, arch, launch) and wgrad_config_for(_W[pair[1]], dtype, arch, launch)
            and not (launch.get("GRAD_STATS") and pair == ("128x64w8", "128x64w8")))  # GRAD_STATS: 24 B, sm_80


# the interpreter tiles of either launch: BLOCK_* for the input gradient, DW_BLOCK_* for the weight's
BACKWARD_INTERP = {**DGRAD_INTERP, **{f"DW_{k}": v for k, v in WGRAD_INTERP.items()}}
_BACKWARD_FLAGS = ("HAS_MASK", "CHANNEL_INNER", "PRECISION", "HAS_RESIDUAL", "HAS_RESIDUAL_MASK", "GRAD_STATS",
                   "SPLIT_K", "PADDED", "HAS_BIAS_GRAD", "PROLOGUE", "DW_BLOCK_M", "DW_BLOCK_N", "DW_BLOCK_K")


def _backward_typical(strided=False, **flags):
    """ResNet-18's layer-3 conv (256 -> 256 3x3 at 14x14, channels_last; strided: its first conv, 128 ->
    256 at 28x28 stride 2), one split, no bias: the small late layers the combined launch is for."""
    layouts = dict(g="nhwc", r="nhwc", w="nhwc", x="nhwc", dx="nhwc", res="nhwc", rmask="nhwc", dw="nhwc")
    values = {**_DGRAD_PLAIN, "HAS_MASK": False, "SPLIT_K": 1, "PADDED": True, "HAS_BIAS_GRAD": False, "PROLOGUE": 0,
              "groups": 1}
    if strided:
        values.update(_typical(n=32, c=128, hw=28, oc=256, **layouts), stride_h=2, stride_w=2, tap_h=2, tap_w=2,
                      OH=14, OW=14, rows=32 * 14 * 14)
    else:
        values.update(_typical(n=32, c=256, hw=14, oc=256, **layouts), rows=32 * 14 * 14)
    return {**values, **flags}


@tuned_kernel(
    "conv2d_backward",
    gpu_configs=BACKWARD_GPU_CONFIGS,
    config_for_dtype=backward_config_for,
    interp_heuristics=BACKWARD_INTERP,
    key=["N", "C", "H", "W", "OC", "KH", "KW", "Cg", "stride_h", "stride_w", "HAS_RESIDUAL", "GRAD_STATS", "SPLIT_K",
         "HAS_BIAS_GRAD", "PROLOGUE"],
    signature=_signature(("g_ptr", "r_ptr", "w_ptr", "x_ptr", "dx_ptr", "res_ptr", "rmask_ptr", "dw_ptr", "db_ptr",
                          "partial_ptr", "stats_ptr", *_PROLOGUE_POINTERS, *_GRAD_BN_POINTERS),
                         _strides("g", "r", "w", "x", "dx", "res", "rmask", "dw", "z", "z2"),
                         _BACKWARD_FLAGS, ("tap_h", "tap_w", "groups", "rows")),
    constexprs=lambda dtype: _backward_typical(),
    variants={
        "strided": lambda dtype: _backward_typical(strided=True),
        # a training ResNet's conv2 in layer 3, its input bn1(conv1) + ReLU recomputed from conv1's output
        "prologue": lambda dtype: _backward_typical(PROLOGUE=2),
        # the same, dx on through bn1's ReLU and bn1's backward reductions in its epilogue
        "bn_grad_stats": lambda dtype: _backward_typical(PROLOGUE=2, GRAD_STATS=2),
        # layer 3's second block's conv1: + the identity branch's gradient through the block input's ReLU,
        # on through that ReLU, and the reductions of layer 3's first block's bn2 and downsample BN
        "residual_bn_grad_stats": lambda dtype: {
            **_backward_typical(HAS_RESIDUAL=True, HAS_RESIDUAL_MASK=True, GRAD_STATS=4),
            **_typical(n=32, c=256, hw=14, oc=256, z="nhwc", z2="nhwc")},
        # ResNet basic block's conv1 backward in layer 1 (64 -> 64 at 56x56: split-K) with the identity
        # branch's gradient through the block input's ReLU
        "residual": lambda dtype: {**_backward_typical(HAS_RESIDUAL=True, HAS_RESIDUAL_MASK=True, SPLIT_K=4),
                                   **_typical(g="nhwc", r="nhwc", w="nhwc", x="nhwc", dx="nhwc", res="nhwc",
                                              rmask="nhwc", dw="nhwc"), "rows": 32 * 56 * 56},
        # the seed's LeNet conv2 (6 -> 16, 5x5 at 14x14, NCHW) with its ReLU mask and bias gradient
        "few_channels_bias": lambda dtype: {
            **_backward_typical(HAS_MASK=True, CHANNEL_INNER=False, PADDED=False, HAS_BIAS_GRAD=True),
            **_typical(n=16, c=6, hw=14, oc=16, k=5, pad=0, g="nchw", r="nchw", w="nchw", x="nchw", dx="nchw",
                       res="nchw", rmask="nchw", dw="nchw"), "rows": 16 * 14 * 14},
    },
    tensor_core=True,
    tf32=True,
)
@triton.jit
def conv2d_backward_kernel(
    g_ptr, r_ptr, w_ptr, x_ptr, dx_ptr, res_ptr, rmask_ptr, dw_ptr, db_ptr, partial_ptr, stats_ptr,
    in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, z_ptr, z2_ptr, z_mean_ptr, z2_mean_ptr, stats2_ptr,
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    tap_h, tap_w, groups, rows,
    sgn, sgc, sgh, sgw, srn, src, srh, srw, swn, swc, swh, sww, sxn, sxc, sxh, sxw, sdxn, sdxc, sdxh, sdxw,
    sresn, sresc, sresh, sresw, srmaskn, srmaskc, srmaskh, srmaskw, sdwn, sdwc, sdwh, sdww,
    szn, szc, szh, szw, sz2n, sz2c, sz2h, sz2w,
    HAS_MASK: tl.constexpr, CHANNEL_INNER: tl.constexpr, PRECISION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_RESIDUAL_MASK: tl.constexpr, GRAD_STATS: tl.constexpr, SPLIT_K: tl.constexpr,
    PADDED: tl.constexpr, HAS_BIAS_GRAD: tl.constexpr, PROLOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DW_BLOCK_M: tl.constexpr, DW_BLOCK_N: tl.constexpr, DW_BLOCK_K: tl.constexpr,
):
    """The input gradient dx (+ residual) and the weight gradient dw (+ db) of one conv (module doc),
    conv2d_input_grad_kernel's and conv2d_weight_grad_kernel's programs in one 1-D grid, so the two
    GEMMs of a small layer run side by side: programs [0, DX) are the input gradient's tiles (BLOCK_*;
    row tiles fastest, then channel tiles, then group * phases + phase), the rest the weight gradient's
    (DW_BLOCK_*; tiles, then groups, then splits). ``rows``: the input gradient's rows per phase,
    N * ceil(H / stride_h) * ceil(W / stride_w). Few operations before the branch, ceiling divisions
    spelled out: the interpreter runs them in every program (and each tl.cdiv as a nested call)."""
    pid = tl.program_id(0)
    dx_rows = (rows + BLOCK_M - 1) // BLOCK_M
    dx_cols = (Cg + BLOCK_N - 1) // BLOCK_N
    dx_programs = dx_rows * dx_cols * groups * stride_h * stride_w
    if pid < dx_programs:
        _dgrad_tile(pid % dx_rows, (pid // dx_rows) % dx_cols, pid // (dx_rows * dx_cols),
                    g_ptr, r_ptr, w_ptr, dx_ptr, res_ptr, rmask_ptr, x_ptr, stats_ptr, in_mean_ptr, in_rstd_ptr,
                    in_w_ptr, in_b_ptr, z_ptr, z2_ptr, z_mean_ptr, z2_mean_ptr, stats2_ptr,
                    N, C, H, W, OH, OW, KH, KW, Cg, OCg, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, tap_h, tap_w,
                    sgn, sgc, sgh, sgw, srn, src, srh, srw, swn, swc, swh, sww, sdxn, sdxc, sdxh, sdxw,
                    sresn, sresc, sresh, sresw, srmaskn, srmaskc, srmaskh, srmaskw, sxn, sxc, sxh, sxw,
                    szn, szc, szh, szw, sz2n, sz2c, sz2h, sz2w,
                    HAS_MASK, CHANNEL_INNER, PRECISION, HAS_RESIDUAL, HAS_RESIDUAL_MASK, GRAD_STATS, BLOCK_M, BLOCK_N,
                    BLOCK_K)
    else:
        q = pid - dx_programs
        dw_tiles = ((OCg + DW_BLOCK_M - 1) // DW_BLOCK_M) * ((KH * KW * Cg + DW_BLOCK_N - 1) // DW_BLOCK_N)
        _wgrad_tile(q % dw_tiles, (q // dw_tiles) % groups, q // (dw_tiles * groups),
                    g_ptr, r_ptr, x_ptr, dw_ptr, db_ptr, partial_ptr, in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr,
                    N, H, W, OC, OH, OW, KH, KW, Cg, OCg, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                    sgn, sgc, sgh, sgw, srn, src, srh, srw, sxn, sxc, sxh, sxw, sdwn, sdwc, sdwh, sdww,
                    HAS_MASK, SPLIT_K, PADDED, PRECISION, HAS_BIAS_GRAD, PROLOGUE, DW_BLOCK_M, DW_BLOCK_N,
                    DW_BLOCK_K)


# float32's flattened input gradient (fewer than 32 output channels per group) has no config pair and runs
# the two launches (backward_config_for): the few-channel pattern's TF32 twin would compile nothing.
del REGISTRY["conv2d_backward_few_channels_bias_tf32"]


# ------------------------------------------------------------------------------------------- launchers
def channel_inner(channels_per_group: int) -> bool:
    """Reduction order over (tap, channel) for the forward (input channels) and the input gradient
    (output channels): per tap, channels in BLOCK_K chunks from 32 channels up; else flattened."""
    return channels_per_group >= 32


def output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last when ``t`` is laid out that way (and not also plain contiguous), as aten decides."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _geometry(x_shape, w_shape, stride, padding, dilation, groups):
    N, C, H, W = x_shape
    OC, Cg, KH, KW = w_shape
    OH = output_size(H, KH, stride[0], padding[0], dilation[0])
    OW = output_size(W, KW, stride[1], padding[1], dilation[1])
    return (N, C, H, W, OC, OH, OW, KH, KW, Cg, OC // groups), (*stride, *padding, *dilation)


def bn_stat_tiles(rows: int) -> int:
    """T, the partials' first dimension, for a conv output of ``rows`` = N * OH * OW pixels."""
    return triton.cdiv(rows, BN_STAT_ROWS)


def _bn_eval_args(w, bn_weight, bn_bias, running_mean, running_var):
    """The four BatchNorm pointers (``w`` for absent ones) and the BATCH_NORM/HAS_BN_* flags."""
    pointers = [t if t is not None else w for t in (bn_weight, bn_bias, running_mean, running_var)]
    flags = {"BATCH_NORM": running_mean is not None, "HAS_BN_WEIGHT": bn_weight is not None,
             "HAS_BN_BIAS": bn_bias is not None}
    return pointers, flags


def conv2d(x, w, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, *, activation=None,
           allow_tf32=False, bn_weight=None, bn_bias=None, running_mean=None, running_var=None, eps=1e-5,
           residual=None, stats=False, input_norm=None, input_relu=False):
    """``act(BN(conv2d(x', w) + bias) + residual)`` for 4-D ``x``, output in ``x``'s memory format;
    ``act`` = ``activation``, None or ``(kind, min_val, max_val)`` with ``kind`` one of
    ``tritonkit.kernels.elementwise.ACTIVATIONS`` (min_val/max_val: hardtanh's bounds), every other
    part optional. BN is eval-mode BatchNorm when
    ``running_mean``/``running_var`` are given: ``(v - running_mean) * bn_weight / sqrt(running_var +
    eps) + bn_bias`` per output channel (bn_weight, bn_bias optional). ``x'`` = x, or with ``input_norm`` =
    (mean, invstd, weight, bias) per input channel ``(x - mean[c]) * invstd[c] * weight[c] + bias[c]`` (then
    ReLU'd when ``input_relu``) with zero padding applied after that transform. ``stats``: also return the
    float32 BatchNorm partials of conv + bias, shape [bn_stat_tiles(N*OH*OW), 3, OC] (see ``_store_bn_partials``)."""
    shape, conv = _geometry(x.shape, w.shape, stride, padding, dilation, groups)
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg = shape
    y = empty((N, OC, OH, OW), dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))
    partials = None
    if stats:
        partials = empty((bn_stat_tiles(N * OH * OW), 3, OC), dtype=torch.float32, device=x.device)
    check_int32_indexing(x, w, y, residual, partials)
    if y.numel() == 0:
        return (y, partials) if stats else y
    r = residual if residual is not None else y
    kind, min_val, max_val = activation or ("", 0.0, 0.0)
    if kind and kind not in ACTIVATIONS:
        raise ValueError(f"conv2d: activation must be one of {ACTIVATIONS}, got {kind!r}")

    def grid(meta):
        return (triton.cdiv(N * OH * OW, meta["BLOCK_M"]), triton.cdiv(OCg, meta["BLOCK_N"]), groups)

    if running_mean is None and residual is None and not stats and input_norm is None:
        conv2d_fwd_kernel[grid](
            x, w, bias if bias is not None else w, y, *shape, *conv, *x.stride(), *w.stride(), *y.stride(),
            float(min_val), float(max_val), HAS_BIAS=bias is not None, ACT=kind, PADDED=any(padding),
            CHANNEL_INNER=channel_inner(Cg),
            PRECISION=dot_precision(x.dtype, allow_tf32),
        )
        return y
    bn_pointers, bn_flags = _bn_eval_args(w, bn_weight, bn_bias, running_mean, running_var)
    in_pointers, prologue = prologue_args(x, input_norm, input_relu)
    conv2d_fwd_bn_kernel[grid](
        x, w, bias if bias is not None else w, y, *bn_pointers, r, partials if stats else w, *in_pointers, *shape,
        *conv, *x.stride(), *w.stride(), *y.stride(), *r.stride(), float(eps), float(min_val), float(max_val),
        HAS_BIAS=bias is not None, ACT=kind, PADDED=any(padding), CHANNEL_INNER=channel_inner(Cg),
        PRECISION=dot_precision(x.dtype, allow_tf32), **bn_flags,
        HAS_RESIDUAL=residual is not None, STATS=bool(stats), PROLOGUE=prologue,
    )
    return (y, partials) if stats else y


def conv2d_relu_maxpool(x, w, bias, stride, padding, dilation, groups, pool_kernel, pool_stride, pool_padding,
                        pool_dilation, ceil_mode, *, allow_tf32=False, bn_weight=None, bn_bias=None,
                        running_mean=None, running_var=None, eps=1e-5):
    """``max_pool2d(relu(BN(conv2d(x, w) + bias)))`` in one kernel (no indices: for inference); bias
    and the eval-mode BatchNorm BN (as in ``conv2d``: running_mean/running_var given) optional."""
    shape, conv = _geometry(x.shape, w.shape, stride, padding, dilation, groups)
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg = shape
    PH, PW = (pool_output_size(s, k, st, p, d, ceil_mode) for s, k, st, p, d in
              zip((OH, OW), pool_kernel, pool_stride, pool_padding, pool_dilation))
    y = empty((N, OC, PH, PW), dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))
    check_int32_indexing(x, w, y)
    if y.numel() == 0:
        return y

    def grid(meta):
        return (triton.cdiv(N * PH * PW, meta["BLOCK_M"]), triton.cdiv(OCg, meta["BLOCK_N"]), groups)

    bn_pointers, bn_flags = _bn_eval_args(w, bn_weight, bn_bias, running_mean, running_var)
    conv2d_relu_maxpool_fwd_kernel[grid](
        x, w, bias if bias is not None else w, y, *bn_pointers, *shape, *conv,
        PH, PW, *pool_kernel, *pool_stride, *pool_padding, *pool_dilation,
        *x.stride(), *w.stride(), *y.stride(), float(eps),
        HAS_BIAS=bias is not None, PADDED=any(padding), CHANNEL_INNER=channel_inner(Cg),
        PRECISION=dot_precision(x.dtype, allow_tf32), **bn_flags,
    )
    return y


def _tap_steps(stride, dilation) -> tuple[int, int]:
    """(tap_h, tap_w): a strided input-gradient phase visits every stride / gcd(stride, dilation)-th tap."""
    return tuple(s // math.gcd(s, d) for s, d in zip(stride, dilation))


def grad_stat_tiles(input_size, stride) -> int:
    """T, the first dimension of an input gradient's BatchNorm-backward partials (``grad_stats``): per
    stride phase, one per BN_STAT_ROWS of its N * ceil(H / stride_h) * ceil(W / stride_w) rows."""
    N, _, H, W = input_size
    return stride[0] * stride[1] * triton.cdiv(N * triton.cdiv(H, stride[0]) * triton.cdiv(W, stride[1]),
                                               BN_STAT_ROWS)


def _grad_stats_buffers(x, stride, count) -> list:
    """The float32 [T, 2, C] partials of each of the ``count`` BatchNorm backwards a launch writes the
    reductions of (zeros where no program writes: an empty problem)."""
    shape = (grad_stat_tiles(x.shape, stride), 2, x.shape[1])
    stats = [empty(shape, dtype=torch.float32, device=x.device) for _ in range(count)]
    return [s.zero_() for s in stats] if x.numel() == 0 else stats


def _stats_kind(input_norm, input_relu, grad_stats, bn_inputs) -> int:
    """GRAD_STATS of a launch: ``grad_stats`` through the input prologue (1, 2: its ReLU), ``bn_inputs``
    ((z, mean) of one or two BatchNorms after the input's own ReLU: 3, 4), or neither (0)."""
    if grad_stats and bn_inputs:
        raise ValueError("grad_stats (through the input prologue) and bn_inputs (after the input's ReLU) exclude "
                         "each other")
    if bn_inputs:
        if input_norm is not None or len(bn_inputs) not in (1, 2):
            raise ValueError("bn_inputs: one or two (input, mean) pairs, and no input prologue")
        return 2 + len(bn_inputs)
    return (2 if input_relu else 1) if grad_stats and input_norm is not None else 0


def _bn_input_args(bn_inputs, dx, stats) -> tuple[tuple, tuple]:
    """The kernels' (stats, z, z2, z_mean, z2_mean, stats2) and the strides of z and z2; ``dx`` stands in for
    what a launch does not read."""
    first = stats[0] if stats else dx
    if not bn_inputs:
        return (first, dx, dx, dx, dx, dx), (*dx.stride(), *dx.stride())
    (z, mean), (z2, mean2) = bn_inputs[0], bn_inputs[-1]
    return (first, z, z2, mean, mean2, stats[-1]), (*z.stride(), *z2.stride())


def conv2d_input_grad(grad_out, w, relu_output, input_size, stride, padding, dilation, groups, *,
                      allow_tf32=False, residual=None, residual_mask=None, x=None, input_norm=None, input_relu=False,
                      grad_stats=False, bn_inputs=None):
    """``dx`` of shape ``input_size``, in ``grad_out``'s memory format, plus ``residual`` (dx's shape,
    any strides) where ``residual_mask`` > 0 (both optional; the mask only with a residual).
    ``grad_stats`` (no residual; ``x``, ``input_norm`` and ``input_relu`` the forward's input and prologue,
    :func:`conv2d`'s): ``(dx, stats)``, dx taken on through the prologue's ReLU to the BatchNorm output
    (zero where the recomputed output is <= 0) and the BatchNorm backward's partials of it, float32
    [grad_stat_tiles(), 2, C]: the sums of dx and of dx * (x - mean) over each BN_STAT_ROWS rows of
    a stride phase (``_store_grad_partials``; no atomics, so the same bits every run).
    ``bn_inputs`` (``x`` the conv's input, a ReLU's output: a residual block's end; residual allowed):
    ``(dx, stats[, stats2])``, dx (+ residual) taken on through that ReLU (zero where x <= 0) and the partials
    of the backward of each BatchNorm (z, mean) in ``bn_inputs`` (one or two) reading it: the sums of dx and
    of dx * (z - mean), as above."""
    shape, conv = _geometry(input_size, w.shape, stride, padding, dilation, groups)
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg = shape
    dx = empty(tuple(input_size), dtype=grad_out.dtype, device=grad_out.device,
               memory_format=suggest_memory_format(grad_out))
    kind = _stats_kind(input_norm, input_relu, grad_stats, bn_inputs)
    if kind >= 3 and x is None:
        raise ValueError("bn_inputs needs x, the conv's input (the ReLU output the gradient goes through)")
    stats = _grad_stats_buffers(dx, stride, (kind > 0) + (kind == 4))
    (stats_arg, *bn_pointers), bn_strides = _bn_input_args(bn_inputs, dx, stats)
    check_int32_indexing(grad_out, w, dx, relu_output, residual, residual_mask, x, *stats, *bn_pointers)
    if dx.numel() == 0:
        return (dx, *stats) if kind else dx
    r = relu_output if relu_output is not None else grad_out
    res = residual if residual is not None else dx
    res_mask = residual_mask if residual_mask is not None else res
    x = x if x is not None else dx
    in_pointers, _ = prologue_args(x, input_norm, input_relu)

    sh, sw = stride
    rows = N * triton.cdiv(H, sh) * triton.cdiv(W, sw)  # per phase

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(Cg, meta["BLOCK_N"]), groups * sh * sw)

    conv2d_input_grad_kernel[grid](
        grad_out, r, w, dx, res, res_mask, x, stats_arg, *in_pointers, *bn_pointers, *shape, *conv,
        *_tap_steps(stride, dilation), *grad_out.stride(), *r.stride(), *w.stride(), *dx.stride(), *res.stride(),
        *res_mask.stride(), *x.stride(), *bn_strides,
        HAS_MASK=relu_output is not None, CHANNEL_INNER=channel_inner(OCg),
        PRECISION=dot_precision(grad_out.dtype, allow_tf32), HAS_RESIDUAL=residual is not None,
        HAS_RESIDUAL_MASK=residual_mask is not None, GRAD_STATS=kind,
    )
    return (dx, *stats) if kind else dx


_SPLIT_K = None  # set by weight_grad_split()


@contextlib.contextmanager
def weight_grad_split(split: int):
    """Within this block weight-gradient launches split their reduction ``split`` ways (float32
    partials reduced afterwards) whatever the device: tests run the split-K path in the interpreter,
    which otherwise never splits."""
    global _SPLIT_K
    previous, _SPLIT_K = _SPLIT_K, split
    try:
        yield
    finally:
        _SPLIT_K = previous


def _split_k(tiles: int, reduction: int, device: torch.device) -> int:
    """Programs to split the weight-gradient reduction over: enough to fill the GPU, >= 1024 rows each."""
    if _SPLIT_K is not None:
        return _SPLIT_K
    if INTERPRET:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, tiles), reduction // 1024, 64))


def _weight_grad_buffers(grad_out, x, weight_size, shape, groups, bias_grad):
    """(dw, db or None, float32 split-K partials or None, split) of a weight-gradient launch."""
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg = shape
    dw = empty(tuple(weight_size), dtype=grad_out.dtype, device=grad_out.device,
               memory_format=suggest_memory_format(x))
    db = empty((OC,), dtype=grad_out.dtype, device=grad_out.device) if bias_grad else None
    split = _split_k(triton.cdiv(OCg, 32) * triton.cdiv(KH * KW * Cg, 64) * groups, N * OH * OW, grad_out.device)
    partial = None
    if split > 1 and dw.numel() and N * OH * OW:  # per split: a contiguous dw, then db
        partial = empty((split, dw.numel() + (OC if bias_grad else 0)), dtype=torch.float32, device=dw.device)
    return dw, db, partial, split


def _reduce_splits(dw, db, partial):
    """One reduction over the split-K partials, in a fixed order, for dw and db alike."""
    if partial is not None:
        total = partial.sum(0)
        dw.copy_(total[:dw.numel()].view(dw.shape))
        if db is not None:
            db.copy_(total[dw.numel():])


def conv2d_weight_grad(grad_out, x, relu_output, weight_size, stride, padding, dilation, groups, *,
                       allow_tf32=False, bias_grad=False, input_norm=None, input_relu=False):
    """``dw`` of shape ``weight_size``, summed over the batch and output positions; channels_last when
    ``x`` is (the memory format aten's convolution_backward gives grad_weight). ``bias_grad``: return
    ``(dw, db)``, db[oc] = the sum of dy' over the batch and output positions, from the same launch.
    ``input_norm``/``input_relu``: the forward's input was ``x'`` of :func:`conv2d`'s prologue, recomputed
    from ``x`` as it is loaded."""
    shape, conv = _geometry(x.shape, weight_size, stride, padding, dilation, groups)
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg = shape
    dw, db, partial, split = _weight_grad_buffers(grad_out, x, weight_size, shape, groups, bias_grad)
    out = (dw, db) if bias_grad else dw
    check_int32_indexing(grad_out, x, dw, relu_output)
    if dw.numel() == 0:
        return out
    if N * OH * OW == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return out
    r = relu_output if relu_output is not None else grad_out

    def grid(meta):
        return (triton.cdiv(OCg, meta["BLOCK_M"]) * triton.cdiv(KH * KW * Cg, meta["BLOCK_N"]), groups, split)

    in_pointers, prologue = prologue_args(x, input_norm, input_relu)
    conv2d_weight_grad_kernel[grid](
        grad_out, r, x, dw, db if bias_grad else dw, partial if partial is not None else dw, *in_pointers,
        *shape, *conv, *grad_out.stride(), *r.stride(), *x.stride(), *dw.stride(),
        HAS_MASK=relu_output is not None, SPLIT_K=split, PADDED=any(padding),
        PRECISION=dot_precision(x.dtype, allow_tf32), HAS_BIAS_GRAD=bool(bias_grad), PROLOGUE=prologue,
    )
    _reduce_splits(dw, db, partial)
    return out


def conv2d_backward(grad_out, x, w, relu_output, stride, padding, dilation, groups, *, allow_tf32=False,
                    residual=None, residual_mask=None, bias_grad=False, input_norm=None, input_relu=False,
                    grad_stats=False, bn_inputs=None):
    """``(dx, dw, db)`` in one launch (conv2d_backward_kernel): ``conv2d_input_grad`` (with its residual
    epilogue) and ``conv2d_weight_grad`` (db None without ``bias_grad``; ``input_norm``/``input_relu`` its
    prologue, dx then the gradient of the prologue's output), outputs laid out as they lay them out;
    ``grad_stats`` (with ``input_norm``) or ``bn_inputs``: ``(dx, dw, db, stats[, stats2])``, dx and the
    partials as :func:`conv2d_input_grad`'s. Two launches instead (those launchers) for a problem with nothing to
    compute on either side (an empty dx, dw or output) and on a GPU where no config pair fits (float32
    with fewer than 32 output channels per group: see ``backward_config_for``)."""
    shape, conv = _geometry(x.shape, w.shape, stride, padding, dilation, groups)
    N, C, H, W, OC, OH, OW, KH, KW, Cg, OCg = shape
    kind = _stats_kind(input_norm, input_relu, grad_stats, bn_inputs)
    flags = {"CHANNEL_INNER": channel_inner(OCg), "PRECISION": dot_precision(grad_out.dtype, allow_tf32),
             "HAS_BIAS_GRAD": bool(bias_grad), "GRAD_STATS": kind}
    fits = INTERPRET or any(backward_config_for(c, grad_out.dtype, None, flags) for c in BACKWARD_GPU_CONFIGS)
    if not fits or x.numel() == 0 or w.numel() == 0 or N * OH * OW == 0:
        dx = conv2d_input_grad(grad_out, w, relu_output, x.shape, stride, padding, dilation, groups,
                               allow_tf32=allow_tf32, residual=residual, residual_mask=residual_mask, x=x,
                               input_norm=input_norm, input_relu=input_relu, grad_stats=grad_stats,
                               bn_inputs=bn_inputs)
        dw = conv2d_weight_grad(grad_out, x, relu_output, w.shape, stride, padding, dilation, groups,
                                allow_tf32=allow_tf32, bias_grad=bias_grad, input_norm=input_norm,
                                input_relu=input_relu)
        dxs = dx if kind else (dx,)
        dws = dw if bias_grad else (dw, None)
        return (dxs[0], *dws, *dxs[1:])
    dx = empty(tuple(x.shape), dtype=grad_out.dtype, device=grad_out.device,
               memory_format=suggest_memory_format(grad_out))
    stats = _grad_stats_buffers(dx, stride, (kind > 0) + (kind == 4))
    (stats_arg, *bn_pointers), bn_strides = _bn_input_args(bn_inputs, dx, stats)
    dw, db, partial, split = _weight_grad_buffers(grad_out, x, w.shape, shape, groups, bias_grad)
    check_int32_indexing(grad_out, x, w, dx, dw, relu_output, residual, residual_mask, partial, *stats, *bn_pointers)
    r = relu_output if relu_output is not None else grad_out
    res = residual if residual is not None else dx
    res_mask = residual_mask if residual_mask is not None else res
    sh, sw = stride
    rows = N * triton.cdiv(H, sh) * triton.cdiv(W, sw)  # per input-gradient phase

    def grid(meta):
        dx_programs = triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(Cg, meta["BLOCK_N"]) * groups * sh * sw
        dw_tiles = triton.cdiv(OCg, meta["DW_BLOCK_M"]) * triton.cdiv(KH * KW * Cg, meta["DW_BLOCK_N"])
        return (dx_programs + dw_tiles * groups * split,)

    in_pointers, prologue = prologue_args(x, input_norm, input_relu)
    conv2d_backward_kernel[grid](
        grad_out, r, w, x, dx, res, res_mask, dw, db if bias_grad else dw, partial if partial is not None else dw,
        stats_arg, *in_pointers, *bn_pointers, *shape, *conv, *_tap_steps(stride, dilation), groups,
        rows, *grad_out.stride(), *r.stride(), *w.stride(), *x.stride(), *dx.stride(), *res.stride(),
        *res_mask.stride(), *dw.stride(), *bn_strides,
        HAS_MASK=relu_output is not None, HAS_RESIDUAL=residual is not None,
        HAS_RESIDUAL_MASK=residual_mask is not None, SPLIT_K=split, PADDED=any(padding), PROLOGUE=prologue,
        **flags,
    )
    _reduce_splits(dw, db, partial)
    return (dx, dw, db, *stats)
