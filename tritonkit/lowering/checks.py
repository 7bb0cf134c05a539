"""Checking a rewrite before it is made: the tritonkit op runs on the graph's fake tensors and its result
must look exactly like the ATen node's (shape, dtype, strides)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from tritonkit.lowering.graph import Fail, New, Spec, aten, val


def _equal(a, b) -> bool:
    return a == b if isinstance(a, int) and isinstance(b, int) else statically_known_true(a == b)


def same_strides(got, want) -> bool:
    """Strides agree on every dim of size > 1 (symbolic sizes: provably)."""
    return all((isinstance(size, int) and size <= 1) or _equal(a, b)
               for size, a, b in zip(want.shape, got.stride(), want.stride()))


class FakeChecker:
    """Runs specs on the fake tensors of one graph (``fake_mode`` None: the graph has none)."""

    def __init__(self, graph: fx.Graph, float_dtypes, device: str, interpret: bool):
        self.float_dtypes, self.device, self.interpret = float_dtypes, device, interpret
        self.fake_mode = next((getattr(val(n), "fake_mode", None) for n in graph.nodes
                               if getattr(val(n), "fake_mode", None) is not None), None)

    def context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self.fake_mode)
        stack.enter_context(torch.no_grad())
        if self.fake_mode.shape_env is not None:  # decide checks on the size hints, add no guards
            stack.enter_context(self.fake_mode.shape_env.suppress_guards())
        return stack

    def fake(self, a, cache: dict):
        """The fake value of a spec argument (``New`` helper nodes are evaluated once per ``cache``)."""
        if isinstance(a, New):
            if id(a) not in cache:
                cache[id(a)] = a.target(*[self.fake(x, cache) for x in a.args])
            return cache[id(a)]
        if isinstance(a, (list, tuple)):
            return type(a)(self.fake(x, cache) for x in a)
        if isinstance(a, fx.Node):
            value = val(a)
            if value is None:
                raise Fail(f"{a.name} has no shape metadata")
            return value
        return a

    def run(self, spec: Spec):
        cache: dict[int, Any] = {}
        with self.context():
            out = spec.op(*self.fake(spec.args, cache))
            for target, args, kwargs in spec.post:
                out = target(out, *self.fake(args, cache), **kwargs)
        return out

    def check(self, spec: Spec) -> None:
        """Run the tritonkit op's fake impl; its result must look exactly like the ATen node's.

        A result in another memory format than ATen's (e.g. a contiguous weight gradient where ATen
        gives channels_last) gets a copy into ATen's format appended; any other difference fails.
        """
        if self.fake_mode is None:
            raise Fail("the graph carries no fake-tensor metadata")
        try:
            out = self.run(spec)
        except Fail:
            raise
        except Exception as e:  # noqa: BLE001  (the op's checks say why it does not apply)
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise Fail(f"tritonkit.{spec.label} rejects the arguments: {first_line}") from None
        expected = val(spec.replaces)
        wanted = expected if isinstance(expected, (tuple, list)) else (expected,)
        if not all(isinstance(w, torch.Tensor) for w in wanted):
            raise Fail(f"{spec.replaces.name} has no tensor metadata")
        if isinstance(expected, (tuple, list)):
            for got, want in zip(out, expected):
                self.same_layout(got, want, spec.label)
            return
        self.same_layout(out, expected, spec.label, strides=False)
        if not same_strides(out, expected):
            fmt = self.memory_format(expected)
            if fmt is None:
                raise Fail(f"tritonkit.{spec.label} would return strides {tuple(out.stride())}, ATen "
                           f"{tuple(expected.stride())}")
            spec.post.append((aten.clone.default, (), {"memory_format": fmt}))
            spec.note = f" + copy to {str(fmt).split('.')[-1]}"
            self.same_layout(self.run(spec), expected, spec.label)

    def memory_format(self, value):
        with self.context():
            if value.is_contiguous():
                return torch.contiguous_format
            if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
        return None

    @staticmethod
    def same_layout(got, want, label, strides: bool = True) -> None:
        shapes_equal = len(got.shape) == len(want.shape) and all(_equal(a, b) for a, b in zip(got.shape, want.shape))
        if got.dtype != want.dtype or not shapes_equal:
            raise Fail(f"tritonkit.{label} would return {got.dtype} {tuple(got.shape)}, "
                       f"ATen {want.dtype} {tuple(want.shape)}")
        if strides and not same_strides(got, want):
            raise Fail(f"tritonkit.{label} would return strides {tuple(got.stride())}, "
                       f"ATen {tuple(want.stride())}")

    def tensors_ok(self, gemm: bool = False, **nodes) -> None:
        """The tensor arguments are float tensors of one dtype on the device tritonkit runs on."""
        dtype = None
        for name, node in nodes.items():
            if node is None:
                continue
            value = val(node)
            if not isinstance(value, torch.Tensor):
                raise Fail(f"{name} has no tensor metadata")
            if value.dtype not in self.float_dtypes:
                raise Fail(f"{name} is {value.dtype}; tritonkit kernels take float32, float16 or bfloat16")
            if value.device.type != self.device:
                raise Fail(f"{name} is on {value.device}; tritonkit kernels run on {self.device} here")
            if dtype is not None and value.dtype != dtype:
                raise Fail(f"mixed dtypes ({dtype} and {value.dtype})")
            dtype = value.dtype
        if gemm and self.interpret and dtype is torch.bfloat16:
            raise Fail("bfloat16 GEMM: Triton's interpreter computes tl.dot on bfloat16 wrongly")

    def params_ok(self, input, **nodes) -> None:
        """BatchNorm's per-channel parameters: float tensors on the device tritonkit runs on, all of
        ``input``'s dtype or all float32 (a half input under autocast keeps float32 parameters)."""
        given = {name: node for name, node in nodes.items() if node is not None}
        self.tensors_ok(**given)
        dtypes = {val(node).dtype for node in given.values()}
        if dtypes and dtypes.pop() not in (val(input).dtype, torch.float32):
            raise Fail(f"parameters of another dtype than the input's {val(input).dtype} and not float32")
