"""Tests for lwat.data: CIFAR files, download, image folders, splits and the batched loader, on small fake data."""

import functools
import hashlib
import http.server
import io
import os
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lwat import data
from lwat.data import DataError, Loader, batch_crop, batch_flip_lr, load_dataset

SHARED_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------------------------------------------
# Fake CIFAR files in the official python layout


def _images(rng, n):
    """n random images as (official b'data' rows (n, 3072), the NCHW tensor they must load as)."""
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return x.reshape(n, 3072), torch.from_numpy(x)


def make_cifar10(root: Path, n: int = 3, seed: int = 0) -> tuple[Path, dict]:
    """Writes cifar-10-batches-py/ with n images per batch; returns the folder and the expected tensors."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows, x = _images(rng, n)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:  # protocol 2, as the official Python 2 files
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": rows,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        split = "test" if name == "test_batch" else "train"
        expected[f"{split}_x"].append(x)
        expected[f"{split}_y"].append(torch.tensor(labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, f, protocol=2)
    return folder, {k: torch.cat(v) for k, v in expected.items()}


def make_cifar100(root: Path, n: int = 4) -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    expected = {}
    for split in ("train", "test"):
        rows, x = _images(rng, n)
        fine = rng.integers(0, 100, n).tolist()
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": rows, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]}, f)
        expected[f"{split}_x"], expected[f"{split}_y"] = x, torch.tensor(fine)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)],
                     b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, f)
    return folder, expected


def make_targz(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return dest


def assert_loaded(ds, expected):
    for key, value in expected.items():
        assert torch.equal(getattr(ds, key), value), key


def test_cifar10_folder_round_trips(tmp_path):
    folder, expected = make_cifar10(tmp_path)
    for where in (tmp_path, folder):  # the directory holding the folder, or the folder itself
        ds = load_dataset("cifar10", where)
        assert_loaded(ds, expected)
        assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
        assert ds.train_y.dtype == torch.int64 and ds.classes == CIFAR10_CLASSES
    # layout, independently: row byte 1024 + 32 * r + c is the green value of pixel (r, c)
    rows = pickle.load(open(folder / "data_batch_1", "rb"), encoding="bytes")[b"data"]
    assert ds.train_x[1, 1, 5, 7] == rows[1, 1024 + 32 * 5 + 7]
    assert ds.train_x[2, 2, 31, 0] == rows[2, 2048 + 32 * 31]


def test_cifar10_targz_is_extracted_and_loads(tmp_path):
    folder, expected = make_cifar10(tmp_path / "src")
    (tmp_path / "data").mkdir()
    archive = make_targz(folder, tmp_path / "data" / "cifar-10-python.tar.gz")
    assert_loaded(load_dataset("cifar10", tmp_path / "data"), expected)
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-batches-py", archive.name]
    assert_loaded(load_dataset("cifar10", tmp_path / "data"), expected)  # second time: from the folder
    (tmp_path / "other").mkdir()
    other = make_targz(folder, tmp_path / "other" / "renamed.tar.gz")
    assert_loaded(load_dataset("cifar10", other), expected)  # the archive itself


def test_cifar100_uses_fine_labels(tmp_path):
    folder, expected = make_cifar100(tmp_path / "src")
    (tmp_path / "data").mkdir()
    make_targz(folder, tmp_path / "data" / "cifar-100-python.tar.gz")
    for where in (tmp_path / "src", tmp_path / "data"):
        ds = load_dataset("cifar100", where)
        assert_loaded(ds, expected)
        assert ds.num_classes == 100 and ds.classes[:2] == ["c00", "c01"]


# ---------------------------------------------------------------------------------------------------------------
# Download from a local HTTP server (never the internet)


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields (www dir, base url)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_and_extracts(tmp_path, server, monkeypatch):
    www, url = server
    folder, expected = make_cifar10(tmp_path / "src")
    archive = make_targz(folder, www / "cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CIFAR["cifar10"], "url", f"{url}/cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CIFAR["cifar10"], "md5", md5(archive))
    with pytest.raises(DataError, match="download=True"):
        load_dataset("cifar10", tmp_path / "dl")
    ds = load_dataset("cifar10", tmp_path / "dl", download=True)
    assert_loaded(ds, expected)
    assert (tmp_path / "dl" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_download_to_a_named_archive_path(tmp_path, server, monkeypatch):
    """--data-dir X.tar.gz --download, X.tar.gz not there yet: the archive is fetched to that path and extracted
    beside it (not into a new directory named X.tar.gz); without --download the error names the archive."""
    www, url = server
    folder, expected = make_cifar10(tmp_path / "src")
    archive = make_targz(folder, www / "cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CIFAR["cifar10"], "url", f"{url}/cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CIFAR["cifar10"], "md5", md5(archive))
    target = tmp_path / "dl" / "mine.tar.gz"
    with pytest.raises(DataError, match=r"mine.tar.gz: no such archive \(--download"):
        load_dataset("cifar10", target)
    assert_loaded(load_dataset("cifar10", target, download=True), expected)
    assert target.is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["cifar-10-batches-py", "mine.tar.gz"]


def test_download_bad_md5_leaves_no_file(tmp_path, server, monkeypatch):
    www, url = server
    make_targz(make_cifar10(tmp_path / "src")[0], www / "cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CIFAR["cifar10"], "url", f"{url}/cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CIFAR["cifar10"], "md5", "0" * 32)
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: MD5 [0-9a-f]{32} != expected 0{32}"):
        load_dataset("cifar10", tmp_path / "dl", download=True)
    assert list((tmp_path / "dl").iterdir()) == []  # no final file, no temporary left behind


def test_corrupt_download_never_replaces_good_file(tmp_path, server):
    www, url = server
    good = tmp_path / "keep" / "archive.tar.gz"
    good.parent.mkdir()
    good.write_bytes(b"the good bytes")
    (www / "archive.tar.gz").write_bytes(b"corrupted bytes")
    with pytest.raises(DataError, match="archive.tar.gz: MD5"):
        data.download_file(f"{url}/archive.tar.gz", good, md5(good))
    with pytest.raises(DataError, match="archive.tar.gz: download from .* failed .*404"):
        data.download_file(f"{url}/missing.tar.gz", good, md5(good))
    assert good.read_bytes() == b"the good bytes" and os.listdir(good.parent) == ["archive.tar.gz"]


# ---------------------------------------------------------------------------------------------------------------
# Every bad input is a DataError naming the file


def test_unknown_name_lists_known():
    with pytest.raises(DataError, match="unknown data set 'cifar11'; known: cifar10, cifar100, digits, folder"):
        load_dataset("cifar11")


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: data directory does not exist"):
        load_dataset("cifar10", tmp_path / "nope")
    with pytest.raises(DataError, match="nope: image folder or archive does not exist"):
        load_dataset("folder", tmp_path / "nope")


def test_truncated_batch_file(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_3: truncated or corrupt pickle"):
        load_dataset("cifar10", tmp_path)


def test_missing_batch_file(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch: file missing"):
        load_dataset("cifar10", tmp_path)


def test_pickle_cannot_run_code(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # unpickling would call open(marker, "w")
            return open, (str(marker), "w")

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="data_batch_1: truncated or corrupt pickle .*refusing to load global"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_corrupt_gzip(tmp_path):
    folder, _ = make_cifar10(tmp_path / "src")
    archive = make_targz(folder, tmp_path / "cifar-10-python.tar.gz")
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)  # zero a stretch of the deflate stream
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: corrupt or truncated archive"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path / "cifar-10-batches-py").exists()  # nothing half-extracted under the final name
    archive.write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: corrupt or truncated archive"):
        load_dataset("cifar10", tmp_path)


def test_unsafe_archive_member(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/../../evil")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: refusing member with unsafe path"):
        load_dataset("cifar10", tmp_path)
    assert not (tmp_path.parent / "evil").exists()


def test_archive_with_a_dot_root_member(tmp_path):
    """An archive made with `tar -C dir .` has a "." member (the root itself), which is safe and skipped."""
    folder, expected = make_cifar10(tmp_path / "src")
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder.parent, arcname=".")
    assert "." in tarfile.open(archive).getnames()
    assert_loaded(load_dataset("cifar10", archive.parent), expected)


def test_extraction_that_another_process_finished_first(tmp_path, monkeypatch):
    """Two processes (DDP ranks, two runs) extracting the same archive at once: the one that finds the folder
    already moved in by the other uses it, no "corrupt archive" error; a failure with no folder there still fails."""
    folder, expected = make_cifar10(tmp_path / "src")
    (tmp_path / "data").mkdir()
    make_targz(folder, tmp_path / "data" / "cifar-10-python.tar.gz")
    real_replace = os.replace

    def other_process_wins(src, dst):  # the other process moves its copy in between our check and our move
        shutil.copytree(folder, dst)
        real_replace(src, dst)  # raises: dst is a non-empty directory now
    monkeypatch.setattr(data.os, "replace", other_process_wins)
    assert_loaded(load_dataset("cifar10", tmp_path / "data"), expected)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    shutil.rmtree(tmp_path / "data" / "cifar-10-batches-py")

    def fails(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(data.os, "replace", fails)
    with pytest.raises(DataError, match="No space left on device"):
        load_dataset("cifar10", tmp_path / "data")


def test_wrong_number_of_labels(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    rows, _ = _images(np.random.default_rng(0), 3)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match="data_batch_2: 2 labels of type int64 for 3 images"):
        load_dataset("cifar10", tmp_path)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": rows[:, :3000], b"labels": [0, 1, 2]}, f)
    with pytest.raises(DataError, match=r"data_batch_2: b'data' is uint8 \(3, 3000\), expected uint8 \(n, 3072\)"):
        load_dataset("cifar10", tmp_path)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": rows, b"labels": [0, 1, 10]}, f)
    with pytest.raises(DataError, match="data_batch_2: labels span 0..10, expected 0..9"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Image folders


def write_image_tree(root: Path, fmt: str = "PNG", size=(5, 4), classes=("dog", "cat", "bird"), n=2) -> dict:
    """train/<class>/<i>.<ext> and test/...; returns {relative path: RGB array as Pillow decodes it}."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n if split == "train" else 1):
                path = root / split / c / f"{i}.{fmt.lower()}"
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
                arrays[f"{split}/{c}/{path.name}"] = np.asarray(Image.open(path).convert("RGB"))
    return arrays


def make_tar(root: Path, dest: Path, top: str | None) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for p in sorted(root.rglob("*"), reverse=True):  # archive order must not matter
            if p.is_file():
                tar.add(p, arcname=f"{top}/{p.relative_to(root)}" if top else str(p.relative_to(root)))
    return dest


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_folder_directory_and_archive(tmp_path, fmt):
    arrays = write_image_tree(tmp_path / "imgs", fmt)
    cache = tmp_path / "cache"
    from_dir = load_dataset("folder", tmp_path / "imgs", cache_dir=cache)
    assert from_dir.classes == ["bird", "cat", "dog"]
    assert from_dir.train_x.shape == (6, 3, 4, 5) and from_dir.test_x.shape == (3, 3, 4, 5)
    assert from_dir.train_y.tolist() == [0, 0, 1, 1, 2, 2] and from_dir.test_y.tolist() == [0, 1, 2]
    ext = fmt.lower()
    assert np.array_equal(from_dir.train_x[3].permute(1, 2, 0).numpy(), arrays[f"train/cat/1.{ext}"])
    assert np.array_equal(from_dir.test_x[2].permute(1, 2, 0).numpy(), arrays[f"test/dog/0.{ext}"])
    for top in (None, "mydata"):
        archive = make_tar(tmp_path / "imgs", tmp_path / f"{top}.tar.gz", top)
        from_tar = load_dataset("folder", archive, cache_dir=cache)
        for key in ("train_x", "train_y", "test_x", "test_y", "classes"):
            assert torch.equal(getattr(from_tar, key), getattr(from_dir, key)) if key != "classes" \
                else from_tar.classes == from_dir.classes


def test_image_folder_cache_reused_and_invalidated(tmp_path, monkeypatch):
    write_image_tree(tmp_path / "imgs")
    archive = make_tar(tmp_path / "imgs", tmp_path / "set.tar", None)
    cache = tmp_path / "cache"
    first = load_dataset("folder", archive, cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == [f"set-{data._folder_key(archive)}.pt"]

    calls = []
    real_decode = data._decode_image

    def counting_decode(raw, where):
        calls.append(where)
        return real_decode(raw, where)

    monkeypatch.setattr(data, "_decode_image", counting_decode)
    second = load_dataset("folder", archive, cache_dir=cache)
    assert calls == [] and torch.equal(second.train_x, first.train_x)

    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime: decoded again
    load_dataset("folder", archive, cache_dir=cache)
    assert len(calls) == 9

    monkeypatch.setenv("LWAT_CACHE", str(tmp_path / "env-cache"))  # the env var is the default cache dir
    load_dataset("folder", archive)
    assert len(list((tmp_path / "env-cache").glob("set-*.pt"))) == 1


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="empty: no train and test images"):
        load_dataset("folder", tmp_path / "empty", cache_dir=tmp_path / "c")

    write_image_tree(tmp_path / "a")
    (tmp_path / "a" / "test" / "cat" / "0.png").unlink()
    (tmp_path / "a" / "test" / "cat").rmdir()
    with pytest.raises(DataError, match=r"a: classes differ between train \['bird', 'cat', 'dog'\] and test"):
        load_dataset("folder", tmp_path / "a", cache_dir=tmp_path / "c")

    write_image_tree(tmp_path / "b")
    Image.new("RGB", (6, 6)).save(tmp_path / "b" / "train" / "dog" / "9.png")
    with pytest.raises(DataError, match=r"9.png: image is 6x6, others are 5x4"):
        load_dataset("folder", tmp_path / "b", cache_dir=tmp_path / "c")

    write_image_tree(tmp_path / "d")
    (tmp_path / "d" / "test" / "cat" / "0.png").write_bytes(b"not a png")
    archive = make_tar(tmp_path / "d", tmp_path / "d.tar.gz", "top")
    with pytest.raises(DataError, match="d.tar.gz:top/test/cat/0.png: cannot decode image"):
        load_dataset("folder", archive, cache_dir=tmp_path / "c")

    write_image_tree(tmp_path / "e")
    raw = bytearray(make_tar(tmp_path / "e", tmp_path / "e.tar.gz", None).read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    (tmp_path / "e.tar.gz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"e.tar.gz(:\S+)?: (corrupt or truncated archive|cannot decode image)"):
        load_dataset("folder", tmp_path / "e.tar.gz", cache_dir=tmp_path / "c")
    (tmp_path / "e.tar.gz").write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(DataError, match=r"e.tar.gz(:\S+)?: (corrupt or truncated archive|cannot decode image)"):
        load_dataset("folder", tmp_path / "e.tar.gz", cache_dir=tmp_path / "c")

    with pytest.raises(DataError, match="folder: pass data_dir"):
        load_dataset("folder")


@pytest.mark.skipif(not SHARED_JPEG.is_file(), reason="shared CIFAR-10 JPEG copy not present")
def test_shared_cifar10_jpeg():
    # Uses the persistent default cache ($LWAT_CACHE or ~/.cache/lwat): ~15 s the first time, ~1 s after.
    ds = load_dataset("folder", SHARED_JPEG)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10 and torch.bincount(ds.test_y).tolist() == [1000] * 10
    mean, std = data.mean_std(ds.test_x)
    assert np.allclose(mean, (0.4941, 0.4851, 0.4504), atol=1e-4)  # measured in shared/data/README.md
    assert np.allclose(std, (0.2448, 0.2422, 0.2606), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Built-in sets, grayscale and splits


def test_digits_and_synthetic():
    digits = load_dataset("digits")
    assert digits.train_x.shape == (1437, 1, 8, 8) and digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_x.max() == 255 and torch.bincount(digits.test_y).min() >= 35
    a, b = data.synthetic_dataset(seed=3), data.synthetic_dataset(seed=3)
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, data.synthetic_dataset(seed=4).train_x)
    small = data.synthetic_dataset(num_classes=4, n_train=20, n_test=8, size=8, channels=1)
    assert small.train_x.shape == (20, 1, 8, 8) and torch.bincount(small.train_y).tolist() == [5] * 4


def test_grayscale_matches_luma():
    ds = load_dataset("synthetic", grayscale=True)
    rgb = data.synthetic_dataset().test_x.numpy().astype(np.int64)
    luma = (299 * rgb[:, 0] + 587 * rgb[:, 1] + 114 * rgb[:, 2] + 500) // 1000  # 0.299 R + 0.587 G + 0.114 B
    assert ds.test_x.shape == (128, 1, 32, 32) and np.array_equal(ds.test_x[:, 0].numpy(), luma)
    pil = np.stack([np.asarray(Image.fromarray(im.transpose(1, 2, 0).astype(np.uint8)).convert("L")) for im in rgb])
    assert np.abs(pil.astype(int) - luma).max() <= 1  # Pillow's fixed-point version of the same formula


def test_train_subset_and_val_split_are_balanced_and_disjoint():
    full = data.synthetic_dataset()
    ds = load_dataset("synthetic", val_size=50, train_subset=100, seed=1)
    assert torch.bincount(ds.val_y).tolist() == [5] * 10 and torch.bincount(ds.train_y).tolist() == [10] * 10
    rows = lambda x: {bytes(r) for r in x.flatten(1).numpy()}
    assert len(rows(full.train_x)) == 256  # random images are all distinct
    assert not rows(ds.val_x) & rows(ds.train_x) and rows(ds.val_x) | rows(ds.train_x) <= rows(full.train_x)
    no_subset = load_dataset("synthetic", val_size=50, seed=1)
    assert len(no_subset.train_x) == 206 and not rows(no_subset.val_x) & rows(no_subset.train_x)
    assert torch.equal(no_subset.val_x, ds.val_x)  # the val split does not depend on train_subset
    assert not torch.equal(load_dataset("synthetic", val_size=50, seed=2).val_x, ds.val_x)
    with pytest.raises(DataError, match="train_subset=105 is not possible"):
        load_dataset("synthetic", train_subset=105)
    with pytest.raises(DataError, match="val_size=300 is not possible"):
        load_dataset("synthetic", val_size=300)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation and loader


def test_batch_flip_and_crop():
    x = torch.zeros(2, 1, 6, 6, dtype=torch.uint8)
    x[:, 0, 2, 1] = 200
    assert torch.equal(batch_flip_lr(x, torch.tensor([True, False])), torch.stack([x[0].flip(-1), x[1]]))
    out = batch_crop(x, 4, torch.tensor([[1, -2], [0, 0]]))
    assert out.shape == x.shape and torch.equal(out[1], x[1])
    assert out[0, 0, 1, 3] == 200 and out[0].sum() == 200  # pixel (2, 1) moved by (-1, +2)
    assert batch_crop(x, 4, torch.tensor([[4, 0], [0, -4]])).sum() == 200  # shifted out of view: zero padding


def test_loader_test_mode_covers_everything_in_order(device):
    ds = data.synthetic_dataset(n_train=10, n_test=10)
    loader = Loader(ds.test_x, ds.test_y, 4, train=False, device=device)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    images = torch.cat([x for x, _ in batches])
    assert images.dtype == torch.float32 and images.device.type == device.type
    # exact in uint8 (CUDA divides by 255 as a multiplication by 1/255: floats may differ in the last bit)
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal((images.cpu() * 255).round().to(torch.uint8), ds.test_x)
    assert torch.equal(torch.cat([y for _, y in batches]).cpu(), ds.test_y)
    for bad in (0, -4, 2.0):  # 0 divided by zero, -4 gave a negative length
        with pytest.raises(DataError, match=f"batch_size must be an integer >= 1, got {bad}"):
            Loader(ds.test_x, ds.test_y, bad, train=False)


def test_loader_train_mode(device):
    ds = data.synthetic_dataset(n_train=10)
    make = lambda **kw: Loader(ds.train_x, ds.train_y, 4, train=True, device=device, **kw)
    loader = make(seed=5)
    assert len(loader) == 2
    epoch0 = list(loader.iter_from(0))
    assert [len(y) for _, y in epoch0] == [4, 4]  # last partial batch dropped
    for (xa, ya), (xb, yb) in zip(epoch0, make(seed=5).iter_from(0)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    orders = [torch.cat([y for _, y in make(seed=5, crop=False, flip=False).iter_from(e)]) for e in range(4)]
    assert any(not torch.equal(orders[0], o) for o in orders[1:])
    shuffled = torch.cat([x for x, _ in make(seed=5, crop=False, flip=False).iter_from(0)])
    rows = {bytes(r) for r in (ds.train_x.flatten(1).numpy())}
    assert {bytes(r) for r in (shuffled.cpu() * 255).round().to(torch.uint8).flatten(1).numpy()} <= rows
    augmented = torch.cat([x for x, _ in epoch0]).cpu()
    assert augmented.shape == (8, 3, 32, 32) and not {bytes(r) for r in (augmented * 255).round().to(
        torch.uint8).flatten(1).numpy()} <= rows  # crops and flips changed some images
    assert torch.equal(list(make(seed=5, channels_last=True).iter_from(0))[0][0], epoch0[0][0])


def test_loader_rows_are_a_share_of_the_global_batch(device):
    """A DDP rank's loader (rows=) yields exactly its rows of the global batch, augmentation included."""
    ds = data.synthetic_dataset(n_train=40)
    make = lambda **kw: Loader(ds.train_x, ds.train_y, 12, train=True, seed=3, device=device, **kw)
    shares = [slice(0, 4), slice(4, 8), slice(8, 12)]
    for epoch, start in ((0, 0), (2, 1)):
        full = list(make().iter_from(epoch, start))
        ranks = [list(make(rows=share).iter_from(epoch, start)) for share in shares]
        assert len(full) == 3 - start and all(len(r) == len(full) for r in ranks)
        for i, (x, y) in enumerate(full):
            assert torch.equal(torch.cat([r[i][0] for r in ranks]), x)
            assert torch.equal(torch.cat([r[i][1] for r in ranks]), y)


def test_loader_resume_mid_epoch(device):
    ds = data.synthetic_dataset(n_train=40)
    loader = Loader(ds.train_x, ds.train_y, 8, train=True, seed=3, device=device)
    first = list(loader)  # epoch 0; iter() advances to epoch 1
    full = list(loader.iter_from(1))
    assert loader.epoch == 1 and not torch.equal(first[0][1], full[0][1])
    loader.start_batch = 2
    resumed = list(loader)
    assert loader.epoch == 2 and loader.start_batch == 0 and len(resumed) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(resumed, full[2:]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ValueError, match="start_batch 6 outside 0..5"):
        loader.iter_from(0, 6)


@pytest.mark.parametrize("name", ["cifar10", "folder"])
def test_a_file_that_is_no_archive_is_one_line(name, tmp_path):
    # tarfile's "r:*" lists each compression it tried on a line of its own; the user gets one line
    path = tmp_path / "notes.tar.gz"
    path.write_text("# my notes, not an archive\n")
    with pytest.raises(DataError) as error:
        load_dataset(name, path, cache_dir=tmp_path / "c")
    assert "\n" not in str(error.value), str(error.value)
    assert str(error.value).startswith(f"{path}: not a tar archive"), str(error.value)


def test_an_image_archive_given_as_cifar_names_the_folder_data_set(tmp_path):
    # the shared data's cifar10-jpeg.tar.gz passed as --dataset cifar10: say which data set reads it
    write_image_tree(tmp_path / "jpeg")
    archive = make_tar(tmp_path / "jpeg", tmp_path / "cifar10-jpeg.tar.gz", "top")
    with pytest.raises(DataError, match=r"cifar10-jpeg.tar.gz: archive holds no cifar-10-batches-py/ folder.*'folder'"):
        load_dataset("cifar10", archive)
