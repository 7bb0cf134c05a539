"""Fused optimizers: drop-in ``torch.optim`` SGD, Adam, AdamW, RMSprop and Adagrad whose whole update
is one Triton launch per (device, dtype) group.

Behaviour is torch.optim's: the same constructor arguments and defaults, param groups,
``add_param_group``, ``zero_grad``, ``step(closure)``, step hooks and lr schedulers, and
``state_dict()`` in torch's exact format (per-parameter ``step`` as a tensor, placed where torch places
it, and ``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``square_avg``,
``grad_avg``, ``sum`` in the parameter's dtype), so checkpoints move between ``torch.optim.X`` and
``tritonkit.optim.X`` both ways. Parameters whose ``grad`` is None are skipped, and each parameter
keeps its own step count, as in torch.

A step: for each param group, the group's hyperparameters and each tensor's step count become one
row of float32 coefficients per tensor (lr, bias corrections, the gradient's sign for ``maximize``...,
computed with tensor ops in float64 and rounded once). Then every tensor of a (device, dtype, set of
state buffers) batch, across all param groups, is updated by one ``torch.ops.tritonkit.*_step_`` call:
one kernel launch reading each parameter, gradient and state element once and writing each parameter
and state element once (see ``tritonkit.kernels.optim``). Hyperparameters reach the kernel as data,
so changing lr by hand or through a scheduler never recompiles a kernel. Under ``torch.compile`` the
step traces without graph breaks; a float lr becomes a symbolic input at dynamo's first
automatic-dynamic recompile (none at all with a tensor lr or ``dynamic=True``), after which lr changes
do not recompile.

Supported: float32, float16 and bfloat16 parameters on the device tritonkit's kernels run on (state
in the parameter's dtype, as torch keeps it; math in float32, each stored value rounded once, like
torch's ``fused=True`` kernels), in dense layouts (a gradient or loaded state in another layout is
copied to the parameter's layout). Implementation switches: ``foreach`` and ``fused`` (not both True)
and ``capturable`` are accepted and decide where ``step`` lives, as in torch: on the parameter's device
for ``fused``/``capturable``, on the CPU otherwise. ``differentiable=True`` is refused: autograd cannot
see through the kernel. Sparse gradients and complex parameters are refused with a RuntimeError.

Capturable steps: ``lr`` (and Adam's ``betas``) may be 0-d Tensors, with torch's rules (Adam/AdamW refuse
a Tensor lr or betas with ``foreach=True`` unless ``capturable=True``). Whenever the step counts live
on the device (``capturable=True``; Adagrad's ``fused=True``) or a hyperparameter is a Tensor, the
coefficient rows are computed on the parameters' device by a few tensor ops (float64, as above) from
the step-count tensors and the lr tensor, and the step counts are advanced there: ``step()`` reads
nothing back to the host, so it can be captured in a CUDA graph, and a scheduler's in-place update of
a Tensor lr reaches every replay. Otherwise (float lr, CPU step counts) the rows are computed on the CPU
from Python numbers and copied to the device asynchronously. To capture a whole training step
(``torch.cuda.graphs``; ``bench/capturable_step.py`` checks it against eager steps)::

    lr = torch.tensor(1e-3, device="cuda")
    opt = tritonkit.optim.Adam(model.parameters(), lr=lr, capturable=True)   # SGD: no flag, lr a Tensor

    def train_step():
        opt.zero_grad(set_to_none=False)   # gradients keep their storage, so the graph's addresses hold
        loss_fn(model(static_x), static_y).backward()
        opt.step()

    side = torch.cuda.Stream()             # warm up on a side stream: state, launch tables, kernels
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step()
    for x, y in loader:                    # each replay: forward, backward and step
        static_x.copy_(x); static_y.copy_(y); lr.fill_(scheduled_lr); graph.replay()

The launch tables (tensor addresses and sizes) are built on the host at a tensor set's first step, so
the captured step must reuse the warm-up's tensors: ``zero_grad(set_to_none=True)`` before capture (new
gradients inside the graph) is refused with a RuntimeError naming the fix. Tables a graph reads are
kept alive for the process. Adam, AdamW and RMSprop with ``capturable=False`` refuse capture as torch's
do (their step counts live on the CPU).

Mixed precision: with ``torch.amp.GradScaler``, ``scaler.step(opt)`` works as with torch's ``fused=True``
optimizers. Each optimizer sets ``_step_supports_amp_scaling = True``, which tells GradScaler not to
unscale the gradients itself nor to read ``found_inf`` on the host, but to set ``opt.grad_scale`` and
``opt.found_inf`` and call ``step``; the same single launch then divides each gradient by
``grad_scale`` as it loads it (leaving the unscaled gradient in ``p.grad``, as torch's fused kernels
do) and, when ``found_inf`` != 0, leaves params, state and gradients untouched and the step counts
where they were (see ``step``).

DTensor parameters (``torch.distributed.fsdp.fully_shard``, tensor parallelism, ``distribute_tensor``;
sharded or replicated placements) are stepped on their local shards: each parameter, gradient and
state DTensor is replaced by ``to_local()``, a view aliasing its storage, so the in-place update lands
in the DTensor, and the locals join the same single launch per (device, dtype) group as plain tensors
(parameters on several device meshes, or DTensors and plain tensors, may share a group and a launch:
the update is elementwise, so each rank updating its own elements is the whole step). State is kept
as torch.optim keeps it: buffers are DTensors with the parameter's mesh and placements (created by
``zeros_like`` on the DTensor), ``step`` a plain tensor, so ``torch.distributed.checkpoint``'s
``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` save and load between ``torch.optim.X``
and ``tritonkit.optim.X`` both ways. A gradient or loaded state buffer with other placements on the
parameter's mesh is redistributed to the parameter's placements first (as DTensor's own ops would);
one on another mesh, a plain gradient or state for a DTensor parameter (or the reverse), and
parameters with a ``Partial`` placement are refused with a RuntimeError before any launch.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.optim import Optimizer

from tritonkit.ops import optim as ops
from tritonkit.ops.optim import FLOAT_DTYPES, is_dense, same_layout
from tritonkit.runtime import default_device

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "RMSprop", "bytes_per_step"]

_KERNEL_DEVICE = default_device().type


def _dtensor(t) -> bool:
    """True for a DTensor. None exists until ``torch.distributed.tensor`` is imported, so it is looked up
    only then (importing it costs about a second)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard or replica (a view of its storage, so in-place updates land); others as is."""
    return t.to_local() if _dtensor(t) else t


def _describe(t: Tensor) -> str:
    if _dtensor(t):
        return f"a DTensor with placements {tuple(t.placements)} on {t.device_mesh}"
    return f"a {type(t).__name__} (not a DTensor)"


def _scalar_dtype(is_fused=None) -> torch.dtype:
    """torch.optim's dtype for ``step``: float32, or float64 under a float64 default dtype unless fused."""
    if is_fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _new_step(p: Tensor, on_device: bool, is_fused=None) -> Tensor:
    if on_device:
        return torch.zeros((), dtype=_scalar_dtype(is_fused), device=p.device)
    return torch.tensor(0.0, dtype=_scalar_dtype())


def _step_tensor_from_float(state: dict, params, on_device: bool, is_fused=None) -> None:
    """Old checkpoints stored ``step`` as a number; torch's ``__setstate__`` turns it into a tensor."""
    for p in params:
        p_state = state.get(p, [])
        if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
            p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_scalar_dtype(is_fused),
                                           device=p.device if on_device else None)


class _Batch:
    """Tensors updated by one launch: params, grads, state lists (stream order), coefficient tables."""

    def __init__(self, n_states: int):
        self.params, self.grads, self.states, self.coefs = [], [], [[] for _ in range(n_states)], []


class _FusedOptimizer(Optimizer):
    """What the five optimizers share: argument checks, parameter checks, coefficient tables, launches."""

    _op = None  # the torch.ops.tritonkit.*_step_ custom op
    _coef_names: tuple = ()  # its coefficient columns (tritonkit.ops.optim.*_COEFS)

    @classmethod
    def _check_flags(cls, foreach, fused, differentiable) -> None:
        if differentiable:
            raise RuntimeError(f"tritonkit.optim.{cls.__name__} does not support differentiable=True: its "
                               "update runs in a Triton kernel that autograd does not trace "
                               f"(use torch.optim.{cls.__name__})")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    def _check_param(self, p: Tensor) -> None:
        """Refuse, before any state changes, what the fused kernels cannot update."""
        name = f"tritonkit.optim.{type(self).__name__}"
        if _dtensor(p) or _dtensor(p.grad):
            self._check_distributed(name, p, p.grad, "its grad")
        local = _local(p)
        if (p.grad.layout == torch.strided and p.dtype in FLOAT_DTYPES and p.device.type == _KERNEL_DEVICE
                and (local.is_contiguous() or is_dense(local.shape, local.stride()))):
            return
        if p.grad.layout != torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients (got a {p.grad.layout} gradient)")
        if torch.is_complex(p):
            raise RuntimeError(f"{name} does not support complex parameters (got {p.dtype})")
        if p.dtype not in FLOAT_DTYPES:
            raise RuntimeError(f"{name} updates float32, float16 and bfloat16 parameters, got {p.dtype}")
        if p.device.type != _KERNEL_DEVICE:
            raise RuntimeError(f"{name}: parameter is on {p.device}, but tritonkit's kernels run on "
                               f"{_KERNEL_DEVICE} tensors")
        raise RuntimeError(f"{name}: parameter of shape {list(local.shape)} with strides {list(local.stride())} "
                           "is not dense; the fused update needs each parameter in one gap-free block of memory")

    @staticmethod
    def _check_distributed(name: str, p: Tensor, t: Tensor, what: str) -> None:
        """``t`` (a grad or state buffer) must be a DTensor on ``p``'s mesh exactly when ``p`` is one."""
        if not (_dtensor(p) and _dtensor(t) and t.device_mesh == p.device_mesh):
            raise RuntimeError(f"{name}: the parameter is {_describe(p)} but {what} is {_describe(t)}; "
                               "a DTensor parameter's grad and state must be DTensors on its device mesh")
        if any(placement.is_partial() for placement in p.placements):
            raise RuntimeError(f"{name}: the parameter is {_describe(p)}; a Partial placement holds "
                               "summands, not values, and cannot be updated shard by shard")

    @staticmethod
    def _grad(p: Tensor) -> Tensor:
        """``p.grad``, redistributed to ``p``'s placements if it is a DTensor with others (e.g. Partial)."""
        g = p.grad
        if _dtensor(g) and g.placements != p.placements:
            g = g.redistribute(p.device_mesh, p.placements)
        return g

    def _state(self, state: dict, key: str, p: Tensor) -> Tensor:
        """``state[key]``, moved once to ``p``'s placements and memory layout if it has others (e.g. loaded)."""
        t = state[key]
        if _dtensor(p) or _dtensor(t):
            self._check_distributed(f"tritonkit.optim.{type(self).__name__}", p, t, f"its state {key!r}")
            if t.placements != p.placements:
                t = state[key] = t.redistribute(p.device_mesh, p.placements)
        local, p_local = _local(t), _local(p)
        if local.stride() != p_local.stride() and not same_layout(local, p_local):
            t = state[key] = torch.empty_like(p).copy_(t)
        return t

    @classmethod
    def _queue(cls, batches: dict, params, grads, states: list, columns: dict, device) -> None:
        """Add params (with grads, state lists in stream order, coefficient columns) to their launches.

        ``columns``: name -> Python number, 0-d tensor or one value per param; combined in float64 on
        ``device`` (where the step counts live) and rounded once to the float32 table. DTensors are
        replaced by their local tensors here: the launch sees plain tensors only.
        """
        params, grads = [_local(p) for p in params], [_local(g) for g in grads]
        states = [[_local(t) for t in s] for s in states]
        base = torch.zeros(len(params), dtype=torch.float64, device=device)
        table = torch.stack([base + (c.to(device=device, dtype=torch.float64) if isinstance(c, Tensor) else c)
                             for c in (columns[name] for name in cls._coef_names)], dim=1).to(torch.float32)
        # a gradient in another memory layout than its parameter is copied to it (the kernel indexes both
        # alike)
        grads = [g if g.stride() == p.stride() or same_layout(g, p) else torch.empty_like(p).copy_(g)
                 for p, g in zip(params, grads)]
        keys = [(p.device, p.dtype) for p in params]
        flags = tuple(len(s) > 0 for s in states)  # not bool(list): dynamo in torch 2.11 cannot trace it
        for key in dict.fromkeys(keys):
            batch = batches.setdefault((*key, flags), _Batch(len(states)))
            if len(set(keys)) == 1:
                idx, rows = range(len(params)), table
            else:
                idx = [i for i, k in enumerate(keys) if k == key]
                rows = torch.cat([table[i:i + 1] for i in idx])  # slices: no index tensor to copy over
            batch.params += [params[i] for i in idx]
            batch.grads += [grads[i] for i in idx]
            for mine, theirs in zip(batch.states, states):
                mine += [theirs[i] for i in idx] if theirs else []
            batch.coefs.append(rows)

    def _launch(self, batches: dict, grad_scale, found_inf) -> None:
        on: dict = {}  # GradScaler's tensors per device, moved once (asynchronously, as torch's fused path)

        def at(t, device):
            return None if t is None else on.setdefault((id(t), device), t.to(device, non_blocking=True))

        for (device, _, _), batch in batches.items():
            coefs = batch.coefs[0] if len(batch.coefs) == 1 else torch.cat(batch.coefs)
            type(self)._op(batch.params, batch.grads, *batch.states, coefs.to(device, non_blocking=True),
                           at(grad_scale, device), at(found_inf, device))

    # GradScaler.step sees this and, instead of unscaling the gradients (a pass over them) and reading
    # found_inf on the host to decide whether to call step, sets ``self.grad_scale`` (None when the user
    # already called scaler.unscale_) and ``self.found_inf`` and calls step, which hands both to the kernels.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Under ``torch.amp.GradScaler``: the optimizer says ``_step_supports_amp_scaling = True`` (as torch's
        ``fused=True`` optimizers do), so ``scaler.step(opt)`` does not unscale the gradients itself but sets
        ``opt.grad_scale`` and ``opt.found_inf`` (float32 one-element tensors) and calls this step. The
        kernels divide each gradient by ``grad_scale`` as they load it (writing the unscaled gradient back
        to ``p.grad``, as torch's fused optimizers do; a gradient that is first copied to its parameter's
        memory layout or DTensor placements keeps its scaled values) and, where ``found_inf`` != 0, change
        nothing: params, state and gradients stay as they were and the step counts do not advance (they
        advance by ``found_inf == 0``, a device-side value). Nothing waits on the host for the inf check when the step
        counts live on the parameters' device (``fused=True`` or ``capturable=True``); with the default
        CPU step counts, advancing them copies that flag to the CPU.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        if "capturable" in self.defaults:  # torch's refusal to capture a capturable=False step
            self._accelerator_graph_capture_health_check()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        ops.check_amp(f"tritonkit.optim.{type(self).__name__}", grad_scale, found_inf)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches: dict = {}
        state_steps: list = []
        for group in self.param_groups:
            state_steps += self._add_group(group, batches, found_inf)
        self._launch(batches, grad_scale, found_inf)
        if state_steps:  # only once the update has run, so that a refused step changes nothing
            if found_inf is None:
                torch._foreach_add_(state_steps, 1)
            else:
                advance = found_inf.reshape(()).eq(0).to(torch.float32)
                for device in dict.fromkeys(s.device for s in state_steps):
                    steps = [s for s in state_steps if s.device == device]
                    torch._foreach_add_(steps, advance.to(device, non_blocking=True))
        return loss

    def _add_group(self, group: dict, batches: dict, found_inf) -> list:
        """Queue the group's parameters that have grads; return their step counts (to advance).
        ``found_inf``: GradScaler's (or None), for what the kernel's skip cannot express."""
        raise NotImplementedError

    @staticmethod
    def _n_state_buffers(group: dict) -> int:
        """How many param-sized state buffers a step reads and writes for each parameter of ``group``."""
        raise NotImplementedError


def _signs(maximize: bool) -> float:
    return -1.0 if maximize else 1.0


def _coef_device(group: dict, params: list, state_steps: list, found_inf=None) -> torch.device:
    """Where a group's coefficient rows are computed: on the parameters' device when any input of them
    lives there or is a tensor (step counts kept on the device by ``capturable``/``fused``, a Tensor lr
    or betas, GradScaler's ``found_inf``) or a CUDA graph is being captured, so that nothing is read back
    to the host and the graph captures the computation; otherwise on the CPU from Python numbers (one
    asynchronous copy to the device)."""
    device = params[0].device
    hyper = (group["lr"], *group.get("betas", ()))
    if (found_inf is not None or any(isinstance(h, Tensor) for h in hyper)
            or any(s.device == device for s in state_steps[:1])
            or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        return device
    return torch.device("cpu")


def _steps(state_steps: list, device) -> Tensor:
    """This step's counts t (the stored ones + 1: torch counts the update being made) as float64 on
    ``device``, moved there in one asynchronous copy if they live elsewhere."""
    home = state_steps[0].device
    steps = torch.stack([s if s.device == home else s.to(home) for s in state_steps])
    return steps.to(device=device, dtype=torch.float64, non_blocking=True) + 1


def _value(x, device):
    """A hyperparameter as a float64 scalar on ``device`` if it is a tensor (copied asynchronously), else
    as is."""
    return x.to(device=device, dtype=torch.float64, non_blocking=True) if isinstance(x, Tensor) else x


_FOREACH_TENSOR_LR = "lr as a Tensor is not supported for capturable=False and foreach=True"


def _check_lr(lr) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


class SGD(_FusedOptimizer):
    r"""Stochastic gradient descent (optionally with momentum), fused: torch.optim.SGD's algorithm.

    .. code-block:: text

        input: γ (lr), θ_0 (params), f(θ) (objective), λ (weight decay), μ (momentum),
               τ (dampening), nesterov, maximize
        for t = 1, 2, ...:
            g_t ← -∇f_t(θ_{t-1}) if maximize else ∇f_t(θ_{t-1})
            if λ ≠ 0:  g_t ← g_t + λ θ_{t-1}
            if μ ≠ 0:
                b_t ← μ b_{t-1} + (1 - τ) g_t   if t > 1 else g_t
                g_t ← g_t + μ b_t   if nesterov else b_t
            θ_t ← θ_{t-1} - γ g_t

    Args:
        params (iterable): parameters or dicts defining parameter groups
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        momentum (float, optional): momentum factor (default: 0)
        dampening (float, optional): dampening for momentum (default: 0)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        nesterov (bool, optional): enables Nesterov momentum (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing it (default: False)
        foreach, fused (bool, optional): accepted for compatibility; the update is always fused (with lr
            a Tensor the whole step stays on the device: see the module docstring)
        differentiable (bool, optional): must be False

    State per parameter (only with momentum ≠ 0): ``momentum_buffer``.
    """

    _op = ops.sgd_step_
    _coef_names = ops.SGD_COEFS

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float | Tensor = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None) -> None:
        _check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                    "nesterov": nesterov, "maximize": maximize, "foreach": foreach,
                    "differentiable": differentiable, "fused": fused}
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self._check_flags(foreach, fused, differentiable)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _init_group(self, group, params, grads, momentum_buffer_list):
        for p in group["params"]:
            if p.grad is not None:
                self._check_param(p)
                params.append(p)
                grads.append(self._grad(p))
                if group["momentum"] != 0:
                    state = self.state[p]
                    has_buffer = state.get("momentum_buffer") is not None
                    buffer = self._state(state, "momentum_buffer", p) if has_buffer else None
                    momentum_buffer_list.append(buffer)
        return False

    def _add_group(self, group, batches, found_inf):
        params, grads, buffers = [], [], []
        self._init_group(group, params, grads, buffers)
        if not params:
            return []
        momentum, dampening = group["momentum"], group["dampening"]
        columns = {"lr": group["lr"], "grad_sign": _signs(group["maximize"]),
                   "weight_decay": group["weight_decay"],
                   "momentum": momentum, "nesterov": float(group["nesterov"]),
                   "buf_decay": momentum, "buf_grad": 1 - dampening}
        device = _coef_device(group, params, [], found_inf)
        first = [b is None for b in buffers]
        # A buffer created in a step GradScaler skipped stays zero and has not started: with dampening it
        # must still start as b = g (without, mu * 0 + g is g already). 1.0 there, kept on the device.
        unstarted = self.__dict__.setdefault("_unstarted", {}) if momentum != 0 and dampening != 0 else {}
        waiting = [unstarted.pop(p, None) for p in params]
        if any(first) or any(w is not None for w in waiting):
            # torch starts a buffer as b_1 = g_1: decay nothing (a zero buffer), take all of g
            new = torch.tensor(first, dtype=torch.float64).to(device, non_blocking=True)
            for i, w in enumerate(waiting):
                if w is not None:
                    new[i] = w
            columns["buf_decay"] = momentum * (1 - new)
            columns["buf_grad"] = new + (1 - dampening) * (1 - new)
            for i, p in enumerate(params):
                if first[i]:
                    buffers[i] = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                if found_inf is not None and dampening != 0 and (first[i] or waiting[i] is not None):
                    unstarted[p] = new[i] * found_inf.reshape(()).ne(0)
        self._queue(batches, params, grads, [buffers], columns, device)
        return []

    @staticmethod
    def _n_state_buffers(group):
        return int(group["momentum"] != 0)


class Adam(_FusedOptimizer):
    r"""Adam, fused: torch.optim.Adam's algorithm (``decoupled_weight_decay=True`` is AdamW).

    .. code-block:: text

        input: γ (lr), β1, β2 (betas), θ_0 (params), f(θ) (objective), λ (weight decay),
               amsgrad, maximize, ε (eps)
        initialize: m_0 ← 0, v_0 ← 0, v_0^max ← 0
        for t = 1, 2, ...:
            g_t ← -∇f_t(θ_{t-1}) if maximize else ∇f_t(θ_{t-1})
            if λ ≠ 0:
                if decoupled_weight_decay:  θ_{t-1} ← θ_{t-1} - γ λ θ_{t-1}
                else:                       g_t ← g_t + λ θ_{t-1}
            m_t ← β1 m_{t-1} + (1 - β1) g_t
            v_t ← β2 v_{t-1} + (1 - β2) g_t²
            m̂_t ← m_t / (1 - β1^t)
            if amsgrad:  v_t^max ← max(v_{t-1}^max, v_t);  v̂_t ← v_t^max / (1 - β2^t)
            else:        v̂_t ← v_t / (1 - β2^t)
            θ_t ← θ_{t-1} - γ m̂_t / (√v̂_t + ε)

    As in torch, t is each parameter's own step count and the update is evaluated as
    ``θ - (γ / (1 - β1^t)) m / (√v / √(1 - β2^t) + ε)``.

    Args:
        params (iterable): parameters or dicts defining parameter groups
        lr (float, Tensor, optional): learning rate (default: 1e-3)
        betas (tuple[float | Tensor, float | Tensor], optional): coefficients of the running averages
            of the gradient and its square (default: (0.9, 0.999))
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay (default: 0)
        amsgrad (bool, optional): use the AMSGrad variant (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing it (default: False)
        foreach, fused, capturable (bool, optional): accepted; ``fused``/``capturable`` keep ``step``
            on the parameter's device, as torch does, and so the whole step (see the module docstring)
        differentiable (bool, optional): must be False
        decoupled_weight_decay (bool, optional): AdamW's weight decay (default: False)

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` and (amsgrad) ``max_exp_avg_sq``.
    """

    _op = ops.adam_step_
    _coef_names = ops.ADAM_COEFS

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False) -> None:
        if isinstance(lr, Tensor) and foreach and not capturable:
            raise ValueError(_FOREACH_TENSOR_LR)
        _check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")  # noqa: TRY004  (as torch)
        for i, beta in enumerate(betas):
            if isinstance(beta, Tensor) and foreach and not capturable:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if isinstance(beta, Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        betas = tuple(b.squeeze() if isinstance(b, Tensor) else b for b in betas)
        self._check_flags(foreach, fused, differentiable)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
                    "maximize": maximize, "foreach": foreach, "capturable": capturable,
                    "differentiable": differentiable, "fused": fused,
                    "decoupled_weight_decay": decoupled_weight_decay}
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            fused = group.setdefault("fused", None)
            _step_tensor_from_float(self.state, group["params"], group["capturable"] or group["fused"],
                                    is_fused=fused)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            self._check_param(p)
            params.append(p)
            grads.append(self._grad(p))
            state = self.state[p]
            if len(state) == 0:  # lazy initialization, as torch
                state["step"] = _new_step(p, group["capturable"] or group["fused"], group["fused"])
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(self._state(state, "exp_avg", p))
            exp_avg_sqs.append(self._state(state, "exp_avg_sq", p))
            if group["amsgrad"]:
                max_exp_avg_sqs.append(self._state(state, "max_exp_avg_sq", p))
            if group["foreach"] and torch.is_tensor(group["lr"]) and not group["capturable"]:
                raise RuntimeError(_FOREACH_TENSOR_LR)  # a Tensor lr set after construction, as torch
            state_steps.append(state["step"])
        return False

    def _add_group(self, group, batches, found_inf):
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = [], [], [], [], [], []
        self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        if not params:
            return []
        device = _coef_device(group, params, state_steps, found_inf)
        step = _steps(state_steps, device)
        lr, weight_decay = _value(group["lr"], device), group["weight_decay"]
        beta1, beta2 = (_value(b, device) for b in group["betas"])
        decoupled = group["decoupled_weight_decay"]
        columns = {"grad_sign": _signs(group["maximize"]),
                   "weight_decay": 0.0 if decoupled else weight_decay,
                   "param_scale": 1 - lr * weight_decay if decoupled else 1.0,
                   "beta1_weight": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2,
                   "step_size": lr / (1 - beta1 ** step),
                   "bias_correction2_sqrt": (1 - beta2 ** step).sqrt(), "eps": group["eps"]}
        self._queue(batches, params, grads, [exp_avgs, exp_avg_sqs, max_exp_avg_sqs], columns, device)
        return state_steps

    @staticmethod
    def _n_state_buffers(group):
        return 3 if group["amsgrad"] else 2


class AdamW(Adam):
    r"""AdamW, fused: Adam with decoupled weight decay (torch.optim.AdamW's algorithm).

    .. code-block:: text

        for t = 1, 2, ...:
            g_t ← -∇f_t(θ_{t-1}) if maximize else ∇f_t(θ_{t-1})
            θ_t ← θ_{t-1} - γ λ θ_{t-1}
            m_t ← β1 m_{t-1} + (1 - β1) g_t
            v_t ← β2 v_{t-1} + (1 - β2) g_t²
            m̂_t ← m_t / (1 - β1^t)
            if amsgrad:  v_t^max ← max(v_{t-1}^max, v_t);  v̂_t ← v_t^max / (1 - β2^t)
            else:        v̂_t ← v_t / (1 - β2^t)
            θ_t ← θ_t - γ m̂_t / (√v̂_t + ε)

    Arguments as :class:`Adam` (``weight_decay`` defaults to 1e-2, no ``decoupled_weight_decay``).
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class RMSprop(_FusedOptimizer):
    r"""RMSprop, fused: torch.optim.RMSprop's algorithm.

    .. code-block:: text

        input: α (alpha), γ (lr), θ_0 (params), f(θ) (objective), λ (weight decay), μ (momentum),
               centered, ε (eps), maximize
        initialize: v_0 ← 0 (square average), b_0 ← 0 (buffer), g^ave_0 ← 0
        for t = 1, 2, ...:
            g_t ← -∇f_t(θ_{t-1}) if maximize else ∇f_t(θ_{t-1})
            if λ ≠ 0:  g_t ← g_t + λ θ_{t-1}
            v_t ← α v_{t-1} + (1 - α) g_t²
            ṽ_t ← v_t
            if centered:  g^ave_t ← α g^ave_{t-1} + (1 - α) g_t;  ṽ_t ← ṽ_t - (g^ave_t)²
            if μ > 0:  b_t ← μ b_{t-1} + g_t / (√ṽ_t + ε);  θ_t ← θ_{t-1} - γ b_t
            else:      θ_t ← θ_{t-1} - γ g_t / (√ṽ_t + ε)

    Args:
        params (iterable): parameters or dicts defining parameter groups
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        alpha (float, optional): smoothing constant (default: 0.99)
        eps (float, optional): term added to the denominator (default: 1e-8)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        momentum (float, optional): momentum factor (default: 0)
        centered (bool, optional): normalize by an estimate of the gradient's variance (default: False)
        capturable, foreach (bool, optional): accepted; ``capturable`` keeps ``step`` on the device, and so
            the whole step (see the module docstring)
        maximize (bool, optional): maximize the objective instead of minimizing it (default: False)
        differentiable (bool, optional): must be False

    State per parameter: ``step``, ``square_avg``, (momentum > 0) ``momentum_buffer``, (centered)
    ``grad_avg``.
    """

    _op = ops.rmsprop_step_
    _coef_names = ops.RMSPROP_COEFS

    def __init__(self, params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False,
                 foreach: bool | None = None, maximize: bool = False, differentiable: bool = False) -> None:
        _check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        self._check_flags(foreach, None, differentiable)
        defaults = {"lr": lr, "momentum": momentum, "alpha": alpha, "eps": eps, "centered": centered,
                    "weight_decay": weight_decay, "capturable": capturable, "foreach": foreach,
                    "maximize": maximize, "differentiable": differentiable}
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)
            _step_tensor_from_float(self.state, group["params"], group["capturable"])

    def _init_group(self, group, params, grads, square_avgs, momentum_buffer_list, grad_avgs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            self._check_param(p)
            params.append(p)
            grads.append(self._grad(p))
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step(p, group["capturable"])
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["centered"]:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            square_avgs.append(self._state(state, "square_avg", p))
            state_steps.append(state["step"])
            if group["momentum"] > 0:
                momentum_buffer_list.append(self._state(state, "momentum_buffer", p))
            if group["centered"]:
                grad_avgs.append(self._state(state, "grad_avg", p))
        return False

    def _add_group(self, group, batches, found_inf):
        params, grads, square_avgs, momentum_buffers, grad_avgs, state_steps = [], [], [], [], [], []
        self._init_group(group, params, grads, square_avgs, momentum_buffers, grad_avgs, state_steps)
        if not params:
            return []
        device = _coef_device(group, params, state_steps, found_inf)
        alpha = group["alpha"]
        columns = {"lr": _value(group["lr"], device), "grad_sign": _signs(group["maximize"]),
                   "weight_decay": group["weight_decay"], "alpha": alpha, "one_minus_alpha": 1 - alpha,
                   "eps": group["eps"], "momentum": group["momentum"]}
        self._queue(batches, params, grads, [square_avgs, grad_avgs, momentum_buffers], columns, device)
        return state_steps

    @staticmethod
    def _n_state_buffers(group):
        return 1 + int(group["momentum"] > 0) + int(bool(group["centered"]))


class Adagrad(_FusedOptimizer):
    r"""Adagrad, fused: torch.optim.Adagrad's algorithm.

    .. code-block:: text

        input: γ (lr), θ_0 (params), f(θ) (objective), λ (weight decay), τ (initial accumulator value),
               η (lr decay), ε (eps), maximize
        initialize: state_sum_0 ← τ
        for t = 1, 2, ...:
            g_t ← -∇f_t(θ_{t-1}) if maximize else ∇f_t(θ_{t-1})
            γ̃ ← γ / (1 + (t - 1) η)
            if λ ≠ 0:  g_t ← g_t + λ θ_{t-1}
            state_sum_t ← state_sum_{t-1} + g_t²
            θ_t ← θ_{t-1} - γ̃ g_t / (√state_sum_t + ε)

    Args:
        params (iterable): parameters or dicts defining parameter groups
        lr (float, Tensor, optional): learning rate (default: 1e-2)
        lr_decay (float, optional): learning rate decay (default: 0)
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0)
        initial_accumulator_value (float, optional): initial value of the sum of squared gradients
            (default: 0)
        eps (float, optional): term added to the denominator (default: 1e-10)
        foreach, fused (bool, optional): accepted; ``fused`` keeps ``step`` on the device, and so the
            whole step (see the module docstring)
        maximize (bool, optional): maximize the objective instead of minimizing it (default: False)
        differentiable (bool, optional): must be False

    State per parameter (created at construction, as torch does): ``step``, ``sum``.
    """

    _op = ops.adagrad_step_
    _coef_names = ops.ADAGRAD_COEFS

    def __init__(self, params, lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None) -> None:
        _check_lr(lr)
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        self._check_flags(foreach, fused, differentiable)
        defaults = {"lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
                    "initial_accumulator_value": initial_accumulator_value, "foreach": foreach,
                    "maximize": maximize, "differentiable": differentiable, "fused": fused}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(self.state[p], p, group)

    def _init_state(self, state: dict, p: Tensor, group: dict) -> None:
        """torch fills ``sum`` with the constructor's ``initial_accumulator_value`` (``self.defaults``)."""
        state["step"] = _new_step(p, bool(group["fused"]), group["fused"])
        state["sum"] = torch.full_like(p, self.defaults["initial_accumulator_value"],
                                       memory_format=torch.preserve_format)

    def __setstate__(self, state):
        super().__setstate__(state)
        fused = None
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            fused = group.setdefault("fused", None)
            _step_tensor_from_float(self.state, group["params"], bool(group["fused"]), is_fused=fused)

    def share_memory(self) -> None:
        """Calls tensor.share_memory_() on the state sum tensors."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _init_group(self, group, params, grads, state_sums, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            self._check_param(p)
            params.append(p)
            grads.append(self._grad(p))
            state = self.state[p]
            if len(state) == 0:  # parameters added by add_param_group after construction
                self._init_state(state, p, group)
            state_sums.append(self._state(state, "sum", p))
            state_steps.append(state["step"])
        return False

    def _add_group(self, group, batches, found_inf):
        params, grads, state_sums, state_steps = [], [], [], []
        self._init_group(group, params, grads, state_sums, state_steps)
        if not params:
            return []
        device = _coef_device(group, params, state_steps, found_inf)
        step = _steps(state_steps, device)
        columns = {"clr": _value(group["lr"], device) / (1 + (step - 1) * group["lr_decay"]),
                   "grad_sign": _signs(group["maximize"]), "weight_decay": group["weight_decay"],
                   "eps": group["eps"]}
        self._queue(batches, params, grads, [state_sums], columns, device)
        return state_steps

    @staticmethod
    def _n_state_buffers(group):
        return 1


_TORCH_STATE_BUFFERS = {
    torch.optim.SGD: SGD._n_state_buffers,
    torch.optim.Adam: Adam._n_state_buffers,
    torch.optim.AdamW: Adam._n_state_buffers,
    torch.optim.RMSprop: RMSprop._n_state_buffers,
    torch.optim.Adagrad: Adagrad._n_state_buffers,
}


def bytes_per_step(optimizer: Optimizer) -> int:
    """The least memory traffic of one step, in bytes: the floor for achieved-bandwidth figures.

    Every parameter, gradient and state element read once, every parameter and state element written
    once: ``numel * itemsize * (3 + 2 * state buffers)`` summed over all parameters, as if each has a
    gradient (SGD: 0 or 1 buffer; Adam/AdamW: 2, 3 with AMSGrad; RMSprop: 1 + momentum + centered;
    Adagrad: 1). The per-tensor tables and coefficients (tens of bytes per tensor) are not counted.
    Takes a ``tritonkit.optim`` optimizer or its ``torch.optim`` counterpart (same floor). A DTensor
    parameter counts its local shard: the traffic of this process's step.
    """
    if isinstance(optimizer, _FusedOptimizer):
        buffers = optimizer._n_state_buffers
    else:
        kind = next((k for k in _TORCH_STATE_BUFFERS if isinstance(optimizer, k)), None)
        if kind is None:
            raise TypeError(f"bytes_per_step: no traffic model for {type(optimizer).__name__}")
        buffers = _TORCH_STATE_BUFFERS[kind]
    return sum(_local(p).numel() * p.element_size() * (3 + 2 * buffers(group))
               for group in optimizer.param_groups for p in group["params"])
