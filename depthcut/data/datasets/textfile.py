"""``--dataset textfile --data-root FILE``: a user's labelled texts, one JSON Lines or CSV file,
as byte tokens read like the fortunes datasets.

How the file is read and checked (fields, labels, the optional ``split`` field, every bad row
named): `depthcut.data.readers.text_table`; the tokenizer, cap, padding, dedupe and hash split
shared with the fortunes datasets: `depthcut.data.readers.bytes_tokens`. The arrays are built
once per file content and field names and cached (``$DEPTHCUT_CACHE`` or ``~/.cache/depthcut``,
keyed by the file's SHA-256), and the dataset is named after the file. The text presets of the
fortunes datasets (the byte-level transformer; quick: its short SGD training) apply here too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from depthcut.data.arrays import TOKENS, TokenDataset
from depthcut.data.cache import resolve_cache_dir, sha256_file, write_cache
from depthcut.data.datasets.fortunes import TEXT_PRESETS
from depthcut.data.errors import DatasetError
from depthcut.data.readers import text_table
from depthcut.data.readers.bytes_tokens import MAX_BYTES, read_cached, token_dataset
from depthcut.data.registry import DatasetSpec, register

_CACHE_VERSION = "v1"  # bump when the cached arrays' meaning changes


def _layouts(root: Path) -> list[str]:
    return [f"{root} as JSON Lines (.jsonl): one object per line, e.g. "
            '{"text": "I loved it", "label": "positive"}',
            f"{root} as CSV (.csv): a header row naming the text and label columns, then one "
            "row per text"]


def load_textfile(spec: DatasetSpec, root: Path, *, cache_dir: str | Path | None = None,
                  progress: bool = True, text_field: str = "text", label_field: str = "label",
                  max_bytes: int = MAX_BYTES) -> TokenDataset:
    """The labelled texts of the file `root` (cached), fields `text_field` and `label_field`;
    texts cut to their first `max_bytes` bytes."""
    if not root.is_file():
        raise spec.not_found(root, [f"no file {root}"])
    if not text_field or not label_field or text_field == label_field:
        raise DatasetError(f"--text-field and --label-field must name two different fields, "
                           f"got {text_field!r} and {label_field!r}")
    fields = hashlib.sha256(f"{text_field}\0{label_field}".encode()).hexdigest()[:12]
    cache = (resolve_cache_dir(cache_dir)
             / f"{spec.key}-{_CACHE_VERSION}-{max_bytes}-{fields}-{sha256_file(root)[:40]}.npz")
    arrays = read_cached(cache, max_bytes)
    if arrays is None:
        arrays = text_table.build_arrays(root, text_field, label_field, max_bytes)
        write_cache(cache, arrays)
    return token_dataset(arrays, root.name, cache)


TEXTFILE = register(DatasetSpec(
    key="textfile",
    display_name="text file",
    kind=TOKENS,
    sample_shape=(MAX_BYTES,),
    layouts=_layouts,
    hint="pass the file itself as --data-root, and --text-field / --label-field where its "
         "fields are not named text and label.",
    loader=load_textfile,
    presets=TEXT_PRESETS,
    root_is_file=True,
    settings=("text_field", "label_field"),
))
