"""tritonkit.optim on DTensor parameters, 2 gloo processes: LeNet with every layer and the model under
FSDP2's ``fully_shard`` (uneven shards: 5 classes over 2 ranks), trajectories of SGD with momentum,
AdamW, RMSprop and Adagrad against torch.optim on the same shards from the same init and data, one
launch per step on plain local tensors aliasing the shards, state kept as torch keeps it, distributed
checkpoints moving both ways; replicated, sharded, two-mesh and plain parameters in one group (a
Partial gradient redistributed); mismatched grads and state refused before any launch.

One spawn for the module (``results``); each test checks a part of what both ranks recorded. The ranks
run on the CPU with gloo and the kernels in Triton's interpreter, on a GPU machine too: what is tested
is the DTensor handling, not the kernels (tests/test_optim.py runs those wherever they compile).
"""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from tritonkit.testing import HANG_TIMEOUT_S, OPTIM_TOLERANCES

WORLD = 2
STEPS = 2  # before the checkpoint, and again after it
BUFFERS = {"SGD": 1, "AdamW": 2, "RMSprop": 3, "Adagrad": 1}  # param-sized state buffers with OPTIMIZERS' flags
OPTIMIZERS = {"SGD": {"lr": 0.05, "momentum": 0.9}, "AdamW": {"lr": 0.01},
              "RMSprop": {"lr": 0.005, "momentum": 0.5, "centered": True}, "Adagrad": {"lr": 0.05}}


def _lenet(seed):
    from torch.distributed.fsdp import fully_shard

    from tritonkit.models import LeNet

    torch.manual_seed(seed)
    model = LeNet(num_classes=5)  # fc3: 5 rows over 2 ranks, shards of 3 and 2
    for layer in (model.conv1, model.conv2, model.fc1, model.fc2, model.fc3):
        fully_shard(layer)
    fully_shard(model)
    return model


def _train(pairs, data, steps, *, each_backward=True):
    """``steps`` steps of every (model, optimizer) pair on the same batches, all with the first model's
    gradients: no feedback from the parameters, so the comparison measures the update rather than how
    a loss amplifies last-bit differences. ``each_backward``: every model makes its own FSDP2 gradients
    and gets the first's values copied into them; else it gets clones of the first's."""
    import torch.nn.functional as F

    for _ in range(steps):
        x, y = torch.randn(2, 3, 32, 32, generator=data), torch.randint(0, 5, (2,), generator=data)
        for model, opt in pairs if each_backward else pairs[:1]:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
        source = list(pairs[0][0].parameters())
        for model, _ in pairs[1:]:
            for p, q in zip(model.parameters(), source):
                if each_backward:
                    p.grad.to_local().copy_(q.grad.to_local())
                else:
                    p.grad = q.grad.clone()
        for _, opt in pairs:
            opt.step()


def _locals(model):
    return [p.to_local().detach().clone() for p in model.parameters()]


def _layout(state: dict) -> dict:
    """Each state entry's type, dtype, device and (DTensors) placements: what a checkpoint holds."""
    return {key: {k: (type(v).__name__, v.dtype, str(v.device), str(getattr(v, "placements", None)))
                  for k, v in entries.items()} for key, entries in state.items()}


def _resume(name, directory, optimizers):
    """A fresh LeNet (another init) and ``optimizers[name]`` loaded from the checkpoint in ``directory``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = _lenet(seed=7)
    opt = optimizers[name](model.parameters(), **OPTIMIZERS[name])
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return model, opt


def _fsdp(rank, out_dir, launches):
    """Trajectories, launches, state layouts and checkpoints both ways for each optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    import tritonkit.optim as tko

    ours = {name: getattr(tko, name) for name in OPTIMIZERS}
    theirs = {name: getattr(torch.optim, name) for name in OPTIMIZERS}
    out = {}
    for name, kw in OPTIMIZERS.items():
        mine, ref = _lenet(seed=0), _lenet(seed=0)
        mine_opt, ref_opt = ours[name](mine.parameters(), **kw), theirs[name](ref.parameters(), **kw)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        launches.clear()
        _train([(ref, ref_opt), (mine, mine_opt)], data, STEPS)
        shards = [p.to_local() for p in mine.parameters()]
        aliased = all(any(t.data_ptr() == s.data_ptr() for t in launches[0]) for s in shards)
        local_bytes = sum(s.numel() * s.element_size() * (3 + 2 * BUFFERS[name]) for s in shards)
        result = {"trained": (_locals(mine), _locals(ref)), "launches": [len(launches), aliased],
                  "bytes": (tko.bytes_per_step(mine_opt), tko.bytes_per_step(ref_opt), local_bytes),
                  "state": (_layout(get_optimizer_state_dict(mine, mine_opt)["state"]),
                            _layout(get_optimizer_state_dict(ref, ref_opt)["state"]))}
        directories = {}
        for who, model, opt in (("tritonkit", mine, mine_opt), ("torch", ref, ref_opt)):
            directories[who] = os.path.join(out_dir, f"{name}-{who}")
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=directories[who])
        # tritonkit's checkpoint resumes in torch.optim, torch's in tritonkit.optim
        torch_from_ours = _resume(name, directories["tritonkit"], theirs)
        ours_from_torch = _resume(name, directories["torch"], ours)
        _train([(ref, ref_opt), (mine, mine_opt), torch_from_ours, ours_from_torch], data, STEPS,
               each_backward=False)
        result["resumed"] = {"torch from tritonkit": (_locals(torch_from_ours[0]), _locals(mine)),
                             "tritonkit from torch": (_locals(ours_from_torch[0]), _locals(ref)),
                             "tritonkit vs torch": (_locals(mine), _locals(ref))}
        out[name] = result
    return out


def _mixed(rank, launches):
    """Replicate (Partial grad), uneven Shard(0) on a second mesh and a plain tensor in one group."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh

    import tritonkit.optim as tko

    mesh, other = init_device_mesh("cpu", (WORLD,)), init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    torch.manual_seed(1)  # the same full values on both ranks
    full = [torch.randn(4, 3), torch.randn(5, 2), torch.randn(6)]

    def params():
        return [torch.nn.Parameter(distribute_tensor(full[0], mesh, [Replicate()])),
                torch.nn.Parameter(distribute_tensor(full[1], other, [Shard(0)])),
                torch.nn.Parameter(full[2].clone())]

    out = {}
    for name, cls, kw in (("SGD", "SGD", {"lr": 0.05, "momentum": 0.9}), ("AdamW", "AdamW", {"lr": 0.01})):
        mine, ref = params(), params()
        mine_opt, ref_opt = getattr(tko, cls)(mine, **kw), getattr(torch.optim, cls)(ref, **kw)
        data = torch.Generator().manual_seed(200 + rank)
        launches.clear()
        for _ in range(STEPS):
            grads = [torch.randn(4, 3, generator=data), torch.randn(5, 2, generator=data),
                     torch.randn(6, generator=data)]
            for ps in (mine, ref):
                ps[0].grad = DTensor.from_local(grads[0], mesh, [Partial()])  # summed over the ranks
                ps[1].grad = distribute_tensor(grads[1], other, [Shard(0)])  # rank 0's values, scattered
                ps[2].grad = grads[2].clone()
            mine_opt.step()
            ref_opt.step()
        out[name] = {"params": ([_local_of(p) for p in mine], [_local_of(p) for p in ref]),
                     "launches": len(launches),
                     "state": ([_layout({0: mine_opt.state[p]}) for p in mine],
                               [_layout({0: ref_opt.state[p]}) for p in ref])}
    out["loaded state"] = _loaded_state(mesh, full[1])
    return out


def _loaded_state(mesh, full):
    """Adam state loaded with other placements than its Shard(0) parameter's (exp_avg replicated) steps as
    torch steps it, and is kept with the parameter's placements from then on."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import tritonkit.optim as tko

    exp_avg, exp_avg_sq, grad = torch.randn(5, 2), torch.rand(5, 2), torch.randn(5, 2)
    got = []
    for cls in (tko.Adam, torch.optim.Adam):
        p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        p.grad = distribute_tensor(grad, mesh, [Shard(0)])
        opt = cls([p], lr=0.01)
        opt.state[p].update(step=torch.tensor(3.0), exp_avg=distribute_tensor(exp_avg, mesh, [Replicate()]),
                            exp_avg_sq=distribute_tensor(exp_avg_sq, mesh, [Shard(0)]))
        opt.step()
        state = opt.state[p]
        got.append(([_local_of(p), state["exp_avg"].full_tensor(), _local_of(state["exp_avg_sq"])],
                    str(state["exp_avg"].placements)))
    return got


def _local_of(t):
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _refusals(launches):
    """What cannot be stepped shard by shard: a RuntimeError, nothing launched, nothing changed."""
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor, init_device_mesh

    import tritonkit.optim as tko

    mesh, other = init_device_mesh("cpu", (WORLD,)), init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    full = torch.randn(4, 3)

    def sharded(on=mesh):
        return distribute_tensor(full, on, [Shard(0)])

    def case(param, grad, state=None):
        p = torch.nn.Parameter(param)
        p.grad = grad
        opt = tko.Adam([p], lr=0.1)
        if state is not None:
            opt.state[p].update(step=torch.tensor(1.0), exp_avg=state, exp_avg_sq=torch.zeros_like(p))
        before = _local_of(p)
        launches.clear()
        try:
            opt.step()
        except RuntimeError as e:
            return str(e), len(launches), torch.equal(_local_of(p), before)
        return None, len(launches), None

    return {
        "plain grad": case(sharded(), torch.ones(4, 3)),
        "grad on another mesh": case(sharded(), sharded(other)),
        "DTensor grad": case(full.clone(), sharded()),
        "plain state": case(sharded(), sharded(), state=torch.zeros(4, 3)),
        "state on another mesh": case(sharded(), sharded(), state=sharded(other)),
        "Partial parameter": case(DTensor.from_local(full, mesh, [Partial()]),
                                  DTensor.from_local(full, mesh, [Partial()])),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    import tritonkit.optim as tko

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    launches = []  # each launch's tensors: plain ones only, or the op would have raised

    def counted(op):
        def launch(params, *args):
            assert not any(type(t) is not torch.Tensor and hasattr(t, "to_local") for t in params)
            launches.append(list(params))
            return op(params, *args)
        return launch

    for cls in (tko.SGD, tko.Adam, tko.RMSprop, tko.Adagrad):  # AdamW inherits Adam's
        cls._op = counted(cls._op)
    results = {"fsdp": _fsdp(rank, out_dir, launches), "mixed": _mixed(rank, launches),
               "refusals": _refusals(launches)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("optim_dtensor")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITONKIT_INTERPRET", "1")  # read by each rank's tritonkit import: CPU tensors, gloo
        context = mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + HANG_TIMEOUT_S
    while not context.join(timeout=10):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the gloo ranks did not finish within {HANG_TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _assert_all_close(actual, expected, msg):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **OPTIM_TOLERANCES[a.dtype], msg=lambda m, i=i: f"{msg}, tensor {i}\n{m}")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fully_shard_lenet_matches_torch_in_one_launch_per_step(results, name):
    for rank, r in enumerate(results):
        got = r["fsdp"][name]
        _assert_all_close(*got["trained"], f"rank {rank} {name} after {STEPS} steps")
        assert got["launches"] == [STEPS, True], "one launch per step, on the shards' own storage"
        ours, torchs, local_bytes = got["bytes"]
        assert ours == torchs == local_bytes, "bytes_per_step counts this rank's shards"
        mine, ref = got["state"]
        assert mine == ref, "optimizer state must be kept as torch.optim keeps it (DTensors, placements)"
        assert any("DTensor" in str(entries) for entries in ref.values())
    # the ranks hold different shards (fc3's are 3 and 2 rows)
    assert results[0]["fsdp"][name]["trained"][0][-2].shape != results[1]["fsdp"][name]["trained"][0][-2].shape


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_distributed_checkpoint_moves_both_ways(results, name):
    for rank, r in enumerate(results):
        for what, (resumed, continued) in r["fsdp"][name]["resumed"].items():
            _assert_all_close(resumed, continued, f"rank {rank} {name} {what}, {STEPS} steps after loading")


def _reduced(layout: dict) -> dict:
    """torch >= 2.14's SGD keeps a ``Partial`` gradient's placement in the momentum buffer it clones from
    that gradient; torch 2.13 and tritonkit store the reduced buffer with the parameter's placement (the
    parameters, compared separately, agree either way)."""
    return {k: {name: (*v[:3], v[3].replace("Partial(sum)", "Replicate()")) for name, v in entry.items()}
            for k, entry in layout.items()}


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_replicated_sharded_two_meshes_and_plain_in_one_group(results, name):
    for rank, r in enumerate(results):
        got = r["mixed"][name]
        _assert_all_close(*got["params"], f"rank {rank} {name}")
        assert got["launches"] == STEPS
        mine, ref = got["state"]
        assert mine == [_reduced(layout) for layout in ref]
    replicas = [r["mixed"][name]["params"][0][0] for r in results]
    assert torch.equal(*replicas), "a replicated parameter stays identical on every rank"


def test_state_with_other_placements_is_redistributed(results):
    for r in results:
        (mine, placements), (ref, _) = r["mixed"]["loaded state"]
        _assert_all_close(mine, ref, "Adam from a replicated exp_avg")
        assert placements == "(Shard(dim=0),)"


def test_mismatched_grads_and_state_refused_before_any_launch(results):
    expected = {"plain grad": "its grad is a Tensor (not a DTensor)",
                "grad on another mesh": "its grad is a DTensor with placements",
                "DTensor grad": "the parameter is a Parameter (not a DTensor)",
                "plain state": "its state 'exp_avg' is a Tensor (not a DTensor)",
                "state on another mesh": "must be DTensors on its device mesh",
                "Partial parameter": "cannot be updated shard by shard"}
    for r in results:
        for case, (message, launched, unchanged) in r["refusals"].items():
            assert message is not None, f"{case}: not refused"
            assert expected[case] in message, f"{case}: {message}"
            assert launched == 0 and unchanged, case
