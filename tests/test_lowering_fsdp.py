"""FSDP2 (``fully_shard``) with the tritonkit backend: the seed's LeNet with each layer and the model
sharded over 2 gloo ranks (CPU), 2 SGD(momentum) steps; full parameters equal eager FSDP2's.

What dynamo does with FSDP2 on torch 2.13: every FSDP2 hook (``FSDPState._pre_forward`` /
``_post_forward``, the param group's pre/post-backward) is wrapped in ``torch._dynamo.disable``
unconditionally (``_fsdp_common._dynamo_disable``; compiled autograd does not change that), so each
call of a sharded module is a graph break and runs eagerly, all-gathers and reduce-scatters included.
The consequences for ``torch.compile(model, backend="tritonkit")`` of a model whose layers are
sharded: only the code *between* the sharded layers (ReLU, max-pool, flatten) reaches the backend; a
sharded layer's own forward (``torch/nn/modules/conv.py``) runs in the broken-off eager call, in a
torch-internal frame dynamo does not compile, so its conv or linear never reaches any backend (no
fallback can be reported: no graph holds it). It trains correctly, on ATen convs. To put the convs and
linears on tritonkit, compile each layer *before* sharding it (torchtitan's order):
``model.conv1 = torch.compile(model.conv1, backend="tritonkit"); fully_shard(model.conv1)``. FSDP2's
hooks then sit on the ``OptimizedModule`` wrapper, outside the compiled region, and the layer's forward
and backward graphs are lowered whole (parameter names gain ``_orig_mod.``). No compiled autograd is
needed; the collectives stay torch.distributed's, outside every graph.
"""

import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

from tritonkit.testing import TRAINING_TOLERANCES

WORLD = 2
STEPS = 2
LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def _shard(model, backend, reports, compile_layers: bool):
    """fully_shard each layer and the model; compile the model (backend given), each layer first too."""
    options = {"collect": reports, "fallback": "error"}
    for name in LAYERS:
        if compile_layers:
            setattr(model, name, torch.compile(getattr(model, name), backend=backend, options=options))
        fully_shard(getattr(model, name))
    fully_shard(model)
    return model if backend is None else torch.compile(model, backend=backend, options=options)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from tritonkit.lowering import backend
    from tritonkit.models import LeNet

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    base = LeNet()
    results = {}
    for mode in ("eager", "compiled_model", "compiled_layers"):
        reports = []
        model = copy.deepcopy(base)
        run = _shard(model, None if mode == "eager" else backend, reports, mode == "compiled_layers")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own batches
        losses = []
        for _ in range(STEPS):
            x = torch.randn(2, 3, 32, 32, generator=data)
            y = torch.randn(2, 10, generator=data)
            opt.zero_grad()
            loss = F.mse_loss(run(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results[mode] = {
            "losses": losses,
            "params": [p.full_tensor().detach() for p in model.parameters()],
            "graphs": [(r.kind, [str(e) for e in r.lowered], [str(f) for f in r.fallbacks]) for r in reports],
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _lowered(graphs) -> str:
    return " ".join(entry for _, entries, _ in graphs for entry in entries)


def test_fsdp2_compiled_lenet_matches_eager_fsdp2(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in ranks:
        outer, layers = r["compiled_model"]["graphs"], r["compiled_layers"]["graphs"]
        # compiling the sharded model: the layers' calls break off (FSDP2 hooks), their convs stay ATen
        assert "tritonkit.max_pool2d" in _lowered(outer) and "tritonkit.conv2d" not in _lowered(outer), outer
        # compiling each layer before sharding it: every conv and linear, forward and backward, on tritonkit
        lowered = _lowered(layers)
        assert sum(e.endswith("tritonkit.conv2d") for _, es, _ in layers for e in es) == 2, layers
        assert sum(e.endswith("tritonkit.linear") for _, es, _ in layers for e in es) == 3, layers
        assert "tritonkit.conv2d_backward" in lowered and "tritonkit.conv2d_weight_bias_grad" in lowered
        assert lowered.count("tritonkit.linear_backward") == 3, layers
        assert "all_gather" not in lowered and "reduce_scatter" not in lowered
        assert not any(f for _, _, f in outer + layers)
    for mode in ("compiled_model", "compiled_layers"):
        # the reduce-scattered gradients and the sharded updates give both ranks the same full parameters
        for a, b in zip(ranks[0][mode]["params"], ranks[1][mode]["params"]):
            assert torch.equal(a, b)
        for rank in ranks:
            losses, eager_losses = torch.tensor(rank[mode]["losses"]), torch.tensor(rank["eager"]["losses"])
            torch.testing.assert_close(losses, eager_losses, **TRAINING_TOLERANCES)
            for p, q in zip(rank[mode]["params"], rank["eager"]["params"]):
                torch.testing.assert_close(p, q, **TRAINING_TOLERANCES)
