"""The `lwat` command: thin wrappers, every subcommand is a library call. Errors in input are one line, exit 2.

The commands are the experiment platform: each imports it when it runs, so `import lwat` stays light, and a command
whose packages (pyproject's `experiments` extra) are missing says how to install them in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import textwrap
import typing
from pathlib import Path

from lwat.config import ConfigError, TrainConfig
from lwat.data import DataError

# The experiments extra's packages: import name -> the name pip installs.
EXPERIMENTS = {"tqdm": "tqdm", "PIL": "pillow", "sklearn": "scikit-learn", "scipy": "scipy",
               "matplotlib": "matplotlib", "pytorch_optimizer": "pytorch-optimizer"}
CORE_COMMANDS = {"presets"}  # run without the extra: listing the presets reads lwat/paper/ alone


def missing_experiments() -> list[str]:
    """The pip names of the experiments extra's packages that are not installed."""
    return [package for name, package in EXPERIMENTS.items() if importlib.util.find_spec(name) is None]


def needs_extra(command: str, packages: list[str]) -> int:
    """The one line (on stderr) and exit 2 of a command whose packages are missing."""
    verb = "is" if len(packages) == 1 else "are"
    print(f'lwat: error: {command} needs the experiment platform\'s packages ({", ".join(packages)} {verb} not '
          f'installed): pip install "lwat[experiments]"', file=sys.stderr)
    return 2


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, but a line never breaks inside a hyphenated name (lat-joint, fgsm-inter)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def registry_names() -> dict[str, str]:
    """The names a registry field accepts, for its --help: every model, every method with what it is."""
    from lwat.methods import METHODS
    from lwat.models import list_models

    return {"model": ", ".join(list_models()),
            "method": ", ".join(f"{name} ({m.help})" for name, m in METHODS.items())}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field, with its help, unit and default (the dataclass is the one source)."""
    hints = typing.get_type_hints(TrainConfig)
    names = registry_names()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        known = f": {names[f.name]}" if f.name in names else ""
        help = f"{f.metadata['help']}{known} (default: {f.default})"
        base = [h for h in typing.get_args(hints[f.name]) if h is not type(None)] or [hints[f.name]]
        if base[0] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            parser.add_argument(flag, type=base[0], default=argparse.SUPPRESS, help=help,
                                metavar=f.name.upper())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """File values (--config), overridden by the flags given on the command line."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    return TrainConfig.from_dict({**base, **given})


def cmd_train(args) -> int:
    from lwat.rundir import CONFIG
    from lwat.train import train

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / CONFIG).is_file():
            raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG})")
        cfg = TrainConfig.from_file(run_dir / CONFIG)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        given = {k: v for k, v in vars(args).items() if k in fields}
        if set(given) - {"device"} or args.config or args.out:
            raise ConfigError("--resume continues a run with its saved config; only --device may be given with it")
        cfg = cfg.replace(**given)
    else:
        cfg = config_from_args(args)
        run_dir = Path(args.out) if args.out else Path("runs") / f"{cfg.model}-{cfg.method}-seed{cfg.seed}"
    result = train(cfg, run_dir, resume=bool(args.resume), progress=args.progress)
    if result["status"] == "interrupted":
        print(f"interrupted: checkpoint saved; continue with: lwat train --resume {run_dir}", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
        print(json.dumps(result, indent=2))
        print(f"run directory: {run_dir}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from lwat.rundir import evaluate_run

    result = evaluate_run(args.run, eps_list=args.eps, attack=args.attack, device=args.device,
                          batch_size=args.batch_size, data_dir=args.data_dir)
    width = max(len(k) for k in result["accuracy"])
    print(f"{'eps':>{width}}  accuracy ({args.attack}, pixel units of [0, 1] images)")
    for eps, acc in result["accuracy"].items():
        print(f"{eps:>{width}}  {100 * acc:6.2f}%")
    print(f"written: {result['path']}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from lwat.demo import run_demo

    try:
        table = run_demo(args.out, epochs=args.epochs, seeds=args.seeds, device=args.device)
    except KeyboardInterrupt:  # a training saved its checkpoint (or none had started): the same command resumes
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    print(table)
    return 0


def cmd_analyze(args) -> int:
    from lwat.analysis import get_analysis
    from lwat.analysis.runs import analyze
    from lwat.rundir import read_run

    if get_analysis(args.name).NEEDS == "eval":  # eval.json: lwat eval writes it, with the attack and eps chosen there
        missing = [run for run in args.runs if not read_run(run).eval]
        if missing:
            what = f"run `lwat eval {missing[0]}` first" if len(missing) == 1 else "run `lwat eval RUN` on each first"
            raise ConfigError(f"analyze {args.name}: {', '.join(missing)}: not evaluated yet (it reads the runs' "
                              f"eval.json); {what}")
    paths = analyze(args.name, args.runs, out=args.out, device=args.device, limit=args.limit, eps=args.eps,
                    target=args.target, baseline=args.baseline, classes=args.classes)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_presets(args) -> int:
    from lwat.presets import format_presets

    print(format_presets())
    return 0


def cmd_reproduce(args) -> int:
    from lwat.reproduce import reproduce

    try:
        result = reproduce(args.target, scale=args.scale, seeds=args.seeds, data_dir=args.data_dir,
                           cifar100_dir=args.cifar100_dir, out=args.out, device=args.device, progress=args.progress,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:  # outside a training (which saves and returns by itself): nothing half-written
        result = {"status": "interrupted"}
    if result["status"] == "interrupted":
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    print(result["report"])
    return 0


def cmd_sweep(args) -> int:
    from lwat.sweep import sweep

    try:
        result = sweep(config_from_args(args), args.eps_list, args.out, seeds=args.seeds, train=not args.no_train,
                       progress=args.progress, log=lambda line: print(line, file=sys.stderr, flush=True))
    except KeyboardInterrupt:  # outside a training (which saves and returns by itself): nothing half-written
        result = {"status": "interrupted"}
    if result["status"] == "interrupted":
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    print(Path(result["files"]["markdown"]).read_text(), end="")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lwat", description="Efficient layerwise adversarial training "
                                     "(Sankaranarayanan et al., AAAI 2018).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run (any method of the paper)", formatter_class=HelpFormatter,
                       description="Train one run. Flags override values from --config FILE (JSON).")
    p.add_argument("--config", metavar="FILE", help="JSON file of config keys (the flags' names, with _)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/MODEL-METHOD-seedSEED)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run with its saved config")
    p.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="progress display (default: auto = a bar on a terminal, lines otherwise)")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    from lwat.evaluate import FGSM_EPS

    p = sub.add_parser("eval", help="clean and adversarial accuracy of a trained run",
                       description="Clean accuracy and accuracy under an attack at several eps on the test set; "
                                   "prints a table and writes it beside the checkpoint: eval.json for FGSM (what "
                                   "reports and analyses read), eval-pgd.json for PGD.")
    p.add_argument("run", metavar="RUN_DIR_OR_CKPT")
    p.add_argument("--eps", type=float, nargs="+", default=list(FGSM_EPS),
                   help="attack strengths, pixel units of [0, 1] images (default: the paper's Table 4 values)")
    p.add_argument("--attack", choices=["fgsm", "pgd"], default="fgsm", help="attack (default: fgsm)")
    p.add_argument("--batch-size", type=int, default=500, help="images per batch (default: 500)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda (default: auto)")
    p.add_argument("--data-dir", help="data location, if it moved since training (default: the run's)")
    p.set_defaults(func=cmd_eval)

    seeds, epochs = 5, 30
    p = sub.add_parser("demo", help=f"baseline vs lat on scikit-learn's digits (8x8 images, the toy MLP): {seeds} "
                                    f"seeds per method, {epochs} epochs each, by default",
                       description="Train baseline and lat on scikit-learn's digits, print a comparison "
                                   "table and write a PNG of the training curves.")
    p.add_argument("--out", default="runs/demo", help="where the runs and the plot go (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"epochs per run (default: {epochs})")
    p.add_argument("--seeds", type=int, default=seeds, help=f"runs per method (default: {seeds})")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.set_defaults(func=cmd_demo)

    from lwat.analysis import ANALYSES

    p = sub.add_parser("analyze", help="one of the paper's analyses on trained runs (PNG, CSV, JSON)",
                       description="strength (Table 1) and tsne (Figure 1) take one run; jacobian (Figure 2), "
                                   "transfer (Table 2, with --target), robustness (Table 4, from the runs' eval.json: "
                                   "run lwat eval first), depth (Table 6) and curves (Figure 3) take several.")
    p.add_argument("name", choices=sorted(ANALYSES))
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="output directory (default: FIRST_RUN/analysis)")
    p.add_argument("--eps", type=float, nargs="+",
                   help="eps values (strength, tsne: activation units at the points, and pixel units for the "
                        "input attacks; transfer, robustness: pixel units); default: the paper's (robustness: every "
                        "eps in eval.json)")
    p.add_argument("--limit", type=int, help="use only the first LIMIT test images (default: all)")
    p.add_argument("--target", help="transfer: the run whose model classifies the attacked images")
    p.add_argument("--baseline", help="depth: a baseline run, drawn as a horizontal line")
    p.add_argument("--classes", type=int, nargs=2, help="tsne: two class indices (default: 0 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.set_defaults(func=cmd_analyze)

    from lwat.presets import PRESETS, SCALES

    p = sub.add_parser("presets", help="list the paper's experiments (presets of lwat reproduce)",
                       description="Every preset: what it reproduces, its trainings per scale and the estimated "
                                   "CPU time of one cpu-scale training.")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("reproduce", help="reproduce a table or figure of the paper, writing OUT/REPORT.md",
                       description="Run (or reuse, or resume) a preset's trainings, then its evaluations and "
                                   "analyses, then write OUT/REPORT.md: our numbers beside the paper's. Finished "
                                   "runs under OUT/runs are found by their config and reused.")
    p.add_argument("target", metavar="TARGET", help=f"a preset ({', '.join(PRESETS)}) or all")
    p.add_argument("--scale", default="cpu", help=f"{', '.join(SCALES)} (default: cpu)")
    p.add_argument("--seeds", type=int, help="trainings per row, seeds 0..N-1 (default: the preset's)")
    p.add_argument("--data-dir", help="CIFAR-10: the official python version (folder or .tar.gz), or an image "
                                      "folder / archive such as cifar10-jpeg.tar.gz")
    p.add_argument("--cifar100-dir", help="CIFAR-100, likewise (without it CIFAR-100 rows are not run)")
    p.add_argument("--out", help="where runs, analyses and REPORT.md go (default: results/SCALE)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="training progress display (default: auto)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("sweep", help="choose eps on a held-out validation split: baseline and one run per eps",
                       conflict_handler="resolve",  # its --eps (a list) replaces the config's --eps
                       formatter_class=HelpFormatter,
                       description="Train the baseline and one run of the (layerwise) method per eps on the "
                                   "training set minus a class-balanced validation split (--val-size), choose "
                                   "the eps with the highest mean final validation accuracy (test accuracy is "
                                   "shown, never used), write OUT/sweep.json, OUT/sweep.md and OUT/sweep.png. "
                                   "Finished runs under OUT/runs are found by their config and reused; "
                                   "unfinished ones are resumed. Every lwat train flag sets the base config.")
    p.add_argument("--config", metavar="FILE", help="JSON file of config keys (the flags' names, with _)")
    p.add_argument("--out", required=True, help="where runs/, sweep.json, sweep.md and sweep.png go")
    p.add_argument("--seeds", type=int, default=1, help="trainings per eps and for the baseline, seeds SEED.. "
                                                         "SEED+N-1; eps is chosen on their mean (default: 1)")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: write the outputs from the runs finished under OUT/runs")
    p.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="training progress display (default: auto)")
    add_config_flags(p)
    p.add_argument("--eps", dest="eps_list", type=float, nargs="+", required=True, metavar="EPS",
                   help="the eps values to try, each > 0 (the paper's appendix: 10 20 30)")
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = make_parser().parse_args(argv)
        missing = [] if args.command in CORE_COMMANDS else missing_experiments()
        if missing:  # before the command starts anything (a run directory, a download)
            return needs_extra(f"lwat {args.command}", missing)
        code = run_command(args)
        sys.stdout.flush()  # here, so that a reader gone away (below) is seen before the interpreter's exit
        return code
    except BrokenPipeError:  # stdout's reader stopped (lwat presets | head): stop quietly, as cat does
        with contextlib.suppress(OSError, ValueError):  # and nothing more at exit, where the flush would fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # SIGPIPE's status, what a shell shows for a writer whose reader left
    except ModuleNotFoundError as e:  # a core install (torch alone): one line, no traceback
        package = EXPERIMENTS.get((e.name or "").partition(".")[0])
        if package is None:
            raise
        return needs_extra(f"lwat {args.command}" if args is not None else "this command", [package])


def run_command(args: argparse.Namespace) -> int:
    """The parsed command, its input errors as one line and exit 2."""
    from lwat._fused import KernelsError
    from lwat.train import TrainingError

    try:
        return args.func(args)
    except BrokenPipeError:  # stdout's reader went away: `main` stops quietly
        raise
    except (ConfigError, DataError, TrainingError, KernelsError, ValueError, OSError) as e:  # OSError: a bad path
        print(f"lwat: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training's own handler is in place (loading data): nothing to save yet
        print("lwat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
