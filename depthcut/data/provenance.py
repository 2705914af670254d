"""What a run and its checkpoints record about their data, and the checks that read it back.

A model is only meaningful on inputs of the shape it was trained at: a dense checkpoint made on
96 px images must not be finetuned on 64 px ones (a CNN with global pooling would run, silently
worse), and a report must not put runs at different sizes or on different data in one table.
Checkpoints keep `data_origin` in their origin, run folders `data_record` in config.json.
"""

from __future__ import annotations

from collections.abc import Mapping

from depthcut.data.arrays import ArrayDataset, ImageDataset


def input_shape(dataset: ArrayDataset) -> list[int]:
    """One input's shape: (C, H, W) for images, (T,) for token ids."""
    return [int(s) for s in dataset.test_inputs.shape[1:]]


def data_origin(dataset: ArrayDataset, image_size: int | None) -> dict:
    """What a checkpoint keeps about its data, beside the dataset key and root: the true name,
    the input shape and the `--image-size` asked for (to load the data the same way again)."""
    return {"dataset_name": dataset.name, "input_shape": input_shape(dataset),
            "image_size": image_size}


def data_record(dataset: ArrayDataset) -> dict:
    """What config.json keeps about the data beyond the settings: its true name (an image
    folder is named after its folder), and for images their treatment and any files left out."""
    record: dict = {"dataset_name": dataset.name}
    if isinstance(dataset, ImageDataset):
        record["images"] = {
            "augmentation": dataset.augmentation or (
                f"pad-crop {dataset.crop_padding} + flip" if dataset.flip else
                f"pad-crop {dataset.crop_padding}"),
            "mean": list(dataset.mean), "std": list(dataset.std),
            "train_images": len(dataset.train_inputs), "test_images": len(dataset.test_inputs),
            "skipped_unreadable": len(dataset.skipped),
            "skipped_files": list(dataset.skipped[:100]),
        }
    return record


def input_shape_mismatch(origin: Mapping, dataset: ArrayDataset) -> list[str]:
    """[a description] when a checkpoint's recorded input shape differs from the dataset's
    (checkpoints written before the shape was recorded pass)."""
    recorded = origin.get("input_shape")
    if recorded is None or list(recorded) == input_shape(dataset):
        return []
    hint = f"pass --image-size {recorded[-1]} or " if len(recorded) == 3 else "use "
    return [f"input shape {'x'.join(map(str, recorded))} (this data: "
            f"{'x'.join(map(str, input_shape(dataset)))}; {hint}a checkpoint made at this "
            "input shape)"]
