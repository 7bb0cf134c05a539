"""What the lowering was asked to do (:class:`Options`) and what it did (:class:`GraphReport`, :class:`Report`)."""

from __future__ import annotations

import dataclasses

FALLBACK_POLICIES = ("eager", "error")


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
