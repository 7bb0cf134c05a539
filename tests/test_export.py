"""torch.export of tritonkit.nn models: the custom ops' fake impls let ``torch.export.export`` trace them, the
exported graph calls ``torch.ops.tritonkit.*`` (dynamic batch included), and the exported program, after a
save/load round trip or ATen decompositions too, computes what the eager model does, gradients included."""

from __future__ import annotations

import pytest
import torch

import tritonkit.nn as tnn
from tritonkit.models import LeNet, TritonkitLeNet


def _targets(ep) -> set[str]:
    return {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}


def _export(model):
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}})


@pytest.mark.parametrize("build", [TritonkitLeNet, lambda: tnn.convert(LeNet())], ids=["TritonkitLeNet", "convert"])
def test_exported_lenet_calls_tritonkit_ops_and_matches_eager(build, tmp_path):
    """Forward on another batch size than traced, after save/load, and backward through the program's module
    (the ops' autograd formulas come along): the same kernels run, so the results are the eager ones."""
    torch.manual_seed(0)
    model = build()
    ep = _export(model)
    targets = _targets(ep)
    assert {"tritonkit.conv2d.default", "tritonkit.max_pool2d.default", "tritonkit.linear.default"} <= targets
    assert not any(t.startswith(("aten.conv", "aten.linear", "aten.addmm", "aten.max_pool")) for t in targets)
    torch.export.save(ep, tmp_path / "lenet.pt2")
    loaded = torch.export.load(tmp_path / "lenet.pt2")
    x = torch.randn(5, 3, 32, 32)
    expected = model(x)
    for program in (ep, loaded):
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)
    module = loaded.module()
    module(x).square().sum().backward()
    expected.square().sum().backward()
    grads = dict(model.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_decomposed_program_keeps_the_custom_ops():
    """``run_decompositions`` (the ATen-level IR other backends take) keeps the tritonkit ops opaque."""
    model = TritonkitLeNet()
    ep = _export(model).run_decompositions()
    assert "tritonkit.conv2d.default" in _targets(ep) and "tritonkit.linear.default" in _targets(ep)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
