"""BatchNorm2d: batch statistics, training and eval forward (with fused residual add + ReLU), backward.

Every tensor of one launch is read through the view ``[A, B, C]`` of its ``(N, C, H, W)`` shape:
NCHW-contiguous is ``A = N``, ``B = H*W`` (unit stride), channels_last is ``A = 1``, ``B = N*H*W``
with the channels contiguous. Tiles are ``[BLOCK_B, BLOCK_C]`` with every stride a runtime argument,
so both layouts are coalesced along their contiguous dim (the JIT turns the unit stride into a
constexpr); the GPU config list is chosen by layout (``s_c == 1``: wide channel tiles, else long
``B`` tiles). Outputs take the input's memory format as eager's CPU and cuDNN kernels pick it
(``suggest_memory_format``: channels_last in, channels_last out); inputs in any other layout, and
residual / gradient / ReLU-output tensors whose strides differ from the input's, are first copied
into that layout (one extra pass).

Statistics (``batch_norm_stats``, the training forward) are float32 for every dtype and not
cancellation-prone: stage one keeps a Welford state (count, mean, M2) per tile slot of the values
shifted by one sample per channel (``x[0, 0, c]``, so the running means stay small and round relative
to the data's spread), updated once per tile (``mean += (x - mean) / count``, ``M2 += (x - mean_old) *
(x - mean_new)``; full tiles and the partial last tile of each row keep separate states, so each
state's count is one scalar and there is no per-element division), and folds the slots of its
program with Chan's parallel formula into one ``(n, mean, M2)`` partial per channel and split; the
finalize kernel combines the ``SPLIT`` partials with the same formula in ascending split order.
No atomics: for a given launch configuration two runs give identical bits (on a GPU the autotuner's
choice of tile is part of that configuration; ``TRITONKIT_AUTOTUNE=first`` pins it).
The finalize kernel also writes the running-stat update ``new = (1 - momentum) * old + momentum *
batch`` with the *unbiased* variance ``M2 / (n - 1)`` (the biased ``M2 / n`` normalises), as eager.
With ``num_batches_tracked`` (nn.BatchNorm2d's int64 counter) the finalize's first program also
writes ``num_batches_tracked + 1`` to a new tensor (the step AOTAutograd otherwise launches as its own
``aten.add``), and ``momentum=None`` (eager's cumulative moving average) takes the factor
``1 / (num_batches_tracked + 1)``, formed in float32 on the device from the counter (no host sync).

Statistics from a conv's epilogue (``batch_norm_train_from_partials``): ``conv2d(stats=True)`` (kernels.conv)
writes per channel one float32 ``(count, mean, M2)`` per tile of 64 output pixels, ``[T, 3, C]``, so the
partial pass over the input is skipped. The tiles combine with the same two-pass Chan formula
(``_chan_combine``: ``n = sum n_t``, ``mean = sum n_t (mean_t - ref) / n``, ``M2 = sum M2_t + sum n_t
(mean_t - ref - mean)^2``), shifted by the first tile's mean ``ref = mean_0`` (``mean_t - ref`` is exact for
close values, so a large common mean cancels nowhere). Small T: the finalize kernel reads the tiles
itself (``ROWS=3``). Large T (12544 tiles at batch 256, 56x56): a two-level tree in fixed order, the
tiles combine kernel (one program per channel block and run of tiles) writes ``SPLIT`` partials in the
statistics pass's format, which the finalize combines (``ROWS=4``); ``SPLIT = reduction_split(C, T)``
as for the statistics pass: runs of about 1024 tiles (13 runs of ~965 at T = 12544, C = 64), longer only
once ~4 programs per SM are busy; T <= 1024 gives ``SPLIT = 1``. Deterministic, no atomics.

The apply kernel computes ``act((x - mean) * (invstd * w) + b [+ residual])`` in float32 and rounds
once (``act``: ReLU, or any activation of ``tritonkit.kernels.elementwise``; training with an activation
whose backward reads its input also writes the value before it, rounded to the input's dtype, which the
activation then reads: the two outputs eager's BN and activation kernels write, in one pass). Centring
first keeps large-mean inputs exact (``x * scale + shift`` would cancel). In eval mode
it reads the running stats and forms ``invstd = 1 / sqrt(running_var + eps)`` per channel itself.

Backward (``aten.native_batch_norm_backward`` semantics; ``g`` is ``grad_out``, first masked by ``relu_output``
when given: ``activation="relu"``, the ReLU's output, ``threshold_backward(g, relu_output, 0)``, g where
``relu_output > 0``; ``"relu6"``, the ReLU6's *input* (the BN output), ``hardtanh_backward(g, relu_output, 0, 6)``,
g where ``0 < relu_output < 6``; a NaN ``relu_output`` passes its g in both, as aten's CUDA kernels and
torch._decomp do; hardswish, hardsigmoid, silu, gelu, gelu_tanh (``relu_output`` their input, the BN
output) and sigmoid (its output): g through that activation's backward, as ``activation_backward``
computes it; the reduction and the apply pass treat every load the same way): a two-stage deterministic
reduction of ``sum(g)`` and ``sum(g * (x - mean))`` per channel, a finalize kernel that writes
``grad_bias``, ``grad_weight = invstd * sum(g * (x - mean))`` and the per-channel coefficients of
``grad_input = k*g + c1*(x - mean) + c0`` (training: ``k = w*invstd``, ``c0 = -k*mean(g)``,
``c1 = -k*invstd**2*mean(g*(x - mean))``; eval: ``k = w / sqrt(running_var + eps)``, ``c0 = c1 = 0``),
and one elementwise apply pass. Only what ``output_mask`` asks for is computed (eval grad_input
alone needs no reduction). The per-channel statistics are read as float32 (``.float()``: nothing to
do for the float32 save stats a GPU forward returns; a C-element copy for half-precision CPU save
stats or half running stats in eval).

Registered kernels (each compiled by the AOT gate in its NCHW and ``_nhwc`` pattern where it has
one): ``batch_norm_stats_partial``, ``batch_norm_stats_finalize`` (+ ``_cumulative``, ``_tiles``: conv
tiles in, ``_stats_only``), ``batch_norm_tiles_combine`` (float32 only: it reads only the partials),
``batch_norm_apply``, ``batch_norm_apply_eval`` (same kernel, running stats in the input's dtype),
``batch_norm_bwd_reduce`` and ``batch_norm_bwd_apply`` (ReLU mask; + ``_relu6_nhwc``: MobileNetV2's
channels_last BN + ReLU6, ``_silu_nhwc``: EfficientNet's BN + SiLU), ``batch_norm_bwd_finalize`` (+ ``_eval``).
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
    reduction_split,
    tuned_kernel,
)
from tritonkit.kernels.elementwise import ACTIVATIONS as ELEMENTWISE_ACTIVATIONS
from tritonkit.kernels.elementwise import SAVES_OUTPUT, activation_grad, apply_activation
from tritonkit.kernels.pool import output_memory_format


def _config(block_b, block_c, warps):
    return triton.Config({"BLOCK_B": block_b, "BLOCK_C": block_c}, num_warps=warps, num_stages=1)


# NCHW (B contiguous) wants long B tiles, channels_last (C contiguous) wide C tiles. The reductions
# keep two float32 accumulators per tile element, so their tiles stay at 2-4K elements.
_REDUCE_NCHW = [_config(1024, 2, 4), _config(2048, 1, 8), _config(128, 16, 4)]
_REDUCE_NHWC = [_config(32, 64, 4), _config(16, 128, 4), _config(64, 64, 8)]
_APPLY_NCHW = [_config(1024, 1, 4), _config(1024, 4, 8), _config(128, 16, 4)]
_APPLY_NHWC = [_config(32, 64, 4), _config(16, 128, 4), _config(64, 128, 8)]
_FINISH_GPU_CONFIGS = [
    triton.Config({"BLOCK_S": 16, "BLOCK_C": 128}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_S": 32, "BLOCK_C": 64}, num_warps=4, num_stages=1),
]


def _by_layout(nchw: list, nhwc: list):
    """``(gpu_configs, config_for_dtype)``: the ``nhwc`` list for launches whose channel stride is 1,
    the ``nchw`` list otherwise (unknown: NCHW)."""

    def config_for_dtype(config, dtype, arch=None, launch=None) -> bool:
        pool = nhwc if (launch or {}).get("s_c") == 1 else nchw
        return any(config is c for c in pool)

    return nchw + nhwc, config_for_dtype


_REDUCE_CONFIGS, _REDUCE_FOR = _by_layout(_REDUCE_NCHW, _REDUCE_NHWC)
_APPLY_CONFIGS, _APPLY_FOR = _by_layout(_APPLY_NCHW, _APPLY_NHWC)

# Interpreter: few programs, big tiles (its cost is per program and per numpy op).
_TILE_INTERP = {
    "BLOCK_C": lambda a: interp_block(a["C"], 1, 1024),
    "BLOCK_B": lambda a: interp_block(a["B"], 1, INTERP_TILE // interp_block(a["C"], 1, 1024)),
}
# Reductions: each of SPLIT programs gets its share of B (tests split small problems to exercise the combine).
_REDUCE_INTERP = {
    "BLOCK_C": _TILE_INTERP["BLOCK_C"],
    "BLOCK_B": lambda a: interp_block(triton.cdiv(a["B"], a["SPLIT"]), 1, INTERP_TILE // interp_block(a["C"], 1, 1024)),
}
_FINISH_INTERP = {
    "BLOCK_C": lambda a: interp_block(a["C"], 1, 4096),
    "BLOCK_S": lambda a: interp_block(a["SPLIT"], 1, 256),
}
_VIEW_INTS = ["A", "B", "C", "s_a", "s_b", "s_c"]


def _typical(layout: str) -> dict:
    """Runtime ints of a typical ResNet launch (N=32, C=64, 56x56), so the gate compiles the variant
    that runs: the unit stride a constexpr, the other sizes divisible by 16."""
    n, c, hw = 32, 64, 56 * 56
    if layout == "nchw":
        return {"A": n, "B": hw, "C": c, "s_a": c * hw, "s_b": 1, "s_c": hw}
    return {"A": 1, "B": n * hw, "C": c, "s_a": n * hw * c, "s_b": c, "s_c": 1}


def _nhwc_variant(flags: dict):
    return {"nhwc": lambda dtype: {**flags, **_typical("nhwc")}}


def _activation_nhwc_variants(flags: dict):
    """The backward's MobileNet patterns: channels_last with the ReLU6 mask (V2), with SiLU's gradient
    (EfficientNet; the longest of the activation gradients but GELU's)."""
    return {f"{kind}_nhwc": lambda dtype, kind=kind: {**flags, "MASK": ACTIVATIONS[kind], **_typical("nhwc")}
            for kind in ("relu6", "silu")}


# --- statistics ---------------------------------------------------------------------------------------


def _stats_partial_signature(dtype):
    return {"x_ptr": f"*{TRITON_TYPE[dtype]}", "part_ptr": "*fp32", **dict.fromkeys(_VIEW_INTS, "i32"),
            "SPLIT": "i32", "BLOCK_B": "constexpr", "BLOCK_C": "constexpr"}


@tuned_kernel("batch_norm_stats_partial", gpu_configs=_REDUCE_CONFIGS, config_for_dtype=_REDUCE_FOR,
              interp_heuristics=_REDUCE_INTERP, key=["A", "B", "C", "s_b", "s_c", "SPLIT"],
              signature=_stats_partial_signature, constexprs=lambda dtype: _typical("nchw"),
              variants=_nhwc_variant({}))
@triton.jit
def batch_norm_stats_partial_kernel(
    x_ptr, part_ptr,
    A, B, C, s_a, s_b, s_c,
    SPLIT,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """part[s, :, c] = (n, mean - ref, M2, ref) of x[a, b, c] over the s-th of SPLIT equal runs of
    (a, b-block) tiles; ref[c] = x[0, 0, c] is the same shift for every split."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    b_blocks = tl.cdiv(B, BLOCK_B)
    tiles = A * b_blocks
    t_lo = (split.to(tl.int64) * tiles // SPLIT).to(tl.int32)
    t_hi = ((split.to(tl.int64) + 1) * tiles // SPLIT).to(tl.int32)
    x_c = x_ptr + c[None, :] * s_c
    # Shifting by one sample per channel keeps the running means small, so their rounding is relative
    # to the spread of the data, not to its mean (x ~ 100 + 0.01 * randn stays exact to float32).
    ref = tl.load(x_ptr + c * s_c, mask=c_ok, other=0.0).to(tl.float32)
    # Welford state per tile slot, kept apart for full tiles and for the partial last b-tile of each
    # a-row: within each kind every slot has seen the same number of values, so the count and the
    # weight 1 / count are scalars (one division per tile, none per element).
    tail = B - (b_blocks - 1) * BLOCK_B  # valid rows of a last b-tile (BLOCK_B when B divides)
    rows = tl.arange(0, BLOCK_B)
    cnt = 0.0
    mean = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    cnt_t = 0.0
    mean_t = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    m2_t = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    for t in range(t_lo, t_hi):
        a = t // b_blocks
        bt = t - a * b_blocks
        ptrs = x_c + a * s_a + (bt * BLOCK_B + rows)[:, None] * s_b
        if (bt < b_blocks - 1) | (tail == BLOCK_B):
            x = tl.load(ptrs, mask=c_ok[None, :], other=0.0)
            cnt += 1.0
            w = 1.0 / cnt
            delta = (x.to(tl.float32) - ref[None, :]) - mean
            mean += delta * w
            m2 += delta * delta * (1.0 - w)  # (x - mean_new) = (1 - w) * (x - mean_old)
        else:
            x = tl.load(ptrs, mask=(rows < tail)[:, None] & c_ok[None, :], other=0.0)
            cnt_t += 1.0
            w = 1.0 / cnt_t
            delta = (x.to(tl.float32) - ref[None, :]) - mean_t
            mean_t += delta * w
            m2_t += delta * delta * (1.0 - w)
    # Chan over all (slot, kind) groups: n = sum n_i, mean = sum n_i mean_i / n,
    # M2 = sum M2_i + sum n_i (mean_i - mean)^2. Rows past the tail hold no values of the tail kind.
    n_t = tl.where(rows < tail, cnt_t, 0.0)[:, None]
    m2_t = tl.where(n_t > 0, m2_t, 0.0)
    n = cnt * BLOCK_B + cnt_t * tail
    mean_c = tl.div_rn(tl.sum(mean * cnt + mean_t * n_t, axis=0), tl.maximum(n, 1.0))
    d = mean - mean_c[None, :]
    d_t = mean_t - mean_c[None, :]
    m2_c = tl.sum(m2 + m2_t + d * d * cnt + d_t * d_t * n_t, axis=0)
    out = part_ptr + split * 4 * C + c
    tl.store(out, tl.zeros([BLOCK_C], tl.float32) + n, mask=c_ok)
    tl.store(out + C, mean_c, mask=c_ok)
    tl.store(out + 2 * C, m2_c, mask=c_ok)
    tl.store(out + 3 * C, ref, mask=c_ok)


@triton.jit
def _chan_combine(part_ptr, lo, hi, shift, c, c_ok, C, ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    """Chan's parallel formula over the entries s in [lo, hi) of part[s, 0:3, c] = (n_s, mean_s, M2_s) (entry
    stride ROWS * C), in two passes: n = sum n_s, mean = sum n_s (mean_s - shift) / n,
    M2 = sum M2_s + sum n_s (mean_s - shift - mean)^2. Returns (n, mean, M2), the mean relative to
    ``shift[c]`` (a value close to the data, so the sums round relative to the means' spread, not their
    magnitude). Fixed order: entry s goes to slot s % BLOCK_S in ascending s, then a tree over the slots."""
    n_acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    s_acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = (s < hi)[:, None] & c_ok[None, :]
        off = s[:, None] * ROWS * C + c[None, :]
        n_s = tl.load(part_ptr + off, mask=m, other=0.0)
        n_acc += n_s
        s_acc += n_s * (tl.load(part_ptr + off + C, mask=m, other=0.0) - shift[None, :])
    n = tl.sum(n_acc, axis=0)
    mean = tl.div_rn(tl.sum(s_acc, axis=0), tl.maximum(n, 1.0))
    m2_acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = (s < hi)[:, None] & c_ok[None, :]
        off = s[:, None] * ROWS * C + c[None, :]
        n_s = tl.load(part_ptr + off, mask=m, other=0.0)
        d = tl.load(part_ptr + off + C, mask=m, other=0.0) - shift[None, :] - mean[None, :]
        m2_acc += tl.load(part_ptr + off + 2 * C, mask=m, other=0.0) + n_s * d * d
    return n, mean, tl.sum(m2_acc, axis=0)


def _stats_finalize_signature(dtype):
    t = f"*{TRITON_TYPE[dtype]}"
    return {"part_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "save_mean_ptr": t,
            "save_rstd_ptr": t, "rm_ptr": t, "rv_ptr": t, "rm_out_ptr": t, "rv_out_ptr": t, "nbt_ptr": "*i64",
            "nbt_out_ptr": "*i64", "C": "i32", "SPLIT": "i32", "momentum": "fp32", "eps": "fp32",
            **dict.fromkeys(["ROWS", "HAS_RUNNING", "WRITE_SAVE", "HAS_COUNTER", "CUMULATIVE", "BLOCK_S", "BLOCK_C"],
                            "constexpr")}


# nn.BatchNorm2d's training step: running stats and num_batches_tracked (momentum 0.1, or None: cumulative).
_FINISH_FLAGS = {"ROWS": 4, "HAS_RUNNING": True, "WRITE_SAVE": False, "HAS_COUNTER": True, "C": 64}


@tuned_kernel("batch_norm_stats_finalize", gpu_configs=_FINISH_GPU_CONFIGS, interp_heuristics=_FINISH_INTERP,
              key=["C", "SPLIT"], signature=_stats_finalize_signature,
              constexprs=lambda dtype: {**_FINISH_FLAGS, "CUMULATIVE": False},
              variants={"cumulative": lambda dtype: {**_FINISH_FLAGS, "CUMULATIVE": True},
                        "tiles": lambda dtype: {**_FINISH_FLAGS, "ROWS": 3, "CUMULATIVE": False},
                        "stats_only": lambda dtype: {**_FINISH_FLAGS, "HAS_RUNNING": False, "HAS_COUNTER": False,
                                                     "CUMULATIVE": False}})
@triton.jit
def batch_norm_stats_finalize_kernel(
    part_ptr, mean_ptr, rstd_ptr, save_mean_ptr, save_rstd_ptr,
    rm_ptr, rv_ptr, rm_out_ptr, rv_out_ptr, nbt_ptr, nbt_out_ptr,
    C, SPLIT, momentum, eps,
    ROWS: tl.constexpr,  # 4: SPLIT partials (n, mean - ref, M2, ref); 3: SPLIT conv tiles (count, mean, M2)
    HAS_RUNNING: tl.constexpr,  # running stats given: write their update to rm_out / rv_out
    WRITE_SAVE: tl.constexpr,  # also write mean / invstd rounded to save_*'s dtype (eager on CPU)
    HAS_COUNTER: tl.constexpr,  # num_batches_tracked given: program 0 writes nbt_out = nbt + 1
    CUMULATIVE: tl.constexpr,  # momentum=None: the factor is 1 / (nbt + 1), read here (no host sync)
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Combine the SPLIT entries of ``part`` (:func:`_chan_combine`); mean, invstd (float32), running-stat
    update, num_batches_tracked + 1. Conv tiles are shifted by the first tile's mean."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if ROWS == 3:
        ref = tl.load(part_ptr + C + c, mask=c_ok, other=0.0)
        shift = ref
    else:  # the partials' means are already relative to ref (every split holds it)
        ref = tl.load(part_ptr + 3 * C + c, mask=c_ok, other=0.0)
        shift = tl.zeros([BLOCK_C], tl.float32)
    n, mean, m2 = _chan_combine(part_ptr, 0, SPLIT, shift, c, c_ok, C, ROWS, BLOCK_S, BLOCK_C)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(m2, tl.maximum(n, 1.0)) + eps))
    mean += ref
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(rstd_ptr + c, rstd, mask=c_ok)
    if WRITE_SAVE:
        tl.store(save_mean_ptr + c, mean.to(save_mean_ptr.dtype.element_ty), mask=c_ok)
        tl.store(save_rstd_ptr + c, rstd.to(save_rstd_ptr.dtype.element_ty), mask=c_ok)
    if HAS_COUNTER:
        batches = tl.load(nbt_ptr) + 1  # int64
        tl.store(nbt_out_ptr, batches, mask=tl.program_id(0) == 0)
        if CUMULATIVE:
            momentum = tl.div_rn(1.0, batches.to(tl.float32))
    if HAS_RUNNING:
        rm = tl.load(rm_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        rv = tl.load(rv_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        unbiased = tl.div_rn(m2, tl.maximum(n - 1.0, 1.0))
        tl.store(rm_out_ptr + c, (momentum * mean + (1.0 - momentum) * rm).to(rm_out_ptr.dtype.element_ty),
                 mask=c_ok)
        tl.store(rv_out_ptr + c, (momentum * unbiased + (1.0 - momentum) * rv).to(rv_out_ptr.dtype.element_ty),
                 mask=c_ok)


def _tiles_combine_signature(dtype):
    return {"tile_ptr": "*fp32", "part_ptr": "*fp32", "C": "i32", "T": "i32", "SPLIT": "i32",
            "BLOCK_S": "constexpr", "BLOCK_C": "constexpr"}


@tuned_kernel("batch_norm_tiles_combine", gpu_configs=_FINISH_GPU_CONFIGS, dtypes=(torch.float32,),
              interp_heuristics={"BLOCK_C": _FINISH_INTERP["BLOCK_C"],
                                 "BLOCK_S": lambda a: interp_block(triton.cdiv(a["T"], a["SPLIT"]), 1, 256)},
              key=["C", "T", "SPLIT"], signature=_tiles_combine_signature, constexprs=lambda dtype: {"C": 64})
@triton.jit
def batch_norm_tiles_combine_kernel(
    tile_ptr, part_ptr,
    C, T, SPLIT,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """part[s, :, c] = (n, mean - ref, M2, ref) of the conv tiles tile[t, :, c] = (count, mean, M2) in the
    s-th of SPLIT equal runs of t (:func:`_chan_combine`); ref[c] = tile[0, 1, c], the first tile's mean,
    the same shift for every split (the finalize's ROWS=4 input)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    split = tl.program_id(1)
    lo = (split.to(tl.int64) * T // SPLIT).to(tl.int32)
    hi = ((split.to(tl.int64) + 1) * T // SPLIT).to(tl.int32)
    ref = tl.load(tile_ptr + C + c, mask=c_ok, other=0.0)
    n, mean, m2 = _chan_combine(tile_ptr, lo, hi, ref, c, c_ok, C, 3, BLOCK_S, BLOCK_C)
    out = part_ptr + split * 4 * C + c
    tl.store(out, n, mask=c_ok)
    tl.store(out + C, mean, mask=c_ok)
    tl.store(out + 2 * C, m2, mask=c_ok)
    tl.store(out + 3 * C, ref, mask=c_ok)


# --- forward apply --------------------------------------------------------------------------------------


def _apply_signature(stat_type):
    def signature(dtype):
        t = f"*{TRITON_TYPE[dtype]}"
        s = f"*{stat_type or TRITON_TYPE[dtype]}"
        return {"x_ptr": t, "res_ptr": t, "out_ptr": t, "mean_ptr": s, "rstd_ptr": s, "w_ptr": t, "b_ptr": t,
                "pre_ptr": t, **dict.fromkeys(_VIEW_INTS, "i32"), "eps": "fp32", "min_val": "fp32", "max_val": "fp32",
                **dict.fromkeys(["EVAL", "HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL", "ACT", "PRE", "BLOCK_B",
                                 "BLOCK_C"], "constexpr")}

    return signature


_APPLY_FLAGS = {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_RESIDUAL": True, "ACT": "relu", "PRE": False}  # ResNet
# The training MobileNet pattern: channels_last BN + ReLU6 that also writes the pre-activation for the backward.
_RELU6_PRE = {"HAS_WEIGHT": True, "HAS_BIAS": True, "HAS_RESIDUAL": False, "ACT": "hardtanh", "PRE": True}


@triton.jit
def _batch_norm_apply(
    x_ptr, res_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, pre_ptr,
    A, B, C, s_a, s_b, s_c,
    eps, min_val, max_val,
    EVAL: tl.constexpr,  # mean_ptr / rstd_ptr are running_mean / running_var: invstd formed here
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACT: tl.constexpr,  # "": none; else a name of tritonkit.kernels.elementwise.ACTIVATIONS (hardtanh: min/max_val)
    PRE: tl.constexpr,  # also store the value before ACT in pre_ptr (what the activation's backward reads)
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = act((x - mean[c]) * invstd[c] * w[c] + b[c] [+ residual]), one [BLOCK_B, BLOCK_C] tile."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    tile = pid // c_blocks
    c = (pid - tile * c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    b_blocks = tl.cdiv(B, BLOCK_B)
    a = tile // b_blocks
    b = (tile - a * b_blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    if EVAL:
        rstd = tl.div_rn(1.0, tl.sqrt_rn(rstd + eps))
    if HAS_WEIGHT:
        rstd = rstd * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    off = a * s_a + b[:, None] * s_b + c[None, :] * s_c
    m = (b < B)[:, None] & c_ok[None, :]
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * rstd[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + off, mask=m, other=0.0).to(tl.float32)
    if PRE:
        y = y.to(pre_ptr.dtype.element_ty)  # the activation reads the rounded value, as in eager
        tl.store(pre_ptr + off, y, mask=m)
        y = y.to(tl.float32)
    if ACT != "":
        y = apply_activation(y, ACT, min_val, max_val)  # NaN stays NaN, as torch's activations keep it
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)


# The activations whose backward reads their input, which the training apply then also writes (``PRE``).
SAVES_INPUT = ("hardtanh", "hardswish", "hardsigmoid", "silu", "gelu", "gelu_tanh")
assert set(SAVES_INPUT) | set(SAVES_OUTPUT) | {"relu"} == set(ELEMENTWISE_ACTIVATIONS)

# Training: mean / invstd are the float32 batch statistics. Eval: running stats in the input's dtype.
batch_norm_apply_kernel = tuned_kernel(
    "batch_norm_apply", gpu_configs=_APPLY_CONFIGS, config_for_dtype=_APPLY_FOR, interp_heuristics=_TILE_INTERP,
    key=["A", "B", "C", "s_b", "s_c"], signature=_apply_signature("fp32"),
    constexprs=lambda dtype: {"EVAL": False, **_APPLY_FLAGS, **_typical("nchw")},
    variants={**_nhwc_variant({"EVAL": False, **_APPLY_FLAGS}),
              "relu6_pre_nhwc": lambda dtype: {"EVAL": False, **_RELU6_PRE, **_typical("nhwc")}},
)(_batch_norm_apply)
batch_norm_apply_eval_kernel = tuned_kernel(
    "batch_norm_apply_eval", gpu_configs=_APPLY_CONFIGS, config_for_dtype=_APPLY_FOR, interp_heuristics=_TILE_INTERP,
    key=["A", "B", "C", "s_b", "s_c"], signature=_apply_signature(None),
    constexprs=lambda dtype: {"EVAL": True, **_APPLY_FLAGS, **_typical("nchw")},
    variants=_nhwc_variant({"EVAL": True, **_APPLY_FLAGS}),
)(_batch_norm_apply)


# --- backward -------------------------------------------------------------------------------------------


# The activation whose backward the BN backward applies to g first (the MASK constexpr; 0: none), read
# from ``y``, the tensor that activation's aten backward saves: relu its output; relu6 (hardtanh(0, 6)),
# hardswish, hardsigmoid, silu, gelu and gelu_tanh their input, the BN output; sigmoid its output.
ACTIVATIONS = {"relu": 1, "relu6": 2, "hardswish": 3, "hardsigmoid": 4, "silu": 5, "sigmoid": 6, "gelu": 7,
               "gelu_tanh": 8}


@triton.jit
def _grad_mask(g, y, MASK: tl.constexpr):
    """g (float32) through the activation's backward: MASK 1 (relu) zeroes y <= 0, as threshold_backward;
    2 (relu6) also y >= 6, as hardtanh_backward(g, y, 0, 6) (NaN y keeps g in both); 3-8 the gradient of
    ``tritonkit.kernels.elementwise.activation_grad``, exactly as the standalone backward kernel."""
    if MASK == 1 or MASK == 2:
        drop = y <= 0
        if MASK == 2:
            drop = drop | (y >= 6)
        g = tl.where(drop, 0.0, g)
    elif MASK == 3:
        g = activation_grad(g, y, "hardswish", 0.0, 0.0)
    elif MASK == 4:
        g = activation_grad(g, y, "hardsigmoid", 0.0, 0.0)
    elif MASK == 5:
        g = activation_grad(g, y, "silu", 0.0, 0.0)
    elif MASK == 6:
        g = activation_grad(g, y, "sigmoid", 0.0, 0.0)
    elif MASK == 7:
        g = activation_grad(g, y, "gelu", 0.0, 0.0)
    elif MASK == 8:
        g = activation_grad(g, y, "gelu_tanh", 0.0, 0.0)
    return g


@triton.jit
def _own_output(x, mean, k, beta):
    """The BatchNorm's output recomputed from its input x (float32): (x - mean) * k + beta, k = invstd *
    weight, rounded to x's dtype as it was stored (``_batch_norm_apply``'s arithmetic and the conv input
    prologue's, ``kernels.elementwise.apply_prologue``)."""
    y = (x.to(tl.float32) - mean[None, :]) * k[None, :]
    y += beta[None, :]
    return y.to(x.dtype).to(tl.float32)


def _bwd_reduce_signature(dtype):
    t = f"*{TRITON_TYPE[dtype]}"
    return {"g_ptr": t, "x_ptr": t, "y_ptr": t, "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "w_ptr": t, "b_ptr": t,
            "part_ptr": "*fp32", **dict.fromkeys(_VIEW_INTS, "i32"), "SPLIT": "i32", "MASK": "constexpr",
            "NEED_DOT": "constexpr", "Y_FROM_X": "constexpr", "BLOCK_B": "constexpr", "BLOCK_C": "constexpr"}


_BWD_FLAGS = {"MASK": ACTIVATIONS["relu"], "NEED_DOT": True, "Y_FROM_X": False}
# A training ResNet's bn1 -> ReLU -> conv2 whose normalised activation was never stored: the ReLU mask
# from the BN output recomputed from its input.
_BWD_Y_FROM_X = {"relu_from_input_nhwc": lambda dtype: {**_BWD_FLAGS, "Y_FROM_X": True, **_typical("nhwc")}}


@tuned_kernel("batch_norm_bwd_reduce", gpu_configs=_REDUCE_CONFIGS, config_for_dtype=_REDUCE_FOR,
              interp_heuristics=_REDUCE_INTERP, key=["A", "B", "C", "s_b", "s_c", "SPLIT"],
              signature=_bwd_reduce_signature, constexprs=lambda dtype: {**_BWD_FLAGS, **_typical("nchw")},
              variants={**_nhwc_variant(_BWD_FLAGS), **_activation_nhwc_variants(_BWD_FLAGS), **_BWD_Y_FROM_X})
@triton.jit
def batch_norm_bwd_reduce_kernel(
    g_ptr, x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, part_ptr,
    A, B, C, s_a, s_b, s_c,
    SPLIT,
    MASK: tl.constexpr,  # 0: g as given; ACTIVATIONS[...]: g masked by y (:func:`_grad_mask`)
    NEED_DOT: tl.constexpr,  # also sum g * (x - mean) (else x and mean are not read)
    Y_FROM_X: tl.constexpr,  # y is the BN output recomputed from x, mean, rstd, w and b (:func:`_own_output`)
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """part[s, 0, c] = sum g, part[s, 1, c] = sum g * (x - mean[c]) over the s-th run of tiles."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    b_blocks = tl.cdiv(B, BLOCK_B)
    tiles = A * b_blocks
    t_lo = (split.to(tl.int64) * tiles // SPLIT).to(tl.int32)
    t_hi = ((split.to(tl.int64) + 1) * tiles // SPLIT).to(tl.int32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    if NEED_DOT or Y_FROM_X:
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
    if Y_FROM_X:
        k = tl.load(rstd_ptr + c, mask=c_ok, other=0.0) * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    acc_g = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    acc_d = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    c_off = c[None, :] * s_c
    for t in range(t_lo, t_hi):
        a = t // b_blocks
        b = (t - a * b_blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
        off = a * s_a + b[:, None] * s_b + c_off
        m = (b < B)[:, None] & c_ok[None, :]
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
        if Y_FROM_X:
            x = tl.load(x_ptr + off, mask=m, other=0.0)
            g = _grad_mask(g, _own_output(x, mean, k, beta), MASK)
            x = x.to(tl.float32)
        elif MASK:
            g = _grad_mask(g, tl.load(y_ptr + off, mask=m, other=1.0).to(tl.float32), MASK)
        acc_g += g
        if NEED_DOT:
            if not Y_FROM_X:
                x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            acc_d += g * (x - mean[None, :])
    out = part_ptr + split * 2 * C + c
    tl.store(out, tl.sum(acc_g, axis=0), mask=c_ok)
    tl.store(out + C, tl.sum(acc_d, axis=0), mask=c_ok)


def _bwd_finalize_signature(dtype):
    t = f"*{TRITON_TYPE[dtype]}"
    return {"part_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "w_ptr": t, "gw_ptr": t, "gb_ptr": t,
            "coef_ptr": "*fp32", "C": "i32", "SPLIT": "i32", "inv_n": "fp32", "eps": "fp32",
            **dict.fromkeys(["TRAIN", "HAS_WEIGHT", "WRITE_GW", "WRITE_GB", "WRITE_COEF", "BLOCK_S", "BLOCK_C"],
                            "constexpr")}


_BWD_FINISH_FLAGS = {"HAS_WEIGHT": True, "WRITE_GW": True, "WRITE_GB": True, "WRITE_COEF": True, "C": 64}


@tuned_kernel("batch_norm_bwd_finalize", gpu_configs=_FINISH_GPU_CONFIGS, interp_heuristics=_FINISH_INTERP,
              key=["C", "SPLIT"], signature=_bwd_finalize_signature,
              constexprs=lambda dtype: {"TRAIN": True, **_BWD_FINISH_FLAGS},
              variants={"eval": lambda dtype: {"TRAIN": False, **_BWD_FINISH_FLAGS}})
@triton.jit
def batch_norm_bwd_finalize_kernel(
    part_ptr, mean_ptr, rstd_ptr, w_ptr, gw_ptr, gb_ptr, coef_ptr,
    C, SPLIT, inv_n, eps,
    TRAIN: tl.constexpr,  # rstd_ptr holds invstd (training) or running_var (eval: invstd formed here)
    HAS_WEIGHT: tl.constexpr, WRITE_GW: tl.constexpr, WRITE_GB: tl.constexpr, WRITE_COEF: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_weight, grad_bias and coef[:, c] = (mean, k, c0, c1) of grad_input = k*g + c1*(x - mean) + c0."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc_g = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    acc_d = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = (s < SPLIT)[:, None] & c_ok[None, :]
        off = s[:, None] * 2 * C + c[None, :]
        acc_g += tl.load(part_ptr + off, mask=m, other=0.0)
        acc_d += tl.load(part_ptr + off + C, mask=m, other=0.0)
    sum_g = tl.sum(acc_g, axis=0)
    sum_d = tl.sum(acc_d, axis=0)
    rstd = tl.load(rstd_ptr + c, mask=c_ok, other=1.0)
    if not TRAIN:
        rstd = tl.div_rn(1.0, tl.sqrt_rn(rstd + eps))
    if WRITE_GW:
        tl.store(gw_ptr + c, (sum_d * rstd).to(gw_ptr.dtype.element_ty), mask=c_ok)
    if WRITE_GB:
        tl.store(gb_ptr + c, sum_g.to(gb_ptr.dtype.element_ty), mask=c_ok)
    if WRITE_COEF:
        k = rstd
        if HAS_WEIGHT:
            k = k * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        c0 = tl.zeros([BLOCK_C], tl.float32)
        c1 = tl.zeros([BLOCK_C], tl.float32)
        if TRAIN:
            c0 = -k * (sum_g * inv_n)
            c1 = -k * (rstd * rstd) * (sum_d * inv_n)
        tl.store(coef_ptr + c, tl.load(mean_ptr + c, mask=c_ok, other=0.0), mask=c_ok)
        tl.store(coef_ptr + C + c, k, mask=c_ok)
        tl.store(coef_ptr + 2 * C + c, c0, mask=c_ok)
        tl.store(coef_ptr + 3 * C + c, c1, mask=c_ok)


_BWD_APPLY_FLAGS = {"MASK": ACTIVATIONS["relu"], "TRAIN": True, "Y_FROM_X": False}


def _bwd_apply_signature(dtype):
    t = f"*{TRITON_TYPE[dtype]}"
    return {"g_ptr": t, "x_ptr": t, "y_ptr": t, "b_ptr": t, "coef_ptr": "*fp32", "dx_ptr": t,
            **dict.fromkeys(_VIEW_INTS, "i32"), "MASK": "constexpr", "TRAIN": "constexpr", "Y_FROM_X": "constexpr",
            "BLOCK_B": "constexpr", "BLOCK_C": "constexpr"}


@tuned_kernel("batch_norm_bwd_apply", gpu_configs=_APPLY_CONFIGS, config_for_dtype=_APPLY_FOR,
              interp_heuristics=_TILE_INTERP, key=["A", "B", "C", "s_b", "s_c"], signature=_bwd_apply_signature,
              constexprs=lambda dtype: {**_BWD_APPLY_FLAGS, **_typical("nchw")},
              variants={**_nhwc_variant(_BWD_APPLY_FLAGS), **_activation_nhwc_variants(_BWD_APPLY_FLAGS),
                        "relu_from_input_nhwc": lambda dtype: {**_BWD_APPLY_FLAGS, "Y_FROM_X": True,
                                                               **_typical("nhwc")}})
@triton.jit
def batch_norm_bwd_apply_kernel(
    g_ptr, x_ptr, y_ptr, b_ptr, coef_ptr, dx_ptr,
    A, B, C, s_a, s_b, s_c,
    MASK: tl.constexpr,  # as the reduction's: g masked by y (:func:`_grad_mask`) when non-zero
    TRAIN: tl.constexpr,  # eval: dx = k * g (x is not read)
    Y_FROM_X: tl.constexpr,  # training only: y is the BN output recomputed from x, coef and b (:func:`_own_output`)
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = k[c] * g + c1[c] * (x - mean[c]) + c0[c], g masked by y when MASK."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    tile = pid // c_blocks
    c = (pid - tile * c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    b_blocks = tl.cdiv(B, BLOCK_B)
    a = tile // b_blocks
    b = (tile - a * b_blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    off = a * s_a + b[:, None] * s_b + c[None, :] * s_c
    m = (b < B)[:, None] & c_ok[None, :]
    k = tl.load(coef_ptr + C + c, mask=c_ok, other=0.0)
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
    if TRAIN:
        mean = tl.load(coef_ptr + c, mask=c_ok, other=0.0)
        x = tl.load(x_ptr + off, mask=m, other=0.0)
        if Y_FROM_X:
            g = _grad_mask(g, _own_output(x, mean, k, tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)), MASK)
        x = x.to(tl.float32)
    if MASK and not Y_FROM_X:
        g = _grad_mask(g, tl.load(y_ptr + off, mask=m, other=1.0).to(tl.float32), MASK)
    dx = g * k[None, :]
    if TRAIN:
        c0 = tl.load(coef_ptr + 2 * C + c, mask=c_ok, other=0.0)
        c1 = tl.load(coef_ptr + 3 * C + c, mask=c_ok, other=0.0)
        dx += (x - mean[None, :]) * c1[None, :] + c0[None, :]
    tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


# --- launchers --------------------------------------------------------------------------------------


def _view(t: torch.Tensor):
    """``(A, B, C, s_a, s_b, s_c)`` reading 4-D ``t`` as ``[A, B, C]`` (H and W, and N when it merges,
    coalesced into B), or None when H and W do not coalesce. Strides of size-1 dims never matter."""
    N, C, H, W = t.shape
    sn, sc, sh, sw = t.stride()
    if H == 1 or W == 1:
        shw = sw if H == 1 else sh
    elif sh == W * sw:
        shw = sw
    else:
        return None
    HW = H * W
    if HW == 1:
        shw = 0
    s_c = sc if C > 1 else 0
    if N == 1 or HW == 1 or sn == HW * shw:
        B = N * HW
        s_b = shw if HW > 1 else (sn if N > 1 else 0)
        return (1, B, C, 0, s_b, s_c)
    return (N, HW, C, sn, shw, s_c)


def _in_layout(t: torch.Tensor | None, like: torch.Tensor, view) -> torch.Tensor | None:
    """``t`` when it reads through ``view`` like ``like``; else a copy laid out like ``like``."""
    if t is None or _view(t) == view:
        return t
    return torch.empty_like(like).copy_(t)


def _layout(x: torch.Tensor):
    """``(x, view, memory_format)``: ``x`` (or a copy) laid out like the output eager allocates."""
    fmt = output_memory_format(x)
    ref = _view(torch.empty(x.shape, device="meta", memory_format=fmt))
    if _view(x) != ref:
        x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt).copy_(x)
    return x, ref, fmt


def save_stats_dtype(input: torch.Tensor) -> torch.dtype:
    """dtype of ``save_mean`` / ``save_invstd``: float32 on a GPU, the input's dtype on the CPU (eager's
    rule on each device as its fake/meta tensors record it, also with float32 parameters under autocast,
    so a graph's recorded metadata stays right when tritonkit replaces aten)."""
    return input.dtype if input.device.type == "cpu" else torch.float32


def _stats(x, view, eps, running, momentum, counter, split, save_dtype):
    """Stage one + finalize. Returns (mean32, invstd32, save_mean, save_invstd, rm_out, rv_out, nbt_out)."""
    A, B, C, s_a, s_b, s_c = view
    split = split or reduction_split(C, A * B, x.device, 1024)
    part = empty((split, 4, C), dtype=torch.float32, device=x.device)
    batch_norm_stats_partial_kernel[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), split)](
        x, part, A, B, C, s_a, s_b, s_c, split)
    return _finalize(part, 4, split, eps, running, momentum, counter, save_dtype)


def _finalize(part, rows, entries, eps, running, momentum, counter, save_dtype):
    """The finalize launch over ``entries`` entries of ``part`` (``rows`` 4: partials, 3: conv tiles):
    outputs as :func:`_stats`. ``momentum`` None (with ``counter``): the cumulative factor
    ``1 / (counter + 1)``, formed on the device."""
    C, dev = part.shape[-1], part.device
    mean = empty((C,), dtype=torch.float32, device=dev)
    rstd = empty((C,), dtype=torch.float32, device=dev)
    write_save = save_dtype != torch.float32
    save_mean = empty((C,), dtype=save_dtype, device=dev) if write_save else mean
    save_rstd = empty((C,), dtype=save_dtype, device=dev) if write_save else rstd
    rm, rv = (_vec(t) for t in running)
    has_running = rm is not None
    rm_out = empty((C,), dtype=rm.dtype, device=dev) if has_running else None
    rv_out = empty((C,), dtype=rv.dtype, device=dev) if has_running else None
    nbt_out = None if counter is None else empty(counter.shape, dtype=counter.dtype, device=dev)
    batch_norm_stats_finalize_kernel[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]),)](
        part, mean, rstd, save_mean, save_rstd,
        rm if has_running else save_mean, rv if has_running else save_rstd,
        rm_out if has_running else save_mean, rv_out if has_running else save_rstd,
        counter if counter is not None else part, nbt_out if counter is not None else part,
        C, entries, 0.0 if momentum is None else float(momentum), float(eps),
        ROWS=rows, HAS_RUNNING=has_running, WRITE_SAVE=write_save, HAS_COUNTER=counter is not None,
        CUMULATIVE=momentum is None and has_running)
    return mean, rstd, save_mean, save_rstd, rm_out, rv_out, nbt_out


def batch_norm_stats(input: torch.Tensor, eps: float, split: int | None = None):
    """Per-channel float32 ``(mean, invstd)`` of 4-D ``input``, ``invstd = 1 / sqrt(biased_var + eps)``.

    ``split`` overrides how many partials each channel block is cut into (tests use it)."""
    x, view, _ = _layout(input)
    check_int32_indexing(x)
    mean, rstd, *_ = _stats(x, view, eps, (None, None), 0.0, None, split, torch.float32)
    return mean, rstd


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel tensor as the unit-stride 1-D vector the kernels index."""
    return None if t is None else t.reshape(-1).contiguous()


def _tile_grid(C: int, A: int, B: int):
    """One program per [BLOCK_B, BLOCK_C] tile, channel blocks fastest (a 1-D grid has no 65535 limit)."""
    return lambda meta: (triton.cdiv(C, meta["BLOCK_C"]) * A * triton.cdiv(B, meta["BLOCK_B"]),)


def _apply(kernel, x, view, fmt, mean, rstd, weight, bias, residual, activation, eps, eval_mode):
    """``(out, pre)``: the apply pass; ``activation`` None or ``(kind, min_val, max_val)``; ``pre`` (the value
    before the activation) is written, else None, where that activation's backward reads its input."""
    A, B, C, s_a, s_b, s_c = view
    mean, rstd, weight, bias = _vec(mean), _vec(rstd), _vec(weight), _vec(bias)
    out = empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    kind, min_val, max_val = activation or ("", 0.0, 0.0)
    pre = empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if kind in SAVES_INPUT else None
    residual = _in_layout(residual, out, view)
    check_int32_indexing(x, out, residual)
    kernel[_tile_grid(C, A, B)](
        x, residual if residual is not None else x, out, mean, rstd,
        weight if weight is not None else x, bias if bias is not None else x, pre if pre is not None else out,
        A, B, C, s_a, s_b, s_c, float(eps), float(min_val), float(max_val),
        EVAL=eval_mode, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, ACT=kind, PRE=pre is not None)
    return out, pre


def _activation(relu: bool, activation) -> tuple | None:
    return ("relu", 0.0, 0.0) if relu else activation


def batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                     residual=None, relu=False, split=None, activation=None):
    """Training forward: ``(out, save_mean, save_invstd, running_mean_out, running_var_out,
    num_batches_tracked_out, pre)``.

    ``out = act(bn(input) + residual)`` in ``input``'s dtype and memory format, ``act`` ReLU when ``relu``,
    else ``activation`` = ``(kind, min_val, max_val)`` (a kind of ``tritonkit.kernels.elementwise``) or none;
    ``pre`` the value before ``act`` for a kind in ``SAVES_INPUT`` (its backward reads it), else None; the
    running outputs are new tensors (None without running stats), ``num_batches_tracked_out = num_batches_tracked + 1``
    (None without it), written by the finalize launch; ``momentum=None`` takes the factor
    ``1 / num_batches_tracked_out`` (eager's cumulative average); ``save_*`` in :func:`save_stats_dtype`."""
    x, view, fmt = _layout(input)
    check_int32_indexing(x)
    mean, rstd, *saved = _stats(x, view, eps, (running_mean, running_var), momentum, num_batches_tracked, split,
                                save_stats_dtype(input))
    out, pre = _apply(batch_norm_apply_kernel, x, view, fmt, mean, rstd, weight, bias, residual,
                      _activation(relu, activation), eps, False)
    return out, *saved, pre


def _stats_from_partials(input, partials, running_mean, running_var, num_batches_tracked, momentum, eps, split):
    """The statistics of :func:`batch_norm_train_from_partials`: outputs as :func:`_stats`."""
    tiles = partials.contiguous()
    T, _, C = tiles.shape
    split = split or reduction_split(C, T, tiles.device, 1024)
    if split == 1:
        part, rows = tiles, 3
    else:
        part, rows = empty((split, 4, C), dtype=torch.float32, device=tiles.device), 4
        batch_norm_tiles_combine_kernel[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), split)](
            tiles, part, C, T, split)
    return _finalize(part, rows, split if split > 1 else T, eps, (running_mean, running_var), momentum,
                     num_batches_tracked, save_stats_dtype(input))


def batch_norm_train_from_partials(input, partials, weight, bias, running_mean, running_var, num_batches_tracked,
                                   momentum, eps, residual=None, relu=False, split=None, activation=None):
    """:func:`batch_norm_train` with the statistics of ``input`` (a conv output) from its conv's tiles
    ``partials`` [T, 3, C] = (count, mean, M2) (``kernels.conv.conv2d(stats=True)``), so ``input`` is read
    once, by the apply pass. Same outputs. ``split`` (default: :func:`reduction_split` over the T tiles, 1 in
    the interpreter) > 1 first combines each of ``split`` equal runs of tiles into one partial (the tiles
    combine kernel, one program per channel block and run), then the finalize combines those; 1: the
    finalize reads the tiles itself."""
    x, view, fmt = _layout(input)
    check_int32_indexing(x)
    mean, rstd, *saved = _stats_from_partials(x, partials, running_mean, running_var, num_batches_tracked, momentum,
                                              eps, split)
    out, pre = _apply(batch_norm_apply_kernel, x, view, fmt, mean, rstd, weight, bias, residual,
                      _activation(relu, activation), eps, False)
    return out, *saved, pre


def batch_norm_stats_from_partials(input, partials, running_mean, running_var, num_batches_tracked, momentum, eps,
                                   split=None):
    """:func:`batch_norm_train_from_partials` without its apply pass, for a BatchNorm whose output its
    consumers compute as they load it (a conv's input prologue, :func:`batch_norm_apply`): ``(save_mean,
    save_invstd, running_mean_out, running_var_out, num_batches_tracked_out)``; ``input`` is not read."""
    return tuple(_stats_from_partials(input, partials, running_mean, running_var, num_batches_tracked, momentum, eps,
                                      split)[2:])


def batch_norm_apply(input, mean, invstd, weight, bias, relu=False):
    """``relu((input - mean[c]) * invstd[c] * weight[c] + bias[c])`` (weight, bias optional; ReLU when
    ``relu``): a training BatchNorm's apply from given statistics, in ``input``'s dtype and the memory format
    eager allocates, the same float32 arithmetic as the conv input prologue's."""
    x, view, fmt = _layout(input)
    activation = ("relu", 0.0, 0.0) if relu else None
    return _apply(batch_norm_apply_kernel, x, view, fmt, _vec(mean).float(), _vec(invstd).float(), weight, bias, None,
                  activation, 0.0, False)[0]


def batch_norm_eval(input, weight, bias, running_mean, running_var, eps, residual=None, relu=False, activation=None):
    """Eval forward: ``act((x - running_mean) / sqrt(running_var + eps) * w + b [+ residual])``, ``act`` as
    :func:`batch_norm_train`'s."""
    x, view, fmt = _layout(input)
    return _apply(batch_norm_apply_eval_kernel, x, view, fmt, running_mean, running_var, weight, bias, residual,
                  _activation(relu, activation), eps, True)[0]


# Partials of a producer's epilogue (grad_partials) the backward finalize reads itself; more are summed
# first (torch.sum: one well-spread reduction instead of a long loop per channel block).
_FINALIZE_PARTIALS = 4096


def batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps,
                        output_mask, relu_output=None, split=None, activation="relu", output_bias=None,
                        mask_from_output=False, grad_partials=None):
    """``aten.native_batch_norm_backward`` (+ an optional mask on ``grad_out`` by ``relu_output`` under
    ``activation``, a key of :data:`ACTIVATIONS`: module doc): ``(grad_input, grad_weight, grad_bias)``, None
    where ``output_mask`` says so. ``mask_from_output`` (training): the mask's tensor is this BatchNorm's
    output, recomputed from ``input``, the saved statistics, ``weight`` and ``output_bias`` (None: 0) where
    it is read (``relu_output`` unused), for a forward that never stored it. ``grad_partials`` (training,
    no mask): float32 [T, 2, C] whose sums over T are the two reductions, sum ``grad_out`` and sum
    ``grad_out * (input - save_mean)``, computed where ``grad_out`` was (``kernels.conv.conv2d_input_grad``'s
    ``grad_stats``), so ``grad_out`` and ``input`` are read once, by the apply pass."""
    want_dx, want_gw, want_gb = (bool(m) for m in output_mask)
    x, view, fmt = _layout(input)
    A, B, C, s_a, s_b, s_c = view
    dev = x.device
    mask_kind = ACTIVATIONS[activation] if relu_output is not None or mask_from_output else 0
    g = _in_layout(grad_out, x, view)
    y = _in_layout(relu_output, x, view)
    check_int32_indexing(x, g, y)
    # per-channel statistics as float32 (a no-op for the float32 save stats of a GPU forward)
    mean = _vec(save_mean if train else running_mean).float()
    rstd = _vec(save_invstd if train else running_var).float()
    weight = _vec(weight)
    from_x = bool(mask_from_output)
    if from_x:  # the BN output's per-channel weight and bias, 1 and 0 where absent
        w_own = weight if weight is not None else torch.ones(C, dtype=torch.float32, device=dev)
        b_own = _vec(output_bias) if output_bias is not None else torch.zeros(C, dtype=w_own.dtype, device=dev)
    need_sum = want_gb or (want_dx and train)
    need_dot = want_gw or (want_dx and train)
    split = (split or reduction_split(C, A * B, dev, 1024)) if (need_sum or need_dot) else 0
    if grad_partials is not None:  # a few thousand partials at most go to the finalize as they are
        part = grad_partials if grad_partials.shape[0] <= _FINALIZE_PARTIALS else grad_partials.sum(0, keepdim=True)
        part, split = part.contiguous(), part.shape[0]
    else:
        part = empty((max(split, 1), 2, C), dtype=torch.float32, device=dev)
    if split and grad_partials is None:
        batch_norm_bwd_reduce_kernel[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), split)](
            g, x, y if y is not None else g, mean, rstd, w_own if from_x else x, b_own if from_x else x, part,
            A, B, C, s_a, s_b, s_c, split, MASK=mask_kind, NEED_DOT=need_dot, Y_FROM_X=from_x)
    param_dtype = weight.dtype if weight is not None else x.dtype  # float32 under autocast, as eager's
    grad_weight = empty((C,), dtype=param_dtype, device=dev) if want_gw else None
    grad_bias = empty((C,), dtype=param_dtype, device=dev) if want_gb else None
    coef = empty((4, C), dtype=torch.float32, device=dev) if want_dx else part
    batch_norm_bwd_finalize_kernel[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]),)](
        part, mean, rstd, weight if weight is not None else x,
        grad_weight if want_gw else x, grad_bias if want_gb else x, coef,
        C, split, 1.0 / (A * B), float(eps),
        TRAIN=bool(train), HAS_WEIGHT=weight is not None, WRITE_GW=want_gw, WRITE_GB=want_gb, WRITE_COEF=want_dx)
    grad_input = None
    if want_dx:
        grad_input = empty(x.shape, dtype=x.dtype, device=dev, memory_format=fmt)
        batch_norm_bwd_apply_kernel[_tile_grid(C, A, B)](
            g, x, y if y is not None else g, b_own if from_x else x, coef, grad_input, A, B, C, s_a, s_b, s_c,
            MASK=mask_kind, TRAIN=bool(train), Y_FROM_X=from_x)
    return grad_input, grad_weight, grad_bias


__all__ = ["batch_norm_apply", "batch_norm_backward", "batch_norm_eval", "batch_norm_stats",
           "batch_norm_stats_from_partials", "batch_norm_train", "batch_norm_train_from_partials", "save_stats_dtype"]
