"""A user's own image folder: any size, mode and class count, decoded once into a disk cache
read a batch at a time; augmentation and normalisation by name; bad data refused clearly."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthcut.cli import main
from depthcut.data import (
    BatchLoader,
    DatasetError,
    DiskImages,
    load_dataset,
    make_splits,
    recipe_names,
)
from depthcut.data.datasets.imagefolder import held_out_split
from depthcut.data.disk_images import NpyRowWriter
from depthcut.data.errors import DatasetNotFoundError
from depthcut.data.normalization import channel_stats
from depthcut.data.recipes import get_recipe
from depthcut.errors import ConfigError

CLASSES = ("cat", "dog", "fox")


def save_image(path: Path, kind: int, rng: np.random.Generator, size: tuple[int, int]) -> None:
    """One image of a mode and format chosen by `kind`: RGB JPEG, grey PNG, CMYK JPEG, RGBA
    PNG, 16-bit grey PNG, palette PNG with transparency."""
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind %= 6
    if kind == 0:
        image.save(path.with_suffix(".jpg"))
    elif kind == 1:
        image.convert("L").save(path.with_suffix(".png"))
    elif kind == 2:
        image.convert("CMYK").save(path.with_suffix(".jpg"))
    elif kind == 3:
        image.convert("RGBA").save(path.with_suffix(".png"))
    elif kind == 4:
        Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(path.with_suffix(".png"))
    else:
        palette = image.convert("P")
        palette.info["transparency"] = 0
        palette.save(path.with_suffix(".png"), transparency=0)


def write_folder(root: Path, *, classes=CLASSES, train: int = 8, test: int | None = 3,
                 test_name: str = "test") -> Path:
    """Class folders of images of mixed sizes (10-30 px, not square) and modes."""
    rng = np.random.default_rng(0)
    splits = [("train", train)] + ([(test_name, test)] if test is not None else [])
    for split, count in splits:
        for cls in classes:
            for i in range(count):
                save_image(root / split / cls / f"{i:03d}", i, rng, (10 + 3 * i, 12 + i))
    return root


@pytest.fixture
def pets(tmp_path) -> Path:
    return write_folder(tmp_path / "pets")


def load(root: Path, tmp_path: Path, **options):
    return load_dataset("imagefolder", root, cache_dir=tmp_path / "cache", progress=False,
                        **options)


# --- reading ------------------------------------------------------------------------------------


def test_any_size_and_mode_is_resized_and_named_after_its_folder(pets, tmp_path):
    data = load(pets, tmp_path, image_size=16)
    assert data.name == "pets" and data.classes == list(CLASSES)
    assert tuple(data.train_inputs.shape) == (24, 3, 16, 16)
    assert tuple(data.test_inputs.shape) == (9, 3, 16, 16)
    assert data.train_labels.tolist() == [c for c in range(3) for _ in range(8)]
    assert isinstance(data.train_inputs, DiskImages)  # on disk, not in memory
    # The data's own statistics, equal to a pass over the decoded training images.
    mean, std = channel_stats(data.train_inputs)
    assert np.allclose(data.mean, mean) and np.allclose(data.std, std)
    # The default size is the first training image's shorter side (10 x 12 -> 10).
    assert load(pets, tmp_path).image_size == 10


def test_a_val_folder_is_the_test_split_and_a_missing_one_is_held_out(tmp_path):
    with_val = load(write_folder(tmp_path / "a", test_name="val"), tmp_path, image_size=8)
    assert len(with_val.test_inputs) == 9
    alone = load(write_folder(tmp_path / "b", test=None, train=10), tmp_path, image_size=8)
    assert (len(alone.train_inputs), len(alone.test_inputs)) == (24, 6)  # 2 of 10 per class
    assert alone.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    flat = tmp_path / "flat"  # the class folders directly in the root
    shutil.copytree(tmp_path / "b" / "train", flat)
    again = load(flat, tmp_path, image_size=8)
    assert torch.equal(again.test_inputs[torch.arange(6)], alone.test_inputs[torch.arange(6)])
    train, test = held_out_split(np.repeat(np.arange(3), 10))
    assert not set(train) & set(test) and len(test) == 6


def test_the_cache_is_decoded_once_and_rebuilt_when_a_file_changes(pets, tmp_path, monkeypatch):
    first = load(pets, tmp_path, image_size=12)
    import depthcut.data.readers.folder_cache as folder_cache

    def refuse(task):
        raise AssertionError("decoded again")
    monkeypatch.setattr(folder_cache, "_decode_task", refuse)
    again = load(pets, tmp_path, image_size=12)
    assert torch.equal(again.train_inputs[torch.arange(24)], first.train_inputs[torch.arange(24)])
    monkeypatch.undo()
    save_image(pets / "train" / "cat" / "000", 0, np.random.default_rng(5), (20, 20))
    changed = load(pets, tmp_path, image_size=12)
    assert changed.train_inputs.path != first.train_inputs.path


def test_disk_images_read_rows_in_any_order_and_pickle(tmp_path):
    rows = np.random.default_rng(0).integers(0, 256, (7, 3, 4, 5), dtype=np.uint8)
    writer = NpyRowWriter(tmp_path / "x.npy", 7, (3, 4, 5))
    for i in (3, 0, 6, 1, 2, 5, 4):
        writer.write(i, rows[i])
    writer.close()
    assert np.array_equal(np.load(tmp_path / "x.npy", mmap_mode="r"), rows)  # a plain .npy
    disk = DiskImages(tmp_path / "x.npy")
    index = torch.tensor([5, 0, 1, 2, 6, 6])
    assert torch.equal(disk[index], torch.from_numpy(rows[index.numpy()]))
    view = disk.subset(torch.tensor([6, 4, 2]))[1:]
    assert len(view) == 2 and torch.equal(view[torch.tensor([1, 0])],
                                          torch.from_numpy(rows[[2, 4]]))
    assert torch.equal(pickle.loads(pickle.dumps(view))[torch.tensor([0])],
                       torch.from_numpy(rows[[4]]))
    with pytest.raises(IndexError):
        view[torch.tensor([2])]


@pytest.mark.parametrize("recipe", [None, "cifar", "domainbed", "flowers"])
@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_batches_from_disk_equal_batches_from_memory(pets, tmp_path, recipe, shard):
    data = load(pets, tmp_path, image_size=12)
    in_memory = data.train_inputs[torch.arange(len(data.train_inputs))]
    options = {"batch_size": 5, "mean": data.mean, "std": data.std, "shuffle": True,
               "augment": True, "crop_padding": 2, "flip": True, "recipe": recipe, "seed": 3,
               "shard": shard}
    disk = BatchLoader(data.train_inputs, data.train_labels, **options)
    memory = BatchLoader(in_memory, data.train_labels, **options)
    for _ in range(2):  # two epochs: reseeded per epoch, the same on both
        pairs = list(zip(disk, memory, strict=True))
        assert pairs and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                             for a, b in pairs)


def test_recipes_keep_the_shape_and_follow_the_seed():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    for name in recipe_names():
        out = get_recipe(name)(images, torch.Generator().manual_seed(1))
        again = get_recipe(name)(images, torch.Generator().manual_seed(1))
        assert out.shape == images.shape and torch.equal(out, again), name
        assert float(out.min()) >= 0 and float(out.max()) <= 255, name
    assert torch.equal(get_recipe("none")(images, None), images)
    with pytest.raises(ConfigError, match="unknown augmentation 'mixup'"):
        get_recipe("mixup")


def test_normalisation_by_name(pets, tmp_path):
    assert load(pets, tmp_path, image_size=8, normalize="imagenet").mean == (0.485, 0.456, 0.406)
    given = load(pets, tmp_path, image_size=8, normalize="0.5,0.5,0.5:0.25,0.25,0.25")
    assert given.std == (0.25, 0.25, 0.25)
    with pytest.raises(ConfigError, match="needs 3 mean"):
        load(pets, tmp_path, image_size=8, normalize="0.5:0.25")
    # A fixed-size dataset refuses another size once read (from a clean clone without the
    # shared data beside it, the data is missing first: that error instead).
    shared = Path("../shared/data")
    refusal = ((ConfigError, "--image-size 16 applies to datasets of image files")
               if (shared / "cifar10-jpeg.tar.gz").exists() or (shared / "cifar10-jpeg").exists()
               else (DatasetNotFoundError, "CIFAR-10"))
    with pytest.raises(refusal[0], match=refusal[1]):
        load_dataset("cifar10-jpeg", shared, image_size=16, progress=False)


def test_splits_of_a_folder_keep_the_images_on_disk(pets, tmp_path):
    data = load(pets, tmp_path, image_size=8, augment="flowers")
    splits = make_splits(data, val_fraction=0.25, batch_size=4, seed=0)
    assert isinstance(splits.train.inputs, DiskImages) and isinstance(splits.val.inputs,
                                                                      DiskImages)
    inputs, labels = next(iter(splits.train))
    assert inputs.shape == (4, 3, 8, 8) and inputs.dtype == torch.float32
    assert splits.train.recipe is get_recipe("flowers")


# --- bad data: one paragraph, nothing written ---------------------------------------------------


def refused(root: Path, tmp_path: Path, match: str, **options) -> str:
    cache = tmp_path / "cache"
    before = sorted(cache.rglob("*")) if cache.exists() else []
    with pytest.raises(DatasetError, match=match) as info:
        load(root, tmp_path, image_size=8, **options)
    after = sorted(cache.rglob("*")) if cache.exists() else []
    assert after == before, "the cache was written"
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_one_class_folder_is_refused(tmp_path):
    message = refused(write_folder(tmp_path / "one", classes=("cat",)), tmp_path,
                      "at least 2 classes, found only 'cat'")
    assert "100%" in message


def test_an_empty_class_folder_is_refused(pets, tmp_path):
    (pets / "test" / "dog").rename(pets / "dog-test")
    (pets / "test" / "dog").mkdir()
    refused(pets, tmp_path, r"1 class folder\(s\) hold no images .*test/dog")


def test_unreadable_images_are_counted_and_named_or_skipped(pets, tmp_path):
    for name in ("broken.jpg", "empty.png"):
        (pets / "train" / "fox" / name).write_bytes(b"" if "empty" in name else b"\xff\xd8no")
    message = refused(pets, tmp_path, "2 of 35 image files cannot be read")
    assert "train/fox/broken.jpg" in message and "train/fox/empty.png" in message
    assert "--skip-unreadable" in message
    data = load(pets, tmp_path, image_size=8, skip_unreadable=True)
    assert len(data.train_inputs) == 24 and len(data.skipped) == 2


# --- through the command line -------------------------------------------------------------------

TINY = ["--width", "0.0625", "--epochs", "1", "--finetune-epochs", "1", "--max-stages", "1",
        "--batch-size", "8", "--device", "cpu", "--no-progress", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny run on an image folder at 12 px."""
    base = tmp_path_factory.mktemp("folder")
    root = write_folder(base / "pets")
    run = base / "run"
    assert main(["easier", "--dataset", "imagefolder", "--data-root", str(root), "--out",
                 str(run), "--image-size", "12", "--augment", "domainbed",
                 "--cache-dir", str(base / "cache"), *TINY]) == 0
    return {"root": root, "run": run, "base": base}


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


def test_a_run_names_the_folder_and_records_its_input_shape(world):
    config = json.loads((world["run"] / "config.json").read_text())
    assert config["dataset_name"] == "pets" and config["input_shape"] == [3, 12, 12]
    assert config["images"]["augmentation"] == "domainbed"
    assert "on pets" in (world["run"] / "summary.md").read_text()
    assert "CIFAR" not in (world["run"] / "summary.md").read_text()
    stage = torch.load(world["run"] / "checkpoints" / "stage_00.pt", weights_only=False)
    assert stage["extra"]["input_shape"] == [3, 12, 12]


def test_a_dense_checkpoint_made_at_another_size_is_refused(world, capsys):
    before = snapshot(world["base"])
    args = ["easier", "--dataset", "imagefolder", "--data-root", str(world["root"]),
            "--image-size", "16", "--cache-dir", str(world["base"] / "cache"),
            "--dense-checkpoint", str(world["run"] / "checkpoints" / "stage_00.pt"),
            "--out", str(world["base"] / "out"), *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "input shape 3x12x12 (this data: 3x16x16" in err and "Traceback" not in err
    changed = {k for k in set(snapshot(world["base"])) ^ set(before) if "cache" not in k}
    assert not changed, changed


@pytest.mark.parametrize("key,value,message", [
    ("input_shape", [3, 16, 16], "different input shape"),
    ("dataset_name", "birds", "different dataset name"),
])
def test_report_refuses_runs_at_another_input_shape_or_on_other_data(world, capsys, key, value,
                                                                      message):
    other = world["base"] / f"other-{key}"
    shutil.copytree(world["run"], other, dirs_exist_ok=True)
    config = json.loads((other / "config.json").read_text())
    config[key] = value
    (other / "config.json").write_text(json.dumps(config))
    out = world["base"] / f"report-{key}"
    assert main(["report", str(world["run"]), str(other), "--out", str(out),
                 "--no-measure", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
