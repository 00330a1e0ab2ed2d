"""What a table of the paper runs at a scale: the scales, the data standing for CIFAR, and the plan types.

A table module fills a `Plan` with `Training`s (named TrainConfigs, seeds 0..N-1), `Evaluation`s and `Analysis` jobs;
the helpers here give the fields the paper's protocol takes at each scale, so tables that share a training (Table 4's
baseline is also Table 1's model, Table 5's and Table 6's baseline) build equal configs, and `lwat reproduce` trains
it once.

Scales (`SCALES`):
    smoke  tiny synthetic data, width-reduced models, 1 epoch: every table end to end in seconds (tests).
    cpu    real CIFAR-10 sized for 2 CPU cores: about 15 minutes or less per training, Table 5's about 30 (all
           50,000 images) (`lwat presets` estimates, 2 threads).
    paper  the paper's protocol: 300 epochs, lr 0.1 / 5 every 50 (CIFAR-10) or 60 (CIFAR-100) epochs, Nesterov
           0.9, full width, 5 seeds where the paper averaged 5 runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lwat.config import TrainConfig
from lwat.data import CIFAR

SCALES = {
    "smoke": "tiny synthetic data (random class prototypes plus noise, 32x32; half of its training images), "
             "width-reduced models, 1 epoch, batch 32: checks that every step runs; the numbers mean nothing",
    "cpu": "real data sized for 2 CPU cores: VGG-16-BN at width 1/4, ResNet-20 at full width, ResNet-56 at width "
           "1/2, a class-balanced subset of 10,000 training images (Table 5: all 50,000, where dropout trains), 30 epochs with the paper's schedule shape "
           "(lr 0.1 divided by 5 after every sixth of training), the full test set; the toy MLP as in the paper",
    "paper": "the paper's protocol: full-width models, all 50,000 training images, 300 epochs, lr 0.1 divided by 5 "
             "every 50 (CIFAR-10) or 60 (CIFAR-100) epochs, SGD with Nesterov momentum 0.9, 5 seeds where the paper "
             "averaged 5 runs",
}
# Channel width of each model per scale (1 = the paper's).
WIDTHS = {
    "smoke": {"vgg16_bn": 0.0625, "resnet20": 0.25, "resnet56": 0.25},
    "cpu": {"vgg16_bn": 0.25, "resnet20": 1.0, "resnet56": 0.5},
    "paper": {"vgg16_bn": 1.0, "resnet20": 1.0, "resnet56": 1.0},
}
SMOKE_TRAIN_SUBSET = {"cifar10": 120, "cifar100": 200}  # smoke scale: training images of the synthetic stand-ins
CPU_TRAIN_SUBSET = 10_000  # cpu scale: class-balanced training images (the baseline overfits them without augmentation)
CPU_EPOCHS = 30  # cpu scale: the paper's 300 epochs / 10, lr drops at the same fractions of training


def check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")


# ----------------------------------------------------------------------------------------------------------------
# Data: which data set stands for the paper's CIFAR-10 / CIFAR-100, and how the report names it

SYNTHETIC100 = "synthetic100"  # smoke scale's stand-in for CIFAR-100 (lwat.data.LOADERS)
# Folder data sets we know by file name: stem -> (which paper data set it stands for, how tables name it).
KNOWN_FOLDERS = {"cifar10-jpeg": ("cifar10", "CIFAR-10 (JPEG q75 copy)")}
DATA_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
SYNTHETIC_LABELS = {
    "synthetic": "synthetic stand-in for CIFAR-10 (10 classes, 256 train / 128 test images, 32x32)",
    SYNTHETIC100: "synthetic stand-in for CIFAR-100 (100 classes, 400 train / 200 test images, 32x32)",
}


@dataclass(frozen=True)
class DataSource:
    """The data that stands for one of the paper's data sets ("cifar10" or "cifar100") in this reproduction."""

    key: str  # "cifar10" or "cifar100"
    dataset: str  # TrainConfig.dataset
    data_dir: str | None  # TrainConfig.data_dir
    label: str  # how tables name it
    available: bool  # the data is here, so its trainings can run (else finished runs are only looked up)
    alternatives: tuple[tuple[str, str | None], ...] = ()  # other (dataset, data_dir) whose runs are accepted


def data_identity(dataset: str, data_dir: str | None) -> str:
    """What tells two runs' data apart when their data_dir may differ: the data set name, or a folder's file stem."""
    if dataset != "folder" or not data_dir:
        return dataset
    return _stem(data_dir)


def data_label(dataset: str, data_dir: str | None) -> str:
    """How the report names a run's data: "CIFAR-10", "CIFAR-10 (JPEG q75 copy)", "image folder NAME", ..."""
    if dataset in DATA_NAMES:
        return DATA_NAMES[dataset]
    if dataset in SYNTHETIC_LABELS:
        return SYNTHETIC_LABELS[dataset]
    if dataset == "folder":
        stem = _stem(data_dir or "?")
        return KNOWN_FOLDERS[stem][1] if stem in KNOWN_FOLDERS else f"image folder {stem}"
    return dataset


def _stem(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def resolve_data(scale: str, cifar10=None, cifar100=None) -> dict[str, DataSource]:
    """The data standing for CIFAR-10 and CIFAR-100 at `scale`.

    Args:
        scale: a key of SCALES. At smoke scale the data is synthetic and the paths are ignored.
        cifar10, cifar100: the official python-version CIFAR folder or archive (or the folder holding it), or an
            image folder / .tar(.gz) of train/<class>/<image> and test/<class>/<image>; None when absent.

    Returns:
        {"cifar10": DataSource, "cifar100": DataSource}; a source without a path is not `available`, and its
        trainings are only looked up among finished runs (official data or a known folder copy).
    """
    check_scale(scale)
    if scale == "smoke":
        return {"cifar10": DataSource("cifar10", "synthetic", None, SYNTHETIC_LABELS["synthetic"], True),
                "cifar100": DataSource("cifar100", SYNTHETIC100, None, SYNTHETIC_LABELS[SYNTHETIC100], True)}
    sources = {}
    for key, path in (("cifar10", cifar10), ("cifar100", cifar100)):
        if path is None:
            folders = tuple(("folder", f"{stem}.tar.gz") for stem, (k, _) in KNOWN_FOLDERS.items() if k == key)
            sources[key] = DataSource(key, key, None, f"{DATA_NAMES[key]} (not given)", False, folders)
            continue
        path = Path(path).expanduser().resolve()
        if not path.exists():
            raise ValueError(f"{path}: {DATA_NAMES[key]} data not found")
        if _is_official_cifar(path, key):
            sources[key] = DataSource(key, key, str(path), DATA_NAMES[key], True)
        else:
            label = data_label("folder", str(path))
            if _stem(str(path)) not in KNOWN_FOLDERS:
                label = f"{DATA_NAMES[key]} as {label}"
            sources[key] = DataSource(key, "folder", str(path), label, True)
    return sources


def _is_official_cifar(path: Path, key: str) -> bool:
    spec = CIFAR[key]
    if path.is_file():
        return path.name == spec["archive"]
    return (path.name == spec["folder"] or (path / spec["archive"]).is_file() or (path / spec["folder"]).is_dir()
            or (path / spec["train"][0]).is_file())


# ----------------------------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class Training:
    """One training: its config, the group (table row) it belongs to, and its seed."""

    name: str  # default run-directory stem, e.g. "table4-vgg16_bn-lat-seed0"
    group: str  # seeds of one group are averaged in the tables
    seed: int
    config: TrainConfig
    available: bool  # its data is here: it can be trained, not only looked up
    alternatives: tuple[TrainConfig, ...] = ()  # finished runs of these configs are accepted too


@dataclass(frozen=True)
class Evaluation:
    """Clean and FGSM test accuracy of every run of a group (eval.json beside each run)."""

    group: str
    eps: tuple[float, ...]  # pixel units of [0, 1] images


@dataclass(frozen=True)
class Analysis:
    """One of lwat.analysis's analyses on the runs of some groups; written as OUT/analysis/NAME.json and .png."""

    name: str  # file stem, e.g. "table1-strength"
    kind: str  # a name in lwat.analysis.ANALYSES
    groups: tuple[str, ...]  # the groups whose runs it takes, in order; their names label the plot
    seeds: str = "first"  # "each": once per seed (averaged in tables); "first": seed 0; "all": one over all seeds
    target: str | None = None  # transfer: the group whose model classifies the attacked images
    baseline: str | None = None  # depth: the baseline group
    options: tuple[tuple[str, object], ...] = ()  # keyword arguments of the analysis
    limit: int | None = None  # use the first `limit` test images

    def all_groups(self) -> tuple[str, ...]:
        extra = tuple(g for g in (self.target, self.baseline) if g and g not in self.groups)
        return self.groups + extra


@dataclass
class Plan:
    """A table of the paper expanded at one scale."""

    preset: str
    scale: str
    seeds: int
    trainings: list[Training] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    analyses: list[Analysis] = field(default_factory=list)
    skipped: str | None = None  # why nothing runs at this scale
    notes: list[str] = field(default_factory=list)  # how this scale departs from the paper

    def groups(self) -> list[str]:
        return list(dict.fromkeys(t.group for t in self.trainings))

    def group(self, name: str) -> list[Training]:
        return [t for t in self.trainings if t.group == name]

    def add(self, group: str, data: DataSource, seeds: int, *, stem: str | None = None, **fields) -> None:
        """Add `seeds` trainings (seeds 0..seeds-1) of one group: TrainConfig(**fields) on `data`.

        `stem` names their run directories (default PRESET-GROUP); trainings shared by tables get one stem.
        """
        stem = stem or f"{self.preset}-{group}"
        for seed in range(seeds):
            cfg = TrainConfig(dataset=data.dataset, data_dir=data.data_dir, seed=seed, **fields)
            others = tuple(cfg.replace(dataset=d, data_dir=p) for d, p in data.alternatives)
            self.trainings.append(Training(f"{stem}-seed{seed}", group, seed, cfg, data.available, others))


# ----------------------------------------------------------------------------------------------------------------
# The paper's trainings at each scale


def protocol(scale: str, key: str, *, augment: bool, device: str) -> dict:
    """TrainConfig fields of the paper's CIFAR protocol (Section 4) at `scale`, for data `key`."""
    if scale == "smoke":  # about half the synthetic training images, class-balanced: 3 steps (CIFAR-100: 6)
        return dict(epochs=1, batch_size=32, lr=0.05, lr_drop_every=1, train_subset=SMOKE_TRAIN_SUBSET[key],
                    flip=augment, crop=False, device=device)
    every = {"cifar10": 50, "cifar100": 60}[key]  # paper: lr / 5 every 50 (CIFAR-10) or 60 (CIFAR-100) epochs
    if scale == "cpu":  # 30 epochs, drops after the same fractions of training: every 5 (6) epochs
        return dict(epochs=CPU_EPOCHS, lr_drop_every=every // 10, train_subset=CPU_TRAIN_SUBSET, flip=augment,
                    crop=False, device=device)
    return dict(epochs=300, lr_drop_every=every, flip=augment, crop=False, device=device)


def model(scale: str, name: str) -> dict:
    """TrainConfig fields of model `name` at `scale` (its width)."""
    return {"model": name, "width": WIDTHS[scale][name]}


def vgg_noaug(plan: Plan, data: DataSource, seeds: int, device: str, group: str, **fields) -> None:
    """VGG-16-BN without augmentation (Tables 1 and 4-6, Figure 1): equal fields give equal configs (and one
    run-directory stem) across tables."""
    defaults = {**model(plan.scale, "vgg16_bn"), **protocol(plan.scale, data.key, augment=False, device=device)}
    fields = {**defaults, **fields}
    # every training image where the scale's protocol takes a subset (Table 5 at cpu scale): named apart
    all_images = defaults.get("train_subset") is not None and fields["train_subset"] is None
    stem = "-".join(["vgg-noaug", data.key] + (["all"] if all_images else []) + [fields["method"]]
                    + (["dropout"] if fields.get("dropout") else [])
                    + ([f"depth{fields['depth']}"] if fields.get("depth") else []))
    plan.add(group, data, seeds, stem=stem, **fields)


TOY_GROUPS = {"baseline": "baseline", "fgsm": "fgsm", "lat": "lat"}  # group -> method


def toy_fields(method: str, *, scale: str, device: str = "auto") -> dict:
    """The toy experiment of Section 3.4 (Table 2, Figure 2): mlp_tanh on grayscale CIFAR-10.

    cpu and paper scale use the same config (the paper's toy is cheap): 60 epochs, lr 0.01 / 5 every 20 epochs.
    """
    smoke = scale == "smoke"
    return dict(model="mlp_tanh", method=method, grayscale=True, crop=False, flip=False, epochs=1 if smoke else 60,
                lr=0.01, lr_drop_every=20, batch_size=32 if smoke else 128,
                train_subset=SMOKE_TRAIN_SUBSET["cifar10"] if smoke else None, eps=10.0, device=device)


def toy_config(method: str, seed: int, data: DataSource, *, scale: str, device: str = "auto") -> TrainConfig:
    """`toy_fields` as the TrainConfig of one seed on `data`."""
    return TrainConfig(dataset=data.dataset, data_dir=data.data_dir, seed=seed,
                       **toy_fields(method, scale=scale, device=device))


def toy(plan: Plan, data: dict, seeds: int, device: str, sweep=()) -> None:
    """Table 2's three toy networks (eps 10), and lat at each eps of `sweep` (groups toy-lat-epsE)."""
    rows = [(g, m, 10.0) for g, m in TOY_GROUPS.items()] + [(f"lat-eps{e:g}", "lat", e) for e in sweep]
    for group, method, eps in rows:
        plan.add(f"toy-{group}", data["cifar10"], seeds, stem=f"toy-{group}",
                 **{**toy_fields(method, scale=plan.scale, device=device), "eps": eps})
