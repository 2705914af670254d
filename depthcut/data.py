"""Datasets held as uint8 tensors in memory, and batch loaders that work on tensors on a device.

The datasets here are small (CIFAR-10, Fashion-MNIST), so the whole split lives in (device)
memory and every batch is cut, augmented and normalised with tensor ops: no worker processes,
no per-sample Python, the same code on CPU and GPU.

Supported formats (the user gives a data root):

- ``cifar10``: torchvision's python pickle batches (``cifar-10-batches-py/``).
- ``cifar10-jpeg``: CIFAR-10 re-encoded as JPEG in an ImageFolder layout, as a ``.tar.gz``
  archive (read in place) or an extracted folder; decoded once, then cached as ``.npz``.
- ``fashion-mnist``: the original IDX files, gzipped or not.
- ``fortunes-lang``, ``fortunes-topic``: texts of ``fortunes.tar.gz`` as byte tokens, read by
  `depthcut.text` (a `TextDataset`: int64 (N, T) token ids in place of images).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import secrets
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from depthcut import distributed
from depthcut.errors import ConfigError, DepthcutError

DATASETS: tuple[str, ...] = ("cifar10", "cifar10-jpeg", "fashion-mnist", "fortunes-lang",
                             "fortunes-topic")

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
_JPEG_FOLDER = "cifar10-jpeg"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = "v1"  # bump when the cached arrays' meaning changes, so old files are not used
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DatasetNotFoundError(DepthcutError, FileNotFoundError):
    """The dataset's files are not under the given root; the message says what was looked for."""


class DatasetError(DepthcutError, ValueError):
    """The dataset's files are there but malformed (bad archive, pickle, IDX header, labels)."""


@dataclass(eq=False, repr=False)
class ImageDataset:
    """A whole dataset in memory: uint8 (N, C, H, W) images, int64 labels, and how to treat them."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    def __post_init__(self) -> None:
        # Validate once here so every consumer can rely on the layout without re-checking.
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise DatasetError(
                    f"{self.name}: {split} images must be uint8 (N, C, H, W), "
                    f"got {images.dtype} {tuple(images.shape)}"
                )
            if labels.dim() != 1 or len(labels) != len(images):
                raise DatasetError(
                    f"{self.name}: {split} labels must be 1-D with one label per image, "
                    f"got {tuple(labels.shape)} for {len(images)} images"
                )
            setattr(self, f"{split}_images", images.contiguous())
            setattr(self, f"{split}_labels", labels.to(torch.int64).contiguous())
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DatasetError(
                f"{self.name}: train and test images differ in shape: "
                f"{tuple(self.train_images.shape[1:])} vs {tuple(self.test_images.shape[1:])}"
            )
        self.classes = list(self.classes)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise DatasetError(
                f"{self.name}: mean/std need {self.in_channels} value(s), "
                f"got {len(self.mean)} and {len(self.std)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[2])

    def __repr__(self) -> str:
        # The default dataclass repr would print tensor contents; shapes say what matters.
        shape = "x".join(str(s) for s in self.train_images.shape[1:])
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_images)}, "
            f"test={len(self.test_images)}, shape={shape}, classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(
    name: str,
    root: str | Path,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ImageDataset:
    """Load dataset `name` from the data root `root` into memory.

    `cache_dir` is only used by ``cifar10-jpeg`` (decoded arrays); it defaults to
    ``$DEPTHCUT_CACHE`` or ``~/.cache/depthcut``.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetNotFoundError(
            f"{_DISPLAY_NAMES[key]} dataset: the data root {root} is a file, not a folder.\n"
            f"{_layout_text(key, root)}"
        )
    if key == "cifar10":
        return _load_cifar10_pickle(root)
    if key == "cifar10-jpeg":
        return _load_cifar10_jpeg(root, cache_dir, progress)
    if key.startswith("fortunes-"):
        from depthcut.text import load_fortunes  # text.py builds on this module

        return load_fortunes(key, root, cache_dir)
    return _load_fashion_mnist(root)


_DISPLAY_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar10-jpeg": "CIFAR-10 (JPEG)",
    "fashion-mnist": "Fashion-MNIST",
    "fortunes-lang": "fortunes (language)",
    "fortunes-topic": "fortunes (English topic)",
}
DATASET_NAMES = dict(_DISPLAY_NAMES)  # option value -> the dataset's true name, for reports


def _layouts(key: str, root: Path) -> list[str]:
    """Every place the loader looks, in order, for the error message."""
    if key == "cifar10":
        files = ", ".join([*_CIFAR_TRAIN_BATCHES, "test_batch", "batches.meta"])
        return [f"{root / _CIFAR_FOLDER}/{{{files}}}", f"{root}/{{{files}}}"]
    if key == "cifar10-jpeg":
        return [
            f"{root / _JPEG_ARCHIVE} (train/<class>/*.jpg and test/<class>/*.jpg inside)",
            f"{root / _JPEG_FOLDER}/train/<class>/*.jpg and .../test/<class>/*.jpg",
            f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg",
        ]
    if key.startswith("fortunes-"):
        return [f"{root / 'fortunes.tar.gz'} (fortunes/<language>/<topic file> inside, texts "
                "separated by lines holding only %)"]
    names = ", ".join(f"{n}[.gz]" for n in _FASHION_FILES.values())
    return [f"{folder}/{{{names}}}" for folder in _fashion_folders(root)]


_HINTS = {
    "cifar10": (
        "torchvision.datasets.CIFAR10(root, download=True) creates this layout on a machine with "
        "internet (or extract cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html into root)."
    ),
    "cifar10-jpeg": (
        f"put {_JPEG_ARCHIVE} (ImageFolder layout, classes {', '.join(CIFAR10_CLASSES)}) in root, "
        "or extract it there; use dataset 'cifar10' for torchvision's original CIFAR-10 files."
    ),
    "fashion-mnist": (
        "torchvision.datasets.FashionMNIST(root, download=True) creates root/FashionMNIST/raw/ "
        "on a machine with internet (or download the four IDX files from "
        "https://github.com/zalandoresearch/fashion-mnist into root/fashion-mnist/)."
    ),
    "fortunes-lang": (
        "put fortunes.tar.gz (the texts of Debian's fortune-cookie packages, see the data "
        "README) in root."
    ),
}
_HINTS["fortunes-topic"] = _HINTS["fortunes-lang"]


def _layout_text(key: str, root: Path, problems: Sequence[str] = ()) -> str:
    lines = ["Expected one of these layouts:"]
    lines += [f"  - {layout}" for layout in _layouts(key, root)]
    lines += [f"Found: {problem}" for problem in problems]
    lines.append(f"Hint: {_HINTS[key]}")
    return "\n".join(lines)


def _not_found(key: str, root: Path, problems: Sequence[str] = ()) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{_DISPLAY_NAMES[key]} dataset not found under data root {root}.\n"
        f"{_layout_text(key, root, problems)}"
    )


# --- CIFAR-10, torchvision's pickle batches --------------------------------------------------


def _load_cifar10_pickle(root: Path) -> ImageDataset:
    """Read torchvision's layout; root may be the data root or the batches folder itself."""
    required = [*_CIFAR_TRAIN_BATCHES, "test_batch"]
    problems = []
    folder = None
    for candidate in (root / _CIFAR_FOLDER, root):
        if not candidate.is_dir():
            continue
        missing = [f for f in required if not (candidate / f).is_file()]
        if not missing:
            folder = candidate
            break
        if len(missing) < len(required):  # a partial copy: say what is missing
            problems.append(f"{candidate} lacks {', '.join(missing)}")
    if folder is None:
        raise _not_found("cifar10", root, problems)

    train = [_read_cifar_batch(folder / f) for f in _CIFAR_TRAIN_BATCHES]
    test_images, test_labels = _read_cifar_batch(folder / "test_batch")
    classes = CIFAR10_CLASSES
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        meta = _unpickle(meta_path)
        names = _pick(meta, "label_names", meta_path)
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    for path, labels in ((folder, train_labels), (folder / "test_batch", test_labels)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DatasetError(f"{path}: labels outside [0, {len(classes)})")
    return ImageDataset(
        name="CIFAR-10",
        train_images=torch.from_numpy(train_images),
        train_labels=torch.from_numpy(train_labels),
        test_images=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels),
        classes=classes,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        crop_padding=4,
        flip=True,
    )


def _unpickle(path: Path) -> dict:
    # Pickle can run code: only load files the user put there (torchvision does the same).
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DatasetError(f"{path}: not a readable CIFAR-10 pickle batch ({error})") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return content


def _pick(content: dict, key: str, path: Path):
    """Python 2 pickles (the official files) have bytes keys; accept str keys too."""
    for candidate in (key.encode(), key):
        if candidate in content:
            return content[candidate]
    raise DatasetError(f"{path}: no {key!r} entry (keys: {sorted(map(str, content))})")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path)
    data = np.asarray(_pick(content, "data", path))
    labels = np.asarray(_pick(content, "labels", path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DatasetError(f"{path}: {len(labels)} labels for {len(data)} images")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


# --- CIFAR-10 as JPEG (ImageFolder layout, archive or folder) --------------------------------


def _load_cifar10_jpeg(root: Path, cache_dir: str | Path | None, progress: bool) -> ImageDataset:
    """Decode the JPEGs once and cache the arrays, keyed by the source's content."""
    archive = root / _JPEG_ARCHIVE
    folders = [f for f in (root / _JPEG_FOLDER, root) if (f / "train").is_dir()]
    folder = next((f for f in folders if (f / "test").is_dir()), None)
    if archive.is_file():
        source, key = archive, "archive-" + _sha256_file(archive)
    elif folder is not None:
        source, key = folder, "folder-" + _hash_folder(folder)
    else:
        raise _not_found("cifar10-jpeg", root)

    cache_path = _cache_dir(cache_dir) / f"cifar10-jpeg-{_CACHE_VERSION}-{key[:40]}.npz"
    arrays = _read_cache(cache_path)
    if arrays is None:
        files = _archive_files(archive) if source == archive else _folder_files(folder)
        arrays = _decode_image_folder(files, source, progress)
        _write_cache(cache_path, arrays)
    return ImageDataset(
        name="CIFAR-10 (JPEG)",
        train_images=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        test_images=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"]),
        classes=[str(c) for c in arrays["classes"]],
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        crop_padding=4,
        flip=True,
    )


# (split, class name, file name) -> encoded bytes or the path to read them from
_ImageFiles = dict[tuple[str, str, str], bytes | Path]


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(_IMAGE_SUFFIXES)


def _archive_files(archive: Path) -> _ImageFiles:
    """Read every image member's bytes in one streaming pass (no extraction to disk)."""
    files: _ImageFiles = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = PurePosixPath(member.name.lstrip("/")).parts
                parts = tuple(p for p in parts if p != ".")
                if len(parts) == 4:  # one top-level folder around train/ and test/
                    parts = parts[1:]
                if len(parts) != 3 or parts[0] not in ("train", "test"):
                    continue
                if not _is_image_name(parts[2]) or parts[1].startswith("."):
                    continue
                if parts in files:
                    raise DatasetError(f"{archive}: {'/'.join(parts)} appears twice")
                handle = tar.extractfile(member)
                if handle is not None:
                    files[parts] = handle.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DatasetError(f"{archive}: not a readable tar archive ({error})") from error
    if not files:
        raise DatasetError(f"{archive}: no train/<class>/*.jpg or test/<class>/*.jpg members")
    return files


def _folder_files(folder: Path) -> _ImageFiles:
    files: _ImageFiles = {}
    for split in ("train", "test"):
        for class_dir in sorted((folder / split).iterdir()):
            if not class_dir.is_dir() or class_dir.name.startswith("."):
                continue
            for path in class_dir.iterdir():
                if path.is_file() and _is_image_name(path.name):
                    files[(split, class_dir.name, path.name)] = path
    if not files:
        raise DatasetError(f"{folder}: no images in train/<class>/ or test/<class>/")
    return files


def _decode_image(data: bytes) -> np.ndarray:
    """One encoded image -> (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _decode_image_folder(files: _ImageFiles, source: Path, progress: bool) -> dict[str, np.ndarray]:
    """ImageFolder semantics: classes are the sorted train folders, files sorted by name."""
    classes = sorted({cls for split, cls, _ in files if split == "train"})
    if not classes:
        raise DatasetError(f"{source}: no training images (train/<class>/*.jpg)")
    unknown = sorted({cls for _, cls, _ in files} - set(classes))
    if unknown:
        raise DatasetError(f"{source}: test classes {unknown} have no train folder")
    index = {cls: i for i, cls in enumerate(classes)}
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes)}
    bar = tqdm(total=len(files), desc="decoding CIFAR-10 (JPEG)", unit="img", disable=not progress)
    with bar:
        shape = None
        for split in ("train", "test"):
            keys = sorted((k for k in files if k[0] == split), key=lambda k: (index[k[1]], k[2]))
            images = None
            for i, key in enumerate(keys):
                entry = files[key]
                try:
                    data = entry.read_bytes() if isinstance(entry, Path) else entry
                    pixels = _decode_image(data)
                except (OSError, ValueError, Image.DecompressionBombError) as error:
                    name = "/".join(key)
                    raise DatasetError(f"{source}: cannot decode {name} ({error})") from error
                if shape is None:
                    shape = pixels.shape
                if pixels.shape != shape:
                    raise DatasetError(
                        f"{source}: {'/'.join(key)} is {pixels.shape[:2]}, other images are "
                        f"{shape[:2]}; all images must have the same size"
                    )
                if images is None:
                    images = np.empty((len(keys), *shape), dtype=np.uint8)
                images[i] = pixels
                bar.update()
            if images is None:
                raise DatasetError(f"{source}: no {split} images ({split}/<class>/*.jpg)")
            arrays[f"{split}_images"] = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
            arrays[f"{split}_labels"] = np.array([index[k[1]] for k in keys], dtype=np.int64)
    return arrays


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_folder(folder: Path) -> str:
    """Cheap content key for a folder: relative paths, sizes and mtimes (not the bytes)."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        for path in sorted((folder / split).rglob("*")):
            if path.is_file():
                stat = path.stat()
                rel = path.relative_to(folder).as_posix()
                digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_dir(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DEPTHCUT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "depthcut"


_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classes")


def read_cache(path: Path, keys: Sequence[str], check: Callable[[dict], None]
               ) -> dict[str, np.ndarray] | None:
    """The arrays `keys` of a cache file, or None if absent or unusable (`check(arrays)` raises:
    then the caller rebuilds it, after a warning)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as content:
            arrays = {k: content[k] for k in keys}
        check(arrays)
    except Exception as error:  # any damage means: decode again
        warnings.warn(f"ignoring unusable cache file {path} ({error}); rebuilding it", stacklevel=4)
        return None
    return arrays


def check_splits(arrays: dict[str, np.ndarray], rows: str,
                 rows_ok: Callable[[np.ndarray], bool]) -> None:
    """Raise DatasetError unless the cached class list and both splits' `{split}_{rows}` and
    labels have the expected kinds and shapes (`rows_ok`) and the labels index the classes."""
    classes = arrays["classes"]
    if classes.ndim != 1 or classes.dtype.kind != "U":
        raise DatasetError("bad class list")
    for split in ("train", "test"):
        data, labels = arrays[f"{split}_{rows}"], arrays[f"{split}_labels"]
        if not rows_ok(data):
            raise DatasetError(f"bad {split} {rows} {data.dtype} {data.shape}")
        if labels.dtype != np.int64 or labels.shape != (len(data),):
            raise DatasetError(f"bad {split} labels {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DatasetError(f"{split} labels out of range")


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached CIFAR-10 (JPEG) arrays, or None if absent or unusable."""
    return read_cache(path, _CACHE_KEYS, lambda arrays: check_splits(
        arrays, "images", lambda a: a.dtype == np.uint8 and a.ndim == 4 and a.shape[1] == 3))


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half-written cache."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique name beside the target (same file system, so os.replace is atomic); not
        # mkstemp, whose 0600 mode would make a shared cache unreadable to other users.
        tmp_name = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"))
        with open(tmp_name, "xb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as error:  # a read-only cache folder must not stop the run
        warnings.warn(f"could not write the dataset cache {path} ({error})", stacklevel=3)
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)


# --- Fashion-MNIST, IDX files ---------------------------------------------------------------


def _fashion_folders(root: Path) -> list[Path]:
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", root]


def _load_fashion_mnist(root: Path) -> ImageDataset:
    problems = []
    found: dict[str, Path] | None = None
    for folder in _fashion_folders(root):
        if not folder.is_dir():
            continue
        paths = {}
        for key, stem in _FASHION_FILES.items():
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    paths[key] = candidate
                    break
        if len(paths) == len(_FASHION_FILES):
            found = paths
            break
        if paths:
            missing = [_FASHION_FILES[k] for k in _FASHION_FILES if k not in paths]
            problems.append(f"{folder} lacks {', '.join(missing)}")
    if found is None:
        raise _not_found("fashion-mnist", root, problems)

    arrays = {}
    for split in ("train", "test"):
        images = read_idx(found[f"{split}_images"], _IDX_IMAGES_MAGIC)
        labels = read_idx(found[f"{split}_labels"], _IDX_LABELS_MAGIC).astype(np.int64)
        if len(images) != len(labels):
            raise DatasetError(
                f"{found[f'{split}_images']} has {len(images)} images but "
                f"{found[f'{split}_labels']} has {len(labels)} labels"
            )
        if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"{found[f'{split}_labels']}: labels outside [0, 10)")
        arrays[f"{split}_images"] = torch.from_numpy(images[:, None])
        arrays[f"{split}_labels"] = torch.from_numpy(labels)
    return ImageDataset(
        name="Fashion-MNIST",
        classes=FASHION_MNIST_CLASSES,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        crop_padding=2,
        flip=True,
        **arrays,
    )


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Parse an IDX file (gzipped or not): big-endian magic, big-endian uint32 dims, then data."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DatasetError(f"{path}: damaged gzip file ({error})") from error
    if len(raw) < 4:
        raise DatasetError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            "(not an IDX file of unsigned bytes with the expected number of dimensions)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = math.prod(dims)
    if len(raw) - header != size:
        raise DatasetError(
            f"{path}: IDX header promises {dims} = {size} bytes of data, "
            f"the file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


# ---------------------------------------------------------------------------------------------
# Splits, augmentation, batches


def split_indices(
    n: int, val_fraction: float, seed: int, subset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) index split of range(n); the last round(n * val_fraction) go to val.

    `subset` keeps only the first `subset` training indices (a random subset, since the order is a
    random permutation), for quick runs on part of the data.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * val_fraction)
    train, val = permutation[: n - n_val], permutation[n - n_val :]
    if n > 0 and len(train) == 0:
        raise ConfigError(f"val_fraction {val_fraction} of {n} samples leaves none for training")
    if subset is not None:
        if subset < 1:
            raise ConfigError(f"subset must be >= 1, got {subset}")
        if subset > len(train):
            raise ConfigError(
                f"subset {subset} is larger than the {len(train)} training samples available "
                f"({n} samples, val_fraction {val_fraction})"
            )
        train = train[:subset]
    return train, val


def augment(
    images: torch.Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random crop (from the zero-padded image) and horizontal flip, vectorised.

    Offsets are uniform in [0, 2 * padding] per sample and axis; each sample is flipped with
    probability 0.5. Everything is one gather with advanced indexing, so it costs the same on GPU
    as a copy. Random numbers come from `generator` (on its device), or the global RNG of the
    images' device. With padding 0 and no flip the input itself is returned.
    """
    if images.dim() != 4:
        raise ConfigError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if padding < 0:
        raise ConfigError(f"padding must be >= 0, got {padding}")
    if padding == 0 and not flip:
        return images
    n, c, h, w = images.shape
    device = images.device
    rng_device = generator.device if generator is not None else device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    source = images
    if padding > 0:
        size = (n,)
        dy = torch.randint(0, 2 * padding + 1, size, generator=generator, device=rng_device)
        dx = torch.randint(0, 2 * padding + 1, size, generator=generator, device=rng_device)
        rows = rows + dy.to(device)[:, None]
        cols = cols + dx.to(device)[:, None]
        source = F.pad(images, (padding, padding, padding, padding))
    if flip:
        flipped = torch.randint(0, 2, (n,), generator=generator, device=rng_device).bool()
        cols = torch.where(flipped.to(device)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return source[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def _make_generator(device: torch.device) -> torch.Generator:
    """A generator on `device` when the backend has one, else on CPU (augment copies over)."""
    try:
        return torch.Generator(device=device)
    except RuntimeError:
        return torch.Generator()


_AUGMENT_SEED_OFFSET = 0x9E3779B9  # keeps the augmentation stream apart from the shuffle stream


class BatchLoader:
    """Iterates (inputs, targets) batches from uint8 tensors already in memory: normalisation and
    augmentation done on tensors, on `device`.

    The images are moved to `device` once, as uint8; each batch is converted to float32 there.
    Epoch `e` (the e-th call of ``iter``) shuffles with seed ``seed + e`` and augments from a
    stream seeded from the same, so a run is reproducible batch for batch.

    Integer (N, T) token ids (a `depthcut.text.TextDataset`) are served as they are, int64:
    no normalisation, augmentation or memory format applies to them (`mean`, `std`,
    `augment`, `channels_last` are ignored).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.tokens = images.dim() == 2 and images.dtype in (torch.int16, torch.int32,
                                                             torch.int64)
        if self.tokens:
            images, mean, std, augment, channels_last = images.long(), (), (), False, False
        elif images.dim() != 4 or images.dtype != torch.uint8:
            raise ConfigError(
                f"images must be uint8 (N, C, H, W) or integer (N, T) token ids, got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (len(images),):
            raise ConfigError(f"need one label per image: {tuple(labels.shape)} for {len(images)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if crop_padding < 0:
            raise ConfigError(f"crop_padding must be >= 0, got {crop_padding}")
        channels = 0 if self.tokens else images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"mean and std need {channels} value(s) each, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {std}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.seed = seed
        self.shard = shard  # (rank, world size): this process reads every world-th sample
        self.epoch = 0  # advanced by each __iter__ call; settable to resume a run
        shape = (1, channels, 1, 1)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)
        self._augment_generator = _make_generator(self.device)

    @property
    def num_samples(self) -> int:
        rank, world = self.shard
        return len(range(rank, len(self.images), world))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Advance the epoch now, not lazily at the first batch, so each iter() call is one epoch.
        epoch_seed = self.seed + self.epoch
        self.epoch += 1
        order = None
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(len(self.images), generator=generator).to(self.device)
        rank, world = self.shard
        if world > 1:  # every rank draws the same permutation and keeps its own slice
            if order is None:
                order = torch.arange(len(self.images), device=self.device)
            order = order[rank::world]
        if self.augment:
            self._augment_generator.manual_seed(epoch_seed + _AUGMENT_SEED_OFFSET)
        return self._batches(order)

    def _batches(
        self, order: torch.Tensor | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if order is None:
                images = self.images[start : start + self.batch_size]
                labels = self.labels[start : start + self.batch_size]
            else:
                index = order[start : start + self.batch_size]
                images, labels = self.images[index], self.labels[index]
            if self.tokens:
                yield images, labels
                continue
            if self.augment:  # on uint8: a quarter of the bytes to gather
                images = augment(
                    images, self.crop_padding, self.flip, generator=self._augment_generator
                )
            inputs = images.to(dtype=torch.float32, memory_format=memory_format)
            inputs = inputs.div_(255.0).sub_(self._mean).div_(self._std)
            yield inputs, labels


@dataclass(eq=False)
class DataSplits:
    """The loaders one experiment needs, all built from one seeded split."""

    dataset: ImageDataset
    train: BatchLoader
    train_eval: BatchLoader
    val: BatchLoader | None
    test: BatchLoader
    train_indices: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0))
    val_indices: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0))


def make_splits(
    dataset: ImageDataset,
    *,
    val_fraction: float = 0.1,
    train_subset: int | None = None,
    batch_size: int = 128,
    eval_batch_size: int = 512,
    seed: int = 0,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> DataSplits:
    """Split the training set into train / val and build the loaders on `device`.

    The training loader drops its last partial batch when there is at least one full batch: a
    batch of one sample would break BatchNorm in training mode, and reshuffling each epoch means
    no sample is always left out.
    """
    train_idx, val_idx = split_indices(
        len(dataset.train_images), val_fraction, seed, subset=train_subset
    )
    device = torch.device(device)
    norm = {"mean": dataset.mean, "std": dataset.std, "device": device,
            "channels_last": channels_last}
    # One device copy of the training subset, shared by the training and train-eval loaders.
    train_images = dataset.train_images[train_idx].to(device)
    train_labels = dataset.train_labels[train_idx].to(device)
    # Under torch.distributed each rank trains and counts entropy on its shard (batch_size is
    # per process); validation and test run whole on every rank.
    shard = (distributed.rank(), distributed.world_size())
    train = BatchLoader(
        train_images, train_labels, batch_size=batch_size, shuffle=True, augment=True,
        crop_padding=dataset.crop_padding, flip=dataset.flip,
        drop_last=len(train_idx) >= batch_size * shard[1], seed=seed, shard=shard, **norm,
    )
    train_eval = BatchLoader(train_images, train_labels, batch_size=eval_batch_size,
                             shard=shard, **norm)
    val = None
    if len(val_idx):
        val = BatchLoader(
            dataset.train_images[val_idx], dataset.train_labels[val_idx],
            batch_size=eval_batch_size, **norm,
        )
    test = BatchLoader(
        dataset.test_images, dataset.test_labels, batch_size=eval_batch_size, **norm
    )
    return DataSplits(
        dataset=dataset, train=train, train_eval=train_eval, val=val, test=test,
        train_indices=train_idx, val_indices=val_idx,
    )
