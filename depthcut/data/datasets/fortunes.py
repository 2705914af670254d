"""Text datasets from ``fortunes.tar.gz`` as byte tokens: ``fortunes-lang`` and ``fortunes-topic``.

- ``fortunes-lang`` ("fortunes (language)"): the language folder of a text.
- ``fortunes-topic`` ("fortunes (English topic)"): the English topic file a text comes from.

How texts are read, deduplicated, split and tokenised: `depthcut.data.readers.fortunes_archive`.
Validation is carved from the training split by `depthcut.data.make_splits`, as for images. The
arrays are built once per archive and cached (``$DEPTHCUT_CACHE`` or ``~/.cache/depthcut``,
keyed by the archive's SHA-256).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from depthcut.data.arrays import TOKENS, TokenDataset
from depthcut.data.cache import resolve_cache_dir, sha256_file, write_cache
from depthcut.data.errors import DatasetError
from depthcut.data.readers import fortunes_archive
from depthcut.data.readers.bytes_tokens import MAX_BYTES, read_cached, token_dataset
from depthcut.data.registry import DatasetSpec, register
from depthcut.transfer import TRANSFER_PRESETS

ARCHIVE = "fortunes.tar.gz"
_CACHE_VERSION = "v2"  # bump when the cached arrays' meaning changes


def _layouts(root: Path) -> list[str]:
    return [f"{root / ARCHIVE} (fortunes/<language>/<topic file> inside, texts separated by "
            "lines holding only %)"]


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
    arrays = read_cached(cache, max_bytes)
    if arrays is None:
        arrays = fortunes_archive.build_arrays(archive, task, max_bytes)
        write_cache(cache, arrays)
    return token_dataset(arrays, spec.display_name, cache)


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
# Every text dataset's overlay (`depthcut.data.datasets.textfile` too): quick as above, the
# byte-level transformer under every other preset.
TEXT_PRESETS = {"quick": _QUICK, "paper": _PAPER, **{name: _PAPER for name in TRANSFER_PRESETS}}

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
    presets={**TEXT_PRESETS, "quick": {**_QUICK, "train_subset": 16000}},
))
TOPIC = register(DatasetSpec(
    key="fortunes-topic",
    display_name="fortunes (English topic)",
    kind=TOKENS,
    sample_shape=(MAX_BYTES,),
    layouts=_layouts,
    hint=_HINT,
    loader=partial(load_fortunes, task="topic"),
    presets={**TEXT_PRESETS, "quick": {**_QUICK, "epochs": 15}},
))
