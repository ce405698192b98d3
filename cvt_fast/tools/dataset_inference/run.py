"""The whole run on one rank, its steps in order (classify_dataset): its Options, the checks before any work, the
model's loading, this rank's share, then rank 0's merge and summary."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import Refused, UserError, one_line
from .images import Listing, list_images, listing_digest, shard
from .model_loop import ShardTimes, classify_shard
from .progress import Progress
from .ranks import Coordinator, Ranks
from .results import RunFiles, check_output, finished_results, merge
from .run_record import prepare_run_folder, run_record
from .summary import summary_lines

PROG = "cvt-fast classify"  # the command this module serves, which begins each line it prints for the user


@dataclass
class Options:
    source: str  # --input: a folder or a list file
    output: Path
    checkpoint: Path  # a local folder (a hub id already fetched)
    processor: Any
    batch_size: int
    workers: int | None  # None: default_workers()
    top_k: int
    device: str | None  # --device as given; None: CUDA when there is one
    backend: str  # resolved: "auto", "eager" or "triton"
    dtype: torch.dtype
    overwrite: bool = False
    frozen: Any = None  # a FrozenCvt loaded from a package (then `checkpoint` is the package's path)
    compile: bool = False  # freeze and compile the checkpoint for this CPU before classifying


def resolve_device(name: str | None, ranks: Ranks) -> torch.device:
    """--device for this rank: under torchrun, "cuda" without an index is this rank's GPU, cuda:LOCAL_RANK."""
    from ...checks import check_device

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = check_device(name)
    except ValueError as error:
        raise Refused(f"argument --device: {error}") from None
    if device.type != "cuda" or device.index is not None or ranks.world_size == 1:
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise Refused(
            f"argument --device: no cuda:{ranks.local_rank} for local rank {ranks.local_rank}: torchrun started "
            f"{ranks.local_world_size} processes on this machine, which has {torch.cuda.device_count()} GPU(s)"
        )
    return torch.device("cuda", ranks.local_rank)


def machine_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(device: torch.device, ranks: Ranks) -> int:
    """On a GPU, the machine's cores shared among its ranks, one kept for each rank's model loop (at most 16); on the
    CPU one, since there the model itself wants every core and decoding is a small share of its time."""
    if device.type != "cuda":
        return 1
    return max(1, min(16, machine_cores() // ranks.local_world_size - 1))


def classify_dataset(options: Options, ranks: Ranks | None = None, out=None, err=None) -> int:
    """The whole run on this rank; rank 0 merges and prints the summary to `out` (progress and notes go to `err`)."""
    ranks = ranks or Ranks.from_env()
    coordinator = Coordinator(ranks)
    err = err or sys.stderr
    try:
        return _run(options, ranks, coordinator, out or sys.stdout, err)
    except Refused as refused:
        if refused.agreed and coordinator.distributed:
            # torchrun stops the other processes as soon as one exits: rank 0 prints the refusal, and only then
            # does any rank leave, so that it is never lost with the process that would have printed it
            if ranks.rank == 0:
                for line in refused.lines:
                    print(f"{PROG}: {line}", file=err, flush=True)
            coordinator.gather(None)
            refused.reported = True
        raise
    finally:
        coordinator.close()


def _run(options: Options, ranks: Ranks, coordinator: Coordinator, out, err) -> int:
    setup_start = time.perf_counter()
    files = RunFiles(options.output)
    first = ranks.rank == 0
    listing, device, record = coordinator.agree(lambda: _look(options, ranks))
    if len(set(coordinator.gather(listing_digest(listing.paths)))) > 1:
        raise Refused(
            f"argument --input: the ranks listed {options.source} differently (is it changing?); every rank must see "
            "the same files"
        )
    notes = coordinator.agree(lambda: prepare_run_folder(files, record, options.overwrite) if first else [])
    if first:
        for note in listing.notes + notes:
            print(f"note: {note}", file=err)
    model = coordinator.agree(lambda: _load(options, device, err))
    # Every rank reads what is finished before any rank appends (agree() is a barrier): the same view, the same split.
    earlier, remaining, part = coordinator.agree(lambda: _finished_and_part(files, listing, ranks))
    mine = shard(remaining, ranks.rank, ranks.world_size)
    workers = options.workers if options.workers is not None else default_workers(device, ranks)
    if first and workers * ranks.local_world_size > machine_cores():
        print(
            f"note: {workers} decoding process(es) in each of {ranks.local_world_size} model process(es) share "
            f"{machine_cores()} cores with the models; the summary says how many are busy",
            file=err,
        )
    setup_s = time.perf_counter() - setup_start
    start = time.perf_counter()
    try:
        times = coordinator.agree(lambda: _classify_part(model, mine, part, workers, options, ranks, err))
    except KeyboardInterrupt:
        finished = finished_results(files)
        done = sum(path in finished for path in listing.paths)
        raise KeyboardInterrupt(
            f"{done} of {len(listing.paths)} images are classified (kept in {files.folder}); the same command "
            f"classifies the other {len(listing.paths) - done} and writes {files.output}"
        ) from None
    every_rank = coordinator.gather(times)  # rank 0 gets here once the slowest rank has finished
    wall_s = time.perf_counter() - start
    if not first:
        return 0
    merged = merge(files, listing.paths)
    for line in summary_lines(files.output, merged, every_rank, earlier, wall_s, setup_s):
        print(line, file=out)
    return 0


def _look(options: Options, ranks: Ranks):
    """Everything checked before a file is written or the model read: (listing, this rank's device, run record; the
    record on rank 0 only, which alone writes or checks it: it hashes every checkpoint file)."""
    listing = list_images(options.source)
    check_output(options.output, options.source, listing.paths)
    device = resolve_device(options.device, ranks)
    if (options.frozen is not None or options.compile) and device.type != "cpu":
        raise Refused(f"argument --device: a compiled model runs on the CPU, not on {device}")
    if options.frozen is None and not (options.checkpoint / "config.json").is_file():
        raise Refused(f"{options.checkpoint} has no config.json")
    with _as_refusals():
        _check_preprocessed_size(options)
        record = None
        if ranks.rank == 0:
            record = run_record(
                options.checkpoint, options.processor, options.source, options.top_k, options.dtype, options.backend
            )
    return listing, device, record


def _load(options: Options, device: torch.device, err):
    from ...modeling import CvtForImageClassification

    if options.frozen is not None:
        return options.frozen
    with _as_refusals():
        if options.compile:
            return _compile(options, err)
        return CvtForImageClassification.from_pretrained(
            options.checkpoint, backend=options.backend, device=device, dtype=options.dtype
        )


def _compile(options: Options, err):
    """The checkpoint frozen for this CPU, at the preprocessed size and the batch size of the run."""
    if not options.processor.do_resize:
        raise Refused("argument --compile: the preprocessing keeps each image's own size (do_resize false), but a "
                      "compiled model takes one size")  # fmt: skip
    size = options.processor.size
    return freeze_for_run(options.checkpoint, options.batch_size, (size, size), options.dtype, err)


def freeze_for_run(checkpoint: Path, batch_size: int, image_size: tuple[int, int], dtype, err):
    """`classify --compile`: the checkpoint frozen for this CPU on its fastest engine, what that cost and found said on
    `err`, and how to keep it for the next run rather than freeze again."""
    from ...frozen import freeze_checkpoint
    from ...modeling import CvtForImageClassification

    frozen = freeze_checkpoint(
        checkpoint, batch_size=batch_size, image_size=image_size, dtype=dtype or "float32",
        model_class=CvtForImageClassification, say=lambda line: print(line, file=err, flush=True),
    )  # fmt: skip
    for trial in frozen.info.trials:
        print(f"  {trial.describe()}", file=err)
    dtype_option = "" if frozen.dtype == torch.float32 else " --dtype bfloat16"
    print(f"frozen in {frozen.info.compile_s:.0f} s; to keep it rather than freeze again next time: cvt-fast export "
          f"--model {checkpoint} --output MODEL.cvt --batch-size {batch_size} --image-size {image_size[0]} "
          f"{image_size[1]}{dtype_option}, then classify --model MODEL.cvt", file=err, flush=True)  # fmt: skip
    return frozen


@contextlib.contextmanager
def _as_refusals():
    """cvt_fast's refusals (of a checkpoint, a config, a backend) as Refused, which the ranks agree on: a
    rank's own failure is not lost, and the others do not wait for it."""
    try:
        yield
    except Refused:
        raise
    except UserError as error:  # a CheckpointError's lines leave out the remedy, a from_pretrained argument
        raise Refused(*(one_line(line, limit=1000) for line in error.lines)) from None


def _check_preprocessed_size(options: Options) -> None:
    """With resizing, every image comes out size x size: a size the model cannot take is refused before any work."""
    from ...checks import check_image_size
    from ...config import CvtConfig

    processor = options.processor
    if not processor.do_resize:
        return  # sizes vary with the images; each batch is checked
    if options.frozen is not None:
        height, width = options.frozen.image_size
        if (processor.size, processor.size) != (height, width):
            raise Refused(f"preprocessing makes every image {processor.size} px square, but {options.checkpoint} was "
                          f"compiled for {height}x{width}")  # fmt: skip
        return
    config = CvtConfig.from_json_file(options.checkpoint / "config.json")
    try:
        check_image_size(config, processor.size, processor.size)
    except ValueError as error:
        raise Refused(f"preprocessing makes every image {processor.size} px square, but {error}") from None


def _finished_and_part(files: RunFiles, listing: Listing, ranks: Ranks):
    """(images finished earlier, the listed images still to do, this rank's part file opened for appending)."""
    finished = finished_results(files)
    remaining = [path for path in listing.paths if path not in finished]
    try:
        part = files.part(ranks.rank).open("ab", buffering=0)  # unbuffered: each write() is one system call
    except OSError as error:
        raise Refused(f"argument --output: cannot write {files.part(ranks.rank)} ({error})") from None
    return len(listing.paths) - len(remaining), remaining, part


def _classify_part(model, mine: Sequence[str], part, workers: int, options: Options, ranks: Ranks, err) -> ShardTimes:
    progress = None
    if ranks.rank == 0 and mine:
        prefix = f"rank 0 of {ranks.world_size}: " if ranks.world_size > 1 else ""
        progress = Progress(len(mine), prefix, stream=err)
    try:
        with _as_refusals():  # backend="triton" where the kernels cannot run refuses at the first batch
            times = classify_shard(
                model, mine, options.processor, part, batch_size=options.batch_size, workers=workers,
                top_k=options.top_k, progress=progress,
            )  # fmt: skip
        os.fsync(part.fileno())
        return times
    except torch.cuda.OutOfMemoryError:
        raise Refused(
            f"a batch of {options.batch_size} images does not fit in {model.device}'s memory; rerun with a smaller "
            "--batch-size (the images done so far are kept)"
        ) from None
    finally:
        part.close()
        if progress is not None:
            progress.close()
