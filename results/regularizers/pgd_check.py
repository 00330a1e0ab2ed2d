"""Is the study's FGSM gain real robustness? The same runs under PGD (10 steps, random start), one eps.

FGSM takes one gradient step, so a model whose input gradient misleads it (gradient masking; label smoothing is a
known case) looks more robust under FGSM than it is. PGD takes ten. Where a row's FGSM gain over the baseline also
holds under PGD, it is not masking of that kind. Verdicts by lwat.render.verdict, paired by seed.

    python results/regularizers/pgd_check.py [--train-root DIR] [--eps 0.005] GROUP...

Reads eval.json (FGSM) and eval-pgd.json of main's committed runs (results/regularizers/runs). A run without PGD at
that eps is evaluated first, where --train-root (the study worktree's runs/) holds its checkpoint, and its
eval-pgd.json copied here. Writes results/regularizers/PGD.md.
"""

import argparse
import json
from pathlib import Path

from lwat.render import claim, fmt, stats, table
from lwat.rundir import eval_file, evaluate_run, host_info, machine, read_json, write_json

HERE = Path(__file__).parent


def runs(group: str) -> list[Path]:
    return sorted((HERE / "runs").glob(f"regularizers-{group}-seed*"))


def record(run: Path, attack: str) -> dict:
    path = run / eval_file(attack)
    return json.loads(path.read_text()) if path.exists() else {"accuracy": {}}


def accuracies(group: str, attack: str, eps: float) -> dict[int, float]:
    """{seed: accuracy %} of the group's committed runs holding `attack` at `eps`."""
    return {json.loads((run / "config.json").read_text())["seed"]: 100 * record(run, attack)["accuracy"][f"{eps:g}"]
            for run in runs(group) if f"{eps:g}" in record(run, attack)["accuracy"]}


def evaluate_missing(group: str, eps: float, train_root: Path) -> None:
    """PGD at `eps` for the group's runs without it, on this machine (named in the file), where their checkpoint is."""
    for run in runs(group):
        if f"{eps:g}" in record(run, "pgd")["accuracy"]:
            continue
        trained = train_root / run.name
        if not (trained / "checkpoint.pt").exists():
            print(f"{run.name}: no checkpoint under {train_root}, skipped")
            continue
        result = evaluate_run(trained, eps_list=(eps,), attack="pgd", device="cpu")
        write_json(run / eval_file("pgd"), {**read_json(Path(result["path"])), "machine": machine(host_info())})
        print(f"{run.name}: PGD {eps:g} {100 * result['accuracy'][f'{eps:g}']:.2f}%", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("groups", nargs="+", metavar="GROUP", help="study rows besides the baseline, e.g. lat")
    p.add_argument("--eps", type=float, default=0.005, help="attack eps, pixel units of [0, 1] images")
    p.add_argument("--train-root", type=Path, help="where the runs' checkpoints are (the study worktree's runs/)")
    args = p.parse_args()
    groups = ["baseline", *args.groups]
    if args.train_root:
        for group in groups:
            evaluate_missing(group, args.eps, args.train_root)
    acc = {g: {a: accuracies(g, a, args.eps) for a in ("fgsm", "pgd")} for g in groups}
    rows = [[g, str(len(acc[g]["pgd"])), fmt(stats(list(acc[g]["fgsm"].values()))),
             fmt(stats(list(acc[g]["pgd"].values())))] for g in groups]
    lines = [f"# The study's robustness under PGD (eps {args.eps:g})", "",
             f"Command: `python results/regularizers/pgd_check.py --eps {args.eps:g} {' '.join(args.groups)}` "
             "(runs without PGD evaluated on the CPU, where their checkpoints are). Accuracy % on the 10,000 test "
             "images, mean ± sample std over seeds; PGD: 10 steps of 2.5 eps / 10, random start (lwat.attacks.pgd); "
             "FGSM from each run's eval.json. Scale and runs: [REPORT.md](REPORT.md). PGD evaluated on: "
             f"{'; '.join(sorted({record(r, 'pgd').get('machine', 'not recorded') for g in groups for r in runs(g)}))}"
             ".", "",
             *table(["row", "n (PGD)", f"FGSM {args.eps:g} acc %", f"PGD {args.eps:g} acc %"], rows), "",
             "Claims (each by the one rule, lwat.render.verdict, paired by seed):"]
    for g in args.groups:
        for attack in ("fgsm", "pgd"):
            lines.append(claim(f"{g} beats the baseline under {attack.upper()} eps {args.eps:g}", acc[g][attack],
                               acc["baseline"][attack], names=(g, "baseline")))
    (HERE / "PGD.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
