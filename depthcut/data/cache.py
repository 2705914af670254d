"""The cache of decoded dataset arrays: where it lives, content keys, checked reads, atomic writes.

Decoding a dataset (JPEGs, a text archive) can take minutes; its arrays are saved once as
``.npz`` under ``$DEPTHCUT_CACHE`` (or ``~/.cache/depthcut``), in a file whose name carries a key
of the source's content, so a changed source is decoded again and a damaged file is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from depthcut.data.errors import DatasetError

CACHE_ENV = "DEPTHCUT_CACHE"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """`cache_dir`, else ``$DEPTHCUT_CACHE``, else ``~/.cache/depthcut``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "depthcut"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_folder(folder: Path, subfolders: Sequence[str]) -> str:
    """Cheap content key for the files under ``folder/<subfolder>``: relative paths, sizes and
    mtimes (not the bytes, which would cost as much as decoding them)."""
    digest = hashlib.sha256()
    for subfolder in subfolders:
        for path in sorted((folder / subfolder).rglob("*")):
            if path.is_file():
                stat = path.stat()
                rel = path.relative_to(folder).as_posix()
                digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


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


def write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
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
