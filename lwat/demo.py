"""`lwat demo`: baseline vs lat on scikit-learn's embedded digits, a table and a PNG of the training curves.

Nothing to download. The model is the paper's toy net (`mlp_tanh`: two tanh layers of 1024 and 512
units, Section 3.4) on the 8x8 digits; its two hidden Linear layers are the perturbation points.
Runs are reused when their directory already holds a finished run, and resumed when interrupted.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from lwat.analysis import curves
from lwat.config import TrainConfig
from lwat.data import load_dataset
from lwat.evaluate import robustness
from lwat.train import CHECKPOINT, CONFIG, METRICS, load_run, read_log, resolve_device, train

METHODS = ("baseline", "lat")
FGSM_EPS = (0.05, 0.1)  # pixel units of [0, 1] images


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
            run = out / f"{method}-seed{seed}"
            if not (run / METRICS).exists():
                resume = (run / CONFIG).exists() and (run / CHECKPOINT).exists()
                result = train(cfg, run, resume=resume)
                if result["status"] == "interrupted":
                    raise KeyboardInterrupt
            model, _, _ = load_run(run, resolve_device(device))
            acc = robustness(model, data.test_x, data.test_y, (0.0, *FGSM_EPS))
            metrics = read_log(run)[-1]
            results.setdefault(method, []).append({**acc, "images_per_s": metrics["images_per_s"]})
            logs[f"{method} seed {seed}"] = read_log(run)
    curves.plot(curves.compute(logs), out / "curves.png")
    table = _table(results, epochs, seeds)
    (out / "demo.md").write_text(table + "\n")
    return table


def _table(results: dict, epochs: int, seeds: int) -> str:
    def cell(values, percent=True):
        scale = 100 if percent else 1
        mean = statistics.mean(values) * scale
        spread = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        return f"{mean:.1f} ± {spread:.1f}" if percent else f"{mean:.0f}"

    head = ["method", "clean acc %"] + [f"FGSM {e} acc %" for e in FGSM_EPS] + ["images/s"]
    lines = [f"digits (scikit-learn, 1437 train / 360 test), mlp_tanh, {epochs} epochs, {seeds} seed(s), "
             "mean ± std", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, rows in results.items():
        cells = [cell([r[0.0] for r in rows])] + [cell([r[e] for r in rows]) for e in FGSM_EPS]
        cells.append(cell([r["images_per_s"] for r in rows], percent=False))
        lines.append("| " + " | ".join([method] + cells) + " |")
    return "\n".join(lines)
