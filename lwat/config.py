"""The training configuration: one typed dataclass, every field with its unit or reason, strictly checked."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field

import torch

from lwat.methods import METHODS
from lwat.perturb import KERNELS

AMPS = ("off", "bf16", "fp16")  # --amp values: fp32, bfloat16 autocast, float16 autocast with loss scaling


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


def _f(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    """Everything a training run depends on; written as config.json into every run directory."""

    # what is trained
    model: str = _f("resnet20", "model name (lwat.models registry)")
    width: float = _f(1.0, "channel width multiplier (vgg16_bn, resnets, vit); 1 = the paper's")
    dropout: bool = _f(False, "the model's dropout layers on (vgg16_bn: cifar.torch's; wrn: 0.3); paper Table 5")
    method: str = _f("lat", "training method (lwat.methods registry)")
    # data
    dataset: str = _f("cifar10", "data set: cifar10, cifar100, digits, folder, synthetic, synthetic100")
    data_dir: str | None = _f(None, "CIFAR folder or .tar.gz, or an image folder / .tar(.gz) archive for 'folder'")
    download: bool = _f(False, "download the official CIFAR archive when missing (MD5-checked)")
    grayscale: bool = _f(False, "convert images to one luma channel (the paper's toy example)")
    train_subset: int | None = _f(None, "train on this many images, class-balanced (small-scale runs)")
    val_size: int = _f(0, "hold out this many training images, class-balanced, as a validation split")
    crop: bool = _f(False, "random crop with 4-pixel zero padding (the paper's Tables 4-6 use none)")
    flip: bool = _f(True, "random horizontal flip (the paper's Table 3 uses flips; Tables 4-6 none)")
    # optimization: SGD with Nesterov momentum 0.9, as in the paper
    epochs: int = _f(30, "training epochs (paper: 300)")
    batch_size: int = _f(128, "images per step and per process; under torchrun the global batch is "
                              "batch_size x WORLD_SIZE (lr is not rescaled)")
    lr: float = _f(0.1, "base learning rate (paper: 0.1)")
    lr_drop_every: int = _f(5, "epochs between learning-rate drops (paper: 50 of 300 epochs on CIFAR-10, 60 on "
                               "CIFAR-100; the default keeps that shape for the default 30 epochs)")
    lr_drop_factor: float = _f(5.0, "the learning rate is divided by this at each drop (paper: 5)")
    momentum: float = _f(0.9, "Nesterov momentum (paper: 0.9)")
    weight_decay: float = _f(5e-4, "L2 weight decay (not stated in the paper; cifar.torch's value)")
    # the method
    eps: float = _f(10.0, "layerwise eps: with scale=range, eps_l = eps * (max - min) of the cached gradient "
                          "(paper: 10, 20 or 30 for a mean-reduced loss at batch ~128); with scale=fixed, "
                          "activation units")
    scale: str = _f("range", "eps scaling: range (paper appendix) or fixed")
    alpha: float = _f(0.5, "weight of the clean loss in joint methods: alpha J(clean) + (1 - alpha) J(adv)")
    depth: int | None = _f(None, "perturb only the first DEPTH points (paper Table 6); default all")
    input_eps: float = _f(8 / 255, "FGSM eps of the fgsm method, pixel units of [0, 1] images")
    # cheap regularizers, each combining with any method (0 = off)
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy (Szegedy et al. 2016; usual: 0.1)")
    mixup: float = _f(0.0, "mixup alpha: one lambda ~ Beta(alpha, alpha) per batch (Zhang et al. 2018; usual: 1)")
    cutmix: float = _f(0.0, "CutMix alpha: one box per batch, area ~ Beta(alpha, alpha) (Yun et al. 2019; usual: 1)")
    mix_prob: float = _f(1.0, "chance that a batch is mixed by mixup or CutMix (CutMix's CIFAR recipe: 0.5)")
    cutout: int = _f(0, "cutout: a square of this side (pixels) at a uniform centre, clipped at the border, set to "
                        "the training images' mean (DeVries and Taylor 2017; CIFAR: 16)")
    ema: float = _f(0.0, "decay per step of an exponential moving average of the weights and BatchNorm statistics; "
                         "test accuracy and evaluation use the average (usual: 0.999)")
    sam: float = _f(0.0, "SAM rho: sharpness-aware minimization, two passes per step (Foret et al. 2021; usual: "
                         "0.05; the SAM of the pytorch_optimizer package)")
    sam_adaptive: bool = _f(False, "adaptive SAM (Kwon et al. 2021, who tune rho in 0.2-1.0)")
    # running
    seed: int = _f(0, "seeds weights, data order, augmentation, and which images the validation split and "
                      "training subset take")
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    channels_last: bool = _f(False, "channels-last memory format for images and model")
    amp: str = _f("off", "mixed precision (autocast) of forward passes and losses: off, bf16, or fp16 with a "
                         "GradScaler; the perturbation always uses the unscaled gradient")
    compile: bool = _f(False, "torch.compile the model: lwat's cache update (Eq. 5) is traced into the compiled "
                              "backward; the training runs inside lwat.fusion_rule()")
    kernels: str = _f("aten", "how eager mode runs a BatchNorm point: aten (torch's ops); or fused (its BatchNorm "
                              "with Eq. 6 / Eq. 5 as torch.compile'd kernels: faster, compiled on the first steps, "
                              "needs a C++ compiler on the CPU; equal within float rounding); no effect with --compile")
    eval_batch_size: int = _f(500, "images per step when measuring test accuracy")

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ConfigError for a value of the wrong type or out of range."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _is_type(value, hints[f.name]):
                raise ConfigError(f"{f.name}: expected {_type_name(hints[f.name])}, got {value!r}")
            if isinstance(value, int) and not isinstance(value, bool) and hints[f.name] in (float, float | None):
                setattr(self, f.name, float(value))
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every range check below
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        for name in ("epochs", "batch_size", "lr_drop_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eps", "input_eps", "lr", "weight_decay", "momentum", "seed", "mixup", "cutmix", "cutout", "sam"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.amp not in AMPS:
            raise ConfigError(f"amp: unknown value {self.amp!r}; known: {', '.join(AMPS)}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"kernels: unknown value {self.kernels!r}; known: {', '.join(KERNELS)}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        for name in ("label_smoothing", "ema"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.mix_prob <= 1:
            raise ConfigError(f"mix_prob must be in [0, 1], got {self.mix_prob}")
        if self.mixup and self.cutmix:
            raise ConfigError("mixup and cutmix: choose one")
        if self.mix_prob != 1 and not (self.mixup or self.cutmix):  # it would change nothing: say so
            raise ConfigError("mix_prob needs mixup or cutmix (--mixup or --cutmix)")
        if self.mix_prob == 0 and (self.mixup or self.cutmix):  # likewise: no batch would be mixed
            raise ConfigError("mix_prob 0 mixes no batch: give mixup or cutmix a mix_prob > 0, or leave them off")
        if self.sam_adaptive and not self.sam:
            raise ConfigError("sam_adaptive needs a SAM rho (--sam)")
        if self.sam and self.method in METHODS and METHODS[self.method].passes != 1:  # here, not in train: a sweep or
            # reproduction stops before its first training, not after (an unknown method is train's error)
            one_pass = ", ".join(name for name, m in METHODS.items() if m.passes == 1)
            raise ConfigError(f"sam: combines with the one-pass methods ({one_pass}), not {self.method}")
        if self.sam and self.amp == "fp16":
            raise ConfigError("sam: not with --amp fp16 (its two steps do not go through the GradScaler); use bf16")
        if self.lr_drop_factor <= 0 or self.width <= 0:
            raise ConfigError("lr_drop_factor and width must be > 0")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict (a config file), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path) -> TrainConfig:
        try:
            with open(path) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config file holds one JSON object")
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def resolve_device(name: str) -> torch.device:
    """TrainConfig.device as a torch.device: 'auto' is CUDA when available, else CPU; anything else is passed to
    torch.device (ConfigError for an unknown name, or CUDA asked for where there is none)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but CUDA is not available")
    return device


def _is_type(value, hint) -> bool:
    if isinstance(hint, types.UnionType):
        return any(_is_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else hint.__name__
