"""The rule registry: one function per ATen pattern, registered by the family module that owns it.

A **rule** ``fn(lw, node)`` is registered for the ATen target its pattern is anchored at (the node the
lowering visits; the rule may absorb nodes around it, e.g. the ReLU after a conv). It returns None when
the node is not a candidate, a :class:`~tritonkit.lowering.graph.Rewrite` when it is, or raises
:class:`~tritonkit.lowering.graph.Fail` with the reason it cannot be lowered (reported as a fallback).
``lw`` is the :class:`~tritonkit.lowering.lower.GraphLowering` of the graph: its ``spec()`` builds a
replacement and checks it on fake tensors.

A **mask consumer** ``fn(lw, user, grad, g, y)`` says how ``user``, a consumer of ``grad`` =
``threshold_backward(g, y, 0)``, is lowered when it takes ``g`` and the ReLU output ``y`` instead and
applies the mask in its own loads: it returns ``{node: [specs]}`` for the nodes it rewrites, or None
when it cannot. A ReLU's backward is folded only when every consumer can.

Adding a rewrite means adding one decorated function in the family module (``conv``, ``linear``,
``pool``, ``norm``, ``elementwise``, ``loss``) and, for a new family, its name in ``FAMILIES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

FAMILIES = ("conv", "linear", "pool", "norm", "elementwise", "loss")

RULES: dict[object, Callable] = {}
MASK_CONSUMERS: dict[object, Callable] = {}


def rule(*targets):
    """Register ``fn(lw, node) -> Rewrite | None`` for ``targets`` (ATen overloads)."""

    def register(fn):
        for target in targets:
            if target in RULES:
                raise ValueError(f"two lowering rules for {target}: {RULES[target].__name__} and {fn.__name__}")
            RULES[target] = fn
        return fn

    return register


def mask_consumer(*targets):
    """Register ``fn(lw, user, grad, g, y) -> {node: [specs]} | None`` for consumers of a ReLU gradient."""

    def register(fn):
        for target in targets:
            if target in MASK_CONSUMERS:
                raise ValueError(f"two mask consumers for {target}")
            MASK_CONSUMERS[target] = fn
        return fn

    return register


def load_families() -> None:
    """Import every family module, which registers its rules (idempotent)."""
    for family in FAMILIES:
        importlib.import_module(f"tritonkit.lowering.{family}")
