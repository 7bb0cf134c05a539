"""A whole training step (forward, backward, tritonkit.optim step) captured in one CUDA graph and replayed,
against the same steps run eagerly, for each optimizer: prints max |param diff| (expected 0 or a few ulps)
and whether an eager step() synchronized with the host (torch's sync debug mode). Needs a GPU.

    python bench/capturable_step.py        # exit status 1 when a case fails
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

import tritonkit.optim as tko

CASES = [("SGD", {"momentum": 0.9, "nesterov": True}), ("Adam", {"capturable": True, "amsgrad": True}),
         ("AdamW", {"capturable": True}), ("RMSprop", {"capturable": True, "centered": True, "momentum": 0.9}),
         ("Adagrad", {"fused": True, "lr_decay": 0.01})]
WARMUP, STEPS = 3, 8


def train(name: str, kw: dict, graph: bool) -> list[torch.Tensor]:
    """STEPS steps on fixed batches with lr changed in place before each; the first WARMUP eagerly (on a
    side stream, as torch.cuda.graphs asks), the rest eagerly or by replaying one captured step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 10)).cuda()
    xs, ys = torch.randn(STEPS, 32, 48, device="cuda"), torch.randint(0, 10, (STEPS, 32), device="cuda")
    lr = torch.tensor(0.01, device="cuda")
    opt = getattr(tko, name)(model.parameters(), lr=lr, **kw)
    x, y = xs[0].clone(), ys[0].clone()  # the graph's static inputs

    def step():
        opt.zero_grad(set_to_none=False)  # gradients keep their storage: the graph reads the same addresses
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def load(i):
        x.copy_(xs[i])
        y.copy_(ys[i])
        lr.fill_(0.01 * 0.8 ** i)  # a scheduler's in-place update: the replay reads it on the device

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(WARMUP):
            load(i)
            step()
    torch.cuda.current_stream().wait_stream(side)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
    for i in range(WARMUP, STEPS):
        load(i)
        if graph:
            g.replay()
        else:
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y).backward()
            torch.cuda.set_sync_debug_mode("error")  # any host sync inside step() raises
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return [p.detach().clone() for p in model.parameters()]


def main() -> int:
    if not torch.cuda.is_available():
        print("capturable_step: no GPU, nothing to do")
        return 0
    failed = 0
    for name, kw in CASES:
        try:
            eager, replayed = train(name, kw, graph=False), train(name, kw, graph=True)
            diff = max((a - b).abs().max().item() for a, b in zip(eager, replayed))
            ok = diff <= 1e-6
            print(f"{name:8s} {kw}: max |param diff| graph vs eager = {diff:.3e}  no sync in step()  "
                  f"{'ok' if ok else 'FAIL'}")
        except Exception as e:  # noqa: BLE001  (report every case)
            ok = False
            print(f"{name:8s} {kw}: FAIL {type(e).__name__}: {e}")
        failed += not ok
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
