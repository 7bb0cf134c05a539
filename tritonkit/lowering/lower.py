"""The pass over one graph: visit nodes in order, run the rule registered for each, emit its rewrite."""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from tritonkit.lowering import rules
from tritonkit.lowering.checks import FakeChecker
from tritonkit.lowering.graph import VIEWS, Fail, New, Rewrite, Spec, aten, is_call, launches, only_user, val
from tritonkit.lowering.joint import RECOMPUTED
from tritonkit.lowering.report import Fallback, GraphReport, Lowered, LoweringError, Options

log = logging.getLogger("tritonkit.lowering")


class GraphLowering:
    """Rewrites one AOTAutograd graph in place; :meth:`run` returns its :class:`GraphReport`.

    What rules use: ``spec()`` (a checked replacement), ``checker.tensors_ok()``, ``sizes()``,
    ``relu_after()``, ``defined_before()``, ``order()``, ``in_graph_order()``, ``memo``, ``opts``, ``name``
    and ``lowered`` (for rules that report their own rewrite).
    """

    def __init__(self, gm: fx.GraphModule, name: str, kind: str, opts: Options):
        from tritonkit.kernels.common import FLOAT_DTYPES
        from tritonkit.runtime import INTERPRET, default_device

        rules.load_families()
        self.gm, self.graph, self.name, self.kind, self.opts = gm, gm.graph, name, kind, opts
        self.checker = FakeChecker(gm.graph, FLOAT_DTYPES, default_device().type, INTERPRET)
        self.tk = torch.ops.tritonkit
        self.lowered: list[Lowered] = []
        self.fallbacks: list[Fallback] = []
        self.planned: dict[fx.Node, list[Spec]] = {}  # later node -> specs a rule already checked for it
        self.touched: set[fx.Node] = set()  # replaced nodes: erased at the end if nothing uses them
        self.consumed: set[fx.Node] = set()  # nodes already rewritten (or fused into another rewrite)
        self.replaced: dict[fx.Node, fx.Node] = {}  # old node -> the node that now holds its value
        self.created: set[fx.Node] = set()  # tritonkit calls the rewrite inserted
        self.emitted: dict[int, tuple[New, fx.Node]] = {}  # id(New) -> (it, its node)
        self.memo: dict = {}  # what rules computed once for several nodes of this graph (e.g. one call's specs)

    # -------------------------------------------------------------------------------- entry point
    def run(self) -> GraphReport:
        # eager's count: not the joint-graph pass's recomputations, which eager's backward does not run
        before = sum(launches(n) for n in self.graph.nodes if not (self.kind == "backward" and n.meta.get(RECOMPUTED)))
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node in self.consumed:
                continue
            if node in self.planned:
                self._emit(Rewrite(self.planned.pop(node), report=False))
                self.consumed.add(node)
                continue
            if node.target not in rules.RULES:
                continue
            try:
                rewrite = rules.RULES[node.target](self, node)
            except Fail as why:
                self.fall_back(node, str(why))
                continue
            if rewrite is None:
                continue
            self.planned.update(rewrite.planned)
            self._emit(rewrite)
            if rewrite.specs:
                self.consumed.add(node)
        self._dead_code()
        self.graph.lint()
        self.gm.recompile()
        eager_ops: dict[str, int] = {}
        for node in self.graph.nodes:
            if launches(node) and node not in self.created and not _is_tritonkit(node):
                eager_ops[str(node.target)] = eager_ops.get(str(node.target), 0) + 1
        for f in self.fallbacks:  # candidates that fell back are listed with their reason instead
            eager_ops[f.target] = eager_ops.get(f.target, 0) - 1
        eager_ops = {k: v for k, v in eager_ops.items() if v > 0}
        after = sum(launches(n) for n in self.graph.nodes)
        return GraphReport(self.name, self.kind, self.lowered, self.fallbacks, eager_ops, before, after)

    def fall_back(self, node: fx.Node, reason: str) -> None:
        if self.opts.fallback == "error":
            raise LoweringError(f"tritonkit backend ({self.name}): cannot lower node {node.name!r} "
                                f"({node.target}): {reason}")
        self.fallbacks.append(Fallback(node.name, str(node.target), reason))

    # ----------------------------------------------------------------------------- what rules use
    def spec(self, op_name: str, args: tuple, replaces: fx.Node, label: str | None = None,
             post: list | None = None) -> Spec:
        """``torch.ops.tritonkit.<op_name>(*args)`` in place of ``replaces``, checked on fake tensors."""
        spec = Spec(getattr(self.tk, op_name).default, tuple(args), replaces, label or op_name, post or [])
        self.checker.check(spec)
        return spec

    def sizes(self, node: fx.Node, source=None) -> list:
        """``node``'s shape as graph arguments: ints, or ``sym_size`` of ``source`` (a tensor of the
        same shape that the rewrite keeps, ``node`` by default) for symbolic dims."""
        source = node if source is None else source
        return [int(s) if is_concrete_int(s) else New(aten.sym_size.int, (source, d))
                for d, s in enumerate(val(node).shape)]

    def defined_before(self, a, b: fx.Node) -> bool:
        """Whether ``a`` (a node, or a constant) comes before node ``b`` in the graph as it is now."""
        if not isinstance(a, fx.Node):
            return True
        for node in self.graph.nodes:
            if node is a:
                return True
            if node is b:
                return False
        return False

    def order(self, node: fx.Node) -> int:
        """``node``'s position in the graph as it is now."""
        return next(i for i, n in enumerate(self.graph.nodes) if n is node)

    def in_graph_order(self, specs: list[Spec]) -> list[Spec]:
        """``specs`` sorted by where their replaced nodes are, so that a call several specs share is
        emitted before its first use."""
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        return sorted(specs, key=lambda spec: order[spec.replaces])

    def relu_after(self, node: fx.Node) -> fx.Node | None:
        """The ReLU that is the only consumer of ``node`` (through single-user views), if fusable."""
        if not self.opts.fuse_relu:
            return None
        user = only_user(node)
        while user is not None and is_call(user, *VIEWS) and user.args[0] is node:
            node, user = user, only_user(user)
        if is_call(user, aten.relu.default):
            try:
                self.checker.tensors_ok(input=user)
            except Fail:
                return None
            return user
        return None

    # ------------------------------------------------------------------------------------ emission
    def _materialize(self, a):
        if isinstance(a, New):
            if id(a) not in self.emitted:
                node = self.graph.call_function(a.target, tuple(self._materialize(x) for x in a.args))
                with self.checker.context():
                    node.meta["val"] = self.checker.fake(a, {})
                self.emitted[id(a)] = (a, node)  # holding ``a`` keeps its id from being reused
                self.created.add(node)
            return self.emitted[id(a)][1]
        if isinstance(a, (list, tuple)):
            return type(a)(self._materialize(x) for x in a)
        while isinstance(a, fx.Node) and a in self.replaced:  # rewritten since the spec was made
            a = self.replaced[a]
        return a

    def _emit(self, rewrite: Rewrite) -> None:
        for spec in rewrite.specs:
            if spec.op is None:  # a ReLU fused into the op before it: its input now holds the result
                new = spec.replaces.args[0]
            else:
                with self.graph.inserting_before(spec.replaces):
                    new = self.graph.call_function(spec.op, self._materialize(spec.args))
                    new.meta["val"] = self.checker.run(dataclasses.replace(spec, post=[]))
                    self.created.add(new)
                    for target, args, kwargs in spec.post:
                        new = self.graph.call_function(target, (new, *self._materialize(args)), kwargs)
                        self.created.add(new)
                    new.meta["val"] = val(spec.replaces)
            spec.replaces.replace_all_uses_with(new)
            self.replaced[spec.replaces] = new
            self.touched.add(spec.replaces)
            self.consumed.add(spec.replaces)  # its own rule must not run on it later
            self.touched.update(spec.absorbs)
            self.consumed.update(spec.absorbs)
        if rewrite.report and rewrite.specs:
            labels = tuple(dict.fromkeys(s.describe() for s in rewrite.specs if s.op is not None))
            self.lowered.append(Lowered(tuple(n.name for n in rewrite.absorbed), labels))
        for node in rewrite.absorbed:
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


def _is_tritonkit(node: fx.Node) -> bool:
    """A tritonkit call already in the graph before lowering (the joint-graph pass's recomputed apply)."""
    return isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "tritonkit"


__all__ = ["GraphLowering"]
