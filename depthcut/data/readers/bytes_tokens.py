"""Labelled texts as byte tokens: the one tokenizer, dedupe rule and hash split of every text
dataset (the fortunes archive, a user's JSONL or CSV file), so they all read texts alike.

1. A text is normalised: whitespace runs collapsed to one space, encoded as UTF-8, cut to its
   first `MAX_BYTES` (64) bytes: what the model sees, and the text's identity.
2. Tokens: byte value + 1 (`BYTE_OFFSET`), so id 0 (`PAD_ID`) is free for padding; every row is
   as long as the cap, padded with 0 at the end; the vocabulary has 257 ids.
3. Dedupe: each distinct text is kept once; one found under two labels is dropped.
4. Split: a text is in the test split when its SHA-256 falls in `TEST_PERCENT` (20) of 100
   buckets (unless the source assigns sides itself), so a text and its copies are always on one
   side. Within a split texts are stored in the order of their SHA-256, so the first N texts
   are a fair sample of the classes.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from depthcut.data.arrays import TokenDataset
from depthcut.data.cache import check_splits, read_cache
from depthcut.data.errors import DatasetError

PAD_ID = 0
BYTE_OFFSET = 1  # token id = byte value + 1
VOCAB_SIZE = 256 + BYTE_OFFSET
# Texts are cut to their first 64 bytes (UTF-8, whitespace collapsed): a language shows in a
# few words; a topic would gain from more, but attention grows with the square of the length
# (a training step at 128 bytes took about 5x the time of one at 64 on this 2-core CPU).
MAX_BYTES = 64
TEST_PERCENT = 20  # share of the hash buckets that form the test split


@dataclass(frozen=True)
class Distinct:
    """The distinct texts of a source and their labels (indices into `classes`)."""

    texts: list[bytes]
    labels: list[int]
    duplicates_dropped: int  # copies of a text already seen
    conflicts_dropped: int  # distinct texts found under two labels


def normalize(text: str) -> bytes:
    """Whitespace runs collapsed to one space, encoded as UTF-8 (not cut yet)."""
    return " ".join(text.split()).encode("utf-8")


def in_test_split(data: bytes) -> bool:
    """A text's side, from its bytes alone: SHA-256 bucket < TEST_PERCENT of 100."""
    bucket = int.from_bytes(hashlib.sha256(data).digest()[:8], "big") % 100
    return bucket < TEST_PERCENT


def tokens(texts: Sequence[bytes], max_bytes: int = MAX_BYTES) -> np.ndarray:
    """int16 (N, max_bytes): byte + BYTE_OFFSET, PAD_ID after the end of each text."""
    out = np.full((len(texts), max_bytes), PAD_ID, dtype=np.int16)
    for row, data in enumerate(texts):
        values = np.frombuffer(data[:max_bytes], dtype=np.uint8)
        out[row, : len(values)] = values.astype(np.int16) + BYTE_OFFSET
    return out


def distinct_texts(labelled: Sequence[tuple[bytes, str]], classes: Sequence[str]) -> Distinct:
    """Each text once, in order of first sight, labelled by its class index; texts found under
    two labels dropped. Every label must be one of `classes`."""
    labels: dict[bytes, set[str]] = defaultdict(set)
    order: list[bytes] = []
    for data, label in labelled:
        if data not in labels:
            order.append(data)
        labels[data].add(label)
    index = {name: i for i, name in enumerate(classes)}
    kept = [data for data in order if len(labels[data]) == 1]
    return Distinct(texts=kept, labels=[index[next(iter(labels[data]))] for data in kept],
                    duplicates_dropped=len(labelled) - len(order),
                    conflicts_dropped=len(order) - len(kept))


def split_arrays(distinct: Distinct, classes: Sequence[str], stats: dict, max_bytes: int,
                 source: object, in_test: Callable[[bytes], bool] = in_test_split
                 ) -> dict[str, np.ndarray]:
    """The cacheable arrays: tokens and int64 labels per split (texts in SHA-256 order), the
    class names and `stats` as JSON (with each split's size added). `in_test(text)` says a
    text's side; a split left empty is an error naming `source`."""
    kept, labels = distinct.texts, distinct.labels
    # Stored in the order of their hashes, not the source's (which may run class by class):
    # so the first N texts of a split (`depthcut entropy --samples N`) are a fair sample.
    order = sorted(range(len(kept)), key=lambda i: hashlib.sha256(kept[i]).digest())
    kept, labels = [kept[i] for i in order], [labels[i] for i in order]
    test = np.array([in_test(data) for data in kept], dtype=bool)
    label_array = np.array(labels, dtype=np.int64)
    token_array = tokens(kept, max_bytes)
    arrays = {"classes": np.array(list(classes))}
    for split, rows in (("train", ~test), ("test", test)):
        if not rows.any():
            raise DatasetError(f"{source}: no {split} texts after the split ({len(kept)} "
                               "distinct texts): too few texts")
        arrays[f"{split}_tokens"] = token_array[rows]
        arrays[f"{split}_labels"] = label_array[rows]
        stats[split] = int(rows.sum())
    arrays["stats"] = np.array(json.dumps(stats))
    return arrays


CACHE_KEYS = ("train_tokens", "train_labels", "test_tokens", "test_labels", "classes", "stats")


def read_cached(path: Path, max_bytes: int) -> dict[str, np.ndarray] | None:
    """The cached arrays of `split_arrays`, or None if absent or unusable (then they are built
    again)."""

    def check(arrays: dict[str, np.ndarray]) -> None:
        check_splits(arrays, "tokens",
                     lambda a: a.dtype == np.int16 and a.ndim == 2 and a.shape[1] == max_bytes)
        json.loads(str(arrays["stats"]))

    return read_cache(path, CACHE_KEYS, check)


def token_dataset(arrays: dict[str, np.ndarray], name: str, cache: Path) -> TokenDataset:
    """The `TokenDataset` of `split_arrays`' arrays; its stats name the cache file."""
    stats = json.loads(str(arrays["stats"]))
    stats["cache"] = str(cache)
    return TokenDataset(
        name=name,
        train_inputs=torch.from_numpy(arrays["train_tokens"].astype(np.int64)),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        test_inputs=torch.from_numpy(arrays["test_tokens"].astype(np.int64)),
        test_labels=torch.from_numpy(arrays["test_labels"]),
        classes=[str(c) for c in arrays["classes"]],
        vocab_size=VOCAB_SIZE,
        pad_id=PAD_ID,
        stats=stats,
    )
