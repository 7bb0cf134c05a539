"""Drop-in ``torch.nn`` layers running on tritonkit kernels.

Each layer subclasses its ``torch.nn`` counterpart: same constructor arguments, parameter names,
initialisation and ``state_dict`` keys, so a torch.nn checkpoint loads unchanged. Only ``forward``
differs. :func:`convert` swaps the supported layers of an existing model in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tritonkit import functional as TF


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` on tritonkit's implicit-GEMM conv kernel (a depthwise one on the direct kernels)."""

    activation: str | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return TF.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                         activation=self.activation)


class Conv2dReLU(Conv2d):
    """``relu(conv2d(x))`` as one kernel; the same parameters as ``torch.nn.Conv2d``."""

    activation = "relu"


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` on tritonkit's GEMM kernel."""

    activation: str | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.linear(input, self.weight, self.bias, activation=self.activation)


class LinearReLU(Linear):
    """``relu(linear(x))`` as one kernel; the same parameters as ``torch.nn.Linear``."""

    activation = "relu"


class MaxPool2d(torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` on tritonkit's pooling kernel."""

    def forward(self, input: torch.Tensor):
        return TF.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                             ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(torch.nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` on tritonkit's pooling kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                             self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    """``torch.nn.AdaptiveAvgPool2d`` on tritonkit's pooling kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.adaptive_avg_pool2d(input, self.output_size)


class ReLU(torch.nn.ReLU):
    """``torch.nn.ReLU`` on tritonkit's ReLU kernel (``inplace=True`` writes the result back)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = TF.relu(input)
        return input.copy_(out) if self.inplace else out


class Hardtanh(torch.nn.Hardtanh):
    """``torch.nn.Hardtanh`` on tritonkit's activation kernel (``inplace=True`` writes the result back)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.hardtanh(input, self.min_val, self.max_val, self.inplace)


class ReLU6(torch.nn.ReLU6):
    """``torch.nn.ReLU6`` (hardtanh(0, 6)) on tritonkit's activation kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.hardtanh(input, self.min_val, self.max_val, self.inplace)


class Hardswish(torch.nn.Hardswish):
    """``torch.nn.Hardswish`` on tritonkit's activation kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.hardswish(input, self.inplace)


class Hardsigmoid(torch.nn.Hardsigmoid):
    """``torch.nn.Hardsigmoid`` on tritonkit's activation kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.hardsigmoid(input, self.inplace)


class SiLU(torch.nn.SiLU):
    """``torch.nn.SiLU`` on tritonkit's activation kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.silu(input, self.inplace)


class Sigmoid(torch.nn.Sigmoid):
    """``torch.nn.Sigmoid`` on tritonkit's activation kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.sigmoid(input)


class GELU(torch.nn.GELU):
    """``torch.nn.GELU`` (both ``approximate`` forms) on tritonkit's activation kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return TF.gelu(input, self.approximate)


_SWAPS = {torch.nn.Conv2d: Conv2d, torch.nn.Linear: Linear, torch.nn.MaxPool2d: MaxPool2d, torch.nn.ReLU: ReLU,
          torch.nn.AvgPool2d: AvgPool2d, torch.nn.AdaptiveAvgPool2d: AdaptiveAvgPool2d,
          torch.nn.Hardtanh: Hardtanh, torch.nn.ReLU6: ReLU6, torch.nn.Hardswish: Hardswish,
          torch.nn.Hardsigmoid: Hardsigmoid, torch.nn.SiLU: SiLU, torch.nn.Sigmoid: Sigmoid, torch.nn.GELU: GELU}
_FUSED = {Conv2d: Conv2dReLU, Linear: LinearReLU}


def convert(model: torch.nn.Module, *, fuse_relu: bool = True) -> torch.nn.Module:
    """Make ``model``'s ``torch.nn`` Conv2d (depthwise too), Linear, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d,
    ReLU and activation (Hardtanh, ReLU6, Hardswish, Hardsigmoid, SiLU, Sigmoid, GELU) layers run on
    tritonkit, in place.

    Parameters, buffers and hooks stay where they are (each layer's class is swapped for its tritonkit
    subclass). With ``fuse_relu``, a Conv2d or Linear directly followed by a ReLU inside an
    ``nn.Sequential`` becomes one ``Conv2dReLU`` / ``LinearReLU`` and the ReLU an ``nn.Identity``.
    Returns ``model``.
    """
    for module in model.modules():
        if type(module) in _SWAPS:
            module.__class__ = _SWAPS[type(module)]
    if fuse_relu:
        for module in model.modules():
            if isinstance(module, torch.nn.Sequential):
                _fuse_sequential(module)
    return model


def _fuse_sequential(seq: torch.nn.Sequential) -> None:
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        layer, act = seq._modules[first], seq._modules[second]
        if type(layer) in _FUSED and isinstance(act, torch.nn.ReLU):
            layer.__class__ = _FUSED[type(layer)]
            seq._modules[second] = torch.nn.Identity()
