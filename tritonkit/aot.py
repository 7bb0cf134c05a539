"""Ahead-of-time compile gate: every registered kernel, compiled for A100 (sm_80) and H100 (sm_90) on a CPU.

Triton's interpreter accepts code that real compilation rejects and says nothing about resource use,
so the gate compiles every ``REGISTRY`` kernel x GPU autotune config x dtype x arch with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (no GPU needed), reads the
cubin with the ``cuobjdump`` that the triton wheel ships, and rejects:

* a compile error, or a ``signature``/``constexprs``/config that does not fit the kernel's arguments;
* register spills: ``STACK`` or ``LOCAL`` non-zero, unless ``KernelSpec.spill_ok`` says why it is fine;
* shared memory (Triton's dynamic + static) above the architecture's opt-in per-block maximum;
* a ``tensor_core`` kernel in float16/bfloat16, or in float32 with a TF32 dot, whose SASS has no
  tensor-core instruction.

The rows of ``tensor_core`` kernels are disassembled (nvdisasm): their tensor-core column and their
main loop's SASS instruction count (``main_loop_size``, the per-step issue cost that the step's MMA work
must cover) come from it. Other kernels' rows are not: nvdisasm costs about 0.65 s of CPU a call
whatever the kernel's size, more than compiling an elementwise kernel (0.1-0.4 s), and no rule reads
their SASS; ``tritonkit inspect NAME --stage resources`` shows any kernel's main loop.

Tensor cores on sm_90: Triton emits wgmma (SASS ``HGMMA``) only when the tile and warp count allow
(a warp group of 4 warps, M tile a multiple of 64); smaller configs fall back to ``mma.sync``
(``HMMA``), which still runs on H100's tensor cores at lower peak. Decision: on sm_90 a single config
passes with HMMA or HGMMA (small-problem configs are legitimately HMMA), but for every half dtype at
least one of the kernel's configs must use HGMMA, so that large problems on H100 can reach wgmma.

Specialization: the JIT compiles one variant per launch pattern: a pointer or an int divisible by 16
gets ``tt.divisibility=16``, an int equal to 1 (a unit stride) becomes a constexpr. The gate marks
every pointer 16-byte aligned (torch allocations are) and, by default, knows nothing of the ints:
the general variant, whose loads cannot vectorize and which can need far more registers than the
variant a contiguous launch runs. ``constexprs(dtype)`` may therefore also give the usual value of
runtime int arguments (``{"stride_xc": 1, "C": 64}``); the gate specializes those as the JIT would
(1 -> constexpr, multiple of 16 -> divisible), so it compiles the variant that usually runs.

Compiles need real ``JITFunction`` objects, so they run in a process whose environment has
``TRITONKIT_INTERPRET=0`` (``run_gate`` starts one; decorating and compiling need no GPU). Results
are cached in ``cache_dir()`` keyed by kernel source hash, signature, constexprs, compile options,
arch and triton version, so an unchanged kernel is not recompiled.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
import triton

from tritonkit.kernels.common import REGISTRY, KernelSpec

# The kernel modules that register into REGISTRY; every module file in kernels/ must be listed here.
KERNEL_MODULES = ("conv", "linear", "pool", "elementwise", "optim", "loss", "norm", "layer_norm", "depthwise")

ARCHS = {"sm_80": 80, "sm_90": 90}
# Opt-in maximum shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100, H100.
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HALF_DTYPES = ("float16", "bfloat16")
STAGES = ("ttir", "ttgir", "llir", "ptx", "sass", "resources")
GATE_VERSION = 4  # bump when a cached record's contents change meaning
_COMPILE_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class SpecError(ValueError):
    """The registry entry does not fit its kernel (signature, constexprs or config)."""


# --- registry ------------------------------------------------------------------------------------------
def import_kernel_modules(extra=()) -> list[str]:
    """Import every module of ``KERNEL_MODULES`` that exists (and ``extra`` modules or ``.py`` files).

    Returns the names in ``KERNEL_MODULES`` that do not exist yet; an import error inside an
    existing module propagates.
    """
    missing = []
    for name in KERNEL_MODULES:
        module = f"tritonkit.kernels.{name}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            missing.append(name)
    for item in extra:
        if str(item).endswith(".py"):
            path = Path(item).resolve()
            module_name = f"_tritonkit_extra_{path.stem}"  # stable: Triton's cache key includes it
            if module_name not in sys.modules:
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
        else:
            importlib.import_module(item)
    return missing


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_label(config) -> str:
    parts = [f"{k}={v}" for k, v in config.kwargs.items()]
    parts.append(f"num_warps={config.num_warps}")
    parts.append(f"num_stages={config.num_stages}")
    if getattr(config, "num_ctas", 1) not in (None, 1):
        parts.append(f"num_ctas={config.num_ctas}")
    if getattr(config, "maxnreg", None) is not None:
        parts.append(f"maxnreg={config.maxnreg}")
    return ", ".join(parts)


def parse_config(spec: KernelSpec, text: str | None):
    """``None`` -> config 0; ``"3"`` -> config 3; ``"BLOCK_M=64,num_warps=4"`` -> the one registered
    config with those values, or a custom config when none matches (it must then set every constexpr
    the registered configs set). Raises ``SpecError`` with the choices on a bad value."""
    configs = spec.gpu_configs
    listing = "\n".join(f"  {i}: {config_label(c)}" for i, c in enumerate(configs))
    if text is None or text.strip().isdigit():
        index = int(text) if text is not None else 0
        if not 0 <= index < len(configs):
            raise SpecError(f"config index {index} out of range for {spec.name}; choices:\n{listing}")
        return configs[index]
    pairs = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--config expects an index or k=v,... pairs, got {text!r}")
        try:
            pairs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            pairs[key.strip()] = value.strip()

    def matches(config):
        return all(
            config.kwargs[k] == v if k in config.kwargs else getattr(config, k, object()) == v for k, v in pairs.items()
        )

    found = [i for i, c in enumerate(configs) if matches(c)]
    if len(found) == 1:
        return configs[found[0]]
    if found:
        raise SpecError(f"--config {text!r} matches configs {found} of {spec.name}; choices:\n{listing}")
    constexpr_names = set().union(*(c.kwargs for c in configs)) if configs else set()
    unknown = sorted(set(pairs) - constexpr_names - set(_COMPILE_OPTIONS))
    missing = sorted(constexpr_names - set(pairs))
    if unknown or missing:
        raise SpecError(
            f"--config {text!r} matches no config of {spec.name} and is not a full custom config "
            f"(unknown keys {unknown}, missing {missing}); choices:\n{listing}"
        )
    options = {k: pairs[k] for k in _COMPILE_OPTIONS if k in pairs}
    return triton.Config({k: pairs[k] for k in constexpr_names}, **options)


# --- compiling -------------------------------------------------------------------------------------------
def _jit_function(spec: KernelSpec):
    fn = spec.fn
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise TypeError(
            f"{spec.name}: REGISTRY holds a {type(fn).__name__}, not a JITFunction; AOT compiles need "
            "TRITONKIT_INTERPRET=0 in the environment before tritonkit is imported (run_gate does this)"
        )
    return fn


def compile_args(spec: KernelSpec, config, dtype: str):
    """(signature, constexprs, attrs, options) for ``triton.compile``; ``SpecError`` if they do not fit."""
    signature = spec.signature(DTYPES[dtype])
    names = list(spec.fn.arg_names)
    if set(signature) != set(names):
        raise SpecError(
            f"signature keys do not match the kernel's arguments: missing {sorted(set(names) - set(signature))}, "
            f"unknown {sorted(set(signature) - set(names))}"
        )
    signature = {name: signature[name] for name in names}
    constexpr_args = [name for name in names if signature[name] == "constexpr"]
    values = dict(spec.constexprs(DTYPES[dtype]))
    not_constexpr = sorted(k for k in config.kwargs if k not in constexpr_args)
    if not_constexpr:
        raise SpecError(f"config sets {not_constexpr}, which are not constexpr arguments")
    constexprs = {k: v for k, v in values.items() if k in constexpr_args}
    typical = {k: v for k, v in values.items() if k not in constexpr_args}
    for name, value in typical.items():  # a runtime int's usual value: specialize it as the JIT would
        if name not in signature or signature[name] not in ("i32", "i64") or type(value) is not int:
            raise SpecError(f"constexprs(dtype) gives {name}={value!r}, but {name} is neither a constexpr nor an int")
        if value == 1:
            signature[name], constexprs[name] = "constexpr", 1
    constexprs.update(config.kwargs)
    unset = [name for name in constexpr_args if name not in constexprs]
    if unset:
        raise SpecError(f"constexpr arguments {unset} get no value from the config or constexprs(dtype)")
    aligned = [
        i
        for i, name in enumerate(names)
        if signature[name].startswith("*") or (name in typical and typical[name] != 1 and typical[name] % 16 == 0)
    ]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    options = {k: getattr(config, k) for k in _COMPILE_OPTIONS if getattr(config, k, None) is not None}
    return signature, constexprs, attrs, options


def compile_kernel(spec: KernelSpec, config, arch: str, dtype: str):
    """``triton.compile`` one kernel/config/dtype for ``arch`` (``"sm_80"``/``"sm_90"``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = compile_args(spec, config, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # triton 3.9's TRITON_DEFAULT_FP_FUSION notice
        return triton.compile(
            ASTSource(_jit_function(spec), signature, constexprs, attrs),
            target=GPUTarget("cuda", ARCHS[arch], 32),
            options=options,
        )


def _nvidia_tool(name: str) -> str:
    from triton.backends import nvidia

    path = Path(nvidia.__file__).parent / "bin" / name
    if path.exists():
        return str(path)
    try:
        from triton import knobs

        return getattr(knobs.nvidia, name).path
    except (ImportError, AttributeError) as err:
        raise FileNotFoundError(f"{name} not found in the triton wheel ({path})") from err


def _nvidia_binary(tool: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        result = subprocess.run([_nvidia_tool(tool), *flags, file.name], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(flags)} failed: {result.stderr.strip()}")
    return result.stdout


def sass(compiled) -> str:
    """``cuobjdump -sass`` of the cubin."""
    return _nvidia_binary("cuobjdump", compiled.asm["cubin"], "-sass")


def analyze(compiled, disassemble: bool = True) -> dict:
    """Resource use of a compiled kernel: registers, STACK/LOCAL bytes, shared memory and, when
    ``disassemble``, the HMMA/HGMMA instructions and the main loop's size in its SASS (nvdisasm, about
    0.65 s of CPU a kernel; ``None`` without it)."""
    usage = _nvidia_binary("cuobjdump", compiled.asm["cubin"], "--dump-resource-usage")
    rows = [
        dict(zip(("registers", "stack", "static_shared", "local"), map(int, m)))
        for m in re.findall(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    ]
    if not rows:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{usage}")
    meta = compiled.metadata
    record = {
        **{key: max(row[key] for row in rows) for key in rows[0]},
        "shared": int(meta.shared),
        "num_warps": int(meta.num_warps),
        "num_stages": int(meta.num_stages),
        "hgmma": None,
        "hmma": None,
        "tensor_core": None,
        "loop_sass": None,
    }
    if disassemble:
        text = _nvidia_binary("nvdisasm", compiled.asm["cubin"], "--print-code", "--no-dataflow")
        hgmma, hmma = (len(re.findall(pattern, text)) for pattern in (r"\bHGMMA\.", r"\bHMMA\."))
        record.update(hgmma=hgmma, hmma=hmma, tensor_core="HGMMA" if hgmma else "HMMA" if hmma else "",
                      loop_sass=main_loop_size(text))
    return record


def main_loop_size(sass_text: str) -> int:
    """SASS instructions in the kernel's main loop: the largest loop with no loop inside it (0: none).

    A proxy for issue pressure per reduction step, set against the step's MMA or FMA work: the index
    math, masks and address arithmetic a step repeats all show up here (PTX would hide them: one
    ``div.s32`` there is ~20 SASS instructions). A loop runs from a label of ``nvdisasm --print-code``
    to the last branch back to it.
    """
    lines = sass_text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L\w+):", line.strip()))}
    loops = {}
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*`\((\.L\w+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loops[labels[m.group(1)]] = i
    spans = sorted(loops.items())
    innermost = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return max((sum(1 for line in lines[a + 1:b + 1] if re.search(r"/\*[0-9a-f]{4,}\*/", line))
                for a, b in innermost), default=0)


def check(spec: KernelSpec, record: dict) -> list[str]:
    """The gate's verdict on one compiled (kernel, config, arch, dtype) record: a list of problems."""
    if record.get("error"):
        return [f"compile error: {record['error']}"]
    problems = []
    if (record["stack"] or record["local"]) and not spec.spill_ok:
        problems.append(
            f"register spills: STACK {record['stack']} B, LOCAL {record['local']} B "
            f"({record['registers']} registers); drop or shrink the config, or set spill_ok='<why>'"
        )
    shared = record["shared"] + record["static_shared"]
    if shared > SHARED_LIMIT[record["arch"]]:
        problems.append(f"shared memory {shared} B > {record['arch']} per-block limit {SHARED_LIMIT[record['arch']]} B")
    if spec.tensor_core and record["dtype"] in HALF_DTYPES and not record["tensor_core"]:
        problems.append("no tensor-core instruction (HMMA/HGMMA) in SASS: tl.dot must take half inputs")
    tf32 = spec.constexprs(DTYPES[record["dtype"]]).get("PRECISION") == "tf32"
    if spec.tensor_core and tf32 and not record["tensor_core"]:
        problems.append("no tensor-core instruction (HMMA/HGMMA) in SASS for a TF32 dot")
    return problems


def check_kernel(spec: KernelSpec, records: list[dict]) -> list[str]:
    """Every problem of one kernel, one line each: per record, and the sm_90 HGMMA rule (module doc)."""
    lines = []
    for rec in records:
        for problem in check(spec, rec):
            where = f"config {rec['config']} [{rec['config_label']}] {rec['arch']} {rec['dtype']}"
            lines.append(f"{spec.name} {where}: {problem}")
    if spec.tensor_core:
        for dtype in HALF_DTYPES:
            sm90 = [r for r in records if r["arch"] == "sm_90" and r["dtype"] == dtype and not r.get("error")]
            if sm90 and not any(r["tensor_core"] == "HGMMA" for r in sm90):
                lines.append(
                    f"{spec.name} sm_90 {dtype}: no config uses HGMMA (wgmma); give it one with num_warps a "
                    "multiple of 4 and BLOCK_M a multiple of 64"
                )
    return lines


# --- the gate run --------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$TRITONKIT_AOT_CACHE_DIR``, else ``$XDG_CACHE_HOME/tritonkit/aot``, else ``~/.cache/tritonkit/aot``."""
    if os.environ.get("TRITONKIT_AOT_CACHE_DIR"):
        return Path(os.environ["TRITONKIT_AOT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tritonkit" / "aot"


def jobs(kernels=None, archs=None, dtypes=None) -> list[tuple[str, int, str, str]]:
    """(kernel, config index, arch, dtype) for every registered kernel (or those named), on every arch
    and dtype or on those named (``archs``: keys of ``ARCHS``; ``dtypes``: names such as ``"float32"``)."""
    names = sorted(REGISTRY) if kernels is None else list(kernels)
    return [
        (name, index, arch, dtype_name(dtype))
        for name in names
        for index in range(len(REGISTRY[name].gpu_configs))
        for arch in ARCHS
        if archs is None or arch in archs
        for dtype in REGISTRY[name].dtypes
        if (dtypes is None or dtype_name(dtype) in dtypes)
        and REGISTRY[name].allows(REGISTRY[name].gpu_configs[index], dtype, ARCHS[arch],
                                  REGISTRY[name].constexprs(dtype))
    ]


def _record_base(job) -> dict:
    name, index, arch, dtype = job
    return {
        "kernel": name,
        "config": index,
        "config_label": config_label(REGISTRY[name].gpu_configs[index]),
        "arch": arch,
        "dtype": dtype,
    }


def _cache_key(job) -> str | None:
    name, index, arch, dtype = job
    spec = REGISTRY[name]
    try:
        signature, constexprs, attrs, options = compile_args(spec, spec.gpu_configs[index], dtype)
    except SpecError:
        return None
    blob = json.dumps(
        [GATE_VERSION, triton.__version__, spec.fn.cache_key, signature, constexprs, sorted(attrs), options, arch,
         spec.tensor_core],
        sort_keys=True,
        default=repr,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def run_job(job) -> dict:
    """Compile and analyze one job; a compile or spec error becomes ``record["error"]``."""
    name, index, arch, dtype = job
    record = _record_base(job)
    start = time.perf_counter()
    try:
        spec = REGISTRY[name]
        compiled = compile_kernel(spec, spec.gpu_configs[index], arch, dtype)
        record.update(analyze(compiled, disassemble=spec.tensor_core), error=None)
    except Exception as err:  # noqa: BLE001  (every failure is a gate finding, reported per job)
        message = f"{type(err).__name__}: {err}".strip()
        record["error"] = message if len(message) < 4000 else message[:4000] + " ..."
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def run_cached_job(job, key: str | None, directory: Path, use_cache: bool) -> dict:
    """``run_job`` through the cache: ``record["cached"]`` says whether it was compiled here.

    Each artifact has its own POSIX record lock (``<key>.lock``), held while it is looked up and
    compiled: concurrent gate runs (pytest-xdist workers, a CLI table beside the suite) wait only for
    an artifact another run is compiling right now, then read it, and never queue behind unrelated
    compiles. The kernel releases a record lock when its process dies, so a killed gate leaves none
    held (the empty ``.lock`` files stay; they are not locks by existing). Records are written to a
    temporary name and renamed, so a reader never sees half a record.
    """
    if key is None:
        return {**run_job(job), "cached": False}
    path = directory / f"{key}.json"
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        if use_cache and path.exists():
            return {**json.loads(path.read_text()), "cached": True}
        record = {**run_job(job), "cached": False}
        if not record["error"]:
            partial = directory / f"{key}.{os.getpid()}.tmp"
            partial.write_text(json.dumps(record))
            os.replace(partial, path)
        return record


def _run_jobs(tasks: list[tuple], workers: int) -> list[dict]:
    """``run_cached_job(*task)`` over ``tasks`` in ``workers`` forked processes (they inherit the
    imported registry).

    A compiler that aborts (an MLIR or LLVM assertion) kills its worker and breaks the pool; the tasks
    left without a result then run one per process, so the crash is recorded against its own job.
    """
    if workers <= 1 or len(tasks) <= 1:
        return [run_cached_job(*task) for task in tasks]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(run_cached_job, *task) for task in tasks]
        results = [None if future.exception() else future.result() for future in futures]
    return [result or _run_isolated(task) for task, result in zip(tasks, results)]


def _run_isolated(task) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        try:
            return pool.submit(run_cached_job, *task).result()
        except BrokenProcessPool:
            return {**_record_base(task[0]), "error": "the compiler process crashed (killed by a signal)",
                    "seconds": 0.0, "cached": False}


def gate(kernels=None, workers: int = 2, use_cache: bool = True, archs=None, dtypes=None) -> dict:
    """Compile every job (in this process, which must be in compiled mode); returns records and stats."""
    todo = jobs(kernels, archs, dtypes)
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records, misses = {}, {}  # misses: cache key (or job) -> jobs that compile to the same thing
    for job in todo:
        key = _cache_key(job)
        path = directory / f"{key}.json" if key else None
        if use_cache and path is not None and path.exists():
            records[job] = {**json.loads(path.read_text()), **_record_base(job), "cached": True}
        else:
            misses.setdefault(key or job, []).append(job)
    tasks = [(same[0], key if isinstance(key, str) else None, directory, use_cache)
             for key, same in misses.items()]
    results = _run_jobs(tasks, workers)
    for same, record in zip(misses.values(), results):
        for job in same:
            records[job] = {**record, **_record_base(job)}
    ordered = [records[job] for job in todo]
    for record in ordered:
        record["problems"] = check(REGISTRY[record["kernel"]], record)
    names = sorted({job[0] for job in todo})
    compiled = [r for r in results if not r["cached"]]
    return {
        "records": ordered,
        "problems": {name: check_kernel(REGISTRY[name], [r for r in ordered if r["kernel"] == name]) for name in names},
        "stats": {
            "jobs": len(todo),
            "compiled": len(compiled),
            "cached": sum(r["cached"] for r in records.values()),
            "compile_seconds": round(sum(r["seconds"] for r in compiled), 1),
            "wall_seconds": round(time.perf_counter() - start, 1),
            "triton": triton.__version__,
        },
    }


def compiled_env() -> dict:
    """The environment for a child process whose kernels are real ``JITFunction``s.

    Triton's own cache goes under ``cache_dir()`` unless ``TRITON_CACHE_DIR`` is set, so nothing else
    sharing ``~/.triton`` can pull files from under a compile.
    """
    env = {**os.environ, "TRITONKIT_INTERPRET": "0", "TRITON_INTERPRET": "0"}
    env.setdefault("TRITON_CACHE_DIR", str(cache_dir() / "triton"))
    return env


def run_gate(kernels=None, extra=(), workers: int = 2, use_cache: bool = True, archs=None, dtypes=None) -> dict:
    """Run ``gate`` in a child process in compiled mode (callable from interpreter-mode processes);
    ``archs``/``dtypes`` restrict the jobs as in :func:`jobs`.

    Triton's own cache goes to a temporary directory: the gate keeps its small records in
    ``cache_dir()``, not the ~0.5 MB of IR and cubin that each of hundreds of compiles leaves.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gate.json"
        request = {"kernels": kernels, "extra": list(map(str, extra)), "workers": workers, "use_cache": use_cache,
                   "archs": archs, "dtypes": dtypes}
        code = "import sys, tritonkit.aot as a; a._gate_child(sys.argv[1], sys.argv[2])"
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps(request), str(out)],
            env={**compiled_env(), "TRITON_CACHE_DIR": str(Path(tmp) / "triton")},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not out.exists():
            raise RuntimeError(f"AOT gate process failed (exit {result.returncode}):\n{result.stderr[-6000:]}")
        return json.loads(out.read_text())


def _gate_child(request: str, out: str) -> None:
    request = json.loads(request)
    import_kernel_modules(request["extra"])
    result = gate(request["kernels"], request["workers"], request["use_cache"], request["archs"], request["dtypes"])
    result["registry"] = sorted(REGISTRY)
    Path(out).write_text(json.dumps(result))


# --- human-readable output -------------------------------------------------------------------------------
def resources_text(spec: KernelSpec, record: dict) -> str:
    rows = [
        ("kernel", spec.name),
        ("config", f"{record['config']}: {record['config_label']}"),
        ("arch", record["arch"]),
        ("dtype", record["dtype"]),
    ]
    if record.get("error"):
        rows.append(("error", record["error"]))
    else:
        rows += [
            ("registers", record["registers"]),
            ("stack", f"{record['stack']} B"),
            ("local", f"{record['local']} B"),
            (
                "shared",
                f"{record['shared']} B dynamic + {record['static_shared']} B static, "
                + f"limit {SHARED_LIMIT[record['arch']]} B",
            ),
            ("warps/stages", f"{record['num_warps']} / {record['num_stages']}"),
        ]
        if record["tensor_core"] is not None:
            rows += [
                ("tensor core", f"{record['tensor_core'] or 'no'} ({record['hgmma']} HGMMA, {record['hmma']} HMMA)"),
                ("main loop", f"{record['loop_sass']} SASS instructions"),
            ]
        else:
            rows += [("SASS", "not disassembled (not a tensor-core kernel)")]
    problems = check(spec, record)
    rows.append(("gate", "ok" if not problems else "; ".join(problems)))
    return "\n".join(f"{key:<13} {value}" for key, value in rows)


def table_rows(text: str) -> dict[tuple, str]:
    """The rows of a rendered table by (kernel, config index, arch, dtype)."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 10 and cells[1].split(":")[0].isdigit():
            rows[cells[0], int(cells[1].split(":")[0]), cells[2], cells[3]] = line
    return rows


def _column(value, empty) -> str:
    """A SASS column of the table: ``-`` where the row was not disassembled."""
    return "-" if value is None else str(value or empty)


def render_table(result: dict) -> str:
    """Markdown table of a gate result (``bench/results/aot.md``)."""
    lines = [
        "# AOT compile gate: resource use per kernel, config, arch, dtype",
        "",
        (
            f"Generated by `python bench/aot_table.py` (or `tritonkit inspect --table`) with triton "
            f"{result['stats']['triton']}; do not edit by hand. Shared memory is Triton's dynamic allocation "
            "plus static; spills are cuobjdump STACK / LOCAL bytes; limits: sm_80 166912 B, sm_90 232448 B. "
            "Main loop: SASS instructions in the largest innermost loop, the per-step issue cost that the "
            "step's MMA work must cover. Tensor core and main loop are read from the SASS of tensor-core kernels "
            "only (`-` elsewhere; `tritonkit inspect NAME --stage resources` disassembles any kernel)."
        ),
        "",
        "| kernel | config | arch | dtype | registers | shared (B) | spills STACK/LOCAL (B) | tensor core "
        "| main loop (SASS) | gate |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for rec in sorted(result["records"], key=lambda r: (r["kernel"], r["config"], r["arch"], r["dtype"])):
        config = f"{rec['config']}: {rec['config_label']}"
        head = f"| {rec['kernel']} | {config} | {rec['arch']} | {rec['dtype']}"
        if rec.get("error"):
            lines.append(f"{head} | - | - | - | - | - | compile error |")
            continue
        problems = rec["problems"]
        verdict = "ok" if not problems else "FAIL: " + "; ".join(p.split(":")[0] for p in problems)
        lines.append(
            f"{head} | {rec['registers']} | {rec['shared'] + rec['static_shared']} | {rec['stack']}/{rec['local']} "
            f"| {_column(rec['tensor_core'], 'no')} | {_column(rec['loop_sass'], 0)} | {verdict} |"
        )
    return "\n".join(lines) + "\n"
