"""tritonkit.nn layers are drop-ins for torch.nn; the seed's LeNet trains the same on both."""

import copy

import pytest
import torch
import torch.nn.functional as F

import tritonkit.functional as TF
import tritonkit.nn as tnn
from tritonkit.models import LeNet, TritonkitLeNet
from tritonkit.testing import TRAINING_TOLERANCES, assert_close, check_against_eager

LAYERS = [
    (tnn.Conv2d, torch.nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (2, 3, 9, 8)),
    (tnn.Conv2d, torch.nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, groups=2,
                                       bias=False, padding_mode="reflect", padding=1), (2, 4, 9, 8)),
    (tnn.Conv2d, torch.nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=4, padding="same"), (3, 7, 7)),
    (tnn.Linear, torch.nn.Linear, dict(in_features=13, out_features=7), (5, 13)),
    (tnn.MaxPool2d, torch.nn.MaxPool2d, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), (2, 3, 10, 9)),
    (tnn.ReLU, torch.nn.ReLU, dict(), (4, 9)),
    (tnn.ReLU6, torch.nn.ReLU6, dict(), (2, 3, 5, 7)),
    (tnn.Hardtanh, torch.nn.Hardtanh, dict(min_val=-0.5, max_val=2.0), (4, 9)),
    (tnn.Hardswish, torch.nn.Hardswish, dict(), (2, 3, 5, 7)),
    (tnn.Hardsigmoid, torch.nn.Hardsigmoid, dict(), (4, 9)),
    (tnn.SiLU, torch.nn.SiLU, dict(), (2, 3, 5, 7)),
    (tnn.Sigmoid, torch.nn.Sigmoid, dict(), (4, 9)),
    (tnn.GELU, torch.nn.GELU, dict(), (2, 3, 5, 7)),
    (tnn.GELU, torch.nn.GELU, dict(approximate="tanh"), (4, 9)),
]


@pytest.mark.parametrize("ours,theirs,kwargs,shape", LAYERS, ids=lambda v: getattr(v, "__name__", None))
def test_layer_matches_torch(ours, theirs, kwargs, shape):
    torch.manual_seed(1)
    reference = theirs(**kwargs)
    torch.manual_seed(1)
    layer = ours(**kwargs)
    # same constructor, same initialisation, same state_dict keys
    assert layer.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[name], value, rtol=0, atol=0)
    x = (torch.randn(shape) * 4).requires_grad_()  # activations: every piece of [-6, 6] and beyond
    check_against_eager(layer, reference, [x])
    for (name, p), (_, q) in zip(layer.named_parameters(), reference.named_parameters()):
        assert_close(p.grad, q.grad, grad=True, msg=name)


def test_fused_layers_match_layer_plus_relu():
    conv = tnn.Conv2dReLU(3, 4, 3)
    lin = tnn.LinearReLU(6, 5)
    x, v = torch.randn(2, 3, 7, 7), torch.randn(3, 6)
    assert_close(conv(x), F.relu(F.conv2d(x, conv.weight, conv.bias)))
    assert_close(lin(v), F.relu(F.linear(v, lin.weight, lin.bias)))


def test_maxpool_return_indices_and_inplace_relu():
    x = torch.randn(2, 3, 8, 8)
    out, idx = tnn.MaxPool2d(2, return_indices=True)(x)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert_close(out, ref)
    assert torch.equal(idx, ref_idx)
    y = x.clone()
    assert tnn.ReLU(inplace=True)(y) is y
    assert_close(y, F.relu(x))


def test_convert_swaps_layers_keeps_weights_and_fuses():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(6 * 14 * 14, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3),
    )
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert tnn.convert(model) is model
    assert [type(m) for m in model] == [tnn.Conv2dReLU, torch.nn.Identity, tnn.MaxPool2d, torch.nn.Flatten,
                                        tnn.LinearReLU, torch.nn.Identity, tnn.Linear]
    assert_close(model(x), expected)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_convert_without_fusion_keeps_relu_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    tnn.convert(model, fuse_relu=False)
    assert [type(m) for m in model] == [tnn.Linear, tnn.ReLU]


def test_torch_checkpoint_loads_into_tritonkit_lenet():
    reference = LeNet()
    model = TritonkitLeNet()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert_close(model(x), reference(x))


def _train(model, x, target, steps, loss_fn):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("loss_fn", [torch.nn.MSELoss(), torch.nn.CrossEntropyLoss()], ids=["mse", "cross_entropy"])
def test_seed_lenet_trains_like_torch(loss_fn):
    """The seed's LeNet, 12 SGD-momentum steps on a batch of 8: the loss curve and final weights match
    torch.nn (the compiled path trains 20 steps in test_lowering)."""
    reference = LeNet()
    model = TritonkitLeNet()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(8, 3, 32, 32)
    target = torch.randn(8, 10) if isinstance(loss_fn, torch.nn.MSELoss) else torch.randint(0, 10, (8,))
    ours = _train(model, x, target, 12, loss_fn)
    theirs = _train(reference, x, target, 12, loss_fn)
    assert ours[-1] < ours[0], "training did not reduce the loss"
    torch.testing.assert_close(ours, theirs, **TRAINING_TOLERANCES)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, **TRAINING_TOLERANCES, msg=name)


INPLACE = [("hardtanh", dict(min_val=-0.5, max_val=2.0)), ("relu6", {}), ("hardswish", {}), ("hardsigmoid", {}),
           ("silu", {})]


@pytest.mark.parametrize("name,kwargs", INPLACE, ids=[n for n, _ in INPLACE])
def test_inplace_activations_write_the_input_and_differentiate_like_eager(name, kwargs):
    """inplace=True: the input holds the result (and is returned); the gradient is eager's in-place one
    (from the original input); a leaf that requires grad is refused as eager refuses it."""
    ours, theirs = getattr(TF, name), getattr(F, name)
    leaf = (torch.randn(3, 4, 5) * 4).requires_grad_()
    ref_leaf = leaf.detach().clone().requires_grad_()
    a, b = leaf * 1, ref_leaf * 1
    assert ours(a, **kwargs, inplace=True) is a
    theirs(b, **kwargs, inplace=True)
    assert_close(a, b)
    grad = torch.randn(a.shape)
    a.backward(grad)
    b.backward(grad)
    assert_close(leaf.grad, ref_leaf.grad)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        theirs(ref_leaf, **kwargs, inplace=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ours(leaf, **kwargs, inplace=True)
    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    expected = theirs(x, **kwargs)
    assert ours(x, **kwargs, inplace=True) is x
    assert_close(x, expected)


def test_activation_functional_bad_arguments_raise_like_eager():
    x = torch.randn(4)
    for fn in (F.hardtanh, TF.hardtanh):
        with pytest.raises(ValueError, match="min_val cannot be greater than max_val"):
            fn(x, 2.0, 1.0)
    for fn in (F.gelu, TF.gelu):
        with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh"):
            fn(x, approximate="erf")


def test_convert_swaps_activation_layers():
    acts = [torch.nn.ReLU6(), torch.nn.Hardtanh(-2.0, 0.5), torch.nn.Hardswish(), torch.nn.Hardsigmoid(),
            torch.nn.SiLU(), torch.nn.Sigmoid(), torch.nn.GELU(), torch.nn.GELU("tanh")]
    reference = torch.nn.Sequential(*[m for a in acts for m in (torch.nn.Linear(6, 6), a)])
    model = tnn.convert(copy.deepcopy(reference))
    assert [type(m) for m in model][1::2] == [tnn.ReLU6, tnn.Hardtanh, tnn.Hardswish, tnn.Hardsigmoid, tnn.SiLU,
                                             tnn.Sigmoid, tnn.GELU, tnn.GELU]
    assert model[3].min_val == -2.0 and model[15].approximate == "tanh"
    x = torch.randn(5, 6) * 3
    check_against_eager(model, reference, [x.requires_grad_()])
