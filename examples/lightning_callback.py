"""lwat in Lightning: one callback; the cache travels in Lightning's checkpoints.

Tiny synthetic data (the label is the argmax of a fixed random projection), runs in seconds on a CPU:
    python examples/lightning_callback.py --steps 200
"""

import argparse
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lwat.integrations.lightning import LayerwiseAdversarialTraining


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64),
                                 nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--eps", type=float, default=10.0, help="lwat eps (range scaling, the paper's {10, 20, 30})")
    parser.add_argument("--out", type=Path, default=Path("lightning_out"), help="Lightning's default_root_dir")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(1024, 20)
    y = (x @ torch.randn(20, 4)).argmax(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, drop_last=True)
    model = Classifier()
    points = [name for name, m in model.net.named_modules() if isinstance(m, nn.LayerNorm)]
    lat = LayerwiseAdversarialTraining(args.eps, module="net", points=points)  # points are names inside .net
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", callbacks=[lat], default_root_dir=args.out,
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)  # resume with trainer.fit(model, loader, ckpt_path=...): the cache comes back too
    with torch.no_grad():
        acc = (model.eval().net(x).argmax(1) == y).float().mean().item()
    print(f"trained {trainer.global_step} steps with {len(points)} perturbation points: "
          f"train accuracy {acc:.3f}; checkpoints in {args.out}")


if __name__ == "__main__":
    main()
