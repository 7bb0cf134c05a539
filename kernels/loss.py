"""Cross-entropy over ``[N, C]`` logits: fused log-softmax + NLL (+ label smoothing) forward, optionally
with the gradient in the same pass (as Liger-Kernel does), and a gradient kernel that recomputes the
softmax from the logits and a saved log-sum-exp.

Semantics are eager ``F.cross_entropy(logits, target, weight, reduction, ignore_index, label_smoothing)``
for class-index targets (aten's ``cross_entropy_loss`` and ``cross_entropy_loss_label_smoothing``).
For row ``n`` with target ``t`` (``w`` the class weights, all 1 without ``weight``; ``W = sum_c w[c]``;
``lse = log sum_c exp(x[n, c])``; ``eps = label_smoothing`` when it is > 0, else 0 as in eager):

* ``loss[n] = (1 - eps) * w[t] * (lse - x[n, t]) + eps / C * sum_c w[c] * (lse - x[n, c])``,
  and 0 where ``t == ignore_index``;
* mean divides the summed rows by ``D = sum of w[t]`` over the non-ignored rows (both terms, as eager:
  all rows ignored gives 0 / 0 = NaN); sum uses ``D = 1`` for the gradient; none keeps the rows;
* ``dloss/dx[n, c] = g_n / D * ((((1 - eps) * w[t] + eps * W / C) * softmax(x[n])[c]
  - (1 - eps) * w[t] * [c == t] - eps / C * w[c])``, 0 on ignored rows (also when ``D`` is 0), where
  ``g_n`` is the upstream gradient (one scalar for mean/sum, one per row for none).

A target outside ``[0, C)`` that is not ``ignore_index`` gives a NaN loss and NaN gradient row; the op
layer raises eager's IndexError before launching wherever that needs no device-to-host sync (CPU).

Kernels: ``cross_entropy_fwd`` runs one program per block of ``BLOCK_N`` rows and loops over C in
``BLOCK_C`` chunks with an online (max, sum-exp) pass in float32 (coalesced along C). Nothing cancels
at a large common offset of the logits: the max ``m`` and ``log sum exp(x - m)`` stay apart (eager's
accuracy at any offset) and the smoothing term's class sum is taken relative to ``x[n, 0]``. With
``COMPUTE_GRAD`` a second loop writes the gradient for ``g_n = 1``; with ``WRITE_LOG_PROBS`` the same
loop writes the log-softmax ``log_probs[n, c] = (x[n, c] - m) - log_s`` (float32, rounded once to the
logits' dtype; what a training graph saves for the backward, so eager's separate ``_log_softmax``
launch and its re-read of the logits go away). ``cross_entropy_bwd`` recomputes
the gradient from the logits and the saved float32 ``lse`` (softmax relative error about
``|lse| * 2**-24``, 1e-6 for logits of size 20), or recomputes ``(m, log sum)`` first when ``lse`` is not
given, scaled by the upstream gradient read on the device. ``cross_entropy_reduce`` is one program that
sums the per-row float32 losses (and ``D``) in a fixed order: the mean is a deterministic two-stage sum,
no atomics. Per launch: none 2 kernels (rows, count), mean/sum 2 (rows, reduce), mean with
``COMPUTE_GRAD`` 3 (count first: the gradient divides by ``D``).
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

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2  # aten's Reduction enum


def _rows_config(block_n, block_c, warps):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_C": block_c}, num_warps=warps, num_stages=1)


# Large vocabularies want one row per program and long chunks; a few classes (ResNet's 10 / 1000)
# want many rows per program. A launch prunes the chunks far longer than its C.
_ROWS_GPU_CONFIGS = [  # (1, 4096) with 8 warps spills 8 B on sm_90 (float32, weights + smoothing + grad)
    _rows_config(1, 2048, 4),
    _rows_config(1, 1024, 4),
    _rows_config(4, 512, 8),
    _rows_config(8, 128, 4),
    _rows_config(32, 32, 4),
    _rows_config(64, 16, 4),
]


def _rows_config_for(config, dtype, arch=None, launch=None) -> bool:
    C = (launch or {}).get("C")
    return C is None or config.kwargs["BLOCK_C"] <= max(16, triton.next_power_of_2(int(C)))


# Interpreter: up to 1024 rows x 4096 classes per program (tests reach several of each).
_ROWS_INTERP = {
    "BLOCK_C": lambda a: interp_block(a["C"], 16, 4096),
    "BLOCK_N": lambda a: interp_block(a["N"], 1, min(1024, INTERP_TILE // interp_block(a["C"], 16, 4096))),
}

# What the gate compiles: a ResNet/ImageNet step (mean over 1000 classes, contiguous logits), whose C
# keeps the short-chunk configs, and a language-model vocabulary, whose C keeps the long-chunk ones.
def _typical(C):
    return {"C": C, "s_n": C, "s_c": 1, "out_sn": C}


@triton.jit
def _row_setup(target_ptr, weight_ptr, rows, N, C, ignore_index, HAS_WEIGHT: tl.constexpr):
    """Per row: in-range flag, ignored flag, valid (counted) flag, a safe target index and w[target]."""
    row_ok = rows < N
    t = tl.load(target_ptr + rows, mask=row_ok, other=0)
    ignored = t == ignore_index
    valid = row_ok & ~ignored & (t >= 0) & (t < C)
    bad = row_ok & ~ignored & ~valid
    t = tl.where(valid, t, 0).to(tl.int32)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t, mask=valid, other=0.0).to(tl.float32)
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    return row_ok, ignored, valid, bad, t, w_t


@triton.jit
def _weight_total(weight_ptr, C, HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr):
    """W = sum of the class weights (C without weights)."""
    if HAS_WEIGHT:
        acc = tl.zeros([BLOCK_C], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            acc += tl.load(weight_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        total = tl.sum(acc, axis=0)
    else:
        total = C * 1.0
    return total


@triton.jit
def _online_stats(logits_ptr, weight_ptr, row_base, row_ok, C, s_c,
                  HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over C, per row: the running max ``m`` and ``log_s = log sum_c exp(x[c] - m)`` (kept apart:
    ``lse = m + log_s`` rounds at lse's magnitude), and with SMOOTH ``sum_c w[c] * (x[c] - x[0])``; and W."""
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    lin = tl.zeros([BLOCK_N], tl.float32)
    w_acc = tl.zeros([BLOCK_C], tl.float32)
    has_c = (tl.zeros([BLOCK_N], tl.int32) + C) > 0  # a vector mask (C may be 0)
    x0 = tl.load(logits_ptr + row_base, mask=row_ok & has_c, other=0.0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = row_ok[:, None] & c_ok[None, :]
        x = tl.load(logits_ptr + row_base[:, None] + (c * s_c)[None, :], mask=ok, other=float("-inf"))
        x = x.to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: no NaN from -inf - -inf
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m = m_new
        if SMOOTH:
            d = tl.where(ok, x - x0[:, None], 0.0)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
                d = d * w[None, :]
                w_acc += w
            lin += tl.sum(d, axis=1)
    if HAS_WEIGHT:
        w_total = tl.sum(w_acc, axis=0)
    else:
        w_total = C * 1.0
    m = tl.where(row_ok, m, 0.0)  # rows past N: finite values, never stored
    log_s = tl.log(tl.where(row_ok, s, 1.0))
    return m, log_s, lin, x0, w_total


@triton.jit
def _row_outputs_pass(logits_ptr, weight_ptr, grad_ptr, log_probs_ptr, row_base, out_base, row_ok, ignored, bad, t,
                      w_t, shift, log_s, scale, w_total, C, s_c, eps,
                      HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, WRITE_GRAD: tl.constexpr,
                      WRITE_LOG_PROBS: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over C writing the contiguous [N, C] outputs from z[c] = (x[c] - shift) - log_s, the
    log-softmax in float32 ((m, log s) from the online pass, or (lse, 0)):
    WRITE_LOG_PROBS: log_probs[n, c] = z[c], rounded once to the output's dtype;
    WRITE_GRAD: grad[n, c] = scale_n * (a_n * exp(z[c]) - b_n * [c == t] - eps / C * w[c]); 0 on ignored rows."""
    if SMOOTH:
        a = (1.0 - eps) * w_t + eps * w_total / C
        b = (1.0 - eps) * w_t
        e = eps / C
    else:
        a = w_t
        b = w_t
        e = 0.0
    # Ignored rows: exact zeros (the scale may be inf or NaN when every row is ignored); bad: NaN.
    scale = tl.where(ignored, 0.0, tl.where(bad, float("nan"), scale))
    a = a * scale
    b = b * scale
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = row_ok[:, None] & c_ok[None, :]
        x = tl.load(logits_ptr + row_base[:, None] + (c * s_c)[None, :], mask=ok, other=0.0).to(tl.float32)
        z = (x - shift[:, None]) - log_s[:, None]
        out_offs = out_base[:, None] + c[None, :]
        if WRITE_LOG_PROBS:
            tl.store(log_probs_ptr + out_offs, z.to(log_probs_ptr.dtype.element_ty), mask=ok)
        if WRITE_GRAD:
            g = a[:, None] * tl.exp(z)
            g = tl.where(c[None, :] == t[:, None], g - b[:, None], g)
            if SMOOTH:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
                    g = g - (e * scale)[:, None] * w[None, :]
                else:
                    g = g - (e * scale)[:, None]
            tl.store(grad_ptr + out_offs, g.to(grad_ptr.dtype.element_ty), mask=ok)


def _fwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {
        "logits_ptr": f"*{t}", "target_ptr": "*i64", "weight_ptr": f"*{t}", "lse_ptr": "*fp32",
        "row_loss_ptr": "*fp32", "denom_ptr": "*fp32", "grad_ptr": f"*{t}", "log_probs_ptr": f"*{t}",
        "N": "i32", "C": "i32", "s_n": "i32", "s_c": "i32", "out_sn": "i32", "ignore_index": "i32",
        "eps": "fp32",
        **dict.fromkeys(("HAS_WEIGHT", "SMOOTH", "COMPUTE_GRAD", "WRITE_LOG_PROBS", "MEAN", "BLOCK_N", "BLOCK_C"),
                        "constexpr"),
    }


def _fwd_constexprs(weight, smooth, grad, log_probs=False, C=1000):
    return lambda dtype: {"HAS_WEIGHT": weight, "SMOOTH": smooth, "COMPUTE_GRAD": grad, "WRITE_LOG_PROBS": log_probs,
                          "MEAN": True, **_typical(C)}


# The log-probabilities variants are what the compile backend launches in a training graph (no weight,
# no smoothing: the lowering leaves label smoothing to ATen).
@tuned_kernel("cross_entropy_fwd", gpu_configs=_ROWS_GPU_CONFIGS, interp_heuristics=_ROWS_INTERP,
              key=["C", "s_c"], signature=_fwd_signature, config_for_dtype=_rows_config_for,
              constexprs=_fwd_constexprs(False, False, False),
              variants={"weighted_smoothed_grad": _fwd_constexprs(True, True, True),
                        "log_probs": _fwd_constexprs(False, False, False, log_probs=True),
                        "vocab": _fwd_constexprs(False, False, False, C=32000),
                        "vocab_weighted_smoothed_grad": _fwd_constexprs(True, True, True, C=32000),
                        "vocab_log_probs": _fwd_constexprs(False, False, False, log_probs=True, C=32000)})
@triton.jit
def cross_entropy_fwd_kernel(
    logits_ptr, target_ptr, weight_ptr, lse_ptr, row_loss_ptr, denom_ptr, grad_ptr, log_probs_ptr,
    N, C, s_n, s_c, out_sn, ignore_index, eps,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, COMPUTE_GRAD: tl.constexpr, WRITE_LOG_PROBS: tl.constexpr,
    MEAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """lse[n] (float32) and the row loss (row_loss_ptr's dtype); with COMPUTE_GRAD also d(loss)/d(logits)
    for an upstream gradient of 1 (divided by *denom_ptr when MEAN); with WRITE_LOG_PROBS the
    log-softmax (x - m) - log_s. Both in one second pass over C (row stride ``out_sn``)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, ignored, valid, bad, t, w_t = _row_setup(target_ptr, weight_ptr, rows, N, C, ignore_index, HAS_WEIGHT)
    row_base = rows.to(tl.int64) * s_n
    m, log_s, lin, x0, w_total = _online_stats(logits_ptr, weight_ptr, row_base, row_ok, C, s_c,
                                               HAS_WEIGHT, SMOOTH, BLOCK_N, BLOCK_C)
    x_t = tl.load(logits_ptr + row_base + t * s_c, mask=valid, other=0.0).to(tl.float32)
    loss = w_t * ((m - x_t) + log_s)
    if SMOOTH:
        smooth = w_total * ((m - x0) + log_s) - lin  # sum_c w[c] * (lse - x[c])
        loss = (1.0 - eps) * loss + eps / C * smooth
    loss = tl.where(ignored, 0.0, tl.where(bad, float("nan"), loss))
    tl.store(lse_ptr + rows, m + log_s, mask=row_ok)
    tl.store(row_loss_ptr + rows, loss.to(row_loss_ptr.dtype.element_ty), mask=row_ok)
    if COMPUTE_GRAD or WRITE_LOG_PROBS:
        if MEAN and COMPUTE_GRAD:
            scale = tl.full([BLOCK_N], 1.0, tl.float32) / tl.load(denom_ptr)
        else:
            scale = tl.full([BLOCK_N], 1.0, tl.float32)
        _row_outputs_pass(logits_ptr, weight_ptr, grad_ptr, log_probs_ptr, row_base, rows.to(tl.int64) * out_sn,
                          row_ok, ignored, bad, t, w_t, m, log_s, scale, w_total, C, s_c, eps,
                          HAS_WEIGHT, SMOOTH, COMPUTE_GRAD, WRITE_LOG_PROBS, BLOCK_C)


def _bwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {
        "grad_out_ptr": f"*{t}", "go_stride": "i32", "logits_ptr": f"*{t}", "target_ptr": "*i64",
        "weight_ptr": f"*{t}", "lse_ptr": "*fp32", "denom_ptr": "*fp32", "grad_ptr": f"*{t}",
        "N": "i32", "C": "i32", "s_n": "i32", "s_c": "i32", "out_sn": "i32", "ignore_index": "i32",
        "eps": "fp32",
        **dict.fromkeys(("HAS_WEIGHT", "SMOOTH", "HAS_LSE", "MEAN", "BLOCK_N", "BLOCK_C"), "constexpr"),
    }


def _bwd_constexprs(weight, smooth, lse, C=1000):
    return lambda dtype: {"HAS_WEIGHT": weight, "SMOOTH": smooth, "HAS_LSE": lse, "MEAN": True, "go_stride": 0,
                          **_typical(C)}


@tuned_kernel("cross_entropy_bwd", gpu_configs=_ROWS_GPU_CONFIGS, interp_heuristics=_ROWS_INTERP,
              key=["C", "s_c"], signature=_bwd_signature, config_for_dtype=_rows_config_for,
              constexprs=_bwd_constexprs(False, False, True),
              variants={"weighted_smoothed_recompute": _bwd_constexprs(True, True, False),
                        "vocab": _bwd_constexprs(False, False, True, C=32000),
                        "vocab_weighted_smoothed_recompute": _bwd_constexprs(True, True, False, C=32000)})
@triton.jit
def cross_entropy_bwd_kernel(
    grad_out_ptr, go_stride, logits_ptr, target_ptr, weight_ptr, lse_ptr, denom_ptr, grad_ptr,
    N, C, s_n, s_c, out_sn, ignore_index, eps,
    HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, HAS_LSE: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad = d(loss)/d(logits) * grad_out[n * go_stride] (/ *denom_ptr when MEAN), from the logits and
    lse (recomputed first when not HAS_LSE)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, ignored, valid, bad, t, w_t = _row_setup(target_ptr, weight_ptr, rows, N, C, ignore_index, HAS_WEIGHT)
    row_base = rows.to(tl.int64) * s_n
    if HAS_LSE:
        shift = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        log_s = tl.zeros([BLOCK_N], tl.float32)
        w_total = 0.0
        if SMOOTH:
            w_total = _weight_total(weight_ptr, C, HAS_WEIGHT, BLOCK_C)
    else:
        shift, log_s, lin, x0, w_total = _online_stats(logits_ptr, weight_ptr, row_base, row_ok, C, s_c,
                                                       HAS_WEIGHT, SMOOTH, BLOCK_N, BLOCK_C)
    scale = tl.load(grad_out_ptr + rows * go_stride, mask=row_ok, other=0.0).to(tl.float32)
    if MEAN:
        scale = scale / tl.load(denom_ptr)
    _row_outputs_pass(logits_ptr, weight_ptr, grad_ptr, grad_ptr, row_base, rows.to(tl.int64) * out_sn, row_ok,
                      ignored, bad, t, w_t, shift, log_s, scale, w_total, C, s_c, eps,
                      HAS_WEIGHT, SMOOTH, True, False, BLOCK_C)


_REDUCE_GPU_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1)]  # one config: same sum order
_REDUCE_INTERP = {"BLOCK": lambda a: interp_block(a["N"], 16, 1024)}


def _reduce_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {"row_loss_ptr": "*fp32", "target_ptr": "*i64", "weight_ptr": f"*{t}", "denom_ptr": "*fp32",
            "loss_ptr": f"*{t}", "N": "i32", "C": "i32", "ignore_index": "i32",
            **dict.fromkeys(("HAS_WEIGHT", "COUNT", "SUM_LOSS", "MEAN", "BLOCK"), "constexpr")}


def _reduce_constexprs(count, sum_loss, mean):
    return lambda dtype: {"HAS_WEIGHT": True, "COUNT": count, "SUM_LOSS": sum_loss, "MEAN": mean, "C": 1000}


@tuned_kernel("cross_entropy_reduce", gpu_configs=_REDUCE_GPU_CONFIGS, interp_heuristics=_REDUCE_INTERP,
              key=["N"], signature=_reduce_signature, constexprs=_reduce_constexprs(True, True, True),
              variants={"count": _reduce_constexprs(True, False, False)})
@triton.jit
def cross_entropy_reduce_kernel(
    row_loss_ptr, target_ptr, weight_ptr, denom_ptr, loss_ptr, N, C, ignore_index,
    HAS_WEIGHT: tl.constexpr, COUNT: tl.constexpr, SUM_LOSS: tl.constexpr, MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program. COUNT: *denom = sum of w[target] over counted rows. SUM_LOSS: *loss = the rows' sum
    (divided by *denom when MEAN), in ascending row blocks then a tree over the block: a fixed order."""
    offs = tl.arange(0, BLOCK)
    if COUNT:
        acc = tl.zeros([BLOCK], tl.float32)
        for r0 in range(0, N, BLOCK):
            rows = r0 + offs
            row_ok, ignored, valid, bad, t, w_t = _row_setup(target_ptr, weight_ptr, rows, N, C, ignore_index,
                                                             HAS_WEIGHT)
            acc += w_t
        denom = tl.sum(acc, axis=0)
        tl.store(denom_ptr, denom)
    else:
        denom = tl.load(denom_ptr)
    if SUM_LOSS:
        acc = tl.zeros([BLOCK], tl.float32)
        for r0 in range(0, N, BLOCK):
            rows = r0 + offs
            acc += tl.load(row_loss_ptr + rows, mask=rows < N, other=0.0)
        total = tl.sum(acc, axis=0)
        if MEAN:
            total = total / denom
        tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))


# --- launchers --------------------------------------------------------------------------------------


def _rows_grid(N):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)


def cross_entropy_forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                          reduction: int, ignore_index: int, label_smoothing: float, compute_grad: bool,
                          write_log_probs: bool = False):
    """``(loss, lse, total_weight, grad, log_probs)`` for validated ``[N, C]`` logits (any strides) and
    int64 targets.

    ``loss``: ``[N]`` (none) or 0-d, logits' dtype. ``lse``: float32 ``[N]``. ``total_weight``: float32
    0-d, the sum of ``weight[target]`` over non-ignored rows (the mean's divisor). ``grad``: contiguous
    ``[N, C]`` gradient for an upstream gradient of 1 when ``compute_grad``, else an empty ``(0,)``.
    ``log_probs``: contiguous ``[N, C]`` log-softmax of the logits in their dtype when ``write_log_probs``,
    else an empty ``(0,)``; written by the same launch as the loss.
    """
    N, C = logits.shape
    device, dtype = logits.device, logits.dtype
    has_weight = weight is not None
    smooth = label_smoothing > 0.0
    mean = reduction == REDUCTION_MEAN
    lse = empty((N,), dtype=torch.float32, device=device)
    total_weight = empty((), dtype=torch.float32, device=device)
    loss = empty((N,) if reduction == REDUCTION_NONE else (), dtype=dtype, device=device)
    grad = empty((N, C) if compute_grad else (0,), dtype=dtype, device=device)
    log_probs = empty((N, C) if write_log_probs else (0,), dtype=dtype, device=device)
    check_int32_indexing(logits, grad, log_probs)
    w = weight if has_weight else logits  # never read without HAS_WEIGHT
    row_loss = loss if reduction == REDUCTION_NONE else empty((N,), dtype=torch.float32, device=device)

    def reduce(count, sum_loss):
        cross_entropy_reduce_kernel[(1,)](row_loss, target, w, total_weight, loss, N, C, ignore_index,
                                          HAS_WEIGHT=has_weight, COUNT=count, SUM_LOSS=sum_loss, MEAN=mean)

    counted_first = compute_grad and mean  # the gradient pass divides by total_weight: count before it
    if counted_first:
        reduce(True, False)
    if N:
        cross_entropy_fwd_kernel[_rows_grid(N)](
            logits, target, w, lse, row_loss, total_weight, grad if compute_grad else logits,
            log_probs if write_log_probs else logits, N, C, *logits.stride(), C, ignore_index, float(label_smoothing),
            HAS_WEIGHT=has_weight, SMOOTH=smooth, COMPUTE_GRAD=compute_grad, WRITE_LOG_PROBS=write_log_probs,
            MEAN=mean,
        )
    reduce(not counted_first, reduction != REDUCTION_NONE)
    return loss, lse, total_weight, grad, log_probs


def cross_entropy_backward(grad_output: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                           weight: torch.Tensor | None, lse: torch.Tensor | None, total_weight: torch.Tensor,
                           reduction: int, ignore_index: int, label_smoothing: float) -> torch.Tensor:
    """Contiguous ``[N, C]`` gradient of the loss w.r.t. ``logits`` (validated arguments).

    ``logits`` may also be the log-softmax of the logits (its softmax is theirs) with ``lse=None``.
    """
    N, C = logits.shape
    grad = empty((N, C), dtype=logits.dtype, device=logits.device)
    if grad.numel() == 0:
        return grad
    check_int32_indexing(logits, grad)
    denom = total_weight.reshape(()).to(torch.float32)
    has_lse = lse is not None
    go_stride = grad_output.stride(0) if reduction == REDUCTION_NONE else 0
    cross_entropy_bwd_kernel[_rows_grid(N)](
        grad_output, go_stride, logits, target, weight if weight is not None else logits,
        lse if has_lse else denom, denom, grad, N, C, *logits.stride(), C, ignore_index, float(label_smoothing),
        HAS_WEIGHT=weight is not None, SMOOTH=label_smoothing > 0.0, HAS_LSE=has_lse,
        MEAN=reduction == REDUCTION_MEAN,
    )
    return grad


__all__ = ["REDUCTION_MEAN", "REDUCTION_NONE", "REDUCTION_SUM", "cross_entropy_backward", "cross_entropy_forward"]
