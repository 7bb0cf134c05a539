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
