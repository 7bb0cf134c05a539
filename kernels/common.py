"""What every kernel module shares: the kernel registry, autotuning by runtime mode, output allocation.

The registry is the single list of kernels tritonkit can launch. Each entry names the raw
``@triton.jit`` function, the autotune configs it may pick on a GPU, and how to build its compile
signature per dtype, so the AOT compile gate (``tritonkit.aot``) compiles exactly what can run.

Autotuning on a GPU, by ``TRITONKIT_AUTOTUNE``:

* ``full`` (default): on a tuning key not seen before, look the best config up in the persistent cache;
  on a miss benchmark every config the launch allows and store the winner.
* ``cached``: the persisted config where there is one, else the first allowed config; never benchmarks
  (a second run, CI, tests that must not spend time tuning).
* ``first``: the first allowed config, cache neither read nor written (correctness runs on a GPU).

The persistent cache is one JSON file per kernel in ``TRITONKIT_AUTOTUNE_CACHE`` (default
``$XDG_CACHE_HOME/tritonkit/autotune``, ``~/.cache/tritonkit/autotune`` without it). An entry is
looked up by a digest of the GPU's name (``torch.cuda.get_device_name``), the Triton and tritonkit
versions, a hash of the kernel's source, a hash of its config list and the tuning key (the values of
the kernel's ``key`` arguments and the dtypes of its tensor arguments, as ``triton.autotune`` keys its
in-memory cache), so a changed kernel, config list, GPU or version never reuses a stale choice. A
stored config is used only where the launch allows it (``config_for_dtype``). Writes hold an
``fcntl`` lock on ``<kernel>.json.lock`` while they merge into the file and replace it atomically
(temporary file + ``os.replace``), so concurrent processes (xdist workers) keep each other's
entries; a file that is not valid JSON is ignored with a warning (and replaced by the next write).
``tritonkit autotune --show`` lists the entries, ``--clear`` deletes them.

Bucketing: ``BATCH_KEYS`` names the tuning-key arguments that are a batch dimension; the persistent
key rounds them up to a power of two (batch 96 reuses what batch 128 measured: the tile shape follows
the per-image shape, the batch only scales the grid). Every other key value is exact. Triton's own
``cache_results`` is not used: it keys the exact values, into hashed directories no command can list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.runtime.autotuner import Autotuner

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

# TRITONKIT_AUTOTUNE (module docstring): first | full | cached.
AUTOTUNE_MODES = ("first", "full", "cached")
AUTOTUNE_MODE = os.environ.get("TRITONKIT_AUTOTUNE", "full").strip().lower() or "full"
if AUTOTUNE_MODE not in AUTOTUNE_MODES:
    raise ValueError(f"TRITONKIT_AUTOTUNE must be one of {', '.join(AUTOTUNE_MODES)}, got {AUTOTUNE_MODE!r}")

# Kernel-name prefix -> tuning-key argument that is the batch size (bucketed to a power of two in the
# persistent cache). Conv and depthwise kernels: N, the images; their tiles run over (OC, OH*OW, C) of one
# image group and N scales the grid. Not linear's M (gemm_kernel also computes weight grads, where M is
# the output features), nor flattened N*H*W extents (pool's P, BatchNorm's A/B), whose best tile can change.
BATCH_KEYS = {"conv2d_": ("N",), "depthwise_conv2d_": ("N",)}


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

    On a GPU the autotuner (a :class:`PersistentAutotuner`: choices persist across processes, by
    ``TRITONKIT_AUTOTUNE``, see the module docstring) picks among ``gpu_configs``. In the interpreter,
    where cost is per program instance, either ``interp_configs`` (large blocks, a single config so
    nothing is benchmarked) or ``interp_heuristics`` (``triton.heuristics`` values: block sizes computed
    from the launch's arguments, so one program covers as much of the problem as numpy handles well).
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
            return allowed[:1] if AUTOTUNE_MODE == "first" else allowed

        autotune_kwargs["prune_configs_by"] = {"early_config_prune": prune}
        return PersistentAutotuner(fn, name, gpu_configs, key, **autotune_kwargs)

    return wrap


# --- persistent autotuning cache (module docstring) ------------------------------------------------
def autotune_cache_dir() -> Path:
    """Where tuned configs persist: ``TRITONKIT_AUTOTUNE_CACHE``, else the user cache dir."""
    if os.environ.get("TRITONKIT_AUTOTUNE_CACHE"):
        return Path(os.environ["TRITONKIT_AUTOTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tritonkit" / "autotune"


@functools.cache
def _tritonkit_version() -> str:
    try:
        return importlib.metadata.version("tritonkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def device_name(device: torch.device) -> str:
    """The GPU's name as the cache keys it (``"cpu"`` for CPU tensors: tests)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_entries(path: Path) -> dict:
    """``{digest: entry}`` of one kernel's cache file; ``{}`` when absent or corrupt (with a warning)."""
    try:
        data = json.loads(path.read_text())
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise TypeError("entries is not an object")
        return entries
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as e:
        warnings.warn(f"tritonkit: cannot read autotune cache file {path}: {e}", RuntimeWarning, stacklevel=2)
        return {}
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"tritonkit: ignoring corrupt autotune cache file {path}: {e}", RuntimeWarning, stacklevel=2)
        return {}


def _write_entry(path: Path, digest: str, entry: dict) -> None:
    """Merge one entry into ``path`` under an exclusive lock; atomic replace (readers never lock)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a corrupt file was already reported by the read; rewrite it
            entries = _read_entries(path)
        entries[digest] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def autotune_cache_entries() -> list[dict]:
    """Every persisted entry (each with its ``path``), oldest first: ``tritonkit autotune --show``."""
    root = autotune_cache_dir()
    entries = [{**e, "path": str(p)} for p in sorted(root.glob("*.json")) for e in _read_entries(p).values()]
    return sorted(entries, key=lambda e: e.get("created", 0))


def clear_autotune_cache() -> int:
    """Delete the persisted cache files; how many entries they held."""
    root = autotune_cache_dir()
    count = 0
    for path in root.glob("*.json"):
        count += len(_read_entries(path))
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".lock").unlink(missing_ok=True)
    return count


def _jsonable(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


class PersistentAutotuner(Autotuner):
    """``triton.autotune``'s Autotuner whose choice per tuning key persists across processes.

    ``run`` picks the config itself unless a benchmark is due (``full`` mode, not in memory nor on
    disk, several configs allowed); then ``Autotuner.run`` benchmarks (its pruning: the allowed configs)
    and the winner is stored. Only ``Autotuner.__init__``'s positional arguments, ``prune_configs``,
    ``best_config`` and ``fn.run`` are relied on (the same in Triton 3.6 to 3.9).
    """

    def __init__(self, fn, name: str, configs: list, key: list[str], reset_to_zero=None, restore_value=None,
                 **kwargs):
        super().__init__(fn, fn.arg_names, configs, key, reset_to_zero, restore_value, **kwargs)
        self.name = name
        self.bucketed = {k for prefix, keys in BATCH_KEYS.items() if name.startswith(prefix) for k in keys}
        self.chosen: dict[tuple, triton.Config] = {}  # exact tuning key -> config, this process

    @functools.cached_property
    def source_hash(self) -> str:
        return _sha(getattr(self.fn, "src", None) or inspect.getsource(self.base_fn))

    @functools.cached_property
    def configs_hash(self) -> str:
        return _sha("\n".join(repr(sorted(c.all_kwargs().items())) for c in self.configs))

    def tuning_key(self, launch: dict, exact: bool = False) -> list:
        """The key values (batch keys bucketed unless ``exact``) and then the tensor arguments' dtypes."""
        values = []
        for k in self.keys:
            if k in launch:
                v = launch[k]
                if not exact and k in self.bucketed and isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    v = triton.next_power_of_2(v)
                values.append(_jsonable(v))
        return values + [str(v.dtype) for v in launch.values() if hasattr(v, "dtype")]

    def cache_ident(self, launch: dict) -> dict:
        """What an entry's digest covers; stored with it."""
        tensor = next((v for v in launch.values() if isinstance(v, torch.Tensor)), None)
        return {
            "kernel": self.name,
            "gpu": device_name(tensor.device) if tensor is not None else "none",
            "triton": triton.__version__,
            "tritonkit": _tritonkit_version(),
            "source": self.source_hash,
            "configs": self.configs_hash,
            "key": self.tuning_key(launch),
        }

    @property
    def cache_path(self) -> Path:
        return autotune_cache_dir() / f"{self.name}.json"

    def _choose(self, allowed: list, digest: str):
        """The config to launch without benchmarking, or None (benchmark)."""
        if AUTOTUNE_MODE == "first" or len(allowed) == 1:
            return allowed[0]
        entry = _read_entries(self.cache_path).get(digest)
        if entry is not None:
            index = entry.get("index")
            if isinstance(index, int) and 0 <= index < len(self.configs):
                stored = self.configs[index]
                if any(stored is c for c in allowed):
                    return stored
        return allowed[0] if AUTOTUNE_MODE == "cached" else None

    def run(self, *args, **kwargs):
        nargs = dict(zip(self.arg_names, args))
        launch = {k: v for k, v in {**nargs, **kwargs}.items() if k in self.arg_names}
        exact = tuple(self.tuning_key(launch, exact=True))
        config = self.chosen.get(exact)
        if config is None:
            self.nargs = nargs
            allowed = self.prune_configs(kwargs)
            ident = self.cache_ident(launch)
            digest = _sha(json.dumps(ident, sort_keys=True))
            config = self._choose(allowed, digest)
            if config is None:
                ret = super().run(*args, **kwargs)  # benchmarks the allowed configs, launches the best
                config = self.chosen[exact] = self.best_config
                timing = getattr(self, "configs_timings", {}).get(config)
                index = next(i for i, c in enumerate(self.configs) if c is config)
                entry = {**ident, "index": index, "config": str(config), "created": time.time(),
                         "ms": timing[0] if isinstance(timing, (list, tuple)) else timing}
                try:
                    _write_entry(self.cache_path, digest, entry)
                except OSError as e:  # a read-only cache dir costs a re-tune next run, not this launch
                    warnings.warn(f"tritonkit: could not store an autotune result in {self.cache_path}: {e}",
                                  RuntimeWarning, stacklevel=2)
                return ret
            self.chosen[exact] = config
        self.best_config = config
        self.nargs = nargs
        try:
            if config.pre_hook is not None:
                config.pre_hook({**nargs, **kwargs, **config.all_kwargs()})
            return self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None


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
    "PersistentAutotuner",
    "AUTOTUNE_MODE",
    "BATCH_KEYS",
    "autotune_cache_dir",
    "autotune_cache_entries",
    "clear_autotune_cache",
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
