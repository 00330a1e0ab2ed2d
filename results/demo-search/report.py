"""Tables of the demo search from results.jsonl (written by search.py): every config tried, then the confirmations.

Usage: python report.py   (prints markdown)
Accuracies in %; gain = lat - baseline of the same seed (same init and data order); mean ± sample std over seeds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ms(v):
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"


def paired(records, key):
    """Seeds, baseline and other-method accuracies (%) of the seeds that have both."""
    by = {(r["method"] if r["method"] == "baseline" else "other", r["seed"]): 100 * r[key] for r in records}
    seeds = sorted(s for m, s in by if m == "other" and ("baseline", s) in by)
    return seeds, [by["baseline", s] for s in seeds], [by["other", s] for s in seeds]


def main():
    records = [json.loads(line) for line in (HERE / "results.jsonl").read_text().splitlines()]
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["split"], r["name"]), []).append(r)
    # baseline runs reused by search.py are stored once, under the config that ran them: attach them to every
    # config with the same settings but eps / scale
    def settings(r):
        return json.dumps({k: v for k, v in r["overrides"].items() if k not in ("eps", "scale")}, sort_keys=True)

    baselines = {(r["split"], settings(r), r["seed"]): r for r in records if r["method"] == "baseline"}
    print("## Search (validation split: 300 images held out of the training set, training on the other 1137)\n")
    print("| config | TrainConfig overrides | baseline val % | lat val % | gain (pts) | lat wins | n |")
    print("|---|---|---|---|---|---|---|")
    for (split, name), rs in groups.items():
        if split != "val":
            continue
        lat = [r for r in rs if r["method"] != "baseline"]
        base = [baselines[split, settings(r), r["seed"]] for r in lat]
        seeds, b, a = paired(lat + base, "val_acc")
        gain = [y - x for x, y in zip(b, a)]
        print(f"| {name} | `{json.dumps(lat[0]['overrides'])}` | {ms(b)} | {ms(a)} | {ms(gain)} | "
              f"{sum(g > 0 for g in gain)}/{len(gain)} | {len(seeds)} |")
    print("\n## Confirmation (fresh seeds, the real 360-image test set, trained on all 1437 images)\n")
    for (split, name), rs in groups.items():
        if split != "test":
            continue
        lat = [r for r in rs if r["method"] != "baseline"]
        base = [baselines[split, settings(r), r["seed"]] for r in lat]
        print(f"### {name}: {lat[0]['method']} `{json.dumps(lat[0]['overrides'])}`\n")
        print(f"| metric | baseline | {lat[0]['method']} | gain (pts) | wins / ties | n | per-seed baseline | per-seed {lat[0]['method']} | "
              "per-seed gain |")
        print("|---|---|---|---|---|---|---|---|---|")
        for key in ("test_acc", "fgsm_0.05", "fgsm_0.1"):
            seeds, b, a = paired(lat + base, key)
            gain = [y - x for x, y in zip(b, a)]
            print(f"| {key} | {ms(b)} | {ms(a)} | {ms(gain)} | {sum(g > 0 for g in gain)} / "
                  f"{sum(g == 0 for g in gain)} | {len(seeds)} | {' '.join(f'{v:.2f}' for v in b)} | "
                  f"{' '.join(f'{v:.2f}' for v in a)} | {' '.join(f'{v:+.2f}' for v in gain)} |")
        print(f"\nseeds {seeds[0]}-{seeds[-1]}\n")


if __name__ == "__main__":
    main()
