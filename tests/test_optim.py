"""tritonkit.optim against torch.optim: trajectories for every flag combination, half precision,
checkpoints both ways, schedulers, param groups, missing grads, capturable steps (nothing read back to
the host, Tensor lr), torch.compile, bad input, LeNet."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonkit.optim as tko
from tritonkit.kernels import optim as kernels
from tritonkit.testing import HANG_TIMEOUT_S, OPTIM_TOLERANCES

TORCH = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW,
         "RMSprop": torch.optim.RMSprop, "Adagrad": torch.optim.Adagrad}
OURS = {"SGD": tko.SGD, "Adam": tko.Adam, "AdamW": tko.AdamW, "RMSprop": tko.RMSprop, "Adagrad": tko.Adagrad}
SHAPES = [(), (7,), (33, 5), (3, 17, 2)]  # a 0-d parameter and odd sizes, one program each


# Flags that decide which state buffers exist (or are constructor-only) are parametrized; the others
# vary across four param groups of the same optimizer, so each trajectory also runs mixed groups in
# one launch. Every flag combination is covered.
STRUCTURE = {
    "SGD": [{"momentum": 0.0}, {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.5},
            {"momentum": 0.9, "nesterov": True}],
    "Adam": [{"amsgrad": a, "decoupled_weight_decay": d} for a in (False, True) for d in (False, True)],
    "AdamW": [{"amsgrad": False}, {"amsgrad": True}],
    "RMSprop": [{"centered": c, "momentum": m} for c in (False, True) for m in (0.0, 0.9)],
    "Adagrad": [{"lr_decay": d, "initial_accumulator_value": a} for d in (0.0, 0.05) for a in (0.0, 0.3)],
}
GROUP_FLAGS = [{"maximize": m, "weight_decay": w} for m in (False, True) for w in (0.0, 0.1)]
LR = {"SGD": 0.02, "Adam": 0.01, "AdamW": 0.01, "RMSprop": 0.005, "Adagrad": 0.05}
CASES = [(name, kw) for name, variants in STRUCTURE.items() for kw in variants]


def _case_id(case):
    name, kw = case
    return "-".join([name] + [f"{k}={v}" for k, v in kw.items()])


def _pair(name, kw, shapes=SHAPES, dtype=torch.float32, lr_scale=1.0, ours_only=None):
    """Identical parameters under torch.optim (float32) and tritonkit.optim (``dtype``), one per param
    group, the groups cycling through ``GROUP_FLAGS``; ``ours_only``: arguments for tritonkit's alone."""
    init = [torch.randn(s) for s in shapes]
    ref = [nn.Parameter(x.clone()) for x in init]
    mine = [nn.Parameter(x.to(dtype)) for x in init]

    def groups(params):
        return [{"params": [p], **GROUP_FLAGS[i % len(GROUP_FLAGS)]} for i, p in enumerate(params)]

    kw = {"lr": LR[name] * lr_scale, **kw}
    return ref, mine, TORCH[name](groups(ref), **kw), OURS[name](groups(mine), **kw, **(ours_only or {}))


def _set_grads(params, grads):
    """Give each copy the same gradients (in its parameters' dtype): no feedback from the parameters, so the
    comparison measures the update itself rather than how a loss amplifies last-bit differences."""
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype) if p.dtype != torch.float32 else g.clone()


def _round_state(opt, dtype):
    """Keep torch's float32 reference on ``dtype``-representable params and state, as tritonkit keeps them."""
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                p.copy_(p.to(dtype).float())
                for key, value in opt.state[p].items():
                    if key != "step" and torch.is_tensor(value):
                        value.copy_(value.to(dtype).float())


def _assert_states_match(opt, ref_opt, dtype=torch.float32, flags=()):
    """Same state keys per parameter, step counts equal (value, dtype, device), buffers in ``dtype`` and
    (float32) within the optimizer tolerance; the param groups equal but for the implementation ``flags``. Half
    buffers are checked through the parameters they drive: a momentum buffer of magnitude ~g / (1 - momentum)
    has a bfloat16 ulp above OPTIM_TOLERANCES' absolute bound, so one rounding flip in it would already fail an
    elementwise check."""
    tol = OPTIM_TOLERANCES[dtype]
    mine, theirs = opt.state_dict(), ref_opt.state_dict()
    assert [{k: v for k, v in g.items() if k not in flags} for g in mine["param_groups"]] == [
        {k: v for k, v in g.items() if k not in flags} for g in theirs["param_groups"]]
    assert mine["state"].keys() == theirs["state"].keys()
    for index, state in mine["state"].items():
        assert state.keys() == theirs["state"][index].keys()
        for key, value in state.items():
            expected = theirs["state"][index][key]
            if key == "step":
                assert value.dtype == expected.dtype and value.device == expected.device and value == expected
            else:
                assert value.dtype == dtype
                if dtype == torch.float32:
                    where = f"state {key!r} of parameter {index}"
                    torch.testing.assert_close(value, expected, **tol, msg=lambda m, w=where: f"{w}: {m}")


def _trajectory(name, kw, steps, shapes=SHAPES, dtype=torch.float32, lr_scale=1.0):
    ref, mine, ref_opt, opt = _pair(name, kw, shapes, dtype, lr_scale)
    for _ in range(steps):
        grads = [torch.randn(s).to(dtype).float() for s in shapes]
        _set_grads(ref, grads)
        _set_grads(mine, grads)
        ref_opt.step()
        opt.step()
        if dtype != torch.float32:
            _round_state(ref_opt, dtype)
    for p, r in zip(mine, ref):
        torch.testing.assert_close(p.detach(), r.detach().to(dtype), **OPTIM_TOLERANCES[dtype])
    _assert_states_match(opt, ref_opt, dtype)
    return opt, ref_opt


# --- trajectories ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_trajectory_matches_torch_float32(case):
    name, kw = case
    _trajectory(name, kw, steps=50)


HALF_CASES = [("SGD", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
              ("SGD", {"momentum": 0.9, "nesterov": True, "maximize": True}),
              ("Adam", {"amsgrad": True, "weight_decay": 0.01}),
              ("AdamW", {"weight_decay": 0.1}),
              ("RMSprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.01}),
              ("Adagrad", {"lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.01})]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", HALF_CASES, ids=[_case_id(c) for c in HALF_CASES])
def test_trajectory_half_precision(case, dtype):
    """Half parameters keep half state and update in float32, rounded once per stored value: torch's
    float32 optimizer rounded to ``dtype`` after every step is the same computation. Its float32 values
    differ from the kernel's in the last bit (FMA, evaluation order), so now and then a stored value
    rounds the other way; a flipped momentum buffer moves later updates by about lr * ulp / (1 - momentum),
    so these trajectories run at lr / 4, which keeps 50 steps of such flips inside OPTIM_TOLERANCES."""
    name, kw = case
    _trajectory(name, kw, steps=50, dtype=dtype, lr_scale=0.25)


def test_multi_block_views_and_layouts():
    """Tensors spanning several blocks, views into one buffer at 16-byte-misaligned offsets, channels_last."""
    flat = torch.randn(1 + 9001 + 30)
    views = [flat[1:9002].view(9001), flat[9002:9032].view(5, 6)]
    conv = torch.randn(6, 3, 5, 5).to(memory_format=torch.channels_last)
    for name, kw in [("Adam", {"amsgrad": True}), ("SGD", {"momentum": 0.9})]:
        mine = [nn.Parameter(v) for v in views] + [nn.Parameter(conv.clone())]
        ref = [nn.Parameter(v.detach().clone()) for v in mine]
        assert mine[0].data_ptr() % 16 != 0 and mine[2].is_contiguous(memory_format=torch.channels_last)
        opt, ref_opt = OURS[name](mine, lr=0.01, **kw), TORCH[name](ref, lr=0.01, **kw)
        for _ in range(5):
            grads = [torch.randn(p.shape) for p in mine]  # contiguous: the conv grad's layout differs
            for p, r, g in zip(mine, ref, grads):
                p.grad, r.grad = g.clone(), g.clone()
            opt.step()
            ref_opt.step()
        for p, r in zip(mine, ref):
            torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])
        assert mine[2].is_contiguous(memory_format=torch.channels_last)


def test_one_launch_per_device_and_dtype(monkeypatch):
    """Every tensor of every param group in one launch; a float16 group adds exactly one more."""
    launches, real = [], kernels.launch

    def counting(kernel, streams, *args, **flags):
        launches.append(len(streams[0]))
        return real(kernel, streams, *args, **flags)

    monkeypatch.setattr(kernels, "launch", counting)
    params = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    half = [nn.Parameter(torch.randn(9).half()), nn.Parameter(torch.randn(4, 4).half())]
    opt = tko.Adam([{"params": params[:2]},
                    {"params": params[2:], "lr": 0.1, "betas": (0.8, 0.9), "maximize": True}])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert launches == [len(params)]
    opt.add_param_group({"params": half, "weight_decay": 0.1})
    for p in half:
        p.grad = torch.randn_like(p)
    launches.clear()
    opt.step()
    assert sorted(launches) == [len(half), len(params)]


# --- state_dict and checkpoints --------------------------------------------------------------------
INTEROP = [("SGD", {"momentum": 0.9, "nesterov": True}), ("Adam", {"amsgrad": True, "weight_decay": 0.05}),
           ("AdamW", {}), ("RMSprop", {"centered": True, "momentum": 0.5}), ("Adagrad", {"lr_decay": 0.01})]


@pytest.mark.parametrize("case", INTEROP, ids=[c[0] for c in INTEROP])
@pytest.mark.parametrize("direction", ["torch_to_tritonkit", "tritonkit_to_torch"])
def test_checkpoint_moves_both_ways(case, direction):
    """Train 6 steps with one implementation, save, load into the other and continue: the result equals
    12 uninterrupted steps of torch.optim, and nothing in the state is lost."""
    name, kw = case
    first, second = (TORCH, OURS) if direction == "torch_to_tritonkit" else (OURS, TORCH)
    init = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(12)]
    straight = [nn.Parameter(x.clone()) for x in init]
    straight_opt = TORCH[name](straight, lr=LR[name], **kw)
    moved = [nn.Parameter(x.clone()) for x in init]
    opt = first[name](moved, lr=LR[name], **kw)
    for step in range(12):
        if step == 6:
            checkpoint = opt.state_dict()
            moved = [nn.Parameter(p.detach().clone()) for p in moved]
            opt = second[name](moved, lr=LR[name], **kw)
            opt.load_state_dict(checkpoint)
            assert opt.state_dict()["param_groups"] == checkpoint["param_groups"]
        for params, o in ((straight, straight_opt), (moved, opt)):
            _set_grads(params, grads[step])
            o.step()
    for p, r in zip(moved, straight):
        torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])
    ours = opt if isinstance(opt, tko._FusedOptimizer) else straight_opt
    theirs = straight_opt if ours is opt else opt
    _assert_states_match(ours, theirs)


def test_state_dict_has_torch_types_and_placement():
    """``step`` as torch keeps it (float32 CPU tensor; on the device with fused/capturable), buffers in the
    parameter's dtype; an old checkpoint with a numeric step loads."""
    for kw in ({}, {"fused": True}, {"capturable": True}):
        p = nn.Parameter(torch.randn(5).half())
        opt = tko.Adam([p], **kw)
        p.grad = torch.randn_like(p)
        opt.step()
        ref_p = nn.Parameter(p.detach().float())
        ref = torch.optim.Adam([ref_p], **({"fused": True} if "fused" in kw else {}))
        ref_p.grad = torch.randn_like(ref_p)
        ref.step()
        state = opt.state[p]
        assert state["step"].dtype == ref.state[ref_p]["step"].dtype == torch.float32
        assert state["step"].device == ref.state[ref_p]["step"].device and state["step"].dim() == 0
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float16
    old = opt.state_dict()
    old["state"][0]["step"] = 3.0
    opt.load_state_dict(old)
    assert torch.is_tensor(opt.state[p]["step"]) and opt.state[p]["step"].item() == 3.0


def test_constructor_signatures_match_torch():
    for name, ours in OURS.items():
        theirs = inspect.signature(TORCH[name].__init__).parameters
        mine = inspect.signature(ours.__init__).parameters
        assert [(k, v.kind, v.default) for k, v in mine.items()] == [
            (k, v.kind, v.default) for k, v in theirs.items()]
        assert isinstance(ours([nn.Parameter(torch.zeros(1))]), torch.optim.Optimizer)


# --- behaviour: schedulers, groups, missing grads, closure, hooks, zero_grad -----------------------
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_lr_schedulers(tensor_lr):
    """OneCycleLR then CosineAnnealingLR (changing lr every step) drive both implementations alike."""
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    ref, mine, ref_opt, opt = _pair("Adam", {"weight_decay": 0.01})
    for _params, o in ((ref, ref_opt), (mine, opt)):
        for group in o.param_groups:
            group["lr"] = lr.clone() if tensor_lr else lr
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30, cycle_momentum=False)
              for o in (ref_opt, opt)]
    for _step in range(30):
        grads = [torch.randn(s) for s in SHAPES]
        for params, o, sched in zip((ref, mine), (ref_opt, opt), scheds):
            _set_grads(params, grads)
            o.step()
            sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == tensor_lr
    for p, r in zip(mine, ref):
        torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])


def test_param_groups_missing_grads_and_add_param_group():
    """Groups with different hyperparameters, grads None on a changing subset (per-parameter step counts
    diverge), a group added mid-training, zero_grad(set_to_none=False): all as torch."""
    shapes = SHAPES + [(11,), (2, 9)]
    init = [torch.randn(s) for s in shapes]
    pair = []
    for impl in (TORCH, OURS):
        params = [nn.Parameter(x.clone()) for x in init]
        opt = impl["Adam"]([{"params": params[0:2]},
                            {"params": params[2:4], "lr": 0.03, "betas": (0.5, 0.9), "eps": 1e-6,
                             "maximize": True},
                            {"params": params[4:5], "weight_decay": 0.1, "amsgrad": True}], lr=0.01)
        pair.append((params, opt))
    for step in range(24):
        if step == 8:
            for params, opt in pair:
                opt.add_param_group({"params": params[5:], "lr": 0.02, "decoupled_weight_decay": True,
                                     "weight_decay": 0.2})
        grads = [torch.randn(s) for s in shapes]
        skip = {i for i in range(len(shapes)) if (i + step) % 3 == 0}
        for params, opt in pair:
            opt.zero_grad(set_to_none=step % 2 == 0)
            _set_grads(params, grads)
            for i in skip:
                params[i].grad = None
            opt.step()
    (ref, ref_opt), (mine, opt) = pair
    for p, r in zip(mine, ref):
        torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])
    _assert_states_match(opt, ref_opt)
    steps = {opt.state[p]["step"].item() for p in mine}
    assert len(steps) > 1  # the per-parameter step counts really differ


def test_sgd_buffers_start_per_parameter():
    """A parameter that gets its first grad late starts its momentum buffer then (b_1 = g_1, no dampening)
    while its neighbours in the same launch continue theirs."""
    ref, mine, ref_opt, opt = _pair("SGD", {"momentum": 0.9, "dampening": 0.3})
    for step in range(6):
        grads = [torch.randn(s) for s in SHAPES]
        for params, o in ((ref, ref_opt), (mine, opt)):
            _set_grads(params, grads)
            if step < 3:
                params[1].grad = None
            o.step()
    assert set(opt.state[mine[0]]) == {"momentum_buffer"}
    _assert_states_match(opt, ref_opt)


def test_zero_grad_closure_and_hooks():
    p = nn.Parameter(torch.randn(4, 3))
    opt = tko.SGD([p], lr=0.1, momentum=0.9)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    x = torch.randn(5, 4)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (x @ p).square().sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    assert calls == ["pre", "post"] and torch.is_tensor(loss)
    torch.testing.assert_close(p.detach(), before - 0.1 * p.grad, **OPTIM_TOLERANCES[torch.float32])
    opt.zero_grad()
    assert p.grad is None
    after = p.detach().clone()
    opt.step()  # no grads: nothing moves, nothing launches
    assert torch.equal(p.detach(), after)


def test_bytes_per_step_counts_every_stream():
    """Floor traffic = (read p, g, each state buffer + write p, each state buffer) x itemsize x numel,
    with the state buffers counted from the state each optimizer actually keeps after a step."""
    for name, kw in [("SGD", {}), ("SGD", {"momentum": 0.9}), ("Adam", {"amsgrad": True}), ("AdamW", {}),
                     ("RMSprop", {"centered": True, "momentum": 0.9}), ("Adagrad", {})]:
        for impl in (OURS, TORCH):
            params = [nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(7).half())]
            opt = impl[name](params, lr=1e-3, **kw)
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            buffers = [sum(1 for k, v in opt.state[p].items() if k != "step" and torch.is_tensor(v))
                       for p in params]
            expected = sum(p.numel() * p.element_size() * (3 + 2 * b) for p, b in zip(params, buffers))
            assert tko.bytes_per_step(opt) == expected, (name, kw, impl[name])


# --- capturable: coefficients and step counts on the device, nothing read back ---------------------
@contextlib.contextmanager
def _no_host_reads():
    """Every way of reading a tensor's value into Python raises: on a GPU each is a sync, and none can be
    captured in a CUDA graph."""
    names = ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"step() read a tensor back to the host (Tensor.{name})")
        return read

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


# torch refuses capturable on the CPU (and SGD/Adagrad have no such flag): torch's default path with the same
# hyperparameters is the reference. Adagrad's step counts live on the device with fused=True.
CAPTURABLE = [("SGD", {"momentum": 0.9, "nesterov": True}, {}),
              ("Adam", {"amsgrad": True}, {"capturable": True}),
              ("AdamW", {"amsgrad": True}, {"capturable": True}),
              ("RMSprop", {"centered": True, "momentum": 0.9}, {"capturable": True}),
              ("Adagrad", {"lr_decay": 0.05}, {"fused": True})]


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("case", CAPTURABLE, ids=[f"{n}-{'-'.join(o) or 'default'}" for n, _, o in CAPTURABLE])
def test_capturable_step_reads_nothing_back_and_matches_torch(case, tensor_lr):
    """A scheduler changes lr between steps (a Tensor lr in place); each step runs with host reads
    refused and ends where torch's does, step counts included."""
    name, kw, flags = case
    ref, mine, ref_opt, opt = _pair(name, kw, ours_only=flags)
    for o in (ref_opt, opt):
        for group in o.param_groups:
            group["lr"] = torch.tensor(group["lr"]) if tensor_lr else group["lr"]
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.6) for o in (ref_opt, opt)]
    for _step in range(3):
        grads = [torch.randn(s) for s in SHAPES]
        _set_grads(ref, grads)
        _set_grads(mine, grads)
        ref_opt.step()
        with _no_host_reads():
            opt.step()
        for sched in scheds:
            sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) == tensor_lr
    for p, r in zip(mine, ref):
        torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])
    _assert_states_match(opt, ref_opt, flags=tuple(flags))


def test_tensor_lr_set_after_construction_refused_like_torch():
    """torch: a Tensor lr with foreach=True needs capturable=True, also when set on a group later."""
    messages = []
    for impl in (TORCH, OURS):
        p = nn.Parameter(torch.randn(3))
        opt = impl["Adam"]([p], foreach=True)
        opt.param_groups[0]["lr"] = torch.tensor(0.01)
        p.grad = torch.randn(3)
        with pytest.raises(RuntimeError) as err:
            opt.step()
        messages.append(str(err.value))
        assert all(state["step"] == 0 for state in opt.state.values())  # nothing advanced
    assert messages[0] == messages[1]


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kw", [
    ("SGD", {"lr": -1.0}), ("SGD", {"momentum": -0.1}), ("SGD", {"nesterov": True}),
    ("SGD", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}), ("SGD", {"lr": torch.tensor([0.1, 0.2])}),
    ("Adam", {"betas": (1.0, 0.9)}), ("Adam", {"betas": (0.9, -0.1)}), ("Adam", {"eps": -1.0}),
    ("Adam", {"betas": (torch.tensor(0.9), 0.99)}), ("AdamW", {"weight_decay": -1.0}),
    ("Adam", {"lr": torch.tensor(0.01), "foreach": True}), ("Adam", {"lr": torch.tensor([0.1, 0.2])}),
    ("AdamW", {"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True}),
    ("RMSprop", {"alpha": -0.5}), ("Adagrad", {"lr_decay": -1.0}),
    ("Adagrad", {"initial_accumulator_value": -1.0}),
])
def test_bad_hyperparameters_raise_like_torch(name, kw):
    params = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError) as theirs:
        TORCH[name](params, **kw)
    with pytest.raises(ValueError) as mine:
        OURS[name](params, **kw)
    assert str(mine.value) == str(theirs.value)


def test_implementation_flags():
    p = nn.Parameter(torch.randn(3))
    for _name, cls in OURS.items():
        with pytest.raises(RuntimeError, match="differentiable"):
            cls([p], differentiable=True)
        cls([p], foreach=True)
    for name in ("SGD", "Adam", "AdamW", "Adagrad"):
        OURS[name]([p], fused=True)
        with pytest.raises(RuntimeError, match="cannot be `True` together"):
            OURS[name]([p], fused=True, foreach=True)
    for name in ("Adam", "AdamW", "RMSprop"):
        OURS[name]([p], capturable=True)


def _step_with(param, grad, name="Adam"):
    opt = OURS[name]([param])
    param.grad = grad
    opt.step()


def test_unsupported_parameters_raise_before_any_change():
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = tko.SGD(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 4])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    with pytest.raises(RuntimeError, match="complex"):
        _step_with(nn.Parameter(torch.randn(3, dtype=torch.complex64)), torch.randn(3, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        _step_with(nn.Parameter(torch.randn(3, dtype=torch.float64)), torch.randn(3, dtype=torch.float64))
    strided = nn.Parameter(torch.randn(4, 6)[:, ::2])
    opt = tko.Adagrad([strided])
    strided.grad = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="not dense"):
        opt.step()
    assert opt.state[strided]["step"].item() == 0  # nothing advanced


def test_ops_validate_their_arguments():
    n = len(kernels.SGD_COEFS)
    ps = [torch.randn(3), torch.randn(2, 2)]
    coefs = torch.rand(2, n)
    sgd = torch.ops.tritonkit.sgd_step_
    with pytest.raises(RuntimeError, match="grads has 1 tensors"):
        sgd(ps, ps[:1], [], coefs)
    with pytest.raises(RuntimeError, match="coefs must be a float32 tensor of shape"):
        sgd(ps, ps, [], coefs[:, :3])
    with pytest.raises(RuntimeError, match=r"grads\[1\] is torch.float16"):
        sgd(ps, [ps[0], ps[1].half()], [], coefs)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[1\] .* must have the layout of params\[1\]"):
        sgd(ps, ps, [ps[0].clone(), ps[1].t().contiguous().t()], coefs)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be dense"):
        sgd([torch.randn(6)[::2]], [torch.randn(3)], [], coefs[:1])
    with pytest.raises(RuntimeError, match="exp_avg_sqs has 0 tensors"):
        torch.ops.tritonkit.adam_step_(ps, ps, ps, [], [], torch.rand(2, len(kernels.ADAM_COEFS)))


def _op_args():
    def pos():
        return [torch.rand(s) + 0.5 for s in SHAPES]

    def sym():
        return [torch.randn(s) for s in SHAPES]

    n = len(SHAPES)
    return [
        (torch.ops.tritonkit.sgd_step_, (sym(), sym(), sym(), torch.rand(n, len(kernels.SGD_COEFS)))),
        (torch.ops.tritonkit.sgd_step_, (sym(), sym(), [], torch.rand(n, len(kernels.SGD_COEFS)))),
        (torch.ops.tritonkit.adam_step_,
         (sym(), sym(), sym(), pos(), pos(), torch.rand(n, len(kernels.ADAM_COEFS)))),
        (torch.ops.tritonkit.rmsprop_step_,
         (sym(), sym(), pos(), [0.1 * x for x in sym()], sym(), torch.rand(n, len(kernels.RMSPROP_COEFS)))),
        (torch.ops.tritonkit.adagrad_step_, (sym(), sym(), pos(), torch.rand(n, len(kernels.ADAGRAD_COEFS)))),
        (torch.ops.tritonkit.adam_step_, (sym(), sym(), sym(), pos(), [], torch.rand(n, len(kernels.ADAM_COEFS)),
                                          torch.tensor([8.0]), torch.zeros(1))),
    ]


@pytest.mark.parametrize("index", range(6))
def test_opcheck(index):
    op, args = _op_args()[index]
    torch.library.opcheck(op.default, args)


# --- torch.compile ---------------------------------------------------------------------------------
COMPILE_CASES = [("SGD", {"momentum": 0.9}), ("Adam", {"amsgrad": True}),
                 ("RMSprop", {"centered": True, "momentum": 0.5}), ("Adagrad", {"lr_decay": 0.01})]


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("case", COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_compiled_step_has_no_graph_break_and_lr_changes_do_not_recompile(case, tensor_lr):
    """``opt.step`` compiles with ``fullgraph=True`` (so no graph break); lr changes every step. A float lr
    costs one recompile (dynamo's automatic-dynamic for floats) and then none, a tensor lr none at all.
    The compiled training matches eager torch.optim."""
    from torch._dynamo.testing import CompileCounterWithBackend

    name, kw = case
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    ref_model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    ref_model.load_state_dict(model.state_dict())
    opt = OURS[name](model.parameters(), lr=torch.tensor(0.01) if tensor_lr else 0.01, **kw)
    ref_opt = TORCH[name](ref_model.parameters(), lr=0.01, **kw)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(opt.step, backend=counter, fullgraph=True)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    frames = []
    for _ in range(7):
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
        compiled_step()
        ref_opt.step()
        frames.append(counter.frame_count)
        for o in (opt, ref_opt):
            for group in o.param_groups:
                if torch.is_tensor(group["lr"]):
                    group["lr"].mul_(0.8)
                else:
                    group["lr"] *= 0.8
    # One compile; one more when SGD creates its momentum buffers in the first step (a new state, as
    # torch) or when a float lr first changes; none after that.
    expected = 1 + (name == "SGD" or not tensor_lr)
    assert frames == [1] + [expected] * 6, frames
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])


def test_compiled_training_step_matches_eager():
    """A whole training step (zero_grad, forward, backward, step) under torch.compile(aot_eager)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    ref_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    ref_model.load_state_dict(model.state_dict())
    opt, ref_opt = tko.AdamW(model.parameters(), lr=0.01), torch.optim.AdamW(ref_model.parameters(), lr=0.01)

    def train_step(m, o, x, y):
        o.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        o.step()
        return loss

    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(4):
        x, y = torch.randn(10, 6), torch.randint(0, 2, (10,))
        compiled(model, opt, x, y)
        train_step(ref_model, ref_opt, x, y)
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])


# --- torch.amp.GradScaler --------------------------------------------------------------------------
# torch's fused=True (which takes grad_scale/found_inf as tritonkit does) where it exists on the CPU, else
# its default implementation through GradScaler's unscale_-then-maybe-step path.
AMP_CASES = [("SGD", {"momentum": 0.0}, True), ("SGD", {"momentum": 0.9, "nesterov": True}, True),
             ("Adam", {"amsgrad": True, "weight_decay": 0.01}, True), ("AdamW", {}, True),
             ("RMSprop", {"centered": True, "momentum": 0.5}, False), ("Adagrad", {"lr_decay": 0.01}, True)]
BAD_STEPS = {2: float("inf"), 4: float("nan")}  # a non-finite gradient element: GradScaler skips the step


def _amp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))


def _amp_step(model, opt, scaler, x, y, bad=None):
    """One float16-autocast training step through ``scaler``; ``bad`` poisons a gradient element."""
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    if bad is not None:
        model[0].weight.grad[1, 2] = bad
    scaler.step(opt)
    scaler.update()


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {k: v.clone() for s in opt.state.values() for k, v in s.items()})


@pytest.mark.parametrize("case", AMP_CASES, ids=[f"{c[0]}-{c[1]}" for c in AMP_CASES])
def test_grad_scaler_matches_torch_and_skips_non_finite_steps(case, monkeypatch):
    """float16 autocast + GradScaler("cpu"): the same trajectory, scale, state and step counts as torch.optim,
    with an inf and a NaN step skipped (scale halves; params, state and step counts untouched). The scaler
    hands grad_scale/found_inf to the one launch per step: it never unscales the gradients itself (its inf
    check runs with inv_scale 1), and the gradients left in p.grad are the kernel's unscaled ones (the
    scaled ones on a skipped step), as torch's fused optimizers leave them."""
    name, kw, torch_fused = case
    model, ref_model = _amp_model(), _amp_model()
    kw = {"lr": LR[name], **kw, **({"fused": True} if torch_fused else {})}
    opt, ref_opt = OURS[name](model.parameters(), **kw), TORCH[name](ref_model.parameters(), **kw)
    scaler, ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), torch.amp.GradScaler("cpu",
                                                                                                 init_scale=2.0 ** 12)
    launches, real_launch = [], kernels.launch
    inv_scales, real_check = [], torch._amp_foreach_non_finite_check_and_unscale_

    def counting(kernel, streams, coefs, grad_scale=None, found_inf=None, **flags):
        launches.append(grad_scale is not None and found_inf is not None)
        return real_launch(kernel, streams, coefs, grad_scale, found_inf, **flags)

    def checking(grads, found_inf, inv_scale):
        inv_scales.append(inv_scale.item())
        return real_check(grads, found_inf, inv_scale)

    monkeypatch.setattr(kernels, "launch", counting)
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", checking)
    for step in range(6):
        x, y = torch.randn(5, 6), torch.randn(5, 3)
        before = _snapshot(model, opt)
        scale = scaler.get_scale()
        launches.clear()
        inv_scales.clear()
        _amp_step(model, opt, scaler, x, y, BAD_STEPS.get(step))
        assert launches == [True] and inv_scales == [1.0]  # one launch, no unscaling pass
        _amp_step(ref_model, ref_opt, ref_scaler, x, y, BAD_STEPS.get(step))
        assert scaler.get_scale() == ref_scaler.get_scale()
        if step in BAD_STEPS:
            assert scaler.get_scale() == scale / 2
            after = _snapshot(model, opt)
            for a, b in zip(before[0] + list(before[1].values()), after[0] + list(after[1].values())):
                assert torch.equal(a, b)
        for p, r in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])
            if torch_fused:
                torch.testing.assert_close(p.grad, r.grad, **OPTIM_TOLERANCES[torch.float32], equal_nan=True)
        _assert_states_match(opt, ref_opt)


def test_grad_scaler_skipped_first_sgd_step_starts_the_buffer_later():
    """SGD with dampening whose first two steps are skipped: the buffer (zero, created on the device
    without a sync) still starts as b = g on the first step taken, as torch's default SGD, which has no
    buffer until then. (torch's fused SGD would keep an uninitialized buffer here.)"""
    model, ref_model = _amp_model(), _amp_model()
    kw = {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}
    opt, ref_opt = tko.SGD(model.parameters(), **kw), torch.optim.SGD(ref_model.parameters(), **kw)
    scaler, ref_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for step in range(4):
        x, y = torch.randn(5, 6), torch.randn(5, 3)
        bad = float("inf") if step < 2 else None
        _amp_step(model, opt, scaler, x, y, bad)
        _amp_step(ref_model, ref_opt, ref_scaler, x, y, bad)
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])
    _assert_states_match(opt, ref_opt)


def test_grad_scaler_after_unscale_and_bad_grad_scale(monkeypatch):
    """scaler.unscale_ first (to clip): GradScaler then passes grad_scale=None and its found_inf, and the
    step matches torch's. A non-float32 grad_scale is refused with torch's RuntimeError before any launch."""
    model, ref_model = _amp_model(), _amp_model()
    opt = tko.Adam(model.parameters(), lr=0.01, fused=True)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01, fused=True)
    for m, o in ((model, opt), (ref_model, ref_opt)):
        scaler = torch.amp.GradScaler("cpu")
        with torch.autocast("cpu", dtype=torch.float16):
            loss = m(torch.ones(2, 6)).float().sum()
        scaler.scale(loss).backward()
        scaler.unscale_(o)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        scaler.step(o)
        scaler.update()
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32])
    launches = []
    monkeypatch.setattr(kernels, "launch", lambda *a, **k: launches.append(1))
    before = _snapshot(model, opt)
    for bad in (torch.tensor(2), torch.tensor(2.0, dtype=torch.float64), torch.ones(2)):
        opt.grad_scale, opt.found_inf = bad, torch.zeros(())
        with pytest.raises(RuntimeError, match="grad_scale must be a float32 tensor with one element"):
            opt.step()
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0)
    with pytest.raises(RuntimeError, match="found_inf must be a float32 tensor with one element"):
        opt.step()
    assert launches == []
    after = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0] + list(before[1].values()),
                                                 after[0] + list(after[1].values())))
    ps = [torch.randn(3)]
    with pytest.raises(RuntimeError, match="sgd_step_: grad_scale must be a float32"):
        torch.ops.tritonkit.sgd_step_(ps, ps, [], torch.rand(1, len(kernels.SGD_COEFS)), torch.tensor([2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_kernel_unscales_half_gradients(dtype):
    """Half gradients: divided by grad_scale in float32, stored back rounded once; found_inf skips all."""
    shapes = [(5000,), (3, 7)]  # a full and a partial block
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [(torch.randn(s) * 64).to(dtype) for s in shapes]
    coefs = torch.tensor([[0.1, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]] * 2)
    scale = torch.tensor([64.0])
    expected_g = [(g.float() / 64).to(dtype) for g in grads]
    expected_p = [(p.float() - 0.1 * (g.float() / 64)).to(dtype) for p, g in zip(params, grads)]
    skipped = [p.clone() for p in params], [g.clone() for g in grads]
    torch.ops.tritonkit.sgd_step_(*skipped, [], coefs, scale, torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(skipped[0] + skipped[1], params + grads))
    torch.ops.tritonkit.sgd_step_(params, grads, [], coefs, scale, torch.tensor([0.0]))
    for a, b in zip(params + grads, expected_p + expected_g):
        torch.testing.assert_close(a, b, **OPTIM_TOLERANCES[dtype])


# --- the seed's LeNet ------------------------------------------------------------------------------
class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_lenet_sgd_momentum_matches_torch():
    model, ref_model = LeNet(), LeNet()
    ref_model.load_state_dict(model.state_dict())
    opt = tko.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(12):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), r.detach(), **OPTIM_TOLERANCES[torch.float32],
                                   msg=lambda m, n=name: f"{n}: {m}")
    _assert_states_match(opt, ref_opt)


# --- real-GPU compilation --------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import itertools, json, re, sys
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from tritonkit.kernels import optim  # noqa: F401  (registers the kernels)
from tritonkit.kernels.common import REGISTRY
flags = json.loads(sys.argv[1])
out = {}
for name, names in flags.items():
    spec = REGISTRY[name]
    for dtype in spec.dtypes:
        combos = (itertools.product([False, True], repeat=len(names)) if dtype == torch.float32
                  else [(True,) * len(names)])
        for values in combos:
            for config in spec.gpu_configs:
                constexprs = {**spec.constexprs(dtype), **dict(zip(names, values)), **config.kwargs}
                k = triton.compile(ASTSource(spec.fn, spec.signature(dtype), constexprs),
                                   target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})
                ptx = k.asm["ptx"]
                key = f"{name}|{dtype}|{json.dumps(dict(zip(names, values)))}"
                out[key] = [len(re.findall(r"ld\.global[.\w:]*\.v4", ptx)),
                            len(re.findall(r"st\.global[.\w:]*\.v4", ptx))]
print(json.dumps(out))
"""
_FLAGS = {"optim_sgd": ["MOMENTUM", "UNSCALE"], "optim_adam": ["AMSGRAD", "UNSCALE"],
          "optim_rmsprop": ["CENTERED", "MOMENTUM", "UNSCALE"], "optim_adagrad": ["UNSCALE"]}


def test_kernels_compile_for_sm90_with_vector_accesses():
    """Every kernel, flag combination and dtype compiles for sm_90; each stream of a full block moves as
    128-bit accesses (2 per thread: 32 bytes), read once and written once (the gradient written too when
    UNSCALE stores GradScaler's unscaled gradient back)."""
    env = {**os.environ, "TRITONKIT_INTERPRET": "0", "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(_FLAGS)], env=env,
                          capture_output=True, text=True, timeout=HANG_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == sum(2 ** len(f) for f in _FLAGS.values()) + 2 * len(_FLAGS)
    for key, (loads, stores) in results.items():
        name, _, flags = key.split("|")
        flags = json.loads(flags)
        unscale = flags.pop("UNSCALE")
        on = sum(flags.values())
        states = {"optim_sgd": on, "optim_adam": 2 + on, "optim_rmsprop": 1 + on, "optim_adagrad": 1}[name]
        assert (loads, stores) == (2 * (2 + states), 2 * (1 + states + unscale)), key
