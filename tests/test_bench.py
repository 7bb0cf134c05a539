"""``tritonkit bench --quick``: every family runs end to end, checks pass, outputs are complete.

In the interpreter these are smoke tests (tiny shapes, CPU times); on a GPU the same tests run the
quick shapes compiled.
"""

import argparse
import csv
import json
import math
import re

import pytest
import torch

from tritonkit import bench
from tritonkit.runtime import INTERPRET


def _args(*argv):
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers())
    return parser.parse_args(["bench", *argv])


def _run(tmp_path, capsys, *argv):
    args = _args("--quick", "--out", str(tmp_path), *argv)
    status = args.func(args)
    out = capsys.readouterr().out
    with open(tmp_path / "bench.json") as f:
        return status, json.load(f), out


def _check_rows(doc, families, competitors):
    rows = doc["results"]
    assert doc["meta"]["complete"] and not doc["skipped"]
    assert doc["meta"]["families"] == families and doc["meta"]["competitors"] == competitors
    assert {r["family"] for r in rows} == set(families)
    for r in rows:
        where = f"{r['family']} {r['case']} {r['direction']}"
        assert not r["error"], where
        assert r["check"] is True, f"{where}: {r['check_error']}"
        assert set(r["times_ms"]) == {r["subject"], *competitors}, where
        assert all(ms > 0 for ms in r["times_ms"].values()), where
        assert set(r["speedup"]) == set(competitors), where
        assert r["bytes"] or r["flops"], where
        assert r["impls"][r["subject"]]["pct_roofline"] > 0, where
    assert doc["meta"]["peaks"]["copy_gbps"] > 0


def test_quick_every_family_against_eager(tmp_path, capsys):
    status, doc, out = _run(tmp_path, capsys, "--competitors", "eager")
    assert status == 0
    _check_rows(doc, list(bench.FAMILIES), ["eager"])
    rows = doc["results"]
    layered = ("conv", "linear", "pool", "relu", "bn", "dw")
    assert {r["direction"] for r in rows if r["family"] in layered} == {"fwd", "bwd"}
    assert {r["case"].split()[0] for r in rows if r["family"] == "optim"} == set(bench.OPTIMIZERS)
    assert {r["subject"] for r in rows if r["family"] == "e2e"} == {"tritonkit", "tritonkit.nn"}
    assert {r["case"].split()[0] for r in rows if r["family"] == "e2e"} == {"lenet", "resnet18", "resnet50",
                                                                             "mobilenet_v2"}
    assert all("torch.compile(backend=tritonkit)" in r["impl_notes"]["tritonkit"] for r in rows
               if r["family"] in ("bn", "dw") or r["case"].startswith(("resnet", "mobilenet")))
    with open(tmp_path / "bench.csv") as f:
        assert len(list(csv.DictReader(f))) == sum(len(r["times_ms"]) for r in rows)
    assert (tmp_path / "speedups.png").stat().st_size > 0
    assert (tmp_path / "bench.txt").read_text().count("\n") > len(rows)
    lines = out.strip().splitlines()
    if INTERPRET:  # said plainly, first and last
        assert "NOT GPU figures" in lines[0] and "NOT GPU figures" in lines[-1]
        assert doc["meta"]["mode"] == "interpreter"


def test_quick_inductor_competitor(tmp_path, capsys):
    status, doc, _ = _run(tmp_path, capsys, "--family", "relu", "--filter", "fp32")
    assert status == 0
    _check_rows(doc, ["relu"], ["eager", "inductor"])
    assert all("torch.compile" in r["impl_notes"]["inductor"] for r in doc["results"])


def test_headline_reads_a_saved_run(tmp_path, capsys):
    rows = [{"family": "optim", "case": f"adam {size}", "direction": "step", "subject": "tritonkit", "error": "",
             "check": True, "speedup": {"eager": 2.0},
             "impls": {"tritonkit": {"pct_roofline": pct}}} for size, pct in (("10M", 50.0), ("100M", 90.0))]
    (tmp_path / "bench.json").write_text(json.dumps({"meta": {"mode": "gpu"}, "results": rows}))
    args = _args("--headline", str(tmp_path / "bench.json"))
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "optimizer step (100M params): worst 90.00% of copy BW" in out and "MET" in out
    assert "optim: geomean speedup over eager 2.00x" in out


@pytest.mark.parametrize("argv, message", [(["--family", "conv,warp"], "unknown family warp; choices: conv,"),
                                           (["--competitors", "tvm"], "unknown competitor tvm; choices: eager,")])
def test_bad_arguments_name_the_choices(tmp_path, capsys, argv, message):
    args = _args("--quick", "--out", str(tmp_path), *argv)
    assert args.func(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not INTERPRET, reason="full-size runs are allowed on a GPU")
def test_full_size_needs_a_gpu(tmp_path, capsys):
    args = _args("--out", str(tmp_path))
    assert args.func(args) == 2
    assert "need a CUDA GPU" in capsys.readouterr().err


def test_param_shapes_and_flop_counts():
    shapes = bench.param_shapes(10_000_000, (1024, 1024))
    assert sum(math.prod(s) for s in shapes) == 10_000_000
    assert sum(s == (1024, 1024) for s in shapes) == 9
    case = bench.conv_case("c", 2, 3, 8, 4, 3, 1, 1, bench.fp32, nhwc=False, bias=True)
    assert case.flops == (2 * 2 * 4 * 8 * 8 * 3 * 3 * 3, 2 * 2 * 2 * 4 * 8 * 8 * 3 * 3 * 3)
    assert case.bytes[0] == 4 * (2 * 3 * 8 * 8 + 4 * 3 * 3 * 3 + 4 + 2 * 4 * 8 * 8)
    assert bench.linear_case("l", 5, 6, 7, bench.fp32, bias=False, relu=False).flops == (2 * 5 * 6 * 7, 4 * 5 * 6 * 7)


def test_a_wrong_kernel_fails_its_check(tmp_path, capsys, monkeypatch):
    import tritonkit.functional as TF

    relu = TF.relu
    monkeypatch.setattr(TF, "relu", lambda x: relu(x) * 1.01)
    status, doc, out = _run(tmp_path, capsys, "--family", "relu", "--filter", "fp32", "--competitors", "eager")
    assert status == 1
    assert all(r["check"] is False and "forward" in r["check_error"] for r in doc["results"])
    assert "CHECK FAILED" in out and "2 failed or errored" in out


def test_a_wrong_bn_layer_fails_its_check(tmp_path, capsys, monkeypatch):
    compiled = bench._compiled

    def off_by_one_percent(impl, module):
        fn = compiled(impl, module)
        return (lambda x: fn(x) * 1.01) if impl == "tritonkit" else fn

    monkeypatch.setattr(bench, "_compiled", off_by_one_percent)
    status, doc, out = _run(tmp_path, capsys, "--family", "bn", "--competitors", "eager")
    assert status == 1 and len(doc["results"]) == 2
    assert all(r["check"] is False and "output: relative error" in r["check_error"] for r in doc["results"])


def test_check_vs_reference_bounds_by_eagers_error():
    from tritonkit.testing import BN_ERROR_FACTOR

    ref = {"y": torch.linspace(-1, 1, 11, dtype=torch.float64), "n": torch.tensor(3)}
    eager = {"y": ref["y"] + 1e-3, "n": torch.tensor(3)}
    ok = BN_ERROR_FACTOR * 1e-3 + bench.BN_FLOOR[torch.float32]
    bench.check_vs_reference({"y": ref["y"] - 0.99 * ok, "n": torch.tensor(3)}, eager, ref, torch.float32)
    for ours, message in (({"y": ref["y"] - 1.01 * ok, "n": torch.tensor(3)}, "y: relative error"),
                          ({"y": ref["y"] * float("nan"), "n": torch.tensor(3)}, "y: relative error inf"),
                          ({"y": ref["y"], "n": torch.tensor(4)}, "n: 4 != 3")):
        with pytest.raises(AssertionError, match=message):
            bench.check_vs_reference(ours, eager, ref, torch.float32)


def test_budget_skips_say_why(tmp_path, capsys, monkeypatch):
    def case(name, need):
        def thunk(competitors, timer):
            return [bench.Result("relu", name, "fwd", "float32", "-", bytes=1e6, times_ms={"tritonkit": 1.0},
                                 check=True)]
        return ("relu", name, thunk, None, need)

    monkeypatch.setattr(bench, "plan", lambda families, quick, gpu: [case("fits", 0), case("too long", 10**6)])
    status, doc, _ = _run(tmp_path, capsys, "--family", "relu", "--competitors", "eager", "--budget-s", "100")
    assert status == 0 and [r["case"] for r in doc["results"]] == ["fits"]
    assert len(doc["skipped"]) == 1
    assert re.fullmatch(r"relu: too long \(needs ~1000000 s, \d+ s of --budget-s left\)", doc["skipped"][0])
    assert not doc["meta"]["complete"]
