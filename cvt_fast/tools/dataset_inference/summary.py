"""What rank 0 prints at the end: what the output holds (its unreadable images named), and where the time went."""

from __future__ import annotations

import math
from pathlib import Path

from .model_loop import ShardTimes
from .results import parse_line

UNREADABLE_SHOWN = 20


def summary_lines(
    output: Path, lines: list[str], ranks: list[ShardTimes], earlier: int, wall_s: float, setup_s: float
) -> list[str]:
    """What the output holds (unreadable images named), then this run's throughput."""
    # (the substring first: parsing a million lines for a handful of errors would cost seconds)
    candidates = [parse_line(line) for line in lines if '"error": ' in line]
    unreadable = [record for record in candidates if record is not None and "error" in record]
    text = [
        f"{output}: {len(lines)} images, {len(lines) - len(unreadable)} classified, {len(unreadable)} unreadable "
        "(one line each, sorted by path)"
    ]
    if unreadable:
        text.append("unreadable images:")
        text += [f"  {record['path']}: {record['error']}" for record in unreadable[:UNREADABLE_SHOWN]]
        if len(unreadable) > UNREADABLE_SHOWN:
            text.append(f'  ... and {len(unreadable) - UNREADABLE_SHOWN} more (the lines with an "error")')
    return text + throughput_lines(ranks, earlier, wall_s, setup_s)


def throughput_lines(ranks: list[ShardTimes], earlier: int, wall_s: float, setup_s: float) -> list[str]:
    """End to end images/s and where the time went: decoding and preprocessing (loader workers) against the model."""
    images = sum(r.images for r in ranks)
    before = f"; {earlier} done by an earlier run" if earlier else ""
    if images == 0:
        return [f"this run: nothing left to do{before}"]
    processes = len(ranks)
    decode_s, model_s, wait_s = (sum(getattr(r, name) for r in ranks) for name in ("decode_s", "model_s", "wait_s"))
    workers = sum(r.workers for r in ranks)
    per_worker = images / decode_s if decode_s > 0 else math.inf
    classified = images - sum(r.unreadable for r in ranks)
    per_process = classified / model_s if model_s > 0 else math.inf  # the processes' model times summed
    where = f"loader-worker time ({workers} worker(s) in all)" if workers else "main-process time (--workers 0)"
    unit = "worker" if workers else "process"
    share = wait_s / processes / wall_s
    text = [
        f"this run: {images} images in {wall_s:.1f} s on {processes} process(es), {images / wall_s:.1f} images/s end "
        f"to end (setup before it: {setup_s:.1f} s, listing and model load){before}",
        f"  decode + preprocess: {decode_s:.2f} s of {where}, {per_worker:.1f} images/s per {unit}",
        f"  model: {model_s / processes:.2f} s per process, {per_process:.1f} images/s per process",
        f"  waiting for the loader: {wait_s / processes:.2f} s per process ({share:.0%} of the run)",
    ]
    if workers and math.isfinite(per_worker) and math.isfinite(per_process):
        needed = math.ceil(per_process / per_worker)
        text.append(f"  at these rates one model process keeps about {needed} loader worker(s) busy")
    return text
