"""Decoding and preprocessing in the DataLoader's workers: the dataset of image files, and the batches it collates
(stacked by image size, the unreadable ones with their reasons, the decoding time)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .images import UnreadableImage, read_pixel_values


class PathTable:
    """Paths as one byte buffer and an offset array. A forked DataLoader worker that indexes a Python list of a
    million strings touches their reference counts and so copies the list into its own memory, page by page; numpy
    buffers have no per-path objects to touch."""

    def __init__(self, paths: Sequence[str]):
        encoded = [path.encode("utf-8", "surrogateescape") for path in paths]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.buffer[self.offsets[index] : self.offsets[index + 1]].tobytes().decode("utf-8", "surrogateescape")


class ImageFiles(torch.utils.data.Dataset):
    """Item i: (i, pixel values or None, why not or None, seconds spent decoding and preprocessing)."""

    def __init__(self, paths: Sequence[str], processor):
        self.paths = PathTable(paths)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None, float]:
        start = time.perf_counter()
        try:
            pixels, error = read_pixel_values(self.paths[index], self.processor), None
        except UnreadableImage as unreadable:
            pixels, error = None, unreadable.reason
        except Exception as failure:  # whatever else one odd file provokes, it must not end a million-image run
            from ...errors import one_line

            pixels, error = None, f"failed in decoding or preprocessing ({type(failure).__name__}: {one_line(failure)})"
        return index, pixels, error, time.perf_counter() - start


@dataclass
class Batch:
    groups: list[tuple[list[int], torch.Tensor]]  # indices and their (n, 3, H, W) pixels, one group per image size
    errors: list[tuple[int, str]]  # index, why it could not be read
    decode_s: float  # decoding + preprocessing time summed over the batch's images (in the worker)

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this for a custom batch type
        return Batch([(i, pixels.pin_memory()) for i, pixels in self.groups], self.errors, self.decode_s)


def collate(items: list[tuple[int, np.ndarray | None, str | None, float]]) -> Batch:
    """Stack the readable images by size (a preprocessor without resizing leaves sizes as they came)."""
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    errors = []
    for index, pixels, error, _ in items:
        if pixels is None:
            errors.append((index, error))
        else:
            by_shape.setdefault(pixels.shape, []).append((index, pixels))
    groups = [([i for i, _ in group], torch.from_numpy(np.stack([p for _, p in group]))) for group in by_shape.values()]
    return Batch(groups, errors, sum(item[3] for item in items))
