"""Re-encode CIFAR-10 (JPEG) at another size into an ImageFolder, for the data-scale tests.

    python scripts/make_imagefolder.py --size 224 --out /work/data224
    python scripts/make_imagefolder.py --size 64 --per-class 500 --out /work/data64-small

Reads ``cifar10-jpeg.tar.gz`` in place (no extraction), resizes every image (bicubic) to
SIZE x SIZE and writes ``OUT/train/<class>/NNNN.jpg`` and ``OUT/test/<class>/NNNN.jpg`` (JPEG
quality 90), optionally only the first PER_CLASS images of each class and split. The images are
upscaled CIFAR-10, so they carry no more detail than 32 px ones: this is data for measuring
size and speed (60,000 images at 224 px are 9.0 GB decoded), not for accuracy claims. Keep the
output outside the repository.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import tarfile
import time
from pathlib import Path, PurePosixPath

from PIL import Image

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[1] / "../shared/data/cifar10-jpeg.tar.gz"


def _encode(task: tuple[bytes, str, int, int]) -> int:
    data, target, size, quality = task
    with Image.open(io.BytesIO(data)) as image:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    resized.save(target, quality=quality)
    return 1


def _tasks(archive: Path, out: Path, size: int, per_class: int | None, quality: int):
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            parts = [p for p in PurePosixPath(member.name).parts if p != "."]
            if not member.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test"):
                continue
            split, cls, name = parts[-3:]
            if per_class is not None and int(Path(name).stem) >= per_class:
                continue
            target = out / split / cls / (Path(name).stem + ".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            handle = tar.extractfile(member)
            if handle is not None:
                yield handle.read(), str(target), size, quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--per-class", type=int, default=None,
                        help="only images 0..PER_CLASS-1 of each class and split")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    tasks = _tasks(args.archive, args.out, args.size, args.per_class, args.quality)
    with multiprocessing.Pool(args.workers) as pool:
        count = sum(pool.imap_unordered(_encode, tasks, chunksize=64))
    print(f"{count} images at {args.size} px in {args.out} "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
