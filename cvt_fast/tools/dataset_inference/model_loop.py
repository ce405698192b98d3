"""One rank's shard through the model: batches from the loader in, each batch's result lines appended to the rank's
part file in one write, and the rank's timings out."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .loader import Batch, ImageFiles, collate
from .results import result_line


@dataclass
class ShardTimes:
    """One rank's figures for this run; rank 0 sums them over the ranks."""

    images: int = 0
    unreadable: int = 0
    decode_s: float = 0.0  # in the loader workers (or the main process with --workers 0), summed over images
    model_s: float = 0.0  # host-to-device copy, forward, top-k and the copy back (which synchronises)
    wait_s: float = 0.0  # the model loop waiting for the loader
    workers: int = 0


def classify_shard(
    model, paths: Sequence[str], processor, part, *, batch_size: int, workers: int, top_k: int, progress=None
) -> ShardTimes:
    """Classify `paths`, appending each batch's lines (sorted by path) to the open binary file `part` in one write."""
    times = ShardTimes(workers=workers)
    if not paths:
        return times
    with warnings.catch_warnings():
        # PyTorch warns, twice in every process, when the workers outnumber the cores; rank 0 has said so once
        # (run.py), with the numbers for the whole machine.
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        loader = torch.utils.data.DataLoader(
            ImageFiles(paths, processor),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=model.device.type == "cuda",
            prefetch_factor=4 if workers else None,  # batches in flight per worker: rides out a slow file or two
        )
        batches = iter(loader)
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)
        times.wait_s += time.perf_counter() - waited
        if batch is None:
            break
        ran = time.perf_counter()
        lines, unreadable = classify_batch(model, batch, paths, top_k)
        times.model_s += time.perf_counter() - ran
        part.write("".join(lines).encode())  # one write of whole lines: a kill leaves at most one torn line
        times.images += len(lines)
        times.unreadable += unreadable
        times.decode_s += batch.decode_s
        if progress is not None:
            progress.update(times.images)
    return times


def classify_batch(model, batch: Batch, paths: Sequence[str], top_k: int) -> tuple[list[str], int]:
    """The batch's result lines in index order, and how many of them report an unreadable image."""
    from ...checks import check_image_size

    lines = {index: result_line(paths[index], error=reason) for index, reason in batch.errors}
    unreadable = len(batch.errors)
    names = model.config.id2label
    for indices, pixels in batch.groups:
        try:  # only a preprocessor that keeps sizes as they come can hand the model images it cannot take
            check_image_size(model.config, *pixels.shape[-2:])
            with torch.inference_mode():
                # copy from the pinned float32 batch first, then cast on the device: a cast on the way would be
                # made on the CPU, into unpinned memory, and make the copy a synchronous one
                logits = model(pixels.to(model.device, non_blocking=True).to(model.dtype)).logits
        except ValueError as error:  # the model's input checks: the same answer for every image of this size
            lines.update({i: result_line(paths[i], error=f"after preprocessing, {error}") for i in indices})
            unreadable += len(indices)
            continue
        top = logits.float().softmax(-1).topk(min(top_k, logits.shape[-1]))
        for index, scores, ids in zip(indices, top.values.tolist(), top.indices.tolist(), strict=True):
            labels = [names.get(i, f"LABEL_{i}") for i in ids]
            lines[index] = result_line(paths[index], labels=labels, scores=scores, label_ids=ids)
    return [lines[index] for index in sorted(lines)], unreadable
