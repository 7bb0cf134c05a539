"""Max-pool2d forward (values + argmax indices) and its deterministic gather backward.

Semantics are aten's ``max_pool2d_with_indices`` exactly:

* window of output ``(oh, ow)``: rows ``ih = oh*SH - PH + kh*DH`` (``kh < KH``), columns likewise;
  taps outside the input are skipped;
* scanning the window row-major from ``max = -inf``, a tap wins when ``x > max`` or ``x`` is NaN, so
  ties report the *first* maximum and NaNs the *last* NaN; the index is ``ih * W + iw``, the flat offset
  in the ``H x W`` plane. Before the scan the index is the window's first in-range tap (so an all
  ``-inf`` window reports it; a window with no in-range tap - possible only with dilation - reports
  that tap's nominal offset and ``-inf``, as aten does);
* the output (and indices) take the memory format that eager picks: channels_last when the input's
  strides look channels_last (``suggest_memory_format``), contiguous NCHW otherwise.

Backward is a gather: each input element ``(h, w)`` visits the few output windows whose extent covers
it (``oh`` in ``[p_start, p_end)`` as in aten's CUDA kernel) and adds the gradients whose index equals
``h * W + w``. No atomics, so the sum order (ascending ``oh``, then ``ow``) is fixed. Windows whose
index does not lie inside them (only the no-in-range-tap case above) contribute nothing.

Both kernels tile ``[BLOCK_P, BLOCK_C]``: P runs over (n, y, x) positions, C over channels, with
every stride a runtime argument, so NCHW (long P tiles) and channels_last (wide C tiles) layouts are
both coalesced; the autotune key includes the channel stride so each layout tunes separately.

Global average pool (``mean(x, [-1, -2], keepdim=True)``, ``adaptive_avg_pool2d(x, 1)``): each
``(n, c)`` averages its ``H x W`` plane in float32 (sum, then one correctly rounded division by
``H * W``, rounded once to the output dtype); the backward writes ``grad[n, c] / (H * W)`` to every
position. Both tile ``[BLOCK_R, BLOCK_C]`` over (plane position, channel) with the plane flattened to
one stride, which every dense layout allows (NCHW: unit stride along R; channels_last: along C);
other layouts are first copied densely.

Average pool (``avg_pool2d``, ``adaptive_avg_pool2d``), aten's CPU/CUDA semantics: output ``(oh, ow)``
averages rows ``[h0, h1)`` and columns ``[w0, w1)`` of the input, where

* windowed: ``hs = oh*SH - PH``, ``he = min(hs + KH, H + PH)`` (a ceil_mode window may start in the
  padding and is cut at the right padding's end), ``h0 = max(hs, 0)``, ``h1 = min(he, H)``; the divisor is
  ``divisor_override`` if given, else ``(he - hs) * (we - ws)`` with ``count_include_pad``, else
  ``(h1 - h0) * (w1 - w0)``;
* adaptive: ``h0 = floor(oh*H/OH)``, ``h1 = ceil((oh+1)*H/OH)``, divisor ``(h1 - h0) * (w1 - w0)``;

summed in float32, one correctly rounded division, rounded once to the output dtype. The backward is a
gather like max-pool's: input row ``h`` lies in the windows ``oh`` in ``[(h + PH - KH) // SH + 1,
(h + PH) // SH]`` (adaptive: ``[floor(h*OH/H), ceil((h+1)*OH/H))``, exactly the windows containing
it), each adding ``grad / divisor`` in float32 in ascending ``(oh, ow)`` order; no atomics. Both use
max-pool's ``[BLOCK_P, BLOCK_C]`` tiles and configs, every stride a runtime argument.
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
    interp_block,
    tuned_kernel,
)
from tritonkit.kernels.elementwise import apply_prologue, grad_through_prologue, prologue_args, prologue_coefficients


def _config(block_p, block_c, warps):
    return triton.Config({"BLOCK_P": block_p, "BLOCK_C": block_c}, num_warps=warps, num_stages=1)


# NCHW prefers long position tiles; channels_last prefers wide channel tiles. The backward keeps
# more state per element: its wide tiles use 8 warps (with 4, sm_90 spills when strides are generic).
_NCHW_CONFIGS = [_config(256, 1, 4), _config(512, 1, 8), _config(128, 2, 4)]
_FWD_GPU_CONFIGS = _NCHW_CONFIGS + [_config(32, 32, 4), _config(16, 64, 4), _config(8, 128, 4),
                                    _config(16, 128, 8)]
_BWD_GPU_CONFIGS = _NCHW_CONFIGS + [_config(32, 32, 8), _config(16, 64, 8), _config(8, 128, 8)]
# Positions per BatchNorm-backward partial of a GRAD_STATS backward (whole groups per tile), and the
# channels_last tiles such launches take instead of the narrower ones.
GRAD_STAT_ROWS = 64
_STAT_ROWS = tl.constexpr(GRAD_STAT_ROWS)
_STATS_CONFIGS = [_config(64, 32, 8), _config(64, 64, 8)]


def _bwd_config_for(config, dtype, arch=None, launch=None) -> bool:
    """GRAD_STATS launches: tiles of whole GRAD_STAT_ROWS-position groups; the others: the plain list."""
    if (launch or {}).get("GRAD_STATS"):
        return config.kwargs["BLOCK_P"] % GRAD_STAT_ROWS == 0
    return config not in _STATS_CONFIGS

# Interpreter: one program covers as many (position, channel) pairs as numpy handles well.
_INTERP_HEURISTICS = {
    "BLOCK_C": lambda a: interp_block(a["C"], 1, 256),
    "BLOCK_P": lambda a: interp_block(a["P"], GRAD_STAT_ROWS if a.get("GRAD_STATS") else 1,
                                      INTERP_TILE // a["BLOCK_C"]),
}


_PROLOGUE_POINTERS = ("in_mean_ptr", "in_rstd_ptr", "in_w_ptr", "in_b_ptr")


def _fwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    ints = ["P", "C", "H", "W", "OH", "OW", "x_sn", "x_sc", "x_sh", "x_sw", "o_sn", "o_sc", "o_sh", "o_sw",
            "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW"]
    return {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "idx_ptr": "*i64", **dict.fromkeys(_PROLOGUE_POINTERS, "*fp32"),
            **{k: "i32" for k in ints}, "PROLOGUE": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}


# the ResNet stem's max-pool (3x3 stride 2 over 64 channels at 112x112, channels_last) in training, its
# input bn1(conv1) + ReLU applied as it is loaded
_STEM = {"P": 32 * 56 * 56, "C": 64, "H": 112, "W": 112, "OH": 56, "OW": 56, "x_sn": 112 * 112 * 64, "x_sc": 1,
         "x_sh": 112 * 64, "x_sw": 64, "o_sn": 56 * 56 * 64, "o_sc": 1, "o_sh": 56 * 64, "o_sw": 64}


@tuned_kernel("max_pool2d_fwd", gpu_configs=_FWD_GPU_CONFIGS, interp_heuristics=_INTERP_HEURISTICS,
              key=["P", "C", "OH", "OW", "KH", "KW", "o_sc", "PROLOGUE"], signature=_fwd_signature,
              constexprs=lambda dtype: {"PROLOGUE": 0},
              variants={"prologue_stem": lambda dtype: {"PROLOGUE": 2, **_STEM}})
@triton.jit
def max_pool2d_fwd_kernel(
    x_ptr, out_ptr, idx_ptr, in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr,
    P, C, H, W, OH, OW,
    x_sn, x_sc, x_sh, x_sw,
    o_sn, o_sc, o_sh, o_sw,  # shared by out and idx (allocated alike)
    KH, KW, SH, SW, PH, PW, DH, DW,
    PROLOGUE: tl.constexpr,  # 1: x is a training BatchNorm's input, applied as it is loaded; 2: and ReLU'd
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[n, c, oh, ow] = max of x over the window, idx = its ih * W + iw (aten's tie and NaN rule).
    PROLOGUE: x' = (x - mean[c]) * invstd[c] * weight[c] + bias[c] (then ReLU), rounded to x's dtype as
    the stored activation would be (``kernels.elementwise.apply_prologue``), is pooled instead."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    p = (pid // c_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (n, oh, ow)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ow = p % OW
    oh = (p // OW) % OH
    n = p // (OW * OH)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    # aten starts from the first tap at or after row/col 0: h0 + ceil(-h0 / DH) * DH when h0 < 0.
    h_first = h0 + ((tl.maximum(-h0, 0) + DH - 1) // DH) * DH
    w_first = w0 + ((tl.maximum(-w0, 0) + DW - 1) // DW) * DW

    if PROLOGUE:
        in_mean, in_k, in_beta = prologue_coefficients(in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, c, c_ok)
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_P, BLOCK_C], tl.int32) + (h_first * W + w_first)[:, None]
    x_nc = x_ptr + (n * x_sn)[:, None] + (c * x_sc)[None, :]
    for kh in range(KH):
        ih = h0 + kh * DH
        h_ok = p_ok & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = w0 + kw * DW
            ok = (h_ok & (iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
            if PROLOGUE:  # padding and tails load 0 (finite through the prologue), then pool as -inf
                v = tl.load(x_nc + (ih * x_sh + iw * x_sw)[:, None], mask=ok, other=0.0)
                v = tl.where(ok, apply_prologue(v, ok, in_mean, in_k, in_beta, PROLOGUE).to(tl.float32), float("-inf"))
            else:
                v = tl.load(x_nc + (ih * x_sh + iw * x_sw)[:, None], mask=ok, other=float("-inf"))
            v = v.to(tl.float32)
            take = ok & ((v > best) | (v != v))  # noqa: PLR0124  (v != v: NaN)
            best = tl.where(take, v, best)
            best_idx = tl.where(take, (ih * W + iw)[:, None], best_idx)

    o_off = (n * o_sn + oh * o_sh + ow * o_sw)[:, None] + (c * o_sc)[None, :]
    o_ok = p_ok[:, None] & c_ok[None, :]
    tl.store(out_ptr + o_off, best.to(out_ptr.dtype.element_ty), mask=o_ok)
    tl.store(idx_ptr + o_off, best_idx.to(tl.int64), mask=o_ok)


def _bwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    ints = ["P", "C", "H", "W", "OH", "OW", "g_sn", "g_sc", "g_sh", "g_sw", "i_sn", "i_sc", "i_sh", "i_sw",
            "d_sn", "d_sc", "d_sh", "d_sw", "x_sn", "x_sc", "x_sh", "x_sw", "SH", "SW", "PH", "PW", "EKH", "EKW",
            "WIN_H", "WIN_W"]
    return {"grad_ptr": f"*{t}", "idx_ptr": "*i64", "dx_ptr": f"*{t}", "x_ptr": f"*{t}", "stats_ptr": "*fp32",
            **dict.fromkeys(_PROLOGUE_POINTERS, "*fp32"), **{k: "i32" for k in ints},
            "GRAD_STATS": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}


# the training ResNet stem's pool backward (3x3 stride 2, 64 channels at 112x112 -> 56x56, channels_last),
# taken on through bn1's ReLU with bn1's backward reductions
_STEM_BWD = {"P": 32 * 112 * 112, "C": 64, "H": 112, "W": 112, "OH": 56, "OW": 56,
             **{f"{t}_s{d}": v for t in "gi" for d, v in zip("nchw", (56 * 56 * 64, 1, 56 * 64, 64))},
             **{f"{t}_s{d}": v for t in "dx" for d, v in zip("nchw", (112 * 112 * 64, 1, 112 * 64, 64))},
             "SH": 2, "SW": 2, "PH": 1, "PW": 1, "EKH": 3, "EKW": 3, "WIN_H": 2, "WIN_W": 2}


@tuned_kernel("max_pool2d_bwd", gpu_configs=_BWD_GPU_CONFIGS, config_for_dtype=_bwd_config_for,
              interp_heuristics=_INTERP_HEURISTICS, key=["P", "C", "OH", "OW", "WIN_H", "WIN_W", "d_sc", "GRAD_STATS"],
              signature=_bwd_signature, constexprs=lambda dtype: {"GRAD_STATS": 0},
              variants={"bn_partials_stem": lambda dtype: {"GRAD_STATS": 2, **_STEM_BWD}})
@triton.jit
def max_pool2d_bwd_kernel(
    grad_ptr, idx_ptr, dx_ptr, x_ptr, stats_ptr, in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr,
    P, C, H, W, OH, OW,
    g_sn, g_sc, g_sh, g_sw,
    i_sn, i_sc, i_sh, i_sw,
    d_sn, d_sc, d_sh, d_sw,
    x_sn, x_sc, x_sh, x_sw,
    SH, SW, PH, PW, EKH, EKW,  # EK = effective kernel extent (K - 1) * D + 1
    WIN_H, WIN_W,  # most windows covering one row / column: min(ceil(EK / S), OH / OW)
    GRAD_STATS: tl.constexpr,  # the forward's input prologue kind (1, 2: ReLU'd) when dx starts its BN backward
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx[n, c, h, w] = sum of grad[n, c, oh, ow] over windows covering (h, w) with idx == h * W + w.
    GRAD_STATS: the pool read x' = act((x - mean) * k + beta), a training BatchNorm's output; dx goes on
    through the ReLU (2: zero where the recomputed BN output is <= 0) to the BN output, and the BN
    backward's partials of it are written beside it: per GRAD_STAT_ROWS positions t (flat (n, h, w)) and
    channel c, stats[t, 0, c] = the sum of dx, stats[t, 1, c] = the sum of dx * (x - mean[c])."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    p = (pid // c_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (n, h, w)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    w = p % W
    h = (p // W) % H
    n = p // (W * H)
    # Windows oh whose extent [oh*SH - PH, oh*SH - PH + EKH) contains h: oh in [oh_lo, oh_hi).
    hp = h + PH
    wp = w + PW
    oh_lo = tl.where(hp < EKH, 0, (hp - EKH) // SH + 1)
    oh_hi = tl.where(p_ok, tl.minimum(hp // SH + 1, OH), 0)  # rows past P: no windows
    ow_lo = tl.where(wp < EKW, 0, (wp - EKW) // SW + 1)
    ow_hi = tl.minimum(wp // SW + 1, OW)
    target = (h * W + w)[:, None]
    tile_ok = p_ok[:, None] & c_ok[None, :]
    d_off = (n * d_sn + h * d_sh + w * d_sw)[:, None] + (c * d_sc)[None, :]
    g_nc = (n * g_sn)[:, None] + (c * g_sc)[None, :]
    i_nc = (n * i_sn)[:, None] + (c * i_sc)[None, :]

    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for t in range(WIN_H * WIN_W):  # one flat loop: nested runtime loops make ptxas spill on sm_80
        i = t // WIN_W
        oh = oh_lo + i
        ow = ow_lo + (t - i * WIN_W)
        ok = ((oh < oh_hi) & (ow < ow_hi))[:, None] & c_ok[None, :]
        idx = tl.load(idx_ptr + (i_nc + (oh * i_sh + ow * i_sw)[:, None]), mask=ok, other=-1)
        hit = ok & (idx == target)
        g = tl.load(grad_ptr + (g_nc + (oh * g_sh + ow * g_sw)[:, None]), mask=hit, other=0.0)
        acc += g.to(tl.float32)

    if GRAD_STATS:
        mean, k, beta = prologue_coefficients(in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, c, c_ok)
        x = tl.load(x_ptr + (n * x_sn + h * x_sh + w * x_sw)[:, None] + (c * x_sc)[None, :], mask=tile_ok, other=0.0)
        acc, d = grad_through_prologue(acc, x, tile_ok, mean, k, beta, dx_ptr.dtype.element_ty, GRAD_STATS)
        TILES: tl.constexpr = BLOCK_P // _STAT_ROWS
        t = (pid // c_blocks) * TILES + tl.arange(0, TILES)
        out = stats_ptr + (t * (2 * C))[:, None] + c[None, :]
        ok = (t < tl.cdiv(P, _STAT_ROWS))[:, None] & c_ok[None, :]
        tl.store(out, tl.sum(tl.reshape(acc, (TILES, _STAT_ROWS, BLOCK_C)), axis=1), mask=ok)
        tl.store(out + C, tl.sum(tl.reshape(d, (TILES, _STAT_ROWS, BLOCK_C)), axis=1), mask=ok)
    tl.store(dx_ptr + d_off, acc.to(dx_ptr.dtype.element_ty), mask=tile_ok)


# --- global average pool ----------------------------------------------------------------------------


def _gap_config(block_r, block_c, warps):
    return triton.Config({"BLOCK_R": block_r, "BLOCK_C": block_c}, num_warps=warps, num_stages=1)


# NCHW (plane contiguous) wants long R tiles; channels_last (channels contiguous) wide C tiles.
_GAP_GPU_CONFIGS = [_gap_config(64, 16, 4), _gap_config(128, 8, 4), _gap_config(256, 4, 4),
                    _gap_config(8, 128, 4), _gap_config(16, 128, 8), _gap_config(4, 256, 4)]
_GAP_INTERP = {  # up to 1024 x 1024: planes of more than 1024 positions take several row tiles
    "BLOCK_C": lambda a: interp_block(a["C"], 1, 1024),
    "BLOCK_R": lambda a: interp_block(a["HW"], 1, min(1024, INTERP_TILE // interp_block(a["C"], 1, 1024))),
}


def _gap_plane_strides(prefix, layout, C=2048, HW=49):
    """N, C and plane strides of a ``[N, C, H, W]`` tensor in ``layout`` ("nhwc" or "nchw"): the gate's
    variants use ResNet-50's last stage (2048 channels at 7x7)."""
    strides = (HW * C, 1, C) if layout == "nhwc" else (HW * C, HW, 1)
    return dict(zip((f"{prefix}_sn", f"{prefix}_sc", f"{prefix}_sr"), strides))


def _gap_fwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    ints = ["C", "HW", "x_sn", "x_sc", "x_sr", "o_sn", "o_sc"]
    return {"x_ptr": f"*{t}", "out_ptr": f"*{t}", **{k: "i32" for k in ints},
            "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}


def _gap_fwd_constexprs(layout):
    return lambda dtype: {"C": 2048, "HW": 49, **_gap_plane_strides("x", layout), "o_sn": 2048, "o_sc": 1}


@tuned_kernel("global_avg_pool2d_fwd", gpu_configs=_GAP_GPU_CONFIGS, interp_heuristics=_GAP_INTERP,
              key=["C", "HW", "x_sc"], signature=_gap_fwd_signature, constexprs=_gap_fwd_constexprs("nhwc"),
              variants={"nchw": _gap_fwd_constexprs("nchw")})
@triton.jit
def global_avg_pool2d_fwd_kernel(
    x_ptr, out_ptr, C, HW,
    x_sn, x_sc, x_sr,  # x_sr: the stride of the flattened H x W plane
    o_sn, o_sc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[n, c] = (sum over the plane of x[n, c]) / HW; grid (channel blocks, N)."""
    n = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_nc = x_ptr + n.to(tl.int64) * x_sn + (c * x_sc)[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(0, HW, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        v = tl.load(x_nc + (r * x_sr)[:, None], mask=(r < HW)[:, None] & c_ok[None, :], other=0.0)
        acc += v.to(tl.float32)
    mean = tl.math.div_rn(tl.sum(acc, axis=0), tl.zeros([BLOCK_C], tl.float32) + HW)
    tl.store(out_ptr + n * o_sn + c * o_sc, mean.to(out_ptr.dtype.element_ty), mask=c_ok)


def _gap_bwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    ints = ["C", "HW", "g_sn", "g_sc", "r_sn", "r_sc", "r_sr", "d_sn", "d_sc", "d_sr"]
    return {"grad_ptr": f"*{t}", "res_ptr": f"*{t}", "dx_ptr": f"*{t}", **{k: "i32" for k in ints},
            "RESIDUAL": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}


def _gap_bwd_constexprs(layout, residual=False):
    return lambda dtype: {"C": 2048, "HW": 49, "g_sn": 2048, "g_sc": 1, **_gap_plane_strides("d", layout),
                          **_gap_plane_strides("r", layout), "RESIDUAL": residual}


@tuned_kernel("global_avg_pool2d_bwd", gpu_configs=_GAP_GPU_CONFIGS, interp_heuristics=_GAP_INTERP,
              key=["C", "HW", "d_sc"], signature=_gap_bwd_signature, constexprs=_gap_bwd_constexprs("nhwc"),
              variants={"nchw": _gap_bwd_constexprs("nchw"), "residual": _gap_bwd_constexprs("nhwc", True)})
@triton.jit
def global_avg_pool2d_bwd_kernel(
    grad_ptr, res_ptr, dx_ptr, C, HW,
    g_sn, g_sc,
    r_sn, r_sc, r_sr,
    d_sn, d_sc, d_sr,
    RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx[n, c, r] = grad[n, c] / HW (+ res[n, c, r] with ``RESIDUAL``: the other gradient of the pooled
    tensor, e.g. a squeeze-excitation gate's); grid (plane blocks x channel blocks, N)."""
    n = tl.program_id(1)
    c_blocks = tl.cdiv(C, BLOCK_C)
    r = (tl.program_id(0) // c_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mask = (r < HW)[:, None] & c_ok[None, :]
    g = tl.load(grad_ptr + n * g_sn + c * g_sc, mask=c_ok, other=0.0).to(tl.float32)
    g = tl.math.div_rn(g, tl.zeros([BLOCK_C], tl.float32) + HW)
    value = tl.zeros([BLOCK_R, BLOCK_C], tl.float32) + g[None, :]
    if RESIDUAL:
        res_offs = n.to(tl.int64) * r_sn + (r * r_sr)[:, None] + (c * r_sc)[None, :]
        value = tl.load(res_ptr + res_offs, mask=mask).to(tl.float32) + value
    offs = n.to(tl.int64) * d_sn + (r * d_sr)[:, None] + (c * d_sc)[None, :]
    tl.store(dx_ptr + offs, value.to(dx_ptr.dtype.element_ty), mask=mask)


# --- average pool: windowed and adaptive --------------------------------------------------------------


@triton.jit
def _avg_window(o, size, out_size, K, S, P, ADAPTIVE: tl.constexpr):
    """Input rows ``[lo, hi)`` averaged by output row ``o``, and the window's extent counting padding."""
    if ADAPTIVE:
        lo = (o * size) // out_size
        hi = ((o + 1) * size + out_size - 1) // out_size
        extent = hi - lo
    else:
        start = o * S - P
        end = tl.minimum(start + K, size + P)
        extent = end - start
        lo = tl.maximum(start, 0)
        hi = tl.minimum(end, size)
    return lo, hi, extent


@triton.jit
def _avg_divisor(h0, h1, eh, w0, w1, ew, COUNT_PAD, DIVISOR):
    """float32 divisor of each window: ``DIVISOR`` when non-zero, else its size with or without padding."""
    div = tl.where(COUNT_PAD != 0, eh * ew, (h1 - h0) * (w1 - w0))
    return tl.where(DIVISOR != 0, DIVISOR, div).to(tl.float32)


@triton.jit
def _avg_covering(i, size, out_size, K, S, P, ADAPTIVE: tl.constexpr):
    """Output rows ``[lo, hi)`` whose windows contain input row ``i``."""
    if ADAPTIVE:
        lo = (i * out_size) // size
        hi = ((i + 1) * out_size + size - 1) // size
    else:
        ip = i + P
        lo = tl.where(ip < K, 0, (ip - K) // S + 1)
        hi = tl.minimum(ip // S + 1, out_size)
    return lo, hi


def _avg_fwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    ints = ["P", "C", "H", "W", "OH", "OW", "x_sn", "x_sc", "x_sh", "x_sw", "o_sn", "o_sc", "o_sh", "o_sw",
            "KH", "KW", "SH", "SW", "PH", "PW", "COUNT_PAD", "DIVISOR"]
    return {"x_ptr": f"*{t}", "out_ptr": f"*{t}", **{k: "i32" for k in ints},
            "ADAPTIVE": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}


@tuned_kernel("avg_pool2d_fwd", gpu_configs=_FWD_GPU_CONFIGS, interp_heuristics=_INTERP_HEURISTICS,
              key=["P", "C", "OH", "OW", "KH", "KW", "o_sc", "ADAPTIVE"], signature=_avg_fwd_signature,
              constexprs=lambda dtype: {"ADAPTIVE": False}, variants={"adaptive": lambda dtype: {"ADAPTIVE": True}})
@triton.jit
def avg_pool2d_fwd_kernel(
    x_ptr, out_ptr,
    P, C, H, W, OH, OW,
    x_sn, x_sc, x_sh, x_sw,
    o_sn, o_sc, o_sh, o_sw,
    KH, KW, SH, SW, PH, PW,  # ADAPTIVE: KH, KW = the largest window's extent; S, P unused
    COUNT_PAD, DIVISOR,
    ADAPTIVE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[n, c, oh, ow] = (sum of x over rows [h0, h1), columns [w0, w1)) / divisor (module docstring)."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    p = (pid // c_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (n, oh, ow)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ow = p % OW
    oh = (p // OW) % OH
    n = p // (OW * OH)
    h0, h1, eh = _avg_window(oh, H, OH, KH, SH, PH, ADAPTIVE)
    w0, w1, ew = _avg_window(ow, W, OW, KW, SW, PW, ADAPTIVE)

    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    x_nc = x_ptr + (n * x_sn)[:, None] + (c * x_sc)[None, :]
    for kh in range(KH):
        ih = h0 + kh
        h_ok = p_ok & (ih < h1)
        for kw in range(KW):
            iw = w0 + kw
            ok = (h_ok & (iw < w1))[:, None] & c_ok[None, :]
            acc += tl.load(x_nc + (ih * x_sh + iw * x_sw)[:, None], mask=ok, other=0.0).to(tl.float32)

    divisor = _avg_divisor(h0, h1, eh, w0, w1, ew, COUNT_PAD, DIVISOR)
    mean = tl.math.div_rn(acc, tl.zeros([BLOCK_P, BLOCK_C], tl.float32) + divisor[:, None])
    o_off = (n * o_sn + oh * o_sh + ow * o_sw)[:, None] + (c * o_sc)[None, :]
    tl.store(out_ptr + o_off, mean.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def _avg_bwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    ints = ["P", "C", "H", "W", "OH", "OW", "g_sn", "g_sc", "g_sh", "g_sw", "d_sn", "d_sc", "d_sh", "d_sw",
            "KH", "KW", "SH", "SW", "PH", "PW", "COUNT_PAD", "DIVISOR", "WIN_H", "WIN_W"]
    return {"grad_ptr": f"*{t}", "dx_ptr": f"*{t}", **{k: "i32" for k in ints},
            "ADAPTIVE": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}


@tuned_kernel("avg_pool2d_bwd", gpu_configs=_BWD_GPU_CONFIGS, interp_heuristics=_INTERP_HEURISTICS,
              key=["P", "C", "OH", "OW", "WIN_H", "WIN_W", "d_sc", "ADAPTIVE"], signature=_avg_bwd_signature,
              constexprs=lambda dtype: {"ADAPTIVE": False}, variants={"adaptive": lambda dtype: {"ADAPTIVE": True}})
@triton.jit
def avg_pool2d_bwd_kernel(
    grad_ptr, dx_ptr,
    P, C, H, W, OH, OW,
    g_sn, g_sc, g_sh, g_sw,
    d_sn, d_sc, d_sh, d_sw,
    KH, KW, SH, SW, PH, PW, COUNT_PAD, DIVISOR,
    WIN_H, WIN_W,  # most windows containing one row / column
    ADAPTIVE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx[n, c, h, w] = sum of grad[n, c, oh, ow] / divisor(oh, ow) over the windows containing (h, w)."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    p = (pid // c_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (n, h, w)
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    w = p % W
    h = (p // W) % H
    n = p // (W * H)
    oh_lo, oh_hi = _avg_covering(h, H, OH, KH, SH, PH, ADAPTIVE)
    ow_lo, ow_hi = _avg_covering(w, W, OW, KW, SW, PW, ADAPTIVE)
    oh_hi = tl.where(p_ok, oh_hi, 0)  # rows past P: no windows
    g_nc = (n * g_sn)[:, None] + (c * g_sc)[None, :]

    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for t in range(WIN_H * WIN_W):  # one flat loop, as max_pool2d_bwd_kernel
        i = t // WIN_W
        oh = oh_lo + i
        ow = ow_lo + (t - i * WIN_W)
        window_ok = (oh < oh_hi) & (ow < ow_hi)
        h0, h1, eh = _avg_window(oh, H, OH, KH, SH, PH, ADAPTIVE)
        w0, w1, ew = _avg_window(ow, W, OW, KW, SW, PW, ADAPTIVE)
        divisor = tl.where(window_ok, _avg_divisor(h0, h1, eh, w0, w1, ew, COUNT_PAD, DIVISOR), 1.0)
        g = tl.load(grad_ptr + (g_nc + (oh * g_sh + ow * g_sw)[:, None]), mask=window_ok[:, None] & c_ok[None, :],
                    other=0.0)
        acc += tl.math.div_rn(g.to(tl.float32), tl.zeros([BLOCK_P, BLOCK_C], tl.float32) + divisor[:, None])

    d_off = (n * d_sn + h * d_sh + w * d_sw)[:, None] + (c * d_sc)[None, :]
    tl.store(dx_ptr + d_off, acc.to(dx_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])



# --- launchers --------------------------------------------------------------------------------------


def pool_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """aten's ``pooling_output_shape``: floor (or ceil) division, and in ceil mode the last window
    must start inside the input or the left padding."""
    out = (size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format eager max-pool gives its output and grad_input for 4-D input ``x``.

    c10's ``suggest_memory_format``: channels_last when the strides look channels_last
    (``is_channels_last_strides_2d``: strides non-decreasing in the order C, W, H, N, ambiguous
    size-1 cases resolved to NCHW, any size-0 dim meaning NCHW).
    """
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    lower = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < lower or (d == 0 and lower == strides[1]):
            return torch.contiguous_format
        lower = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return torch.channels_last


def max_pool2d_forward(x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool, *,
                       input_norm=None, input_relu=False):
    """Values and int64 plane-offset indices of a 2-D max pool over 4-D ``x`` (any strides).

    Arguments are already-validated pairs ``(h, w)``; outputs are in ``output_memory_format(x)``.
    ``input_norm``/``input_relu``: pool ``x'``, ``x`` through a training BatchNorm's apply (and ReLU) as it
    is loaded (``kernels.conv.conv2d``'s input prologue).
    """
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = kernel_size, stride, padding, dilation
    OH = pool_output_size(H, KH, SH, PH, DH, ceil_mode)
    OW = pool_output_size(W, KW, SW, PW, DW, ceil_mode)
    fmt = output_memory_format(x)
    out = empty((N, C, OH, OW), dtype=x.dtype, device=x.device, memory_format=fmt)
    idx = empty((N, C, OH, OW), dtype=torch.int64, device=x.device, memory_format=fmt)
    if out.numel() == 0:
        return out, idx
    check_int32_indexing(x, out)
    P = N * OH * OW

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(C, meta["BLOCK_C"]),)

    in_pointers, prologue = prologue_args(x, input_norm, input_relu)
    max_pool2d_fwd_kernel[grid](
        x, out, idx, *in_pointers, P, C, H, W, OH, OW, *x.stride(), *out.stride(), KH, KW, SH, SW, PH, PW, DH, DW,
        PROLOGUE=prologue,
    )
    return out, idx


def grad_stat_tiles(input_size) -> int:
    """T, the first dimension of a ``grad_stats`` pool backward's partials: one per GRAD_STAT_ROWS input
    positions (flat (n, h, w))."""
    N, _, H, W = input_size
    return triton.cdiv(N * H * W, GRAD_STAT_ROWS)


def max_pool2d_backward(grad_output: torch.Tensor, x: torch.Tensor, indices: torch.Tensor,
                        kernel_size, stride, padding, dilation, *, input_norm=None, input_relu=False,
                        grad_stats=False):
    """Gradient w.r.t. ``x`` of a max pool whose argmax was ``indices``, in ``x``'s memory format.
    ``grad_stats`` (``input_norm``/``input_relu``: the forward's prologue over ``x``): ``(dx, stats)``, dx
    taken on through the prologue's ReLU to the BatchNorm output and that BN backward's float32 partials
    [grad_stat_tiles(), 2, C] (the kernel's doc; no atomics, the same bits every run)."""
    N, C, H, W = x.shape
    OH, OW = grad_output.shape[2:]
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = kernel_size, stride, padding, dilation
    grad_input = empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    stats = None
    if grad_stats:
        stats = empty((grad_stat_tiles(x.shape), 2, C), dtype=torch.float32, device=x.device)
    out = (grad_input, stats) if grad_stats else grad_input
    if grad_input.numel() == 0:
        return out
    check_int32_indexing(grad_output, indices, grad_input, x)
    EKH, EKW = (KH - 1) * DH + 1, (KW - 1) * DW + 1
    P = N * H * W

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(C, meta["BLOCK_C"]),)

    in_pointers, prologue = prologue_args(x, input_norm, input_relu)
    max_pool2d_bwd_kernel[grid](
        grad_output, indices, grad_input, x, stats if grad_stats else grad_input, *in_pointers, P, C, H, W, OH, OW,
        *grad_output.stride(), *indices.stride(), *grad_input.stride(), *x.stride(),
        SH, SW, PH, PW, EKH, EKW, min(triton.cdiv(EKH, SH), OH), min(triton.cdiv(EKW, SW), OW),
        GRAD_STATS=prologue if grad_stats else 0,
    )
    return out


def _plane_stride(t: torch.Tensor) -> int | None:
    """The one stride of ``t``'s flattened ``H x W`` plane, or None when H and W do not flatten."""
    H, W = t.shape[2:]
    if H == 1:
        return t.stride(3)
    if W == 1:
        return t.stride(2)
    return t.stride(3) if t.stride(2) == W * t.stride(3) else None


def global_avg_pool2d(x: torch.Tensor) -> torch.Tensor:
    """``mean(x, [-1, -2], keepdim=True)`` of 4-D ``x``: ``[N, C, 1, 1]`` with strides ``(C, 1, 1, 1)``,
    as eager's ``mean`` gives for every input layout."""
    N, C, H, W = x.shape
    out = empty((N, C, 1, 1), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    sr = _plane_stride(x)
    if sr is None:  # H and W not one stride apart (a sliced plane): read a dense copy
        x = x.contiguous(memory_format=output_memory_format(x))
        sr = _plane_stride(x)
    check_int32_indexing(x)
    global_avg_pool2d_fwd_kernel[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), N)](
        x, out, C, H * W, x.stride(0), x.stride(1), sr, out.stride(0), out.stride(1),
    )
    return out


def global_avg_pool2d_backward(grad_output: torch.Tensor, input_size, channels_last: bool,
                               residual: torch.Tensor | None = None) -> torch.Tensor:
    """``grad_output[n, c] / (H * W)`` broadcast to ``input_size`` (N, C, H, W), contiguous or channels_last,
    plus ``residual`` (of ``input_size``, any layout whose H x W plane flattens) when given."""
    N, C, H, W = input_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = empty((N, C, H, W), dtype=grad_output.dtype, device=grad_output.device, memory_format=fmt)
    if dx.numel() == 0:
        return dx
    if residual is not None and _plane_stride(residual) is None:
        residual = residual.contiguous(memory_format=fmt)
    check_int32_indexing(dx, *(() if residual is None else (residual,)))
    HW = H * W
    res = dx if residual is None else residual

    def grid(meta):
        return (triton.cdiv(HW, meta["BLOCK_R"]) * triton.cdiv(C, meta["BLOCK_C"]), N)

    global_avg_pool2d_bwd_kernel[grid](
        grad_output, res, dx, C, HW, grad_output.stride(0), grad_output.stride(1),
        res.stride(0), res.stride(1), _plane_stride(res), dx.stride(0), dx.stride(1), _plane_stride(dx),
        RESIDUAL=residual is not None,
    )
    return dx


def _adaptive_extent(size: int, out_size: int) -> int:
    """The largest adaptive window along one dim: ``max(ceil((o+1)*size/out) - floor(o*size/out))``."""
    return max(-((-(o + 1) * size) // out_size) - (o * size) // out_size for o in range(out_size))


def _avg_args(H, W, OH, OW, params):
    """Kernel arguments KH, KW, SH, SW, PH, PW, COUNT_PAD, DIVISOR for a windowed (``params`` = (k, s, p,
    count_include_pad, divisor_override)) or adaptive (``params`` None) average pool."""
    if params is None:
        return (_adaptive_extent(H, OH), _adaptive_extent(W, OW), 1, 1, 0, 0, 0, 0)
    (KH, KW), (SH, SW), (PH, PW), count_include_pad, divisor = params
    return (KH, KW, SH, SW, PH, PW, int(count_include_pad), divisor or 0)


def avg_pool2d_forward(x: torch.Tensor, output_size, params=None) -> torch.Tensor:
    """Average pool of 4-D ``x`` (any strides) to ``output_size`` (OH, OW), in ``output_memory_format(x)``:
    windowed with ``params = ((KH, KW), (SH, SW), (PH, PW), count_include_pad, divisor_override)`` (already
    validated; ``output_size`` from :func:`pool_output_size`), adaptive with ``params`` None."""
    N, C, H, W = x.shape
    OH, OW = output_size
    out = empty((N, C, OH, OW), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if out.numel() == 0:
        return out
    check_int32_indexing(x, out)
    P = N * OH * OW

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(C, meta["BLOCK_C"]),)

    avg_pool2d_fwd_kernel[grid](
        x, out, P, C, H, W, OH, OW, *x.stride(), *out.stride(), *_avg_args(H, W, OH, OW, params),
        ADAPTIVE=params is None,
    )
    return out


def avg_pool2d_backward(grad_output: torch.Tensor, x: torch.Tensor, params=None) -> torch.Tensor:
    """Gradient w.r.t. 4-D ``x`` of :func:`avg_pool2d_forward` (same ``params``), in ``x``'s memory format."""
    N, C, H, W = x.shape
    OH, OW = grad_output.shape[2:]
    grad_input = empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if grad_input.numel() == 0:
        return grad_input
    check_int32_indexing(grad_output, grad_input)
    args = _avg_args(H, W, OH, OW, params)
    if params is None:
        win_h, win_w = _adaptive_extent(OH, H), _adaptive_extent(OW, W)
    else:
        win_h, win_w = min(triton.cdiv(args[0], args[2]), OH), min(triton.cdiv(args[1], args[3]), OW)
    P = N * H * W

    def grid(meta):
        return (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(C, meta["BLOCK_C"]),)

    avg_pool2d_bwd_kernel[grid](
        grad_output, grad_input, P, C, H, W, OH, OW, *grad_output.stride(), *grad_input.stride(),
        *args, win_h, win_w, ADAPTIVE=params is None,
    )
    return grad_input



__all__ = [
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "global_avg_pool2d",
    "global_avg_pool2d_backward",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "output_memory_format",
    "pool_output_size",
]
