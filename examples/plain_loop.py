"""lwat in a hand-written PyTorch loop: one `lwat.attach` line, the cache saved beside the weights.

Tiny synthetic data (the label is the argmax of a fixed random projection), runs in seconds on a CPU:
    python examples/plain_loop.py --steps 200
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lwat


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--eps", type=float, default=10.0, help="lwat eps (range scaling, the paper's {10, 20, 30})")
    parser.add_argument("--out", type=Path, default=Path("plain_loop_out"), help="where the checkpoint goes")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(1024, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)  # 4 classes
    model = nn.Sequential(nn.Linear(20, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.LayerNorm(64),
                          nn.GELU(), nn.Linear(64, 4))
    points = [name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)]  # after every LayerNorm
    handle = lwat.attach(model, args.eps, points=points)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for step in range(args.steps):
        i = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i]), y[i])
        loss.backward()  # also caches the next batch's perturbation
        opt.step()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "lwat": handle.state_dict()}, args.out / "checkpoint.pt")
    handle.detach()  # the plain model again
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean().item()
    print(f"trained {args.steps} steps with {len(points)} perturbation points: last loss {loss.item():.3f}, "
          f"train accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
