"""Image folders of any size, mode and class count, decoded once at one size into a disk cache.

The folder: ``train/<class>/*`` and ``test/<class>/*`` (or ``val/<class>/*``), or only
``train/<class>/*``, or the class folders directly in the root; where no test split exists the
caller holds one out. Every image (JPEG, PNG, BMP, GIF, TIFF, WebP; RGB, grey, 16-bit, CMYK,
palette, with transparency) becomes RGB, is resized so its shorter side is the chosen size and
centre-cropped square: the evaluation transform, applied once. Training augmentation then works
on these uint8 arrays (`depthcut.data.recipes`).

Why pre-decode (FFCV's choice) rather than decode in workers each epoch: depthcut reads the
training set dozens of times (the dense training and every stage's finetune), decoding and
resizing a 224 px JPEG costs milliseconds of CPU per image per epoch, and a cached row costs a
copy; the batches are then the same bit for bit whatever the number of processes. The cost is
disk: the decoded size (9 GB for 60,000 images at 224 px). Decoding runs in worker processes,
and JPEGs are decoded at reduced scale (libjpeg's DCT scaling, PIL's ``draft``) when the image
is at least twice the size asked for.

The cache folder (``<cache>/image-folders/<name>-<size>px-<key>/``) holds ``images.npy``, every
image in one uint8 (N, 3, S, S) array, and ``index.npz``: labels, split, whether each image
could be read, its path and per-channel pixel sums (normalisation statistics without another
pass). The key hashes the files' relative paths, sizes and mtimes; the folder is built under a
temporary name and renamed when complete, so an interrupted build is never used.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import secrets
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from depthcut.data.cache import resolve_cache_dir
from depthcut.data.disk_images import DiskImages, NpyRowWriter
from depthcut.data.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
TRAIN, TEST = 0, 1
_CACHE_VERSION = "v1"  # bump when the cached arrays' meaning changes
_UNREADABLE = (OSError, ValueError, SyntaxError, UnidentifiedImageError,
               Image.DecompressionBombError)


@dataclass(frozen=True)
class FolderLayout:
    """Where the class folders are: `train` always, `test` (test/ or val/) when there is one."""

    root: Path
    train: Path
    test: Path | None


@dataclass(frozen=True)
class ImageList:
    """Every image file of a folder, in a fixed order (split, class, name), with its label."""

    layout: FolderLayout
    classes: list[str]
    paths: list[Path]
    labels: np.ndarray  # int64, index into classes
    splits: np.ndarray  # int8, TRAIN or TEST

    def content_key(self) -> str:
        """A hash of the relative paths, sizes and mtimes (not the bytes: reading them would
        cost as much as decoding them)."""
        digest = hashlib.sha256()
        for path in self.paths:
            stat = path.stat()
            rel = path.relative_to(self.layout.root).as_posix()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and (
        path.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_layout(root: Path) -> FolderLayout | None:
    """train/ with test/ (else val/) beside it, train/ alone, or class folders in `root`."""
    if not root.is_dir():
        return None
    if (root / "train").is_dir():
        test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
        return FolderLayout(root, root / "train", test)
    if any(is_image_file(f) for c in _class_folders(root) for f in c.iterdir()):
        return FolderLayout(root, root, None)
    return None


def list_images(layout: FolderLayout) -> ImageList:
    """The images, checked: at least two classes, no empty class folder, no test class without
    a training folder (DatasetError, one paragraph, naming the folders)."""
    classes = [c.name for c in _class_folders(layout.train)]
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DatasetError(
            f"{layout.train} must hold one folder per class, at least 2 classes, found {found}: "
            "a classifier of one class learns nothing (it reaches 100% by always answering it)."
            " Add a folder for every other class.")
    index = {name: i for i, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    splits: list[int] = []
    empty: list[str] = []
    for split, folder in ((TRAIN, layout.train), (TEST, layout.test)):
        if folder is None:
            continue
        for class_dir in _class_folders(folder):
            if class_dir.name not in index:
                raise DatasetError(
                    f"{class_dir} is a class with no training folder ({layout.train} has "
                    f"{', '.join(classes)}): rename it or add {layout.train / class_dir.name}.")
            files = sorted(f for f in class_dir.iterdir() if is_image_file(f))
            if not files:
                empty.append(str(class_dir))
            paths += files
            labels += [index[class_dir.name]] * len(files)
            splits += [split] * len(files)
    if empty:
        raise DatasetError(
            f"{len(empty)} class folder(s) hold no images ({', '.join(IMAGE_SUFFIXES)}): "
            f"{', '.join(empty)}. Every class needs images in every split it appears in: add "
            "them or remove the folder.")
    return ImageList(layout, classes, paths, np.array(labels, dtype=np.int64),
                     np.array(splits, dtype=np.int8))


def first_image_side(images: ImageList) -> int:
    """The shorter side of the first training image: the size used when none is asked for."""
    first = images.paths[int(np.argmax(images.splits == TRAIN))]
    try:
        with Image.open(first) as image:
            return min(image.size)
    except _UNREADABLE as error:
        raise DatasetError(f"{first}: cannot read the first image to choose the image size "
                           f"({error}); pass --image-size") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit and float grey scaled to 0..255, transparency over
    white, CMYK, palette and grey converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def decode_at_size(path: Path, size: int) -> np.ndarray:
    """One image file -> (size, size, 3) uint8: RGB, EXIF orientation applied, shorter side
    resized to `size` (bilinear, antialiased) and centre-cropped."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4, 1/8 scale when larger
        image = to_rgb(ImageOps.exif_transpose(image))
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)


DecodedRow = tuple[int, "np.ndarray | None", "np.ndarray | None", str]


def _decode_task(task: tuple[int, str, int]) -> DecodedRow:
    """Worker: (row, path, size) -> (row, CHW pixels or None, per-channel sums of the values
    and of their squares (2, 3), the error when unreadable)."""
    row, path, size = task
    try:
        pixels = np.ascontiguousarray(decode_at_size(Path(path), size).transpose(2, 0, 1))
    except _UNREADABLE as error:
        return row, None, None, f"{type(error).__name__}: {error}"
    flat = pixels.reshape(3, -1).astype(np.int64)
    return row, pixels, np.stack([flat.sum(axis=1), (flat * flat).sum(axis=1)]), ""


@dataclass(frozen=True)
class FolderCache:
    """A complete cache folder: the images on disk and their index."""

    path: Path
    images: DiskImages
    labels: np.ndarray
    splits: np.ndarray
    readable: np.ndarray  # bool per image
    errors: list[str]  # "relative/path (error)" per unreadable image
    pixel_sums: np.ndarray  # (N, 3) float64: per image, the sums of each channel on [0, 1]
    pixel_squares: np.ndarray  # (N, 3) float64: the sums of squares


def open_folder_cache(images: ImageList, size: int, *, cache_dir: str | Path | None,
                      progress: bool, description: str, skip_unreadable: bool) -> FolderCache:
    """The cache of `images` at `size` px, decoded now unless a complete one exists.

    Unreadable images are counted and named in a DatasetError, and nothing is written, unless
    `skip_unreadable` (then they are marked in the index and left out by the caller)."""
    name = images.layout.root.resolve().name or "images"
    folder = (resolve_cache_dir(cache_dir) / "image-folders"
              / f"{name}-{size}px-{_CACHE_VERSION}-{images.content_key()[:20]}")
    cache = _read_cache(folder, len(images.paths), size)
    if cache is None:
        cache = _build_cache(images, size, folder, progress, description, skip_unreadable)
    if not skip_unreadable and not cache.readable.all():
        raise unreadable_error(images.layout.root, cache.errors, len(images.paths))
    return cache


def unreadable_error(root: Path, errors: Sequence[str], total: int) -> DatasetError:
    shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
    return DatasetError(
        f"{root}: {len(errors)} of {total} image files cannot be read: {shown}. Nothing was "
        "written. Fix or remove them, or pass --skip-unreadable to leave them out (the run's "
        "config.json then counts them).")


def _read_cache(folder: Path, count: int, size: int) -> FolderCache | None:
    if not (folder / "index.npz").is_file():
        return None
    try:
        disk = DiskImages(folder / "images.npy")
        with np.load(folder / "index.npz", allow_pickle=False) as index:
            arrays = {key: index[key] for key in index.files}
        if tuple(disk.shape) != (count, 3, size, size) or len(arrays["labels"]) != count:
            raise DatasetError(f"shape {tuple(disk.shape)}, expected {(count, 3, size, size)}")
        return FolderCache(folder, disk, arrays["labels"], arrays["splits"],
                           arrays["readable"], [str(e) for e in arrays["errors"]],
                           arrays["pixel_sums"], arrays["pixel_squares"])
    except Exception as error:  # any damage means: decode again
        warnings.warn(f"ignoring unusable image cache {folder} ({error}); rebuilding it",
                      stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _workers(count: int) -> int:
    """Worker processes for decoding: every core this process may use, none for a few files."""
    return min(len(os.sched_getaffinity(0)), count // 256)


def _build_cache(images: ImageList, size: int, folder: Path, progress: bool,
                 description: str, skip_unreadable: bool) -> FolderCache:
    count = len(images.paths)
    created = [p for p in (folder.parent, folder.parent.parent) if not p.exists()]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        writer = NpyRowWriter(tmp / "images.npy", count, (3, size, size))
        readable = np.ones(count, dtype=bool)
        errors: list[str] = []
        sums = np.zeros((count, 3))
        squares = np.zeros((count, 3))
        tasks = [(row, str(path), size) for row, path in enumerate(images.paths)]
        workers = _workers(count)
        pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
        try:
            results = (pool.imap_unordered(_decode_task, tasks, chunksize=64) if pool
                       else map(_decode_task, tasks))
            for row, pixels, moments, error in tqdm(results, total=count, desc=description,
                                                    unit="img", disable=not progress):
                if pixels is None:
                    readable[row] = False
                    rel = images.paths[row].relative_to(images.layout.root).as_posix()
                    errors.append(f"{rel} ({error})")
                    continue
                writer.write(row, pixels)
                sums[row] = moments[0] / 255.0
                squares[row] = moments[1] / (255.0 * 255.0)
        finally:
            writer.close()
            if pool is not None:
                pool.terminate()
        errors.sort()
        if errors and not skip_unreadable:
            raise unreadable_error(images.layout.root, errors, count)
        np.savez(tmp / "index.npz", labels=images.labels, splits=images.splits,
                 readable=readable, errors=np.array(errors, dtype=str),
                 paths=np.array([p.relative_to(images.layout.root).as_posix()
                                 for p in images.paths], dtype=str),
                 pixel_sums=sums, pixel_squares=squares)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same cache first: use theirs
            if not (folder / "index.npz").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not folder.exists():  # failed: leave no trace, not even the folders made for it
            for path in created:
                try:
                    path.rmdir()
                except OSError:
                    pass
    cache = _read_cache(folder, count, size)
    if cache is None:
        raise DatasetError(f"{folder}: the image cache just written cannot be read")
    return cache
