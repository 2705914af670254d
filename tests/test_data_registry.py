"""The dataset registry: a dataset declared in a test file loads through `load_dataset` with no
other edit, and every registered dataset keeps the registry's promises."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from depthcut.data import (
    DatasetNotFoundError,
    DatasetSpec,
    ImageDataset,
    TokenDataset,
    dataset_names,
    dataset_spec,
    display_name,
    load_dataset,
    make_splits,
    register,
    unregister,
)
from depthcut.errors import ConfigError


def load_random(spec: DatasetSpec, root: Path, *, cache_dir: str | Path | None,
                progress: bool) -> ImageDataset | TokenDataset:
    """A loader that reads nothing: random arrays of the spec's kind and shape."""
    if not (root / "present").is_file():
        raise spec.not_found(root, [f"{root} holds no 'present' file"])
    generator = torch.Generator().manual_seed(0)
    shape, classes = spec.sample_shape, ["no", "yes"]
    labels = torch.randint(0, 2, (40,), generator=generator)
    if spec.kind == "tokens":
        tokens = torch.randint(0, 9, (40, *shape), generator=generator)
        return TokenDataset(name=spec.display_name, train_inputs=tokens[:30],
                            train_labels=labels[:30], test_inputs=tokens[30:],
                            test_labels=labels[30:], classes=classes, vocab_size=9, pad_id=0)
    images = torch.randint(0, 256, (40, *shape), dtype=torch.uint8, generator=generator)
    return ImageDataset(name=spec.display_name, train_inputs=images[:30],
                        train_labels=labels[:30], test_inputs=images[30:],
                        test_labels=labels[30:], classes=classes, mean=(0.5,), std=(0.25,),
                        crop_padding=1, flip=True)


def tiny_spec(kind: str) -> DatasetSpec:
    return DatasetSpec(
        key=f"tiny-{kind}",
        display_name=f"Tiny ({kind})",
        kind=kind,
        sample_shape=(1, 6, 6) if kind == "images" else (5,),
        layouts=lambda root: [f"{root}/present"],
        hint="create the file 'present' in root.",
        loader=load_random,
    )


@pytest.fixture(params=["images", "tokens"])
def tiny(request) -> Iterator[DatasetSpec]:
    spec = register(tiny_spec(request.param))
    yield spec
    unregister(spec.key)


def test_a_dataset_declared_here_loads_by_name(tiny, tmp_path):
    assert tiny.key in dataset_names() and tiny.key in dataset_names(kind=tiny.kind)
    (tmp_path / "present").touch()
    dataset = load_dataset(tiny.key.upper().replace("-", "_"), tmp_path)
    assert dataset.kind == tiny.kind and dataset.name == tiny.display_name
    assert tuple(dataset.train_inputs.shape[1:]) == tiny.sample_shape
    assert display_name(tiny.key) == tiny.display_name
    splits = make_splits(dataset, val_fraction=0.2, batch_size=4, seed=1)
    inputs, labels = next(iter(splits.train))
    assert inputs.shape[0] == 4 and labels.dtype == torch.int64
    assert inputs.dtype == (torch.float32 if tiny.kind == "images" else torch.int64)


def test_a_dataset_declared_here_says_what_is_missing(tiny, tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(tiny.key, tmp_path)
    message = str(info.value)
    for text in (tiny.display_name, f"{tmp_path}/present", "holds no 'present' file",
                 "Hint: create the file 'present' in root."):
        assert text in message


def test_unregistered_names_are_unknown(tmp_path):
    spec = register(tiny_spec("images"))
    unregister(spec.key)
    assert spec.key not in dataset_names() and display_name(spec.key) == spec.key
    with pytest.raises(ConfigError, match="unknown dataset 'tiny-images'; known datasets: "):
        load_dataset(spec.key, tmp_path)


def test_registering_twice_or_a_bad_spec_is_refused(tiny):
    with pytest.raises(ValueError, match="registered twice"):
        register(tiny)
    with pytest.raises(ValueError, match="kind"):
        DatasetSpec(key="odd", display_name="Odd", kind="audio", sample_shape=None,
                    layouts=lambda root: [], hint="", loader=load_random)
    with pytest.raises(ValueError, match="lower case"):
        DatasetSpec(key="Odd_Name", display_name="Odd", kind="images", sample_shape=None,
                    layouts=lambda root: [], hint="", loader=load_random)


def test_a_loader_of_the_wrong_kind_is_a_bug(tmp_path):
    def load_tokens(spec: DatasetSpec, root: Path, **options) -> TokenDataset:
        return load_random(tiny_spec("tokens"), root, **options)

    register(replace(tiny_spec("images"), key="tiny-liar", loader=load_tokens))
    (tmp_path / "present").touch()
    try:
        with pytest.raises(TypeError, match="registered as images"):
            load_dataset("tiny-liar", tmp_path)
    finally:
        unregister("tiny-liar")


# --- every registered dataset -------------------------------------------------------------------


@pytest.mark.parametrize("name", dataset_names())
def test_every_dataset_names_its_layout_on_a_missing_root(tmp_path, name):
    spec = dataset_spec(name)
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"{spec.display_name} dataset not found under data root {root}.")
    assert all(f"  - {layout}" in message for layout in spec.layouts(root))
    assert message.endswith(f"Hint: {spec.hint}")


@pytest.mark.parametrize("name", dataset_names())
def test_every_dataset_declares_a_consistent_spec(name):
    spec = dataset_spec(name)
    assert spec.key == name and spec.display_name and spec.hint
    if spec.sample_shape is not None:
        assert len(spec.sample_shape) == (3 if spec.kind == "images" else 1)
