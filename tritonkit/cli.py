"""The ``tritonkit`` command (also ``python -m tritonkit``).

Each subcommand is one ``cmd_<name>(args) -> int`` function plus one parser block in ``build_parser``;
its function returns the exit status. Errors in what the user typed exit with status 2 and a message
that names the bad value and the choices.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _error(message: str) -> int:
    print(f"tritonkit: error: {message}", file=sys.stderr)
    return 2


# --- tritonkit inspect -----------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    """Compile a registered kernel for sm_80/sm_90 (no GPU needed) and print one stage of it."""
    from tritonkit import aot, runtime
    from tritonkit.kernels.common import REGISTRY

    missing = aot.import_kernel_modules(args.imports)
    if missing:
        print(f"tritonkit: warning: kernel modules not found: {', '.join(missing)}", file=sys.stderr)
    if args.name is not None and args.name not in REGISTRY:
        return _error(f"unknown kernel {args.name!r}; choices: {', '.join(sorted(REGISTRY))}")
    if args.table:
        result = aot.run_gate([args.name] if args.name else None, extra=args.imports)
        text = aot.render_table(result)
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
        problems = [line for lines in result["problems"].values() for line in lines]
        stats = result["stats"]
        print(
            f"{stats['jobs']} compiles ({stats['cached']} cached) in {stats['wall_seconds']} s; "
            f"{len(problems)} gate problems",
            file=sys.stderr,
        )
        for line in problems:
            print(line.splitlines()[0], file=sys.stderr)
        return 1 if problems else 0
    if args.list:
        for name in sorted(REGISTRY):
            spec = REGISTRY[name]
            dtypes = ",".join(aot.dtype_name(d) for d in spec.dtypes)
            configs = f"{len(spec.gpu_configs)} config{'s' if len(spec.gpu_configs) != 1 else ''}"
            print(f"{name:<28} {configs:<10} dtypes={dtypes}  tensor_core={'yes' if spec.tensor_core else 'no'}")
        return 0
    if args.name is None:
        return _error("inspect needs a kernel NAME (or --list, --table)")
    spec = REGISTRY[args.name]
    supported = [aot.dtype_name(d) for d in spec.dtypes]
    dtype = args.dtype or ("float16" if "float16" in supported else supported[0])
    if dtype not in supported:
        return _error(f"kernel {args.name!r} does not support dtype {dtype!r}; choices: {', '.join(supported)}")
    try:
        config = aot.parse_config(spec, args.config)
    except aot.SpecError as err:
        return _error(str(err))
    if runtime.INTERPRET:  # kernels here are interpreter functions: compile in a compiled-mode child
        child = [sys.executable, "-m", "tritonkit", *args.argv]
        return subprocess.run(child, env=aot.compiled_env(), check=False).returncode
    try:
        compiled = aot.compile_kernel(spec, config, args.arch, dtype)
    except Exception as err:  # noqa: BLE001  (a compile error is the answer the user asked for)
        print(
            f"tritonkit: {args.name} does not compile for {args.arch} {dtype}: {type(err).__name__}: {err}",
            file=sys.stderr,
        )
        return 1
    if args.stage == "sass":
        text = aot.sass(compiled)
    elif args.stage == "resources":
        index = spec.gpu_configs.index(config) if config in spec.gpu_configs else "custom"
        record = {
            "kernel": args.name,
            "config": index,
            "config_label": aot.config_label(config),
            "arch": args.arch,
            "dtype": dtype,
            "error": None,
            **aot.analyze(compiled),
        }
        text = aot.resources_text(spec, record)
    else:
        text = compiled.asm[args.stage]
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


# --- tritonkit autotune ----------------------------------------------------------------------------------
def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def cmd_autotune(args) -> int:
    """Show or clear the persistent autotuning cache (``kernels/common.py``)."""
    import time

    from tritonkit.kernels.common import autotune_cache_dir, autotune_cache_entries, clear_autotune_cache

    root = autotune_cache_dir()
    if args.clear:
        print(f"removed {clear_autotune_cache()} autotune cache entries from {root}")
        return 0
    entries = autotune_cache_entries()
    print(f"{len(entries)} autotune cache entries in {root}")
    now = time.time()
    for e in entries:
        key = ", ".join(map(str, e.get("key", [])))
        print(f"{e.get('kernel')}  key=({key})  config=[{e.get('config')}]  gpu={e.get('gpu')}  "
              f"triton={e.get('triton')}  age={_age(now - e.get('created', now))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tritonkit import aot

    parser = argparse.ArgumentParser(prog="tritonkit", description="Triton kernels for a conv net's training step.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # tritonkit inspect
    p = commands.add_parser(
        "inspect",
        help="show a kernel's TTIR/TTGIR/LLVM IR/PTX/SASS/resources for sm_80 or sm_90 (no GPU needed)",
        description="Compile a registered kernel ahead of time and print one stage. Examples: "
        "'tritonkit inspect --list'; 'tritonkit inspect linear_gemm --arch sm_90 --dtype bfloat16 --stage sass'.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="registered kernel (see --list); with --table: only it")
    p.add_argument("--list", action="store_true", help="list every registered kernel")
    p.add_argument("--table", action="store_true", help="run the AOT gate over every kernel; print a markdown table")
    p.add_argument("--output", metavar="PATH", help="with --table: write the table here")
    p.add_argument("--arch", choices=list(aot.ARCHS), default="sm_90")
    p.add_argument("--dtype", choices=list(aot.DTYPES), help="default: float16 where supported")
    p.add_argument("--stage", choices=aot.STAGES, default="resources")
    p.add_argument("--config", metavar="INDEX|k=v,...", help="autotune config: index or values (default 0)")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE|FILE.py",
        help="also import this module or file (kernels it registers with tuned_kernel)",
    )
    p.set_defaults(func=cmd_inspect)

    # tritonkit autotune
    p = commands.add_parser(
        "autotune",
        help="show or clear the persistent autotuning cache",
        description="Tuned configs persist per GPU, kernel and tuning key in TRITONKIT_AUTOTUNE_CACHE (default "
        "~/.cache/tritonkit/autotune); TRITONKIT_AUTOTUNE=first|full|cached picks how launches use them.",
    )
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--show", action="store_true", help="list entries: kernel, key, config, GPU, age")
    action.add_argument("--clear", action="store_true", help="delete every entry")
    p.set_defaults(func=cmd_autotune)

    # tritonkit train / tritonkit bench
    from tritonkit import bench, train

    train.add_parser(commands)
    bench.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)
