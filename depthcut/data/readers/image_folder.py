"""Encoded images (JPEG, PNG) in an ImageFolder layout: ``train/<class>/*`` and
``test/<class>/*``, in a ``.tar.gz`` archive (read in place, no extraction) or an extracted folder.

Decoded once into uint8 (N, 3, H, W) arrays and cached, keyed by the source's content. The
reader knows no dataset: the archive and folder names, the name shown while decoding and the
cache file's name come from the dataset file that uses it.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image
from tqdm import tqdm

from depthcut.data.cache import (
    check_splits,
    hash_folder,
    read_cache,
    resolve_cache_dir,
    sha256_file,
    write_cache,
)
from depthcut.data.errors import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
_CACHE_VERSION = "v1"  # bump when the cached arrays' meaning changes, so old files are not used
_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classes")

# (split, class name, file name) -> encoded bytes or the path to read them from
ImageFiles = dict[tuple[str, str, str], bytes | Path]


@dataclass(frozen=True)
class ImageFolderSource:
    """Where the images are: an archive or a folder holding train/ and test/."""

    path: Path
    is_archive: bool
    content_key: str  # "archive-<SHA-256>" or "folder-<hash of names, sizes, mtimes>"


def find_source(root: Path, archive_name: str, folder_name: str) -> ImageFolderSource | None:
    """``root/archive_name``, else the first of ``root/folder_name`` and `root` that holds
    train/ and test/; None when neither is there."""
    archive = root / archive_name
    folders = [f for f in (root / folder_name, root) if (f / "train").is_dir()]
    folder = next((f for f in folders if (f / "test").is_dir()), None)
    if archive.is_file():
        return ImageFolderSource(archive, True, "archive-" + sha256_file(archive))
    if folder is not None:
        return ImageFolderSource(folder, False, "folder-" + hash_folder(folder, SPLITS))
    return None


def read_image_folder(source: ImageFolderSource, *, cache_name: str, display_name: str,
                      cache_dir: str | Path | None, progress: bool) -> dict[str, np.ndarray]:
    """The decoded arrays (train/test images and labels, classes), from the cache when it holds
    them; `display_name` labels the progress bar."""
    cache_path = (resolve_cache_dir(cache_dir)
                  / f"{cache_name}-{_CACHE_VERSION}-{source.content_key[:40]}.npz")
    arrays = read_cache(cache_path, _CACHE_KEYS, lambda arrays: check_splits(
        arrays, "images", lambda a: a.dtype == np.uint8 and a.ndim == 4 and a.shape[1] == 3))
    if arrays is None:
        files = archive_files(source.path) if source.is_archive else folder_files(source.path)
        arrays = decode_image_folder(files, source.path, progress, f"decoding {display_name}")
        write_cache(cache_path, arrays)
    return arrays


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def archive_files(archive: Path) -> ImageFiles:
    """Read every image member's bytes in one streaming pass (no extraction to disk)."""
    files: ImageFiles = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = PurePosixPath(member.name.lstrip("/")).parts
                parts = tuple(p for p in parts if p != ".")
                if len(parts) == 4:  # one top-level folder around train/ and test/
                    parts = parts[1:]
                if len(parts) != 3 or parts[0] not in SPLITS:
                    continue
                if not is_image_name(parts[2]) or parts[1].startswith("."):
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


def folder_files(folder: Path) -> ImageFiles:
    files: ImageFiles = {}
    for split in SPLITS:
        for class_dir in sorted((folder / split).iterdir()):
            if not class_dir.is_dir() or class_dir.name.startswith("."):
                continue
            for path in class_dir.iterdir():
                if path.is_file() and is_image_name(path.name):
                    files[(split, class_dir.name, path.name)] = path
    if not files:
        raise DatasetError(f"{folder}: no images in train/<class>/ or test/<class>/")
    return files


def decode_image(data: bytes) -> np.ndarray:
    """One encoded image -> (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def decode_image_folder(files: ImageFiles, source: Path, progress: bool,
                        description: str) -> dict[str, np.ndarray]:
    """ImageFolder semantics: classes are the sorted train folders, files sorted by name."""
    classes = sorted({cls for split, cls, _ in files if split == "train"})
    if not classes:
        raise DatasetError(f"{source}: no training images (train/<class>/*.jpg)")
    unknown = sorted({cls for _, cls, _ in files} - set(classes))
    if unknown:
        raise DatasetError(f"{source}: test classes {unknown} have no train folder")
    index = {cls: i for i, cls in enumerate(classes)}
    arrays: dict[str, np.ndarray] = {"classes": np.array(classes)}
    bar = tqdm(total=len(files), desc=description, unit="img", disable=not progress)
    with bar:
        shape = None
        for split in SPLITS:
            keys = sorted((k for k in files if k[0] == split), key=lambda k: (index[k[1]], k[2]))
            images = None
            for i, key in enumerate(keys):
                entry = files[key]
                try:
                    data = entry.read_bytes() if isinstance(entry, Path) else entry
                    pixels = decode_image(data)
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
