"""`tritonkit inspect`, run as a user runs it: `python -m tritonkit ...` (and the console script)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tritonkit import aot
from tritonkit.cli import main
from tritonkit.kernels.common import REGISTRY
from tritonkit.testing import HANG_TIMEOUT_S

aot.import_kernel_modules()
GEMMS = sorted(name for name, spec in REGISTRY.items() if spec.tensor_core)

# One tiny test-only kernel (float32 only), imported with --import; never registered in kernels/.
TOY = """
import torch
import triton
import triton.language as tl

from tritonkit.kernels.common import tuned_kernel


@tuned_kernel("toy_cli_scale", gpu_configs=[triton.Config({"BLOCK": 256}, num_warps=4),
                                            triton.Config({"BLOCK": 1024}, num_warps=8)],
              interp_configs=[triton.Config({"BLOCK": 1024})], key=["n"],
              signature=lambda dtype: {"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"},
              dtypes=(torch.float32,))
@triton.jit
def toy_cli_scale(x, y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < n) * 2.0, mask=offs < n)
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cli_toy_kernels.py"
    path.write_text(TOY)
    return ["--import", str(path)]


def tritonkit(*args, command=(sys.executable, "-m", "tritonkit"), env=None):
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, timeout=HANG_TIMEOUT_S, check=False, env=env
    )


def test_list_names_every_kernel_via_console_script():
    result = tritonkit("inspect", "--list", command=[str(Path(sys.executable).parent / "tritonkit")])
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()]
    assert listed == sorted(REGISTRY) and listed


@pytest.mark.parametrize(
    "args, bad, choices",
    [
        (["inspect", "no_such_kernel"], "'no_such_kernel'", sorted(REGISTRY)[:1]),
        (["inspect", "x", "--arch", "sm_70"], "'sm_70'", ["sm_80", "sm_90"]),
        (["inspect", "x", "--dtype", "float64"], "'float64'", ["float32", "float16", "bfloat16"]),
        (["inspect", "x", "--stage", "cubin"], "'cubin'", ["ttir", "ttgir", "llir", "ptx", "sass", "resources"]),
        (["inspect", "toy_cli_scale", "--dtype", "float16"], "'float16'", ["float32"]),
        (["inspect", "toy_cli_scale", "--config", "7"], "config index 7", ["BLOCK=256, num_warps=4"]),
        (["launch"], "'launch'", ["inspect"]),
    ],
)
def test_bad_values_name_the_value_and_the_choices(toy, capsys, args, bad, choices):
    """In-process (argument errors happen before any compile); the toy kernel is unregistered after."""
    try:
        try:
            status = main([*args, *toy])
        except SystemExit as exit:  # argparse's own errors
            status = exit.code
        stderr = capsys.readouterr().err
        assert status == 2
        assert bad in stderr and all(choice in stderr for choice in choices), stderr
    finally:
        REGISTRY.pop("toy_cli_scale", None)
        sys.modules.pop("_tritonkit_extra_cli_toy_kernels", None)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_ptx_targets_the_arch(toy, arch):
    result = tritonkit("inspect", "toy_cli_scale", "--arch", arch, "--dtype", "float32", "--stage", "ptx", *toy)
    assert result.returncode == 0, result.stderr
    assert f".target {arch}" in result.stdout and ".entry toy_cli_scale" in result.stdout


def test_every_stage_prints_its_ir(toy):
    """Started in compiled mode (as on a GPU machine), so inspect compiles in-process, no child."""
    env = aot.compiled_env()
    expected = {
        "ttir": "tt.func public @toy_cli_scale",
        "ttgir": '"ttg.num-warps" = 8',
        "llir": "define ",
        "sass": "Function : toy_cli_scale",
        "resources": "registers",
    }
    for stage, text in expected.items():
        result = tritonkit("inspect", "toy_cli_scale", "--stage", stage, "--config", "BLOCK=1024", *toy, env=env)
        assert result.returncode == 0, result.stderr
        assert text in result.stdout, (stage, result.stdout[:2000])
    assert "config        1: BLOCK=1024, num_warps=8" in result.stdout
    assert "gate          ok" in result.stdout


@pytest.mark.parametrize(
    "arch, dtype, mma", [("sm_90", "bfloat16", ("HGMMA", "HMMA")), ("sm_80", "float16", ("HMMA",))]
)
def test_gemm_sass_uses_tensor_cores(arch, dtype, mma):
    assert GEMMS, "no tensor-core kernel registered"
    result = tritonkit("inspect", GEMMS[0], "--arch", arch, "--dtype", dtype, "--stage", "sass")
    assert result.returncode == 0, result.stderr
    assert any(f" {op}." in result.stdout for op in mma), result.stdout[:2000]


def test_table_for_one_kernel(toy, tmp_path):
    out = tmp_path / "aot.md"
    result = tritonkit("inspect", "--table", "toy_cli_scale", "--output", out, *toy)
    assert result.returncode == 0, result.stderr
    rows = [line for line in out.read_text().splitlines() if line.startswith("| toy_cli_scale |")]
    # toy_cli_scale is not a tensor_core kernel: its SASS columns are not read ("-")
    assert len(rows) == 4 and all(row.endswith(" | - | - | ok |") for row in rows), rows
    assert "4 compiles" in result.stderr
