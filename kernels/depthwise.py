"""Depthwise conv2d (groups == C, OC = C * M output channels, M the channel multiplier) as direct
kernels: a depthwise reduction is only its KH x KW taps, so there is no GEMM (tl.dot) and no tile
padding; every program loads channel vectors and multiplies them in float32, a row of KW taps
unrolled per step of a loop over the KH rows (all KH*KW unrolled, sm_90's ptxas keeps every tap's
loads in flight and spills from 5x5 on).

Shapes: input x (N, C, H, W), weight w (OC, 1, KH, KW), output y (N, OC, OH, OW); output channel oc
reads input channel oc // M. Every tensor is addressed through its strides, so NCHW, channels_last
and strided views are read in place; channels_last is the fast layout (a tile's channels are
contiguous: 16-byte vectors), NCHW is correct and takes long pixel tiles instead.

forward, a program = BLOCK_P output pixels (flattened (n, oh, ow)) x BLOCK_C output channels:
    y[n, oc, oh, ow] = act(BN(bias[oc] + sum_{kh, kw} x[n, oc // M, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]
                                                    * w[oc, 0, kh, kw]))
    in float32, rounded once. BN is eval-mode BatchNorm from its parameters, centred first as eager's:
    BN(v) = (v - running_mean[oc]) * (bn_weight[oc] / sqrt(running_var[oc] + eps)) + bn_bias[oc];
    act is none, relu, relu6 = hardtanh(v, 0, 6), or another kind of tritonkit.kernels.elementwise
    (hardswish, SiLU, ...: FORWARD_ACTIVATIONS), computed as tritonkit::activation computes it (NaN
    propagates, as eager's).
    STATS also writes the BatchNorm partials of conv + bias in conv2d_bn_stats' layout: float32
    [T, 3, OC], T = bn_stat_tiles(N*OH*OW), for each BN_STAT_ROWS-pixel tile t (in (n, oh, ow) order)
    and channel oc (count, mean, M2 = sum of squared deviations from the tile mean).

input gradient, a program = BLOCK_P input pixels (n, h, w) x BLOCK_C input channels:
    dx[n, c, h, w] = sum_{m < M, kh, kw} dy'[n, c*M + m, oh, ow] * w[c*M + m, 0, kh, kw]
        over the taps where oh = (h + ph - kh*dh) / sh and ow = (w + pw - kw*dw) / sw are whole and in
        range (the stride is constexpr, so the test is a shift and a mask for strides 1 and 2);
    dy' = dy masked by the forward's activation output: y > 0 (relu), 0 < y < 6 (relu6), as
    threshold_backward / hardtanh_backward pass a NaN output's gradient. With a residual (dx's shape,
    any strides: an inverted residual block's identity-branch gradient) dx += residual[n, c, h, w],
    added to the float32 sum in the epilogue, before the one rounding.

weight gradient, a program = BLOCK_C output channels x one split of the N*OH*OW pixels:
    dw[oc, 0, kh, kw] = sum_{n, oh, ow} dy'[n, oc, oh, ow] * x[n, oc // M, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]
    db[oc] = sum_{n, oh, ow} dy'[n, oc, oh, ow]  (optional, from the same dy' loads)
    A step loads dy' for BLOCK_P pixels once and x at all KH*KW taps as one [TAPS, BLOCK_P, BLOCK_C]
    gather (TAPS = KH*KW padded to a power of two), into a float32 accumulator of that shape reduced
    over the pixels once at the end; no atomics. With split > 1 the programs write float32 partials
    [split, KH*KW + 1, OC] (the last row db's) that one fixed-order sum reduces afterwards.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from tritonkit.kernels.common import (
    INTERP_TILE,
    TRITON_TYPE,
    check_int32_indexing,
    empty,
    interp_block,
    reduction_split,
    tuned_kernel,
)
from tritonkit.kernels.conv import BN_STAT_ROWS, bn_stat_tiles, output_size, suggest_memory_format
from tritonkit.kernels.elementwise import ACTIVATIONS as ELEMENTWISE_ACTIVATIONS
from tritonkit.kernels.elementwise import apply_activation

ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2}  # the gradient kernels' masks (from the forward's output)
# the forward's activation -> its ACT (a kind of tritonkit.kernels.elementwise; hardtanh is ReLU6 here)
FORWARD_ACTIVATIONS = {"none": "", "relu": "relu", "relu6": "hardtanh",
                       **{kind: kind for kind in ELEMENTWISE_ACTIVATIONS if kind not in ("relu", "hardtanh")}}


def _cfg(block_p, block_c, warps):
    return triton.Config({"BLOCK_P": block_p, "BLOCK_C": block_c}, num_warps=warps, num_stages=1)


# channels_last: a row of BLOCK_C channels is BLOCK_C contiguous elements (fp16: 8 per thread make a
# 16-byte load, so 64 channels take 8 threads and a warp covers 4 pixels); NCHW: pixels are the
# contiguous axis, so the tiles are long in pixels and one or a few channels wide. 16 outputs per
# thread at most: a row's unrolled taps have their loads in flight at once, and more spill.
_NHWC = [_cfg(32, 64, 4), _cfg(16, 128, 4), _cfg(64, 64, 8), _cfg(32, 128, 8), _cfg(64, 32, 4), _cfg(64, 16, 2)]
_NCHW = [_cfg(256, 1, 4), _cfg(512, 1, 8), _cfg(128, 4, 4)]
GPU_CONFIGS = _NHWC + _NCHW


def _config_for(config, dtype, arch=None, launch=None) -> bool:
    """The channels_last list for launches whose channel stride (``sxc``, ``sgc``: the tiles' channel
    axis) is 1, the NCHW list otherwise (unknown: both); statistics launches take only tiles of whole
    BN_STAT_ROWS-pixel groups."""
    launch = launch or {}
    stride = launch.get("sxc", launch.get("sgc"))
    if stride is not None and not any(config is c for c in (_NHWC if stride == 1 else _NCHW)):
        return False
    return not launch.get("STATS") or config.kwargs["BLOCK_P"] % BN_STAT_ROWS == 0


# Interpreter: one program covers as many (pixel, channel) pairs as numpy handles well (channel
# blocks of up to 256); statistics tiles are whole BN_STAT_ROWS-pixel groups.
_INTERP_LIMIT = None  # set by interp_block_limit()


@contextlib.contextmanager
def interp_block_limit(limit: int):
    """Within this block interpreter tiles are at most ``limit`` (a power of two) pixels or channels
    (statistics tiles: at least BN_STAT_ROWS pixels), so launches run several programs: tests use it
    to exercise tails and program boundaries that one whole-problem tile skips."""
    global _INTERP_LIMIT
    previous, _INTERP_LIMIT = _INTERP_LIMIT, limit
    try:
        yield
    finally:
        _INTERP_LIMIT = previous


def _interp(pixels, channels="OC", taps=None):
    def block_c(a):
        return interp_block(a[channels], 1, min(256, _INTERP_LIMIT or 256))

    def block_p(a):  # the weight gradient's steps are [TAPS, BLOCK_P, BLOCK_C]
        lo = BN_STAT_ROWS if a.get("STATS") else 1
        tile = INTERP_TILE // (block_c(a) * (a[taps] if taps else 1))
        return interp_block(pixels(a), lo, max(lo, min(tile, _INTERP_LIMIT or INTERP_TILE)))

    return {"BLOCK_C": block_c, "BLOCK_P": block_p}


_SHAPE = ("N", "C", "H", "W", "OC", "OH", "OW", "M", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w")
_FLOAT32_POINTERS = ("stats_ptr", "partial_ptr", "bn_weight_ptr", "bn_bias_ptr", "mean_ptr", "var_ptr")


def _strides(*names):
    return [f"s{n}{d}" for n in names for d in "nchw"]


_W_STRIDES = ["swn", "swh", "sww"]  # w's channel dimension has size 1


def _signature(pointers, strides, constexprs, floats=()):
    def signature(dtype):
        t = "*" + TRITON_TYPE[dtype]
        sig = {p: ("*fp32" if p in _FLOAT32_POINTERS else t) for p in pointers}
        sig.update({a: "i32" for a in (*_SHAPE, *strides)})
        sig.update({a: "fp32" for a in floats})
        sig.update({c: "constexpr" for c in (*constexprs, "KH", "KW", "BLOCK_P", "BLOCK_C")})
        return sig

    return signature


def _typical(n=32, c=144, hw=56, m=1, k=3, stride=1, pad=1, layout="nhwc", prefixes=("x", "w", "y")):
    """The AOT gate's variant: the usual runtime ints of a launch, by default MobileNetV2's 144-channel
    3x3 depthwise at 56x56 (batch 32, stride 1, padding 1), channels_last; ``prefixes`` name the
    launch's tensors (x, dx and res: input shape; y, g, r: output shape; w: the contiguous weight)."""
    out = (hw + 2 * pad - k) // stride + 1
    oc = c * m
    values = {"N": n, "C": c, "H": hw, "W": hw, "OC": oc, "OH": out, "OW": out, "M": m, "KH": k, "KW": k,
              "stride_h": stride, "stride_w": stride, "pad_h": pad, "pad_w": pad, "dil_h": 1, "dil_w": 1}
    if "w" in prefixes:
        values.update(swn=k * k, swh=k, sww=1)
    for prefix in (p for p in prefixes if p != "w"):
        ch, size = (c, hw) if prefix in ("x", "dx", "res") else (oc, out)
        strides = (size * size * ch, 1, size * ch, ch) if layout == "nhwc" else (ch * size * size, size * size, size, 1)
        values.update(zip((f"s{prefix}{d}" for d in "nchw"), strides))
    return values


@triton.jit
def _unflatten(p, OH, OW):
    """(n, oh, ow) of the flattened pixel index p = (n * OH + oh) * OW + ow."""
    return p // (OH * OW), (p // OW) % OH, p % OW


@triton.jit
def _activation_mask(g, r, MASK: tl.constexpr):
    """dy' from dy and the forward's activation output r: relu (MASK 1) keeps r > 0, relu6 (2) keeps
    0 < r < 6; comparisons are false for NaN, so a NaN output passes its gradient as in eager."""
    if MASK:
        rf = r.to(tl.float32)
        drop = rf <= 0
        if MASK == 2:
            drop = drop | (rf >= 6)
        g = tl.where(drop, tl.zeros_like(g), g)
    return g


# ---------------------------------------------------------------------------------------------- forward
_STAT_ROWS = tl.constexpr(BN_STAT_ROWS)


@triton.jit
def _store_partials(stats_ptr, v, pid_p, P, oc, c_ok, OC, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(count, mean, M2) of ``v`` (float32 [BLOCK_P, BLOCK_C], pixels pid_p * BLOCK_P + i) per
    BN_STAT_ROWS-pixel tile t and channel oc at stats[t, 0..2, oc]; the tile mean first, then the
    squared deviations from it (two passes in registers: no cancellation). Pixels >= P count for
    nothing and tiles past the last are not stored."""
    ROWS: tl.constexpr = _STAT_ROWS
    TILES: tl.constexpr = BLOCK_P // ROWS
    ok = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)) < P
    ok3 = tl.reshape(ok, (TILES, ROWS, 1))
    v3 = tl.reshape(tl.where(ok[:, None], v, 0.0), (TILES, ROWS, BLOCK_C))
    count = tl.sum(ok3.to(tl.float32), axis=1)  # [TILES, 1]
    mean = tl.sum(v3, axis=1) / tl.maximum(count, 1.0)
    dev = tl.where(ok3, v3 - mean[:, None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=1)
    t = pid_p * TILES + tl.arange(0, TILES)
    t_ok = (t < tl.cdiv(P, ROWS))[:, None] & c_ok[None, :]
    base = stats_ptr + (t * (3 * OC))[:, None] + oc[None, :]
    tl.store(base, count + tl.zeros_like(mean), mask=t_ok)
    tl.store(base + OC, mean, mask=t_ok)
    tl.store(base + 2 * OC, m2, mask=t_ok)


_FWD_POINTERS = ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "bn_weight_ptr", "bn_bias_ptr", "mean_ptr", "var_ptr",
                 "stats_ptr")
_FWD_FLAGS = ("HAS_BIAS", "ACT", "BATCH_NORM", "HAS_BN_WEIGHT", "HAS_BN_BIAS", "STATS")
_FWD_PLAIN = {"HAS_BIAS": True, "ACT": "hardtanh", "BATCH_NORM": False, "HAS_BN_WEIGHT": False,
              "HAS_BN_BIAS": False, "STATS": False}
_FWD_BN = {**_FWD_PLAIN, "HAS_BIAS": False, "BATCH_NORM": True, "HAS_BN_WEIGHT": True, "HAS_BN_BIAS": True}
_FWD_STATS = {**_FWD_PLAIN, "HAS_BIAS": False, "ACT": "", "STATS": True}


# The gate's patterns: MobileNetV2's 3x3 stride-1 block (+ bias + relu6); variants: its stride-2 block,
# EfficientNet's 5x5 (240 channels at 28x28), multiplier 2, NCHW, eval BatchNorm + relu6 (weights as given,
# and tap-major), training statistics. The weight is read through its strides: a contiguous [OC, 1, KH, KW]
# weight costs each program KH*KW scalar loads per channel, a tap-major one
# (``w.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)``, prepared once for inference) KH*KW vectors.
@tuned_kernel(
    "depthwise_conv2d_fwd",
    gpu_configs=GPU_CONFIGS,
    config_for_dtype=_config_for,
    interp_heuristics=_interp(lambda a: a["N"] * a["OH"] * a["OW"]),
    key=["N", "C", "H", "W", "OC", "OH", "OW", "KH", "KW", "sxc", "STATS", "BATCH_NORM"],
    signature=_signature(_FWD_POINTERS, _strides("x") + _W_STRIDES + _strides("y"), _FWD_FLAGS, ("eps",)),
    constexprs=lambda dtype: {**_FWD_PLAIN, **_typical()},
    variants={
        "stride2": lambda dtype: {**_FWD_PLAIN, **_typical(c=96, hw=112, stride=2)},
        "5x5": lambda dtype: {**_FWD_PLAIN, **_typical(c=240, hw=28, k=5, pad=2)},
        "multiplier2": lambda dtype: {**_FWD_PLAIN, **_typical(c=64, m=2)},
        "nchw": lambda dtype: {**_FWD_PLAIN, **_typical(layout="nchw")},
        # inference with the weight stored tap-major ([KH, KW, OC] in memory: 16-byte weight loads)
        "bn_tap_major": lambda dtype: {**_FWD_BN, **_typical(), "swn": 1, "swh": 3 * 144, "sww": 144},
        "bn": lambda dtype: {**_FWD_BN, **_typical()},
        "bn_hardswish": lambda dtype: {**_FWD_BN, "ACT": "hardswish", **_typical()},  # MobileNetV3, inference
        "stats": lambda dtype: {**_FWD_STATS, **_typical()},
        "stats_nchw": lambda dtype: {**_FWD_STATS, **_typical(layout="nchw")},
    },
)
@triton.jit
def depthwise_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, stats_ptr,
    N, C, H, W, OC, OH, OW, M, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, swn, swh, sww, syn, syc, syh, syw, eps,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BATCH_NORM: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr, STATS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = act(BN(conv + bias)) for one [BLOCK_P pixels, BLOCK_C channels] tile (module doc); every
    epilogue part optional (constexpr flags), act = ``ACT`` ("" none, else a value of
    ``FORWARD_ACTIVATIONS``: ``tritonkit.kernels.elementwise``'s math, hardtanh with bounds 0 and 6)."""
    pid_p = tl.program_id(0)
    P = N * OH * OW
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    oc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = oc < OC
    n, oh, ow = _unflatten(p, OH, OW)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_tile = x_ptr + (n * sxn + ih0 * sxh + iw0 * sxw)[:, None] + ((oc // M) * sxc)[None, :]
    w_row = w_ptr + oc * swn
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.range(KH, loop_unroll_factor=1):
        ih = ih0 + kh * dil_h
        h_ok = p_ok & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * dil_w
            ok = (h_ok & (iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
            v = tl.load(x_tile + (kh * dil_h * sxh + kw * dil_w * sxw), mask=ok, other=0.0)
            wt = tl.load(w_row + (kh * swh + kw * sww), mask=c_ok, other=0.0)
            acc += v.to(tl.float32) * wt.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + oc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if STATS:
        _store_partials(stats_ptr, acc, pid_p, P, oc, c_ok, OC, BLOCK_P, BLOCK_C)
    if BATCH_NORM:  # centred first, 1/sqrt correctly rounded: eager's eval BatchNorm, in float32
        mean = tl.load(mean_ptr + oc, mask=c_ok, other=0.0).to(tl.float32)
        k = tl.div_rn(1.0, tl.sqrt_rn(tl.load(var_ptr + oc, mask=c_ok, other=1.0).to(tl.float32) + eps))
        if HAS_BN_WEIGHT:
            k = k * tl.load(bn_weight_ptr + oc, mask=c_ok, other=0.0).to(tl.float32)
        acc = (acc - mean[None, :]) * k[None, :]
        if HAS_BN_BIAS:
            acc += tl.load(bn_bias_ptr + oc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if ACT != "":  # NaN stays NaN, as torch's activations keep it
        acc = apply_activation(acc, ACT, 0.0, 6.0)
    y_off = (n * syn + oh * syh + ow * syw)[:, None] + (oc * syc)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


# ------------------------------------------------------------------------------------- input gradient
def _dgrad_config_for(config, dtype, arch=None, launch=None) -> bool:
    """``_config_for``, less the 8-warp channels_last tiles for strided launches (their stride masks
    spill 16 B on sm_90 in half precision with Triton 3.9: AOT gate)."""
    strided = (launch or {}).get("STRIDE_H", 1) > 1 or (launch or {}).get("STRIDE_W", 1) > 1
    if strided and config.num_warps == 8 and any(config is c for c in _NHWC):
        return False
    return _config_for(config, dtype, arch, launch)


_DGRAD_TENSORS = ("g", "r", "w", "dx", "res")  # res: the residual, dx itself when there is none
_DGRAD_PLAIN = {"MASK": ACTIVATIONS["relu6"], "STRIDE_H": 1, "STRIDE_W": 1, "HAS_RESIDUAL": False}


@tuned_kernel(
    "depthwise_conv2d_input_grad",
    gpu_configs=GPU_CONFIGS,
    config_for_dtype=_dgrad_config_for,
    interp_heuristics=_interp(lambda a: a["N"] * a["H"] * a["W"], "C"),
    key=["N", "C", "H", "W", "OC", "OH", "OW", "KH", "KW", "STRIDE_H", "STRIDE_W", "HAS_RESIDUAL", "sgc"],
    signature=_signature(("g_ptr", "r_ptr", "w_ptr", "dx_ptr", "res_ptr"),
                         _strides("g", "r") + _W_STRIDES + _strides("dx", "res"),
                         ("MASK", "STRIDE_H", "STRIDE_W", "HAS_RESIDUAL")),
    constexprs=lambda dtype: {**_DGRAD_PLAIN, **_typical(prefixes=_DGRAD_TENSORS)},
    variants={
        "stride2": lambda dtype: {**_DGRAD_PLAIN, "STRIDE_H": 2, "STRIDE_W": 2,
                                  **_typical(c=96, hw=112, stride=2, prefixes=_DGRAD_TENSORS)},
        "5x5": lambda dtype: {**_DGRAD_PLAIN, **_typical(c=240, hw=28, k=5, pad=2, prefixes=_DGRAD_TENSORS)},
        "nchw": lambda dtype: {**_DGRAD_PLAIN, "MASK": 0, **_typical(layout="nchw", prefixes=_DGRAD_TENSORS)},
        # MobileNetV2's inverted residual block (stride 1): + the identity branch's gradient
        "residual": lambda dtype: {**_DGRAD_PLAIN, "HAS_RESIDUAL": True, **_typical(prefixes=_DGRAD_TENSORS)},
    },
)
@triton.jit
def depthwise_conv2d_input_grad_kernel(
    g_ptr, r_ptr, w_ptr, dx_ptr, res_ptr,
    N, C, H, W, OC, OH, OW, M, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sgn, sgc, sgh, sgw, srn, src, srh, srw, swn, swh, sww, sdxn, sdxc, sdxh, sdxw, sresn, sresc, sresh, sresw,
    KH: tl.constexpr, KW: tl.constexpr, MASK: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx (+ residual: HAS_RESIDUAL) for one [BLOCK_P input pixels, BLOCK_C input channels] tile
    (module doc); MASK 0: dy as given, 1: relu, 2: relu6 output r masks it. STRIDE_H/W equal
    stride_h/w (constexpr copies)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < N * H * W
    c_ok = c < C
    n, h, w = _unflatten(p, H, W)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for m in range(0, M):
        oc = c * M + m
        g_tile = g_ptr + (n * sgn)[:, None] + (oc * sgc)[None, :]
        r_tile = r_ptr + (n * srn)[:, None] + (oc * src)[None, :]
        for kh in tl.range(KH, loop_unroll_factor=1):
            th = h + pad_h - kh * dil_h  # = oh * STRIDE_H for a tap that reaches h
            oh = th // STRIDE_H
            h_ok = p_ok & (th >= 0) & (oh < OH)
            if STRIDE_H > 1:
                h_ok = h_ok & (th % STRIDE_H == 0)
            for kw in tl.static_range(KW):
                tw = w + pad_w - kw * dil_w
                ow = tw // STRIDE_W
                ok = h_ok & (tw >= 0) & (ow < OW)
                if STRIDE_W > 1:
                    ok = ok & (tw % STRIDE_W == 0)
                ok2 = ok[:, None] & c_ok[None, :]
                g = tl.load(g_tile + (oh * sgh + ow * sgw)[:, None], mask=ok2, other=0.0)
                if MASK:
                    r = tl.load(r_tile + (oh * srh + ow * srw)[:, None], mask=ok2, other=0.0)
                    g = _activation_mask(g, r, MASK)
                wt = tl.load(w_ptr + oc * swn + (kh * swh + kw * sww), mask=c_ok, other=0.0)
                acc += g.to(tl.float32) * wt.to(tl.float32)[None, :]
    out_mask = p_ok[:, None] & c_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + (n * sresn + h * sresh + w * sresw)[:, None] + (c * sresc)[None, :], mask=out_mask,
                      other=0.0)
        acc += res.to(tl.float32)
    dx_off = (n * sdxn + h * sdxh + w * sdxw)[:, None] + (c * sdxc)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


# ------------------------------------------------------------------------------------ weight gradient
# A step holds a [TAPS, BLOCK_P, BLOCK_C] float32 accumulator (TAPS = KH*KW padded to a power of two):
# at most 32 of its elements per thread, so 3x3 (16 taps) takes 256-pixel-channel steps per 4 warps.
_WGRAD_NHWC = [_cfg(4, 64, 4), _cfg(2, 128, 4), _cfg(8, 64, 8), _cfg(8, 32, 4), _cfg(2, 64, 4), _cfg(1, 64, 4),
               _cfg(2, 64, 8)]
_WGRAD_NCHW = [_cfg(64, 1, 4), _cfg(32, 2, 4), _cfg(16, 1, 4), _cfg(64, 1, 8)]
WGRAD_GPU_CONFIGS = _WGRAD_NHWC + _WGRAD_NCHW


def _wgrad_config_for(config, dtype, arch=None, launch=None) -> bool:
    """The layout's list (as ``_config_for``), and tiles of 8 to 32 accumulator elements per thread."""
    launch = launch or {}
    stride = launch.get("sgc")
    if stride is not None and not any(config is c for c in (_WGRAD_NHWC if stride == 1 else _WGRAD_NCHW)):
        return False
    per_thread = launch.get("TAPS", 16) * config.kwargs["BLOCK_P"] * config.kwargs["BLOCK_C"] / (32 * config.num_warps)
    return 8 <= per_thread <= 32


def _wgrad_typical(k=3, **kw):
    return {**_typical(k=k, prefixes=("g", "r", "x"), **kw), "TAPS": triton.next_power_of_2(k * k)}


_WGRAD_PLAIN = {"MASK": ACTIVATIONS["relu6"], "SPLIT": 8, "HAS_BIAS_GRAD": False}


@tuned_kernel(
    "depthwise_conv2d_weight_grad",
    gpu_configs=WGRAD_GPU_CONFIGS,
    config_for_dtype=_wgrad_config_for,
    interp_heuristics=_interp(lambda a: a["N"] * a["OH"] * a["OW"], taps="TAPS"),
    key=["N", "C", "H", "W", "OC", "OH", "OW", "KH", "KW", "SPLIT", "HAS_BIAS_GRAD", "sgc"],
    signature=_signature(("g_ptr", "r_ptr", "x_ptr", "dw_ptr", "db_ptr", "partial_ptr"),
                         _strides("g", "r", "x"), ("MASK", "SPLIT", "HAS_BIAS_GRAD", "TAPS")),
    constexprs=lambda dtype: {**_WGRAD_PLAIN, **_wgrad_typical()},
    variants={
        "bias": lambda dtype: {**_WGRAD_PLAIN, "HAS_BIAS_GRAD": True, **_wgrad_typical()},
        "stride2": lambda dtype: {**_WGRAD_PLAIN, **_wgrad_typical(c=96, hw=112, stride=2)},
        "5x5": lambda dtype: {**_WGRAD_PLAIN, **_wgrad_typical(k=5, c=240, hw=28, pad=2)},
        "7x7": lambda dtype: {**_WGRAD_PLAIN, **_wgrad_typical(k=7, c=64, hw=28, pad=3)},
        "nchw": lambda dtype: {**_WGRAD_PLAIN, "SPLIT": 1, "MASK": 0, **_wgrad_typical(layout="nchw")},
    },
)
@triton.jit
def depthwise_conv2d_weight_grad_kernel(
    g_ptr, r_ptr, x_ptr, dw_ptr, db_ptr, partial_ptr,
    N, C, H, W, OC, OH, OW, M, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sgn, sgc, sgh, sgw, srn, src, srh, srw, sxn, sxc, sxh, sxw,
    KH: tl.constexpr, KW: tl.constexpr, MASK: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS_GRAD: tl.constexpr,
    TAPS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dw ([OC, KH*KW] contiguous, as an [OC, 1, KH, KW] tensor is in either memory format) and with
    HAS_BIAS_GRAD db ([OC]) of BLOCK_C channels over split program_id(1) of the pixels; SPLIT > 1
    writes float32 partials instead: partial[s, t, oc], t < KH*KW the taps, t = KH*KW the bias.
    A step loads dy' once for BLOCK_P pixels and x at every tap t = kh * KW + kw (a [TAPS, BLOCK_P,
    BLOCK_C] gather), so the pixel index math is done once per step for all taps."""
    oc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    c_ok = oc < OC
    P = N * OH * OW
    per_split = tl.cdiv(tl.cdiv(P, BLOCK_P), SPLIT) * BLOCK_P  # whole BLOCK_P steps per split
    p_begin = split * per_split
    p_end = tl.minimum(p_begin + per_split, P)
    t = tl.arange(0, TAPS)
    t_ok = t < KH * KW
    tap_h = (t // KW) * dil_h
    tap_w = (t % KW) * dil_w
    x_tap = (tap_h * sxh + tap_w * sxw)[:, None, None] + ((oc // M) * sxc)[None, None, :]
    acc = tl.zeros((TAPS, BLOCK_P, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n, oh, ow = _unflatten(p, OH, OW)
        g_ok = (p < p_end)[:, None] & c_ok[None, :]
        g = tl.load(g_ptr + (n * sgn + oh * sgh + ow * sgw)[:, None] + (oc * sgc)[None, :], mask=g_ok, other=0.0)
        if MASK:
            r = tl.load(r_ptr + (n * srn + oh * srh + ow * srw)[:, None] + (oc * src)[None, :], mask=g_ok, other=0.0)
            g = _activation_mask(g, r, MASK)
        g = g.to(tl.float32)
        if HAS_BIAS_GRAD:
            db_acc += g
        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        ih = ih0[None, :] + tap_h[:, None]  # [TAPS, BLOCK_P]
        iw = iw0[None, :] + tap_w[:, None]
        x_ok = (t_ok[:, None] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, :, None] & g_ok[None, :, :]
        v = tl.load(x_ptr + (n * sxn + ih0 * sxh + iw0 * sxw)[None, :, None] + x_tap, mask=x_ok, other=0.0)
        acc += g[None, :, :] * v.to(tl.float32)
    dw = tl.sum(acc, axis=1)  # [TAPS, BLOCK_C]
    w_ok = t_ok[:, None] & c_ok[None, :]
    if SPLIT == 1:
        tl.store(dw_ptr + oc[None, :] * (KH * KW) + t[:, None], dw.to(dw_ptr.dtype.element_ty), mask=w_ok)
        if HAS_BIAS_GRAD:
            tl.store(db_ptr + oc, tl.sum(db_acc, axis=0).to(db_ptr.dtype.element_ty), mask=c_ok)
    else:
        part = partial_ptr + split * ((KH * KW + 1) * OC)
        tl.store(part + t[:, None] * OC + oc[None, :], dw, mask=w_ok)
        if HAS_BIAS_GRAD:
            tl.store(part + (KH * KW) * OC + oc, tl.sum(db_acc, axis=0), mask=c_ok)


# ------------------------------------------------------------------------------------------- launchers
def _geometry(x_shape, w_shape, stride, padding, dilation):
    N, C, H, W = x_shape
    OC, _, KH, KW = w_shape
    OH = output_size(H, KH, stride[0], padding[0], dilation[0])
    OW = output_size(W, KW, stride[1], padding[1], dilation[1])
    return (N, C, H, W, OC, OH, OW, OC // C if C else 1, *stride, *padding, *dilation), (KH, KW)


def depthwise_conv2d(x, w, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), *, activation="none",
                     bn_weight=None, bn_bias=None, running_mean=None, running_var=None, eps=1e-5, stats=False):
    """``act(BN(depthwise_conv2d(x, w) + bias))`` (module doc), output in ``x``'s memory format; BN when
    ``running_mean``/``running_var`` are given (bn_weight, bn_bias optional), ``activation`` a key of
    ``FORWARD_ACTIVATIONS``. ``stats``: also return the float32 BatchNorm partials of conv + bias,
    [bn_stat_tiles(N*OH*OW), 3, OC]."""
    shape, (KH, KW) = _geometry(x.shape, w.shape, stride, padding, dilation)
    N, _, _, _, OC, OH, OW = shape[:7]
    y = empty((N, OC, OH, OW), dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))
    partials = empty((bn_stat_tiles(N * OH * OW), 3, OC), dtype=torch.float32, device=x.device) if stats else None
    out = (y, partials) if stats else y
    check_int32_indexing(x, w, y, partials)
    if y.numel() == 0:
        return out
    bn = [t if t is not None else w for t in (bn_weight, bn_bias, running_mean, running_var)]

    def grid(meta):
        return (triton.cdiv(N * OH * OW, meta["BLOCK_P"]), triton.cdiv(OC, meta["BLOCK_C"]))

    depthwise_conv2d_fwd_kernel[grid](
        x, w, bias if bias is not None else w, y, *bn, partials if stats else w, *shape,
        *x.stride(), w.stride(0), w.stride(2), w.stride(3), *y.stride(), float(eps), KH=KH, KW=KW,
        HAS_BIAS=bias is not None, ACT=FORWARD_ACTIVATIONS[activation], BATCH_NORM=running_mean is not None,
        HAS_BN_WEIGHT=bn_weight is not None, HAS_BN_BIAS=bn_bias is not None, STATS=bool(stats),
    )
    return out


def depthwise_conv2d_input_grad(grad_out, w, relu_output, input_size, stride, padding, dilation, *,
                                activation="relu", residual=None):
    """``dx`` of shape ``input_size``, in ``grad_out``'s memory format; ``relu_output`` (optional) is
    the forward's ``activation`` output ("relu" or "relu6") and masks ``grad_out``; ``residual``
    (optional, dx's shape, any strides) is added before the one rounding."""
    shape, (KH, KW) = _geometry(input_size, w.shape, stride, padding, dilation)
    N, C, H, W = shape[:4]
    dx = empty(tuple(input_size), dtype=grad_out.dtype, device=grad_out.device,
               memory_format=suggest_memory_format(grad_out))
    check_int32_indexing(grad_out, w, dx, relu_output, residual)
    if dx.numel() == 0:
        return dx
    r = relu_output if relu_output is not None else grad_out
    res = residual if residual is not None else dx

    def grid(meta):
        return (triton.cdiv(N * H * W, meta["BLOCK_P"]), triton.cdiv(C, meta["BLOCK_C"]))

    depthwise_conv2d_input_grad_kernel[grid](
        grad_out, r, w, dx, res, *shape, *grad_out.stride(), *r.stride(), w.stride(0), w.stride(2), w.stride(3),
        *dx.stride(), *res.stride(), KH=KH, KW=KW, MASK=ACTIVATIONS[activation] if relu_output is not None else 0,
        STRIDE_H=stride[0], STRIDE_W=stride[1], HAS_RESIDUAL=residual is not None,
    )
    return dx


def depthwise_conv2d_weight_grad(grad_out, x, relu_output, weight_size, stride, padding, dilation, *,
                                 activation="relu", bias_grad=False, split=None):
    """``(dw, db)``: dw of shape ``weight_size`` (memory format as aten's convolution_backward gives it),
    db (``bias_grad``; else None) of shape [OC], both summed over the batch and output pixels in
    float32; ``relu_output`` as in the input gradient. ``split``: programs per channel block over the
    pixels (default: enough to fill the GPU; 1 in the interpreter)."""
    shape, (KH, KW) = _geometry(x.shape, weight_size, stride, padding, dilation)
    N, _, _, _, OC, OH, OW = shape[:7]
    dw = empty(tuple(weight_size), dtype=grad_out.dtype, device=grad_out.device,
               memory_format=suggest_memory_format(x))
    db = empty((OC,), dtype=grad_out.dtype, device=grad_out.device) if bias_grad else None
    check_int32_indexing(grad_out, x, dw, relu_output)
    if dw.numel() == 0:
        return dw, db
    if N * OH * OW == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
        return dw, db
    r = relu_output if relu_output is not None else grad_out
    split = split or reduction_split(OC, N * OH * OW, grad_out.device, max_split=64)
    partial = empty((split, KH * KW + 1, OC), dtype=torch.float32, device=dw.device) if split > 1 else None

    def grid(meta):
        return (triton.cdiv(OC, meta["BLOCK_C"]), split)

    depthwise_conv2d_weight_grad_kernel[grid](
        grad_out, r, x, dw, db if bias_grad else dw, partial if partial is not None else dw, *shape,
        *grad_out.stride(), *r.stride(), *x.stride(), KH=KH, KW=KW,
        MASK=ACTIVATIONS[activation] if relu_output is not None else 0, SPLIT=split, HAS_BIAS_GRAD=bool(bias_grad),
        TAPS=triton.next_power_of_2(KH * KW),
    )
    if split > 1:  # one reduction over the splits, in a fixed order, for dw and db alike
        total = partial.sum(0)
        dw.copy_(total[:KH * KW].t().reshape(dw.shape))
        if bias_grad:
            db.copy_(total[KH * KW])
    return dw, db
