"""``tritonkit train``: the digits recipe reaches its accuracy, and every path runs end to end."""

import argparse
import json

import pytest
import torch

from tritonkit import train as T


def test_digits_data_is_fixed_and_shaped():
    a = T.load_digits_32()
    b = T.load_digits_32()
    train_x, train_y, test_x, test_y = a
    assert train_x.shape == (1797 - T.TEST_SIZE, 3, 32, 32) and test_x.shape == (T.TEST_SIZE, 3, 32, 32)
    assert torch.equal(test_y, b[3]) and torch.equal(test_x, b[2])
    assert set(test_y.tolist()) == set(range(10))
    assert abs(train_x.mean().item()) < 1e-3


def test_default_recipe_reaches_95_percent_in_eager():
    """The default hyperparameters, run in eager PyTorch (fast here); tritonkit paths match eager
    step for step (tests/test_nn.py, tests/test_backend.py), so they reach the same accuracy."""
    result = T.train(backend="eager", progress=False)
    assert result.test_accuracy >= 0.95, result.test_accuracy


@pytest.mark.parametrize("backend", ["nn", "tritonkit"])
def test_tritonkit_paths_run(backend, tmp_path):
    parser = argparse.ArgumentParser()
    T.add_parser(parser.add_subparsers())
    out = tmp_path / "result.json"
    args = parser.parse_args(["train", "--backend", backend, "--epochs", "1", "--steps-per-epoch", "3",
                              "--batch-size", "4", "--json", str(out), "--compare", "--plot", str(tmp_path / "c.png")])
    assert args.func(args) == 0
    results = json.loads(out.read_text())
    assert [r["backend"] for r in results] == [backend, "eager"]
    ours, eager = results
    assert ours["steps"] == 3 and len(ours["losses"]) == 3
    assert ours["ops_per_step"].get("tritonkit_ops", ours["ops_per_step"].get("tritonkit_kernels")) > 0
    # same seed, same data, same initial weights: the first loss agrees with eager's
    assert ours["losses"][0] == pytest.approx(eager["losses"][0], rel=1e-4)
    assert (tmp_path / "c.png").stat().st_size > 0
