"""`lwat demo`: baseline vs lat on scikit-learn's embedded digits, a table and a PNG of the training curves.

Nothing to download. The model is the paper's toy net (`mlp_tanh`: two tanh layers of 1024 and 512
units, Section 3.4) on the 8x8 digits; its two hidden Linear layers are the perturbation points.
Each run has its own directory, OUT/METHOD-eEPOCHS-seedSEED: a finished run of the same config is reused, an
interrupted one resumed.
"""

from __future__ import annotations

from pathlib import Path

from lwat import rundir
from lwat.analysis import curves
from lwat.config import ConfigError, TrainConfig, resolve_device
from lwat.data import load_dataset
from lwat.evaluate import robustness
from lwat.render import fmt, stats, table
from lwat.train import train

METHODS = ("baseline", "lat")
EPS = (0.05, 0.1)  # the demo's FGSM eps, pixel units of [0, 1] images


def demo_config(method: str, seed: int, epochs: int, device: str) -> TrainConfig:
    # eps 10 with range scaling: the paper's value; digits are not mirror-symmetric, so no flips.
    return TrainConfig(model="mlp_tanh", method=method, dataset="digits", epochs=epochs, batch_size=64,
                       lr_drop_every=max(1, epochs // 3), eps=10.0, flip=False, seed=seed, device=device)


def run_demo(out, *, epochs: int = 30, seeds: int = 2, device: str = "auto") -> str:
    """Train (or reuse) baseline and lat runs under `out`, evaluate them, plot the curves.

    Returns:
        The comparison table (markdown), also written to out/demo.md; the plot is out/curves.png.
    """
    out = Path(out)
    data = load_dataset("digits")
    results, logs = {}, {}
    for method in METHODS:
        for seed in range(seeds):
            cfg = demo_config(method, seed, epochs, device)
            run = out / f"{method}-e{epochs}-seed{seed}"
            if (run / rundir.CONFIG).exists() and TrainConfig.from_file(run / rundir.CONFIG).replace(
                    device=device) != cfg:
                raise ConfigError(f"{run} holds a run of another config; remove it or give another --out")
            if not (run / rundir.METRICS).exists():
                result = train(cfg, run, resume=rundir.has_checkpoint(run))
                if result["status"] == "interrupted":
                    raise KeyboardInterrupt
            model, _, _ = rundir.load_run(run, resolve_device(device))
            acc = robustness(model, data.test_x, data.test_y, (0.0, *EPS))
            log = rundir.read_log(run)
            results.setdefault(method, []).append({**acc, "images_per_s": log[-1]["images_per_s"]})
            logs[f"{method} seed {seed}"] = log
    curves.plot(curves.compute(logs), out / "curves.png")
    text = _table(results, epochs, seeds)
    (out / "demo.md").write_text(text + "\n")
    return text


def _table(results: dict, epochs: int, seeds: int) -> str:
    def percent(rows, key):
        return fmt(stats([100 * r[key] for r in rows]))

    head = ["method", "clean acc %"] + [f"FGSM {e} acc %" for e in EPS] + ["images/s"]
    rows = [[method, percent(rs, 0.0), *(percent(rs, e) for e in EPS),
             f"{stats([r['images_per_s'] for r in rs])[0]:.0f}"] for method, rs in results.items()]
    return "\n".join([f"digits (scikit-learn, 1437 train / 360 test), mlp_tanh, {epochs} epochs, {seeds} seed(s), "
                      "mean ± std", "", *table(head, rows)])
