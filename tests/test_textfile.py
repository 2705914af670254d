"""`--dataset textfile`: a user's JSONL or CSV file as byte tokens, read like the fortunes
datasets (tokenizer, cap, padding, dedupe, hash split, cache), with its own split field and
field names; every bad file a one-paragraph error with nothing written; one tiny CLI run."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from depthcut.cli import main
from depthcut.data import DatasetError, DatasetNotFoundError, load_dataset
from depthcut.data.readers import bytes_tokens, text_table
from depthcut.run import read_records
from tests.helpers import run_depthcut

WORDS = {"pos": "good great lovely fine nice happy warm".split(),
         "neg": "bad awful poor sad ugly dull cold".split()}


def labelled(count: int) -> list[dict]:
    """`count` distinct texts, labels pos and neg alternating."""
    rows = []
    for i in range(count):
        label = ("pos", "neg")[i % 2]
        words = WORDS[label]
        rows.append({"text": " ".join(words[(i + j) % len(words)] for j in range(3)) + f" {i}",
                     "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def texts_of(tokens: torch.Tensor) -> list[bytes]:
    return [bytes(t - bytes_tokens.BYTE_OFFSET for t in row.tolist() if t != bytes_tokens.PAD_ID)
            for row in tokens]


def load(path: Path, tmp_path: Path, **settings):
    return load_dataset("textfile", path, cache_dir=tmp_path / "cache", settings=settings)


# --- reading ----------------------------------------------------------------------------------


def test_jsonl_and_csv_give_the_same_arrays_named_after_the_file(tmp_path):
    rows = labelled(60)
    rows[0]["text"] = "  Padded \t and\n cut: " + "x" * 100  # whitespace collapsed, cut at 64
    jsonl = load(write_jsonl(tmp_path / "reviews.jsonl", rows), tmp_path)
    table = load(write_csv(tmp_path / "reviews.csv", rows), tmp_path)
    assert (jsonl.name, table.name) == ("reviews.jsonl", "reviews.csv")
    for split in ("train_inputs", "train_labels", "test_inputs", "test_labels"):
        assert torch.equal(getattr(jsonl, split), getattr(table, split)), split
    assert jsonl.classes == ["neg", "pos"] and jsonl.vocab_size == 257 and jsonl.pad_id == 0
    assert jsonl.seq_len == bytes_tokens.MAX_BYTES == 64
    assert len(jsonl.train_inputs) + len(jsonl.test_inputs) == 60
    expected = {bytes_tokens.normalize(r["text"])[:64]: r["label"] for r in rows}
    for split in ("train", "test"):
        texts = texts_of(getattr(jsonl, f"{split}_inputs"))
        labels = getattr(jsonl, f"{split}_labels").tolist()
        assert all(expected[t] == jsonl.classes[label]
                   for t, label in zip(texts, labels, strict=True))
        assert all(bytes_tokens.in_test_split(t) == (split == "test") for t in texts)
        assert texts == sorted(texts, key=lambda t: hashlib.sha256(t).digest())
    cut = next(t for t in texts_of(jsonl.train_inputs) + texts_of(jsonl.test_inputs)
               if t.startswith(b"Padded"))
    assert cut == b"Padded and cut: " + b"x" * 48
    assert jsonl.stats["cut_texts"] == 1 and jsonl.stats["format"] == "JSON Lines"
    assert table.stats["format"] == "CSV" and jsonl.stats["split"] == "hash"


def test_duplicates_kept_once_and_conflicting_labels_dropped(tmp_path):
    rows = labelled(40)
    rows += [dict(rows[3]), dict(rows[4]), {"text": rows[5]["text"], "label": "pos"}]
    assert rows[5]["label"] == "neg"
    data = load(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path)
    texts = texts_of(data.train_inputs) + texts_of(data.test_inputs)
    assert len(texts) == len(set(texts)) == 39
    assert rows[5]["text"].encode() not in texts
    # as for the fortunes: rows beyond a text's first count as duplicates (the conflict's too)
    assert (data.stats["duplicates_dropped"], data.stats["conflicts_dropped"]) == (3, 1)


def test_the_split_field_fixes_each_side(tmp_path):
    rows = [{**row, "split": "test" if i % 4 == 0 else "train"}
            for i, row in enumerate(labelled(40))]
    rows.append({**rows[1], "split": "test"})  # listed under both splits: test only
    data = load(write_jsonl(tmp_path / "s.jsonl", rows), tmp_path)
    test = {r["text"].encode() for r in rows if r["split"] == "test"}
    assert set(texts_of(data.test_inputs)) == test
    assert not test & set(texts_of(data.train_inputs))
    assert len(data.train_inputs) == 29 and data.stats["moved_to_test"] == 1


def test_classes_are_the_label_values_in_sorted_order(tmp_path):
    rows = [{"text": row["text"], "label": (10, 2, 1)[i % 3]}
            for i, row in enumerate(labelled(30))]
    data = load(write_jsonl(tmp_path / "n.jsonl", rows), tmp_path)
    assert data.classes == ["1", "2", "10"]  # numerically, not "1", "10", "2"
    texts = {r["text"].encode(): str(r["label"]) for r in rows}
    assert all(texts[t] == data.classes[label] for t, label
               in zip(texts_of(data.train_inputs), data.train_labels.tolist(), strict=True))
    rows = [{"text": r["text"], "label": ("b", "a", "c 1")[i % 3]} for i, r in enumerate(rows)]
    assert load(write_csv(tmp_path / "s.csv", rows), tmp_path).classes == ["a", "b", "c 1"]


def test_other_field_names(tmp_path):
    rows = [{"id": i, "review": r["text"], "stars": r["label"]}
            for i, r in enumerate(labelled(30))]
    path = write_csv(tmp_path / "r.csv", rows)
    data = load(path, tmp_path, text_field="review", label_field="stars")
    assert data.classes == ["neg", "pos"] and len(data.train_inputs) + len(data.test_inputs) == 30
    with pytest.raises(DatasetError, match="must name two different fields"):
        load(path, tmp_path, text_field="stars", label_field="stars")


def test_cache_keyed_by_content_and_fields(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", labelled(30))
    first = load(path, tmp_path)
    assert Path(first.stats["cache"]).is_file()

    def no_parsing(*args, **kwargs):
        raise AssertionError("the file was parsed again")

    monkeypatch.setattr(text_table, "build_arrays", no_parsing)
    again = load(path, tmp_path)
    assert torch.equal(first.train_inputs, again.train_inputs)
    monkeypatch.undo()
    write_jsonl(path, labelled(31))  # new content: a new cache file
    assert len(load(path, tmp_path).train_inputs) + len(load(path, tmp_path).test_inputs) == 31
    rows = [{"body": r["text"], "label": r["label"]} for r in labelled(30)]
    other = load(write_jsonl(tmp_path / "c.jsonl", rows), tmp_path, text_field="body")
    assert other.stats["cache"] != first.stats["cache"]
    assert len(list((tmp_path / "cache").iterdir())) == 3


# --- bad input --------------------------------------------------------------------------------


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


GOOD = labelled(4)
NEITHER = ("Expected a .jsonl file with one JSON object per line holding the fields 'text' and "
           "'label', or a .csv file whose header row names them.")
BAD_FILES = {
    "one-class": ("a.jsonl", jsonl(*[{"text": f"t {i}", "label": "a"} for i in range(5)]),
                  "only one class (a) in the field 'label' of 5 rows: a classifier needs at "
                  "least two; check --label-field."),
    "empty-texts": ("e.jsonl", jsonl(GOOD[0], {"text": "  \n ", "label": "pos"}, GOOD[1],
                                     {"text": "", "label": "neg"}),
                    "rows with an empty 'text': 2 (lines 2, 4). Fix or remove them."),
    "missing-fields": ("m.jsonl", jsonl(GOOD[0], {"text": "x"}, {"label": "pos"},
                                        {"text": "y", "label": None}),
                       "rows without 'label': 2 (lines 2, 4); rows without 'text': 1 (line 3). "
                       "Fix or remove them."),
    "no-such-field": ("f.csv", "review,stars\nfine,5\n",
                      "no field 'text' in the CSV file (fields found: 'review', 'stars'); name "
                      "the field with --text-field."),
    "unreadable-lines": ("u.jsonl", jsonl(GOOD[0]) + "not json\n" + jsonl(GOOD[1]) + "[1, 2]\n"
                         + "{oops\n" * 6,
                         "unreadable lines (not one JSON object each): 8 (lines 2, 4, 5, 6, 7 "
                         "and 3 more). Fix or remove them."),
    "not-utf8": ("l.jsonl", jsonl(GOOD[0]).encode()
                 + '{"text": "caf\xe9", "label": "pos"}\n'.encode("latin-1"),
                 "unreadable lines (not UTF-8): 1 (line 2). Fix or remove them."),
    "csv-row-length": ("r.csv", "text,label\nhello,pos\nx,y,z\nbye,neg\n",
                       "unreadable rows (not the header's 2 fields each): 1 (line 3). Fix or "
                       "remove them."),
    "bad-values": ("v.jsonl", jsonl({**GOOD[0], "split": "train"}, {**GOOD[1], "split": "val"},
                                    {"text": 5, "label": "pos", "split": "test"},
                                    {"text": "x", "label": [1], "split": "test"}),
                   "rows whose 'split' is neither train nor test: 1 (line 2); rows whose 'text' "
                   "is not a string: 1 (line 3); rows whose 'label' is neither a string nor an "
                   "integer: 1 (line 4). Fix or remove them."),
    "plain-text": ("p.txt", "just some words\nand more words\n",
                   "neither JSON Lines nor CSV (its first line is no JSON object and no "
                   f"comma-separated header). {NEITHER}"),
    "json-array": ("j.json", json.dumps(GOOD),
                   "neither JSON Lines nor CSV (it holds a JSON array: write one object per "
                   f"line instead). {NEITHER}"),
    "csv-named-jsonl": ("c.jsonl", "text,label\nhello,pos\n",
                        "neither JSON Lines nor CSV (no line is a JSON object in UTF-8). "
                        f"{NEITHER}"),
    "binary": ("b.jsonl", b"\x00\x01\x02",
               f"neither JSON Lines nor CSV (binary data: it holds NUL bytes). {NEITHER}"),
    "empty": ("z.jsonl", "", "the file holds no rows (it is empty); expected labelled texts as "
              "JSON Lines or CSV."),
    "header-only": ("h.csv", "text,label\n",
                    "the file holds no rows, only its header; expected labelled texts."),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_get_one_paragraph_and_nothing_written(case, tmp_path):
    name, content, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError) as info:
        load(path, tmp_path)
    assert str(info.value) == f"{path}: {message}"
    assert list(tmp_path.iterdir()) == [path]  # no cache written


def test_a_folder_or_a_missing_file_names_the_layouts(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load(tmp_path, tmp_path)
    assert str(info.value).startswith(f"text file dataset: the data root {tmp_path} is a "
                                      "folder, not a file.\nExpected one of these layouts:")
    with pytest.raises(DatasetNotFoundError, match="(?s)Found: no file .*Hint: pass the file"):
        load(tmp_path / "none.jsonl", tmp_path)


def test_cli_bad_file_is_bad_input_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    path.write_text(BAD_FILES["one-class"][1])
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["easier", "--dataset", "textfile", "--data-root", str(path), "--cache-dir",
                 str(cache), "--device", "cpu", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"depthcut easier: error: {path}: {BAD_FILES['one-class'][2]}\n"
    assert not out.exists() and not cache.exists()


# --- settings and the command line --------------------------------------------------------


def test_print_config_shows_the_text_preset_and_fields(capsys):
    assert main(["easier", "--dataset", "textfile", "--data-root", "r.csv", "--label-field",
                 "stars", "--print-config"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["model"] == "transformer" and settings["warmup_epochs"] == 1.0
    assert (settings["text_field"], settings["label_field"]) == ("text", "stars")
    assert main(["easier", "--dataset", "textfile", "--preset", "transfer-adam",
                 "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "transformer"


def test_cli_easier_and_fold_on_a_small_file(tmp_path):
    rows = [{"review": r["text"], "stars": r["label"]} for r in labelled(80)]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    out = tmp_path / "run"
    common = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"]
    result = run_depthcut(
        "easier", "--dataset", "textfile", "--data-root", str(path), "--text-field", "review",
        "--label-field", "stars", "--model", "transformer", "--width", "0.125",
        "--train-subset", "48", "--epochs", "1", "--finetune-epochs", "1", "--max-stages", "1",
        "--batch-size", "16", "--delta", "100", "--out", str(out), *common)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["text"]["classes"] == ["neg", "pos"] and config["text"]["file"] == "reviews.jsonl"
    assert len(read_records(out)) == 2
    assert "reviews.jsonl" in (out / "summary.md").read_text()
    # fold reads the data again with the run's field names, kept in the checkpoint
    folded = run_depthcut("fold", "--checkpoint", str(out / "checkpoints" / "stage_01.pt"),
                          "--out", str(tmp_path / "folded.pt"), *common)
    assert folded.returncode == 0, folded.stderr
    assert np.isfinite(json.loads((out / "folded_answer.json").read_text())["top1_folded"])
