"""``torch.compile(model, backend="tritonkit")``: AOTAutograd graphs lowered onto tritonkit's custom ops.

How it works: AOTAutograd (no decomposition table, the default partitioner) traces the forward and
backward ATen graphs (or one inference graph under ``torch.no_grad()``); each graph is rewritten in
place by a manual FX pass and run as plain Python (``make_boxed_func``). Rewrites, in every graph:

==========================================================  =============================================
ATen                                                        tritonkit
==========================================================  =============================================
``convolution`` (2-D, not transposed) [+ ``relu``]          ``conv2d(..., relu=True)`` (bias fused)
``max_pool2d_with_indices``                                 ``max_pool2d``
``max_pool2d_with_indices_backward``                        ``max_pool2d_backward``
``addmm(b, x, t(W))`` / ``mm(x, t(W))`` [+ views + ``relu``]  ``linear(x, W, b, relu)``
``mm(a, b)`` (other operands)                               ``linear(a, t(b))``
``mm(t(g), x)``                                             ``linear_weight_grad(g, x)``
``sum(g, all dims but d)``                                  ``bias_grad(g, None, d)``
``convolution_backward``                                    ``conv2d_input_grad`` / ``conv2d_weight_grad``
                                                            / ``bias_grad`` (only the outputs asked for)
``threshold_backward(g, y, 0)`` feeding only the above       folded: ``relu_output=y`` of each consumer
``threshold_backward(g, y, 0)`` otherwise                   ``relu_backward(g, y)``
``relu``                                                    ``relu``
==========================================================  =============================================

A conv (or GEMM) is fused with the ReLU after it only when the ReLU is its only user, so whatever the
partitioner saves for backward is the ReLU output (``threshold_backward`` needs nothing else). In an
inference graph, conv -> ReLU -> max-pool whose unpooled activation has no other use becomes one call
to ``tritonkit::conv2d_relu_maxpool``.

Every rewrite is checked before it is made: dtypes (float32/float16/bfloat16; no bfloat16 GEMM in
Triton's interpreter, whose ``tl.dot`` is wrong on it), device, and the tritonkit op's own fake
implementation run on the node's fake tensors, whose output shape, dtype and strides must equal the
ATen node's. Anything that fails stays ATen, with its reason in the report (policy ``"eager"``), or
raises :class:`LoweringError` naming the node (policy ``"error"``).

Options, ``torch.compile(model, backend="tritonkit", options={...})``:

* ``"fallback"``: ``"eager"`` (default) or ``"error"``.
* ``"report"``: ``True`` prints each compiled graph's report to stderr.
* ``"fuse_relu"`` (default ``True``): fuse ReLUs into convs/GEMMs and fold ``threshold_backward``
  masks into the backward kernels.

``TRITONKIT_LOG=info`` (or ``debug``, which adds the graphs' code) logs reports through the
``tritonkit.lowering`` logger. :func:`explain` runs a model once and returns the reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import operator
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

log = logging.getLogger("tritonkit.lowering")

aten = torch.ops.aten
FALLBACK_POLICIES = ("eager", "error")
_GRAPH_IDS = itertools.count()


class LoweringError(RuntimeError):
    """Raised under ``fallback="error"`` when a node tritonkit has a kernel for cannot be lowered."""


# ------------------------------------------------------------------------------------------ options
@dataclasses.dataclass
class Options:
    fallback: str = "eager"
    report: bool = False
    fuse_relu: bool = True
    collect: list | None = None  # explain() passes a list that receives every GraphReport

    @classmethod
    def parse(cls, options: dict | None) -> Options:
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"tritonkit backend: unknown option(s) {unknown}; known options are "
                             f"{sorted(known - {'collect'})}")
        opts = cls(**options)
        if opts.fallback not in FALLBACK_POLICIES:
            raise ValueError(f"tritonkit backend: fallback must be one of {FALLBACK_POLICIES}, "
                             f"got {opts.fallback!r}")
        return opts


# ------------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class Lowered:
    aten: tuple[str, ...]  # the ATen nodes the rewrite replaced, e.g. ("convolution", "relu")
    tritonkit: tuple[str, ...]  # the tritonkit calls that replaced them, e.g. ("conv2d(relu=True)",)

    def __str__(self) -> str:
        return f"{' + '.join(self.aten)} -> {' + '.join('tritonkit.' + t for t in self.tritonkit)}"


@dataclasses.dataclass
class Fallback:
    node: str
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node} ({self.target}): {self.reason}"


@dataclasses.dataclass
class GraphReport:
    """One compiled ATen graph: what was lowered, what stayed ATen and why, kernel launches."""

    name: str  # e.g. "graph 0 forward"
    kind: str  # "forward", "backward" or "inference"
    lowered: list[Lowered]
    fallbacks: list[Fallback]  # nodes tritonkit has a kernel for that stayed ATen
    eager_ops: dict[str, int]  # launching ATen targets tritonkit has no kernel for -> count
    launches_eager: int  # kernel-launching nodes before lowering
    launches: int  # after lowering

    def __str__(self) -> str:
        launches = f"{self.launches_eager} kernel launches in eager -> {self.launches} with tritonkit"
        lines = [f"{self.name}: {launches}"]
        lines += [f"  lowered   {entry}" for entry in self.lowered]
        lines += [f"  fallback  {entry}" for entry in self.fallbacks]
        lines += [f"  eager     {target} x{count}: no tritonkit kernel"
                  for target, count in self.eager_ops.items()]
        return "\n".join(lines)


@dataclasses.dataclass
class Report:
    """Every graph one :func:`explain` run compiled; ``launches*`` add them up for one step."""

    graphs: list[GraphReport]

    @property
    def launches_eager(self) -> int:
        return sum(g.launches_eager for g in self.graphs)

    @property
    def launches(self) -> int:
        return sum(g.launches for g in self.graphs)

    @property
    def fallbacks(self) -> list[Fallback]:
        return [f for g in self.graphs for f in g.fallbacks]

    def __str__(self) -> str:
        body = "\n".join(str(g) for g in self.graphs)
        return (f"tritonkit backend: {len(self.graphs)} graph(s)\n{body}\n"
                f"per step: {self.launches_eager} kernel launches in eager, {self.launches} with tritonkit")


# ------------------------------------------------------------------------------------ graph helpers
def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else a


def _is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    bound = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _is_view_op(target) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return len(returns) == 1 and returns[0].alias_info is not None and not returns[0].alias_info.is_write


_FREE = {operator.getitem, aten._unsafe_view.default, aten.sym_size.int, aten.sym_stride.int,
         aten.sym_numel.default, aten.sym_storage_offset.default}


def _launches(node: fx.Node) -> int:
    """Kernel launches a node costs: 0 for views, getitem and size queries, one per requested output
    of ``convolution_backward`` (eager runs a kernel for each), one for anything else."""
    if node.op != "call_function" or node.target in _FREE or _is_view_op(node.target):
        return 0
    if not isinstance(node.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return 0  # Python arithmetic on sizes
    if node.target is aten.convolution_backward.default:
        return sum(bool(m) for m in _bind(node)["output_mask"])
    return 1


def _transposed(node) -> fx.Node | None:
    """``x`` when ``node`` is a 2-D transpose of ``x`` (``t``, ``permute [1, 0]``, ``transpose 0 1``)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None
    if node.target is aten.t.default:
        return node.args[0]
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return node.args[0]
    if node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return node.args[0]
    return None


_VIEWS = (aten.view.default, aten._unsafe_view.default)


def _conv_geometry(a: dict, x) -> tuple:
    """(stride, padding, dilation, groups) of a bound convolution / convolution_backward node that
    tritonkit can run (2-D, not transposed); ``_Fail`` otherwise."""
    if a["transposed"]:
        raise _Fail("transposed convolution")
    if _val(x).dim() != 4:
        raise _Fail(f"{_val(x).dim() - 2}-D convolution (tritonkit has 2-D)")
    if any(p != 0 for p in a["output_padding"]):
        raise _Fail(f"output_padding {list(a['output_padding'])}")
    return list(a["stride"]), list(a["padding"]), list(a["dilation"]), a["groups"]


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


@dataclasses.dataclass(eq=False)
class _New:
    """A helper node (view, ``t``, ``sym_size``) a rewrite inserts; emitted once however often used."""

    target: Any
    args: tuple


@dataclasses.dataclass
class _Spec:
    """Replace ``replaces`` with ``op(*args)`` followed by the ``post`` steps.

    ``op`` None means: ``replaces`` (a ReLU fused into the op before it) is replaced by its input.
    Each ``post`` step is ``(target, extra args, kwargs)`` applied to the result: the keepdim view of
    a bias gradient, or a copy into the memory format ATen's result has.
    """

    op: Any
    args: tuple
    replaces: fx.Node
    label: str
    post: list = dataclasses.field(default_factory=list)
    note: str = ""  # what the post steps add, for the report

    def describe(self, relu_output: str | None = None) -> str:
        mask = f"(relu_output={relu_output})" if relu_output else ""
        return f"{self.label}{mask}{self.note}"


class _Fail(Exception):
    """A candidate node that cannot be lowered; the message says why."""


# ------------------------------------------------------------------------------------- the lowering
class _GraphLowering:
    """Rewrites one AOTAutograd graph in place; :meth:`run` returns its :class:`GraphReport`."""

    def __init__(self, gm: fx.GraphModule, name: str, kind: str, opts: Options):
        from tritonkit.kernels.common import FLOAT_DTYPES
        from tritonkit.runtime import INTERPRET, default_device

        self.gm, self.graph, self.name, self.kind, self.opts = gm, gm.graph, name, kind, opts
        self.float_dtypes, self.interpret, self.device = FLOAT_DTYPES, INTERPRET, default_device().type
        self.tk = torch.ops.tritonkit
        self.fake_mode = self._find_fake_mode()
        self.lowered: list[Lowered] = []
        self.fallbacks: list[Fallback] = []
        self.masked: dict[fx.Node, list[_Spec]] = {}  # consumer -> its specs with a folded ReLU mask
        self.touched: set[fx.Node] = set()  # replaced nodes: erased at the end if nothing uses them
        self.consumed: set[fx.Node] = set()  # nodes already rewritten (or fused into another rewrite)
        self.replaced: dict[fx.Node, fx.Node] = {}  # old node -> the node that now holds its value
        self.created: set[fx.Node] = set()  # tritonkit calls the rewrite inserted
        self.emitted: dict[int, fx.Node] = {}  # id(_New) -> its node

    # -------------------------------------------------------------------------------- entry point
    def run(self) -> GraphReport:
        before = sum(_launches(n) for n in self.graph.nodes)
        rules = {
            aten.convolution.default: self._conv,
            aten.relu.default: self._relu,
            aten.max_pool2d_with_indices.default: self._pool,
            aten.max_pool2d_with_indices_backward.default: self._pool_backward,
            aten.addmm.default: self._addmm,
            aten.mm.default: self._mm,
            aten.sum.dim_IntList: self._sum,
            aten.threshold_backward.default: self._threshold_backward,
            aten.convolution_backward.default: self._conv_backward,
        }
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in rules or node in self.consumed:
                continue
            try:
                if node in self.masked:
                    specs, absorbed = self.masked.pop(node), None
                else:
                    result = rules[node.target](node)
                    if result is None:
                        continue
                    specs, absorbed = result
            except _Fail as why:
                self._fall_back(node, str(why))
                continue
            self._emit(specs, absorbed)
            self.consumed.add(node)
        self._dead_code()
        self.graph.lint()
        self.gm.recompile()
        eager_ops: dict[str, int] = {}
        for node in self.graph.nodes:
            if _launches(node) and node not in self.created:
                eager_ops[str(node.target)] = eager_ops.get(str(node.target), 0) + 1
        for f in self.fallbacks:  # candidates that fell back are listed with their reason instead
            eager_ops[f.target] = eager_ops.get(f.target, 0) - 1
        eager_ops = {k: v for k, v in eager_ops.items() if v > 0}
        after = sum(_launches(n) for n in self.graph.nodes)
        return GraphReport(self.name, self.kind, self.lowered, self.fallbacks, eager_ops, before, after)

    def _fall_back(self, node: fx.Node, reason: str) -> None:
        if self.opts.fallback == "error":
            raise LoweringError(f"tritonkit backend ({self.name}): cannot lower node {node.name!r} "
                                f"({node.target}): {reason}")
        self.fallbacks.append(Fallback(node.name, str(node.target), reason))

    # ---------------------------------------------------------------------------- fake-tensor checks
    def _find_fake_mode(self):
        for node in self.graph.nodes:
            fake_mode = getattr(_val(node), "fake_mode", None)
            if fake_mode is not None:
                return fake_mode
        return None

    def _fake_context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self.fake_mode)
        stack.enter_context(torch.no_grad())
        if self.fake_mode.shape_env is not None:  # decide checks on the size hints, add no guards
            stack.enter_context(self.fake_mode.shape_env.suppress_guards())
        return stack

    def _fake(self, a, cache):
        if isinstance(a, _New):
            if id(a) not in cache:
                cache[id(a)] = a.target(*[self._fake(x, cache) for x in a.args])
            return cache[id(a)]
        if isinstance(a, (list, tuple)):
            return type(a)(self._fake(x, cache) for x in a)
        if isinstance(a, fx.Node):
            val = _val(a)
            if val is None:
                raise _Fail(f"{a.name} has no shape metadata")
            return val
        return a

    def _run_fake(self, spec: _Spec):
        cache: dict[int, Any] = {}
        with self._fake_context():
            out = spec.op(*self._fake(spec.args, cache))
            for target, args, kwargs in spec.post:
                out = target(out, *self._fake(args, cache), **kwargs)
        return out

    def _check(self, spec: _Spec) -> None:
        """Run the tritonkit op's fake impl; its result must look exactly like the ATen node's.

        A result in another memory format than ATen's (e.g. a contiguous weight gradient where ATen
        gives channels_last) gets a copy into ATen's format appended; any other difference fails.
        """
        if self.fake_mode is None:
            raise _Fail("the graph carries no fake-tensor metadata")
        try:
            out = self._run_fake(spec)
        except _Fail:
            raise
        except Exception as e:  # noqa: BLE001  (the op's checks say why it does not apply)
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _Fail(f"tritonkit.{spec.label} rejects the arguments: {first_line}") from None
        expected = _val(spec.replaces)
        wanted = expected if isinstance(expected, (tuple, list)) else (expected,)
        if not all(isinstance(w, torch.Tensor) for w in wanted):
            raise _Fail(f"{spec.replaces.name} has no tensor metadata")
        if isinstance(expected, (tuple, list)):
            for got, want in zip(out, expected):
                self._same_layout(got, want, spec.label)
            return
        self._same_layout(out, expected, spec.label, strides=False)
        if not self._same_strides(out, expected):
            fmt = self._memory_format(expected)
            if fmt is None:
                raise _Fail(f"tritonkit.{spec.label} would return strides {tuple(out.stride())}, ATen "
                            f"{tuple(expected.stride())}")
            spec.post.append((aten.clone.default, (), {"memory_format": fmt}))
            spec.note = f" + copy to {str(fmt).split('.')[-1]}"
            self._same_layout(self._run_fake(spec), expected, spec.label)

    def _memory_format(self, val):
        with self._fake_context():
            if val.is_contiguous():
                return torch.contiguous_format
            if val.dim() == 4 and val.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
        return None

    @staticmethod
    def _same_strides(got, want) -> bool:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return all(
            (isinstance(size, int) and size <= 1) or (a == b if isinstance(a, int) and isinstance(b, int)
                                                      else statically_known_true(a == b))
            for size, a, b in zip(want.shape, got.stride(), want.stride()))

    def _same_layout(self, got, want, label, strides: bool = True) -> None:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        shapes_equal = len(got.shape) == len(want.shape) and all(
            a == b if isinstance(a, int) and isinstance(b, int) else statically_known_true(a == b)
            for a, b in zip(got.shape, want.shape))
        if got.dtype != want.dtype or not shapes_equal:
            raise _Fail(f"tritonkit.{label} would return {got.dtype} {tuple(got.shape)}, "
                        f"ATen {want.dtype} {tuple(want.shape)}")
        if strides and not self._same_strides(got, want):
            raise _Fail(f"tritonkit.{label} would return strides {tuple(got.stride())}, "
                        f"ATen {tuple(want.stride())}")

    def _tensors_ok(self, gemm: bool = False, **nodes) -> None:
        """The tensor arguments are float tensors of one dtype on the device tritonkit runs on."""
        dtype = None
        for name, node in nodes.items():
            if node is None:
                continue
            val = _val(node)
            if not isinstance(val, torch.Tensor):
                raise _Fail(f"{name} has no tensor metadata")
            if val.dtype not in self.float_dtypes:
                raise _Fail(f"{name} is {val.dtype}; tritonkit kernels take float32, float16 or bfloat16")
            if val.device.type != self.device:
                raise _Fail(f"{name} is on {val.device}; tritonkit kernels run on {self.device} here")
            if dtype is not None and val.dtype != dtype:
                raise _Fail(f"mixed dtypes ({dtype} and {val.dtype})")
            dtype = val.dtype
        if gemm and self.interpret and dtype is torch.bfloat16:
            raise _Fail("bfloat16 GEMM: Triton's interpreter computes tl.dot on bfloat16 wrongly")

    def _sizes(self, node: fx.Node, source=None) -> list:
        """``node``'s shape as graph arguments: ints, or ``sym_size`` of ``source`` (a tensor of the
        same shape that the rewrite keeps, ``node`` by default) for symbolic dims."""
        from torch.fx.experimental.symbolic_shapes import is_concrete_int

        source = node if source is None else source
        return [int(s) if is_concrete_int(s) else _New(aten.sym_size.int, (source, d))
                for d, s in enumerate(_val(node).shape)]

    def _spec(self, op_name: str, args: tuple, replaces: fx.Node, label: str | None = None,
              post: list | None = None) -> _Spec:
        spec = _Spec(getattr(self.tk, op_name).default, tuple(args), replaces, label or op_name, post or [])
        self._check(spec)
        return spec

    # ------------------------------------------------------------------------------------ emission
    def _materialize(self, a):
        if isinstance(a, _New):
            if id(a) not in self.emitted:
                node = self.graph.call_function(a.target, tuple(self._materialize(x) for x in a.args))
                cache: dict[int, Any] = {}
                with self._fake_context():
                    node.meta["val"] = self._fake(a, cache)
                self.emitted[id(a)] = node
            return self.emitted[id(a)]
        if isinstance(a, (list, tuple)):
            return type(a)(self._materialize(x) for x in a)
        while isinstance(a, fx.Node) and a in self.replaced:  # rewritten since the spec was made
            a = self.replaced[a]
        return a

    def _emit(self, specs: list[_Spec], absorbed: tuple[fx.Node, ...] | None) -> None:
        for spec in specs:
            if spec.op is None:  # a ReLU fused into the GEMM before it: its input now holds the result
                new = spec.replaces.args[0]
            else:
                with self.graph.inserting_before(spec.replaces):
                    new = self.graph.call_function(spec.op, self._materialize(spec.args))
                    new.meta["val"] = self._run_fake(dataclasses.replace(spec, post=[]))
                    self.created.add(new)
                    for target, args, kwargs in spec.post:
                        new = self.graph.call_function(target, (new, *self._materialize(args)), kwargs)
                        self.created.add(new)
                    new.meta["val"] = _val(spec.replaces)
            spec.replaces.replace_all_uses_with(new)
            self.replaced[spec.replaces] = new
            self.touched.add(spec.replaces)
        if absorbed is not None:  # masked consumers are reported with their threshold_backward
            labels = tuple(s.describe() for s in specs if s.op is not None)
            self.lowered.append(Lowered(tuple(n.name for n in absorbed), labels))
        for node in absorbed or ():
            self.touched.add(node)
            self.consumed.add(node)

    def _dead_code(self) -> None:
        """Erase the replaced nodes, and the views/getitems feeding only them."""
        pending = set(self.touched)
        while pending:
            node = pending.pop()
            if node._erased or node.users or node.op != "call_function":
                continue
            pure = node.target is operator.getitem or (
                isinstance(node.target, torch._ops.OpOverload) and not node.target._schema.is_mutable)
            if not pure:
                continue
            inputs = node.all_input_nodes
            self.graph.erase_node(node)
            pending.update(inputs)

    # --------------------------------------------------------------------------------------- rules
    # Each rule returns None (not a candidate), ([specs], absorbed ATen nodes), or raises _Fail.
    def _relu_after(self, node: fx.Node) -> fx.Node | None:
        """The ReLU that is the only consumer of ``node`` (through single-user views), if fusable."""
        if not self.opts.fuse_relu:
            return None
        user = _only_user(node)
        while user is not None and _is_call(user, *_VIEWS) and user.args[0] is node:
            node, user = user, _only_user(user)
        if _is_call(user, aten.relu.default):
            try:
                self._tensors_ok(input=user)
            except _Fail:
                return None
            return user
        return None

    def _conv(self, node):
        a = _bind(node)
        x, w, b = a["input"], a["weight"], a["bias"]
        self._tensors_ok(gemm=True, input=x, weight=w, bias=b)
        geometry = _conv_geometry(a, x)
        relu = self._relu_after(node)
        if relu is not None and relu.args[0] is node:
            fused = self._conv_relu_pool(node, relu, x, w, b, geometry)
            if fused is not None:
                return fused
            spec = self._spec("conv2d", (x, w, b, *geometry, True), relu, "conv2d(relu=True)")
            return [spec], (node, relu)
        return [self._spec("conv2d", (x, w, b, *geometry, False), node)], (node,)

    def _conv_relu_pool(self, conv, relu, x, w, b, geometry):
        """Inference: conv -> ReLU -> max-pool values only (the unpooled activation has no other use)
        as one kernel that never writes the unpooled activation."""
        op = self.tk.conv2d_relu_maxpool.default
        pool = _only_user(relu)
        if not _is_call(pool, aten.max_pool2d_with_indices.default):
            return None
        getitems = list(pool.users)
        if len(getitems) != 1 or not _is_call(getitems[0], operator.getitem) or getitems[0].args[1] != 0:
            return None
        p = _bind(pool)
        args = (x, w, b, *geometry, list(p["kernel_size"]), list(p["stride"]), list(p["padding"]),
                list(p["dilation"]), p["ceil_mode"])
        spec = _Spec(op, args, getitems[0], "conv2d_relu_maxpool")
        try:
            self._check(spec)
        except _Fail as why:
            log.debug("conv+relu+max-pool not fused at %s: %s", conv.name, why)
            return None
        return [spec], (conv, relu, pool)

    def _relu(self, node):
        (x,) = node.args
        self._tensors_ok(input=x)
        return [self._spec("relu", (x,), node)], (node,)

    def _pool(self, node):
        a = _bind(node)
        self._tensors_ok(input=a["self"])
        args = (a["self"], list(a["kernel_size"]), list(a["stride"]), list(a["padding"]),
                list(a["dilation"]), a["ceil_mode"])
        return [self._spec("max_pool2d", args, node)], (node,)

    def _pool_backward(self, node):
        a = _bind(node)
        self._tensors_ok(grad_output=a["grad_output"], input=a["self"])
        args = (a["grad_output"], a["self"], a["indices"], list(a["kernel_size"]), list(a["stride"]),
                list(a["padding"]), list(a["dilation"]), a["ceil_mode"])
        return [self._spec("max_pool2d_backward", args, node)], (node,)

    def _gemm(self, node, x, mat2, bias):
        """``x @ mat2 (+ bias)`` as ``linear`` (fusing a ReLU after it); ``mm(t(g), y)`` as
        ``linear_weight_grad``."""
        weight = _transposed(mat2)
        g = _transposed(x)
        if bias is None and g is not None and weight is None:
            return [self._spec("linear_weight_grad", (g, mat2, None), node)], (node,)
        if weight is None:
            weight = _New(aten.t.default, (mat2,))
        relu = self._relu_after(node)
        if relu is not None:
            spec = self._spec("linear", (x, weight, bias, True), node, "linear(relu=True)")
            # the ReLU (after any views) is replaced by its input: the (viewed) fused result
            return [spec, _Spec(None, (), relu, "")], (node, relu)
        return [self._spec("linear", (x, weight, bias, False), node)], (node,)

    def _mm(self, node):
        x, mat2 = node.args
        self._tensors_ok(gemm=True, mat1=x, mat2=mat2)
        return self._gemm(node, x, mat2, None)

    def _addmm(self, node):
        a = _bind(node)
        bias, x, mat2 = a["self"], a["mat1"], a["mat2"]
        self._tensors_ok(gemm=True, bias=bias, mat1=x, mat2=mat2)
        if a["beta"] != 1 or a["alpha"] != 1:
            raise _Fail(f"addmm with beta={a['beta']}, alpha={a['alpha']}")
        if _val(bias).dim() != 1:
            raise _Fail(f"addmm bias of shape {tuple(_val(bias).shape)} is not a per-column 1-D bias")
        return self._gemm(node, x, mat2, bias)

    def _bias_dim(self, node) -> int | None:
        a = _bind(node)
        val = _val(a["self"])
        if a.get("dtype") is not None or not isinstance(val, torch.Tensor) or val.dim() < 2:
            return None
        if not a["dim"]:  # an empty dim list sums over everything
            return None
        reduced = {d % val.dim() for d in a["dim"]}
        kept = set(range(val.dim())) - reduced
        return kept.pop() if len(kept) == 1 else None

    def _sum(self, node, g=None, mask=None):
        """``sum`` over every dim but one: ``bias_grad`` (a keepdim result is viewed back)."""
        dim = self._bias_dim(node)
        if dim is None:
            return None
        a = _bind(node)
        g = a["self"] if g is None else g
        self._tensors_ok(grad_output=a["self"])
        post = None
        if a["keepdim"]:  # (1, ..., size of dim, ..., 1)
            sizes = [1] * _val(a["self"]).dim()
            sizes[dim] = self._sizes(a["self"], g)[dim]
            post = [(aten.view.default, (sizes,), {})]
        spec = self._spec("bias_grad", (g, mask, dim), node, post=post)
        return [spec], (node,)

    def _conv_backward(self, node, g=None, mask=None):
        a = _bind(node)
        grad, x, w = a["grad_output"], a["input"], a["weight"]
        self._tensors_ok(gemm=True, grad_output=grad, input=x, weight=w)
        geometry = _conv_geometry(a, x)
        users = list(node.users)
        if not users:
            return None
        if not all(_is_call(u, operator.getitem) for u in users):
            raise _Fail("an output is used other than through getitem")
        g = grad if g is None else g
        specs = []
        for u in sorted(users, key=lambda u: u.args[1]):
            if not a["output_mask"][u.args[1]]:
                raise _Fail(f"output {u.args[1]} is used but output_mask does not ask for it")
            if u.args[1] == 0:
                specs.append(self._spec("conv2d_input_grad", (g, w, mask, self._sizes(x), *geometry), u))
            elif u.args[1] == 1:
                specs.append(self._spec("conv2d_weight_grad", (g, x, mask, self._sizes(w), *geometry), u))
            else:
                specs.append(self._spec("bias_grad", (g, mask, 1), u))
        return specs, (node,)

    # -------------------------------------------------------------- threshold_backward: fold or lower
    def _threshold_backward(self, node):
        g, y, threshold = node.args
        self._tensors_ok(grad_output=g, output=y)
        if threshold != 0:
            raise _Fail(f"threshold {threshold} (tritonkit's ReLU backward masks at 0)")
        if tuple(_val(g).shape) != tuple(_val(y).shape):
            raise _Fail("grad_output and output shapes differ (broadcasting)")
        if self.opts.fuse_relu:
            masked: dict[fx.Node, list[_Spec]] = {}
            if self._collect_masked(node, g, y, masked):
                self.masked.update(masked)
                names = [node.name] + [c.name for c in masked]
                labels = [s.describe(y.name) for specs in masked.values() for s in specs]
                self.lowered.append(Lowered(tuple(names), tuple(labels)))
                return None
        return [self._spec("relu_backward", (g, y), node)], (node,)

    def _collect_masked(self, node, g, y, out: dict) -> bool:
        """Can every consumer of ``node`` (= g masked by y > 0) take g and y instead? Fills ``out``."""
        for user in node.users:
            try:
                if _is_call(user, *_VIEWS) and user.args[0] is node:
                    shape = user.args[1]
                    view_g = _New(aten.view.default, (g, shape))
                    view_y = _New(aten.view.default, (y, shape))
                    if not self._collect_masked(user, view_g, view_y, out):
                        return False
                elif _transposed(user) is node:
                    for mm in user.users:
                        if not _is_call(mm, aten.mm.default) or mm.args[0] is not user or mm.args[1] is user:
                            return False
                        self._tensors_ok(gemm=True, mat1=mm.args[0], mat2=mm.args[1])
                        out[mm] = [self._spec("linear_weight_grad", (g, mm.args[1], y), mm)]
                elif _is_call(user, aten.mm.default) and user.args[0] is node and user.args[1] is not node:
                    self._tensors_ok(gemm=True, mat1=node, mat2=user.args[1])
                    out[user] = [self._spec("linear_input_grad", (g, user.args[1], y), user)]
                elif _is_call(user, aten.sum.dim_IntList) and user.args[0] is node:
                    result = self._sum(user, g, y)
                    if result is None:
                        return False
                    out[user] = result[0]
                elif _is_call(user, aten.convolution_backward.default) and user.args[0] is node \
                        and node not in user.args[1:]:
                    out[user] = self._conv_backward(user, g, y)[0]
                else:
                    return False
            except _Fail as why:
                log.debug("%s: ReLU mask not folded into %s: %s", self.name, user.name, why)
                return False
        return True


# ------------------------------------------------------------------------------ the backend itself
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging() -> None:
    """``TRITONKIT_LOG=info|debug``: report each compiled graph on stderr (``debug`` adds its code)."""
    level = os.environ.get("TRITONKIT_LOG", "").strip().lower()
    if level in ("", "0", "false", "off", "no"):
        return
    log.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[tritonkit] %(message)s"))
        log.addHandler(handler)


def lower_graph(gm: fx.GraphModule, kind: str = "forward", options: dict | Options | None = None,
                name: str | None = None) -> GraphReport:
    """Rewrite an AOTAutograd ATen graph in place onto tritonkit ops; return its report."""
    import tritonkit.ops  # noqa: F401  (registers torch.ops.tritonkit.*)

    opts = options if isinstance(options, Options) else Options.parse(options)
    name = name or f"graph {next(_GRAPH_IDS)} {kind}"
    log.debug("%s before lowering:\n%s", name, gm.code)
    report = _GraphLowering(gm, name, kind, opts).run()
    log.debug("%s after lowering:\n%s", name, gm.code)
    log.info("%s", report)
    if opts.report:
        print(report, file=sys.stderr)
    if opts.collect is not None:
        opts.collect.append(report)
    return report


def backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
            mode: str | None = None) -> Callable:
    """The ``torch.compile`` backend: ``torch.compile(model, backend="tritonkit", options={...})``.

    ``mode`` is accepted (``torch.compile`` passes it) and has no effect.
    """
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    _setup_logging()
    opts = Options.parse(options)
    graph_id = next(_GRAPH_IDS)

    def compiler(kind: str):
        def compile_graph(fx_gm: fx.GraphModule, _inputs):
            lower_graph(fx_gm, kind, opts, name=f"graph {graph_id} {kind}")
            return make_boxed_func(fx_gm.forward)

        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        inference_compiler=compiler("inference"))(gm, example_inputs)


def explain(model: Callable, *example_inputs, **options) -> Report:
    """Compile ``model`` with the tritonkit backend, run it once on ``example_inputs`` (and its
    backward, when the outputs require grad) and return the :class:`Report` of every graph compiled.

    Parameters' ``.grad`` and the model's buffers (e.g. batch-norm statistics) are left as they were.
    Under ``torch.no_grad()`` this reports the inference graph.
    """
    collect: list[GraphReport] = []
    options = {**options, "collect": collect}
    module = model if isinstance(model, torch.nn.Module) else None
    params = list(module.parameters()) if module is not None else []
    buffers = [b.detach().clone() for b in module.buffers()] if module is not None else []
    outputs = torch.compile(model, backend=backend, options=options)(*example_inputs)
    needs_grad = [t for t in torch.utils._pytree.tree_leaves(outputs)
                  if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves = [p for p in params if p.requires_grad]
    leaves += [t for t in example_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if needs_grad and leaves:  # runs (and so compiles) the backward graph without touching .grad
        torch.autograd.grad(needs_grad, leaves, [torch.ones_like(t) for t in needs_grad], allow_unused=True)
    if module is not None:
        with torch.no_grad():
            for saved, b in zip(buffers, module.buffers()):
                b.copy_(saved)
    if not collect:
        raise RuntimeError("tritonkit.explain: torch.compile compiled no graph (the model has no tensor "
                           "operations, or dynamo's recompile limit was reached: call torch._dynamo.reset())")
    return Report(collect)


__all__ = ["FALLBACK_POLICIES", "Fallback", "GraphReport", "Lowered", "LoweringError", "Options", "Report",
           "backend", "explain", "lower_graph"]
