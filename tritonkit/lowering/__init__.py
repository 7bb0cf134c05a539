"""``torch.compile(model, backend="tritonkit")``: AOTAutograd graphs lowered onto tritonkit's custom ops.

How it works: AOTAutograd (no decomposition table) traces the forward and backward ATen graphs (or one
inference graph under ``torch.no_grad()``); before the default partitioner splits a training graph,
:mod:`tritonkit.lowering.joint` rewrites it so that a BatchNorm + ReLU output read only by convs is
recomputed where it is read instead of saved. Each graph is then rewritten in place by a manual FX pass
and run as plain Python (``make_boxed_func``). Rewrites, in every graph:

==========================================================  =============================================
ATen                                                        tritonkit
==========================================================  =============================================
``convolution`` (2-D, not transposed) [+ ``relu``]          ``conv2d(..., relu=True)`` (bias fused); with a
                                                            BatchNorm after it see ``conv``'s table
``convolution`` depthwise (groups == input channels)        ``depthwise_conv2d*`` (``depthwise``'s table)
``max_pool2d_with_indices`` / ``_backward``                 ``max_pool2d`` / ``max_pool2d_backward``
``avg_pool2d`` / ``_adaptive_avg_pool2d`` (+ backward)      ``avg_pool2d`` / ``adaptive_avg_pool2d`` (...)
``mean`` over H, W and its backward                         ``global_avg_pool2d`` (``_backward``)
``addmm(b, x, t(W))`` / ``mm(x, t(W))`` [+ views + ``relu``]  ``linear(x, W, b, relu)``
``mm(a, b)`` (other operands)                               ``linear(a, t(b))``
``mm(g, W)`` + ``mm(t(g), x)`` [+ ``sum(g, 0)``]            ``linear_backward`` (one launch)
``mm(t(g), x)`` [+ ``sum(g, 0)``]                           ``linear_weight_grad`` / ``linear_weight_bias_grad``
``sum(g, all dims but d)``                                  ``bias_grad(g, None, d)``
``convolution_backward``                                    ``conv2d_backward`` (input, weight, bias: one
                                                            launch) / ``conv2d_weight_grad`` / ``bias_grad``
BatchNorm (training, eval) and its backward                 ``batch_norm_*`` (``norm``'s table)
``threshold_backward(g, y, 0)`` feeding only the above       folded: ``relu_output=y`` of each consumer
``threshold_backward(g, y, 0)`` otherwise                   ``relu_backward(g, y)``
``relu``; ``relu(a + b)``                                   ``relu``; ``add_relu``
``hardtanh``, ``hardswish``, ``hardsigmoid``, ``silu``,     ``activation`` / ``activation_backward``
``sigmoid``, ``gelu`` and their ``*_backward``
``mul(x, s)``, s [N, C, 1, 1] (squeeze-excitation)          ``channel_scale`` (+ backward)
``_log_softmax`` + ``nll_loss_forward`` (+ backward)        ``cross_entropy`` (``_backward``)
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

The package: ``rules`` (the registry, and how a rule is written), one module of rules per op family
(``conv`` with ``depthwise``, ``linear``, ``pool``, ``norm``, ``elementwise``, ``loss``), ``graph``
(reading nodes; ``Spec``/``Rewrite``, what a rule returns), ``checks`` (the fake-tensor check of every
rewrite), ``lower`` (the pass over a graph and the graph edits), ``joint`` (the joint-graph pass and the
``partition_fn``), ``report`` (options and reports), and here the backend itself. ``fuse_relu=False``
also skips the joint-graph pass.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from tritonkit.lowering.joint import partition
from tritonkit.lowering.lower import GraphLowering
from tritonkit.lowering.report import (
    FALLBACK_POLICIES,
    Fallback,
    GraphReport,
    Lowered,
    LoweringError,
    Options,
    Report,
)

log = logging.getLogger("tritonkit.lowering")
_GRAPH_IDS = itertools.count()


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
    report = GraphLowering(gm, name, kind, opts).run()
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

    from torch._functorch.partitioners import default_partition

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        inference_compiler=compiler("inference"),
                        partition_fn=partition if opts.fuse_relu else default_partition)(gm, example_inputs)


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
