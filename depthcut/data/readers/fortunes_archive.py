"""The fortunes archive: fortune-cookie texts as byte tokens, labelled by language or topic.

The archive holds ``fortunes/<language>/<topic file>``: plain text, one text after another, each
ended by a line holding only ``%``; the licences are in ``fortunes/COPYRIGHT/`` (skipped). Two
tasks:

- ``lang``: the language folder of a text (cs, de, en, eo, es, it, pt in the real archive: 7
  classes, unbalanced).
- ``topic``: the topic file an English text comes from, among the `TOPICS` (10) English files
  with the most distinct texts (ties: by name). In the real archive: people, definitions,
  cookie, computers, songs-poems, politics, miscellaneous, work, science, men-women.

Every text is decoded as UTF-8, or, where that fails, as ISO-8859-2 (`FALLBACK_ENCODING`:
Czech's 8-bit encoding, which decodes any byte string), text by text; such texts are counted.
Then, as every text dataset (`depthcut.data.readers.bytes_tokens`): whitespace collapsed (a
text left empty is skipped and counted), cut to the first 64 bytes of its UTF-8, byte tokens
with padding id 0, each distinct text kept once (one under two labels dropped), the test split
by SHA-256 bucket, texts stored in SHA-256 order.
"""

from __future__ import annotations

import tarfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from depthcut.data.errors import DatasetError
from depthcut.data.readers.bytes_tokens import (  # noqa: F401  (this module's API too)
    BYTE_OFFSET,
    MAX_BYTES,
    PAD_ID,
    TEST_PERCENT,
    VOCAB_SIZE,
    Distinct,
    distinct_texts,
    in_test_split,
    normalize,
    split_arrays,
    tokens,
)

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


def label_texts(texts: list[Text], task: str, stats: dict) -> tuple[Distinct, list[str]]:
    """(the distinct texts and their labels, classes) for `task` ("lang" or "topic"): texts
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
    kept = distinct_texts([(text.data, getattr(text, key)) for text in texts], classes)
    stats["duplicates_dropped"] = kept.duplicates_dropped
    stats["conflicts_dropped"] = kept.conflicts_dropped
    if task == "topic":
        stats["topics"] = classes
    return kept, classes


def build_arrays(path: Path, task: str, max_bytes: int = MAX_BYTES) -> dict[str, np.ndarray]:
    """The cacheable arrays of one task: tokens and labels per split, classes, stats (JSON)."""
    texts, stats = read_archive(path, max_bytes)
    kept, classes = label_texts(texts, task, stats)
    return split_arrays(kept, classes, stats, max_bytes, path)
