"""tritonkit.models' ResNets have torchvision's layout: its state_dict keys, shapes and parameter counts
(built on the meta device: no weights are initialized, nothing runs in the interpreter)."""

import pytest
import torch

from tritonkit.models import mobilenet_v2, resnet18, resnet50

# from torchvision.models.resnet18() / resnet50(): (number of parameters, state_dict entries, a few keys)
TORCHVISION = {
    resnet18: (11_689_512, 122, {
        "conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,), "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 3, 3), "layer1.1.bn2.bias": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,), "layer4.1.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512), "fc.bias": (1000,)}),
    resnet50: (25_557_032, 320, {
        "conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3), "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer3.5.bn3.running_mean": (1024,), "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048)}),
}


@pytest.mark.parametrize("build", list(TORCHVISION), ids=lambda f: f.__name__)
def test_resnet_matches_torchvision(build):
    count, entries, keys = TORCHVISION[build]
    with torch.device("meta"):
        model = build()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(state) == entries
    assert {k: tuple(state[k].shape) for k in keys} == keys
    assert ("layer1.0.downsample.0.weight" in state) == (build is resnet50)  # 64 -> 256 channels
    # torchvision's "v1.5": the stride sits on the 3x3 conv (a bottleneck's second), the downsample is 1x1/2
    block = model.layer2[0]
    three_by_three = block.conv1 if build is resnet18 else block.conv2
    assert three_by_three.kernel_size == (3, 3) and three_by_three.stride == (2, 2)
    assert block.downsample[0].kernel_size == (1, 1) and block.downsample[0].stride == (2, 2)
    assert all(m.stride == (1, 1) for m in block.modules() if isinstance(m, torch.nn.Conv2d)
               and m is not three_by_three and m is not block.downsample[0])


def test_small_resnet_runs_eagerly():
    torch.manual_seed(0)
    model = resnet50(10, width=4, layers=(1, 1, 1, 1))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.fc.in_features == 4 * 8 * 4


def test_mobilenet_v2_matches_torchvision():
    """torchvision.models.mobilenet_v2(): 3,504,872 parameters, 314 state_dict entries, these keys."""
    with torch.device("meta"):
        model = mobilenet_v2()
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    assert len(state) == 314
    keys = {"features.0.0.weight": (32, 3, 3, 3), "features.1.conv.0.0.weight": (32, 1, 3, 3),
            "features.1.conv.1.weight": (16, 32, 1, 1), "features.2.conv.0.0.weight": (96, 16, 1, 1),
            "features.2.conv.1.0.weight": (96, 1, 3, 3), "features.17.conv.2.weight": (320, 960, 1, 1),
            "features.18.0.weight": (1280, 320, 1, 1), "classifier.1.weight": (1000, 1280)}
    assert {k: tuple(state[k].shape) for k in keys} == keys
    assert model.features[2].conv[1][0].stride == (2, 2) and model.features[2].conv[1][0].groups == 96
    assert [m.use_res_connect for m in model.features[1:18]].count(True) == 10


def test_small_mobilenet_v2_runs_eagerly():
    torch.manual_seed(0)
    model = mobilenet_v2(10, width=0.25, settings=((1, 16, 1, 1), (6, 24, 2, 2)), last_channels=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
