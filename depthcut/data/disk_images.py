"""uint8 images kept on disk in a ``.npy`` file and read a batch at a time.

A dataset larger than memory (ImageNet at 224 px is ~190 GB decoded) cannot be a tensor. Its
images are decoded once into a ``.npy`` file (`NpyRowWriter`, rows written in order with plain
writes, never through a mapping) and `DiskImages` reads only the rows a batch asks for, with
``os.preadv`` into a fresh buffer. The file is an ordinary ``.npy``, so ``np.load(path,
mmap_mode="r")`` maps it too; depthcut reads with ``preadv`` rather than through a mapping so
that the pages an epoch touched stay in the kernel's page cache, not in the process's resident
memory: a run over a 9 GB file keeps the batch in memory, not the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from depthcut.data.errors import DatasetError

_MAX_BUFFERS = 512  # buffers per preadv call (the system's IOV_MAX is 1024)


class NpyRowWriter:
    """Writes a uint8 (N, *row_shape) ``.npy`` file row by row (any order of `write` calls whose
    rows cover 0..N-1); RSS holds one row, not the file."""

    def __init__(self, path: Path, count: int, row_shape: Sequence[int]) -> None:
        self.path = Path(path)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.row_bytes = int(np.prod(self.row_shape))
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, *self.row_shape)}
        self._handle = self.path.open("wb")
        np.lib.format.write_array_header_1_0(self._handle, header)
        self.offset = self._handle.tell()
        self._handle.truncate(self.offset + count * self.row_bytes)

    def write(self, index: int, row: np.ndarray) -> None:
        if row.shape != self.row_shape or row.dtype != np.uint8:
            raise ValueError(f"row {index}: expected uint8 {self.row_shape}, got "
                             f"{row.dtype} {row.shape}")
        os.pwrite(self._handle.fileno(), np.ascontiguousarray(row).data,
                  self.offset + index * self.row_bytes)

    def close(self) -> None:
        self._handle.close()


class DiskImages:
    """Read-only uint8 (N, C, H, W) images in a ``.npy`` file, optionally a subset of its rows.

    What a loader needs from an image tensor, and no more: `shape`, `dtype`, `dim()`, `len`,
    ``images[index_tensor]`` (reads those rows into a new tensor) and ``images[a:b]`` (a lazy
    view). `subset(indices)` is a lazy view too: splits and shards never copy the file.
    Picklable (the file is reopened in each process), so DDP ranks and workers share it.
    """

    def __init__(self, path: str | Path, rows: torch.Tensor | None = None) -> None:
        self.path = Path(path)
        with self.path.open("rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(handle)
            except ValueError as error:
                raise DatasetError(f"{self.path}: not a .npy file ({error})") from error
            self._offset = handle.tell()
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise DatasetError(f"{self.path}: expected C-order uint8 (N, C, H, W) images, got "
                               f"{dtype} {shape}")
        expected = self._offset + int(np.prod(shape))
        if self.path.stat().st_size < expected:
            raise DatasetError(f"{self.path}: truncated ({self.path.stat().st_size} of "
                               f"{expected} bytes)")
        self._file_rows = int(shape[0])
        self._row_shape = tuple(int(s) for s in shape[1:])
        self._row_bytes = int(np.prod(self._row_shape))
        self.rows = rows  # indices into the file's rows; None: all of them
        self._fd: int | None = None

    # -- what a tensor of images offers ---------------------------------------------------------
    dtype = torch.uint8
    device = torch.device("cpu")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._row_shape))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return self._file_rows if self.rows is None else len(self.rows)

    def __getitem__(self, index: slice | torch.Tensor | Sequence[int]) -> DiskImages | torch.Tensor:
        if isinstance(index, slice):
            return self.subset(torch.arange(len(self))[index])
        return self.read(torch.as_tensor(index, dtype=torch.int64))

    def subset(self, indices: torch.Tensor) -> DiskImages:
        """A lazy view of rows `indices` of this view."""
        indices = torch.as_tensor(indices, dtype=torch.int64).cpu()
        view = DiskImages.__new__(DiskImages)
        view.__dict__.update(self.__dict__)
        view._fd = None
        view.rows = indices if self.rows is None else self.rows[indices]
        return view

    def read(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` of this view as a new uint8 tensor, in that order. Rows are read in
        file order, each run of neighbouring rows with one ``preadv``."""
        indices = indices.cpu().reshape(-1)
        if len(indices) and (int(indices.min()) < -len(self) or int(indices.max()) >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} images")
        indices = indices % max(len(self), 1)
        file_rows = indices if self.rows is None else self.rows[indices]
        out = np.empty((len(file_rows), *self._row_shape), dtype=np.uint8)
        if not len(file_rows):
            return torch.from_numpy(out)
        order = torch.argsort(file_rows)
        sorted_rows = file_rows[order].tolist()
        destination = order.tolist()
        fd = self._descriptor()
        start = 0
        while start < len(sorted_rows):
            end = start + 1
            while (end < len(sorted_rows) and end - start < _MAX_BUFFERS
                   and sorted_rows[end] == sorted_rows[end - 1] + 1):
                end += 1
            buffers = [memoryview(out[destination[i]]).cast("B") for i in range(start, end)]
            offset = self._offset + sorted_rows[start] * self._row_bytes
            read = os.preadv(fd, buffers, offset)
            if read != (end - start) * self._row_bytes:
                raise DatasetError(f"{self.path}: short read at row {sorted_rows[start]}")
            start = end
        return torch.from_numpy(out)

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"DiskImages({self.path}, shape={tuple(self.shape)})"


def is_on_disk(images: object) -> bool:
    return isinstance(images, DiskImages)
