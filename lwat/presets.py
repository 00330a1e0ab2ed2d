"""The paper's experiments as named presets: at a scale, each expands into trainings, evaluations and analyses.

A preset (`PRESETS[name]`) knows three things: the paper's published numbers (copied here as data, with the
caption), the plan that reproduces them at a scale (`Preset.plan`: named `TrainConfig`s, seeds 0..N-1, the
evaluations and analyses to run on them) and how to set our numbers beside the paper's (`Preset.render`, with
"claims" computed from the numbers, never written in advance). `lwat.reproduce` runs plans and writes the report.

Scales (`SCALES`):
    smoke  tiny synthetic data, width-reduced models, 1 epoch: every preset end to end in seconds (tests).
    cpu    real CIFAR-10 sized for 2 CPU cores: about 15 minutes or less per training (estimates below).
    paper  the paper's protocol: 300 epochs, lr 0.1 / 5 every 50 (CIFAR-10) or 60 (CIFAR-100) epochs, Nesterov
           0.9, full width, 5 seeds where the paper averaged 5 runs.
Trainings shared by presets (Table 4's baseline is also Table 1's model, Table 5's and Table 6's baseline) have
equal configs, so `lwat.reproduce` trains them once; their run directories get one name whichever preset runs first
(vgg-noaug-..., toy-..., table3-...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lwat.config import TrainConfig
from lwat.data import CIFAR
from lwat.models import VGG16_POOL_BN_DEPTHS
from lwat.models.common import CIFAR10_STD
from lwat.rundir import machine

SCALES = {
    "smoke": "tiny synthetic data (random class prototypes plus noise, 32x32; half of its training images), "
             "width-reduced models, 1 epoch, batch 32: checks that every step runs; the numbers mean nothing",
    "cpu": "real data sized for 2 CPU cores: VGG-16-BN at width 1/4, ResNet-20 at full width, ResNet-56 at width "
           "1/2, a class-balanced subset of 10,000 training images, 30 epochs with the paper's schedule shape "
           "(lr 0.1 divided by 5 after every sixth of training), the full test set; the toy MLP as in the paper",
    "paper": "the paper's protocol: full-width models, all 50,000 training images, 300 epochs, lr 0.1 divided by 5 "
             "every 50 (CIFAR-10) or 60 (CIFAR-100) epochs, SGD with Nesterov momentum 0.9, 5 seeds where the paper "
             "averaged 5 runs",
}
FGSM_EPS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1)  # Tables 2 and 4, pixel units of [0, 1] images
# The paper does not say in which units its FGSM eps is. Its models take standardized inputs ((x - mean) / std,
# "standard mean/std preprocessing"), where eps is std times smaller in pixel units. Table 4 is also evaluated at
# those pixel eps (CIFAR-10's mean channel std, 0.2507), to test that reading.
INPUT_STD = sum(CIFAR10_STD) / len(CIFAR10_STD)
STANDARDIZED_EPS = tuple(e * INPUT_STD for e in FGSM_EPS[1:])
STRENGTH_EPS = (0.0, 0.05, 0.1, 0.15, 0.2)  # Table 1 (and Figure 1's t-SNE)

SYNTHETIC100 = "synthetic100"  # smoke scale's stand-in for CIFAR-100 (lwat.data.LOADERS)

# Folder data sets we know by file name: stem -> (which paper data set it stands for, how tables name it).
KNOWN_FOLDERS = {"cifar10-jpeg": ("cifar10", "CIFAR-10 (JPEG q75 copy)")}
DATA_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
SYNTHETIC_LABELS = {
    "synthetic": "synthetic stand-in for CIFAR-10 (10 classes, 256 train / 128 test images, 32x32)",
    SYNTHETIC100: "synthetic stand-in for CIFAR-100 (100 classes, 400 train / 200 test images, 32x32)",
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

# Forward+backward seconds per training image on this project's 2-core CPU machine (torch 2.13 CPU, 2 threads),
# for the cpu scale's time estimates. A test image (forward only) costs about a third of that.
CPU_SECONDS_PER_IMAGE = {
    ("vgg16_bn", 0.25): 57 / 50_000,  # measured: ~57 s per epoch of 50,000 images
    ("resnet20", 1.0): 103 / 50_000,  # measured: ~103 s per epoch
    ("resnet56", 0.5): 80 / 50_000,  # not measured: ResNet-20's time x 31.5 / 40.6 multiply-adds per image
    ("mlp_tanh", 1.0): 15 / 50_000,  # measured: ~15 s per epoch of 50,000 grayscale images on 1 thread
}
# Forward+backward passes per training step of each method (as lwat.methods; the paper's Table 4 "training time").
PASSES = {"baseline": 1, "lat": 1, "random": 1, "lat-joint": 2, "fgsm": 2, "fgsm-inter": 2}


# ----------------------------------------------------------------------------------------------------------------
# Data: which data set stands for the paper's CIFAR-10 / CIFAR-100, and how the report names it


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
    _check_scale(scale)
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
# Plans: what a preset runs at a scale


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
    """Clean and attacked test accuracy of every run of a group (eval.json beside each run)."""

    group: str
    eps: tuple[float, ...] = FGSM_EPS  # pixel units of [0, 1] images
    attack: str = "fgsm"


@dataclass(frozen=True)
class Analysis:
    """One of lwat.analysis's analyses on the runs of some groups; written as OUT/analysis/NAME.json and .png."""

    name: str  # file stem, e.g. "table1-strength"
    kind: str  # a name in lwat.analysis.ANALYSES
    groups: tuple[str, ...]  # the groups whose runs it takes, in order; their names label the plot
    seeds: str = "first"  # "each": once per seed (averaged in tables); "first": seed 0; "all": one over all seeds
    target: str | None = None  # transfer: the group whose model classifies the attacked images
    baseline: str | None = None  # depth: the baseline group
    options: tuple[tuple[str, object], ...] = ()  # keyword arguments of the analysis' compute()
    limit: int | None = None  # use the first `limit` test images

    def all_groups(self) -> tuple[str, ...]:
        extra = tuple(g for g in (self.target, self.baseline) if g and g not in self.groups)
        return self.groups + extra


@dataclass
class Plan:
    """A preset expanded at one scale."""

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

        `stem` names their run directories (default PRESET-GROUP); trainings shared by presets get one stem.
        """
        stem = stem or f"{self.preset}-{group}"
        for seed in range(seeds):
            cfg = TrainConfig(dataset=data.dataset, data_dir=data.data_dir, seed=seed, **fields)
            others = tuple(cfg.replace(dataset=d, data_dir=p) for d, p in data.alternatives)
            self.trainings.append(Training(f"{stem}-seed{seed}", group, seed, cfg, data.available, others))


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")


def _protocol(scale: str, key: str, *, augment: bool, device: str) -> dict:
    """TrainConfig fields of the paper's CIFAR protocol (Section 4) at `scale`, for data `key`."""
    if scale == "smoke":  # about half the synthetic training images, class-balanced: 3 steps (CIFAR-100: 6)
        return dict(epochs=1, batch_size=32, lr=0.05, lr_drop_every=1, train_subset=SMOKE_TRAIN_SUBSET[key],
                    flip=augment, crop=False, device=device)
    every = {"cifar10": 50, "cifar100": 60}[key]  # paper: lr / 5 every 50 (CIFAR-10) or 60 (CIFAR-100) epochs
    if scale == "cpu":  # 30 epochs, drops after the same fractions of training: every 5 (6) epochs
        return dict(epochs=CPU_EPOCHS, lr_drop_every=every // 10, train_subset=CPU_TRAIN_SUBSET, flip=augment,
                    crop=False, device=device)
    return dict(epochs=300, lr_drop_every=every, flip=augment, crop=False, device=device)


def _model(scale: str, model: str) -> dict:
    return {"model": model, "width": WIDTHS[scale][model]}


def toy_config(method: str, seed: int, data: DataSource, *, scale: str, device: str = "auto") -> TrainConfig:
    """The toy experiment of Section 3.4 (Table 2, Figure 2): mlp_tanh on grayscale CIFAR-10.

    cpu and paper scale use the same config (the paper's toy is cheap): 60 epochs, lr 0.01 / 5 every 20 epochs.
    """
    smoke = scale == "smoke"
    return TrainConfig(model="mlp_tanh", method=method, dataset=data.dataset, data_dir=data.data_dir,
                       grayscale=True, crop=False, flip=False, epochs=1 if smoke else 60, lr=0.01, lr_drop_every=20,
                       batch_size=32 if smoke else 128, train_subset=SMOKE_TRAIN_SUBSET["cifar10"] if smoke else None,
                       eps=10.0, seed=seed, device=device)


TOY_GROUPS = {"baseline": "baseline", "fgsm": "fgsm", "lat": "lat"}  # group -> method


def _toy(plan: Plan, data: dict, seeds: int, device: str, sweep: Sequence[float] = ()) -> None:
    """Table 2's three toy networks (eps 10), and lat at each eps of `sweep` (groups toy-lat-epsE)."""
    source = data["cifar10"]
    rows = [(g, m, 10.0) for g, m in TOY_GROUPS.items()] + [(f"lat-eps{e:g}", "lat", e) for e in sweep]
    for group, method, eps in rows:
        for seed in range(seeds):
            cfg = toy_config(method, seed, source, scale=plan.scale, device=device).replace(eps=eps)
            others = tuple(cfg.replace(dataset=d, data_dir=p) for d, p in source.alternatives)
            plan.trainings.append(Training(f"toy-{group}-seed{seed}", f"toy-{group}", seed, cfg, source.available,
                                           others))


EPS_SWEEP = (20.0, 30.0, 5.0)  # with Table 2's eps 10: the appendix's {10, 20, 30}, then one value outside it


def _plan_eps(plan, data, seeds, device):
    _toy(plan, data, seeds, device, EPS_SWEEP)
    plan.notes.append("The toy network of Table 2 (the cheapest of the paper's settings) with range-scaled eps 5, "
                      "10 (Table 2's run), 20 and 30; the paper tuned eps in {10, 20, 30} on VGG / CIFAR-10.")


# Table 4's methods: group -> (method, the paper's row name)
TABLE4_METHODS = {"baseline": ("baseline", "Baseline"), "fgsm": ("fgsm", "FGS-orig"),
                  "fgsm-inter": ("fgsm-inter", "FGS-inter"), "lat": ("lat", "Ours-orig"),
                  "lat-joint": ("lat-joint", "Ours-joint")}


def _vgg_noaug(plan: Plan, data: DataSource, seeds: int, device: str, group: str, **fields) -> None:
    """VGG-16-BN without augmentation (Tables 1 and 4-6, Figure 1): equal fields give equal configs (and one
    run-directory stem) across presets."""
    stem = "-".join(["vgg-noaug", data.key, fields["method"]] + (["dropout"] if fields.get("dropout") else [])
                    + ([f"depth{fields['depth']}"] if fields.get("depth") else []))
    plan.add(group, data, seeds, stem=stem, **_model(plan.scale, "vgg16_bn"),
             **_protocol(plan.scale, data.key, augment=False, device=device), **fields)


def _plan_table1(plan, data, seeds, device):
    _vgg_noaug(plan, data["cifar10"], seeds, device, "baseline", method="baseline")
    opts = (("eps_list", STRENGTH_EPS),)
    plan.analyses.append(Analysis("table1-strength", "strength", ("baseline",), seeds="each", options=opts))
    plan.notes.append("The model is Table 4's baseline VGG at this scale (the paper: 'a conventionally trained "
                      "deep model').")


def _plan_figure1(plan, data, seeds, device):
    _vgg_noaug(plan, data["cifar10"], seeds, device, "baseline", method="baseline")
    opts = (("eps_list", (0.2,) if plan.scale == "smoke" else STRENGTH_EPS), ("classes", (0, 1)),
            ("n_per_class", 20 if plan.scale == "smoke" else 200))
    plan.analyses.append(Analysis("figure1-tsne", "tsne", ("baseline",), options=opts))
    plan.notes.append("The model is Table 4's baseline VGG at this scale; classes 0 and 1; eps in activation "
                      "units (the paper's values are not in its text).")


def _plan_table2(plan, data, seeds, device):
    _toy(plan, data, seeds, device)
    plan.analyses.append(Analysis("table2-transfer", "transfer", ("toy-baseline", "toy-fgsm", "toy-lat"),
                                  seeds="each", target="toy-baseline", options=(("eps_list", FGSM_EPS),)))


def _plan_figure2(plan, data, seeds, device):
    _toy(plan, data, seeds, device)
    limit = {"smoke": 2, "cpu": 1000, "paper": None}[plan.scale]
    plan.analyses.append(Analysis("figure2-jacobian", "jacobian", ("toy-baseline", "toy-fgsm", "toy-lat"),
                                  limit=limit))
    if limit:
        plan.notes.append(f"Singular values averaged over the first {limit} test images (the paper: all 10,000).")


TABLE3_MODELS = ("vgg16_bn", "resnet20", "resnet56")


def _plan_table3(plan, data, seeds, device):
    for key in ("cifar10", "cifar100"):
        for model in TABLE3_MODELS:
            for method in ("baseline", "lat"):
                plan.add(f"{key}-{model}-{method}", data[key], seeds, method=method, **_model(plan.scale, model),
                         **_protocol(plan.scale, key, augment=True, device=device))
    plan.notes.append("Random horizontal flips, as in the paper; VGG's dropout off (the paper does not say). The "
                      "paper reports ResNet baselines at their best epoch (early stopping); the table gives final and "
                      "best test accuracy.")


def _plan_figure3(plan, data, seeds, device):
    for key in ("cifar10", "cifar100"):
        for method in ("baseline", "lat"):
            plan.add(f"{key}-vgg16_bn-{method}", data[key], seeds, stem=f"table3-{key}-vgg16_bn-{method}",
                     method=method, **_model(plan.scale, "vgg16_bn"),
                     **_protocol(plan.scale, key, augment=True, device=device))
        plan.analyses.append(Analysis(f"figure3-curves-{key}", "curves",
                                      (f"{key}-vgg16_bn-baseline", f"{key}-vgg16_bn-lat")))
    plan.notes.append("The runs are Table 3's VGG runs (with flips); training error is measured on the perturbed "
                      "activations, as in the paper.")


def _plan_table4(plan, data, seeds, device):
    for group, (method, _) in TABLE4_METHODS.items():
        _vgg_noaug(plan, data["cifar10"], seeds, device, group, method=method)
        plan.evaluations.append(Evaluation(group, FGSM_EPS + STANDARDIZED_EPS))
    readings = (("pixel units", 1.0), ("standardized units", INPUT_STD))  # eps as read: pixel eps = eps x scale
    plan.analyses.append(Analysis("table4-robustness", "robustness", tuple(TABLE4_METHODS), seeds="all",
                                  options=(("readings", readings), ("eps_list", FGSM_EPS))))
    plan.notes.append("No augmentation, no dropout. FGSM at test time on the whole test set; training time is the "
                      "ratio of images per second (from the logs) to the baseline's.")


def _plan_table5(plan, data, seeds, device):
    for key in ("cifar10", "cifar100"):
        for dropout in (False, True):
            for method in ("baseline", "lat"):
                group = f"{key}-{method}" + ("-dropout" if dropout else "")
                _vgg_noaug(plan, data[key], seeds, device, group, method=method, dropout=dropout)
    plan.notes.append("No augmentation. The CIFAR-10 runs without dropout are Table 4's baseline and lat runs.")


TABLE6_DEPTHS = dict(zip(("pool1", "pool2", "pool3", "pool4", "pool5"), VGG16_POOL_BN_DEPTHS))


def _plan_table6(plan, data, seeds, device):
    _vgg_noaug(plan, data["cifar10"], seeds, device, "baseline", method="baseline")
    for pool, depth in TABLE6_DEPTHS.items():
        _vgg_noaug(plan, data["cifar10"], seeds, device, pool, method="lat", depth=depth)
    plan.analyses.append(Analysis("table6-depth", "depth", tuple(TABLE6_DEPTHS), seeds="all", baseline="baseline"))
    plan.notes.append("'conv1 to poolk' perturbs the first 2, 4, 7, 10 or 13 BatchNorm outputs of VGG-16-BN "
                      "(lwat.models.VGG16_POOL_BN_DEPTHS); 13 leaves the classifier's BatchNorm unperturbed. "
                      "The baseline is Table 4's.")


TABLE7_GROUPS = {  # group -> (method, dropout)
    "wrn-baseline": ("baseline", False), "wrn-baseline-dropout": ("baseline", True),
    "wrn-lat-joint": ("lat-joint", False), "wrn-lat-joint-dropout": ("lat-joint", True),
}


def _plan_table7(plan, data, seeds, device):
    if plan.scale == "cpu":
        plan.skipped = ("WRN-28-10 takes 5.2 G multiply-adds per image, 260 times the cpu scale's VGG: one epoch of "
                        "10,000 images would take hours on 2 CPU cores. Run it at paper scale on a GPU.")
        return
    smoke = plan.scale == "smoke"
    for key in ("cifar10", "cifar100"):
        for group, (method, dropout) in TABLE7_GROUPS.items():
            if smoke:  # a tiny stand-in model: only the code path is tested
                fields = {**_model("smoke", "vgg16_bn"), **_protocol("smoke", key, augment=True, device=device)}
            else:  # WRN paper, Section 4: 200 epochs, lr 0.1 x 0.2 at 60, 120, 160; flips and crops; dropout 0.3
                fields = dict(model="wrn28_10", epochs=200, lr_drop_every=60, flip=True, device=device)
            plan.add(f"{key}-{group}", data[key], seeds, method=method, dropout=dropout, **{**fields, "crop": True})
    if smoke:
        plan.notes.append("Smoke scale trains a tiny VGG as a stand-in for WRN-28-10.")
    else:
        plan.notes.append("The WRN schedule drops the lr at epochs 60, 120 and 160; lwat's step schedule drops it "
                          "every 60 epochs (60, 120, 180). The paper does not say whether Ours-joint used dropout: "
                          "both are trained.")


# ----------------------------------------------------------------------------------------------------------------
# The paper's published numbers, copied from its text (accuracy or error in %)

PAPER = {
    "table1": {
        "caption": "Table 1: Comparison of the strength of adversarial examples between the FGS approach applied at "
                   "the input and using layerwise perturbations as described in Section 3.2. Reported numbers are "
                   "classification accuracies for different values of eps.",
        "eps": STRENGTH_EPS,
        "rows": {"FGS [5]": (92.4, 53.28, 41.58, 36.44, 33.85),
                 "Ours - all layers": (92.4, 48.56, 21.72, 14.76, 14.19)},
    },
    "table2": {
        "caption": "Table 2: Effect of different perturbations tested on the baseline network for the toy example "
                   "in Section 3.4. (FGS perturbation from: Baseline n/w, FGS n/w, Our n/w.)",
        "eps": FGSM_EPS,
        "columns": {"toy-baseline": "Baseline n/w", "toy-fgsm": "FGS n/w", "toy-lat": "Our n/w"},
        "values": {"toy-baseline": (39.51, 8.6, 1.92, 0.51, 0.12, 0.03),
                   "toy-fgsm": (39.51, 32.14, 26.08, 20.74, 16.23, 12.47),
                   "toy-lat": (39.51, 26.92, 18.16, 12.23, 8.63, 6.05)},
        # Section 3.4: "the proposed method improves the baseline performance from 39.5% to 43.3% on the original
        # data while the accuracy of the FGS network is 40.5%."
        "clean": {"toy-baseline": 39.5, "toy-fgsm": 40.5, "toy-lat": 43.3},
    },
    "table3": {
        "caption": "Table 3: Classification accuracy (%) on CIFAR-10 and CIFAR-100 for VGG and Resnet architectures. "
                   "Results reported are average of 5 runs.",
        # The table's body is not in the paper text this project has (it was lost in conversion): None = unknown.
        "values": {},
    },
    "table4": {
        "caption": "Table 4: Comparison of classification accuracy (%) between various training approaches described "
                   "in Section 4.1. All the models are trained on the CIFAR-10 dataset. No data augmentation or "
                   "dropout regularization is applied.",
        "eps": FGSM_EPS,
        "rows": {"baseline": (89.4, 67.5, 49.6, 41.2, 37.3, 34.7), "fgsm": (88.7, 86.4, 84.1, 81.4, 80.5, 77.1),
                 "fgsm-inter": (90.9, 87.79, 83.85, 79.65, 74.69, 69.92),
                 "lat": (91.2, 87.95, 83.84, 79.11, 73.66, 68.37),
                 "lat-joint": (91.5, 86.07, 81.38, 75.72, 70.25, 64.76)},
        "time": {"baseline": 1, "fgsm": 2, "fgsm-inter": 2, "lat": 1, "lat-joint": 2},  # "X" = 1x the baseline
    },
    "table5": {
        "caption": "Table 5: Comparison of classification accuracy (%) with/without dropout on CIFAR-10 and "
                   "CIFAR-100 for the VGG model.",
        "values": {"cifar10-baseline": 89.4, "cifar10-lat": 91.3, "cifar10-baseline-dropout": 91.5,
                   "cifar10-lat-dropout": 92.1, "cifar100-baseline": 69.8, "cifar100-lat": 72.3,
                   "cifar100-baseline-dropout": 70.5, "cifar100-lat-dropout": 73.1},
    },
    "eps": {
        "caption": "Appendix, Setting eps: eps_l = eps (M - m) for each layer, where eps in {10, 20, 30}. The exact "
                   "value is cross-validated using a held out set. In practice, we found our training approach to "
                   "not be overly sensitive to eps.",
    },
    "table6": {
        "caption": "Table 6: Effect of layerwise adversarial perturbations on the classification accuracy using the "
                   "VGG network on the CIFAR-10 dataset. Baseline performance is 89.4%.",
        "values": {"pool1": 89.5, "pool2": 89.62, "pool3": 90.24, "pool4": 91.1, "pool5": 91.3, "baseline": 89.4},
    },
    "table7": {
        "caption": "Table 7: Classification error rates (%) on CIFAR-10 and CIFAR-100 for WideResNet (WRN) "
                   "architectures. Our results are reported as average of 5 runs. For comparison we provide the "
                   "published WRN baseline results. (*) denotes the results obtained by a single run.",
        # row -> (our group or None, CIFAR-10 error, CIFAR-100 error)
        "rows": [("WRN-28-10", "wrn-baseline", "4.00", "19.25"),
                 ("WRN-28-10 with dropout", "wrn-baseline-dropout", "3.89", "18.85"),
                 ("WRN-40-10 with dropout*", None, "3.8", "18.3"),
                 ("WRN-28-10 with Ours-joint", "wrn-lat-joint", "3.62 ± 0.05", "17.1 ± 0.1"),
                 ("WRN-28-10 with Ours-joint", "wrn-lat-joint-dropout", "3.62 ± 0.05", "17.1 ± 0.1")],
    },
    "figure1": {"caption": "Figure 1: t-SNE visualization of the final fc-layer features of dimension 512 of the VGG "
                           "network for two randomly chosen classes of the CIFAR-10 data for different values of the "
                           "intensity, eps. The top row shows the adversarial perturbations while the bottom row "
                           "shows random perturbations of the same intensity."},
    "figure2": {"caption": "Figure 2: Average singular value (SV) spectrum showing top 50 SVs for the toy example in "
                           "Section 3.4."},
    "figure3": {"caption": "Figure 3: Training and test error rates for VGG network trained on CIFAR-10 and CIFAR-100 "
                           "datasets. The training error rates are computed on the perturbed activations in each "
                           "epoch."},
}


# ----------------------------------------------------------------------------------------------------------------
# Results as the report sees them (filled by lwat.reproduce from the files on disk)


@dataclass
class RunResult:
    """What is known of one planned training."""

    training: Training
    status: str  # "finished", "unfinished (epoch k of E)", "not run yet", "not run (no data)", ...
    dir: Path | None = None
    config: TrainConfig | None = None  # the run's own config.json
    metrics: dict | None = None
    log: list | None = None
    eval: dict | None = None  # eval.json
    host: dict | None = None  # host.json: the machine that finished it (written by lwat.reproduce)
    has_checkpoint: bool = False

    @property
    def finished(self) -> bool:
        return self.metrics is not None


@dataclass
class Results:
    """A plan with its runs (per group, one entry per seed) and analysis results, for rendering."""

    plan: Plan
    runs: dict[str, list[RunResult]]
    analyses: dict[str, dict]  # name -> {"status": str, "seeds": {seed: rows}, "png": relative path or None}

    def finished(self, group: str) -> list[RunResult]:
        return [r for r in self.runs.get(group, []) if r.finished]

    def status(self, group: str) -> str:
        """Why a group has no number: the status of its first run."""
        runs = self.runs.get(group) or []
        if self.plan.skipped:
            return "not run at this scale"
        return runs[0].status if runs else "not planned"


# ----------------------------------------------------------------------------------------------------------------
# Rendering helpers: numbers as "mean ± std", markdown tables, claims


def stats(values: Sequence[float]) -> tuple[float, float, int] | None:
    """(mean, sample std (0 for one value), n), or None for no values."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std, n


def fmt(s: tuple[float, float, int] | None, missing: str = "—", digits: int = 1) -> str:
    if s is None:
        return missing
    mean, std, n = s
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def paper_fmt(v) -> str:
    return "n/a" if v is None else (v if isinstance(v, str) else f"{v:g}")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def claim(text: str, a, b, *, higher: bool = True, unit: str = "%", names=("", "")) -> str:
    """'- text: **yes** (a vs b)': whether mean a > mean b (or < with higher=False), from (mean, std, n) stats.

    A difference smaller than the larger std is flagged as within the seeds' spread.
    """
    if a is None or b is None:
        return f"- {text}: not measured yet"
    holds = a[0] > b[0] if higher else a[0] < b[0]
    spread = (" — equal" if a[0] == b[0] else " — within the seeds' spread" if abs(a[0] - b[0]) < max(a[1], b[1])
              else "")
    na, nb = (f"{n} " if n else "" for n in names)
    return f"- {text}: **{'yes' if holds else 'no'}** ({na}{a[0]:.2f}{unit} vs {nb}{b[0]:.2f}{unit}{spread})"


def _acc(results: Results, group: str, key: str = "test_acc") -> tuple[float, float, int] | None:
    return stats([100 * r.metrics[key] for r in results.finished(group) if key in r.metrics])


def _cell(results: Results, group: str, key: str = "test_acc") -> str:
    return fmt(_acc(results, group, key), results.status(group))


def _n(results: Results, group: str) -> str:
    return f"n={len(results.finished(group))}"


def _analysis_rows(results: Results, name: str) -> dict:
    return results.analyses.get(name, {}).get("seeds", {})


def _analysis_status(results: Results, name: str) -> str:
    return results.analyses.get(name, {}).get("status", "not run yet")


def _plot_line(results: Results, name: str, what: str) -> list[str]:
    png = results.analyses.get(name, {}).get("png")
    if png:
        return [f"![{what}]({png})", ""]
    return [f"Plot ({what}): {_analysis_status(results, name)}.", ""]


# ----------------------------------------------------------------------------------------------------------------
# Per-preset sections: our numbers beside the paper's, then the claims computed from them


def _seed_stats(results: Results, name: str, eps: float, **match) -> tuple[float, float, int] | None:
    """Accuracy (%) stats over seeds of an analysis' rows at `eps` whose fields equal `match`."""
    return stats([100 * r["accuracy"] for rows in _analysis_rows(results, name).values() for r in rows
                  if math.isclose(r["eps"], eps) and all(r[k] == v for k, v in match.items())])


def _render_table1(res: Results) -> list[str]:
    paper, name = PAPER["table1"], "table1-strength"

    def at(kind, e):
        return _seed_stats(res, name, e, kind=kind)

    def ours(kind):
        return [fmt(at(kind, e), _analysis_status(res, name)) for e in paper["eps"]]

    n = f"n={len(_analysis_rows(res, name))}"
    rows = []
    for row, kind in (("FGS [5]", "fgsm"), ("Ours - all layers", "layerwise")):
        rows += [[row, "paper", *map(paper_fmt, paper["rows"][row])], ["", f"ours ({kind}, {n})", *ours(kind)]]
    rows += [["previous-batch signs at the input only (control)", f"ours ({n})", *ours("input_prev")],
             ["random signs at every point (control)", f"ours ({n})", *ours("random")]]
    lines = table(["Type", "", *(f"eps = {e:g}" for e in paper["eps"])], rows) + [""]
    lines.append("Claims (paper: the layerwise previous-batch perturbation is more adversarial than FGSM; the same "
                 "signs at the input only are not adversarial):")
    for e in paper["eps"][1:]:
        lines.append(claim(f"layerwise accuracy below FGSM accuracy at eps {e:g}", at("layerwise", e), at("fgsm", e),
                           higher=False, names=("layerwise", "FGSM")))
    top = paper["eps"][-1]
    lines.append(claim(f"input-only previous-batch signs hurt less than layerwise ones at eps {top:g}",
                       at("input_prev", top), at("layerwise", top), names=("input only", "layerwise")))
    lines.append(claim(f"random signs hurt less than the gradient's at eps {top:g}", at("random", top),
                       at("layerwise", top), names=("random", "layerwise")))
    lines.append("")
    lines += _plot_line(res, "table1-strength", "accuracy under each perturbation against eps")
    lines.append("eps is in pixel units for FGSM and the input-only control, in the perturbation points' activation "
                 "units (fixed scale, no (M - m) factor) for the layerwise rows, as in the paper.")
    return lines


def _render_figure1(res: Results) -> list[str]:
    seeds = _analysis_rows(res, "figure1-tsne")
    rows = next(iter(seeds.values()), [])
    lines = _plot_line(res, "figure1-tsne", "t-SNE of the penultimate features, adversarial (top) and random "
                                            "(bottom) layerwise perturbations")
    if not rows:
        return lines
    eps = sorted({r["eps"] for r in rows})
    acc = {(r["kind"], r["eps"]): 100 * r["accuracy"] for r in rows}
    lines += table(["perturbation", *(f"eps = {e:g}" for e in eps)],
                   [[k, *(f"{acc[(k, e)]:.1f}" for e in eps)] for k in ("adversarial", "random")])
    lines += ["", "Accuracy (%) of the two shown classes (10-way prediction).", "",
              "Claims (paper: random perturbations leave the classes separable, adversarial ones do not):"]
    for e in (e for e in eps if e > 0):
        lines.append(claim(f"adversarial lowers the accuracy more than random at eps {e:g}",
                           (acc[("adversarial", e)], 0, 1), (acc[("random", e)], 0, 1), higher=False,
                           names=("adversarial", "random")))
    return lines + [""]


def _render_table2(res: Results) -> list[str]:
    paper, name = PAPER["table2"], "table2-transfer"
    per_seed = _analysis_rows(res, name)
    status = _analysis_status(res, name)

    def at(group, e):
        return _seed_stats(res, name, e, source=group)

    groups = list(paper["columns"])
    header = ["eps", *(f"{paper['columns'][g]}: paper" for g in groups),
              *(f"{paper['columns'][g]}: ours (n={len(per_seed)})" for g in groups)]
    rows = [[f"{e:g}", *(paper_fmt(paper["values"][g][i]) for g in groups), *(fmt(at(g, e), status) for g in groups)]
            for i, e in enumerate(paper["eps"])]
    lines = ["Accuracy (%) of the baseline toy network on FGSM images crafted on each network:", ""]
    lines += table(header, rows) + [""]
    lines += ["Clean test accuracy (%) of the three toy networks (Section 3.4):", ""]
    lines += table(["network", "paper", "ours"],
                   [[f"{TOY_GROUPS[g.split('-', 1)[1]]} ({_n(res, g)})", paper_fmt(paper["clean"][g]), _cell(res, g)]
                    for g in groups]) + [""]
    top = paper["eps"][-1]
    lines.append("Claims (paper: the baseline is most robust to FGSM images from the FGS network, then ours, then "
                 "its own: FGS > Ours >> base; the layerwise network is the most accurate):")
    for e in paper["eps"][1:]:
        lines.append(claim(f"images from the FGS n/w fool the baseline less than those from our n/w at eps {e:g}",
                           at("toy-fgsm", e), at("toy-lat", e), names=("FGS n/w", "our n/w")))
    lines.append(claim(f"images from our n/w fool the baseline less than its own at eps {top:g}",
                       at("toy-lat", top), at("toy-baseline", top), names=("our n/w", "baseline n/w")))
    lines.append(claim("lat beats baseline on clean accuracy", _acc(res, "toy-lat"), _acc(res, "toy-baseline"),
                       names=("lat", "baseline")))
    lines.append(claim("fgsm beats baseline on clean accuracy", _acc(res, "toy-fgsm"), _acc(res, "toy-baseline"),
                       names=("fgsm", "baseline")))
    lines.append(claim("lat beats fgsm on clean accuracy", _acc(res, "toy-lat"), _acc(res, "toy-fgsm"),
                       names=("lat", "fgsm")))
    return lines + [""]


def _render_figure2(res: Results) -> list[str]:
    lines = _plot_line(res, "figure2-jacobian", "mean singular values of the encoder Jacobian")
    rows = next(iter(_analysis_rows(res, "figure2-jacobian").values()), [])
    if not rows:
        return lines
    sv = {}
    for r in rows:
        sv.setdefault(r["model"], {})[r["index"]] = r["mean"]
    k = min(len(v) for v in sv.values())
    first, last = 1, k
    lines += table(["network", "SV 1", f"SV {last}", f"sum of top {k}", f"SV {last} / SV 1"],
                   [[m, f"{v[first]:.4g}", f"{v[last]:.4g}", f"{sum(v[i] for i in range(1, k + 1)):.4g}",
                     f"{v[last] / v[first]:.3g}"] for m, v in sv.items()]) + [""]

    def one(model, f):
        return (f(sv[model]), 0.0, 1) if model in sv else None

    def total(v):
        return sum(v[i] for i in range(1, k + 1))

    lines.append("Claims (paper: ours and FGS have fewer dominant singular values and decay faster than the "
                 "baseline; FGS suppresses every dimension strongly, ours mainly the trailing ones):")
    for m in ("toy-lat", "toy-fgsm"):
        lines.append(claim(f"{m.split('-')[1]}'s spectrum is below the baseline's (sum of the top {k})",
                           one(m, total), one("toy-baseline", total), higher=False, unit=""))
        lines.append(claim(f"{m.split('-')[1]}'s spectrum decays faster than the baseline's (SV {last} / SV 1)",
                           one(m, lambda v: v[last] / v[first]), one("toy-baseline", lambda v: v[last] / v[first]),
                           higher=False, unit=""))
    lines.append(claim("fgsm suppresses the leading dimension more than lat (SV 1)", one("toy-fgsm", lambda v: v[1]),
                       one("toy-lat", lambda v: v[1]), higher=False, unit=""))
    return lines + [""]


def _render_table3(res: Results) -> list[str]:
    rows = []
    for key in ("cifar10", "cifar100"):
        for model in TABLE3_MODELS:
            for method in ("baseline", "lat"):
                g = f"{key}-{model}-{method}"
                paper = PAPER["table3"]["values"].get(g)
                rows.append([DATA_NAMES[key], model, "Perturbed" if method == "lat" else "Baseline", paper_fmt(paper),
                             _cell(res, g), _cell(res, g, "best_test_acc"), _n(res, g)])
    lines = table(["data", "model", "type", "paper", "ours: final", "ours: best epoch", "seeds"], rows)
    lines += ["", "The paper's numbers for this table are not in the paper text this project has (the table's body "
              "was lost in conversion): 'n/a' until they are copied from the PDF.", "",
              "Claims (paper: the perturbed model beats the baseline for every model and data set):"]
    for key in ("cifar10", "cifar100"):
        for model in TABLE3_MODELS:
            lines.append(claim(f"lat beats baseline, {model} on {DATA_NAMES[key]} (final accuracy)",
                               _acc(res, f"{key}-{model}-lat"), _acc(res, f"{key}-{model}-baseline"),
                               names=("lat", "baseline")))
    return lines + [""]


def _render_figure3(res: Results) -> list[str]:
    lines = []
    for key in ("cifar10", "cifar100"):
        lines += [f"{DATA_NAMES[key]}:", ""]
        lines += _plot_line(res, f"figure3-curves-{key}", f"train and test error per epoch, {DATA_NAMES[key]}")
        base, lat = (res.finished(f"{key}-vgg16_bn-{m}") for m in ("baseline", "lat"))
        if not base or not lat:
            continue

        def last(runs, k):
            return stats([100 * (1 - r.log[-1][k]) for r in runs[:1]])

        lines.append("Claims (paper: the perturbed model's training error, on perturbed activations, stays higher "
                     "while its test error ends lower):")
        lines.append(claim(f"lat's final training error is above the baseline's ({DATA_NAMES[key]}, seed 0)",
                           last(lat, "train_acc"), last(base, "train_acc"), names=("lat", "baseline")))
        lines.append(claim(f"lat's final test error is below the baseline's ({DATA_NAMES[key]}, seed 0)",
                           last(lat, "test_acc"), last(base, "test_acc"), higher=False, names=("lat", "baseline")))
        lines.append("")
    return lines


def _render_table4(res: Results) -> list[str]:
    paper = PAPER["table4"]
    eps = paper["eps"]

    def robust(group, e):
        return stats([100 * r.eval["accuracy"][f"{e:g}"] for r in res.finished(group)
                      if r.eval and f"{e:g}" in r.eval.get("accuracy", {})])

    def time_ratios(group):
        """[(runs, baseline's mean images/s over the method's, machine)] for each machine on which both ran,
        the machine with the most such runs first."""
        found = []
        for m in {machine(r.host) for r in res.finished(group)} - {None}:
            mine, base = ([r.metrics["images_per_s"] for r in res.finished(g) if machine(r.host) == m]
                          for g in (group, "baseline"))
            if mine and base:
                found.append((len(mine) + len(base), stats(base)[0] / stats(mine)[0], m))
        return sorted(found, key=lambda f: (-f[0], f[2]))

    ratios = {g: time_ratios(g) for g in TABLE4_METHODS if g != "baseline"}

    def missing(group):
        runs = res.finished(group)
        if not runs:
            return res.status(group)
        if not any(r.has_checkpoint for r in runs):
            return "needs checkpoint, re-run"
        return "not evaluated yet"

    def accuracy_table(pixel_eps, time: bool):
        rows = []
        for group, (_, name) in TABLE4_METHODS.items():
            paper_time = "X" if paper["time"][group] == 1 else f"{paper['time'][group]}x"
            ours_time = "X" if group == "baseline" else f"{ratios[group][0][1]:.2f}x" if ratios[group] else "—"
            rows.append([name, "paper", *map(paper_fmt, paper["rows"][group])] + ([paper_time] if time else []))
            rows.append(["", f"ours ({group}, {_n(res, group)})",
                         *(fmt(robust(group, e), missing(group)) for e in pixel_eps)] + ([ours_time] if time else []))
        return table(["Type", "", *(f"eps = {e:g}" for e in eps)] + (["Training time"] if time else []), rows)

    lines = accuracy_table(eps, time=True)
    by_machine = {}  # machine -> "method ratio" for every method measured there
    for g, found in ratios.items():
        for _, ratio, m in found:
            by_machine.setdefault(m, []).append(f"{g} {ratio:.2f}x")
    measured = "; ".join(f"{m}: {', '.join(r)}" for m, r in by_machine.items())
    lines += ["", "eps: FGSM strength in pixel units of [0, 1] images (0 = clean test data). Training time: the "
              "baseline's images per second over the method's, from the training logs of runs made on the same kind "
              "of machine (the one with the most such runs; every machine's ratios are in the claims below); runs "
              "that shared the "
              "machine make it noisy: benchmarks/step_overhead.py measures it side by side.", ""]
    lines += [f"The same models with eps read in standardized input units ((x - mean) / std): the attack's pixel eps "
              f"is eps x {INPUT_STD:.4f} (CIFAR-10's mean channel std), i.e. "
              f"{', '.join(f'{e:.4f}' for e in STANDARDIZED_EPS)}. The paper does not state its unit; its inputs "
              "were standardized.", ""]
    lines += accuracy_table((0.0, *STANDARDIZED_EPS), time=False)
    lines += [""] + _plot_line(res, "table4-robustness", "accuracy under FGSM against eps, both readings")
    clean = {g: robust(g, 0.0) for g in TABLE4_METHODS}
    lines.append("")
    lines.append("Claims (paper: perturbing intermediate layers improves clean accuracy; FGS-orig is the most robust "
                 "to FGSM; Ours-orig costs the baseline's time, the joint methods twice):")
    lines.append(claim("lat beats baseline on clean accuracy", clean["lat"], clean["baseline"],
                       names=("lat", "baseline")))
    lines.append(claim("lat-joint beats baseline on clean accuracy", clean["lat-joint"], clean["baseline"],
                       names=("lat-joint", "baseline")))
    for g in ("fgsm-inter", "lat", "lat-joint"):
        lines.append(claim(f"{g} beats fgsm on clean accuracy", clean[g], clean["fgsm"], names=(g, "fgsm")))
    for top, unit in ((eps[-1], "pixel units"), (STANDARDIZED_EPS[-1], "standardized units")):
        others = [robust(g, top) for g in TABLE4_METHODS if g != "fgsm"]
        best_other = max((o for o in others if o is not None), key=lambda s: s[0], default=None)
        lines.append(claim(f"fgsm has the best FGSM accuracy at eps {eps[-1]:g} ({unit})", robust("fgsm", top),
                           best_other, names=("fgsm", "best other")))
    lines.append(f"- training time relative to the baseline (paper: lat ~1x, fgsm, fgsm-inter and lat-joint ~2x): "
                 f"measured {measured or 'not yet'}")
    return lines + [""]


def _render_table5(res: Results) -> list[str]:
    paper = PAPER["table5"]["values"]
    rows = []
    for key in ("cifar10", "cifar100"):
        for dropout in ("", "-dropout"):
            b, p = f"{key}-baseline{dropout}", f"{key}-lat{dropout}"
            rows.append([DATA_NAMES[key], "with Dropout" if dropout else "w/o Dropout", paper_fmt(paper[b]),
                         _cell(res, b), paper_fmt(paper[p]), _cell(res, p), f"{_n(res, b)} / {_n(res, p)}"])
    lines = table(["data", "Type", "Baseline: paper", "Baseline: ours", "Perturbed: paper", "Perturbed: ours",
                   "seeds"], rows)
    lines += ["", "Claims (paper: the perturbed model beats the baseline with and without dropout; on CIFAR-100 it "
              "regularizes better than dropout):"]
    for key in ("cifar10", "cifar100"):
        for dropout in ("", "-dropout"):
            lines.append(claim(f"lat beats baseline on {DATA_NAMES[key]} {'with' if dropout else 'without'} dropout",
                               _acc(res, f"{key}-lat{dropout}"), _acc(res, f"{key}-baseline{dropout}"),
                               names=("lat", "baseline")))
        lines.append(claim(f"lat without dropout beats the baseline with dropout on {DATA_NAMES[key]}",
                           _acc(res, f"{key}-lat"), _acc(res, f"{key}-baseline-dropout"),
                           names=("lat", "baseline + dropout")))
    return lines + [""]


def _render_eps(res: Results) -> list[str]:
    sweep = {10.0: "toy-lat", **{e: f"toy-lat-eps{e:g}" for e in EPS_SWEEP}}
    rows = [[f"lat, eps {e:g}", _cell(res, g), _n(res, g)] for e, g in sorted(sweep.items())]
    rows += [[f"{g.split('-', 1)[1]} (Table 2)", _cell(res, g), _n(res, g)] for g in ("toy-baseline", "toy-fgsm")]
    lines = ["Clean test accuracy (%) of the toy network (Section 3.4) with range-scaled eps:", ""]
    lines += table(["network", "ours", "seeds"], rows) + [""]
    acc = {e: _acc(res, g) for e, g in sweep.items()}
    done = {e: a for e, a in acc.items() if a is not None}
    lines.append("Claims (paper: not overly sensitive to eps; lat beats the baseline and FGS on the toy network):")
    for e in sorted(acc):
        lines.append(claim(f"lat at eps {e:g} beats baseline", acc[e], _acc(res, "toy-baseline"),
                           names=("lat", "baseline")))
    best = max(done, key=lambda e: done[e][0], default=None)
    lines.append(claim(f"lat at its best eps ({best:g}) beats fgsm" if best is not None else "lat beats fgsm",
                       done.get(best), _acc(res, "toy-fgsm"), names=("lat", "fgsm")))
    if len(done) > 1:
        spread = max(a[0] for a in done.values()) - min(a[0] for a in done.values())
        lines.append(f"- spread of lat's accuracy over eps {', '.join(f'{e:g}' for e in sorted(done))}: "
                     f"{spread:.2f} points")
    return lines + [""]


def _render_table6(res: Results) -> list[str]:
    paper = PAPER["table6"]["values"]
    pools = list(TABLE6_DEPTHS)
    rows = [["paper", *(paper_fmt(paper[p]) for p in pools), paper_fmt(paper["baseline"])],
            ["ours", *(_cell(res, p) for p in pools), _cell(res, "baseline")],
            ["seeds", *(_n(res, p) for p in pools), _n(res, "baseline")]]
    lines = table(["Layer (conv1 to)", *(f"{p} ({d} points)" for p, d in TABLE6_DEPTHS.items()), "baseline"], rows)
    lines += [""] + _plot_line(res, "table6-depth", "accuracy against the depth of the perturbation")
    acc = {p: _acc(res, p) for p in pools}
    lines.append("Claims (paper: the gain grows with depth and is largest when perturbing up to pool5):")
    lines.append(claim("perturbing up to pool5 beats perturbing up to pool1", acc["pool5"], acc["pool1"],
                       names=("pool5", "pool1")))
    means = [acc[p][0] if acc[p] else None for p in pools]
    if None not in means:
        ups = sum(b > a for a, b in zip(means, means[1:]))
        lines.append(f"- accuracy rises with each deeper layer: **{'yes' if ups == len(pools) - 1 else 'no'}** "
                     f"({ups} of {len(pools) - 1} steps rise)")
    for p in pools:
        lines.append(claim(f"{p} beats the baseline", acc[p], _acc(res, "baseline"), names=(p, "baseline")))
    return lines + [""]


def _render_table7(res: Results) -> list[str]:
    def err(group):
        return stats([100 * (1 - r.metrics["test_acc"]) for r in res.finished(group)])

    rows = []
    for name, group, c10, c100 in PAPER["table7"]["rows"]:
        if group is None:
            ours = ["not trained (a published number)"] * 2
            label = name
        else:
            ours = [fmt(err(f"{k}-{group}"), res.status(f"{k}-{group}"), digits=2) for k in ("cifar10", "cifar100")]
            label = f"{name} ({group}, {_n(res, 'cifar10-' + group)} / {_n(res, 'cifar100-' + group)})"
        rows.append([label, c10, ours[0], c100, ours[1]])
    lines = table(["Model", "CIFAR-10: paper", "CIFAR-10: ours", "CIFAR-100: paper", "CIFAR-100: ours"], rows)
    lines += ["", "Test error (%) at the end of training. The paper's baseline rows are published WRN numbers, ours "
              "are our own trainings.", "",
              "Claims (paper: Ours-joint lowers the error of WRN-28-10, with dropout or without):"]
    for k in ("cifar10", "cifar100"):
        for drop in ("", "-dropout"):
            lines.append(claim(f"lat-joint{drop} has lower error than the baseline{drop} on {DATA_NAMES[k]}",
                               err(f"{k}-wrn-lat-joint{drop}"), err(f"{k}-wrn-baseline{drop}"), higher=False,
                               names=("lat-joint", "baseline")))
    return lines + [""]


# ----------------------------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Preset:
    """One experiment of the paper."""

    name: str
    title: str  # what it reproduces
    seeds: dict[str, int]  # default number of seeds per scale
    build: Callable[[Plan, dict, int, str], None]  # fills a Plan: (plan, data sources, seeds, device)
    render: Callable[[Results], list[str]]  # markdown lines of the report section

    def plan(self, scale: str, seeds: int | None = None, data: dict | None = None, device: str = "auto") -> Plan:
        """The trainings, evaluations and analyses of this preset at `scale`.

        Args:
            scale: a key of SCALES.
            seeds: trainings per group (seeds 0..seeds-1); default `self.seeds[scale]`.
            data: `resolve_data(scale, ...)`; default: no data given (smoke scale: synthetic).
            device: TrainConfig.device of the trainings.

        Returns:
            The Plan; `plan.skipped` says why a preset runs nothing at this scale.
        """
        _check_scale(scale)
        seeds = self.seeds[scale] if seeds is None else seeds
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        plan = Plan(self.name, scale, seeds)
        self.build(plan, resolve_data(scale) if data is None else data, seeds, device)
        return plan


def _seeds(smoke=1, cpu=2, paper=1):
    return {"smoke": smoke, "cpu": cpu, "paper": paper}


FIGURE_SEEDS = _seeds(cpu=1)
PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("table1", "Table 1: previous-batch layerwise perturbations vs FGSM on a trained VGG", _seeds(),
           _plan_table1, _render_table1),
    Preset("figure1", "Figure 1: t-SNE of VGG features under adversarial vs random layerwise perturbations",
           FIGURE_SEEDS, _plan_figure1, _render_figure1),
    Preset("table2", "Table 2 and Section 3.4: toy MLP on grayscale CIFAR-10, FGSM transfer to the baseline, "
                     "clean accuracy", _seeds(), _plan_table2, _render_table2),
    Preset("figure2", "Figure 2: singular values of the toy MLP's encoder Jacobian", FIGURE_SEEDS, _plan_figure2,
           _render_figure2),
    Preset("table3", "Table 3: baseline vs lat, VGG-16-BN, ResNet-20, ResNet-56 on CIFAR-10/100 with flips",
           _seeds(paper=5), _plan_table3, _render_table3),
    Preset("figure3", "Figure 3: training and test error per epoch, VGG baseline vs lat", FIGURE_SEEDS,
           _plan_figure3, _render_figure3),
    Preset("table4", "Table 4: baseline, fgsm, fgsm-inter, lat, lat-joint on VGG: clean and FGSM accuracy, "
                     "training time", _seeds(), _plan_table4, _render_table4),
    Preset("table5", "Table 5: dropout on/off x baseline/lat, VGG on CIFAR-10/100", _seeds(), _plan_table5,
           _render_table5),
    Preset("table6", "Table 6: perturbing conv1 to pool1..pool5 of VGG", _seeds(), _plan_table6, _render_table6),
    Preset("eps", "Appendix: sensitivity to eps (range scaling), toy MLP on grayscale CIFAR-10", FIGURE_SEEDS,
           _plan_eps, _render_eps),
    Preset("table7", "Table 7: WRN-28-10 with lat-joint, with and without dropout, CIFAR-10/100", _seeds(paper=5),
           _plan_table7, _render_table7),
)}


def get_preset(name: str) -> Preset:
    """The preset registered under `name`; an unknown name is a ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}, all")
    return PRESETS[name]


def estimate_cpu_seconds(cfg: TrainConfig, train_images: int = 50_000, test_images: int = 10_000) -> float | None:
    """Estimated seconds of one training on this project's 2-core CPU machine, or None for an unmeasured model.

    Args:
        cfg: the training (model, width, method, epochs, train_subset).
        train_images: training images without a subset (CIFAR: 50,000).
        test_images: test images, evaluated after every epoch (CIFAR: 10,000).

    Returns:
        epochs x (passes x training images + test images / 3) x the model's seconds per image (CPU_SECONDS_PER_IMAGE).
    """
    per_image = CPU_SECONDS_PER_IMAGE.get((cfg.model, cfg.width))
    if per_image is None:
        return None
    n = cfg.train_subset or train_images
    return cfg.epochs * (PASSES.get(cfg.method, 2) * n + test_images / 3) * per_image


def list_presets() -> list[dict]:
    """Every preset, then "all", with what it reproduces, its trainings per scale and their cpu-scale CPU time.

    Returns:
        One dict per preset: {"name", "title", "trainings": {scale: count}, "cifar100": {scale: how many of those
        need CIFAR-100}, "cpu_seconds": [estimated seconds of each cpu-scale training (None: unmeasured model)],
        "skipped": {scale: reason}}. The last, "all", counts trainings shared by presets once.
    """
    rows, unique = [], {scale: {} for scale in SCALES}
    for preset in PRESETS.values():
        row = {"name": preset.name, "title": preset.title, "trainings": {}, "cifar100": {}, "skipped": {}}
        for scale in SCALES:
            plan = preset.plan(scale)
            row["trainings"][scale] = len(plan.trainings)
            row["cifar100"][scale] = sum(t.group.startswith("cifar100") for t in plan.trainings)
            if plan.skipped:
                row["skipped"][scale] = plan.skipped
            for t in plan.trainings:
                unique[scale][repr(t.config)] = t
        row["cpu_seconds"] = [estimate_cpu_seconds(t.config) for t in preset.plan("cpu").trainings]
        rows.append(row)
    rows.append({"name": "all", "title": "every preset", "skipped": {},
                 "trainings": {scale: len(ts) for scale, ts in unique.items()},
                 "cifar100": {scale: sum(t.group.startswith("cifar100") for t in ts.values())
                              for scale, ts in unique.items()},
                 "cpu_seconds": [estimate_cpu_seconds(t.config) for t in unique["cpu"].values()]})
    return rows


def format_presets() -> str:
    """`list_presets()` as the text table `lwat presets` prints."""
    head = ("preset", *SCALES, "cpu: min per training", "cpu: CPU hours", "reproduces")
    rows = [head]
    for r in list_presets():
        counts = ["—" if scale in r["skipped"] else str(r["trainings"][scale])
                  + (f" ({r['cifar100'][scale]} C100)" if r["cifar100"][scale] else "") for scale in SCALES]
        known = [s for s in r["cpu_seconds"] if s is not None]
        if not known:
            per, total = "—", "—"
        else:
            lo, hi = round(min(known) / 60), round(max(known) / 60)
            per, total = (f"{lo}" if lo == hi else f"{lo}-{hi}"), f"{sum(known) / 3600:.1f}"
        rows.append((r["name"], *counts, per, total, r["title"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(lines + [
        "",
        "Trainings per scale (C100: of which need CIFAR-100; — : not run at that scale). CPU time: estimated for",
        "this project's 2-core machine (lwat.presets.CPU_SECONDS_PER_IMAGE), CIFAR-100 trainings included;",
        "shared trainings (e.g. Table 4's baseline, also in Tables 1, 5 and 6) are counted once in 'all'."])
