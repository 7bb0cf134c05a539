"""``tritonkit bench``: tritonkit's kernels against eager PyTorch and torch.compile's default backend.

Families (``--family``), each timed forward and backward (optimizers: one step):

  conv    fused conv2d(+bias)+ReLU: ResNet-50 layers (NHWC, bfloat16, batch 32), the seed's LeNet (batch 256)
  linear  transformer-sized GEMMs (bfloat16; plain, fused bias+ReLU, transposed operand layouts), LeNet's fc
  pool    max-pool: ResNet-50 stem (3x3/2 pad 1, NHWC bfloat16), LeNet's 2x2 pools
  relu    standalone ReLU
  bn      ResNet-50 conv+BatchNorm+ReLU layers in train mode (NHWC bfloat16, batch 64) as one
          nn.Sequential: eager, inductor and the tritonkit backend (torch.compile) each run it
  optim   SGD (momentum), Adam, AdamW, RMSprop, Adagrad over 100M and 10M float32 parameters
  e2e     one LeNet training step, batch 256: eager, inductor, tritonkit backend, tritonkit.nn;
          one ResNet-18 (batch 128) and ResNet-50 (batch 64) training step on 224x224 NHWC bfloat16
          images: eager, inductor, tritonkit backend

Competitors (``--competitors``): ``eager`` (cuDNN / cuBLAS / aten; torch's fused=True optimizers where
torch has them, else foreach) and ``inductor`` (``torch.compile``; for optimizers the step is compiled).

Each row: median time (``triton.testing.do_bench``, CUDA events, L2 flushed between runs), achieved
GB/s and TFLOP/s over the row's floor bytes and FLOPs, percent of the roofline floor (those bytes
and FLOPs over the copy bandwidth and matmul rate measured at the start of the same run), and the
speedup of tritonkit over each competitor. Before timing, each tritonkit result is checked once
against eager PyTorch (float32 reference, TF32 off, outputs NaN-poisoned) with tritonkit.testing's
tolerances; BatchNorm rows (``bn``, the ResNet steps) instead against a copy of the module in a wider
dtype (float32 for bfloat16 rows, float64 for float32 ones), where tritonkit's relative error must stay
within ``BN_ERROR_FACTOR`` times eager's own. Without a GPU only ``--quick`` runs: tiny shapes in
Triton's interpreter, timed with ``time.perf_counter``, which checks that every benchmark works; its
times are not GPU figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import tritonkit
from tritonkit.runtime import INTERPRET, default_device

FAMILIES = ("conv", "linear", "pool", "relu", "bn", "dw", "optim", "e2e")
COMPETITORS = ("eager", "inductor")
# Share of --budget-s each family may use (time a family leaves unused passes to the next ones).
BUDGET_WEIGHTS = {"conv": 0.18, "linear": 0.14, "pool": 0.05, "relu": 0.04, "bn": 0.09, "dw": 0.06, "optim": 0.19,
                  "e2e": 0.25}
CPU_NOTE = ("NOTE: no GPU - these are Triton-interpreter / CPU times, NOT GPU figures; "
            "this run only checks that every benchmark works end to end.")
bf16, fp16, fp32, fp64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
MB = 1e6


# ============================================================================================ results
@dataclass
class Result:
    """One timed row: ``subject`` (a tritonkit path) and its competitors on one case and direction."""

    family: str
    case: str
    direction: str  # "fwd", "bwd" or "step"
    dtype: str
    shape: str
    flops: float | None = None
    bytes: float | None = None
    peak_key: str | None = None  # which measured matmul rate bounds this row
    subject: str = "tritonkit"
    times_ms: dict = field(default_factory=dict)  # impl -> median ms
    impl_notes: dict = field(default_factory=dict)  # impl -> what ran (cuDNN, fused, foreach, compile seconds...)
    check: bool | None = None
    check_error: str = ""
    error: str = ""


class Stop(BaseException):
    """SIGTERM: stop timing, write what was measured. A BaseException, so that no ``except Exception``
    (ours, or Triton's interpreter wrapping errors raised inside a kernel) swallows it."""


@contextlib.contextmanager
def exact_float32():
    """TF32 off (the tolerances in tritonkit.testing assume it), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) < 400 else text[:400] + "..."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ============================================================================================= timing
class Timer:
    """Median milliseconds of ``fn()``: CUDA events via do_bench on a GPU, perf_counter on the CPU."""

    def __init__(self, gpu: bool, quick: bool):
        self.gpu = gpu
        self.warmup, self.rep = (5, 20) if quick else (10, 60)  # do_bench milliseconds
        self.cpu_budget_s, self.cpu_max_reps = (0.25, 5) if quick else (2.0, 20)

    def __call__(self, fn: Callable) -> float:
        if self.gpu:
            import triton.testing

            fn()
            torch.cuda.synchronize()
            return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median"))
        times, start = [], time.perf_counter()
        while True:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if len(times) >= self.cpu_max_reps or time.perf_counter() - start > self.cpu_budget_s:
                break
        return 1e3 * statistics.median(times[1:] if len(times) > 2 else times)


class Peaks:
    """Copy bandwidth and matmul rates, measured in this run (lazily, once per matmul kind)."""

    def __init__(self, timer: Timer, device: torch.device, quick: bool):
        self.timer, self.device, self.quick = timer, device, quick
        self.copy_gbps: float | None = None
        self.matmul_tflops: dict[str, float] = {}

    def measure_copy(self) -> float:
        n = (2**24 if self.quick else 2**28) if self.timer.gpu else 2**22  # float32 elements
        src = torch.randn(n, device=self.device)
        dst = torch.empty_like(src)
        ms = self.timer(lambda: dst.copy_(src))
        self.copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
        return self.copy_gbps

    def matmul(self, key: str) -> float:
        """``key``: "bfloat16", "float16", "float32" or "float32+tf32"."""
        if key not in self.matmul_tflops:
            dtype = getattr(torch, key.split("+")[0])
            n = (4096 if self.quick else 8192) if self.timer.gpu else 256
            a, b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
            saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = key.endswith("+tf32")
            try:
                ms = self.timer(lambda: torch.mm(a, b))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = saved
            self.matmul_tflops[key] = 2 * n**3 / (ms * 1e-3) / 1e12
        return self.matmul_tflops[key]

    def floor_ms(self, r: Result) -> float | None:
        terms = []
        if r.bytes and self.copy_gbps:
            terms.append(r.bytes / (self.copy_gbps * 1e9) * 1e3)
        if r.flops and r.peak_key in self.matmul_tflops:
            terms.append(r.flops / (self.matmul_tflops[r.peak_key] * 1e12) * 1e3)
        return max(terms) if terms else None


def matmul_key(dtype: torch.dtype, tf32: bool) -> str:
    """Which measured matmul rate bounds a GEMM of ``dtype`` (TF32 exists only on a GPU)."""
    return _dtype_name(dtype) + ("+tf32" if dtype == fp32 and tf32 and not INTERPRET else "")


# ============================================================================== op benchmarks (fwd/bwd)
@dataclass
class OpCase:
    """One op at one shape. ``make()`` returns the leaves (those needing grad have requires_grad set);
    ``tk`` and ``torch_fn`` map them to one output tensor."""

    family: str
    name: str
    dtype: torch.dtype
    shape: str
    make: Callable[[], list]
    tk: Callable
    torch_fn: Callable
    flops: tuple = (None, None)  # forward, backward
    bytes: tuple = (None, None)
    peak_key: str | None = None
    eager_note: str = ""


def _randn(*shape, dtype, device, scale=1.0, channels_last=False, requires_grad=False):
    t = torch.randn(*shape, device=device, dtype=fp32).mul_(scale).to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(requires_grad)


def _conv_out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


def conv_case(name, n, c, hw, oc, k, stride, pad, dtype, *, nhwc, bias, relu=True, input_grad=True):
    import tritonkit.functional as TF

    device = default_device()
    oh = _conv_out(hw, k, stride, pad)
    es = torch.tensor([], dtype=dtype).element_size()
    x_n, w_n, y_n = n * c * hw * hw, oc * c * k * k, n * oc * oh * oh
    gemm = 2.0 * y_n * c * k * k
    fwd_bytes = es * (x_n + w_n + (oc if bias else 0) + y_n)
    bwd_bytes = es * (y_n * (2 if relu else 1) + x_n + w_n + (x_n if input_grad else 0) + w_n + (oc if bias else 0))

    def make():
        return [_randn(n, c, hw, hw, dtype=dtype, device=device, channels_last=nhwc, requires_grad=input_grad),
                _randn(oc, c, k, k, dtype=dtype, device=device, scale=(c * k * k) ** -0.5, channels_last=nhwc,
                       requires_grad=True),
                _randn(oc, dtype=dtype, device=device, scale=0.1, requires_grad=True) if bias else None]

    def eager(x, w, b):
        y = F.conv2d(x, w, b, stride, pad)
        return F.relu(y) if relu else y

    def tk(x, w, b):
        return TF.conv2d(x, w, b, stride, pad, activation="relu" if relu else None)

    layout = "NHWC" if nhwc else "NCHW"
    shape = f"x[{n},{c},{hw},{hw}] {layout} w[{oc},{c},{k},{k}] s{stride} p{pad}{' +bias' if bias else ''}" \
            f"{' +relu' if relu else ''}{'' if input_grad else ' (no dx)'}"
    return OpCase("conv", name, dtype, shape, make, tk, eager, (gemm, gemm * (2 if input_grad else 1)),
                  (fwd_bytes, bwd_bytes), matmul_key(dtype, torch.backends.cudnn.allow_tf32),
                  "cuDNN conv + ReLU" if not INTERPRET else "aten conv + ReLU")


def linear_case(name, m, n, k, dtype, *, bias, relu, layout="x[M,K] w[N,K]"):
    """``layout``: "x[M,K] w[N,K]" (nn.Linear), "w stored [K,N]" (w is a transposed view), "x stored [K,M]"."""
    import tritonkit.functional as TF

    device = default_device()
    es = torch.tensor([], dtype=dtype).element_size()
    fwd_bytes = es * (m * k + n * k + (n if bias else 0) + m * n)
    bwd_bytes = es * (m * n * (2 if relu else 1) + m * k + n * k + m * k + n * k + (n if bias else 0))

    def make():
        def leaf(rows, cols, transposed, scale):
            t = _randn(cols, rows, dtype=dtype, device=device, scale=scale).t() if transposed else \
                _randn(rows, cols, dtype=dtype, device=device, scale=scale)
            return t.requires_grad_()

        return [leaf(m, k, layout.startswith("x stored"), 1.0), leaf(n, k, layout.startswith("w stored"), k ** -0.5),
                _randn(n, dtype=dtype, device=device, scale=0.1, requires_grad=True) if bias else None]

    def eager(x, w, b):
        y = F.linear(x, w, b)
        return F.relu(y) if relu else y

    def tk(x, w, b):
        return TF.linear(x, w, b, activation="relu" if relu else None)

    shape = f"M={m} N={n} K={k} {layout}{' +bias' if bias else ''}{' +relu' if relu else ''}"
    return OpCase("linear", name, dtype, shape, make, tk, eager, (2.0 * m * n * k, 4.0 * m * n * k),
                  (fwd_bytes, bwd_bytes), matmul_key(dtype, torch.backends.cuda.matmul.allow_tf32),
                  "cuBLAS (+ ReLU)" if not INTERPRET else "aten (+ ReLU)")


def pool_case(name, n, c, hw, k, stride, pad, dtype, *, nhwc):
    import tritonkit.functional as TF

    device = default_device()
    es = torch.tensor([], dtype=dtype).element_size()
    y_n = n * c * _conv_out(hw, k, stride, pad) ** 2
    x_n = n * c * hw * hw
    # floor: x read, values and int64 indices written; backward: dy and indices read, dx written
    return OpCase("pool", name, dtype,
                  f"x[{n},{c},{hw},{hw}] {'NHWC' if nhwc else 'NCHW'} k{k} s{stride} p{pad}",
                  lambda: [_randn(n, c, hw, hw, dtype=dtype, device=device, channels_last=nhwc, requires_grad=True)],
                  lambda x: TF.max_pool2d(x, k, stride, pad), lambda x: F.max_pool2d(x, k, stride, pad),
                  bytes=(es * (x_n + y_n) + 8 * y_n, es * (y_n + x_n) + 8 * y_n), eager_note="aten max_pool2d")


def relu_case(name, shape, dtype, *, nhwc):
    import tritonkit.functional as TF

    device = default_device()
    numel = math.prod(shape)
    es = torch.tensor([], dtype=dtype).element_size()
    return OpCase("relu", name, dtype, f"x{list(shape)} {'NHWC' if nhwc else 'contiguous'}",
                  lambda: [_randn(*shape, dtype=dtype, device=device, channels_last=nhwc, requires_grad=True)],
                  TF.relu, torch.relu, bytes=(2 * es * numel, 3 * es * numel), eager_note="aten relu")


def check_op(case: OpCase) -> None:
    """tritonkit forward and input gradients against eager in float32 on the same values; raises AssertionError."""
    from tritonkit.kernels.common import poison_outputs
    from tritonkit.testing import assert_close

    leaves = case.make()
    refs = [t.detach().float().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in leaves]
    with exact_float32(), poison_outputs():
        out = case.tk(*leaves)
        ref = case.torch_fn(*refs)
        assert_close(out, ref.to(out.dtype), msg=f"{case.name} forward")
        dy = torch.randn_like(out)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None and t.requires_grad], dy)
        ref_grads = torch.autograd.grad(ref, [t for t in refs if t is not None and t.requires_grad], dy.float())
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert_close(g, r.to(g.dtype), grad=True, msg=f"{case.name} gradient {i}")


def compile_inductor(fn: Callable) -> Callable:
    torch._dynamo.reset()  # one fresh compile per case: no recompile limit, no automatic dynamic shapes
    return torch.compile(fn, dynamic=False)


def run_op(case: OpCase, competitors, timer: Timer) -> list[Result]:
    rows = [Result(case.family, case.name, d, _dtype_name(case.dtype), case.shape, case.flops[i], case.bytes[i],
                   case.peak_key) for i, d in enumerate(("fwd", "bwd"))]
    try:
        check_op(case)
        ok, why = True, ""
    except Exception as e:  # noqa: BLE001  (AssertionError: wrong numbers; else the tritonkit path crashed)
        ok, why = False, _short(e)
    for r in rows:
        r.check, r.check_error = ok, why
    impls = {"tritonkit": case.tk, **{c: case.torch_fn for c in competitors}}
    for impl, fn in impls.items():
        try:
            (rows[0].times_ms[impl], rows[1].times_ms[impl]), note = _time_op(case, impl, fn, timer)
            for r in rows:
                r.impl_notes[impl] = note
        except Exception as e:  # noqa: BLE001  (one broken implementation must not hide the others' figures)
            for r in rows:
                r.impl_notes[impl] = f"failed: {_short(e)}"
                if impl == "tritonkit":
                    r.error = f"tritonkit failed: {_short(e)}"
    return rows


def _time_op(case: OpCase, impl: str, fn: Callable, timer: Timer) -> tuple[tuple[float, float], str]:
    """Forward time (a training forward: inputs require grad) and backward time (autograd.grad of one
    retained forward graph), after one untimed call of each (compiles, autotunes)."""
    leaves = case.make()
    note = {"eager": case.eager_note, "tritonkit": "tritonkit.functional"}.get(impl, "")
    start = time.perf_counter()
    if impl == "inductor":
        fn = compile_inductor(fn)
    out = fn(*leaves)
    dy = torch.randn_like(out)
    needs = [t for t in leaves if t is not None and t.requires_grad]
    torch.autograd.grad(out, needs, dy, retain_graph=True)
    if impl == "inductor":
        note = f"torch.compile; first forward+backward {time.perf_counter() - start:.1f} s"
    return (timer(lambda: fn(*leaves)), timer(lambda: torch.autograd.grad(out, needs, dy, retain_graph=True))), note


# ================================================================ BatchNorm layers (modules, compiled)
def _wide(dtype: torch.dtype) -> torch.dtype:
    """The reference dtype of a BatchNorm check: float32 for half types, float64 for float32."""
    return fp64 if dtype == fp32 else fp32


# Added to BN_ERROR_FACTOR x eager's error: eager's own error can be tiny where it accumulates in float64
# (the CPU's BatchNorm statistics), and a mean of zero-mean values magnifies any rounding relative to it.
BN_FLOOR = {fp32: 1e-4, fp16: 1e-2, bf16: 1e-2}


def check_vs_reference(ours: dict, eager: dict, ref: dict, dtype: torch.dtype) -> None:
    """Each named tensor of ``ours`` (tritonkit) against ``ref`` (the same computation in a wider dtype):
    its relative error (``bn_error``: ``max |diff| / max |ref|``, the scale floored for tensors that are 0
    in exact arithmetic) at most ``BN_ERROR_FACTOR`` times eager's own plus ``BN_FLOOR``; integer tensors
    (``num_batches_tracked``) exactly. Raises AssertionError."""
    from tritonkit.testing import BN_ERROR_FACTOR, bn_error

    floor = BN_FLOOR.get(dtype, 1e-3)
    for name, want in ref.items():
        got = ours[name]
        if not want.is_floating_point():
            assert torch.equal(got.cpu(), want.cpu()), f"{name}: {got.tolist()} != {want.tolist()}"
            continue
        err, base = bn_error(got, want), bn_error(eager[name], want)
        bound = BN_ERROR_FACTOR * base + floor
        assert err <= bound, (f"{name}: relative error {err:.3g} vs the {_dtype_name(want.dtype)} reference > "
                              f"{bound:.3g} ({BN_ERROR_FACTOR:g} x eager's {base:.3g} + {floor:g})")


@dataclass
class LayerCase:
    """A small ``nn.Module`` in train mode on one input. ``make()`` returns a fresh module (same weights
    every call) and input (requires grad); each implementation runs its own copy."""

    family: str
    name: str
    dtype: torch.dtype
    shape: str
    make: Callable[[], tuple]
    flops: tuple = (None, None)
    bytes: tuple = (None, None)
    peak_key: str | None = None
    eager_note: str = ""


def conv_bn_case(name, n, c, hw, oc, k, stride, pad, dtype) -> LayerCase:
    """``nn.Sequential(Conv2d(bias=False), BatchNorm2d, ReLU)``, channels_last, in train mode."""
    device = default_device()
    oh = _conv_out(hw, k, stride, pad)
    es = torch.tensor([], dtype=dtype).element_size()
    x_n, w_n, y_n = n * c * hw * hw, oc * c * k * k, n * oc * oh * oh
    gemm = 2.0 * y_n * c * k * k
    # floor: x and w read, y written (the statistics need all of the conv's output before any of it is
    # normalized, so this is a floor, not one pass); backward: dy, x, w and the saved conv output read,
    # dx and dw written
    fwd_bytes, bwd_bytes = es * (x_n + w_n + y_n), es * (2 * y_n + 2 * x_n + 2 * w_n)

    def make():
        gen = torch.Generator().manual_seed(0)
        conv = torch.nn.Conv2d(c, oc, k, stride, pad, bias=False)
        bn = torch.nn.BatchNorm2d(oc)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (c * k * k) ** -0.5)
            bn.weight.copy_(torch.rand(oc, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(oc, generator=gen) - 0.5)
        module = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).to(device=device, dtype=dtype,
                                                                    memory_format=torch.channels_last)
        x = torch.randn(n, c, hw, hw, generator=gen).to(device=device, dtype=dtype)
        return module.train(), x.contiguous(memory_format=torch.channels_last).requires_grad_()

    shape = f"x[{n},{c},{hw},{hw}] NHWC w[{oc},{c},{k},{k}] s{stride} p{pad} +bn(train)+relu"
    return LayerCase("bn", name, dtype, shape, make, (gemm, 2 * gemm), (fwd_bytes, bwd_bytes),
                     matmul_key(dtype, torch.backends.cudnn.allow_tf32),
                     "cuDNN conv + torch's BatchNorm (cuDNN or its CUDA kernel, as torch dispatches) + ReLU"
                     if not INTERPRET else "aten conv + BatchNorm + ReLU")


def depthwise_case(name, n, c, hw, k, stride, dtype, *, bn: bool) -> LayerCase:
    """A MobileNetV2 depthwise layer, channels_last, in train mode: ``Conv2d(c, c, k, groups=c, bias=False)``,
    with ``bn``: + ``BatchNorm2d`` + ``ReLU6`` (the BN statistics come from the depthwise kernel's epilogue)."""
    device = default_device()
    pad = k // 2
    oh = _conv_out(hw, k, stride, pad)
    es = torch.tensor([], dtype=dtype).element_size()
    x_n, w_n, y_n = n * c * hw * hw, c * k * k, n * c * oh * oh
    macs = 2.0 * y_n * k * k
    # memory-bound: x read, y written (+ BN: y read again for the apply); backward: dy, x read, dx written
    fwd_bytes = es * (x_n + w_n + y_n * (3 if bn else 1))
    bwd_bytes = es * (y_n * (3 if bn else 1) + 2 * x_n + 2 * w_n)

    def make():
        gen = torch.Generator().manual_seed(0)
        layers = [torch.nn.Conv2d(c, c, k, stride, pad, groups=c, bias=False)]
        if bn:
            layers += [torch.nn.BatchNorm2d(c), torch.nn.ReLU6()]
        with torch.no_grad():
            layers[0].weight.copy_(torch.randn(layers[0].weight.shape, generator=gen) / k)
        module = torch.nn.Sequential(*layers).to(device=device, dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(n, c, hw, hw, generator=gen).to(device=device, dtype=dtype)
        return module.train(), x.contiguous(memory_format=torch.channels_last).requires_grad_()

    shape = f"x[{n},{c},{hw},{hw}] NHWC dw {k}x{k} s{stride}{' +bn(train)+relu6' if bn else ''}"
    note = "cuDNN depthwise conv" + (" + BatchNorm + ReLU6" if bn else "") if not INTERPRET else "aten depthwise conv"
    return LayerCase("dw", name, dtype, shape, make, (macs, 2 * macs), (fwd_bytes, bwd_bytes), None, note)


def _compiled(impl: str, module: torch.nn.Module):
    """``module`` for ``impl``: itself (eager), ``torch.compile`` with inductor, or with the tritonkit backend."""
    if impl == "eager":
        return module
    if impl == "inductor":
        return torch.compile(module, dynamic=False)
    return torch.compile(module, backend=tritonkit.backend, dynamic=False)


def _layer_results(module, out, x, dy) -> dict:
    """The output, the gradients of the input and of every parameter, and the buffers after one call."""
    named = {"input": x, **dict(module.named_parameters())}
    grads = torch.autograd.grad(out, list(named.values()), dy)
    return {"output": out.detach(), **{f"grad {k}": g for k, g in zip(named, grads)},
            **{k: b.detach().clone() for k, b in module.named_buffers()}}


def check_layer(case: LayerCase, module, fn) -> None:
    """The first training forward and backward of ``fn`` (tritonkit, compiling ``module``) against eager
    and a wide-dtype eager copy, on the same values, with ``check_vs_reference``; raises AssertionError."""
    from tritonkit.kernels.common import poison_outputs

    eager, x = case.make()
    wide = _wide(case.dtype)
    ref = copy.deepcopy(eager).to(wide)
    xr = x.detach().to(wide).requires_grad_()
    with exact_float32():
        with poison_outputs():
            out = fn(x)
        dy = torch.randn_like(out)
        got = _layer_results(module, out, x, dy)
        base = _layer_results(eager, eager(x), x, dy)
        want = _layer_results(ref, ref(xr), xr, dy.to(wide))
    check_vs_reference(got, base, want, case.dtype)


def run_layer(case: LayerCase, competitors, timer: Timer) -> list[Result]:
    """Forward and backward rows, like ``run_op``; the subject is ``torch.compile(backend=tritonkit)``."""
    rows = [Result(case.family, case.name, d, _dtype_name(case.dtype), case.shape, case.flops[i], case.bytes[i],
                   case.peak_key) for i, d in enumerate(("fwd", "bwd"))]
    torch._dynamo.reset()  # once per case: each implementation compiles its own module once
    for impl in ("tritonkit", *competitors):
        try:  # no donated buffers: the timed backward reruns one retained graph
            with torch._functorch.config.patch(donated_buffer=False):
                times, note, check = _time_layer(case, impl, timer)
            for r, ms in zip(rows, times):
                r.times_ms[impl], r.impl_notes[impl] = ms, note
                if check is not None:
                    r.check, r.check_error = check
        except Exception as e:  # noqa: BLE001  (one broken implementation must not hide the others' figures)
            for r in rows:
                r.impl_notes[impl] = f"failed: {_short(e)}"
                if impl == "tritonkit":
                    r.error = f"tritonkit failed: {_short(e)}"
        _free()
    return rows


def _time_layer(case: LayerCase, impl: str, timer: Timer) -> tuple:
    """``((forward ms, backward ms), note, (check ok, why) or None)``: times as in ``_time_op``, after
    the first call, which for tritonkit is the check."""
    module, x = case.make()
    start = time.perf_counter()
    fn = _compiled(impl, module)
    check = None
    if impl == "tritonkit":
        try:
            check_layer(case, module, fn)
            check = True, ""
        except Exception as e:  # noqa: BLE001  (AssertionError: wrong numbers; else the tritonkit path crashed)
            check = False, _short(e)
    out = fn(x)
    needs = [x, *module.parameters()]
    dy = torch.randn_like(out)
    torch.autograd.grad(out, needs, dy, retain_graph=True)
    note = {"eager": case.eager_note, "inductor": "torch.compile (inductor)",
            "tritonkit": "torch.compile(backend=tritonkit)"}[impl]
    if impl != "eager":
        note += f"; first forward+backward {time.perf_counter() - start:.1f} s"
    times = timer(lambda: fn(x)), timer(lambda: torch.autograd.grad(out, needs, dy, retain_graph=True))
    return times, note, check


# ========================================================================================== optimizers
OPTIMIZERS = {  # name -> (torch.optim class name, constructor kwargs)
    "sgd": ("SGD", {"lr": 1e-2, "momentum": 0.9}),
    "adam": ("Adam", {"lr": 1e-3}),
    "adamw": ("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}),
    "rmsprop": ("RMSprop", {"lr": 1e-3}),
    "adagrad": ("Adagrad", {"lr": 1e-2}),
}


def param_shapes(total: int, big: tuple[int, int]) -> list[tuple]:
    """A model-like list of ``total`` elements: ``big`` weight matrices, each with two (rows,) vectors
    (bias, norm), and one flat tensor for the rest."""
    shapes, left, unit = [], total, big[0] * big[1] + 2 * big[0]
    while left >= unit:
        shapes += [big, (big[0],), (big[0],)]
        left -= unit
    return shapes + ([(left,)] if left else [])


def _torch_variants(name: str, compiled: bool) -> list[tuple[dict, str]]:
    """torch's fastest eager variants in order of preference: fused=True where torch has it, then foreach.
    Under torch.compile: foreach (what inductor turns into its own fused kernels)."""
    if compiled:
        return [({"foreach": True}, "torch foreach=True, step under torch.compile")]
    return [({"fused": True}, "torch fused=True"), ({"foreach": True}, "torch foreach=True (no fused version here)")]


def _build_torch_optimizer(name: str, make_params: Callable, compiled: bool, warm: Callable):
    """The first variant that constructs and survives ``warm(opt)``: ``(params, opt, note)``."""
    cls, kwargs = OPTIMIZERS[name]
    errors = []
    for extra, note in _torch_variants(name, compiled):
        params = make_params()
        try:
            opt = getattr(torch.optim, cls)(params, **kwargs, **extra)
            warm(opt)
            return params, opt, note
        except (TypeError, RuntimeError, ValueError, NotImplementedError) as e:
            errors.append(_short(e))
    raise RuntimeError("no torch variant ran: " + "; ".join(errors))


def run_optim(name: str, total: int, big: tuple, competitors, timer: Timer) -> list[Result]:
    import tritonkit.optim as tko
    from tritonkit.testing import OPTIM_TOLERANCES

    device = default_device()
    shapes = param_shapes(total, big)
    gen = torch.Generator(device=device).manual_seed(0)
    values = [(torch.randn(s, generator=gen, device=device), torch.randn(s, generator=gen, device=device))
              for s in shapes]

    def params():
        """Every implementation starts from the same values and gradients (fresh copies)."""
        out = []
        for v, g in values:
            p = v.clone().requires_grad_()
            p.grad = g.clone()
            out.append(p)
        return out

    label = f"{total / MB:g}M float32 params in {len(shapes)} tensors (largest {big[0]}x{big[1]})"
    r = Result("optim", f"{name} {total / MB:g}M", "step", "float32", label)
    built = {}
    for impl in ("tritonkit", *competitors):
        try:
            start = time.perf_counter()
            if impl == "tritonkit":
                cls, kwargs = OPTIMIZERS[name]
                ps = params()
                opt, note = getattr(tko, cls)(ps, **kwargs), "tritonkit.optim (one launch)"
                step = opt.step
                step(), step()
            else:
                compiled = impl == "inductor"
                holder = {}

                def warm(opt, compiled=compiled, holder=holder):
                    holder["step"] = compile_inductor(opt.step) if compiled else opt.step
                    holder["step"](), holder["step"]()  # state created, compiled; the steps the check compares

                ps, opt, note = _build_torch_optimizer(name, params, compiled, warm)
                step = holder["step"]
            if impl == "inductor":
                note += f"; first two steps {time.perf_counter() - start:.1f} s"
            built[impl] = (ps, opt, step, note)
        except Exception as e:  # noqa: BLE001  (a failed competitor is reported, the rest still run)
            r.impl_notes[impl] = f"failed: {_short(e)}"
            if impl == "tritonkit":
                r.error = f"tritonkit failed: {_short(e)}"
    if "tritonkit" in built:
        r.bytes = float(tko.bytes_per_step(built["tritonkit"][1]))
    reference = next((impl for impl in ("eager", "inductor") if impl in built), None)
    if "tritonkit" in built and reference:
        try:  # two steps from the same values and gradients
            for i, (p, q) in enumerate(zip(built["tritonkit"][0], built[reference][0])):
                torch.testing.assert_close(p.detach(), q.detach(), **OPTIM_TOLERANCES[fp32],
                                           msg=lambda m, i=i: f"param {i} after two steps vs torch ({reference}): {m}")
            r.check = True
        except AssertionError as e:
            r.check, r.check_error = False, _short(e)
    for impl, (_, _, step, note) in built.items():
        r.times_ms[impl] = timer(step)
        r.impl_notes[impl] = note
    return [r]


# ========================================================================================= end to end
SGD_ARGS = {"lr": 1e-2, "momentum": 0.9}


def lenet_flops(batch: int) -> float:
    """GEMM FLOPs of one LeNet training step: forward, weight gradients, input gradients but conv1's."""
    layers = [2 * 6 * 28 * 28 * 75, 2 * 16 * 10 * 10 * 150, 2 * 400 * 120, 2 * 120 * 84, 2 * 84 * 10]
    return float(batch * (3 * sum(layers) - layers[0]))


def step_flops(build: Callable[[], torch.nn.Module], x_shape) -> float:
    """GEMM FLOPs of one training step of ``build()``'s net (convs and linears, counted on the meta
    device): forward, weight gradients, input gradients but the first layer's."""
    gemms = []

    def hook(module, inputs, out):
        per_output = module.weight[0].numel()  # in_channels/groups x kernel, or in_features
        gemms.append(2.0 * out.numel() * per_output)

    with torch.device("meta"):
        model = build()
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    model(torch.empty(x_shape, device="meta"))
    return 3 * sum(gemms) - gemms[0]


def _named_params(model) -> dict:
    return {n.replace("_orig_mod.", ""): p for n, p in model.named_parameters()}


def _step_fn(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def _first_step(step):
    with exact_float32():
        return step().detach()


def _build_step(impl: str, model_for: Callable, label: str, x, y) -> tuple:
    """``(model, step, loss of the first step, note)``: the tritonkit backend or tritonkit.nn with
    tritonkit.optim.SGD, or eager / inductor with torch's fastest SGD."""
    from tritonkit import optim as tko

    if impl in ("tritonkit", "tritonkit.nn"):
        raw = model_for(impl)
        model = torch.compile(raw, backend=tritonkit.backend, dynamic=False) if impl == "tritonkit" else raw
        step = _step_fn(model, tko.SGD(raw.parameters(), **SGD_ARGS), x, y)
        note = ("torch.compile(backend=tritonkit)" if impl == "tritonkit" else f"tritonkit.nn {label}") + \
            " + tritonkit.optim.SGD"
        return raw, step, _first_step(step), note
    holder = {}

    def make_params():
        holder["raw"] = model_for(impl)
        holder["model"] = torch.compile(holder["raw"], dynamic=False) if impl == "inductor" else holder["raw"]
        return list(holder["raw"].parameters())

    def warm(opt):
        holder["step"] = _step_fn(holder["model"], opt, x, y)
        holder["loss"] = _first_step(holder["step"])

    _, _, note = _build_torch_optimizer("sgd", make_params, False, warm)
    prefix = f"torch.compile(inductor) {label}" if impl == "inductor" else f"eager {label}"
    return holder["raw"], holder["step"], holder["loss"], f"{prefix} + {note}"


def run_train_step(rows: dict, model_for: Callable, label: str, x, y, check: Callable,
                   competitors, timer: Timer) -> list[Result]:
    """Rows (one per subject: the tritonkit backend, tritonkit.nn) sharing one timing of each competitor.

    Every path starts from the same weights and takes one step on the same batch with TF32 off (the
    compile, and the step that ``check(subject's, eager's)`` compares; each a ``_build_step`` tuple),
    then is timed.
    """
    torch._dynamo.reset()
    built, notes = {}, {}
    for impl in dict.fromkeys(("eager", *rows, *competitors)):
        start = time.perf_counter()
        try:
            built[impl] = _build_step(impl, model_for, label, x, y)
            notes[impl] = built[impl][3] + (f"; first step {time.perf_counter() - start:.1f} s"
                                            if impl in ("tritonkit", "inductor") else "")
        except Exception as e:  # noqa: BLE001  (a failed path is reported and left out, the rest still run)
            notes[impl] = f"failed: {_short(e)}"
            print(f"{label} train step: {impl} failed, left out of the timings: {_short(e)}", flush=True)
            if impl in rows:
                rows[impl].error = f"{impl} failed: {_short(e)}"
        _free()
    for s, r in rows.items():
        if s in built and "eager" in built:
            try:
                check(built[s], built["eager"])
                r.check = True
            except AssertionError as e:
                r.check, r.check_error = False, _short(e)
            except Exception as e:  # noqa: BLE001  (the reference crashed: no verdict, the timings still count)
                r.check_error = f"check crashed: {_short(e)}"
    times = {impl: timer(built[impl][1]) for impl in dict.fromkeys((*rows, *competitors)) if impl in built}
    for s, r in rows.items():
        r.times_ms = {k: v for k, v in times.items() if k == s or k in competitors}
        r.impl_notes = {k: v for k, v in notes.items() if k == s or k in competitors}
    return list(rows.values())


def run_e2e(batch: int, competitors, timer: Timer) -> list[Result]:
    """The LeNet step, two rows (subjects: the tritonkit backend, tritonkit.nn); checked against eager
    with ``TRAINING_TOLERANCES`` (float32, TF32 off)."""
    from tritonkit.models import LeNet, TritonkitLeNet
    from tritonkit.testing import TRAINING_TOLERANCES

    device = default_device()
    torch.manual_seed(0)
    state = LeNet().state_dict()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def model_for(impl):
        model = (TritonkitLeNet() if impl == "tritonkit.nn" else LeNet()).to(device)
        model.load_state_dict(state)
        return model

    def check(ours, eager):
        torch.testing.assert_close(ours[2], eager[2], **TRAINING_TOLERANCES)
        mine = _named_params(ours[0])
        for pname, p in _named_params(eager[0]).items():
            torch.testing.assert_close(mine[pname], p, **TRAINING_TOLERANCES,
                                       msg=lambda m, n=pname: f"{n} after one step: {m}")

    shape = f"LeNet batch {batch} float32, SGD momentum 0.9: forward, cross-entropy, backward, step"
    rows = {s: Result("e2e", f"lenet train step [{s}]", "step", "float32", shape, lenet_flops(batch), None,
                      matmul_key(fp32, torch.backends.cudnn.allow_tf32), subject=s)
            for s in ("tritonkit", "tritonkit.nn")}
    return run_train_step(rows, model_for, "LeNet", x, y, check, competitors, timer)


# the nets of run_e2e_net: what they are, and the builder arguments every run uses (no dropout: the
# check compares one step of two implementations, whose dropout masks would differ)
NETS = {"resnet18": ("BasicBlock [2, 2, 2, 2]", {}), "resnet50": ("Bottleneck [3, 4, 6, 3]", {}),
        "mobilenet_v2": ("torchvision's inverted-residual stages, ReLU6, no dropout", {"dropout": 0.0})}
TINY = {"resnet18": {"width": 4, "layers": (1, 1, 1, 1)}, "resnet50": {"width": 4, "layers": (1, 1, 1, 1)},
        "mobilenet_v2": {"width": 0.25, "settings": ((1, 16, 1, 1), (6, 24, 2, 2)), "last_channels": 32}}


def _step_record(model, loss, init: dict) -> dict:
    """What one training step produced: the loss, every gradient and parameter update, every buffer."""
    out = {"loss": loss}
    for n, p in _named_params(model).items():
        out[f"{n} grad"] = p.grad
        out[f"{n} update"] = p.detach().double() - init[n].double()
    return {**out, **{n: b.detach() for n, b in model.named_buffers()}}


def run_e2e_net(arch: str, batch: int, hw: int, dtype: torch.dtype, competitors, timer: Timer, *,
                classes: int = 1000, **shrink) -> list[Result]:
    """One training step of a BatchNorm net of ``tritonkit.models`` (``NETS``: resnet18, resnet50,
    mobilenet_v2; channels_last, every parameter and the images in ``dtype``; SGD momentum 0.9), subject:
    the tritonkit backend.

    Checked with ``check_vs_reference``: the first step's loss, gradients, parameter updates and
    BatchNorm buffers against the same step of a wide-dtype eager copy (TF32 off), each within
    ``BN_ERROR_FACTOR`` of eager's own error. ``shrink``: the builder's size arguments (quick mode).
    """
    from tritonkit import models

    device = default_device()
    wide = _wide(dtype)

    def build():
        return getattr(models, arch)(classes, **NETS[arch][1], **shrink)

    def model_for(impl, dt=dtype, memory_format=torch.channels_last):
        with torch.device("meta"):
            model = build()
        model = model.to_empty(device=device).to(dtype=dt, memory_format=memory_format)
        model.load_state_dict(state)
        return model.train()

    torch.manual_seed(0)
    with torch.device(device):
        state = build().to(dtype).state_dict()
    x = torch.randn(batch, 3, hw, hw, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    init = {k: v.clone() for k, v in state.items()}

    def check(ours, eager):
        ref = model_for("reference", wide, torch.contiguous_format)  # the layout changes no value
        loss = _first_step(_step_fn(ref, torch.optim.SGD(ref.parameters(), **SGD_ARGS, foreach=False),
                                    x.to(wide).contiguous(), y))
        want = _step_record(ref, loss, init)
        del ref
        check_vs_reference(_step_record(ours[0], ours[2], init), _step_record(eager[0], eager[2], init), want, dtype)

    name = f"{arch}{' (tiny)' if shrink else ''} train step b{batch} @{hw}"
    sizes = "".join(f", {k} {v}" for k, v in shrink.items())
    shape = (f"{arch}(): {NETS[arch][0]}{sizes}, {classes} classes, x[{batch},3,{hw},{hw}] NHWC, "
             f"{_dtype_name(dtype)} parameters, SGD momentum 0.9: forward, cross-entropy, backward, step")
    rows = {"tritonkit": Result("e2e", name, "step", _dtype_name(dtype), shape, step_flops(build, x.shape), None,
                                matmul_key(dtype, torch.backends.cudnn.allow_tf32))}
    return run_train_step(rows, model_for, arch, x, y, check, competitors, timer)


# ============================================================================================= cases
def plan(families, quick: bool, gpu: bool) -> list[tuple]:
    """``(family, case name, thunk, matmul peak key[, seconds])``; each thunk takes (competitors, timer)
    and returns Results. ``seconds``: what the case needs on a GPU, compiles included (a guess); under
    ``--budget-s`` it is skipped when less than that is left of the whole budget.

    Cases that matter most for the headline come first in each family (a time budget cuts the tail).
    In the interpreter, GEMM cases use float16 where a GPU run uses bfloat16 (the interpreter's
    bfloat16 ``tl.dot`` is wrong).
    """
    gemm_half = bf16 if gpu else fp16
    cases: list[tuple] = []

    def op(case: OpCase):
        cases.append((case.family, case.name, lambda comps, timer: run_op(case, comps, timer), case.peak_key))

    def layer(case: LayerCase):  # three compiles of a small module: allow ~30 s on a GPU
        cases.append((case.family, case.name, lambda comps, timer: run_layer(case, comps, timer), case.peak_key,
                      0 if quick else 30))

    for family in families:
        if family == "conv":
            if quick:
                op(conv_case("nhwc 3x3 8->16 @10", 2, 8, 10, 16, 3, 1, 1, gemm_half, nhwc=True, bias=False))
                op(conv_case("lenet-style conv 3->6 5x5 @12", 2, 3, 12, 6, 5, 1, 0, fp32, nhwc=False, bias=True,
                             input_grad=False))
                continue
            for name, c, hw, oc, k, s, p in (("resnet50 stem 7x7/2 3->64 @224", 3, 224, 64, 7, 2, 3),
                                             ("resnet50 3x3 64->64 @56", 64, 56, 64, 3, 1, 1),
                                             ("resnet50 1x1 256->64 @56", 256, 56, 64, 1, 1, 0),
                                             ("resnet50 3x3 128->128 @28", 128, 28, 128, 3, 1, 1),
                                             ("resnet50 3x3/2 128->128 @56", 128, 56, 128, 3, 2, 1),
                                             ("resnet50 3x3 256->256 @14", 256, 14, 256, 3, 1, 1),
                                             ("resnet50 1x1 2048->512 @7", 2048, 7, 512, 1, 1, 0)):
                op(conv_case(name, 32, c, hw, oc, k, s, p, bf16, nhwc=True, bias=False, input_grad=c != 3))
            op(conv_case("lenet conv1 3->6 5x5 @32", 256, 3, 32, 6, 5, 1, 0, fp32, nhwc=False, bias=True,
                         input_grad=False))
            op(conv_case("lenet conv2 6->16 5x5 @14", 256, 6, 14, 16, 5, 1, 0, fp32, nhwc=False, bias=True))
        elif family == "linear":
            if quick:
                op(linear_case("48x40x72 +bias+relu", 48, 40, 72, gemm_half, bias=True, relu=True))
                op(linear_case("48x40x72 w stored [K,N]", 48, 40, 72, gemm_half, bias=False, relu=False,
                               layout="w stored [K,N]"))
                continue
            for m, n, k, extra in ((4096, 4096, 4096, ()), (8192, 1024, 4096, ("w", "x"))):
                op(linear_case(f"{m}x{n}x{k}", m, n, k, bf16, bias=False, relu=False))
                op(linear_case(f"{m}x{n}x{k} +bias+relu", m, n, k, bf16, bias=True, relu=True))
                for which in extra:
                    layout = "w stored [K,N]" if which == "w" else "x stored [K,M]"
                    op(linear_case(f"{m}x{n}x{k} {layout}", m, n, k, bf16, bias=False, relu=False, layout=layout))
            for name, n, k, relu in (("lenet fc1 400->120", 120, 400, True), ("lenet fc2 120->84", 84, 120, True),
                                     ("lenet fc3 84->10", 10, 84, False)):
                op(linear_case(name, 256, n, k, fp32, bias=True, relu=relu))
        elif family == "pool":
            if quick:
                op(pool_case("nhwc 3x3/2 p1 @12", 2, 8, 12, 3, 2, 1, bf16, nhwc=True))
                op(pool_case("lenet-style 2x2/2 @8", 2, 6, 8, 2, 2, 0, fp32, nhwc=False))
                continue
            op(pool_case("resnet50 stem pool 3x3/2 @112", 32, 64, 112, 3, 2, 1, bf16, nhwc=True))
            op(pool_case("lenet pool1 2x2/2 @28", 256, 6, 28, 2, 2, 0, fp32, nhwc=False))
            op(pool_case("lenet pool2 2x2/2 @10", 256, 16, 10, 2, 2, 0, fp32, nhwc=False))
        elif family == "relu":
            if quick:
                op(relu_case("nhwc activation", (2, 8, 6, 6), bf16, nhwc=True))
                op(relu_case("fp32 activation", (2, 6, 8, 8), fp32, nhwc=False))
                continue
            op(relu_case("resnet50 activation 256ch @56", (32, 256, 56, 56), bf16, nhwc=True))
            op(relu_case("lenet conv1 activation", (256, 6, 28, 28), fp32, nhwc=False))
        elif family == "bn":
            if quick:
                layer(conv_bn_case("conv3x3 8->8 +bn+relu @8", 2, 8, 8, 8, 3, 1, 1, fp32))
                continue
            for name, c, hw in (("resnet50 3x3 256->256 +bn+relu @14", 256, 14),  # layer3
                                ("resnet50 3x3 64->64 +bn+relu @56", 64, 56)):  # layer1
                layer(conv_bn_case(name, 64, c, hw, c, 3, 1, 1, bf16))
        elif family == "dw":
            if quick:
                layer(depthwise_case("dw3x3 8ch @9", 2, 8, 9, 3, 1, fp32, bn=False))
                layer(depthwise_case("dw3x3/2 8ch @9 +bn+relu6", 2, 8, 9, 3, 2, fp32, bn=True))
                continue
            for name, c, hw, s_, bn in (("mobilenetv2 dw3x3 144ch @56", 144, 56, 1, False),
                                        ("mobilenetv2 dw3x3/2 144ch @56", 144, 56, 2, False),
                                        ("mobilenetv2 dw3x3 384ch @14", 384, 14, 1, False),
                                        ("mobilenetv2 dw3x3 144ch @56 +bn+relu6", 144, 56, 1, True),
                                        ("mobilenetv2 dw3x3 960ch @7 +bn+relu6", 960, 7, 1, True)):
                layer(depthwise_case(name, 64, c, hw, 3, s_, bf16, bn=bn))
        elif family == "optim":
            sizes = ((20_000, (64, 64)),) if quick else ((100_000_000, (2048, 2048)), (10_000_000, (1024, 1024)))
            for total, big in sizes:
                for name in OPTIMIZERS:
                    cases.append(("optim", f"{name} {total / MB:g}M",
                                  lambda comps, timer, n=name, t=total, b=big: run_optim(n, t, b, comps, timer),
                                  None))
        elif family == "e2e":
            batch = 2 if quick else 256
            cases.append(("e2e", f"lenet train step b{batch}",
                          lambda comps, timer, b=batch: run_e2e(b, comps, timer),
                          matmul_key(fp32, torch.backends.cudnn.allow_tf32)))
            # quick: the same builders shrunk (one block per stage, width 4, 64x64, 10 classes), float32;
            # full: torchvision's nets on 224x224 (H200: a few GB of activations at these batches)
            for arch, batch, est_s in (("resnet18", 128, 90), ("resnet50", 64, 120), ("mobilenet_v2", 128, 90)):
                kwargs = {**TINY[arch], "classes": 10} if quick else {}
                hw, dtype = (64, fp32) if quick else (224, bf16)  # 64: layer4's BatchNorms see 2x2x2 values
                name = f"{arch}{' (tiny)' if quick else ''} train step b{2 if quick else batch} @{hw}"
                cases.append(("e2e", name, lambda comps, timer, a=arch, b=2 if quick else batch, h=hw, d=dtype,
                              kw=kwargs: run_e2e_net(a, b, h, d, comps, timer, **kw),
                              matmul_key(dtype, torch.backends.cudnn.allow_tf32), 0 if quick else est_s))
    return cases


# ============================================================================================ report
def metrics(r: Result, peaks: Peaks) -> dict:
    """Per implementation: ms, GB/s, TFLOP/s, % of roofline floor, and the subject's speedup over it."""
    floor = peaks.floor_ms(r)
    subject_ms = r.times_ms.get(r.subject)
    out = {}
    for impl, ms in r.times_ms.items():
        s = ms * 1e-3
        out[impl] = {
            "ms": ms,
            "gbps": r.bytes / s / 1e9 if r.bytes else None,
            "tflops": r.flops / s / 1e12 if r.flops else None,
            "pct_roofline": 100 * floor / ms if floor else None,
            "subject_speedup": ms / subject_ms if subject_ms else None,
        }
    return out


def to_json(results, peaks: Peaks, meta: dict) -> dict:
    rows = []
    for r in results:
        row = asdict(r)
        row["floor_ms"] = peaks.floor_ms(r)
        row["impls"] = metrics(r, peaks)
        row["speedup"] = {c: m["subject_speedup"] for c, m in row["impls"].items() if c != r.subject}
        rows.append(row)
    return {"meta": {**meta, "peaks": {"copy_gbps": peaks.copy_gbps, "matmul_tflops": peaks.matmul_tflops}},
            "results": rows, "headline": headline(rows, meta["mode"] == "gpu")}


def _fmt(v, spec=".3g", none="-"):
    return none if v is None else format(v, spec)


def table(doc: dict) -> str:
    comps = doc["meta"]["competitors"]
    head = ["family", "case", "dir", "dtype", "tritonkit ms"] + [f"{c} ms" for c in comps] + \
        [f"vs {c}" for c in comps] + ["TFLOP/s", "GB/s", "%roof", "check"]
    lines = [head]
    for r in doc["results"]:
        m = r["impls"]
        subj = m.get(r["subject"], {})
        check = {True: "ok", False: "FAIL", None: "-"}[r["check"]]
        if r["error"]:
            check += " ERR"
        case = r["case"] + ("" if r["subject"] == "tritonkit" or r["subject"] in r["case"] else f" [{r['subject']}]")
        lines.append([r["family"], case, r["direction"], r["dtype"].replace("float", "fp").replace("bfp", "bf"),
                      _fmt(subj.get("ms"), ".4g")]
                     + [_fmt(m.get(c, {}).get("ms"), ".4g") for c in comps]
                     + [_fmt(r["speedup"].get(c), ".3g") + ("x" if r["speedup"].get(c) else "") for c in comps]
                     + [_fmt(subj.get("tflops")), _fmt(subj.get("gbps"), ".4g"), _fmt(subj.get("pct_roofline"), ".1f"),
                        check])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    text = ["  ".join(str(v).ljust(w) if i < 4 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
            for row in lines]
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def headline(rows: list[dict], gpu: bool = True) -> list[str]:
    """The issue's targets (GPU targets: off a GPU the verdict is n/a), each with the measured figure."""
    out = []

    def pick(family, direction=None, case=None, subject="tritonkit"):
        return [r for r in rows if r["family"] == family and r["subject"] == subject and not r["error"]
                and (direction is None or r["direction"] == direction) and (case is None or case(r["case"]))]

    def target(label, values, goal, kind="speedup"):
        values = [v for v in values if v is not None]
        if not values:
            return
        worst = min(values)
        unit = "x" if kind == "speedup" else "% of copy BW"
        verdict = ("MET" if worst >= goal else "MISSED") if gpu else "n/a (not a GPU run)"
        out.append(f"{label}: worst {worst:.2f}{unit}, geomean {_geomean(values):.2f}{unit} "
                   f"(target >= {goal:g}{unit}): {verdict}")

    def speedups(rs, comp):
        return [r["speedup"].get(comp) for r in rs]

    def bw(rs):  # rows without FLOPs: % of roofline is % of the measured copy bandwidth
        return [r["impls"][r["subject"]]["pct_roofline"] for r in rs if r["subject"] in r["impls"]]

    target("conv+ReLU fwd vs cuDNN conv then ReLU", speedups(pick("conv", "fwd"), "eager"), 1.0)
    target("pointwise 1x1 conv fwd vs cuDNN", speedups(pick("conv", "fwd", lambda c: " 1x1 " in c), "eager"), 1.1)
    target("depthwise conv fwd vs cuDNN", speedups(pick("dw", "fwd", lambda c: "+bn" not in c), "eager"), 1.0)
    big = pick("linear", "fwd", lambda c: not c.startswith("lenet") and "+bias" not in c)
    target("linear fwd (large, plain) vs cuBLAS", speedups(big, "eager"), 0.9)
    fused = pick("linear", "fwd", lambda c: not c.startswith("lenet") and "+bias+relu" in c)
    target("linear+bias+ReLU fwd (large) vs cuBLAS + ReLU", speedups(fused, "eager"), 1.0)
    target("max-pool fwd (ResNet stem)", bw(pick("pool", "fwd", lambda c: "stem" in c)), 85, "bw")
    sizes = {r["case"].split()[-1] for r in pick("optim")}  # case names end with the size, e.g. "100M"
    largest = max(sizes, key=lambda size: float(size.rstrip("M")), default=None)
    target(f"optimizer step ({largest} params)", bw([r for r in pick("optim") if r["case"].endswith(f" {largest}")]),
           85, "bw")
    lenet = pick("e2e", case=lambda c: c.startswith("lenet"))
    for comp in ("eager", "inductor"):
        target(f"LeNet train step (tritonkit backend) vs {comp}", speedups(lenet, comp), 1.0)
    nets = pick("e2e", case=lambda c: c.startswith(("resnet", "mobilenet")))
    for r in nets + pick("bn") + pick("dw", case=lambda c: "+bn" in c):  # no target: the figures
        out.append(f"{r['case']} {r['direction']} (tritonkit backend): "
                   + ", ".join(f"{v:.2f}x vs {c}" for c, v in r["speedup"].items() if v) + " (no target set)")
    for family in FAMILIES:
        for comp in ("eager", "inductor"):
            g = _geomean(speedups(pick(family), comp))
            if g:
                out.append(f"{family}: geomean speedup over {comp} {g:.2f}x ({len(pick(family))} rows)")
    bad = [r for r in rows if r["check"] is False or r["error"]]
    out.append(f"correctness: {sum(r['check'] is True for r in rows)} rows checked ok, {len(bad)} failed or errored"
               + (": " + ", ".join(f"{r['case']} {r['direction']}" for r in bad[:6]) if bad else ""))
    return out


def write_csv(doc: dict, path: str) -> None:
    cols = ["family", "case", "direction", "dtype", "shape", "subject", "impl", "impl_note", "median_ms", "gbps",
            "tflops", "pct_roofline", "subject_speedup", "floor_ms", "flops", "bytes", "check", "error"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in doc["results"]:
            for impl, m in r["impls"].items():
                w.writerow([r["family"], r["case"], r["direction"], r["dtype"], r["shape"], r["subject"], impl,
                            r["impl_notes"].get(impl, ""), m["ms"], m["gbps"], m["tflops"], m["pct_roofline"],
                            m["subject_speedup"], r["floor_ms"], r["flops"], r["bytes"], r["check"], r["error"]])


def plot(doc: dict, path: str) -> None:
    """One panel per family: the subject's speedup over each competitor, one bar group per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = doc["meta"]["competitors"]
    families = [f for f in FAMILIES if any(r["family"] == f and r["speedup"] for r in doc["results"])]
    if not families:
        return
    heights = [1 + 0.32 * sum(r["family"] == f for r in doc["results"]) * len(comps) for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(10, sum(heights) + 1),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, family in zip(axes[:, 0], families):
        rows = [r for r in doc["results"] if r["family"] == family]
        labels = [f"{r['case']} {r['direction']}" for r in rows]
        step = 0.8 / len(comps)
        for j, comp in enumerate(comps):  # bars grow from 1.0: right = tritonkit faster, left = slower
            vals = [r["speedup"].get(comp) for r in rows]
            ys = [i + j * step for i in range(len(rows))]
            ax.barh(ys, [(v or 1.0) - 1.0 for v in vals], left=1.0, height=step, label=f"vs {comp}")
            for y_, v in zip(ys, vals):
                if v:
                    ax.text(v, y_, f" {v:.3g}x ", va="center", ha="left" if v >= 1 else "right", fontsize=6)
        known = [v for r in rows for v in r["speedup"].values() if v] + [1.0]
        ax.set_xscale("log")
        ax.set_xlim(min(known) / 2, max(known) * 2)  # room for the labels on both sides of 1
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([i + step * (len(comps) - 1) / 2 for i in range(len(rows))])
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{family}: tritonkit speedup (>1 = tritonkit faster)", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    mode = doc["meta"]["mode"]
    fig.suptitle(f"tritonkit bench on {doc['meta']['device']} ({mode})"
                 + (" - interpreter times, not GPU figures" if mode != "gpu" else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================== CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark tritonkit against eager PyTorch and torch.compile",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, short timing (the only mode without a GPU)")
    p.add_argument("--family", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--competitors", default=",".join(COMPETITORS),
                   help="comma-separated subset of eager,inductor (inductor compiles slowly on a CPU)")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json, bench.csv, bench.txt, speedups.png")
    p.add_argument("--filter", default="", help="only cases whose name contains this text")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time limit: cases that would start after a family's share of it are skipped")
    p.add_argument("--headline", metavar="JSON", help="print the headline of an earlier run's bench.json and exit")
    p.set_defaults(func=run)


class UsageError(ValueError):
    """What the user typed cannot run: ``run`` prints it and returns 2, as the ``tritonkit`` command does."""


def _split(text: str, allowed: tuple, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise UsageError(f"unknown {what} {', '.join(bad) if bad else repr(text)}; choices: {','.join(allowed)}")
    return [a for a in allowed if a in items]


def _meta(families, competitors, quick, gpu) -> dict:
    import triton

    info = tritonkit.runtime_info()
    return {"mode": info.mode, "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "tritonkit": tritonkit.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "quick": quick, "families": families, "competitors": competitors,
            "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "timing": "triton.testing.do_bench median (CUDA events)" if gpu else "time.perf_counter median (CPU)",
            "note": "" if gpu else CPU_NOTE}


def run(args) -> int:
    if args.headline:
        with open(args.headline) as f:
            doc = json.load(f)
        print("\n".join(headline(doc["results"], doc["meta"]["mode"] == "gpu")))
        return 0
    gpu = not INTERPRET
    try:
        families = _split(args.family, FAMILIES, "family")
        competitors = _split(args.competitors, COMPETITORS, "competitor")
        if not gpu and not args.quick:
            raise UsageError("full-size benchmarks need a CUDA GPU (kernels run compiled); without one, run "
                             "`tritonkit bench --quick` to check every benchmark in the interpreter")
    except UsageError as e:
        print(f"tritonkit bench: error: {e}", file=sys.stderr)
        return 2
    if not gpu:
        print(CPU_NOTE, flush=True)
    print(tritonkit.runtime_info(), flush=True)
    os.makedirs(args.out, exist_ok=True)
    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # the strongest eager competitor: cuDNN picks its fastest algorithm
    timer = Timer(gpu, args.quick)
    peaks = Peaks(timer, default_device(), args.quick)
    meta = _meta(families, competitors, args.quick, gpu)
    cases = [c for c in plan(families, args.quick, gpu) if args.filter in c[1]]
    start = time.perf_counter()
    try:
        results, skipped = _measure(cases, families, competitors, timer, peaks, args, meta)
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
    doc = _write(args.out, results, peaks, meta, skipped, partial=False)
    print()
    print(table(doc))
    print()
    if skipped:
        print(f"skipped {len(skipped)}: " + "; ".join(skipped))
    print("\n".join(doc["headline"]))
    print(f"wrote {args.out}/bench.json, bench.csv, bench.txt, speedups.png in {time.perf_counter() - start:.0f} s")
    if not gpu:
        print(CPU_NOTE)
    return 1 if any(r.check is False or r.error for r in results) else 0


def _measure(cases, families, competitors, timer, peaks, args, meta) -> tuple[list[Result], list[str]]:
    """Measure the peaks, then every case (results saved after each); SIGTERM ends it early, keeping them."""
    results: list[Result] = []
    skipped: list[str] = []

    def stop(signum, frame):
        raise Stop()

    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    start = time.perf_counter()
    try:
        peaks.measure_copy()
        for key in sorted({c[3] for c in cases if c[3]}):
            peaks.matmul(key)
        print("measured peaks: copy {:.4g} GB/s; matmul {}".format(
            peaks.copy_gbps, ", ".join(f"{k} {v:.4g} TFLOP/s" for k, v in peaks.matmul_tflops.items()) or "-"),
            flush=True)
        deadlines = _deadlines(families, args.budget_s, start)
        for i, (family, name, thunk, *rest) in enumerate(cases):
            need, now = (rest[1] if len(rest) > 1 else 0), time.perf_counter()
            if deadlines and now > deadlines[family]():
                skipped.append(f"{family}: {name} (past the family's share of --budget-s)")
                continue
            if deadlines and need and now + need > start + args.budget_s:
                skipped.append(f"{family}: {name} (needs ~{need} s, {start + args.budget_s - now:.0f} s of "
                               "--budget-s left)")
                continue
            t0 = time.perf_counter()
            try:
                rows = thunk(competitors, timer)
            except Exception as e:  # noqa: BLE001  (a crashed case is reported, the next one runs)
                traceback.print_exc()
                rows = [Result(family, name, "-", "-", "-", error=_short(e))]
            results.extend(rows)
            for r in rows:
                print(f"[{i + 1}/{len(cases)} {time.perf_counter() - t0:5.1f}s] {family} {r.case} {r.direction}: "
                      + ", ".join(f"{k} {v:.4g} ms" for k, v in r.times_ms.items())
                      + ("" if r.check is not False else "  CHECK FAILED: " + r.check_error)
                      + (f"  ERROR {r.error}" if r.error else ""), flush=True)
            _write(args.out, results, peaks, meta, skipped, partial=True)
            _free()
    except (Stop, KeyboardInterrupt):
        skipped.append("stopped by signal: the remaining cases did not run")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return results, skipped


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _deadlines(families, budget_s, start):
    """family -> callable giving its deadline; a family's share is its weight over what is left."""
    if budget_s is None:
        return None
    order = list(families)
    state = {"family": None, "deadline": None}

    def deadline_for(family):
        def get():
            if state["family"] != family:
                now = time.perf_counter()
                left = max(0.0, start + budget_s - now)
                rest = order[order.index(family):]
                share = BUDGET_WEIGHTS[family] / sum(BUDGET_WEIGHTS[f] for f in rest)
                state.update(family=family, deadline=now + left * share)
            return state["deadline"]
        return get

    return {f: deadline_for(f) for f in families}


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write(out, results, peaks, meta, skipped, partial) -> dict:
    doc = to_json(results, peaks, meta)
    doc["skipped"] = skipped
    doc["meta"]["complete"] = not partial and not skipped
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    if partial:
        return doc
    write_csv(doc, os.path.join(out, "bench.csv"))
    text = table(doc)
    with open(os.path.join(out, "bench.txt"), "w") as f:
        note = [CPU_NOTE] if meta["mode"] != "gpu" else []
        f.write("\n".join([*note, str(tritonkit.runtime_info()), text, "", *doc["headline"], *note]) + "\n")
    try:
        plot(doc, os.path.join(out, "speedups.png"))
    except Exception as e:  # noqa: BLE001  (a plotting problem must not lose the measurements)
        print(f"plot failed: {_short(e)}", file=sys.stderr)
    return doc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonkit.bench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
