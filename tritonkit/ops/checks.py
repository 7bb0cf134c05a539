"""Argument checks shared by the custom ops. Each raises, before any launch, the exception type that
PyTorch raises for the same mistake, with a message naming the argument."""

from __future__ import annotations

from typing import Sequence

import torch

from tritonkit.kernels.common import FLOAT_DTYPES
from tritonkit.kernels.elementwise import ACTIVATIONS as _KINDS
from tritonkit.runtime import INTERPRET

EPILOGUE_ACTIVATIONS = ("none", *_KINDS)  # an op's ``activation=`` (hardtanh: with min_val/max_val)


def check_float_tensors(op: str, **tensors: torch.Tensor | None) -> None:
    """Same floating dtype and device for every given tensor, on the device tritonkit runs on."""
    given = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(given.items()))
    for name, t in given.items():
        if t.dtype not in FLOAT_DTYPES:
            raise RuntimeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != first.dtype:
            raise RuntimeError(f"{op}: {name} dtype {t.dtype} must match {first_name} dtype {first.dtype}")
        if t.device != first.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                               "expected one device")
    device = first.device
    if device.type == "meta":
        return
    if INTERPRET and device.type != "cpu":
        raise RuntimeError(f"{op}: {first_name} is on {device}, but tritonkit runs in Triton's interpreter "
                           "and expects cpu tensors")
    if not INTERPRET and device.type != "cuda":
        raise RuntimeError(f"{op}: {first_name} is on {device}, but tritonkit's compiled kernels expect cuda tensors")


def check_pair(op: str, name: str, value: Sequence[int]) -> tuple[int, int]:
    """A 2-element int list such as stride or padding."""
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise RuntimeError(f"{op}: expected {name} to be a list of 2 values, but got {name}={list(value)}")
    return value


def epilogue_activation(op: str, relu: bool, activation: str, min_val: float, max_val: float):
    """A fused op's ``relu``/``activation`` arguments as its kernel takes them: None or ``(kind, min_val,
    max_val)``; ValueError (what torch raises for a bad ``approximate=`` too) for an unknown kind or both."""
    if activation not in EPILOGUE_ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {', '.join(map(repr, EPILOGUE_ACTIVATIONS))}, "
                         f"got {activation!r}")
    if relu and activation != "none":
        raise ValueError(f"{op}: relu=True and activation={activation!r} both given; pass one of them")
    return ("relu", 0.0, 0.0) if relu else None if activation == "none" else (activation, min_val, max_val)


def check_channel_vectors(op: str, input: torch.Tensor, channels: int, role: str, **vectors) -> None:
    """1-D per-channel vectors of ``channels`` elements, float32 or ``input``'s dtype, on its device."""
    for name, v in vectors.items():
        if v is None:
            continue
        if v.dim() != 1 or v.shape[0] != channels:
            raise RuntimeError(f"{op}: {name} should be 1-D and contain {channels} elements (one per {role}), "
                               f"not {name} of size {list(v.shape)}")
        if v.dtype not in (torch.float32, input.dtype):
            raise RuntimeError(f"{op}: {name} must be float32 or the input's dtype {input.dtype}, got {v.dtype}")
        if v.device != input.device:
            raise RuntimeError(f"{op}: {name} is on {v.device} but input is on {input.device}; expected one device")


def check_given_together(op, first, second, names):
    if (first is None) != (second is None):
        raise RuntimeError(f"{op}: {names[0]} and {names[1]} must be given together")


def check_input_prologue(op, input, input_mean, input_invstd, input_weight, input_bias, input_relu):
    """A conv's or pool's input prologue (a training BatchNorm applied as the input is loaded, ReLU'd with
    ``input_relu``: ``tritonkit.ops.conv``'s doc); ``input_norm`` for the kernels, or None."""
    check_given_together(op, input_mean, input_invstd, ("input_mean", "input_invstd"))
    if input_mean is None and (input_relu or input_weight is not None or input_bias is not None):
        raise RuntimeError(f"{op}: input_relu, input_weight and input_bias need input_mean and input_invstd")
    check_channel_vectors(op, input, input.shape[1], "input channel", input_mean=input_mean,
                          input_invstd=input_invstd, input_weight=input_weight, input_bias=input_bias)
    return None if input_mean is None else (input_mean, input_invstd, input_weight, input_bias)
