"""`lwat reproduce`: run presets' trainings (reusing or resuming what exists), evaluations and analyses, then write
OUT/REPORT.md with our numbers beside the paper's.

Layout of OUT (default results/<scale>):
    runs/<name>-<hash>/   one training (lwat.rundir): config.json, host.json, log.jsonl, metrics.json, eval.json;
                          checkpoint.pt, checkpoint.prev.pt and reproduce.lock are git-ignored
    analysis/<name>.json  an analysis' rows per seed and the runs they came from (names and training seconds, so
                          rows of a run since trained again are not shown as its); <name>.png its plot
    REPORT.md             every preset with results here, scale, data, hardware and wall time stated

Reuse is keyed by the resolved config: a training is found by looking for OUT/runs/*/config.json equal to the
wanted config ignoring `device`, `download` and where the data lies (`data_dir`; of a folder data set only the
file name counts, so a CIFAR-100 folder is never taken for a CIFAR-10 one). Runs made elsewhere, or in
directories named otherwise, are reused. A finished run (metrics.json) is reused as is; an unfinished one
(config.json and checkpoint.pt) is resumed, bit-exact, unless another process looks to be training it; an
interrupted reproduction continues where it stopped. Tables need only each run's small files; analyses that need
a model need its checkpoint and say "needs checkpoint, re-run" where it is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path


from lwat.analysis import get_analysis
from lwat.analysis.runs import compute as compute_analysis
from lwat.analysis.runs import lacks, report_rows, version
from lwat.config import ConfigError, TrainConfig, resolve_device
from lwat.data import DataError
from lwat.paper import report
from lwat.paper.plan import SCALES, Plan, Training, data_identity, resolve_data
from lwat.paper.results import Results, RunResult
from lwat.presets import PRESETS, get_preset
from lwat.rundir import (  # noqa: F401  (host_info: re-exported for scripts)
    CONFIG, LOCK, METRICS, discard_start, evaluate_run, has_checkpoint, host_info, read_json, read_run, write_json,
)
from lwat.train import TrainingError, train

REPORT = "REPORT.md"
# where and how a run ran, not what it computed (compile, channels_last and kernels change speed, not the math)
IGNORED_IN_KEY = ("device", "download", "data_dir", "compile", "channels_last", "kernels")
BUSY_SECONDS = 600  # an unfinished run not started by lwat reproduce, written this recently, may be training now


def run_key(cfg: TrainConfig) -> str:
    """What makes two trainings the same: the config as canonical JSON, without IGNORED_IN_KEY, plus the data's
    identity (`lwat.paper.plan.data_identity`)."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in IGNORED_IN_KEY}
    values["data"] = data_identity(cfg.dataset, cfg.data_dir)
    return json.dumps(values, sort_keys=True)


def run_hash(cfg: TrainConfig) -> str:
    """8 hex digits of the run key: the suffix of new run directories."""
    return hashlib.sha256(run_key(cfg).encode()).hexdigest()[:8]


def index_runs(root) -> dict[str, list[Path]]:
    """{run key: run directories} of every root/*/config.json that reads as a TrainConfig (others are skipped)."""
    index: dict[str, list[Path]] = {}
    for path in sorted(Path(root).glob(f"*/{CONFIG}")):
        try:
            cfg = TrainConfig.from_file(path)
        except ConfigError:  # another lwat version's config, or not a run: never ours to reuse
            continue
        index.setdefault(run_key(cfg), []).append(path.parent)
    return index


def _state(run: Path) -> str:
    if (run / METRICS).exists():
        return "finished"
    return "unfinished" if has_checkpoint(run) else "stale"


def find_run(index: dict, training: Training) -> tuple[Path | None, str]:
    """The best directory holding `training` (its config or an accepted alternative) and its state:
    "finished", "unfinished" (a checkpoint to resume), "stale" (config only) or "missing"."""
    rank = {"finished": 0, "unfinished": 1, "stale": 2}
    found = [d for cfg in (training.config, *training.alternatives) for d in index.get(run_key(cfg), [])]
    if not found:
        return None, "missing"
    best = min(found, key=lambda d: rank[_state(d)])
    return best, _state(best)


# ----------------------------------------------------------------------------------------------------------------
# Trainings


class _Busy(Exception):
    pass


@contextlib.contextmanager
def _locked(run: Path):
    """Hold run/reproduce.lock (flock) while training there; _Busy when another process holds it."""
    run.mkdir(parents=True, exist_ok=True)
    f = open(run / LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise _Busy("another lwat reproduce is training it") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _busy_elsewhere(run: Path) -> str | None:
    """Why an unfinished run may be in use by a process that is not lwat reproduce (None if it looks idle)."""
    if (run / LOCK).exists():  # started by lwat reproduce: the lock itself says whether it is in use
        return None
    newest = max((p.stat().st_mtime for p in run.iterdir() if p.is_file()), default=0.0)
    age = time.time() - newest
    if age < BUSY_SECONDS:
        return (f"written {age:.0f} s ago by a process other than lwat reproduce (maybe still training); "
                f"left alone, run again later")
    return None


def ensure_trained(training: Training, root: Path, index: dict, *, progress: str = "auto") -> tuple[str, Path | None]:
    """Reuse, resume or run one training under `root` (OUT/runs).

    Returns:
        (outcome, run directory): outcome is "reused", "trained", "resumed", "interrupted", "no data",
        "busy: ..." or "failed: ...".
    """
    index.clear()  # re-read: another lwat reproduce may have started or finished this training meanwhile
    index.update(index_runs(root))
    run, state = find_run(index, training)
    if state == "finished":
        return "reused", run
    if not training.available:
        return "no data", run
    cfg, resume = training.config, False
    in_place = state == "unfinished" or (state == "stale" and (run / LOCK).exists())
    if in_place:
        reason = _busy_elsewhere(run)
        if reason:
            return f"busy: {reason}", run
    else:  # missing, or stale and maybe another process's (no lock file of ours): a new directory
        run = root / f"{training.name}-{run_hash(cfg)}"
        k = 2
        while (run / CONFIG).exists():
            run, k = root / f"{training.name}-{run_hash(cfg)}-{k}", k + 1
    try:
        with _locked(run):
            if state == "unfinished":
                saved = TrainConfig.from_file(run / CONFIG)
                cfg, resume = saved.replace(device=cfg.device, data_dir=cfg.data_dir), True
                if saved.data_dir != cfg.data_dir:  # made elsewhere: the same data (same identity) lies here
                    write_json(run / CONFIG, saved.replace(data_dir=cfg.data_dir).to_dict())
            elif in_place:  # ours, killed before its first checkpoint: nothing to keep
                discard_start(run)
            result = train(cfg, run, resume=resume, progress=progress)
    except _Busy as e:
        return f"busy: {e}", run
    except Exception as e:
        if not has_checkpoint(run):  # nothing to resume (bad input at setup, a failure in epoch 1): no folder left
            discard_start(run)
            (run / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run.rmdir()
        if isinstance(e, TrainingError):
            return f"failed: {e}", run
        raise
    if result.get("status") == "interrupted":
        return "interrupted", run  # the lock file stays: it marks the run as ours, to be resumed at once
    (run / LOCK).unlink(missing_ok=True)
    return ("resumed" if resume else "trained"), run


# ----------------------------------------------------------------------------------------------------------------
# Reading what exists


def run_result(training: Training, index: dict) -> RunResult:
    """What is on disk for one planned training (nothing is run)."""
    run, state = find_run(index, training)
    if state == "missing":
        return RunResult(training, "not run yet" if training.available else "not run (no data given)")
    result = RunResult(training, state, **vars(read_run(run)))
    if state != "finished":
        result.status = f"unfinished (epoch {len(result.log)} of {result.config.epochs})"
    return result


def _with_seed(t: Training, seed: int) -> Training:
    return Training(t.name.rsplit("-seed", 1)[0] + f"-seed{seed}", t.group, seed, t.config.replace(seed=seed),
                    t.available, tuple(a.replace(seed=seed) for a in t.alternatives))


def _one_data_set(results: list[RunResult], index: dict, planned: int) -> list[RunResult]:
    # A row averages runs on one data set: the one the first finished seed used. A seed found on another (an accepted
    # alternative, e.g. the JPEG copy beside the official files) is looked up again on that data set alone; a
    # further seed not finished there is dropped.
    first = next((r for r in results if r.finished), None)
    if first is None:
        return results
    data = data_identity(first.config.dataset, first.config.data_dir)
    kept = []
    for i, r in enumerate(results):
        if r.finished and data_identity(r.config.dataset, r.config.data_dir) != data:
            t = r.training
            same = [c for c in (t.config, *t.alternatives) if data_identity(c.dataset, c.data_dir) == data]
            r = run_result(dataclasses.replace(t, config=same[0], alternatives=()), index) if same else \
                RunResult(t, "not run yet")
            r.training = t  # the planned training itself (the report tells planned from further seeds by it)
        if i < planned or r.finished:
            kept.append(r)
    return kept


def collect(plan: Plan, out, index: dict | None = None) -> Results:
    """The plan's runs and analyses as they are on disk under `out` (nothing is run).

    Each group has one RunResult per planned seed, then one per further seed found finished on disk.
    """
    out = Path(out)
    index = index_runs(out / "runs") if index is None else index
    runs = {}
    for group in plan.groups():
        planned = plan.group(group)
        results = [run_result(t, index) for t in planned]
        seed = max(t.seed for t in planned) + 1
        while (extra := run_result(_with_seed(planned[0], seed), index)).finished:
            results.append(extra)
            seed += 1
        runs[group] = _one_data_set(results, index, len(planned))
    res = Results(plan, runs, {}, out)
    for job in plan.analyses:
        stored = read_json(out / "analysis" / f"{job.name}.json") or {}
        seeds, waiting = {}, []
        for key, inputs in _analysis_inputs(job, res).items():
            entry = stored.get("seeds", {}).get(key)
            if inputs is None:  # why: the status of a group that has no finished run
                waiting += [res.status(g) for g in job.all_groups() if not res.finished(g)] or ["not run yet"]
            elif entry and _computed_from(entry, inputs, job) and stored.get("options") == _options(job):
                seeds[key] = entry["rows"]
            else:
                waiting.append(_lacks(job, inputs) or "not run yet")
        png = out / "analysis" / f"{job.name}.png"
        status = "done" if seeds else (waiting[0] if waiting else "not run yet")
        res.analyses[job.name] = {"status": status, "seeds": seeds,
                                  "png": f"analysis/{png.name}" if seeds and png.exists() else None}
    return res


def _analysis_inputs(job, res: Results) -> dict[str, dict[str, RunResult] | None]:
    """{seed key: {group: finished RunResult}} of each computation of `job`; None where a run is not finished."""
    groups = job.all_groups()
    if job.seeds == "all":
        runs = {f"{g}#{r.training.seed}": r for g in groups for r in res.finished(g)}
        return {"all": runs if all(res.finished(g) for g in groups) else None}
    seeds = [0] if job.seeds == "first" else sorted({r.training.seed for r in res.runs.get(groups[0], [])})
    out = {}
    for s in seeds:
        picked = {g: next((r for r in res.runs.get(g, []) if r.training.seed == s and r.finished), None)
                  for g in groups}
        out[str(s)] = picked if all(picked.values()) else None
    return out


def _ids(inputs: dict[str, RunResult], job) -> list[str]:
    """What an analysis result was computed from: the runs, and for one that reads eval.json, the eps it held."""
    return [f"{key}={r.dir.name}" + (f" eval {','.join((r.eval or {}).get('accuracy', {}))}"
                                     if get_analysis(job.kind).NEEDS == "eval"
                                     else "") for key, r in inputs.items()]


def _trained(inputs: dict[str, RunResult]) -> dict[str, float | None]:
    """Which training made each run: its training seconds, so a run trained again under the same name is told apart."""
    return {key: (r.metrics or {}).get("train_seconds") for key, r in inputs.items()}


def _computed_from(entry: dict, inputs: dict[str, RunResult], job) -> bool:
    """Whether a stored analysis entry was computed from these runs (entries made before "trained" was recorded are
    matched by the runs' names alone)."""
    trained = _trained(inputs)
    return entry["runs"] == _ids(inputs, job) and entry.get("trained", trained) == trained


def _options(job) -> dict:
    return json.loads(json.dumps({**dict(job.options), "limit": job.limit}))


# ----------------------------------------------------------------------------------------------------------------
# Evaluations and analyses


def _evaluate(res: Results, device: str, say: Callable[[str], None]) -> None:
    for ev in res.plan.evaluations:
        for r in res.finished(ev.group):
            done = r.eval if r.eval and r.eval.get("attack") == "fgsm" else {"accuracy": {}}
            todo = [e for e in ev.eps if f"{e:g}" not in done["accuracy"]]  # eval.json keeps the eps it has
            if not todo:
                continue
            if not r.has_checkpoint:
                say(f"evaluate {r.dir.name}: needs checkpoint, re-run")
                continue
            say(f"evaluate {r.dir.name}: fgsm at eps {', '.join(f'{e:g}' for e in todo)}")
            data_dir = r.training.config.data_dir if r.training.available else None
            try:
                new = evaluate_run(r.dir, eps_list=todo, device=device, data_dir=data_dir)
            except DataError as e:
                say(f"evaluate {r.dir.name}: no data ({e})")
                continue
            r.eval = read_json(Path(new["path"]))  # evaluate_run added the new eps to those it held


def _analyze(res: Results, out: Path, device: str, cache: dict, say: Callable[[str], None]) -> None:
    for job in res.plan.analyses:
        path = out / "analysis" / f"{job.name}.json"
        stored = read_json(path) or {}
        if stored.get("options") != _options(job):
            stored = {"analysis": job.kind, "options": _options(job), "seeds": {}}
        changed = False
        for key, inputs in _analysis_inputs(job, res).items():
            if inputs is None:
                continue
            entry = stored["seeds"].get(key)
            if entry and _computed_from(entry, inputs, job) and entry.get("version", 1) >= version(job.kind):
                continue  # up to date (an older version's rows stay until the runs' checkpoints allow a new one)
            why = _lacks(job, inputs)
            if why:
                say(f"analysis {job.name} ({key}): {why}")
                continue
            say(f"analysis {job.name} ({key})")
            try:
                result = _compute(job, inputs, device, cache)
            except DataError as e:
                say(f"analysis {job.name} ({key}): no data ({e})")
                continue
            stored["seeds"][key] = {"runs": _ids(inputs, job), "trained": _trained(inputs),
                                    "rows": report_rows(job.kind, result), "version": version(job.kind)}
            path.parent.mkdir(parents=True, exist_ok=True)
            if key == min(stored["seeds"], key=_seed_order):  # the plot shows the first seed
                get_analysis(job.kind).plot(result, path.with_suffix(".png"))
            changed = True
        if changed:
            write_json(path, stored)


def _seed_order(key: str):
    return (0, int(key)) if key.isdigit() else (1, key)


def _lacks(job, inputs: dict[str, RunResult]) -> str | None:
    return next((why for why in (lacks(job.kind, r) for r in inputs.values()) if why), None)


def _compute(job, inputs: dict[str, RunResult], device: str, cache: dict):
    """`lwat.analysis.runs.compute` on an analysis job's runs: each labelled by its group."""
    def group(key):
        return key.split("#")[0]

    runs = [(group(key), r) for key, r in inputs.items() if group(key) in job.groups]
    first = runs[0][1]
    data_cfg = first.config.replace(data_dir=first.training.config.data_dir) if first.training.available \
        else first.config  # the data may lie elsewhere than where the run was made
    return compute_analysis(job.kind, runs, target=inputs.get(job.target),
                            baseline=[r for key, r in inputs.items() if group(key) == job.baseline],
                            device=resolve_device(device), limit=job.limit, data_cfg=data_cfg, cache=cache,
                            **dict(job.options))


# ----------------------------------------------------------------------------------------------------------------
# The report


def write_report(out, scale: str, *, targets=(), seeds: int | None = None, data: dict | None = None,
                 device: str = "auto", command: str | None = None) -> Path:
    """Write OUT/REPORT.md from what is on disk (nothing is trained or computed).

    Every preset in `targets` gets a section, and so does every other preset with a finished run under `out`.

    Args:
        out: the reproduction's folder.
        scale: its scale.
        targets: preset names that must appear.
        seeds: seeds planned for the targets (default: the presets' own).
        data: `lwat.presets.resolve_data(scale, ...)`; default: none given.
        device: the trainings' device (part of their configs, ignored when matching runs).
        command: the command line to state.

    Returns:
        The report's path.
    """
    out = Path(out)
    data = resolve_data(scale) if data is None else data
    index = index_runs(out / "runs")
    sections, used, needed = [], {}, set()
    for name, preset in PRESETS.items():
        plan = preset.plan(scale, seeds if name in targets else None, data, device)
        res = collect(plan, out, index)
        found = [r for runs in res.runs.values() for r in runs if r.dir is not None]
        if name not in targets and (not found or preset.study or any(PRESETS[t].study for t in targets)):
            continue
        needed |= {t.config.dataset for t in plan.trainings}
        if preset.draw is not None:
            preset.draw(res, out)
        sections += report.section(preset, res)
        for r in found:
            if r.finished:
                used[r.dir] = r
    lines = report.header(scale, list(used.values()), data, needed, command)
    path = out / REPORT
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines + sections).rstrip() + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# The entry point


def reproduce(target: str, *, scale: str = "cpu", seeds: int | None = None, data_dir=None, cifar100_dir=None,
              out=None, device: str = "auto", progress: str = "auto",
              log: Callable[[str], None] | None = None) -> dict:
    """Run (or reuse) the trainings, evaluations and analyses of a preset, then write OUT/REPORT.md.

    Args:
        target: a preset name (`lwat.presets.PRESETS`) or "all".
        scale: "smoke", "cpu" or "paper" (`lwat.presets.SCALES`).
        seeds: trainings per row, seeds 0..seeds-1; default the preset's for this scale.
        data_dir: CIFAR-10: the official python-version folder or archive, or an image folder / archive (e.g. the
            JPEG copy cifar10-jpeg.tar.gz). Without it CIFAR-10 trainings are only looked up among finished runs.
        cifar100_dir: CIFAR-100, likewise; without it its rows say "not run (no data given)".
        out: where runs, analyses and the report go; default results/<scale>.
        device: "auto", "cpu", "cuda", ... for trainings, evaluations and analyses.
        progress: train()'s progress display: "auto", "bar", "lines" or "none".
        log: called with one line per step taken (default: silent).

    Returns:
        {"status": "finished" or "interrupted", "report": path, "trainings": {run name: outcome}, "out": path};
        outcomes are "reused", "trained", "resumed", "interrupted", "no data", "busy: ..." or "failed: ...".
    """
    say = log or (lambda line: None)
    names = [n for n, p in PRESETS.items() if not p.study] if target == "all" else [get_preset(target).name]
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    if seeds is not None and seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    out = Path(out) if out is not None else Path("results") / scale
    data = resolve_data(scale, cifar10=data_dir, cifar100=cifar100_dir)
    if scale == "smoke" and (data_dir or cifar100_dir):
        say("smoke scale uses synthetic data: the data paths are ignored")
    plans = [PRESETS[n].plan(scale, seeds, data, device) for n in names]
    root = out / "runs"
    root.mkdir(parents=True, exist_ok=True)
    index = index_runs(root)
    todo = {}
    for t in (t for plan in plans for t in plan.trainings):
        todo.setdefault(run_key(t.config), t)  # shared by presets: trained once
    todo = list(todo.values())
    outcomes, status = {}, "finished"
    for i, t in enumerate(todo, 1):
        started = time.perf_counter()
        outcome, run = ensure_trained(t, root, index, progress=progress)
        outcomes[t.name] = outcome
        where = f" ({run.name})" if run is not None else ""
        spent = f", {time.perf_counter() - started:.0f} s" if outcome in ("trained", "resumed") else ""
        say(f"[{i}/{len(todo)}] {t.name}: {outcome}{where}{spent}")
        if outcome == "interrupted":
            status = "interrupted"
            break
    if status == "finished":
        index = index_runs(root)
        cache: dict = {}
        for plan in plans:
            res = collect(plan, out, index)
            _evaluate(res, device, say)
            _analyze(res, out, device, cache, say)
    command = " ".join([f"lwat reproduce {target} --scale {scale}", *([f"--seeds {seeds}"] if seeds else []),
                        *([f"--out {out}"] if out != Path("results") / scale else []),
                        *(f"--{flag} {data[key].data_dir}" for flag, key in (("data-dir", "cifar10"),
                                                                             ("cifar100-dir", "cifar100"))
                          if data[key].available and data[key].data_dir)])
    report = write_report(out, scale, targets=names, seeds=seeds, data=data, device=device, command=command)
    say(f"report: {report}")
    return {"status": status, "report": str(report), "trainings": outcomes, "out": str(out)}
