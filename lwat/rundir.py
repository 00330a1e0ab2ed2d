"""The run directory: its file names, atomic writes, checkpoints, logs, provenance, and reading a run back.

A run directory holds
    config.json         the full resolved TrainConfig, written when the run starts
    host.json           where it ran (`host_info`): cpu, cpu_count, threads, gpu, torch, and its provenance: lwat
                        (the code version) and data_sha256 (the data's checksum); rewritten whenever training starts
                        or resumes, so it names the machine that made the last part
    log.jsonl           one line per epoch: train loss/accuracy (on the perturbed activations), test (and val)
                        accuracy, lr, seconds, images/s
    metrics.json        the final metrics (`summarize`), written when the run completes
    checkpoint.pt       the newest checkpoint; checkpoint.prev.pt the one before it, kept until a newer one is written
                        and read back, so one bad write never costs the run (the previous one is dropped when the run
                        completes)
    eval.json           clean and FGSM test accuracy (`evaluate_run`), what reports and analyses read;
                        eval-pgd.json the same under PGD (an attack's accuracies never replace another's)
    reproduce.lock      held by `lwat reproduce` while it trains there
Every file is written atomically (a temporary file beside it, then renamed): a reader sees the old or the new one.
While a run trains, its process holds a lock on the directory itself (`claim`).
`lwat.train` writes a run through these functions; `lwat.reproduce`, `lwat analyze` and `lwat eval` read it back
(models and data rebuilt with `lwat.experiment`, as the trainer builds them).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import lwat
from lwat.config import ConfigError, TrainConfig, resolve_device
from lwat.data import CIFAR, cache_root
from lwat.evaluate import FGSM_EPS, robustness
from lwat.experiment import build, load_data

CONFIG, HOST, LOG, METRICS, EVAL = "config.json", "host.json", "log.jsonl", "metrics.json", "eval.json"
CHECKPOINT, PREVIOUS, LOCK = "checkpoint.pt", "checkpoint.prev.pt", "reproduce.lock"
_CHECKPOINT_KEYS = {"model", "config", "data", "epoch", "batch"}  # what every lwat checkpoint holds


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def _atomic(path: Path, mode: str, *, check=None, previous: Path | None = None):
    """A file object for `path`'s new content, written beside it. When the block ends without error, `check(file)`
    (if given) reads it back, the current `path` becomes `previous` (if given), and the new file takes its name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would keep a run's files from other users
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        if previous is not None and path.exists():
            _also_name(path, previous)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _also_name(path: Path, previous: Path) -> None:
    # `previous` becomes a second name of the current file, so that `path` names a whole file at every moment (two
    # renames would leave a moment with no checkpoint.pt); a rename where the file system has no hard links.
    link = previous.with_name(previous.name + ".link.tmp")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
        link.unlink(missing_ok=True)  # still there if both named the same file already: rename then does nothing
    except OSError:
        os.replace(path, previous)


def write_json(path, obj) -> None:
    """Write `obj` as indented JSON to `path`, atomically."""
    with _atomic(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_json(path):
    """The JSON in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(state: dict, run_dir) -> None:
    """Write `state` as run_dir/checkpoint.pt. The new file is written beside it and read back first; only then does
    the current checkpoint become checkpoint.prev.pt and the new one take its name.

    Raises:
        OSError: the write failed (errno ENOSPC: the disk is full); the current checkpoint is then untouched.
    """
    run_dir = Path(run_dir)
    try:
        with _atomic(run_dir / CHECKPOINT, "wb", check=read_checkpoint, previous=run_dir / PREVIOUS) as f:
            torch.save(state, f)
    except RuntimeError as e:  # torch's zip writer turns the file's OSError into "RuntimeError: ... unexpected pos"
        cause = _os_error(e)
        if cause is None:
            raise
        raise cause from None


def _os_error(e: BaseException) -> OSError | None:
    # The OSError an exception was raised in handling of (or from), if any.
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def state_bytes(state) -> int:
    """The bytes of the tensors in `state` (nested dicts, lists, tuples), each storage once, as torch.save writes
    them: about the size of its checkpoint file."""
    storages, todo = {}, [state]
    while todo:
        obj = todo.pop()
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[(obj.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
    return sum(storages.values())


def read_checkpoint(path) -> dict:
    """The checkpoint in file `path`; a missing, damaged or non-checkpoint file is a one-line ConfigError naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no checkpoint there") from None
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: not for a file lwat did not write
        raise ConfigError(f"{path}: not a readable lwat checkpoint (not a file that lwat train writes)") from None
    except Exception as e:  # a damaged file raises almost anything (OSError, RuntimeError, EOFError, ...)
        raise ConfigError(f"{path}: not a readable lwat checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict) or not _CHECKPOINT_KEYS <= set(ckpt):
        raise ConfigError(f"{path}: not an lwat checkpoint (it lacks {', '.join(sorted(_CHECKPOINT_KEYS))})")
    return ckpt


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def resume_checkpoint(run_dir) -> dict:
    """The newest readable checkpoint of a run: checkpoint.pt, or, when that one is unreadable, checkpoint.prev.pt
    (said on stderr). ConfigError when neither reads."""
    run_dir = Path(run_dir)
    try:
        return read_checkpoint(run_dir / CHECKPOINT)
    except ConfigError as newest:
        if not (run_dir / PREVIOUS).exists():
            raise
        ckpt = read_checkpoint(run_dir / PREVIOUS)
        print(f"lwat: warning: {newest}; resuming from {run_dir / PREVIOUS} (epoch {ckpt['epoch']}, batch "
              f"{ckpt['batch']})", file=sys.stderr)
        return ckpt


def has_checkpoint(run_dir) -> bool:
    """Whether a run can be resumed or loaded: it holds a checkpoint (or the previous one)."""
    return any((Path(run_dir) / name).is_file() for name in (CHECKPOINT, PREVIOUS))


def drop_previous(run_dir) -> None:
    """Remove checkpoint.prev.pt (a completed run keeps its final, verified checkpoint only)."""
    (Path(run_dir) / PREVIOUS).unlink(missing_ok=True)


def discard_start(run_dir) -> None:
    """Remove what a run wrote before its first checkpoint, so the same command can start it again."""
    for name in (CONFIG, HOST, LOG):
        (Path(run_dir) / name).unlink(missing_ok=True)


@contextlib.contextmanager
def claim(run_dir, *, resume: bool):
    """Hold `run_dir` (made if missing) for one training: an exclusive lock on the directory (flock), so a second
    `lwat train` or `--resume` of the same run fails at once instead of interleaving its epochs with the first's.

    A new run (resume=False) refuses a directory holding a run with a checkpoint; a run that stopped before its
    first checkpoint (killed in epoch 1) kept nothing, so its files are removed and it starts again. Temporary
    files of writes that a kill interrupted are removed. ConfigError names what is wrong.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a directory; the run directory must be one (or not exist yet)")
    made = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError as e:
        raise ConfigError(f"{run_dir}: cannot make or open the run directory ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{run_dir}: another process is training this run now") from None
        if not resume and (run_dir / CONFIG).exists():
            if has_checkpoint(run_dir):
                raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
            print(f"{run_dir}: its run stopped before its first checkpoint and kept nothing; starting it again",
                  file=sys.stderr)
            discard_start(run_dir)
        for name in (CONFIG, HOST, LOG, METRICS, EVAL, CHECKPOINT, PREVIOUS):
            for partial in run_dir.glob(f"{name}*.tmp"):
                partial.unlink(missing_ok=True)
        yield run_dir
    except BaseException:
        if made:  # a run that failed before writing anything leaves no directory behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# The per-epoch log and the final metrics


def read_log(run_dir) -> list[dict]:
    """The per-epoch records of log.jsonl, in order."""
    with open(Path(run_dir) / LOG) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_log(run_dir, record: dict) -> None:
    """Add one epoch's record to log.jsonl: the whole file is rewritten atomically (a few KB), so a kill mid-write
    leaves the log as it was, never a torn last line."""
    path = Path(run_dir) / LOG
    before = path.read_text() if path.exists() else ""
    with _atomic(path, "w") as f:
        f.write(before + json.dumps(record) + "\n")


def truncate_log(run_dir, epochs: int) -> None:
    """Keep the records of the first `epochs` epochs (a resume from an older checkpoint retrains the rest)."""
    path = Path(run_dir) / LOG
    if not path.exists():
        return
    log = read_log(run_dir)
    kept = [r for r in log if r["epoch"] <= epochs]
    if len(kept) != len(log):
        with _atomic(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


def summarize(log: list[dict], cfg: TrainConfig, passes: int) -> dict:
    """Final metrics of a finished run from its per-epoch log."""
    last = log[-1]
    seconds = sum(r["seconds"] for r in log)
    images = sum(r["images_per_s"] * r["seconds"] for r in log)
    metrics = {"status": "finished", "method": cfg.method, "model": cfg.model, "epochs": len(log),
               "test_acc": last["test_acc"], "best_test_acc": max(r["test_acc"] for r in log),
               "train_acc": last["train_acc"], "train_loss": last["train_loss"],
               "train_seconds": seconds, "images_per_s": images / seconds, "passes_per_step": passes,
               "device": str(resolve_device(cfg.device)), "torch": torch.__version__}
    if "val_acc" in last:
        metrics["val_acc"] = last["val_acc"]
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Where a run ran, and from what


def host_info(device: str = "cpu", cfg: TrainConfig | None = None) -> dict:
    """The machine and provenance of a run, as host.json holds them.

    Args:
        device: the run's device ("auto", "cpu", "cuda", ...): a CUDA device's name is recorded.
        cfg: the run's config, whose data is checksummed (`data_sha256`); None: no data checksum.

    Returns:
        {"cpu": model name, "cpu_count", "threads": torch threads, "gpu": name or None, "torch": version,
         "lwat": `lwat_version()`, "data_sha256": `data_sha256(cfg)`}.
    """
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = resolve_device(device)
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "torch": torch.__version__,
            "lwat": lwat_version(), "data_sha256": None if cfg is None else data_sha256(cfg)}


def machine(host: dict | None) -> str | None:
    """The machine a run was made on, as reports name it (GPU, or CPU and its torch threads, with the torch
    version); None when host.json is missing. Runs are compared for speed only on the same machine."""
    if host is None:
        return None
    if host.get("gpu"):
        return f"{host['gpu']} (torch {host.get('torch', '?')})"
    return f"CPU {host.get('cpu', '?')}, torch threads {host.get('threads', '?')} (torch {host.get('torch', '?')})"


@functools.cache
def lwat_version() -> str:
    """The package version, with `+git` and the commit's first 12 hex digits when lwat runs from a git checkout."""
    package = Path(lwat.__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return lwat.__version__
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != package.parent:
        return lwat.__version__  # no git, or a repository that is not lwat's own
    return f"{lwat.__version__}+git{lines[1][:12]}"


def data_sha256(cfg: TrainConfig) -> str | None:
    """The sha256 of the data a run reads (its data_dir).

    A file (an archive): of its bytes. A folder: of its manifest, the lines `<sha256 of the file>  ./<path relative to
    the folder>` sorted by path, as `cd FOLDER && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum`
    prints: for an image folder, of every file under it; for the official CIFAR data, of the files the loader reads
    in the extracted folder (the training and test batches and the meta file), which without a data_dir are
    under `lwat.data.cache_root()`, where the loader reads them. None for the built-in data sets or when the data
    is not there.
    """
    if cfg.data_dir is None and cfg.dataset not in CIFAR:
        return None
    path = Path(cfg.data_dir).expanduser() if cfg.data_dir is not None else cache_root()
    if path.is_file():
        return _file_sha256(path)
    if not path.is_dir():
        return None
    if cfg.dataset in CIFAR:
        spec = CIFAR[cfg.dataset]
        path = path if (path / spec["train"][0]).is_file() else path / spec["folder"]
        files = [path / name for name in (*spec["train"], *spec["test"], spec["meta"]) if (path / name).is_file()]
    else:
        files = [p for p in path.rglob("*") if p.is_file()]
    listed = sorted((f"./{p.relative_to(path).as_posix()}", p) for p in files)
    return hashlib.sha256("".join(f"{_file_sha256(p)}  {name}\n" for name, p in listed).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_host(run_dir, cfg: TrainConfig) -> None:
    write_json(Path(run_dir) / HOST, host_info(cfg.device, cfg))


# ----------------------------------------------------------------------------------------------------------------
# Reading a run back


@dataclass
class Run:
    """What one run directory holds (read once by `read_run`)."""

    dir: Path
    config: TrainConfig
    log: list[dict]
    metrics: dict | None  # None until the run completes
    eval: dict | None
    host: dict | None
    has_checkpoint: bool

    @property
    def finished(self) -> bool:
        return self.metrics is not None


def read_run(run_dir) -> Run:
    """The files of one run directory; ConfigError when its config.json is missing or not a TrainConfig."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG})")
    return Run(run_dir, TrainConfig.from_file(run_dir / CONFIG), read_log(run_dir) if (run_dir / LOG).exists() else [],
               read_json(run_dir / METRICS), read_json(run_dir / EVAL), read_json(run_dir / HOST),
               has_checkpoint(run_dir))


def load_run(path, device="cpu"):
    """A trained model (plain, eval mode, on `device`) and its config, from a run directory or checkpoint file.

    Returns:
        (model, cfg, meta) with meta = {"num_classes", "image_shape", "classes"}.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no run directory or checkpoint file there")
    ckpt_path = path / CHECKPOINT if path.is_dir() else path
    ckpt = read_checkpoint(ckpt_path)
    try:
        cfg, meta = TrainConfig.from_dict(ckpt["config"]), ckpt["data"]
        model, _ = build(cfg.replace(method="baseline"), meta["num_classes"], tuple(meta["image_shape"]))
        model.load_state_dict(model_weights(ckpt))  # attach leaves the keys alone: the plain model takes them
    except (ConfigError, RuntimeError, KeyError, TypeError) as e:
        raise ConfigError(f"{ckpt_path}: not an lwat checkpoint of this version ({_first_line(e)})") from None
    return model.to(device).eval(), cfg, meta


def model_weights(ckpt: dict) -> dict:
    """The weights a run yields: its moving average's where it kept one (TrainConfig.ema), else the model's."""
    if ckpt.get("ema") is None:
        return ckpt["model"]
    return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}


def load_one(runs: list, analysis: str, device="cpu"):
    """The model of the one run an analysis takes (`runs`: [(label, Run)]), in eval mode on `device`."""
    if len(runs) != 1:
        raise ValueError(f"analyze {analysis}: takes one run")
    return load_run(runs[0][1].dir, device)[0]


def eval_file(attack: str) -> str:
    """The file beside a checkpoint holding its accuracies under `attack`: eval.json for FGSM, else eval-ATTACK.json."""
    return EVAL if attack == "fgsm" else f"eval-{attack}.json"


def evaluate_run(path, *, eps_list=FGSM_EPS, attack: str = "fgsm", device="auto", batch_size: int = 500,
                 data_dir=None) -> dict:
    """Clean and attacked test accuracy of a trained run, added to `eval_file(attack)` beside its checkpoint.

    The file is written once per call. A finished run's checkpoint no longer changes, so the file keeps the
    accuracies at other eps from earlier calls; otherwise it holds this call's alone.

    Args:
        path: run directory or checkpoint file.
        eps_list: attack radii, pixel units of [0, 1] images (0 = clean).
        attack: "fgsm" or "pgd".
        device: where to evaluate ("auto": CUDA when present).
        batch_size: images per batch.
        data_dir: the data's location if it moved since training.

    Returns:
        {"run", "attack", "accuracy": {eps as text: fraction} for `eps_list`, "path" (of the file written)}.
    """
    device = resolve_device(device)
    model, cfg, _ = load_run(path, device)
    if data_dir is not None:
        cfg = cfg.replace(data_dir=str(data_dir))
    data = load_data(cfg)
    acc = robustness(model, data.test_x, data.test_y, eps_list, attack=attack, batch_size=batch_size,
                     progress=sys.stderr.isatty())
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    new = {f"{e:g}": a for e, a in acc.items()}
    file = run_dir / eval_file(attack)
    old = read_json(file) if (run_dir / METRICS).exists() else None
    kept = old["accuracy"] if old and old.get("attack") == attack else {}  # (older eval.json files held any attack)
    write_json(file, {"run": str(path), "attack": attack, "accuracy": {**kept, **new}})
    return {"run": str(path), "attack": attack, "accuracy": new, "path": str(file)}
