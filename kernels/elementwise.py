"""ReLU forward/backward and the bias gradient (a sum over every dim but one, optionally ReLU-masked).

* ``relu(x) = x < 0 ? 0 : x`` (NaN stays NaN, like ``torch.relu``).
* ``relu_backward(g, y) = y <= 0 ? 0 : g``: aten's ``threshold_backward(g, y, 0)``, so a NaN output
  lets the gradient through and a NaN gradient is zeroed where ``y <= 0``.
* ``bias_grad(g, y, dim)[c] = sum over all other dims of relu_backward(g, y)`` (just ``g`` without
  ``y``), accumulated in float32, rounded once to ``g``'s dtype.
* ``add_relu(a, b) = relu(a + b)`` (a residual add and its ReLU in one pass): the sum in float32,
  rounded once (eager rounds the sum, then ReLU commutes with that rounding), NaN kept. Its backward
  is ``relu_backward(g, add_relu(a, b))``, the gradient of both ``a`` and ``b``: no kernel of its own.

Activations (``apply_activation`` / ``activation_grad``, the math written once for every kernel: these
flat kernels and any conv/linear/depthwise epilogue that imports them), each computed in float32 in
the order eager's CPU kernels use, so that NaN and the kinks come out as aten's:

* ``hardtanh(x) = x < lo ? lo : x > hi ? hi : x`` (``relu6 = hardtanh(0, 6)``); grad ``g`` where
  ``lo < x < hi``, 0 elsewhere: 0 *at* both kinks, like ``hardtanh_backward``.
* ``hardswish(x) = x * clamp(x + 3, 0, 6) / 6``; grad ``0`` for ``x <= -3``, ``g`` for ``x >= 3``,
  ``g * (x / 3 + 0.5)`` between: aten's values at -3 (0) and 3 (g).
* ``hardsigmoid(x) = clamp(x + 3, 0, 6) / 6``; grad ``g / 6`` for ``-3 < x < 3``, else 0.
* ``sigmoid(x) = 1 / (1 + exp(-x))``; grad from the *output* y: ``g * (1 - y) * y``.
* ``silu(x) = x / (1 + exp(-x))``; with ``s = sigmoid(x)``, grad ``g * s * (1 + x * (1 - s))``.
* ``gelu(x) = x * 0.5 * (1 + erf(x / sqrt 2))``; grad ``g * (cdf + x * exp(-x^2 / 2) / sqrt(2 pi))``.
* ``gelu_tanh(x) = 0.5 * x * (1 + tanh(u))``, ``u = sqrt(2 / pi) * (x + 0.044715 x^3)``; grad
  ``g * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 x^2))`` with ``t = tanh(u)``.
  tanh is built from ``exp`` (Triton's interpreter has no libdevice).
* ``relu`` too (grad from input or output alike), so an epilogue can take every activation one way.

NaN: every forward gives NaN for NaN. A NaN input's gradient is what eager's vectorized CPU kernels
(every tensor's body; its scalar tail and CUDA differ) give: 0 for hardtanh and hardsigmoid, NaN for
the others. Infinities give the formulas' values (eager's CPU float32 ``gelu(inf)`` is NaN, its
float16 path and CUDA give inf, as here).

ReLU and activation kernels are flat 1-D passes over the storage of dense tensors (any dense layout: contiguous,
channels_last, permuted); the result has the input's strides. Non-dense inputs (slices, expanded
views) are first copied densely (``clone``, which keeps their stride order) - one extra pass.
``add_relu``'s result has the strides eager's ``torch.add`` gives (computed on meta tensors); an
operand laid out otherwise is first copied into those strides.

* ``channel_scale(x, s) = x * s`` for ``x`` [N, C, H, W] and ``s`` [N, C, 1, 1] (squeeze-excitation's
  gate); its backward ``(dx, ds) = (g * s, sum over H, W of g * x)`` reads ``g`` and ``x`` once, ``ds``
  accumulated in float32 and rounded once. Both view their tensors as [N, C, H*W] with strides
  (NCHW and channels_last read in place, anything else through a contiguous copy).

``bias_grad`` views ``g`` as ``[A1, A2, B, C]`` by coalescing the non-reduced dims (B is the
innermost in memory), so NCHW (A1 = N, B = H*W), channels_last (B = N*H*W) and ``(*, N)`` linear
gradients (B = rows) are all read in place with their strides. Up to three reduced groups are
handled in place; anything more fragmented is copied contiguous first. The reduction is split over
``SPLIT`` programs per channel block, each writing a float32 partial sum; a second tiny pass adds the
partials in a fixed order, so the result is deterministic (no atomics).
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
    reduction_split,
    tuned_kernel,
)

_FLAT_GPU_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 8192}, num_warps=8),
]
_FLAT_INTERP = {"BLOCK": lambda a: interp_block(a["numel"], 16, INTERP_TILE)}


def _relu_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "numel": "i32", "BLOCK": "constexpr"}


@tuned_kernel("relu_fwd", gpu_configs=_FLAT_GPU_CONFIGS, interp_heuristics=_FLAT_INTERP, key=["numel"],
              signature=_relu_signature)
@triton.jit
def relu_fwd_kernel(x_ptr, y_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, tl.where(x < 0, 0.0, x).to(y_ptr.dtype.element_ty), mask=mask)


def _relu_bwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {"g_ptr": f"*{t}", "y_ptr": f"*{t}", "dx_ptr": f"*{t}", "numel": "i32", "BLOCK": "constexpr"}


@tuned_kernel("relu_bwd", gpu_configs=_FLAT_GPU_CONFIGS, interp_heuristics=_FLAT_INTERP, key=["numel"],
              signature=_relu_bwd_signature)
@triton.jit
def relu_bwd_kernel(g_ptr, y_ptr, dx_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(dx_ptr + offs, tl.where(y <= 0, 0.0, g).to(dx_ptr.dtype.element_ty), mask=mask)


def _add_relu_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": f"*{t}", "numel": "i32", "BLOCK": "constexpr"}


@tuned_kernel("add_relu_fwd", gpu_configs=_FLAT_GPU_CONFIGS, interp_heuristics=_FLAT_INTERP, key=["numel"],
              signature=_add_relu_signature)
@triton.jit
def add_relu_fwd_kernel(a_ptr, b_ptr, y_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    s = tl.load(a_ptr + offs, mask=mask).to(tl.float32) + tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, tl.where(s < 0, 0.0, s).to(y_ptr.dtype.element_ty), mask=mask)


# --- activations: the math, once --------------------------------------------------------------------
# Kernels elsewhere fuse these into their epilogues: ``from tritonkit.kernels.elementwise import
# apply_activation, activation_grad`` and call ``apply_activation(acc, ACT, min_val, max_val)`` on a float32 tile,
# with ``ACT: tl.constexpr`` one of ACTIVATIONS (min_val/max_val: hardtanh's bounds, fp32 runtime
# arguments or constants; ignored by the others). ``activation_grad(g, saved, ACT, min_val, max_val)``
# is the input gradient from float32 ``g`` and the saved tensor: the input, or for ``ACT`` in
# SAVES_OUTPUT the activation's output (as aten's backward ops take them).
ACTIVATIONS = ("relu", "hardtanh", "hardswish", "hardsigmoid", "silu", "sigmoid", "gelu", "gelu_tanh")
SAVES_OUTPUT = ("sigmoid",)


@triton.jit
def _tanh(z):
    """tanh(z) = sign(z) * (1 - 2 / (exp(2|z|) + 1)); NaN stays NaN, +-inf give +-1."""
    a = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(z)) + 1.0)
    return tl.where(z < 0, -a, a)


@triton.jit
def _clamp06(t):
    """clamp(t, 0, 6) with NaN kept (comparisons with NaN are false)."""
    return tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t))


@triton.jit
def apply_activation(x, ACT: tl.constexpr, min_val, max_val):
    """``ACT(x)`` of a float32 tile (formulas in the module docstring)."""
    if ACT == "relu":
        y = tl.where(x < 0.0, 0.0, x)
    elif ACT == "hardtanh":
        y = tl.where(x < min_val, min_val, tl.where(x > max_val, max_val, x))
    elif ACT == "hardswish":
        y = x * _clamp06(x + 3.0) / 6.0
    elif ACT == "hardsigmoid":
        y = _clamp06(x + 3.0) / 6.0
    elif ACT == "silu":
        y = x / (1.0 + tl.exp(-x))
    elif ACT == "sigmoid":
        y = 1.0 / (1.0 + tl.exp(-x))
    elif ACT == "gelu":
        y = x * 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))  # 1 / sqrt(2)
    else:
        tl.static_assert(ACT == "gelu_tanh", "unknown activation")
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x))))  # sqrt(2 / pi)
    return y


@triton.jit
def activation_grad(g, s, ACT: tl.constexpr, min_val, max_val):
    """The input gradient of ``ACT`` from float32 ``g`` and the saved float32 ``s`` (the input; the
    output for SAVES_OUTPUT), as aten's ``<act>_backward`` computes it (module docstring)."""
    if ACT == "relu":
        dx = tl.where(s <= 0.0, 0.0, g)
    elif ACT == "hardtanh":
        dx = tl.where((s > min_val) & (s < max_val), g, 0.0)
    elif ACT == "hardswish":
        dx = tl.where(s <= -3.0, 0.0, tl.where(s >= 3.0, g, g * (s / 3.0 + 0.5)))
    elif ACT == "hardsigmoid":
        dx = tl.where((s > -3.0) & (s < 3.0), g * 0.16666666666666666, 0.0)
    elif ACT == "silu":
        sig = 1.0 / (1.0 + tl.exp(-s))
        dx = g * sig * (1.0 + s * (1.0 - sig))
    elif ACT == "sigmoid":
        dx = g * (1.0 - s) * s
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(s * 0.7071067811865476))
        pdf = tl.exp(s * s * -0.5) * 0.3989422804014327  # 1 / sqrt(2 pi)
        dx = g * (cdf + s * pdf)
    else:
        tl.static_assert(ACT == "gelu_tanh", "unknown activation")
        s_sq = s * s
        t = _tanh(0.7978845608028654 * (s + 0.044715 * (s_sq * s)))
        right_derivative = 0.5 * s * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 3.0 * 0.044715 * s_sq))
        dx = g * (0.5 * (1.0 + t) + right_derivative)
    return dx


def _activation_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "numel": "i32", "min_val": "fp32", "max_val": "fp32",
            "ACT": "constexpr", "BLOCK": "constexpr"}


# 8192-element tiles spill on sm_90 (float16 sigmoid backward: 8 B of stack at 80 registers); 4096
# elements per 8 warps already keep 16 loads in flight per thread.
_ACT_GPU_CONFIGS = [c for c in _FLAT_GPU_CONFIGS if c.kwargs["BLOCK"] <= 4096]
# One pattern per activation these kernels launch (ReLU has its own kernels): activation_fwd / _bwd is
# hardtanh, activation_fwd_<kind> / activation_bwd_<kind> the others.
_ACT_VARIANTS = {kind: (lambda dtype, kind=kind: {"ACT": kind})
                 for kind in ACTIVATIONS if kind not in ("relu", "hardtanh")}


@tuned_kernel("activation_fwd", gpu_configs=_ACT_GPU_CONFIGS, interp_heuristics=_FLAT_INTERP,
              key=["numel", "ACT"], signature=_activation_signature, constexprs=lambda dtype: {"ACT": "hardtanh"},
              variants=_ACT_VARIANTS)
@triton.jit
def activation_fwd_kernel(x_ptr, y_ptr, numel, min_val, max_val, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, apply_activation(x, ACT, min_val, max_val).to(y_ptr.dtype.element_ty), mask=mask)


def _activation_bwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {"g_ptr": f"*{t}", "s_ptr": f"*{t}", "dx_ptr": f"*{t}", "numel": "i32", "min_val": "fp32",
            "max_val": "fp32", "ACT": "constexpr", "BLOCK": "constexpr"}


@tuned_kernel("activation_bwd", gpu_configs=_ACT_GPU_CONFIGS, interp_heuristics=_FLAT_INTERP,
              key=["numel", "ACT"], signature=_activation_bwd_signature,
              constexprs=lambda dtype: {"ACT": "hardtanh"}, variants=_ACT_VARIANTS)
@triton.jit
def activation_bwd_kernel(g_ptr, s_ptr, dx_ptr, numel, min_val, max_val, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
    dx = activation_grad(g, s, ACT, min_val, max_val)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# channel_scale: x [N, C, H, W] times s [N, C, 1, 1] (a squeeze-excitation gate) over the [N, C, H*W]
# view. NCHW (H*W contiguous) wants long HW tiles, channels_last (C contiguous) wide C tiles; the key
# carries the HW stride so each layout tunes apart. The forward's 64x32 tile spills on sm_80 (half: 8 B
# of stack); the backward keeps three [C, HW] tiles live, so its wide-C tiles get 8 warps.
_SCALE_GPU_CONFIGS = [
    triton.Config({"BLOCK_C": 1, "BLOCK_HW": 1024}, num_warps=4),
    triton.Config({"BLOCK_C": 4, "BLOCK_HW": 256}, num_warps=4),
    triton.Config({"BLOCK_C": 16, "BLOCK_HW": 64}, num_warps=4),
    triton.Config({"BLOCK_C": 128, "BLOCK_HW": 16}, num_warps=4),
]
_SCALE_BWD_GPU_CONFIGS = [
    *_SCALE_GPU_CONFIGS[:3],
    triton.Config({"BLOCK_C": 64, "BLOCK_HW": 32}, num_warps=8),
    triton.Config({"BLOCK_C": 128, "BLOCK_HW": 16}, num_warps=8),
]
_SCALE_INTERP = {
    "BLOCK_C": lambda a: interp_block(a["C"], 1, 1024),
    "BLOCK_HW": lambda a: interp_block(a["HW"], 1, INTERP_TILE // interp_block(a["C"], 1, 1024)),
}
_SCALE_STRIDES = ("x_sn", "x_sc", "x_shw", "s_sn", "s_sc", "y_sn", "y_sc", "y_shw")


def _channel_scale_signature(dtype):
    t = TRITON_TYPE[dtype]
    return {"x_ptr": f"*{t}", "s_ptr": f"*{t}", "y_ptr": f"*{t}", "C": "i32", "HW": "i32",
            **{k: "i32" for k in _SCALE_STRIDES}, "BLOCK_C": "constexpr", "BLOCK_HW": "constexpr"}


@tuned_kernel("channel_scale_fwd", gpu_configs=_SCALE_GPU_CONFIGS, interp_heuristics=_SCALE_INTERP,
              key=["C", "HW", "x_shw"], signature=_channel_scale_signature)
@triton.jit
def channel_scale_fwd_kernel(x_ptr, s_ptr, y_ptr, C, HW, x_sn, x_sc, x_shw, s_sn, s_sc, y_sn, y_sc, y_shw,
                             BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """y[n, c, p] = x[n, c, p] * s[n, c]; program (n * C-blocks + c-block, p-block)."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0) // c_blocks
    c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    m = (c < C)[:, None] & (p < HW)[None, :]
    scale = tl.load(s_ptr + n * s_sn + c * s_sc, mask=c < C).to(tl.float32)
    x = tl.load(x_ptr + n * x_sn + c[:, None] * x_sc + p[None, :] * x_shw, mask=m).to(tl.float32)
    tl.store(y_ptr + n * y_sn + c[:, None] * y_sc + p[None, :] * y_shw, (x * scale[:, None]).to(y_ptr.dtype.element_ty),
             mask=m)


def _channel_scale_bwd_signature(dtype):
    t = TRITON_TYPE[dtype]
    strides = ("g_sn", "g_sc", "g_shw", "x_sn", "x_sc", "x_shw", "s_sn", "s_sc", "dx_sn", "dx_sc", "dx_shw")
    return {"g_ptr": f"*{t}", "x_ptr": f"*{t}", "s_ptr": f"*{t}", "dx_ptr": f"*{t}", "ds_ptr": f"*{t}", "C": "i32",
            "HW": "i32", **{k: "i32" for k in strides}, "BLOCK_C": "constexpr", "BLOCK_HW": "constexpr"}


@tuned_kernel("channel_scale_bwd", gpu_configs=_SCALE_BWD_GPU_CONFIGS, interp_heuristics=_SCALE_INTERP,
              key=["C", "HW", "g_shw", "x_shw"], signature=_channel_scale_bwd_signature)
@triton.jit
def channel_scale_bwd_kernel(g_ptr, x_ptr, s_ptr, dx_ptr, ds_ptr, C, HW,
                             g_sn, g_sc, g_shw, x_sn, x_sc, x_shw, s_sn, s_sc, dx_sn, dx_sc, dx_shw,
                             BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """dx[n, c, p] = g * s[n, c] and ds[n, c] = sum over p of g * x (float32, ascending p-blocks, rounded
    once; ds contiguous [N, C]) in one pass over g and x; program n * C-blocks + c-block."""
    c_blocks = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0) // c_blocks
    c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    scale = tl.load(s_ptr + n * s_sn + c * s_sc, mask=c < C).to(tl.float32)
    acc = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
    for p0 in range(0, HW, BLOCK_HW):
        p = p0 + tl.arange(0, BLOCK_HW)
        m = (c < C)[:, None] & (p < HW)[None, :]
        g = tl.load(g_ptr + n * g_sn + c[:, None] * g_sc + p[None, :] * g_shw, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + n * x_sn + c[:, None] * x_sc + p[None, :] * x_shw, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + n * dx_sn + c[:, None] * dx_sc + p[None, :] * dx_shw,
                 (g * scale[:, None]).to(dx_ptr.dtype.element_ty), mask=m)
        acc += g * x
    tl.store(ds_ptr + n * C + c, tl.sum(acc, axis=1).to(ds_ptr.dtype.element_ty), mask=c < C)


# bias_grad partial sums. Channel-contiguous layouts (channels_last, linear) want wide C tiles,
# NCHW (B contiguous) wants long B tiles; the key carries both strides so each layout tunes apart.
_BIAS_GPU_CONFIGS = [
    triton.Config({"BLOCK_B": 256, "BLOCK_C": 4}, num_warps=4),
    triton.Config({"BLOCK_B": 128, "BLOCK_C": 8}, num_warps=4),
    triton.Config({"BLOCK_B": 512, "BLOCK_C": 2}, num_warps=8),
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 32}, num_warps=4),
    triton.Config({"BLOCK_B": 32, "BLOCK_C": 64}, num_warps=4),
    triton.Config({"BLOCK_B": 16, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_B": 64, "BLOCK_C": 128}, num_warps=8),
]
_BIAS_INTERP = {
    "BLOCK_C": lambda a: interp_block(a["C"], 1, 1024),
    "BLOCK_B": lambda a: interp_block(a["B"], 1, INTERP_TILE // a["BLOCK_C"]),
}


def _bias_partial_signature(dtype):
    t = TRITON_TYPE[dtype]
    ints = ["C", "A1", "A2", "B", "g_sa1", "g_sa2", "g_sb", "g_sc", "r_sa1", "r_sa2", "r_sb", "r_sc",
            "HAS_MASK", "SPLIT"]
    return {"g_ptr": f"*{t}", "r_ptr": f"*{t}", "part_ptr": "*fp32", **{k: "i32" for k in ints},
            "BLOCK_B": "constexpr", "BLOCK_C": "constexpr"}


@tuned_kernel("bias_grad_partial", gpu_configs=_BIAS_GPU_CONFIGS, interp_heuristics=_BIAS_INTERP,
              key=["C", "A1", "A2", "B", "g_sb", "g_sc", "SPLIT"], signature=_bias_partial_signature)
@triton.jit
def bias_grad_partial_kernel(
    g_ptr, r_ptr, part_ptr,
    C, A1, A2, B,
    g_sa1, g_sa2, g_sb, g_sc,
    r_sa1, r_sa2, r_sb, r_sc,
    HAS_MASK,  # 1: zero g where r <= 0 (r is the ReLU output); 0: r_ptr is unused
    SPLIT,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """part[s, c] = sum of g[a1, a2, b, c] over the s-th of SPLIT equal runs of (a1, a2, b-block) tiles."""
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    b_blocks = tl.cdiv(B, BLOCK_B)
    tiles = A1 * A2 * b_blocks
    t_lo = (split.to(tl.int64) * tiles // SPLIT).to(tl.int32)
    t_hi = ((split.to(tl.int64) + 1) * tiles // SPLIT).to(tl.int32)
    B_r = B * HAS_MASK  # rows of r to read: all of them, or none (a vector mask, not scalar & vector)
    acc = tl.zeros([BLOCK_B, BLOCK_C], tl.float32)
    for t in range(t_lo, t_hi):
        a = t // b_blocks
        b = (t - a * b_blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
        a1 = a // A2
        a2 = a - a1 * A2
        m = (b < B)[:, None] & c_ok[None, :]
        g = tl.load(g_ptr + (a1 * g_sa1 + a2 * g_sa2) + b[:, None] * g_sb + c[None, :] * g_sc, mask=m,
                    other=0.0)
        r = tl.load(r_ptr + (a1 * r_sa1 + a2 * r_sa2) + b[:, None] * r_sb + c[None, :] * r_sc,
                    mask=(b < B_r)[:, None] & c_ok[None, :], other=1.0)
        acc += tl.where(r.to(tl.float32) <= 0, 0.0, g.to(tl.float32))
    tl.store(part_ptr + split * C + c, tl.sum(acc, axis=0), mask=c_ok)


_FINISH_GPU_CONFIGS = [
    triton.Config({"BLOCK_S": 16, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"BLOCK_S": 64, "BLOCK_C": 64}, num_warps=4),
]
_FINISH_INTERP = {
    "BLOCK_C": lambda a: interp_block(a["C"], 1, 4096),
    "BLOCK_S": lambda a: interp_block(a["SPLIT"], 1, 256),
}


def _bias_finish_signature(dtype):
    return {"part_ptr": "*fp32", "out_ptr": f"*{TRITON_TYPE[dtype]}", "C": "i32", "SPLIT": "i32",
            "BLOCK_S": "constexpr", "BLOCK_C": "constexpr"}


@tuned_kernel("bias_grad_finish", gpu_configs=_FINISH_GPU_CONFIGS, interp_heuristics=_FINISH_INTERP,
              key=["C", "SPLIT"], signature=_bias_finish_signature)
@triton.jit
def bias_grad_finish_kernel(part_ptr, out_ptr, C, SPLIT, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = sum over s of part[s, c], in ascending s, rounded once to out's dtype."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = (s < SPLIT)[:, None] & c_ok[None, :]
        acc += tl.load(part_ptr + s[:, None] * C + c[None, :], mask=m, other=0.0)
    tl.store(out_ptr + c, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=c_ok)


# --- launchers --------------------------------------------------------------------------------------


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements tile one gap-free block of memory (some permutation of contiguous)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when dense; else a dense copy in its stride order (``clone`` keeps that order)."""
    return t if t.numel() == 0 or _is_dense(t) else t.clone()


def relu(x: torch.Tensor) -> torch.Tensor:
    """``max(x, 0)`` with NaN kept; the result has ``x``'s strides when ``x`` is dense."""
    x = _dense(x)
    y = empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if x.numel():
        check_int32_indexing(x)
        relu_fwd_kernel[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](x, y, x.numel())
    return y


def relu_backward(grad_output: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``threshold_backward(grad_output, output, 0)``; the result has ``grad_output``'s dense layout."""
    g = _dense(grad_output)
    y = output if output.stride() == g.stride() else torch.empty_like(g).copy_(output)
    dx = empty_strided(g.shape, g.stride(), dtype=g.dtype, device=g.device)
    if g.numel():
        check_int32_indexing(g)
        relu_bwd_kernel[lambda meta: (triton.cdiv(g.numel(), meta["BLOCK"]),)](g, y, dx, g.numel())
    return dx


def activation(x: torch.Tensor, kind: str, min_val: float = -1.0, max_val: float = 1.0) -> torch.Tensor:
    """``kind(x)`` (one of ACTIVATIONS but relu; min_val/max_val: hardtanh's bounds), in ``x``'s dense layout."""
    x = _dense(x)
    y = empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if x.numel():
        check_int32_indexing(x)
        activation_fwd_kernel[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](
            x, y, x.numel(), float(min_val), float(max_val), ACT=kind)
    return y


def activation_backward(grad_output: torch.Tensor, saved: torch.Tensor, kind: str, min_val: float = -1.0,
                        max_val: float = 1.0) -> torch.Tensor:
    """aten's ``<kind>_backward(grad_output, saved)``; the result has ``grad_output``'s dense layout."""
    g = _dense(grad_output)
    s = saved if saved.stride() == g.stride() else torch.empty_like(g).copy_(saved)
    dx = empty_strided(g.shape, g.stride(), dtype=g.dtype, device=g.device)
    if g.numel():
        check_int32_indexing(g)
        activation_bwd_kernel[lambda meta: (triton.cdiv(g.numel(), meta["BLOCK"]),)](
            g, s, dx, g.numel(), float(min_val), float(max_val), ACT=kind)
    return dx


def add_output_strides(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """The strides eager's ``torch.add(a, b)`` gives its result (same shapes), from meta tensors."""
    def meta(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    return torch.add(meta(a), meta(b)).stride()


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(a + b)`` for same-shape, same-dtype ``a`` and ``b``, laid out as ``torch.add(a, b)``."""
    stride = add_output_strides(a, b)
    y = empty_strided(a.shape, stride, dtype=a.dtype, device=a.device)
    if y.numel() == 0:
        return y
    def in_place(t):  # same memory order as y (strides of size-1 dims do not matter)
        return all(st == ys for size, st, ys in zip(t.shape, t.stride(), stride) if size != 1)

    a, b = (t if in_place(t) else torch.empty_like(y).copy_(t) for t in (a, b))
    check_int32_indexing(y)
    add_relu_fwd_kernel[lambda meta: (triton.cdiv(y.numel(), meta["BLOCK"]),)](a, b, y, y.numel())
    return y


def _nc_hw(t: torch.Tensor) -> tuple[int, int, int]:
    """``(n, c, hw)`` strides of a 4-D tensor viewed as [N, C, H*W] (H and W must merge: NCHW, NHWC)."""
    return t.stride(0), t.stride(1), t.stride(3)


def _merges_hw(t: torch.Tensor) -> bool:
    return t.shape[2] == 1 or t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _hw_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its H and W merge into one strided dim and it is dense, else a contiguous copy."""
    return t if _merges_hw(t) and _dense(t) is t else t.contiguous()


def _as_empty_like(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y``, or a copy of it in the strides ``torch.empty_like(like)`` gives (the kernel wrote a copy's
    layout: a dense order whose H and W do not merge)."""
    stride = torch.empty_like(like, device="meta").stride()
    if y.stride() == stride or y.numel() == 0:
        return y
    return torch.empty_strided(y.shape, stride, dtype=y.dtype, device=y.device).copy_(y)


def channel_scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x * s`` for ``x`` [N, C, H, W] and ``s`` [N, C, 1, 1]; the result is laid out as
    ``torch.empty_like(x)``."""
    like, x = x, _hw_view(x)
    N, C, H, W = x.shape
    y = empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if y.numel():
        check_int32_indexing(x)
        grid = lambda meta: (N * triton.cdiv(C, meta["BLOCK_C"]), triton.cdiv(H * W, meta["BLOCK_HW"]))  # noqa: E731
        channel_scale_fwd_kernel[grid](x, s, y, C, H * W, *_nc_hw(x), s.stride(0), s.stride(1), *_nc_hw(y))
    return _as_empty_like(y, like)


def channel_scale_backward(grad_output: torch.Tensor, x: torch.Tensor, s: torch.Tensor):
    """``(g * s, sum of g * x over H, W)``: the first laid out as ``torch.empty_like(grad_output)``, the
    second of ``s``'s shape [N, C, 1, 1], contiguous."""
    g, x = _hw_view(grad_output), _hw_view(x)
    N, C, H, W = g.shape
    dx = empty_strided(g.shape, g.stride(), dtype=g.dtype, device=g.device)
    ds = empty(s.shape, dtype=g.dtype, device=g.device)
    if ds.numel() == 0:
        return dx, ds
    if dx.numel() == 0:
        return dx, ds.zero_()
    check_int32_indexing(g, x)
    channel_scale_bwd_kernel[lambda meta: (N * triton.cdiv(C, meta["BLOCK_C"]),)](
        g, x, s, dx, ds, C, H * W, *_nc_hw(g), *_nc_hw(x), s.stride(0), s.stride(1), *_nc_hw(dx))
    return _as_empty_like(dx, grad_output), ds


def _reduced_groups(g: torch.Tensor, r: torch.Tensor | None, dim: int):
    """The dims other than ``dim`` coalesced into at most 3 groups ``[size, g_stride, r_stride]``,
    outermost first (padded with size-1 groups), or None when they do not coalesce that far."""
    r_stride = r.stride() if r is not None else g.stride()
    dims = sorted((d for d in range(g.ndim) if d != dim and g.shape[d] != 1), key=g.stride, reverse=True)
    groups: list[list[int]] = []
    for d in dims:
        size, gs, rs = g.shape[d], g.stride(d), r_stride[d]
        if groups and groups[-1][1] == size * gs and groups[-1][2] == size * rs:
            groups[-1] = [groups[-1][0] * size, gs, rs]
        else:
            groups.append([size, gs, rs])
    if len(groups) > 3:
        return None
    return [[1, 0, 0]] * (3 - len(groups)) + groups


def bias_grad(grad_output: torch.Tensor, relu_output: torch.Tensor | None, dim: int,
              split: int | None = None) -> torch.Tensor:
    """``sum`` of ``grad_output`` (masked where ``relu_output <= 0``) over every dim but ``dim``.

    ``split`` overrides how many partial sums each channel block is cut into (tests use it).
    """
    g, r = grad_output, relu_output
    dim = dim % g.ndim
    C = g.shape[dim]
    out = empty((C,), dtype=g.dtype, device=g.device)
    if C == 0:
        return out
    if g.numel() == 0:
        return out.zero_()
    groups = _reduced_groups(g, r, dim)
    if groups is None:  # more than three non-mergeable reduced groups: read a contiguous copy
        g, r = g.contiguous(), (r.contiguous() if r is not None else None)
        groups = _reduced_groups(g, r, dim)
    check_int32_indexing(g, r)
    (A1, g_sa1, r_sa1), (A2, g_sa2, r_sa2), (B, g_sb, r_sb) = groups
    g_sc = g.stride(dim)
    r_sc = r.stride(dim) if r is not None else g_sc
    split = split or reduction_split(C, A1 * A2 * B, g.device, 512)
    direct = split == 1 and g.dtype == torch.float32
    part = out if direct else empty((split, C), dtype=torch.float32, device=g.device)
    bias_grad_partial_kernel[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]), split)](
        g, r if r is not None else g, part, C, A1, A2, B, g_sa1, g_sa2, g_sb, g_sc, r_sa1, r_sa2, r_sb, r_sc,
        int(r is not None), split,
    )
    if not direct:
        bias_grad_finish_kernel[lambda meta: (triton.cdiv(C, meta["BLOCK_C"]),)](part, out, C, split)
    return out


# --- the training BatchNorm input prologue: what conv and pool kernels apply to an input as they load it -----


@triton.jit
def prologue_coefficients(in_mean_ptr, in_rstd_ptr, in_w_ptr, in_b_ptr, channel, c_ok):
    """(mean, k, beta) per input channel ``channel`` (1-D) of the input prologue x' = (x - mean) * k + beta,
    k = invstd * weight: a training BatchNorm's apply, in float32 (``kernels.norm._batch_norm_apply``'s
    arithmetic, so a recomputed x' equals the stored one bit for bit)."""
    mean = tl.load(in_mean_ptr + channel, mask=c_ok, other=0.0).to(tl.float32)
    k = tl.load(in_rstd_ptr + channel, mask=c_ok, other=0.0).to(tl.float32)
    k = k * tl.load(in_w_ptr + channel, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(in_b_ptr + channel, mask=c_ok, other=0.0).to(tl.float32)
    return mean, k, beta


@triton.jit
def apply_prologue(a, mask, mean, k, beta, PROLOGUE: tl.constexpr):
    """x as a conv or pool reads it: (x - mean[c]) * k[c] + beta[c] for the tile's columns c (float32), then
    ReLU when PROLOGUE == 2; padding and tails (``mask`` false) stay 0, so a padding tap contributes
    nothing. Rounded back to x's dtype for the dot, as the normalised activation would be stored."""
    v = (a.to(tl.float32) - mean[None, :]) * k[None, :]
    v += beta[None, :]
    if PROLOGUE == 2:
        v = tl.where(v < 0, 0.0, v)
    return tl.where(mask, v, 0.0).to(a.dtype)


@triton.jit
def grad_through_prologue(acc, x, mask, mean, k, beta, out_dtype: tl.constexpr, PROLOGUE: tl.constexpr):
    """The float32 gradient ``acc`` of a tile that was read through the input prologue (loaded ``x``),
    rounded to ``out_dtype`` as it is stored and taken on to the BatchNorm's output: zeroed where the
    recomputed BN output is <= 0 when PROLOGUE == 2 (threshold_backward of the ReLU; NaN passes the
    gradient), and outside ``mask``. Returns ``(g, g * (x - mean))``, the terms of the BatchNorm backward's
    two reductions."""
    g = acc.to(out_dtype).to(tl.float32)
    if PROLOGUE == 2:
        g = tl.where(apply_prologue(x, mask, mean, k, beta, 1).to(tl.float32) <= 0, 0.0, g)
    g = tl.where(mask, g, 0.0)
    return g, g * (x.to(tl.float32) - mean[None, :])


def prologue_args(x, input_norm, input_relu) -> tuple[tuple, int]:
    """``(the four prologue pointers, PROLOGUE)`` for ``input_norm`` = (mean, invstd, weight, bias) per input
    channel of ``x`` (weight/bias None: 1 and 0), or None (no prologue: ``x`` stands for the pointers)."""
    if input_norm is None:
        return (x,) * 4, 0
    mean, invstd, weight, bias = input_norm
    C = x.shape[1]
    weight = torch.ones(C, dtype=torch.float32, device=x.device) if weight is None else weight
    bias = torch.zeros(C, dtype=torch.float32, device=x.device) if bias is None else bias
    return tuple(v.reshape(-1).contiguous() for v in (mean, invstd, weight, bias)), 2 if input_relu else 1


__all__ = ["ACTIVATIONS", "SAVES_OUTPUT", "activation", "activation_backward", "activation_grad", "add_output_strides",
           "add_relu", "apply_activation", "apply_prologue", "bias_grad", "channel_scale", "channel_scale_backward",
           "grad_through_prologue", "prologue_args", "prologue_coefficients", "relu", "relu_backward"]
