"""Train what main's study module plans beyond the worktree's preset, with the worktree's own (fixed) code.

The study's runs train from a worktree of one commit (run_study.sh). Decisions taken later on main, once rows have
their 3 seeds, are read from main's lwat/paper/regularizers.py (its constants only, never its code):
  - DUE: rows given MORE_SEEDS seeds (issue 34: 5 where 3 leave the interval across 0);
  - COMBINED: lat with each of the two best other rows, "lat+X", SEEDS["cpu"] seeds.
Each training is the worktree's own preset row (its `fields`), so run keys and code match the rows already trained;
finished runs are reused, unfinished ones resumed, and runs another process holds are skipped (reproduce's lock).

    PYTHONPATH=TREE python train_more.py MAIN_MODULE OUT DATA     (run_study.sh runs it after each worker's preset)
"""

import ast
import sys
from pathlib import Path

from lwat.paper import regularizers
from lwat.paper.plan import Plan, resolve_data
from lwat.reproduce import ensure_trained, index_runs


def constants(path: Path, names: tuple[str, ...]) -> dict:
    """The named module-level constants of a Python file, read without running it."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                      else None)
        if isinstance(target, ast.Name) and target.id in names:
            found[target.id] = ast.literal_eval(node.value)
    return found


def main(module: str, out: str, data_dir: str) -> None:
    c = constants(Path(module), ("SEEDS", "MORE_SEEDS", "DUE", "COMBINED"))
    todo = {**{g: c["MORE_SEEDS"] for g in c["DUE"]}, **{f"lat+{g}": c["SEEDS"]["cpu"] for g in c["COMBINED"]}}
    plan, data = Plan("regularizers", "cpu", c["SEEDS"]["cpu"]), resolve_data("cpu", cifar10=data_dir)
    for group, seeds in todo.items():
        plan.add(group, data["cifar10"], seeds, stem=f"regularizers-{group}",
                 **regularizers.fields("cpu", "cpu", group))
    root, index = Path(out) / "runs", {}
    for t in plan.trainings:
        outcome, run = ensure_trained(t, root, index, progress="lines")
        print(f"{t.name}: {outcome} ({run.name if run else '-'})", flush=True)
        if outcome == "interrupted":
            sys.exit(130)


if __name__ == "__main__":
    main(*sys.argv[1:])
