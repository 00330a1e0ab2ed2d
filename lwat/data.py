"""Data sets as whole uint8 tensors (CIFAR files, image folders, digits, synthetic) and a seeded, batched loader.

A data set is a `Dataset` of uint8 NCHW image tensors and int64 labels, small enough to live whole on the
training device (CIFAR-10 train is 150 MB). `load_dataset(name, ...)` builds one by name; every bad input
(missing directory, corrupt or truncated file, checksum mismatch, inconsistent counts, unknown name) raises
`DataError` with a one-line message naming the file and the problem. `Loader` iterates over tensors already on
the device, airbench style: shuffling and augmentation (`batch_crop`, `batch_flip_lr`) are batched tensor ops
driven by a generator seeded from (seed, epoch), so any epoch can be replayed, or resumed at any batch, bit for bit.

Nothing here touches CUDA at import or downloads anything unless asked (`download=True`).
"""

import hashlib
import http.client
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """A data set could not be found, read or checked; the message names the file and the problem."""


@dataclass
class Dataset:
    """A labelled image data set held as whole tensors.

    Images are uint8 (N, C, H, W) in 0..255, labels int64 (N,) in [0, len(classes)). `val_x`/`val_y` hold a
    validation split carved out of the training set (`load_dataset(val_size=...)`), else None.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    def __post_init__(self):
        for split in ("train", "test", "val"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x is None and y is None and split == "val":
                continue
            if x is None or y is None or x.dtype != torch.uint8 or x.ndim != 4 or y.dtype != torch.int64 \
                    or y.shape != (len(x),):
                raise DataError(f"{self.name}: {split} split must be uint8 (N, C, H, W) images with int64 (N,) labels")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> "Dataset":
        """Returns a copy with every tensor on `device` (still uint8 / int64)."""
        def move(t):
            return None if t is None else t.to(device)

        return Dataset(self.name, move(self.train_x), move(self.train_y), move(self.test_x), move(self.test_y),
                       list(self.classes), move(self.val_x), move(self.val_y))


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, official "python version" (https://www.cs.toronto.edu/~kriz/cifar.html)

# One entry per data set; tests monkeypatch "url" and "md5" to point at a local server.
CIFAR = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "archive": "cifar-10-python.tar.gz",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],  # 5 x 10000 images
        "test": ["test_batch"],  # 10000 images
        "labels": b"labels",
        "meta": "batches.meta",
        "names": b"label_names",
        "num_classes": 10,
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "archive": "cifar-100-python.tar.gz",
        "folder": "cifar-100-python",
        "train": ["train"],  # 50000 images
        "test": ["test"],  # 10000 images
        "labels": b"fine_labels",  # the 100 classes; b"coarse_labels" are the 20 superclasses
        "meta": "meta",
        "names": b"fine_label_names",
        "num_classes": 100,
    },
}

CIFAR_IMAGE_BYTES = 3 * 32 * 32  # one row of b"data": the R, G, B planes, each 32x32 row-major


def load_cifar(name: str, data_dir, *, download: bool = False) -> Dataset:
    """Loads CIFAR-10 or CIFAR-100 from the official python-format files.

    Args:
        name: "cifar10" or "cifar100".
        data_dir: the extracted folder itself (e.g. `cifar-10-batches-py/`), a directory holding it or the
            official `.tar.gz`, or the `.tar.gz` itself. An archive is extracted beside itself once.
        download: fetch the official archive into `data_dir` when neither folder nor archive is there.

    Returns:
        Dataset with uint8 (N, 3, 32, 32) images and the official class names.
    """
    spec = CIFAR[name]
    folder = _find_cifar_folder(spec, Path(data_dir).expanduser(), download)
    train_x, train_y = _read_cifar_batches(folder, spec["train"], spec)
    test_x, test_y = _read_cifar_batches(folder, spec["test"], spec)
    meta = _unpickle(folder / spec["meta"])
    names = meta.get(spec["names"]) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != spec["num_classes"]:
        raise DataError(f"{folder / spec['meta']}: expected {spec['num_classes']} class names under "
                        f"{spec['names']!r}, found {type(names).__name__}")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return Dataset(name, train_x, train_y, test_x, test_y, classes)


_DOWNLOAD_HINT = "--download on the command line, download=True in Python, fetches"


def _find_cifar_folder(spec: dict, data_dir: Path, download: bool) -> Path:
    named = data_dir.name.endswith((".tar.gz", ".tgz", ".tar")) and not data_dir.is_dir()  # the archive's path
    data_dir, archive = (data_dir.parent, data_dir) if named else (data_dir, data_dir / spec["archive"])
    if (data_dir / spec["train"][0]).is_file():  # data_dir is the extracted folder itself
        return data_dir
    folder = data_dir / spec["folder"]
    if folder.is_dir():
        return folder
    if not archive.is_file():
        if not download:
            if named:
                raise DataError(f"{archive}: no such archive ({_DOWNLOAD_HINT} {spec['archive']})")
            if not data_dir.is_dir():
                raise DataError(f"{data_dir}: data directory does not exist ({_DOWNLOAD_HINT} "
                                f"{spec['archive']})")
            raise DataError(f"{data_dir}: neither {spec['folder']}/ nor {spec['archive']} found ({_DOWNLOAD_HINT} it)")
        download_file(spec["url"], archive, spec["md5"])
    _extract_tar(archive, data_dir, spec["folder"])
    return folder


def _read_cifar_batches(folder: Path, files: list[str], spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for file in files:
        path = folder / file
        batch = _unpickle(path)
        if not isinstance(batch, dict) or b"data" not in batch or spec["labels"] not in batch:
            raise DataError(f"{path}: not a CIFAR batch (expected a dict with b'data' and {spec['labels']!r})")
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[spec["labels"]])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_IMAGE_BYTES:
            raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (n, {CIFAR_IMAGE_BYTES})")
        if labels.shape != (len(data),) or (len(labels) and labels.dtype.kind not in "iu"):
            raise DataError(f"{path}: {labels.size} labels of type {labels.dtype} for {len(data)} images")
        top = spec["num_classes"] - 1
        if len(labels) and (labels.min() < 0 or labels.max() > top):
            raise DataError(f"{path}: labels span {labels.min()}..{labels.max()}, expected 0..{top}")
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))  # R, G, B planes -> NCHW
        ys.append(torch.from_numpy(labels.astype(np.int64)))
    return torch.cat(xs), torch.cat(ys)


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a batch file can not run code."""

    ALLOWED = {("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")} | {
        (f"numpy.{core}.{module}", name) for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path):
    try:
        with open(path, "rb") as f:
            return _NumpyUnpickler(f, encoding="bytes").load()  # the files were written by Python 2
    except FileNotFoundError:
        raise DataError(f"{path}: file missing") from None
    except Exception as e:  # a damaged pickle can raise almost anything (EOFError, KeyError, ValueError, ...)
        raise DataError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Download and extraction


def download_file(url: str, path, md5: str) -> Path:
    """Downloads `url` to `path` atomically, after checking its MD5.

    The bytes go to a temporary file beside `path`, which replaces `path` only once its checksum matches: a
    failed or corrupt download never leaves or replaces a file under the final name.

    Args:
        url: where to fetch from (http, https or file).
        path: destination file; its directory is created.
        md5: expected hex digest.

    Returns:
        `path`.
    """
    from tqdm import tqdm

    path = Path(path)
    fd, tmp = _temp_file(path)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name, disable=not sys.stderr.isatty()) as bar:
                while chunk := response.read(1 << 20):  # 1 MiB
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5.lower():
            raise DataError(f"{path.name}: MD5 {digest.hexdigest()} != expected {md5} (corrupt download from {url})")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a data file is usually shared
        os.replace(tmp, path)
    except DataError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and timeouts are OSErrors
        raise DataError(f"{path.name}: download from {url} failed ({type(e).__name__}: {e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _temp_file(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path` (same file system, so os.replace is atomic): (fd, name)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise DataError(f"{path.parent}: cannot write {path.name} here ({e})") from None


def _extract_tar(archive: Path, dest: Path, folder: str) -> None:
    """Extracts `folder/` from `archive` into `dest`: into a temporary directory first, moved in when complete."""
    try:
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{archive.name}."))
    except OSError as e:
        raise DataError(f"{dest}: cannot extract {archive.name} here ({e})") from None
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts:
                    raise DataError(f"{archive}: refusing member with unsafe path {member.name!r}")
                if not parts:  # "." (an archive made with `tar -C dir .`): the root itself
                    continue
                target = tmp.joinpath(*parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                else:
                    raise DataError(f"{archive}: refusing member {member.name!r} (links and devices not allowed)")
            _check_trailer(tar)
        if not (tmp / folder).is_dir():
            raise DataError(f"{archive}: archive holds no {folder}/ folder (an archive of train|test/<class>/<image> "
                            "files is the data set 'folder')")
        try:
            os.replace(tmp / folder, dest / folder)
        except OSError:
            if not (dest / folder).is_dir():
                raise
            # another process (a DDP rank, a second run) extracted the same archive first: use its folder
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _archive_error(archive, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _archive_error(path: Path, e: Exception) -> DataError:
    # One line: tarfile's "r:*" lists every compression it tried, a line each, when none opens the file.
    if isinstance(e, tarfile.ReadError) and str(e).startswith("file could not be opened"):
        return DataError(f"{path}: not a tar archive (.tar, or compressed with gzip, bzip2 or xz)")
    return DataError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {' '.join(str(e).split())})")


def _check_trailer(tar: tarfile.TarFile) -> None:
    """Reads a compressed archive to its end: tarfile stops at the end-of-archive blocks, before the gzip (bz2, xz)
    trailer whose checksum catches corrupted data, so without this a damaged archive can extract silently."""
    while tar.fileobj.read(1 << 20):  # 1 MiB
        pass


# ----------------------------------------------------------------------------------------------------------------
# Image folders: train/<class>/<image> and test/<class>/<image>, as a directory tree or a .tar / .tar.gz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CACHE_VERSION = 1  # bump when the decoding changes, so old caches are not reused


def cache_root(cache_dir=None) -> Path:
    """Where decoded data sets and downloads go: `cache_dir`, else $LWAT_CACHE, else ~/.cache/lwat."""
    return Path(cache_dir or os.environ.get("LWAT_CACHE") or "~/.cache/lwat").expanduser()


def load_image_folder(path, *, cache_dir=None) -> Dataset:
    """Loads an image-folder data set, decoding it once into a uint8 cache.

    Layout: `train/<class>/<image>` and `test/<class>/<image>` (PNG or JPEG, converted to RGB, all the same
    size), optionally under one top directory (`cifar10/train/...`), as a directory tree or a `.tar`/`.tar.gz`
    archive read without extracting. Classes are the train folder names, sorted; test must have the same ones.

    Args:
        path: the directory or archive.
        cache_dir: where the decoded cache goes (see `cache_root`); the cache is keyed on the absolute path,
            size and modification time of the archive (of every file, for a directory), so a change re-decodes.

    Returns:
        Dataset named after the folder, uint8 (N, 3, H, W) images.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise DataError(f"{path}: image folder or archive does not exist")
    name = path.name.split(".")[0]
    cache = cache_root(cache_dir) / f"{name}-{_folder_key(path)}.pt"
    saved = _read_cache(cache)
    if saved is not None:
        return Dataset(name, saved["train_x"], saved["train_y"], saved["test_x"], saved["test_y"], saved["classes"])
    train_x, train_y, test_x, test_y, classes = _decode_folder(path)
    fd, tmp = _temp_file(cache)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
                        "classes": classes, "source": str(path)}, f)
        os.replace(tmp, cache)
    except OSError as e:  # e.g. disk full
        raise DataError(f"{cache}: cannot write the cache ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return Dataset(name, train_x, train_y, test_x, test_y, classes)


def _read_cache(cache: Path) -> dict | None:
    """The saved tensors, or None when the cache is absent or unreadable (then the folder is decoded again)."""
    if not cache.is_file():
        return None
    try:
        saved = torch.load(cache, weights_only=True)  # tensors, strings and lists only: no code runs
    except Exception as e:  # torch.load raises many types on a damaged file; decoding again repairs it
        warnings.warn(f"{cache}: unreadable cache, decoding again ({type(e).__name__}: {e})")
        return None
    keys = {"train_x", "train_y", "test_x", "test_y", "classes"}
    return saved if isinstance(saved, dict) and keys <= saved.keys() else None


def _folder_key(path: Path) -> str:
    """sha256 of (absolute path, size, mtime_ns) of the archive, or of every file under a directory."""
    h = hashlib.sha256(f"lwat-folder-v{_CACHE_VERSION}\0{path}".encode())
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"\0{p.relative_to(path) if p != path else ''}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _folder_members(path: Path):
    """Yields (relative posix name, name for messages, bytes) for every image file, from a directory or tar."""
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                try:
                    raw = p.read_bytes()
                except OSError as e:
                    raise DataError(f"{p}: cannot read ({e})") from None
                yield p.relative_to(path).as_posix(), str(p), raw
        return
    try:
        with tarfile.open(path, "r:*") as tar:  # read in order, one pass, nothing written to disk
            for member in tar:
                base = PurePosixPath(member.name).name
                if member.isfile() and base.lower().endswith(IMAGE_SUFFIXES) and not base.startswith("."):
                    yield member.name, f"{path}:{member.name}", tar.extractfile(member).read()
            _check_trailer(tar)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _archive_error(path, e) from None


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """One encoded image -> uint8 (H, W, 3) RGB."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ... on damaged files
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from None


def _decode_folder(path: Path):
    samples = {"train": [], "test": []}  # split -> [(class, name, image)]
    prefix, shape = None, None
    for name, where, data in _folder_members(path):
        parts = PurePosixPath(name).parts
        if len(parts) not in (3, 4) or parts[-3] not in samples:
            raise DataError(f"{where}: expected [<top>/]train|test/<class>/<image>")
        if prefix is None:
            prefix = parts[:-3]
        elif parts[:-3] != prefix:
            raise DataError(f"{where}: top directory differs from {'/'.join(prefix) or 'none'} of earlier images")
        image = _decode_image(data, where)
        if shape is None:
            shape = image.shape
        elif image.shape != shape:
            raise DataError(f"{where}: image is {image.shape[1]}x{image.shape[0]}, others are {shape[1]}x{shape[0]}")
        samples[parts[-3]].append((parts[-2], name, image))
    if not samples["train"] or not samples["test"]:
        missing = " and ".join(s for s in samples if not samples[s])
        raise DataError(f"{path}: no {missing} images (expected train/<class>/<image> and test/<class>/<image>, "
                        f"{'/'.join(IMAGE_SUFFIXES)})")
    classes = sorted({c for c, _, _ in samples["train"]})
    test_classes = sorted({c for c, _, _ in samples["test"]})
    if classes != test_classes:
        raise DataError(f"{path}: classes differ between train {classes} and test {test_classes}")
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in ("train", "test"):
        rows = sorted(samples[split], key=lambda s: (index[s[0]], s[1]))  # archive order must not matter
        out.append(torch.from_numpy(np.stack([img for _, _, img in rows])).permute(0, 3, 1, 2).contiguous())
        out.append(torch.tensor([index[c] for c, _, _ in rows], dtype=torch.int64))
    return (*out, classes)


# ----------------------------------------------------------------------------------------------------------------
# Small built-in data sets


def digits_dataset(*, test_size: int = 360, seed: int = 0) -> Dataset:
    """scikit-learn's embedded handwritten digits (1797 images, 8x8 grayscale), no download.

    Args:
        test_size: images held out for test, stratified by class.
        seed: the split's random state (fixed, so the split is the same in every run).

    Returns:
        Dataset with uint8 (N, 1, 8, 8) images, pixel values 0..16 scaled to 0..255.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
    t = torch.from_numpy
    return Dataset("digits", t(train_x), t(train_y), t(test_x), t(test_y), [str(i) for i in range(10)])


def synthetic_dataset(num_classes: int = 10, n_train: int = 256, n_test: int = 128, size: int = 32,
                      channels: int = 3, seed: int = 0) -> Dataset:
    """Random but learnable images for tests and smoke runs, deterministic from `seed`.

    Each class has a smooth random prototype (a 4x4 pattern upsampled to `size`), so crops and flips keep it
    recognisable; an image is its class prototype plus uniform noise. Labels cycle through the classes.

    Returns:
        Dataset with uint8 (N, channels, size, size) images.
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = F.interpolate(torch.rand(num_classes, channels, 4, 4, generator=g), size=(size, size),
                               mode="bilinear", align_corners=False)

    def make(n):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = 0.6 * prototypes[y] + 0.4 * torch.rand(n, channels, size, size, generator=g)
        return (x * 255).round().clamp(0, 255).to(torch.uint8), y

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, [f"class{i}" for i in range(num_classes)])


# ----------------------------------------------------------------------------------------------------------------
# Transforms of a whole data set


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) RGB -> uint8 (N, 1, H, W) luma, ITU-R 601: 0.299 R + 0.587 G + 0.114 B, rounded.

    Integer arithmetic, so the result is exact and the same on every device. One-channel input is returned as is.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.long().unbind(1)
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).to(torch.uint8).unsqueeze(1)


def _balanced_pick(y: torch.Tensor, n: int, num_classes: int, generator: torch.Generator, what: str) -> torch.Tensor:
    """Sorted indices of n // num_classes random samples of each class."""
    counts = torch.bincount(y, minlength=num_classes)
    if n <= 0 or n % num_classes or n // num_classes > counts.min():
        raise DataError(f"{what}={n} is not possible: it must be a positive multiple of {num_classes} classes, "
                        f"at most {num_classes} x {counts.min().item()} (the smallest class)")
    picks = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    picks = [p[torch.randperm(len(p), generator=generator)[: n // num_classes]] for p in picks]
    return torch.cat(picks).sort().values


def _cifar(name: str):
    return lambda data_dir, download, cache_dir: load_cifar(name, data_dir or cache_root(cache_dir),
                                                            download=download)


def _folder(data_dir, download, cache_dir):
    if data_dir is None:
        raise DataError("folder: pass data_dir, the image folder or .tar/.tar.gz archive")
    return load_image_folder(data_dir, cache_dir=cache_dir)


# name -> function(data_dir, download, cache_dir) -> Dataset; a new data set is a new entry
LOADERS = {
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "digits": lambda data_dir, download, cache_dir: digits_dataset(),
    "folder": _folder,
    "synthetic": lambda data_dir, download, cache_dir: synthetic_dataset(),  # fixed data: `seed` only splits it
    # a 100-class stand-in with CIFAR-100's label count, for smoke runs of the CIFAR-100 code paths
    "synthetic100": lambda data_dir, download, cache_dir: synthetic_dataset(num_classes=100, n_train=400, n_test=200),
}


def load_dataset(name: str, data_dir=None, *, download: bool = False, grayscale: bool = False,
                 train_subset: int | None = None, val_size: int = 0, seed: int = 0, cache_dir=None) -> Dataset:
    """Loads a data set by name, optionally grayscale, subsampled and with a validation split.

    Args:
        name: one of `LOADERS`: "cifar10", "cifar100", "digits", "folder", "synthetic".
        data_dir: CIFAR files (default: the cache root) or, for "folder", the image directory or archive.
        download: fetch missing CIFAR archives from the official site.
        grayscale: convert to one luma channel (`to_grayscale`); the paper's toy example uses grayscale CIFAR-10.
        train_subset: keep this many training images, the same number from each class.
        val_size: hold out this many training images, the same number from each class, as val_x / val_y
            (taken before `train_subset`, so the two never overlap).
        seed: seeds the validation split and the subset (not the data itself).
        cache_dir: where downloads and decoded caches go (default $LWAT_CACHE or ~/.cache/lwat).

    Returns:
        Dataset on the CPU.
    """
    if name not in LOADERS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(LOADERS)}")
    ds = LOADERS[name](data_dir, download, cache_dir)
    if grayscale:
        ds.train_x, ds.test_x = to_grayscale(ds.train_x), to_grayscale(ds.test_x)
    g = torch.Generator().manual_seed(seed)
    if val_size:
        val = _balanced_pick(ds.train_y, val_size, ds.num_classes, g, "val_size")
        keep = torch.ones(len(ds.train_y), dtype=torch.bool)
        keep[val] = False
        ds.val_x, ds.val_y = ds.train_x[val], ds.train_y[val]
        ds.train_x, ds.train_y = ds.train_x[keep], ds.train_y[keep]
    if train_subset is not None:
        subset = _balanced_pick(ds.train_y, train_subset, ds.num_classes, g, "train_subset")
        ds.train_x, ds.train_y = ds.train_x[subset], ds.train_y[subset]
    return ds


def mean_std(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 (N, C, H, W) images, e.g. for a model's normalization."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in x.split(4096):  # float64 copies of 4096 images at a time, not the whole set
        chunk = chunk.to("cpu", torch.float64) / 255
        total += chunk.sum((0, 2, 3))
        squares += chunk.square().sum((0, 2, 3))
    count = x.numel() / x.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# ----------------------------------------------------------------------------------------------------------------
# Batched augmentation and the loader


def batch_flip_lr(images: torch.Tensor, mask: torch.Tensor | None = None, *, generator=None) -> torch.Tensor:
    """Mirrors images left-right where `mask` is True.

    Args:
        images: (B, C, H, W), any dtype.
        mask: (B,) bool; default: each image with probability 1/2, drawn on the CPU from `generator`.

    Returns:
        (B, C, H, W) tensor.
    """
    if mask is None:
        mask = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(mask.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


def batch_crop(images: torch.Tensor, pad: int = 4, shifts: torch.Tensor | None = None, *,
               generator=None) -> torch.Tensor:
    """Random crop with zero padding: each image translated by up to `pad` pixels, same size out.

    Output pixel (r, c) of image i is input pixel (r + dy_i, c + dx_i), zero where that falls outside.

    Args:
        images: (B, C, H, W), any dtype.
        pad: largest shift in pixels.
        shifts: (B, 2) integer (dy, dx) in [-pad, pad]; default: uniform, drawn on the CPU from `generator`.

    Returns:
        (B, C, H, W) tensor.
    """
    b, c, h, w = images.shape
    if shifts is None:
        shifts = torch.randint(-pad, pad + 1, (b, 2), generator=generator)
    shifts = shifts.to(images.device) + pad  # offsets into the padded image
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = (shifts[:, 0, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (shifts[:, 1, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def batch_cutout(images: torch.Tensor, size: int, centres: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Cutout (DeVries and Taylor 2017): in image i, the size x size square centred at centres[i] = (row, col),
    clipped at the border, is set to `fill`.

    Args:
        images: (B, C, H, W) float.
        size: the square's side in pixels: rows centre - size // 2 .. centre - size // 2 + size, exclusive (for an even
            side the paper's code's centre - size // 2 .. centre + size // 2; an odd side is not one pixel short).
        centres: (B, 2) integer (row, col), each uniform over the image in training.
        fill: (C,) the value per channel (the training images' mean: zero after normalization, as in the paper's code).

    Returns:
        (B, C, H, W) tensor.
    """
    _, _, h, w = images.shape
    rows, cols = torch.arange(h, device=images.device), torch.arange(w, device=images.device)
    centres = centres.to(images.device)
    first = centres - size // 2  # (B, 2) the square's first row and column, before clipping
    inside_r = (rows >= first[:, :1]) & (rows < first[:, :1] + size)  # (B, H)
    inside_c = (cols >= first[:, 1:]) & (cols < first[:, 1:] + size)  # (B, W)
    cut = (inside_r[:, :, None] & inside_c[:, None, :])[:, None]
    return torch.where(cut, fill.to(images).view(1, -1, 1, 1), images)


def batch_mix(images: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor,
              box: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or, given a box, CutMix (Yun et al. 2019) of a batch with its permutation `perm`.

    Mixup: image lam * x_i + (1 - lam) * x_perm(i), target likewise. CutMix: the box (r0, r1, c0, c1) (rows r0..r1-1,
    cols c0..c1-1) of x_i is replaced by that of x_perm(i), and lam becomes the share of the image left uncut.

    Args:
        images: (B, C, H, W) float. targets: (B, K) class probabilities. lam: in [0, 1]. perm: (B,) a permutation.

    Returns:
        (mixed images, mixed targets).
    """
    perm = perm.to(images.device)
    if box is None:
        return lam * images + (1 - lam) * images[perm], lam * targets + (1 - lam) * targets[perm]
    r0, r1, c0, c1 = box
    images = images.clone()
    images[:, :, r0:r1, c0:c1] = images[perm, :, r0:r1, c0:c1]
    lam = 1 - (r1 - r0) * (c1 - c0) / (images.shape[-2] * images.shape[-1])
    return images, lam * targets + (1 - lam) * targets[perm]


def cutmix_box(lam: float, h: int, w: int, centre: tuple[int, int]) -> tuple[int, int, int, int]:
    """CutMix's box (the paper's code): sides H sqrt(1 - lam) and W sqrt(1 - lam) at `centre`, clipped."""
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    r, c = centre
    return (min(max(r - cut_h // 2, 0), h), min(max(r + cut_h // 2, 0), h),
            min(max(c - cut_w // 2, 0), w), min(max(c + cut_w // 2, 0), w))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)  # fits int64


class Loader:
    """Iterates over (images, labels) batches of uint8 tensors kept on the device.

    Each `iter(loader)` runs one epoch, `loader.epoch`, and advances it. A training loader shuffles, crops and
    flips with randomness drawn for the whole epoch from a CPU generator seeded by (seed, epoch), so an epoch is
    the same on every run and device, and `iter_from(epoch, k)` (or setting `epoch` and `start_batch`) resumes
    it at batch k bit for bit. Training drops the last partial batch; test keeps order and every sample.

    Args:
        x, y: uint8 (N, C, H, W) images and int64 (N,) labels.
        batch_size: images per batch.
        train: shuffle and augment (else: fixed order, no augmentation).
        crop: random crop with `pad` (4) pixels of zero padding, when training (default off, as TrainConfig.crop).
        flip: random horizontal flip, when training (default on, as TrainConfig.flip).
        seed: seeds shuffling and augmentation together with the epoch.
        drop_last: drop the last partial batch; default: `train`.
        device: where the data lives and batches come out; default: where `x` is.
        channels_last: yield images in channels-last memory format.
        rows: keep only these rows of every batch (a DDP rank's share of the global batch); the other rows are
            never gathered, cropped or flipped.
        cutout: when training, `batch_cutout` of this side (0: off), filled with the images' mean.
        mixup, cutmix: when training, alpha of `batch_mix` (0: off; not both): each batch's lam ~ Beta(alpha, alpha)
            and its permutation (within `rows`) are drawn for the whole epoch, after the draws above, so turning
            them on leaves the order, flips and crops of every batch as they were. Labels then come as (B, K)
            float class probabilities instead of (B,) int64.
        mix_prob: the chance that a batch is mixed (CutMix's CIFAR default: 0.5).
        num_classes: K, needed for mixup and cutmix.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, train: bool, crop: bool = False,
                 flip: bool = True, seed: int = 0, drop_last: bool | None = None, device=None,
                 channels_last: bool = False, pad: int = 4, rows: slice = slice(None), cutout: int = 0,
                 mixup: float = 0.0, cutmix: float = 0.0, mix_prob: float = 1.0, num_classes: int | None = None):
        if x.dtype != torch.uint8 or x.ndim != 4 or y.shape != (len(x),):
            raise DataError(f"Loader: expected uint8 (N, C, H, W) images and (N,) labels, got {x.dtype} "
                            f"{tuple(x.shape)} and {tuple(y.shape)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"Loader: batch_size must be an integer >= 1, got {batch_size!r}")
        device = torch.device(device) if device is not None else x.device
        self.x, self.y = x.to(device), y.to(device, torch.int64)
        self.batch_size, self.train, self.crop, self.flip, self.pad = batch_size, train, crop, flip, pad
        self.seed, self.channels_last, self.rows = seed, channels_last, rows
        self.drop_last = train if drop_last is None else drop_last
        for name, value in (("cutout", cutout), ("mixup", mixup), ("cutmix", cutmix)):
            if not value >= 0:  # nan too: mixup nan made every image nan
                raise DataError(f"Loader: {name} must be >= 0, got {value}")
        if not 0 <= mix_prob <= 1:
            raise DataError(f"Loader: mix_prob must be in [0, 1], got {mix_prob}")
        if mixup and cutmix:
            raise DataError("Loader: mixup and cutmix: choose one")
        if (mixup or cutmix) and not num_classes:
            raise DataError("Loader: mixup and cutmix need num_classes")
        h, w = x.shape[-2:]
        if cutout >= 2 * max(h, w) - 1:  # the square then covers the whole image wherever its centre: nothing is left
            raise DataError(f"cutout {cutout} blanks every {h}x{w} image wholly (any side >= {2 * max(h, w) - 1} "
                            f"does, wherever its centre); DeVries and Taylor cut about half the image's side")
        self.cutout, self.mix_alpha, self.cutmix, self.mix_prob = cutout, mixup or cutmix, bool(cutmix), mix_prob
        self.num_classes = num_classes
        self.fill = torch.tensor(mean_std(self.x)[0], device=self.x.device) if cutout else None  # no float copy of x
        self.epoch = 0  # the epoch the next iter() runs
        self.start_batch = 0  # the batch the next iter() starts at (for resuming mid-epoch); reset after use
        if len(self) == 0:
            raise DataError(f"Loader: {len(x)} images give no batch of {batch_size}")

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0
        return self.iter_from(epoch, start)

    def iter_from(self, epoch: int, start_batch: int = 0):
        """Yields the batches of `epoch` from batch index `start_batch` on; does not change `self.epoch`.

        Returns:
            generator of (float32 (B, C, H, W) images in [0, 1], int64 (B,) labels), on the device.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self)}")
        return self._batches(epoch, start_batch)

    def _batches(self, epoch: int, start_batch: int):
        n, bs, device = len(self.x), self.batch_size, self.x.device
        if self.train:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            order = torch.randperm(n, generator=g).to(device)
            flips = (torch.rand(n, generator=g) < 0.5).to(device)
            shifts = torch.randint(-self.pad, self.pad + 1, (n, 2), generator=g).to(device)
            h, w = self.x.shape[-2:]
            if self.cutout:
                centres = torch.stack([torch.randint(h, (n,), generator=g), torch.randint(w, (n,), generator=g)], 1)
            if self.mix_alpha:
                nb, local = len(self), len(range(bs)[self.rows])
                lams = np.random.default_rng(_epoch_seed(self.seed, epoch)).beta(self.mix_alpha, self.mix_alpha, nb)
                mixed = torch.rand(nb, generator=g) < self.mix_prob
                perms = torch.rand(nb, local, generator=g).argsort(1)
                boxes = torch.stack([torch.randint(h, (nb,), generator=g), torch.randint(w, (nb,), generator=g)], 1)
        for i in range(start_batch, len(self)):
            r = range(i * bs, min((i + 1) * bs, n))[self.rows]
            batch = slice(r.start, r.stop, r.step)
            if self.train:
                images, labels = self.x[order[batch]], self.y[order[batch]]
                if self.crop:
                    images = batch_crop(images, self.pad, shifts[batch])
                if self.flip:
                    images = batch_flip_lr(images, flips[batch])
            else:
                images, labels = self.x[batch], self.y[batch]
            images = images.float().div_(255)
            if self.train and self.cutout:
                images = batch_cutout(images, self.cutout, centres[batch], self.fill)
            if self.train and self.mix_alpha:
                labels = F.one_hot(labels, self.num_classes).float()
                if mixed[i]:
                    lam = float(lams[i])
                    box = cutmix_box(lam, h, w, tuple(boxes[i].tolist())) if self.cutmix else None
                    images, labels = batch_mix(images, labels, lam, perms[i], box)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels
