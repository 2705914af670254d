"""A user's labelled texts in one file, JSON Lines or CSV, as byte-token arrays.

Every row must hold a text and a label (fields named by the caller: ``text`` and ``label`` by
default); the file is read whole before anything is built, and every bad row is counted and
named by its line, so a bad file fails with one paragraph (`DatasetError`) and nothing is
cached or written:

- JSON Lines (``.jsonl``, ``.ndjson``, ``.json``): one JSON object per line, UTF-8; blank
  lines are skipped. CSV (``.csv``): UTF-8, comma-separated, a header row naming the fields.
  Another suffix: JSON Lines when the first line starts with ``{``, CSV when its header names
  the text field, else neither.
- A text is a string; a label a string or an integer (a CSV's are strings). Class names are the
  label values as strings, in sorted order (numerically when every one is an integer).
- An optional ``split`` field (`SPLIT_FIELD`, ``train`` or ``test`` in every row) fixes each
  text's side; a text listed under both is kept in test only. Without it, the hash split of
  every text dataset (`depthcut.data.readers.bytes_tokens`), whose tokenizer, cap, dedupe and
  conflicting-label rule apply too.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from depthcut.data.errors import DatasetError
from depthcut.data.readers.bytes_tokens import (
    MAX_BYTES,
    distinct_texts,
    normalize,
    split_arrays,
)

JSONL, CSV = "JSON Lines", "CSV"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)
SPLIT_FIELD = "split"
SPLITS = ("train", "test")
NAMED_LINES = 5  # lines named in a message; the rest are counted


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the file (a CSV record's last line)
    text: str
    label: str
    split: str | None


@dataclass
class Problems:
    """Bad rows by kind ("rows without 'label'"), each with the lines it was found on."""

    kinds: dict[str, list[int]] = field(default_factory=dict)

    def add(self, kind: str, line: int) -> None:
        self.kinds.setdefault(kind, []).append(line)

    def message(self, path: Path) -> str | None:
        if not self.kinds:
            return None
        parts = [f"{kind}: {len(lines)} ({_lines(lines)})" for kind, lines in self.kinds.items()]
        return f"{path}: {'; '.join(parts)}. Fix or remove them."


def _lines(lines: list[int]) -> str:
    named = ", ".join(str(line) for line in lines[:NAMED_LINES])
    more = f" and {len(lines) - NAMED_LINES} more" if len(lines) > NAMED_LINES else ""
    return f"{'line' if len(lines) == 1 else 'lines'} {named}{more}"


def file_format(path: Path, first_line: str) -> str | None:
    """JSONL or CSV by the suffix, else by the first line (None: it looks like neither)."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return JSONL
    if suffix in CSV_SUFFIXES:
        return CSV
    if first_line.lstrip().startswith("{"):
        return JSONL
    return CSV if "," in first_line else None


def _decoded_lines(raw: bytes) -> Iterator[tuple[int, str | None]]:
    """(line number, text or None where it is not UTF-8), for every line of `raw`."""
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            yield number, line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            yield number, None


def _neither(path: Path, text_field: str, label_field: str, reason: str) -> DatasetError:
    return DatasetError(
        f"{path}: neither JSON Lines nor CSV ({reason}). Expected a .jsonl file with one JSON "
        f"object per line holding the fields {text_field!r} and {label_field!r}, or a .csv "
        "file whose header row names them.")


def _missing_field(path: Path, fmt: str, name: str, flag: str, found: list[str]) -> DatasetError:
    listed = ", ".join(repr(f) for f in found) if found else "none"
    return DatasetError(f"{path}: no field {name!r} in the {fmt} file (fields found: {listed}); "
                        f"name the field with {flag}.")


def _label_value(value: object) -> str | None:
    """A label as a class name, or None when it is no string or integer."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)


def _jsonl_records(lines: list[tuple[int, str | None]], problems: Problems
                   ) -> list[tuple[int, dict]]:
    records = []
    for number, line in lines:
        if line is None:
            problems.add("unreadable lines (not UTF-8)", number)
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            problems.add("unreadable lines (not one JSON object each)", number)
            continue
        records.append((number, record))
    return records


def _csv_records(path: Path, lines: list[tuple[int, str | None]], problems: Problems
                 ) -> tuple[list[str], list[tuple[int, dict]]]:
    bad = [number for number, line in lines if line is None]
    for number in bad:
        problems.add("unreadable lines (not UTF-8)", number)
    text = "\n".join(line if line is not None else "" for _, line in lines)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((row for row in reader if row), [])
        records = []
        for row in reader:
            if not row or reader.line_num in bad:
                continue
            if len(row) != len(header):
                problems.add(f"unreadable rows (not the header's {len(header)} fields each)",
                             reader.line_num)
                continue
            fields = (name.strip() for name in header)
            records.append((reader.line_num, dict(zip(fields, row, strict=True))))
    except csv.Error as error:
        raise DatasetError(f"{path}: cannot read the CSV file at line {reader.line_num} "
                           f"({error}); fix the quoting there.") from error
    return [name.strip() for name in header], records


def read_rows(path: Path, text_field: str = "text", label_field: str = "label"
              ) -> tuple[list[Row], str]:
    """Every row of the file, checked, and its format; DatasetError (one paragraph, the bad
    lines named) when the file or any row is bad."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read the file ({error})") from error
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (spreadsheet exports)
    if b"\0" in raw:
        raise _neither(path, text_field, label_field, "binary data: it holds NUL bytes")
    lines = list(_decoded_lines(raw))
    first = next((line for _, line in lines if line and line.strip()), None)
    if first is None and all(line is not None for _, line in lines):
        raise DatasetError(f"{path}: the file holds no rows (it is empty); expected labelled "
                           "texts as JSON Lines or CSV.")
    if (first or "").lstrip().startswith("["):
        raise _neither(path, text_field, label_field, "it holds a JSON array: write one object "
                       "per line instead")
    fmt = file_format(path, first or "")
    if fmt is None:
        raise _neither(path, text_field, label_field, "its first line is no JSON object and "
                       "no comma-separated header")
    problems = Problems()
    if fmt == JSONL:
        records = _jsonl_records(lines, problems)
        if not records:
            raise _neither(path, text_field, label_field, "no line is a JSON object in UTF-8")
        found = sorted({key for _, record in records for key in record})
    else:
        found, records = _csv_records(path, lines, problems)
    for name, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
        if name not in found:
            raise _missing_field(path, fmt, name, flag, found)
    with_split = SPLIT_FIELD in found
    rows = []
    for number, record in records:
        text, label = record.get(text_field), _label_value(record.get(label_field))
        label = label.strip() if label is not None else None
        split = record.get(SPLIT_FIELD) if with_split else None
        if text is None or record.get(label_field) is None:
            missing = [n for n in (text_field, label_field) if record.get(n) is None]
            problems.add(f"rows without {' and '.join(repr(n) for n in missing)}", number)
        elif not isinstance(text, str):
            problems.add(f"rows whose {text_field!r} is not a string", number)
        elif label is None:
            problems.add(f"rows whose {label_field!r} is neither a string nor an integer",
                         number)
        elif not normalize(text):
            problems.add(f"rows with an empty {text_field!r}", number)
        elif not label.strip():
            problems.add(f"rows with an empty {label_field!r}", number)
        elif with_split and split not in SPLITS:
            problems.add(f"rows whose {SPLIT_FIELD!r} is neither train nor test", number)
        else:
            rows.append(Row(number, text, label, split))
    message = problems.message(path)
    if message:
        raise DatasetError(message)
    if not rows:
        raise DatasetError(f"{path}: the file holds no rows, only its header; expected "
                           "labelled texts.")
    return rows, fmt


def class_names(labels: set[str]) -> list[str]:
    """The labels in sorted order: numerically when every one is an integer."""
    def is_integer(name: str) -> bool:
        return name.lstrip("-").isdigit()

    if all(is_integer(name) for name in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def build_arrays(path: Path, text_field: str = "text", label_field: str = "label",
                 max_bytes: int = MAX_BYTES) -> dict[str, np.ndarray]:
    """The cacheable arrays of the file: tokens and labels per split, classes, stats (JSON)."""
    rows, fmt = read_rows(path, text_field, label_field)
    classes = class_names({row.label for row in rows})
    if len(classes) < 2:
        raise DatasetError(f"{path}: only one class ({classes[0]}) in the field "
                           f"{label_field!r} of {len(rows)} rows: a classifier needs at least "
                           "two; check --label-field.")
    data = [normalize(row.text) for row in rows]
    distinct = distinct_texts([(d[:max_bytes], row.label) for d, row in zip(data, rows,
                                                                               strict=True)],
                              classes)
    stats: dict = {"file": path.name, "format": fmt, "rows": len(rows),
                   "cut_texts": sum(len(d) > max_bytes for d in data),
                   "duplicates_dropped": distinct.duplicates_dropped,
                   "conflicts_dropped": distinct.conflicts_dropped}
    if rows[0].split is None:
        stats["split"] = "hash"
        return split_arrays(distinct, classes, stats, max_bytes, path)
    sides: dict[bytes, set[str]] = {}
    for d, row in zip(data, rows, strict=True):
        sides.setdefault(d[:max_bytes], set()).add(row.split)
    stats["split"] = f"the {SPLIT_FIELD!r} field"
    stats["moved_to_test"] = sum(len(s) > 1 for s in sides.values())
    return split_arrays(distinct, classes, stats, max_bytes, path,
                        in_test=lambda text: "test" in sides[text])
