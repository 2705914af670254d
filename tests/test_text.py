"""Text datasets (fortunes): parsing, dedupe and hash split, cache, errors, byte tokens and
padding, the transformer's padding masks (model and entropy), balanced accuracy, the metric a
stop rule reads, and one tiny CLI run on a fake archive."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from depthcut.data import BatchLoader, DatasetError, DatasetNotFoundError, load_dataset, make_splits
from depthcut.data.datasets.fortunes import ARCHIVE
from depthcut.data.readers import fortunes_archive as text
from depthcut.entropy import count_states, layer_entropies
from depthcut.fold import fold
from depthcut.methods.easier import Easier, EasierConfig
from depthcut.methods.rounds import PruningConfig, PruningRounds
from depthcut.models import ModelSpec, TransformerEncoder
from depthcut.run import read_records
from depthcut.sites import find_sites, linearize
from depthcut.stages import StageRecord, StageRun
from depthcut.train import evaluate
from tests.helpers import run_depthcut

WORDS = {
    "en": "the house is small and the dog runs to the old tree".split(),
    "de": "der hund und die katze sind nicht im haus aber gut".split(),
    "cs": "pes a kočka jsou v domě ale ne žena muž řeka".split(),
}
DUPLICATE = "A text found twice: once in cookie, once in people."
CONFLICT = "Ein Text in zwei Sprachen."
CZECH = "Člověk má být stále zamilován, říká Wilde."


def fortune_file(texts: list[str], encoding: str = "utf-8") -> bytes:
    return "".join(f"{t}\n%\n" for t in texts).encode(encoding)


def generated(language: str, count: int, offset: int = 0) -> list[str]:
    words = WORDS[language]
    return [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 5)) + f" {offset + i}"
            for i in range(count)]


def klasik(count: int) -> list[str]:
    return [CZECH, *generated("cs", count)]


def write_fake_fortunes(root: Path, per_file: int = 12) -> Path:
    """A small fortunes-like archive: en (cookie, people, zippy), de, cs with an ISO-8859-2
    file, an empty text, a text twice in one file and once in another topic, a text under two
    languages, the licence folder and a binary file."""
    files = {
        "fortunes/en/cookie": fortune_file(
            [*generated("en", per_file), DUPLICATE, "   \n\t", DUPLICATE, CONFLICT]),
        "fortunes/en/people": fortune_file([*generated("en", per_file, 100), DUPLICATE]),
        "fortunes/en/zippy": fortune_file(generated("en", 3, 200)),
        "fortunes/de/witze": fortune_file([*generated("de", 2 * per_file), CONFLICT]),
        "fortunes/cs/klasik-cz": fortune_file(klasik(per_file), "iso-8859-2"),
        "fortunes/cs/citace": fortune_file(generated("cs", per_file, 50)),
        "fortunes/COPYRIGHT/fortunes.copyright": b"Licence text\n%\nnot a fortune\n%\n",
        "fortunes/de/witze.dat": b"\x00\x00\x00\x02binary index",
    }
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / ARCHIVE, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    return write_fake_fortunes(tmp_path / "data")


def rows(tokens: torch.Tensor) -> set[bytes]:
    """Each token row as the text bytes it encodes."""
    return {bytes((t - text.BYTE_OFFSET) for t in row.tolist() if t != text.PAD_ID)
            for row in tokens}


# --- reading ----------------------------------------------------------------------------------


def test_split_decode_and_normalize():
    assert text.split_texts(b"one\n  two\n%\nthree\n%\n\nlast") == [b"one\n  two", b"three",
                                                                    b"\nlast"]
    latin2 = CZECH.encode("iso-8859-2")
    with pytest.raises(UnicodeDecodeError):
        latin2.decode("utf-8")
    assert text.decode(latin2) == (CZECH, True)
    assert text.decode(CZECH.encode()) == (CZECH, False)
    assert text.normalize("  Be brave.\n\t\t-- Anon \n") == b"Be brave. -- Anon"


def test_archive_parsing_counts_what_it_skips(fake):
    texts, stats = text.read_archive(fake / ARCHIVE, max_bytes=64)
    assert {t.language for t in texts} == {"en", "de", "cs"}  # COPYRIGHT skipped
    assert stats["empty_texts"] == 1
    assert stats["fallback_files"] == ["cs/klasik-cz"]
    # That file's non-ASCII texts are not UTF-8: decoded as ISO-8859-2, and counted.
    assert stats["fallback_texts"] == sum(not t.isascii() for t in klasik(12)) > 1
    assert stats["skipped_files"] == ["de/witze.dat (binary)"]
    assert CZECH.encode("utf-8")[:64] in {t.data for t in texts}  # re-encoded as UTF-8


def test_dedupe_and_hash_split(fake, tmp_path):
    data = load_dataset("fortunes-lang", fake, cache_dir=tmp_path / "cache")
    train, test = rows(data.train_inputs), rows(data.test_inputs)
    assert not train & test  # no text on both sides
    assert len(train) == len(data.train_inputs) and len(test) == len(data.test_inputs)
    everything = train | test
    assert DUPLICATE.encode() in everything  # three copies, same language: kept once
    assert CONFLICT.encode() not in everything  # under two languages: dropped
    assert data.stats["duplicates_dropped"] == 3 and data.stats["conflicts_dropped"] == 1
    ordered = [bytes(t - 1 for t in row.tolist() if t) for row in data.train_inputs]
    assert ordered == sorted(ordered, key=lambda b: hashlib.sha256(b).digest())  # mixed order
    for row in train:
        assert not text.in_test_split(row)
    for row in test:
        assert text.in_test_split(row)
    assert data.classes == ["cs", "de", "en"]
    assert data.name == "fortunes (language)"
    # The side of a text depends on its bytes only, never on the rest of the archive.
    small = write_fake_fortunes(tmp_path / "small", per_file=6)
    other = load_dataset("fortunes-lang", small, cache_dir=tmp_path / "cache")
    assert not rows(other.train_inputs) & test and not rows(other.test_inputs) & train


def test_topic_task_keeps_the_largest_english_files(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(text, "TOPICS", 2)
    data = load_dataset("fortunes-topic", fake, cache_dir=tmp_path / "cache")
    assert data.classes == ["cookie", "people"]  # zippy (3 texts) is the smallest
    everything = rows(data.train_inputs) | rows(data.test_inputs)
    assert DUPLICATE.encode() not in everything  # in cookie and people: ambiguous, dropped
    assert data.stats["topics"] == ["cookie", "people"]
    assert data.name == "fortunes (English topic)"


def test_byte_tokens_and_padding(fake, tmp_path):
    tokens = text.tokens([b"Hi", "ž".encode(), b"x" * 10], max_bytes=4)
    assert tokens.tolist() == [[73, 106, 0, 0], [0xC5 + 1, 0xBE + 1, 0, 0], [121] * 4]
    data = load_dataset("fortunes-lang", fake, cache_dir=tmp_path / "cache")
    assert data.seq_len == text.MAX_BYTES == 64
    assert data.train_inputs.dtype == torch.int64 and data.vocab_size == 257
    assert int(data.train_inputs.max()) <= 256 and data.pad_id == 0
    splits = make_splits(data, val_fraction=0.2, batch_size=8, channels_last=True)
    inputs, labels = next(iter(splits.train))  # no augmentation or memory format on tokens
    assert inputs.dtype == torch.int64 and inputs.shape == (8, 64)
    assert rows(inputs) <= rows(data.train_inputs)
    with pytest.raises(ValueError, match="token ids"):
        BatchLoader(torch.zeros(4, 3, dtype=torch.float32), torch.zeros(4), batch_size=2,
                    mean=(), std=())


def test_cache_is_used_and_rebuilt_when_damaged(fake, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_dataset("fortunes-lang", fake, cache_dir=cache)
    files = list(cache.glob("fortunes-lang-*.npz"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the archive was read again")

    monkeypatch.setattr(text, "build_arrays", fail)
    second = load_dataset("fortunes-lang", fake, cache_dir=cache)
    assert torch.equal(first.train_inputs, second.train_inputs)
    assert torch.equal(first.test_labels, second.test_labels)
    monkeypatch.undo()
    files[0].write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unusable cache"):
        third = load_dataset("fortunes-lang", fake, cache_dir=cache)
    assert torch.equal(first.train_inputs, third.train_inputs)


def test_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="fortunes.tar.gz"):
        load_dataset("fortunes-lang", tmp_path / "nothing", cache_dir=tmp_path / "cache")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ARCHIVE).write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DatasetError, match="cannot read the fortunes archive"):
        load_dataset("fortunes-lang", bad, cache_dir=tmp_path / "cache")
    german = tmp_path / "german"
    german.mkdir()
    with tarfile.open(german / ARCHIVE, "w:gz") as archive:
        data = fortune_file(generated("de", 30))
        info = tarfile.TarInfo("fortunes/de/witze")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match="no en texts"):
        load_dataset("fortunes-topic", german, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError, match="only one class"):
        load_dataset("fortunes-lang", german, cache_dir=tmp_path / "cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    with tarfile.open(empty / ARCHIVE, "w:gz"):
        pass
    with pytest.raises(DatasetError, match="no texts"):
        load_dataset("fortunes-lang", empty, cache_dir=tmp_path / "cache")


# --- the transformer's padding ------------------------------------------------------------


def text_model(**kwargs) -> TransformerEncoder:
    spec = ModelSpec(name="transformer", num_classes=3, width=0.125, vocab_size=257,
                     max_len=16, pad_id=0, **kwargs)
    return spec.build().eval()


def test_padding_is_masked_in_attention_and_pooling_and_folds():
    torch.manual_seed(0)
    model = text_model()
    x = torch.randint(1, 257, (3, 16))
    x[0, 5:] = 0
    x[1, 11:] = 0
    with torch.no_grad():
        full = model(x)
        for row, length in ((0, 5), (1, 11), (2, 16)):
            alone = model(x[row : row + 1, :length])  # the same text without padding
            torch.testing.assert_close(full[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # find_sites warns when torch.fx cannot trace
        sites = find_sites(model)
    linearize(model, sites[:2])
    folded = fold(model, x)
    report = folded.fold_report
    assert report.exact and report.macs_after < report.macs_before
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


class Tiny(nn.Module):
    """Embedding (2 features) -> ReLU site, mean over tokens; PAD's embedding is (5, 5)."""

    pad_id = 0

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 2)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[5.0, 5.0], [1.0, -1.0], [-1.0, 1.0],
                                                  [2.0, -3.0]]))
        self.act = nn.ReLU()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.act(self.embed(tokens)).mean(dim=1)


def test_entropy_leaves_padding_out_of_the_counts():
    """Real tokens 1, 2, 1, 3: feature 0 is ON 3 / OFF 1, feature 1 ON 1 / OFF 3. The four PAD
    positions are ON in both: counted, the site would look far more constant (lower entropy,
    first in line to be linearized) than it is."""
    batch = torch.tensor([[1, 2, 0, 0], [1, 3, 0, 0]])
    model = Tiny()
    for variant in ("paper", "easier-code", "egp-code"):
        counts = count_states(model, [batch], variant=variant)["act"]
        assert counts.n_on.tolist() == [3, 1] and counts.n_off.tolist() == [1, 3], variant
    h = layer_entropies(count_states(model, [batch]))["act"]
    assert h == pytest.approx(0.8112781, abs=1e-6)  # H(3/4) for both features
    model.pad_id = None  # no padding declared: the PAD positions count, ON 7/5 of 8
    counts = count_states(model, [batch])["act"]
    assert counts.n_on.tolist() == [7, 5] and counts.n_off.tolist() == [1, 3]
    assert layer_entropies({"act": counts})["act"] < h


# --- balanced accuracy and the metric ---------------------------------------------------------


class Fixed(nn.Module):
    """Predicts class `input` (one-hot logits over 3 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.one_hot(x, 3).float()


def test_balanced_accuracy_hand_computed():
    """Six samples of class 0 all right, two of class 1 one right, none of class 2 (absent:
    left out of the mean): top-1 7/8 = 87.5, balanced (6/6 + 1/2) / 2 = 75."""
    predictions = torch.tensor([0, 0, 0, 0, 0, 0, 1, 0])
    targets = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    batches = [(predictions[:3], targets[:3]), (predictions[3:], targets[3:])]
    assert evaluate(Fixed(), batches) == pytest.approx(87.5)
    top1, balanced = evaluate(Fixed(), batches, balanced=True)
    assert top1 == pytest.approx(87.5) and balanced == pytest.approx(75.0)


def test_metric_balanced_changes_the_stop_decision():
    """Dense val: top-1 80, balanced 60; a stage at 79.5 / 55 is within delta 1 by top-1 but
    not by balanced accuracy, and within theta 0.99 by top-1 only."""
    dense = StageRecord(method="dense", stage=0, val_top1=80.0, val_balanced=60.0)
    stage = StageRecord(method="easier", stage=1, val_top1=79.5, val_balanced=55.0,
                        extras={"layer_collapse": []})
    decisions = {}
    for metric in ("top1", "balanced"):
        run = StageRun(model=nn.Identity(), splits=None, records=[dense], metric=metric)
        decisions[metric] = (
            Easier(EasierConfig(delta=1.0)).accept(run, stage),
            PruningRounds(PruningConfig(theta=0.99), name="nepenthe", prune_step=None,
                          rule="theta").accept(run, stage),
        )
    assert decisions == {"top1": (True, True), "balanced": (False, False)}


# --- the command line -------------------------------------------------------------------------


def test_cli_easier_and_fold_on_a_tiny_fake_archive(tmp_path):
    root = write_fake_fortunes(tmp_path / "data")
    out = tmp_path / "run"
    common = ["--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
              "--device", "cpu", "--no-progress"]
    bad = run_depthcut("easier", "--dataset", "fortunes-lang", "--model", "resnet18",
                       "--out", str(tmp_path / "bad"), *common)
    assert bad.returncode == 2 and "--model transformer" in bad.stderr
    assert not (tmp_path / "bad").exists()
    settings = tmp_path / "settings.json"  # the quick text preset trains on 16,000 texts
    settings.write_text(json.dumps({"train_subset": None}))
    result = run_depthcut(
        "easier", "--dataset", "fortunes-lang", "--config", str(settings), "--width", "0.125",
        "--epochs", "1", "--finetune-epochs", "1", "--max-stages", "1", "--batch-size", "16",
        "--metric", "balanced", "--delta", "100", "--out", str(out), *common)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"]["model"] == "transformer"  # the text preset's model
    assert config["text"]["seq_len"] == 64 and config["text"]["classes"] == ["cs", "de", "en"]
    assert config["memory_format"]["channels_last"] is False
    records = read_records(out)
    assert len(records) == 2 and all("val_balanced" in r and "test_balanced" in r
                                     for r in records)
    summary = (out / "summary.md").read_text()
    assert "fortunes (language)" in summary and "balanced accuracy points" in summary
    assert (out / "folded_answer.json").is_file()
    folded = run_depthcut("fold", "--checkpoint", str(out / "checkpoints" / "stage_01.pt"),
                          "--out", str(tmp_path / "folded.pt"), *common)
    assert folded.returncode == 0, folded.stderr
    assert "all merges exact" in folded.stdout


def test_text_preset_overlay_and_metric_in_print_config(capsys):
    from depthcut.cli import main

    assert main(["easier", "--dataset", "fortunes-lang", "--lr", "0.5", "--print-config"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["model"] == "transformer" and settings["train_subset"] == 16000
    assert settings["lr"] == 0.5 and settings["warmup_epochs"] == 1.0  # flags win
    assert settings["metric"] == "top1"
    assert main(["easier", "--dataset", "fortunes-topic", "--metric", "balanced",
                 "--print-config"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["train_subset"] is None and settings["metric"] == "balanced"
    assert settings["epochs"] == 15 and settings["finetune_lr"] == 0.04
