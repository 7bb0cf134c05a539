"""The persistent autotuning cache (``kernels/common.py``): keys, bucketing, modes, files, the CLI.

No GPU: a toy kernel is wrapped as on a GPU (``common.INTERPRET`` off while it is decorated), its
launches (``fn.run``) are recorded instead of compiled, and Triton's benchmark function (``do_bench``)
is replaced by one that launches the config and returns a fixed time per block size (BLOCK=128 wins).
Every test uses its own cache dir.
"""

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from tritonkit.cli import main
from tritonkit.kernels import common
from tritonkit.testing import HANG_TIMEOUT_S

CONFIGS = [triton.Config({"BLOCK": b}, num_warps=4) for b in (64, 128, 256)]
TIMES = {64: 3.0, 128: 1.0, 256: 2.0}
NAME = "conv2d_toy_cache"  # the conv2d_ prefix: N is a batch key (bucketed)


def _toy(x, y, N, C, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < N * C), mask=offs < N * C)


def _toy_changed(x, y, N, C, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + offs, tl.load(x + offs, mask=offs < N * C) * 2, mask=offs < N * C)


def make(name=NAME, fn=_toy, configs=CONFIGS):
    """(tuner, record): record["launch"] lists launched BLOCKs, record["bench"] the benchmarked ones."""
    interp, common.INTERPRET = common.INTERPRET, False
    try:
        tuner = common.tuned_kernel(name, gpu_configs=configs, interp_configs=configs[:1], key=["N", "C"],
                                    signature=lambda dtype: {})(triton.jit(fn))
    finally:
        common.INTERPRET = interp
        common.REGISTRY.pop(name, None)
    record = {"launch": [], "bench": []}
    tuner.fn.run = lambda *args, **kwargs: record["launch"].append(kwargs["BLOCK"])

    def do_bench(kernel_call, quantiles):
        kernel_call()
        record["bench"].append(record["launch"][-1])
        return [TIMES[record["launch"][-1]]] * 3

    tuner.__dict__["do_bench"] = do_bench  # Autotuner.do_bench is a cached_property
    return tuner, record


def launch(tuner, N=96, C=10, dtype=torch.float32):
    x = torch.ones(4, dtype=dtype)
    tuner.run(x, x, N, C, grid=(1,), warmup=False)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONKIT_AUTOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(common, "AUTOTUNE_MODE", "full")
    return tmp_path / "cache"


def entries(cache_dir, name=NAME):
    return json.loads((cache_dir / f"{name}.json").read_text())["entries"]


def test_tuning_key_buckets_only_batch_keys():
    tuner, _ = make()
    x = torch.ones(1, dtype=torch.float16)
    assert tuner.tuning_key({"x": x, "N": 96, "C": 96}) == [128, 96, "torch.float16"]
    assert tuner.tuning_key({"x": x, "N": 96, "C": 96}, exact=True) == [96, 96, "torch.float16"]
    other, _ = make("toy_flat_cache")  # no batch key: exact
    assert other.tuning_key({"x": x, "N": 96, "C": 96}) == [96, 96, "torch.float16"]
    assert common.BATCH_KEYS["conv2d_"] == ("N",) and common.BATCH_KEYS["depthwise_conv2d_"] == ("N",)


def test_full_benchmarks_a_miss_once_stores_it_and_a_fresh_process_reuses_it(cache_dir):
    tuner, record = make()
    launch(tuner, N=96)
    assert sorted(record["bench"]) == [64, 128, 256] and record["launch"][-1] == 128
    (entry,) = entries(cache_dir).values()
    assert entry["index"] == 1 and entry["kernel"] == NAME
    assert entry["key"] == [128, 10, "torch.float32", "torch.float32"]  # N bucketed; the dtypes of x and y
    assert entry["gpu"] == "cpu" and entry["triton"] == triton.__version__ and entry["ms"] == 1.0
    launch(tuner, N=96)  # in memory
    launch(make()[0], N=100)  # same bucket, new tuner: from the file
    assert len(record["bench"]) == 3
    # a fresh interpreter, compiled mode (as on a GPU): N=120 is in the bucket (no benchmark), N=200 is not
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_autotune_cache as t
        out = {{}}
        for n in (120, 200):
            tuner, record = t.make()
            t.launch(tuner, N=n)
            out[n] = record
        print(json.dumps(out))
    """)
    env = {**os.environ, "TRITONKIT_INTERPRET": "0", "TRITONKIT_AUTOTUNE": "full"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            timeout=HANG_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["120"] == {"launch": [128], "bench": []}
    assert sorted(out["200"]["bench"]) == [64, 128, 256] and out["200"]["launch"][-1] == 128
    assert len(entries(cache_dir)) == 2


@pytest.mark.parametrize("change", ["gpu", "triton", "tritonkit", "source", "configs", "dtype"])
def test_a_changed_gpu_version_source_or_config_list_misses(monkeypatch, cache_dir, change):
    launch(make()[0])
    fn, configs, dtype = _toy, CONFIGS, torch.float32
    if change == "gpu":
        monkeypatch.setattr(common, "device_name", lambda device: "NVIDIA H200")
    elif change == "triton":
        monkeypatch.setattr(triton, "__version__", "0.0.0")
    elif change == "tritonkit":
        monkeypatch.setattr(common, "_tritonkit_version", lambda: "0.0.0")
    elif change == "source":
        fn = _toy_changed
    elif change == "configs":
        configs = [*CONFIGS[:2], triton.Config({"BLOCK": 256}, num_warps=8)]
    else:
        dtype = torch.float16
    tuner, record = make(fn=fn, configs=configs)
    launch(tuner, dtype=dtype)
    assert sorted(record["bench"]) == [64, 128, 256]
    assert len(entries(cache_dir)) == 2


def test_cached_mode_never_benchmarks(monkeypatch, cache_dir):
    monkeypatch.setattr(common, "AUTOTUNE_MODE", "cached")
    tuner, record = make()
    launch(tuner)  # nothing stored: the first config
    assert record == {"launch": [64], "bench": []} and not cache_dir.exists()
    monkeypatch.setattr(common, "AUTOTUNE_MODE", "full")
    launch(make()[0])
    monkeypatch.setattr(common, "AUTOTUNE_MODE", "cached")
    tuner, record = make()
    launch(tuner, N=70)  # stored for the bucket: used
    assert record == {"launch": [128], "bench": []}


def test_first_mode_neither_reads_nor_writes(monkeypatch, cache_dir):
    launch(make()[0])
    monkeypatch.setattr(common, "AUTOTUNE_MODE", "first")
    tuner, record = make()
    launch(tuner)
    launch(tuner, N=1000)
    assert record == {"launch": [64, 64], "bench": []} and len(entries(cache_dir)) == 1


def test_a_corrupt_file_is_ignored_with_a_warning_and_replaced(cache_dir):
    cache_dir.mkdir()
    (cache_dir / f"{NAME}.json").write_text('{"entries": {"abc": ')
    tuner, record = make()
    with pytest.warns(RuntimeWarning, match="corrupt autotune cache file"):
        launch(tuner)
    assert record["launch"][-1] == 128 and len(record["bench"]) == 3
    assert len(entries(cache_dir)) == 1


def _writer(barrier, worker, count):
    barrier.wait()
    path = common.autotune_cache_dir() / f"{NAME}.json"
    for i in range(count):
        common._write_entry(path, f"{worker}-{i}", {"kernel": NAME, "key": [worker, i], "index": 0})


def test_concurrent_writers_keep_every_entry(cache_dir):
    workers, count = 4, 30
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_writer, args=(barrier, w, count)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(HANG_TIMEOUT_S)
    assert [p.exitcode for p in procs] == [0] * workers
    assert sorted(entries(cache_dir)) == sorted(f"{w}-{i}" for w in range(workers) for i in range(count))
    assert not list(cache_dir.glob("*.tmp"))


def test_cli_show_and_clear(capsys, cache_dir):
    launch(make()[0], N=96)
    launch(make("toy_flat_cache")[0], N=96)
    assert main(["autotune", "--show"]) == 0
    out = capsys.readouterr().out
    assert f"2 autotune cache entries in {cache_dir}" in out
    assert f"{NAME}  key=(128, 10, torch.float32, torch.float32)  config=[BLOCK: 128" in out
    assert "toy_flat_cache  key=(96, 10, torch.float32, torch.float32)" in out and "gpu=cpu" in out and "age=0s" in out
    assert main(["autotune", "--clear"]) == 0
    assert "removed 2 autotune cache entries" in capsys.readouterr().out
    assert main(["autotune", "--show"]) == 0
    assert "0 autotune cache entries" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main(["autotune"])
    assert exit.value.code == 2


def test_an_unwritable_cache_dir_warns_and_still_launches(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TRITONKIT_AUTOTUNE_CACHE", str(tmp_path / "file" / "cache"))  # below a file: no mkdir
    tuner, record = make()
    with pytest.warns(RuntimeWarning, match="could not store an autotune result"):
        launch(tuner)
    assert record["launch"][-1] == 128
