"""Train the seed tutorial's LeNet on tritonkit.nn for a few SGD-momentum steps, next to torch.nn.

    python examples/lenet_quickstart.py [--steps 10] [--batch-size 16]

Both models start from the same weights and see the same random batch; the two loss columns should
agree to about five significant digits.
"""

import argparse
import time

import torch
import torch.nn.functional as F

import tritonkit
from tritonkit.models import LeNet, TritonkitLeNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    print(tritonkit.runtime_info())
    device = tritonkit.runtime.default_device()
    torch.manual_seed(0)
    reference = LeNet().to(device)
    model = TritonkitLeNet().to(device)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randn(args.batch_size, 10, device=device)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (model, reference)]

    print(f"{'step':>4}  {'tritonkit.nn':>14}  {'torch.nn':>14}  {'ms/step':>8}")
    for step in range(args.steps):
        losses = []
        for m, opt in zip((model, reference), optimizers):
            start = time.perf_counter()
            opt.zero_grad()
            loss = F.mse_loss(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if m is model:
                elapsed = (time.perf_counter() - start) * 1e3
        print(f"{step:>4}  {losses[0]:>14.6f}  {losses[1]:>14.6f}  {elapsed:>8.1f}")


if __name__ == "__main__":
    main()
