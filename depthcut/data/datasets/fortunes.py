"""Text datasets from ``fortunes.tar.gz`` as byte tokens: ``fortunes-lang`` and ``fortunes-topic``.

- ``fortunes-lang`` ("fortunes (language)"): the language folder of a text.
- ``fortunes-topic`` ("fortunes (English topic)"): the English topic file a text comes from.

How texts are read, deduplicated, split and tokenised: `depthcut.data.readers.fortunes_archive`.
Validation is carved from the training split by `depthcut.data.make_splits`, as for images. The
arrays are built once per archive and cached (``$DEPTHCUT_CACHE`` or ``~/.cache/depthcut``,
keyed by the archive's SHA-256).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch

from depthcut.data.arrays import TOKENS, TokenDataset
from depthcut.data.cache import (
    check_splits,
    read_cache,
    resolve_cache_dir,
    sha256_file,
    write_cache,
)
from depthcut.data.errors import DatasetError
from depthcut.data.readers import fortunes_archive
from depthcut.data.readers.fortunes_archive import MAX_BYTES, PAD_ID, VOCAB_SIZE
from depthcut.data.registry import DatasetSpec, register

ARCHIVE = "fortunes.tar.gz"
_CACHE_VERSION = "v2"  # bump when the cached arrays' meaning changes
_CACHE_KEYS = ("train_tokens", "train_labels", "test_tokens", "test_labels", "classes", "stats")


def _layouts(root: Path) -> list[str]:
    return [f"{root / ARCHIVE} (fortunes/<language>/<topic file> inside, texts separated by "
            "lines holding only %)"]


def _read_cache(path: Path, max_bytes: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None if absent or unusable (then they are built again)."""

    def check(arrays: dict[str, np.ndarray]) -> None:
        check_splits(arrays, "tokens",
                     lambda a: a.dtype == np.int16 and a.ndim == 2 and a.shape[1] == max_bytes)
        json.loads(str(arrays["stats"]))

    return read_cache(path, _CACHE_KEYS, check)


def load_fortunes(spec: DatasetSpec, root: Path, *, task: str,
                  cache_dir: str | Path | None = None, progress: bool = True,
                  max_bytes: int = MAX_BYTES) -> TokenDataset:
    """Task `task` ("lang" or "topic") from ``root/fortunes.tar.gz`` (cached); texts cut to
    their first `max_bytes` bytes."""
    if max_bytes < 1:
        raise DatasetError(f"max_bytes must be >= 1, got {max_bytes}")
    archive = root / ARCHIVE
    if not archive.is_file():
        raise spec.not_found(root)
    digest = sha256_file(archive)
    cache = (resolve_cache_dir(cache_dir)
             / f"{spec.key}-{_CACHE_VERSION}-{max_bytes}-{digest[:40]}.npz")
    arrays = _read_cache(cache, max_bytes)
    if arrays is None:
        arrays = fortunes_archive.build_arrays(archive, task, max_bytes)
        write_cache(cache, arrays)
    stats = json.loads(str(arrays["stats"]))
    stats["cache"] = str(cache)
    return TokenDataset(
        name=spec.display_name,
        train_inputs=torch.from_numpy(arrays["train_tokens"].astype(np.int64)),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        test_inputs=torch.from_numpy(arrays["test_tokens"].astype(np.int64)),
        test_labels=torch.from_numpy(arrays["test_labels"]),
        classes=[str(c) for c in arrays["classes"]],
        vocab_size=VOCAB_SIZE,
        pad_id=PAD_ID,
        stats=stats,
    )


# What a preset becomes on these texts: the byte-level transformer (the one model that reads
# tokens) and, for quick, SGD settings that trained it here in minutes: a one-epoch warm-up (it
# serves every training, so a one-epoch finetune ramps up to finetune_lr), lr 0.2 (0.3 trained
# the language model to 76% instead of 91% in 6 epochs, and the topic model not at all; 0.1 was
# slower), 16,000 of the ~47,000 language training texts for 6 epochs, all ~6,000 topic texts
# for 15 (the topic model learns slowly: 10-15% for 7 epochs, then 36-40%).
_QUICK = {"model": "transformer", "epochs": 6, "lr": 0.2, "warmup_epochs": 1.0,
          "finetune_epochs": 1, "finetune_lr": 0.04, "max_stages": 4, "rounds": 3,
          "slope_epochs": 1, "slope_lr": 0.04}
_PAPER = {"model": "transformer"}

_HINT = (f"put {ARCHIVE} (the texts of Debian's fortune-cookie packages, see the data "
         "README) in root.")

LANGUAGE = register(DatasetSpec(
    key="fortunes-lang",
    display_name="fortunes (language)",
    kind=TOKENS,
    sample_shape=(MAX_BYTES,),
    layouts=_layouts,
    hint=_HINT,
    loader=partial(load_fortunes, task="lang"),
    presets={"quick": {**_QUICK, "train_subset": 16000}, "paper": _PAPER},
))
TOPIC = register(DatasetSpec(
    key="fortunes-topic",
    display_name="fortunes (English topic)",
    kind=TOKENS,
    sample_shape=(MAX_BYTES,),
    layouts=_layouts,
    hint=_HINT,
    loader=partial(load_fortunes, task="topic"),
    presets={"quick": {**_QUICK, "epochs": 15}, "paper": _PAPER},
))
