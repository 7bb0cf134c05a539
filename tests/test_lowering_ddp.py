"""DistributedDataParallel around a tritonkit-compiled LeNet: 2 processes, DDPOptimizer splitting the
graph at (deliberately small) gradient buckets, parameters identical on both ranks and equal to
eager DDP's.

gloo on the CPU (and with one GPU: NCCL needs a GPU per rank), NCCL when every rank has its own GPU.
"""

import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tritonkit.testing import TRAINING_TOLERANCES

WORLD = 2
STEPS = 3
BUCKET_MB = 0.02  # LeNet's fc1 weight alone is 0.18 MiB: several buckets, so several compiled graphs


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from tritonkit.lowering import backend
    from tritonkit.models import LeNet
    from tritonkit.runtime import default_device

    device = default_device()
    use_nccl = device.type == "cuda" and torch.cuda.device_count() >= WORLD
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    # DDPOptimizer refuses a first bucket (1 MiB by default) larger than the others
    dist._DEFAULT_FIRST_BUCKET_BYTES = int(BUCKET_MB * 1024 * 1024)
    dist.init_process_group("nccl" if use_nccl else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    base = LeNet().to(device)
    reports = []
    results = {}
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(base)
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)
        run = ddp
        if mode == "compiled":
            run = torch.compile(ddp, backend=backend, options={"collect": reports, "fallback": "error"})
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own batches
        losses = []
        for _ in range(STEPS):
            x = torch.randn(4, 3, 32, 32, generator=data).to(device)
            y = torch.randn(4, 10, generator=data).to(device)
            opt.zero_grad()
            loss = F.mse_loss(run(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        results[mode] = {"losses": losses, "params": [p.detach().cpu() for p in model.parameters()]}
    results["graphs"] = [(r.kind, [str(entry) for entry in r.lowered], len(r.fallbacks)) for r in reports]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_compiled_lenet_matches_eager_ddp(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in ranks:
        kinds = [kind for kind, _, _ in r["graphs"]]
        assert kinds.count("forward") >= 2, f"DDPOptimizer did not split the graph: {r['graphs']}"
        assert kinds.count("backward") == kinds.count("forward")
        lowered = " ".join(entry for _, entries, _ in r["graphs"] for entry in entries)
        assert "tritonkit.conv2d(relu=True)" in lowered and "tritonkit.conv2d_weight_bias_grad" in lowered
    # all-reduced gradients and identical optimizers: the ranks hold the same parameters, bit for bit
    for a, b in zip(ranks[0]["compiled"]["params"], ranks[1]["compiled"]["params"]):
        assert torch.equal(a, b)
    for rank in ranks:
        losses, eager_losses = torch.tensor(rank["compiled"]["losses"]), torch.tensor(rank["eager"]["losses"])
        torch.testing.assert_close(losses, eager_losses, **TRAINING_TOLERANCES)
        for p, q in zip(rank["compiled"]["params"], rank["eager"]["params"]):
            torch.testing.assert_close(p, q, **TRAINING_TOLERANCES)
