"""Data loading on tiny fake datasets in every supported format, splits, augmentation, batches."""

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthcut.data import (
    BatchLoader,
    DatasetNotFoundError,
    ImageDataset,
    augment,
    dataset_names,
    dataset_spec,
    load_dataset,
    make_splits,
    split_indices,
)
from depthcut.data.datasets import cifar10
from depthcut.data.datasets.cifar10 import CIFAR10_CLASSES
from depthcut.data.readers import image_folder

REAL_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"


# --- fake dataset writers ---------------------------------------------------------------------


def write_cifar_pickles(folder: Path, per_batch: int = 3, test: int = 4) -> dict:
    """torchvision's pickle layout with distinct known pixels; returns what was written."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {"train_data": [], "train_labels": []}
    for index in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        written["train_data"].append(batch[b"data"])
        written["train_labels"] += batch[b"labels"]
        (folder / f"data_batch_{index}").write_bytes(pickle.dumps(batch))
    batch = {b"data": rng.integers(0, 256, (test, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, test).tolist()}
    written["test_data"], written["test_labels"] = batch[b"data"], batch[b"labels"]
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    meta = {b"label_names": [name.encode() for name in CIFAR10_CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return written


def colour(label: int, index: int) -> tuple[int, int, int]:
    """Solid colours far apart per class, and per file within a class (to check the order)."""
    return 20 * label + 10, 200 - 15 * label, 40 + 60 * index


def jpeg_bytes(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


COUNTS = {"train": 2, "test": 1}  # images per class


def jpeg_members(prefix: str = "") -> list[tuple[str, bytes]]:
    """(name, bytes) in a scrambled order, so the loader's sorting is what is tested."""
    members = []
    for split, count in COUNTS.items():
        for label, name in enumerate(CIFAR10_CLASSES):
            for index in reversed(range(count)):
                members.append((f"{prefix}{split}/{name}/{index:04d}.jpg",
                                jpeg_bytes(colour(label, index))))
    return members[::-1]


def write_jpeg_archive(path: Path, prefix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        readme = b"not an image"
        info = tarfile.TarInfo(f"{prefix}README.txt")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
        for name, payload in jpeg_members(prefix):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_jpeg_folder(folder: Path) -> Path:
    for name, payload in jpeg_members():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    return folder


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_files(folder: Path, compress: bool = True, train: int = 5, test: int = 3) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        payload = idx_bytes(array, 0x803 if array.ndim == 3 else 0x801)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return arrays


# --- CIFAR-10 pickles -------------------------------------------------------------------------


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_pickles_load_exactly(tmp_path, point_at_folder):
    folder = tmp_path / "cifar-10-batches-py"
    written = write_cifar_pickles(folder)
    dataset = load_dataset("cifar10", folder if point_at_folder else tmp_path)

    assert dataset.name == "CIFAR-10"
    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train_inputs.shape == (15, 3, 32, 32)
    assert dataset.test_inputs.shape == (4, 3, 32, 32)
    assert dataset.train_inputs.dtype == torch.uint8 and dataset.train_inputs.is_contiguous()
    assert dataset.train_labels.dtype == torch.int64
    train = np.concatenate(written["train_data"])
    # Row-major RGB planes: value k of a row is channel k // 1024, y (k % 1024) // 32, x k % 32.
    assert dataset.train_inputs[4, 2, 5, 7].item() == train[4, 2 * 1024 + 5 * 32 + 7]
    assert np.array_equal(dataset.train_inputs.numpy().reshape(15, -1), train)
    assert np.array_equal(dataset.test_inputs.numpy().reshape(4, -1), written["test_data"])
    assert dataset.train_labels.tolist() == written["train_labels"]
    assert dataset.test_labels.tolist() == written["test_labels"]
    assert (dataset.num_classes, dataset.in_channels, dataset.image_size) == (10, 3, 32)
    assert dataset.mean == cifar10.CIFAR10_MEAN and dataset.std == cifar10.CIFAR10_STD
    assert dataset.crop_padding == 4 and dataset.flip


def test_cifar10_partial_copy_names_the_missing_file(tmp_path):
    write_cifar_pickles(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="lacks data_batch_3"):
        load_dataset("cifar10", tmp_path)


# --- CIFAR-10 as JPEG -------------------------------------------------------------------------


def check_jpeg_dataset(dataset: ImageDataset) -> None:
    assert dataset.name == "CIFAR-10 (JPEG)"
    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.train_inputs.shape == (20, 3, 8, 8)
    assert dataset.test_inputs.shape == (10, 3, 8, 8)
    assert dataset.train_inputs.dtype == torch.uint8
    assert dataset.train_labels.dtype == torch.int64
    assert dataset.train_labels.tolist() == [label for label in range(10) for _ in range(2)]
    assert dataset.test_labels.tolist() == list(range(10))
    # Sorted by class, then file name: sample 2 * label + index has colour(label, index).
    expected = torch.tensor([colour(label, i) for label in range(10) for i in range(2)])
    mean_rgb = dataset.train_inputs.float().mean((2, 3))
    assert (mean_rgb - expected).abs().max() < 6  # JPEG is lossy, but solid colours survive
    assert (dataset.test_inputs.float().mean((2, 3)) - expected[::2]).abs().max() < 6
    assert dataset.crop_padding == 4 and dataset.flip


@pytest.mark.parametrize("prefix", ["", "./", "cifar10-jpeg/"])
def test_jpeg_archive_is_read_in_place(tmp_path, prefix):
    write_jpeg_archive(tmp_path / "data" / "cifar10-jpeg.tar.gz", prefix)
    dataset = load_dataset("cifar10-jpeg", tmp_path / "data", cache_dir=tmp_path / "cache",
                           progress=False)
    check_jpeg_dataset(dataset)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar10-jpeg.tar.gz"]


@pytest.mark.parametrize("subfolder", ["cifar10-jpeg", ""])
def test_jpeg_extracted_folder(tmp_path, subfolder):
    write_jpeg_folder(tmp_path / "data" / subfolder)
    dataset = load_dataset("cifar10-jpeg", tmp_path / "data", cache_dir=tmp_path / "cache",
                           progress=False)
    check_jpeg_dataset(dataset)


def test_jpeg_second_load_reads_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_jpeg_archive(root / "cifar10-jpeg.tar.gz")
    monkeypatch.setenv("DEPTHCUT_CACHE", str(tmp_path / "env-cache"))
    first = load_dataset("cifar10-jpeg", root, progress=False)  # cache_dir from the env var
    cached = list((tmp_path / "env-cache").glob("*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "env-cache").glob("*.tmp"))

    def no_decoding(payload):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(image_folder, "decode_image", no_decoding)
    second = load_dataset("cifar10-jpeg", root, progress=False)
    for field in ("train_inputs", "train_labels", "test_inputs", "test_labels"):
        assert torch.equal(getattr(first, field), getattr(second, field))
    assert second.classes == first.classes


def test_jpeg_cache_is_keyed_by_content(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_jpeg_folder(root)
    load_dataset("cifar10-jpeg", root, cache_dir=cache, progress=False)
    extra = root / "test" / "cat" / "0001.jpg"
    extra.write_bytes(jpeg_bytes(colour(3, 1)))
    dataset = load_dataset("cifar10-jpeg", root, cache_dir=cache, progress=False)
    assert len(dataset.test_inputs) == 11  # the change was seen, not a stale cache
    assert len(list(cache.glob("*.npz"))) == 2


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_jpeg_archive(root / "cifar10-jpeg.tar.gz")
    first = load_dataset("cifar10-jpeg", root, cache_dir=cache, progress=False)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="cache"):
        rebuilt = load_dataset("cifar10-jpeg", root, cache_dir=cache, progress=False)
    assert torch.equal(rebuilt.train_inputs, first.train_inputs)
    monkeypatch.setattr(image_folder, "decode_image", lambda payload: 1 / 0)
    again = load_dataset("cifar10-jpeg", root, cache_dir=cache, progress=False)  # fixed file
    assert torch.equal(again.test_inputs, first.test_inputs)


def test_jpeg_with_mixed_sizes_is_rejected(tmp_path):
    write_jpeg_folder(tmp_path)
    (tmp_path / "train" / "dog" / "0000.jpg").write_bytes(jpeg_bytes((1, 2, 3), size=9))
    with pytest.raises(ValueError, match="same size"):
        load_dataset("cifar10-jpeg", tmp_path, cache_dir=tmp_path / "cache", progress=False)


# --- Fashion-MNIST IDX ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "compress"),
    [("fashion-mnist", True), ("FashionMNIST/raw", False), ("", True)],
)
def test_fashion_mnist_idx_load_exactly(tmp_path, folder, compress):
    arrays = write_idx_files(tmp_path / folder, compress=compress)
    dataset = load_dataset("fashion-mnist", tmp_path)
    assert dataset.name == "Fashion-MNIST"
    assert dataset.train_inputs.shape == (5, 1, 28, 28)
    assert dataset.test_inputs.shape == (3, 1, 28, 28)
    assert dataset.train_inputs.dtype == torch.uint8 and dataset.test_labels.dtype == torch.int64
    assert np.array_equal(dataset.train_inputs[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(dataset.test_inputs[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert dataset.train_labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert dataset.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert dataset.classes[0] == "T-shirt/top" and dataset.classes[9] == "Ankle boot"
    assert (dataset.in_channels, dataset.image_size, dataset.crop_padding) == (1, 28, 2)
    assert dataset.mean == (0.2860,) and dataset.std == (0.3530,)


def test_malformed_idx_magic_names_the_file(tmp_path):
    write_idx_files(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8), 0x803)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*magic"):
        load_dataset("fashion-mnist", tmp_path)


def test_truncated_idx_is_rejected(tmp_path):
    write_idx_files(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", tmp_path)


def test_real_fashion_mnist():
    if not (REAL_DATA / "fashion-mnist").is_dir():
        pytest.skip(f"no real Fashion-MNIST at {REAL_DATA}")
    dataset = load_dataset("fashion-mnist", REAL_DATA)
    assert dataset.train_inputs.shape == (60000, 1, 28, 28)
    assert dataset.test_inputs.shape == (10000, 1, 28, 28)
    assert dataset.train_labels.min() == 0 and dataset.train_labels.max() == 9
    assert dataset.test_labels.bincount().tolist() == [1000] * 10


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", ["CIFAR-10", "cifar-10-batches-py", "data_batch_1", "download=True"]),
        ("cifar10-jpeg", ["CIFAR-10 (JPEG)", "cifar10-jpeg.tar.gz", "train/<class>/*.jpg"]),
        ("fashion-mnist", ["Fashion-MNIST", "FashionMNIST/raw", "train-images-idx3-ubyte"]),
    ],
)
def test_missing_dataset_says_what_was_expected(tmp_path, name, expected):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root, cache_dir=tmp_path / "cache")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for text in [str(root), *expected]:
        assert text in message


@pytest.mark.parametrize("name", dataset_names())
def test_root_of_the_wrong_kind(tmp_path, name):
    """A file where a folder is expected, or a folder where a file is (textfile)."""
    if dataset_spec(name).root_is_file:
        root, found = tmp_path / "a-folder", "is a folder, not a file"
        root.mkdir()
    else:
        root, found = tmp_path / "a-file", "is a file, not a folder"
        root.write_text("x")
    with pytest.raises(DatasetNotFoundError, match=found):
        load_dataset(name, root, cache_dir=tmp_path / "cache")


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="cifar10, cifar10-jpeg, fashion-mnist"):
        load_dataset("imagenet", tmp_path)


# --- split_indices ------------------------------------------------------------------------------


def test_split_indices_disjoint_cover_and_seeded():
    train, val = split_indices(100, 0.2, seed=3)
    assert len(train) == 80 and len(val) == 20
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again_train, again_val = split_indices(100, 0.2, seed=3)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    other_train, _ = split_indices(100, 0.2, seed=4)
    assert not torch.equal(train, other_train)
    assert train.dtype == torch.int64


def test_split_indices_subset_and_no_val():
    train, val = split_indices(50, 0.1, seed=0, subset=7)
    full_train, full_val = split_indices(50, 0.1, seed=0)
    assert torch.equal(train, full_train[:7]) and torch.equal(val, full_val)
    train, val = split_indices(50, 0.0, seed=0)
    assert len(train) == 50 and len(val) == 0


@pytest.mark.parametrize(
    "kwargs", [{"val_fraction": 1.0}, {"val_fraction": -0.1}, {"val_fraction": 1.5},
               {"val_fraction": 0.1, "subset": 0}, {"val_fraction": 0.1, "subset": 1000}],
)
def test_split_indices_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        split_indices(100, seed=0, **kwargs)


# --- augment ------------------------------------------------------------------------------------


def candidates(image: torch.Tensor, padding: int):
    """Every crop of the zero-padded image, plain and flipped."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop.flip(-1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_crops_and_flips_each_sample(dtype):
    n, padding = 40, 2
    images = (torch.arange(n * 3 * 5 * 6).reshape(n, 3, 5, 6) % 250 + 1).to(dtype)
    out = augment(images, padding, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == dtype
    chosen = []
    for image, result in zip(images, out, strict=True):
        matches = [key for key, crop in candidates(image, padding) if torch.equal(crop, result)]
        assert matches, "output is not a crop of the padded input"
        chosen.append(matches[0])
    assert len({key[:2] for key in chosen}) > 5  # offsets vary per sample
    assert {key[2] for key in chosen} == {False, True}  # some flipped, some not
    again = augment(images, padding, flip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_augment_identity_and_flip_only():
    images = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(augment(images, 0, flip=False), images)
    flipped = augment(images, 0, flip=True, generator=torch.Generator().manual_seed(1))
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and mirrored.any() and same.any()
    assert augment(images, 1, flip=True).shape == images.shape  # global RNG


# --- BatchLoader --------------------------------------------------------------------------------


def loader_data(n: int = 10):
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return images, torch.arange(n)


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def test_batch_loader_lengths_and_order():
    images, labels = loader_data()
    loader = BatchLoader(images, labels, batch_size=4, mean=MEAN, std=STD)
    assert len(loader) == 3 and loader.num_samples == 10
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == list(range(10))
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (4, 3, 4, 4)
    dropping = BatchLoader(images, labels, batch_size=4, mean=MEAN, std=STD, drop_last=True)
    assert len(dropping) == 2 and len(list(dropping)) == 2


def test_batch_loader_normalises_exactly():
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    images[1, 2, 0, 1] = 51
    x, _ = next(iter(BatchLoader(images, torch.zeros(2), batch_size=2, mean=MEAN, std=STD)))
    assert x[1, 2, 0, 1].item() == pytest.approx((51 / 255 - 0.3) / 0.5, abs=1e-6)
    assert x[0, 0, 0, 0].item() == pytest.approx(-0.5 / 0.2, abs=1e-6)


def test_batch_loader_shuffles_reproducibly_per_epoch():
    images, labels = loader_data(30)
    kwargs = {"batch_size": 8, "mean": MEAN, "std": STD, "shuffle": True, "augment": True,
              "crop_padding": 1, "flip": True, "seed": 5}
    first, second = BatchLoader(images, labels, **kwargs), BatchLoader(images, labels, **kwargs)
    epochs = []
    for _ in range(2):
        batches_a, batches_b = list(first), list(second)
        order = torch.cat([y for _, y in batches_a])
        assert sorted(order.tolist()) == list(range(30))  # every sample once per epoch
        for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1])


def test_batch_loader_channels_last():
    images, labels = loader_data()
    for channels_last in (False, True):
        loader = BatchLoader(images, labels, batch_size=4, mean=MEAN, std=STD,
                             channels_last=channels_last, augment=True, crop_padding=1)
        x, _ = next(iter(loader))
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert x.is_contiguous() != channels_last


def test_batch_loader_rejects_bad_input():
    images, labels = loader_data()
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(images.float(), labels, batch_size=2, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="mean and std"):
        BatchLoader(images, labels, batch_size=2, mean=(0.5,), std=(0.2,))


# --- make_splits --------------------------------------------------------------------------------


def tiny_dataset(n: int = 50) -> ImageDataset:
    images, labels = loader_data(n)
    return ImageDataset(
        name="tiny", train_inputs=images, train_labels=labels, test_inputs=images[:7],
        test_labels=labels[:7], classes=[str(i) for i in range(n)], mean=MEAN, std=STD,
        crop_padding=1, flip=True,
    )


def test_make_splits():
    dataset = tiny_dataset()
    splits = make_splits(dataset, val_fraction=0.2, batch_size=8, eval_batch_size=16, seed=1)
    assert splits.dataset is dataset
    sizes = (splits.train.num_samples, splits.val.num_samples, splits.test.num_samples)
    assert sizes == (40, 10, 7)
    assert splits.train.shuffle and splits.train.augment and splits.train.crop_padding == 1
    assert not splits.train_eval.shuffle and not splits.train_eval.augment
    train_ids = torch.cat([y for _, y in splits.train_eval])
    val_ids = torch.cat([y for _, y in splits.val])
    expected_train, expected_val = split_indices(50, 0.2, seed=1)
    assert torch.equal(train_ids, expected_train) and torch.equal(val_ids, expected_val)
    assert sorted(torch.cat([y for _, y in splits.train]).tolist()) == sorted(train_ids.tolist())
    assert splits.train.inputs is splits.train_eval.inputs  # one copy of the subset

    subset = make_splits(dataset, val_fraction=0.0, train_subset=12, batch_size=8)
    assert subset.val is None and subset.train.num_samples == 12 and len(subset.train) == 1
