"""A split's decoded images spilled to an anonymous file, read back by row.

A stage that visits a split's images many times (a specialist's periodic val accuracy, its
dustbin fit) decodes the shards once into this file instead of holding the images in memory:
memory then stays one chunk of images whatever the split's size, and the disk holds N rows of
uint8 (C, S, S). The file is unlinked as soon as it is created (``tempfile.TemporaryFile``), so
it vanishes with the process, even one that is killed. Rows are read with plain reads, not a
memory map, so they never count as the process's resident memory beyond the copy returned.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


class ImageFile:
    """uint8 images of one shape (C, S, S), appended in order, read back by row indices."""

    def __init__(self, shape: tuple[int, ...], *, folder: str | Path | None = None) -> None:
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.shape = tuple(int(s) for s in shape)
        self.row_bytes = int(np.prod(self.shape))
        self.count = 0
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".images-")

    def append(self, images: torch.Tensor) -> None:
        """Add uint8 images (B, *shape) after the rows already there."""
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"expected uint8 images of shape (B, {self.shape}), got {images.dtype} "
                             f"{tuple(images.shape)}")
        self._file.seek(self.count * self.row_bytes)
        self._file.write(images.contiguous().numpy().tobytes())
        self.count += len(images)

    def read(self, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 images (len(rows), *shape) of the given rows, in the given (ascending) order."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.row_bytes), dtype=np.uint8)
        if len(rows):
            if rows.min() < 0 or rows.max() >= self.count:
                raise IndexError(f"rows outside 0..{self.count - 1}")
            for start, stop in _runs(rows):  # one read per run of consecutive rows
                self._file.seek(int(rows[start]) * self.row_bytes)
                self._file.readinto(memoryview(out[start:stop]).cast("B"))
        return torch.from_numpy(out).view(len(rows), *self.shape)

    def chunks(self, rows: torch.Tensor | np.ndarray, size: int) -> Iterator[torch.Tensor]:
        """The images of ``rows`` in pieces of ``size`` rows (the last one shorter)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        for start in range(0, len(rows), size):
            yield self.read(rows[start : start + size])

    def close(self) -> None:
        self._file.close()


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) positions in ``rows`` of its maximal runs of consecutive values."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    return list(zip(edges[:-1], edges[1:], strict=True))
