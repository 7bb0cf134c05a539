"""The joint-graph pass (``tritonkit.lowering.joint``): a training BatchNorm's ReLU'd output read only by
convs is recomputed where it is read (the consuming conv's input prologue, its weight gradient's loads,
the BN backward's mask) and never saved for the backward; judged against eager and a float64 copy."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tritonkit.lowering import explain
from tritonkit.runtime import default_device
from tritonkit.testing import assert_bn_net_trains_like_eager

DEVICE = default_device()


def stack():
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> conv -> BN: two BN outputs read only by a conv."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, bias=False), nn.BatchNorm2d(6), nn.Flatten(), nn.LazyLinear(5))


def stem():
    """A ResNet stem (conv -> BN -> ReLU -> max-pool, stride 2 and padding) and a conv -> BN -> ReLU -> conv
    after it: a BN output read only by a max-pool, then one read only by a conv."""
    return nn.Sequential(nn.Conv2d(3, 8, 5, 2, 2, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))


class Branches(nn.Module):
    """bn1's ReLU output read by a conv and by an add; bn2's only by an add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.bn2(self.conv2(a))) + a
        return self.bn3(self.conv3(b)) + b


def saved_shapes(model, x, t):
    """The shapes of the tensors the compiled training step saves for its backward."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    run = torch.compile(model, backend="tritonkit")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = F.cross_entropy(run(x), t)
    loss.backward()
    return shapes


def labels(report) -> list[str]:
    return [op for g in report.graphs for entry in g.lowered for op in entry.tritonkit]


@pytest.fixture
def data():
    torch.manual_seed(3)
    return ([torch.randn(4, 3, 7, 9, device=DEVICE) for _ in range(3)],
            [torch.randint(0, 5, (4,), device=DEVICE) for _ in range(3)])


def test_the_normalised_activation_is_never_saved(data):
    """With the pass only the two conv outputs are saved at [4, 8, 7, 9] (each BN backward reads its input);
    without it (fuse_relu=False: plain partitioning, no fusion) each ReLU output is saved too."""
    xs, ts = data
    torch.manual_seed(0)
    model = stack().to(DEVICE)
    model(xs[0])  # materialise the lazy linear
    torch._dynamo.reset()
    fused = saved_shapes(model, xs[0], ts[0])
    torch._dynamo.reset()
    plain = []

    def pack(tensor):
        plain.append(tuple(tensor.shape))
        return tensor

    run = torch.compile(model, backend="tritonkit", options={"fuse_relu": False})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.cross_entropy(run(xs[0]), ts[0]).backward()
    activation = (4, 8, 7, 9)
    assert fused.count(activation) == 2, fused
    assert plain.count(activation) >= 4, plain


def explained(build, xs, ts):
    """``(model, report, its tritonkit labels)`` of one training step of ``build()``, everything lowered."""
    torch.manual_seed(0)
    model = build().to(DEVICE)
    model(xs[0])  # materialise the lazy linear
    torch._dynamo.reset()
    report = explain(lambda x, t: F.cross_entropy(model(x), t).backward(), xs[0], ts[0])
    assert not report.fallbacks and not any(g.eager_ops for g in report.graphs), str(report)
    return model, report, labels(report)


def test_explain_shows_every_fold(data):
    xs, ts = data
    model, report, ops = explained(stack, xs, ts)
    assert ops.count("conv2d_bn_stats(input prologue)") == 2, ops
    assert ops.count("batch_norm_stats_from_partials(num_batches_tracked += 1)") == 2, ops
    # each conv reading a recomputed BN + ReLU takes the gradient on through the ReLU and computes that
    # BN backward's reductions: the BN backward only applies
    assert ops.count("conv2d_backward_bn_partials(input prologue)") == 2, ops
    assert ops.count("batch_norm_backward(reductions from the input gradient)") == 2, ops
    assert not any(op.startswith("conv2d_backward(") or "mask from its output" in op for op in ops), ops
    assert not any("batch_norm_apply" in op for op in ops), ops
    # eager's backward count is eager's own: the recomputed applies (folded here) are not in it
    torch._dynamo.reset()
    plain = explain(lambda x, t: F.cross_entropy(model(x), t).backward(), xs[0], ts[0], fuse_relu=False)
    assert [g.launches_eager for g in report.graphs] == [g.launches_eager for g in plain.graphs], (report, plain)
    assert report.launches < plain.launches, (report, plain)


def test_the_stack_trains_like_eager(data):
    torch.manual_seed(0)
    model = stack().to(DEVICE)
    model(data[0][0])
    torch._dynamo.reset()
    assert_bn_net_trains_like_eager(model, *data)


def test_the_stem_pools_through_its_prologue_and_trains_like_eager(data):
    """The stem's BN + ReLU is applied as the max-pool loads it; the pool's backward reads its indices and,
    to take the gradient through the ReLU and give the BN backward its reductions, the BN input: the apply
    runs nowhere."""
    model, _, ops = explained(stem, *data)
    assert ops.count("max_pool2d(input prologue)") == 1 and ops.count("conv2d_bn_stats(input prologue)") == 1, ops
    # both BN backwards get their reductions from the gradient's producer, the pool's backward and the conv's
    assert ops.count("max_pool2d_backward_bn_partials(input prologue)") == 1, ops
    assert ops.count("conv2d_backward_bn_partials(input prologue)") == 1, ops
    assert ops.count("batch_norm_backward(reductions from the input gradient)") == 2, ops
    assert not any("batch_norm_apply" in op for op in ops), ops
    torch._dynamo.reset()
    assert_bn_net_trains_like_eager(model, *data)


def test_activations_read_by_other_ops_are_stored_and_train_like_eager(data):
    """A ReLU output that an add also reads stays stored (the add has no prologue)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Branches().to(DEVICE)
    xs, ts = data
    head = nn.Sequential(model, nn.Flatten(), nn.Linear(6 * 7 * 9, 5)).to(DEVICE)
    report = explain(lambda x, t: F.cross_entropy(head(x), t).backward(), xs[0], ts[0])
    assert not any("input prologue" in op for op in labels(report)), str(report)
    torch._dynamo.reset()
    assert_bn_net_trains_like_eager(head, xs, ts)


def test_graphs_with_an_impure_op_are_partitioned_as_they_are():
    """The default partitioner refuses recomputation tags beside a mutation: the pass then stays out."""
    from tritonkit.lowering.joint import _recomputation_allowed

    def pure(a, b):
        return torch.ops.aten.add.Tensor(torch.ops.aten.relu.default(a), b)

    def mutating(a, b):
        return torch.ops.aten.copy_.default(a, torch.ops.aten.relu.default(b))

    assert _recomputation_allowed(torch.fx.symbolic_trace(pure).graph)
    assert not _recomputation_allowed(torch.fx.symbolic_trace(mutating).graph)


@pytest.mark.parametrize("pass_on", [True, False], ids=["read_masks_directly", "default_partition"])
def test_relu_backward_reads_the_relu_output_itself(pass_on):
    """``read_masks_directly``: the backward graph's ReLU backward reads the saved ReLU output itself, the
    same input the next conv's backward reads (with the default partitioner alone it reads a ``detach`` of
    a second saved copy, which the test tells apart)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    from tritonkit.lowering.joint import partition

    aten, graphs = torch.ops.aten, []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=keep, bw_compiler=keep,
                                     partition_fn=partition if pass_on else default_partition)

    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    torch.compile(model, backend=backend)(torch.randn(2, 3, 8, 8)).sum().backward()
    nodes = list(graphs[-1].graph.nodes)
    (relu_bwd,) = [n for n in nodes if n.target is aten.threshold_backward.default]
    conv_input = next(n for n in nodes if n.target is aten.convolution_backward.default
                      and n.args[1].op == "placeholder" and "relu" in n.args[1].name).args[1]
    assert (relu_bwd.args[1] is conv_input) == pass_on
