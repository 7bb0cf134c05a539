"""tritonkit picks interpreter or compiled kernels by itself, honours the override, and says which."""

import os
import subprocess
import sys

import pytest
import torch

import tritonkit
from tritonkit.testing import HANG_TIMEOUT_S


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITONKIT_INTERPRET", "TRITON_INTERPRET")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=HANG_TIMEOUT_S)


def test_mode_follows_cuda_availability():
    info = tritonkit.runtime_info()
    assert info.mode == ("gpu" if torch.cuda.is_available() else "interpreter")
    assert info.mode in str(info)


@pytest.mark.parametrize("value,mode", [("1", "interpreter"), ("0", "gpu"), ("true", "interpreter")])
def test_override(value, mode):
    code = "import tritonkit, os; i = tritonkit.runtime_info(); print(i.mode, os.environ['TRITON_INTERPRET'])"
    result = _python(code,
                     TRITONKIT_INTERPRET=value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [mode, "1" if mode == "interpreter" else "0"]


def test_bad_override_is_an_error():
    result = _python("import tritonkit", TRITONKIT_INTERPRET="maybe")
    assert result.returncode != 0
    assert "TRITONKIT_INTERPRET" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is only chosen without a GPU")
def test_kernels_work_when_triton_was_imported_first():
    # torch.compile imports torch._dynamo, which imports Triton before tritonkit can choose a mode.
    code = (
        "import torch._dynamo, triton, torch\n"
        "import tritonkit.functional as TF\n"
        "x = torch.randn(2, 3, 9, 9); w = torch.randn(4, 3, 3, 3)\n"
        "from tritonkit.testing import assert_close\n"
        "assert_close(TF.conv2d(x, w), torch.nn.functional.conv2d(x, w))\n"
        "print('ok')\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
