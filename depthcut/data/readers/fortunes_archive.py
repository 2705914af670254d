"""The fortunes archive: fortune-cookie texts as byte tokens, labelled by language or topic.

The archive holds ``fortunes/<language>/<topic file>``: plain text, one text after another, each
ended by a line holding only ``%``; the licences are in ``fortunes/COPYRIGHT/`` (skipped). Two
tasks:

- ``lang``: the language folder of a text (cs, de, en, eo, es, it, pt in the real archive: 7
  classes, unbalanced).
- ``topic``: the topic file an English text comes from, among the `TOPICS` (10) English files
  with the most distinct texts (ties: by name). In the real archive: people, definitions,
  cookie, computers, songs-poems, politics, miscellaneous, work, science, men-women.

Every text is read the same way:

1. Decoded as UTF-8, or, where that fails, as ISO-8859-2 (`FALLBACK_ENCODING`: Czech's 8-bit
   encoding, which decodes any byte string), text by text; such texts are counted.
2. Whitespace runs (indentation, line breaks, the tab before "-- Author") collapsed to one
   space; a text left empty is skipped and counted.
3. Encoded as UTF-8 and cut to its first `MAX_BYTES` (64) bytes: what the model sees (a
   language shows in a few words; a topic would gain from more, at 4-5x the CPU time for 128).
4. Tokens: byte value + 1 (`BYTE_OFFSET`), so id 0 (`PAD_ID`) is free for padding; every row is
   as long as the cap, padded with 0 at the end; the vocabulary has 257 ids.

Deduplication and split: two texts are the same when their (cut) bytes are. Each distinct text
is kept once; one found under two labels (say, a quote in two topic files) is dropped. The test
split is every distinct text whose SHA-256 falls in `TEST_PERCENT` (20) of 100 buckets, so a
text and its copies are always on one side, whatever the order or the rest of the archive.
Within a split the texts are stored in the order of their SHA-256 (languages and topics mixed,
so the first N texts are a fair sample).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from depthcut.data.errors import DatasetError

PAD_ID = 0
BYTE_OFFSET = 1  # token id = byte value + 1
VOCAB_SIZE = 256 + BYTE_OFFSET
# Texts are cut to their first 64 bytes (UTF-8, whitespace collapsed): a language shows in a
# few words; a topic would gain from more, but attention grows with the square of the length
# (a training step at 128 bytes took about 5x the time of one at 64 on this 2-core CPU).
MAX_BYTES = 64
TEST_PERCENT = 20  # share of the hash buckets that form the test split
TOPICS = 10  # the topic task: the English topic files with the most distinct texts
TOPIC_LANGUAGE = "en"
FALLBACK_ENCODING = "iso-8859-2"
SKIPPED_FOLDERS = ("COPYRIGHT",)


@dataclass
class Text:
    language: str
    topic: str
    data: bytes  # normalised UTF-8, cut to max_bytes: what the model sees, and the text's key


def split_texts(raw: bytes) -> list[bytes]:
    """A fortune file's texts: the lines between lines holding only ``%`` (a last text without
    its ``%`` counts too)."""
    texts, lines = [], []
    for line in raw.split(b"\n"):
        if line.strip() == b"%":
            texts.append(b"\n".join(lines))
            lines = []
        else:
            lines.append(line)
    if any(line.strip() for line in lines):
        texts.append(b"\n".join(lines))
    return texts


def decode(raw: bytes) -> tuple[str, bool]:
    """(text, whether the fallback encoding was needed): UTF-8, else ISO-8859-2."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode(FALLBACK_ENCODING, errors="replace"), True


def normalize(text: str) -> bytes:
    """Whitespace runs collapsed to one space, encoded as UTF-8 (not cut yet)."""
    return " ".join(text.split()).encode("utf-8")


def read_archive(path: Path, max_bytes: int = MAX_BYTES) -> tuple[list[Text], dict]:
    """Every non-empty text of the archive (members in name order, texts in file order), and
    what was skipped: empty texts, texts decoded with the fallback, binary or unreadable files."""
    stats: dict = {"files": 0, "texts_read": 0, "empty_texts": 0, "fallback_texts": 0,
                   "fallback_files": [], "skipped_files": [], "cut_texts": 0}
    texts: list[Text] = []
    try:
        with tarfile.open(path, "r:*") as archive:
            members = sorted((m for m in archive.getmembers() if m.isfile()),
                             key=lambda m: m.name)
            for member in members:
                parts = [p for p in PurePosixPath(member.name).parts if p not in (".", "/")]
                if len(parts) != 3 or parts[0] != "fortunes" or parts[1] in SKIPPED_FOLDERS:
                    continue
                _, language, topic = parts
                if topic.startswith("."):
                    continue
                handle = archive.extractfile(member)
                raw = handle.read() if handle is not None else b""
                if b"\0" in raw:  # a binary file (e.g. a strfile .dat index), not texts
                    stats["skipped_files"].append(f"{language}/{topic} (binary)")
                    continue
                stats["files"] += 1
                found = 0
                for chunk in split_texts(raw):
                    text, fallback = decode(chunk)
                    data = normalize(text)
                    if not data:
                        stats["empty_texts"] += 1
                        continue
                    if fallback:
                        stats["fallback_texts"] += 1
                        name = f"{language}/{topic}"
                        if name not in stats["fallback_files"]:
                            stats["fallback_files"].append(name)
                    stats["cut_texts"] += len(data) > max_bytes
                    texts.append(Text(language, topic, data[:max_bytes]))
                    found += 1
                if not found:
                    stats["skipped_files"].append(f"{language}/{topic} (no text)")
                stats["texts_read"] += found
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: cannot read the fortunes archive ({error}); expected a "
                           "tar.gz of fortunes/<language>/<topic file>") from error
    if not texts:
        raise DatasetError(f"{path}: no texts in fortunes/<language>/<topic file> (texts "
                           "separated by lines holding only %)")
    return texts, stats


def in_test_split(data: bytes) -> bool:
    """A text's side, from its bytes alone: SHA-256 bucket < TEST_PERCENT of 100."""
    bucket = int.from_bytes(hashlib.sha256(data).digest()[:8], "big") % 100
    return bucket < TEST_PERCENT


def label_texts(texts: list[Text], task: str, stats: dict) -> tuple[list[bytes], list[int],
                                                                    list[str]]:
    """(distinct texts, labels, classes) for `task` ("lang" or "topic"): deduplicated, texts
    under two labels dropped; counts go to `stats`."""
    if task == "topic":
        texts = [t for t in texts if t.language == TOPIC_LANGUAGE]
        if not texts:
            raise DatasetError(f"no {TOPIC_LANGUAGE} texts (fortunes/{TOPIC_LANGUAGE}/) for the "
                               "English topic task")
        distinct: dict[str, set[bytes]] = defaultdict(set)
        for text in texts:
            distinct[text.topic].add(text.data)
        ranked = sorted(distinct, key=lambda topic: (-len(distinct[topic]), topic))
        classes = sorted(ranked[:TOPICS])
        texts = [t for t in texts if t.topic in classes]
        key = "topic"
    else:
        classes = sorted({text.language for text in texts})
        key = "language"
    if len(classes) < 2:
        raise DatasetError(f"only one class ({', '.join(classes)}) for the {task} task: a "
                           "classifier needs at least two")
    labels: dict[bytes, set[str]] = defaultdict(set)
    order: list[bytes] = []
    for text in texts:
        if text.data not in labels:
            order.append(text.data)
        labels[text.data].add(getattr(text, key))
    index = {name: i for i, name in enumerate(classes)}
    kept = [data for data in order if len(labels[data]) == 1]
    stats["duplicates_dropped"] = len(texts) - len(order)
    stats["conflicts_dropped"] = len(order) - len(kept)
    if task == "topic":
        stats["topics"] = classes
    return kept, [index[next(iter(labels[data]))] for data in kept], classes


def tokens(texts: list[bytes], max_bytes: int = MAX_BYTES) -> np.ndarray:
    """int16 (N, max_bytes): byte + BYTE_OFFSET, PAD_ID after the end of each text."""
    out = np.full((len(texts), max_bytes), PAD_ID, dtype=np.int16)
    for row, data in enumerate(texts):
        values = np.frombuffer(data[:max_bytes], dtype=np.uint8)
        out[row, : len(values)] = values.astype(np.int16) + BYTE_OFFSET
    return out


def build_arrays(path: Path, task: str, max_bytes: int = MAX_BYTES) -> dict[str, np.ndarray]:
    """The cacheable arrays of one task: tokens and labels per split, classes, stats (JSON)."""
    texts, stats = read_archive(path, max_bytes)
    kept, labels, classes = label_texts(texts, task, stats)
    # Stored in the order of their hashes, not the archive's (which runs language by language):
    # so the first N texts of a split (`depthcut entropy --samples N`) are a fair sample.
    order = sorted(range(len(kept)), key=lambda i: hashlib.sha256(kept[i]).digest())
    kept, labels = [kept[i] for i in order], [labels[i] for i in order]
    test = np.array([in_test_split(data) for data in kept], dtype=bool)
    label_array = np.array(labels, dtype=np.int64)
    token_array = tokens(kept, max_bytes)
    arrays = {"classes": np.array(classes)}
    for split, rows in (("train", ~test), ("test", test)):
        if not rows.any():
            raise DatasetError(f"{path}: no {split} texts after the hash split ({len(kept)} "
                               "distinct texts): the archive is too small")
        arrays[f"{split}_tokens"] = token_array[rows]
        arrays[f"{split}_labels"] = label_array[rows]
        stats[split] = int(rows.sum())
    arrays["stats"] = np.array(json.dumps(stats))
    return arrays
