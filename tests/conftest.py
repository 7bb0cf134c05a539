"""Test-wide setup: every kernel output is NaN-poisoned before its launch, so unwritten elements fail."""

import os

os.environ["TRITONKIT_POISON"] = "1"  # read by tritonkit.kernels.common at import

import pytest  # noqa: E402
import torch  # noqa: E402

import tritonkit  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _deterministic_precision():
    """Exact float32 everywhere (no TF32) and a fresh seed per test."""
    torch.manual_seed(0)
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def pytest_report_header(config):
    return str(tritonkit.runtime_info())
