"""Why Table 5's dropout runs fail at cpu scale: BatchNorm statistics collected under dropout.

Trains (or reuses) the cpu-scale VGG-16-BN (width 1/4, cifar.torch dropout, 10,000 class-balanced images) for a
few epochs, then compares its test accuracy in eval mode with the accuracy after re-estimating every BatchNorm's
running statistics on the training images with dropout off. If eval mode collapses onto one class and the
re-estimated model recovers, the failure is the dropout/BatchNorm variance shift, not the training itself.

    python results/diagnostics/dropout_bn.py RUN_DIR --data-dir ../shared/data/cifar10-jpeg.tar.gz [--epochs 3]
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from lwat.config import TrainConfig
from lwat.data import load_dataset
from lwat.rundir import load_run
from lwat.train import train


def predictions(model, x, batch_size=500):
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].float() / 255).argmax(1) for i in range(0, len(x), batch_size)])


def test_summary(model, ds) -> str:
    """Test accuracy and the share of test images given the most common class, from one pass."""
    pred = predictions(model, ds.test_x)
    top = pred.bincount(minlength=ds.num_classes).max().item() / len(pred)
    return f"test accuracy {(pred == ds.test_y).float().mean().item():.4f}, share of the most common class {top:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    cfg = TrainConfig(model="vgg16_bn", width=0.25, dropout=True, method="baseline", dataset="folder",
                      data_dir=args.data_dir, train_subset=10_000, epochs=args.epochs, lr_drop_every=5,
                      eval_batch_size=500, device="cpu")
    if not (args.run / "metrics.json").exists():
        train(cfg, args.run, progress="lines")
    model, cfg, _ = load_run(args.run)
    ds = load_dataset("folder", cfg.data_dir, train_subset=cfg.train_subset, seed=cfg.seed)
    print(f"{args.run} ({cfg.epochs} epochs): eval mode: {test_summary(model, ds)}")
    for m in model.modules():  # re-estimate BatchNorm statistics (cumulative average) with dropout off
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    predictions(model, ds.train_x)  # the forward passes update the statistics
    model.eval()
    print(f"after re-estimating BatchNorm statistics without dropout: {test_summary(model, ds)}")


if __name__ == "__main__":
    main()
