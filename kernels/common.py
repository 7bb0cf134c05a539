"""What every kernel module shares: the kernel registry, autotuning by runtime mode, output allocation.

The registry is the single list of kernels tritonkit can launch. Each entry names the raw
``@triton.jit`` function, the autotune configs it may pick on a GPU, and how to build its compile
signature per dtype, so the AOT compile gate (``tritonkit.aot``) compiles exactly what can run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from tritonkit.runtime import INTERPRET

# torch dtype -> Triton pointer element type name used in compile signatures.
TRITON_TYPE = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelSpec:
    """One launchable kernel, as the AOT gate compiles it.

    ``signature(dtype)`` maps every argument of ``fn`` to a Triton type string (``"*fp16"``,
    ``"i32"``, ``"fp32"``, ``"constexpr"``); ``constexprs(dtype)`` gives the constexpr arguments that
    autotune configs do not set (the values a typical launch uses).
    """

    name: str
    fn: object  # the @triton.jit function (JITFunction, or InterpretedFunction in interpreter mode)
    gpu_configs: tuple
    signature: Callable[[torch.dtype], dict]
    constexprs: Callable[[torch.dtype], dict]
    dtypes: tuple = FLOAT_DTYPES
    tensor_core: bool = False  # GEMM-class: half-precision SASS must use HMMA / HGMMA
    notes: str = ""
    spill_ok: str = ""  # non-empty: documented reason why this kernel may spill registers
    config_for_dtype: Callable | None = None  # (config, dtype, arch, launch) -> bool: may a launch use it

    def allows(self, config, dtype: torch.dtype, arch: int | None = None, launch: dict | None = None) -> bool:
        """Whether autotuning a launch in ``dtype`` on compute capability ``arch`` (90 for sm_90; None:
        not known) with arguments ``launch`` (name -> value; None: not known) may pick ``config``, and so
        whether the gate compiles it for that arch and variant."""
        return self.config_for_dtype is None or self.config_for_dtype(config, dtype, arch, launch or {})


REGISTRY: dict[str, KernelSpec] = {}

# TRITONKIT_AUTOTUNE=first: every launch takes the first GPU config its dtype allows, no benchmarking.
# For correctness runs on a GPU (tests), where autotuning each new shape costs more than the test.
_AUTOTUNE_FIRST = os.environ.get("TRITONKIT_AUTOTUNE", "full") == "first"


def tuned_kernel(
    name: str,
    *,
    gpu_configs: list,
    interp_configs: list | None = None,
    interp_heuristics: dict | None = None,
    key: list[str],
    signature: Callable[[torch.dtype], dict],
    constexprs: Callable[[torch.dtype], dict] = lambda dtype: {},
    dtypes: tuple = FLOAT_DTYPES,
    tensor_core: bool = False,
    spill_ok: str = "",
    config_for_dtype: Callable | None = None,
    variants: dict[str, Callable[[torch.dtype], dict]] | None = None,
    tf32: bool = False,
    **autotune_kwargs,
):
    """Register a ``@triton.jit`` kernel and wrap it in ``triton.autotune``.

    On a GPU the autotuner picks among ``gpu_configs``. In the interpreter, where cost is per program
    instance, either ``interp_configs`` (large blocks, a single config so nothing is benchmarked) or
    ``interp_heuristics`` (``triton.heuristics`` values: block sizes computed from the launch's
    arguments, so one program covers as much of the problem as numpy handles well).
    ``config_for_dtype(config, dtype, arch, launch)`` restricts the GPU configs per dtype, arch and
    launch arguments (float32 ``tl.dot`` without TF32 runs on FMA units and needs smaller tiles than
    half precision); the dtype is that of the kernel's first tensor argument. ``variants`` names
    further launch patterns the AOT gate must compile too (``{"strided": constexprs}`` registers
    ``<name>_strided``, the same kernel and configs).
    ``tf32``: the kernel has a ``PRECISION`` constexpr that PyTorch's TF32 switches set for float32
    launches (on by default for convolutions), so every pattern is also registered float32-only with
    ``PRECISION="tf32"`` (``<name>_tf32``, ``<name>_strided_tf32``).
    """
    if (interp_configs is None) == (interp_heuristics is None):
        raise ValueError(f"kernel {name!r}: give exactly one of interp_configs and interp_heuristics")

    def wrap(fn):
        if name in REGISTRY:
            raise ValueError(f"kernel {name!r} registered twice")
        REGISTRY[name] = KernelSpec(
            name=name,
            fn=fn,
            gpu_configs=tuple(gpu_configs),
            signature=signature,
            constexprs=constexprs,
            dtypes=dtypes,
            tensor_core=tensor_core,
            spill_ok=spill_ok,
            config_for_dtype=config_for_dtype,
        )
        patterns = {name: constexprs} | {f"{name}_{suffix}": c for suffix, c in (variants or {}).items()}
        for pattern, pattern_constexprs in patterns.items():
            REGISTRY[pattern] = dataclasses.replace(REGISTRY[name], name=pattern, constexprs=pattern_constexprs)
            if tf32:
                REGISTRY[f"{pattern}_tf32"] = dataclasses.replace(
                    REGISTRY[name], name=f"{pattern}_tf32", dtypes=(torch.float32,),
                    constexprs=lambda dtype, c=pattern_constexprs: {**c(dtype), "PRECISION": "tf32"},
                )
        if INTERPRET and interp_heuristics is not None:
            return triton.heuristics(interp_heuristics)(fn)
        if INTERPRET:
            return triton.autotune(configs=interp_configs, key=key, **autotune_kwargs)(fn)
        spec = REGISTRY[name]

        def prune(configs, named_args, **kwargs):
            first = next(a for a in named_args.values() if isinstance(a, torch.Tensor))
            arch = None
            if first.is_cuda:
                major, minor = torch.cuda.get_device_capability(first.device)
                arch = 10 * major + minor
            allowed = [c for c in configs if spec.allows(c, first.dtype, arch, {**named_args, **kwargs})]
            return allowed[:1] if _AUTOTUNE_FIRST else allowed

        autotune_kwargs["prune_configs_by"] = {"early_config_prune": prune}
        return triton.autotune(configs=gpu_configs, key=key, **autotune_kwargs)(fn)

    return wrap


def per_dtype_configs(half: list, float32: list, hopper_half: list = ()):
    """``(gpu_configs, config_for_dtype)`` for :func:`tuned_kernel` from separate half-precision and
    float32 config lists (a config object may sit in several). ``hopper_half``: half-precision tiles
    only for sm_90 and newer, where wgmma holds the accumulator in fewer registers than mma.sync and a
    tile that spills on sm_80 fits."""
    configs = []
    for config in (*half, *float32, *hopper_half):
        if not any(config is c for c in configs):
            configs.append(config)

    def config_for_dtype(config, dtype, arch=None, launch=None) -> bool:
        if dtype == torch.float32:
            pool = float32
        else:
            pool = (*half, *hopper_half) if arch is None or arch >= 90 else half
        return any(config is c for c in pool)

    return configs, config_for_dtype


def per_flag_configs(flag: str, when_set: tuple, when_clear: tuple):
    """``(gpu_configs, config_for_dtype)`` whose lists depend on the launch's constexpr ``flag`` (unknown:
    set): ``when_set`` and ``when_clear`` are :func:`per_dtype_configs` results. For kernels with two
    code paths whose register needs differ (conv: channel-chunked or flattened reduction)."""
    configs = list(when_set[0]) + [c for c in when_clear[0] if not any(c is k for k in when_set[0])]

    def config_for_dtype(config, dtype, arch=None, launch=None) -> bool:
        branch = when_set if (launch or {}).get(flag, True) else when_clear
        return any(config is c for c in branch[0]) and branch[1](config, dtype, arch, launch)

    return configs, config_for_dtype


# --- output allocation -----------------------------------------------------------------------------
# Tests turn poisoning on so that any element a kernel fails to write shows up as NaN (or as the
# integer sentinel below) instead of as whatever torch.empty happened to return.
_POISON = os.environ.get("TRITONKIT_POISON", "0") == "1"
INT_POISON = -(2**31) + 7


def empty(shape, *, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled (ints: ``INT_POISON``) while poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if _POISON:
        out.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return out


def empty_strided(shape, stride, *, dtype, device) -> torch.Tensor:
    out = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    if _POISON:
        out.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return out


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within this block every kernel output is filled with NaN before its launch."""
    global _POISON
    previous, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = previous


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: ``"tf32"`` only for float32 inputs where PyTorch's switch allows it."""
    return "tf32" if (dtype == torch.float32 and allow_tf32 and not INTERPRET) else "ieee"


def interp_block(n: int, lo: int, hi: int) -> int:
    """A power-of-two block size covering ``n`` (at least ``lo``, at most ``hi``): interpreter heuristics."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# Interpreter tiles: ~2**20 elements per 2-D tile keeps numpy busy and the per-op Python cost small.
INTERP_TILE = 2**20


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def reduction_split(channels: int, rows: int, device: torch.device, max_split: int) -> int:
    """Programs per 64-channel block of a per-channel reduction over ``rows`` (bias and BatchNorm
    gradients, BatchNorm statistics): enough to fill the GPU (~4 per SM), each reducing >= 1024 rows,
    at most ``max_split``; one in the interpreter, where every program costs."""
    if INTERPRET:
        return 1
    return max(1, min(triton.cdiv(4 * _sm_count(device), triton.cdiv(channels, 64)), triton.cdiv(rows, 1024),
                      max_split))


def check_int32_indexing(*tensors: torch.Tensor) -> None:
    """Kernels index with int32 offsets; refuse (before launch) tensors whose extent would overflow."""
    for t in tensors:
        if t is None:
            continue
        extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if extent >= 2**31:
            raise RuntimeError(
                f"tritonkit kernels index with 32-bit offsets; a tensor of shape {tuple(t.shape)} "
                f"spans {extent} elements (limit 2**31 - 1). Split the batch."
            )


__all__ = [
    "KernelSpec",
    "REGISTRY",
    "tuned_kernel",
    "empty",
    "empty_strided",
    "poison_outputs",
    "dot_precision",
    "check_int32_indexing",
    "per_dtype_configs",
    "per_flag_configs",
    "interp_block",
    "reduction_split",
    "INTERP_TILE",
    "TRITON_TYPE",
    "FLOAT_DTYPES",
]
