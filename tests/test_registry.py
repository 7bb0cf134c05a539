"""The kernel registry's GPU autotuning rules, checked in compiled mode (no GPU needed to decorate)."""

import json
import os
import subprocess
import sys

import pytest

from tritonkit.testing import HANG_TIMEOUT_S

# For two GEMM-class kernels and two dtypes: how many configs the autotuner keeps, how many the
# dtype allows, whether every kept one is allowed, and whether the first kept is the first allowed.
CODE = """
import json, torch
from tritonkit.kernels import conv, linear
from tritonkit.kernels.common import REGISTRY
out = {}
for name, tuner in (("conv2d_fwd", conv.conv2d_fwd_kernel), ("linear_gemm", linear.gemm_kernel)):
    spec = REGISTRY[name]
    for dtype in (torch.float32, torch.float16):
        kept = tuner.early_config_prune(tuner.configs, {"a": torch.empty(1, dtype=dtype)})
        allowed = [c for c in spec.gpu_configs if spec.allows(c, dtype)]
        out[f"{name}/{dtype}"] = [len(kept), len(allowed), all(any(k is a for a in allowed) for k in kept),
                                  kept[0] is allowed[0]]
# a launch flag picks the list: conv's few-channel (flattened) path keeps smaller tiles only
tuner, spec = conv.conv2d_fwd_kernel, REGISTRY["conv2d_fwd"]
for flag in (True, False):
    kept = tuner.early_config_prune(tuner.configs, {"x": torch.empty(1, dtype=torch.float16)}, CHANNEL_INNER=flag)
    allowed = [c for c in spec.gpu_configs if spec.allows(c, torch.float16, None, {"CHANNEL_INNER": flag})]
    out[f"conv2d_fwd/CHANNEL_INNER={flag}"] = [len(kept), len(allowed), all(any(k is a for a in allowed) for k in kept),
                                               kept[0] is allowed[0], max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
                                                                          for c in allowed)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["full", "first"])
def test_gpu_autotuning_respects_dtype_configs_and_autotune_first(mode):
    env = {**os.environ, "TRITONKIT_INTERPRET": "0", "TRITONKIT_AUTOTUNE": mode}
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env,
                            timeout=HANG_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    for key, (kept, allowed, all_allowed, first_is_first, *_) in counts.items():
        assert all_allowed and first_is_first, key
        assert kept == (1 if mode == "first" else allowed), key
    # the few-channel path's largest tile is smaller than the channel-chunked path's
    assert counts["conv2d_fwd/CHANNEL_INNER=False"][4] < counts["conv2d_fwd/CHANNEL_INNER=True"][4]
    # float32 (FMA dot) is restricted to fewer, smaller tiles than half precision
    assert counts["linear_gemm/torch.float32"][1] < counts["linear_gemm/torch.float16"][1]
