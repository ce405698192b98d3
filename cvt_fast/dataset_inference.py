"""Dataset-scale classification: `cvt-fast classify --model CKPT --input FOLDER_OR_LIST --output results.jsonl`, in one
process or in one process per GPU under torchrun.

A run, in order:
- list_images: the input's image files, sorted by path: the order of the output, and what the ranks split.
- prepare_run_folder (rank 0): OUTPUT.parts/ holds run.json, what produced the results (the checkpoint's files, the
  preprocessing, top-k, dtype, backend), and one part file per rank. A rerun with other parameters is refused
  rather than mixing results; part files are repaired (a torn or damaged line dropped, its image redone).
- finished_results + shard: every rank reads what earlier attempts finished, and takes a contiguous, balanced,
  disjoint range of what is left.
- classify_shard: DataLoader workers decode and preprocess (ImageFiles, collate); the model runs on whole batches;
  each batch's lines are appended to the rank's part file in one write. An unreadable image becomes a line with its
  reason, never a crash and never a gap.
- merge (rank 0): OUTPUT written beside its final name and renamed into place, every listed image exactly once,
  sorted by path; then the part files go.

torch.distributed carries only coordination here (gloo: agreement on refusals, barriers, timings). Each rank's model
runs on its own, so inference needs no nccl.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
RECORD_FORMAT = 1
SCORE_DECIMALS = 6  # a probability to 1e-6 is all a reader uses, and it keeps a million lines short
# A rank that finished its shard waits for the slowest one; on a long job that can be hours (a throttled GPU). A rank
# that dies does not leave the others waiting: torchrun stops them all.
COORDINATION_TIMEOUT = timedelta(hours=24)
UNREADABLE_SHOWN = 20
PROG = "cvt-fast classify"  # the command this module serves, which begins each line it prints for the user

T = TypeVar("T")


class ClassifyRefused(Exception):
    """A problem the user can fix (the input, the output, an earlier run with other parameters): one line each."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = lines
        self.agreed = False  # every rank raised it together (Coordinator.agree)
        self.reported = False  # already printed (by rank 0, before any rank exited)


class UnreadableImage(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---- reading one image --------------------------------------------------------------------------------------


def read_pixel_values(path: str, processor) -> np.ndarray:
    """(3, H, W) float32 pixel values of the image at `path`, or UnreadableImage saying why not."""
    from PIL import Image, UnidentifiedImageError

    from .loading import one_line

    try:
        with Image.open(path) as image:
            return processor.preprocess_one(image)
    except FileNotFoundError:
        reason = "no such file"
    except IsADirectoryError:
        reason = "a folder, not an image file"
    except PermissionError:
        reason = "not readable (permission denied)"
    except UnidentifiedImageError:
        reason = "not an image file (Pillow does not recognise its format)"
    except Image.DecompressionBombError as error:
        reason = f"too many pixels to decode safely ({one_line(error)})"
    except (OSError, ValueError, EOFError, SyntaxError) as error:  # what Pillow's decoders raise on a damaged file
        reason = f"cannot be decoded ({one_line(error)}); is it truncated or damaged?"
    raise UnreadableImage(reason)


# ---- what to classify ---------------------------------------------------------------------------------------


@dataclass
class Listing:
    paths: list[str]  # sorted by path, each once
    notes: list[str] = field(default_factory=list)


def list_images(source: str) -> Listing:
    """A folder's image files (recursively), or the paths a text file lists one per line."""
    if not source:
        raise ClassifyRefused("argument --input: an empty name is not a folder or a file")
    if os.path.isdir(source):
        return _list_folder(folder_as_written(source))
    if os.path.isfile(source):
        return _list_file(source)
    if not os.path.exists(source):
        raise ClassifyRefused(f"argument --input: {source}: no such folder or file")
    raise ClassifyRefused(f"argument --input: {source} is neither a folder nor a file")


def folder_as_written(folder: str) -> str:
    """The folder as every result path begins with it: the spelling given, less what changes neither the folder nor
    how the paths read once tidied (repeated and trailing slashes, inner "." segments). A leading "./" stays, as
    does "..": through a symbolic link, "a/.." is not where dropping it would lead."""
    parts = [part for part in folder.split(os.sep) if part not in ("", ".")]
    if not parts:
        return os.sep if folder.startswith(os.sep) else "."
    head = os.sep if folder.startswith(os.sep) else ("." + os.sep if folder.startswith("." + os.sep) else "")
    return head + os.sep.join(parts)


def _list_folder(folder: str) -> Listing:
    """Files with an image extension, hidden names skipped (macOS writes `._name.jpg` files that are not images)."""

    def unlistable(error: OSError) -> None:
        raise ClassifyRefused(f"argument --input: {error.filename}: cannot be listed ({error.strerror})")

    found, others = [], 0
    for root, folders, files in os.walk(folder, onerror=unlistable):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(root, name))
            else:
                others += 1
    if not found:
        raise ClassifyRefused(
            f"argument --input: {folder} holds no image files (searched it recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}; {others} other file(s))"
        )
    notes = [f"{folder}: {others} file(s) without an image extension left out"] if others else []
    return Listing(sorted(found), notes)


def _list_file(list_file: str) -> Listing:
    """One path per line, as written (relative ones to the working directory, as a shell reads them); lines of
    nothing but white space skipped."""
    if list_file.lower().endswith(IMAGE_EXTENSIONS):
        raise ClassifyRefused(
            f"argument --input: {list_file} is an image; --input takes a folder or a text file listing images "
            "(image files themselves go without --input)"
        )
    try:
        # surrogateescape: a file name that is not UTF-8 survives the round trip to the path it names
        text = Path(list_file).read_bytes().decode("utf-8", "surrogateescape")
    except OSError as error:
        raise ClassifyRefused(f"argument --input: {list_file}: cannot be read ({error.strerror})") from None
    if "\0" in text:
        raise ClassifyRefused(f"argument --input: {list_file} is not a text file of image paths (it holds NUL bytes)")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    named = [line for line in lines if line.strip()]
    if not named:
        raise ClassifyRefused(f"argument --input: {list_file} names no image files (it has no non-blank line)")
    unique = sorted(set(named))
    notes = []
    if len(unique) < len(named):
        notes.append(f"{list_file} names {len(named) - len(unique)} path(s) more than once; each is classified once")
    return Listing(unique, notes)


def listing_digest(paths: Sequence[str]) -> str:
    """Equal digests: equal lists (ranks compare theirs before splitting the work)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def shard(items: Sequence[T], rank: int, world_size: int) -> Sequence[T]:
    """Rank `rank`'s contiguous range of `items`: the ranges are disjoint, cover every item, and differ in length by at
    most one. Contiguous keeps each part file sorted and neighbouring files (one folder) with one rank."""
    count = len(items)
    return items[rank * count // world_size : (rank + 1) * count // world_size]


# ---- result lines and the files that hold them --------------------------------------------------------------


def result_line(path: str, *, labels=None, scores=None, label_ids=None, error: str | None = None) -> str:
    if error is not None:
        record: dict[str, Any] = {"path": path, "error": error}
    else:
        record = {
            "path": path,
            "labels": labels,
            "scores": [round(score, SCORE_DECIMALS) for score in scores],
            "label_ids": label_ids,
        }
    return json.dumps(record) + "\n"  # ensure_ascii: a path that is not UTF-8 is escaped, not an encoding error


def _parse_line(line: str) -> dict | None:
    """The record of a whole, well-formed result line; None for anything else (a torn write, a damaged file)."""
    if not line.endswith("\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        return None
    if isinstance(record.get("error"), str):
        return record
    if all(isinstance(record.get(key), list) for key in ("labels", "scores", "label_ids")):
        return record
    return None


@dataclass
class ResultFile:
    lines: dict[str, str]  # path -> its line, as written
    damaged: int  # lines that are not whole, well-formed results (a torn last line, say)


def read_results(path: Path) -> ResultFile:
    if not path.exists():
        return ResultFile({}, 0)
    text = path.read_bytes().decode("utf-8", "replace")
    pieces = text.split("\n")  # on newlines only (str.splitlines also splits on \r, \x1c, ...)
    lines, damaged = {}, 0
    for line in [piece + "\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else []):
        record = _parse_line(line)
        if record is None:
            damaged += 1
        else:
            lines.setdefault(record["path"], line)
    return ResultFile(lines, damaged)


def repair(path: Path) -> int:
    """Rewrite a part file with only its whole, well-formed lines; the number of lines dropped."""
    from .config import replacing

    results = read_results(path)
    if results.damaged:
        with replacing(path) as temporary:
            temporary.write_text("".join(results.lines.values()))
    return results.damaged


@dataclass(frozen=True)
class RunFiles:
    output: Path

    @property
    def folder(self) -> Path:
        return self.output.with_name(self.output.name + ".parts")

    @property
    def record(self) -> Path:
        return self.folder / "run.json"

    def part(self, rank: int) -> Path:
        return self.folder / f"rank-{rank}.jsonl"

    def parts(self) -> list[Path]:
        return sorted(path for path in self.folder.glob("rank-*.jsonl") if path.is_file())


def check_output(output: Path, source: str, paths: Iterable[str]) -> None:
    """Refuse an output that would overwrite an input, or that cannot be a file."""
    if output.name.lower().endswith(IMAGE_EXTENSIONS):
        raise ClassifyRefused(
            f"argument --output: {output} has an image extension; the results are JSON lines (e.g. results.jsonl)"
        )
    if output.is_dir():
        raise ClassifyRefused(f"argument --output: {output} is a folder; expected a file name such as results.jsonl")
    target = os.path.abspath(output)
    if target == os.path.abspath(source) or target in {os.path.abspath(p) for p in paths}:
        raise ClassifyRefused(f"argument --output: {output} is one of the inputs; writing it would destroy it")


# ---- the run record: which model and options produced the results -----------------------------------------------


def run_record(checkpoint: Path, processor, source: str, top_k: int, dtype: torch.dtype, backend: str) -> dict:
    """What decides the contents of the result lines. Batch size, workers, device and the number of ranks do not
    (they move scores by float rounding at most), so a run may resume with others."""
    from .image_processing import PREPROCESSOR_NAME
    from .loading import weight_files

    files = [checkpoint / "config.json", *weight_files(checkpoint)]
    if (checkpoint / PREPROCESSOR_NAME).is_file():
        files.append(checkpoint / PREPROCESSOR_NAME)
    record = {
        "format": RECORD_FORMAT,
        "input": os.path.abspath(source),
        "checkpoint_sha256": {file.name: _sha256(file) for file in files},
        "preprocessing": processor.to_dict(),
        "top_k": top_k,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
    }
    if os.path.isfile(source):  # a list's relative paths are read from the working directory
        record["working_directory"] = os.getcwd()
    else:  # the result paths begin with the folder as written: another spelling would redo every image
        record["input_as_written"] = folder_as_written(source)
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            found += _differences(before, now, f"{prefix}{key}.")
        elif before != now:
            found.append(f"{prefix}{key} {_short(before)} then, {_short(now)} now")
    return found


def _short(value: Any) -> str:
    text = "absent" if value is None else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def prepare_run_folder(files: RunFiles, record: dict, overwrite: bool) -> list[str]:
    """Rank 0, before any rank reads or writes results: the run folder exists, its run.json matches this run (or this
    run starts over), and every part file holds whole lines only. Returns notes for the user."""
    if overwrite:
        _forget(files)
    try:
        files.folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ClassifyRefused(f"argument --output: cannot write results beside {files.output} ({error})") from None
    has_results = files.output.exists() or any(part.stat().st_size for part in files.parts())
    if files.record.is_file() and has_results:
        _check_record(files, record)
    elif has_results:
        taken = files.output if files.output.exists() else files.folder
        raise ClassifyRefused(
            f"{taken} already exists, and no {files.record} says which run produced it; pass --overwrite to "
            "replace it, or choose another --output"
        )
    else:  # a first run, or one that stopped before its first result (a damaged checkpoint, say): nothing to mix
        _write_record(files, record)
    notes = []
    for part in files.parts():
        dropped = repair(part)
        if dropped:
            notes.append(f"{part}: dropped {dropped} torn or damaged line(s) of an interrupted run; redoing them")
    return notes


def _forget(files: RunFiles) -> None:
    for path in [files.output, files.record, *files.parts()]:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise ClassifyRefused(f"argument --overwrite: cannot remove {path} ({error})") from None


def _check_record(files: RunFiles, record: dict) -> None:
    try:
        earlier = json.loads(files.record.read_text())
    except (OSError, ValueError) as error:
        raise ClassifyRefused(
            f"{files.record}: cannot be read ({error}); pass --overwrite to start over, or choose another --output"
        ) from None
    differences = _differences(earlier, record) if isinstance(earlier, dict) else ["its contents"]
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise ClassifyRefused(
            f"{files.output}: the results so far came from another model or other options ({shown}); rerun the "
            "same command to finish them, pass --overwrite to start over, or choose another --output"
        )


def _write_record(files: RunFiles, record: dict) -> None:
    from .config import replacing

    try:
        with replacing(files.record) as temporary:
            temporary.write_text(json.dumps(record, indent=1) + "\n")
    except OSError as error:
        raise ClassifyRefused(f"argument --output: cannot write results beside {files.output} ({error})") from None


def finished_results(files: RunFiles) -> dict[str, str]:
    """path -> line for every image some earlier attempt finished: the last output first, then the part files."""
    finished: dict[str, str] = {}
    for path in [files.output, *files.parts()]:
        for image, line in read_results(path).lines.items():
            finished.setdefault(image, line)
    return finished


# ---- decoding in the loader workers --------------------------------------------------------------------------


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
            from .loading import one_line

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


# ---- the model loop ------------------------------------------------------------------------------------------


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
    from .checks import check_image_size

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


# ---- progress ------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Images done, images/s and ETA: one self-overwriting line on a terminal (redrawn at most twice a second), and in
    a log file or a pipe a plain line every `plain_every` seconds and at the end, so that a long run shows in its log
    where it is without flooding it."""

    def __init__(self, total: int, prefix: str = "", stream=None, clock=time.monotonic, plain_every: float = 30.0):
        self.total, self.prefix = total, prefix
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.clock = clock
        self.every = 0.5 if self.live else plain_every
        self.start = self.last = clock()

    def line(self, done: int) -> str:
        elapsed = self.clock() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - done) / rate) if rate > 0 else "?"
        return f"{self.prefix}{done}/{self.total} images, {rate:.1f} images/s, {duration(elapsed)} so far, ETA {eta}"

    def update(self, done: int) -> None:
        now = self.clock()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        if self.live:
            print(f"\r\033[K{self.line(done)}", end="", file=self.stream, flush=True)
        else:
            print(self.line(done), file=self.stream, flush=True)

    def close(self) -> None:
        if self.live:
            print("\r\033[K", end="", file=self.stream, flush=True)


# ---- ranks ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; one process without them."""
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1)):
            text = os.environ.get(name, str(default))
            try:
                values[name.lower()] = int(text)
            except ValueError:
                raise ClassifyRefused(f"environment variable {name} is {text!r}; expected a whole number") from None
        return cls(**values)


class Coordinator:
    """Agreement between the ranks; with one process every method is trivial."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.distributed = ranks.world_size > 1
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():  # under torchrun: the env:// rendezvous it set up
                dist.init_process_group("gloo", timeout=COORDINATION_TIMEOUT)

    def gather(self, value: T) -> list[T]:
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def agree(self, step: Callable[[], T]) -> T:
        """Run `step` on every rank; if any rank refuses, every rank refuses with the first refusal's lines (rank 0
        prints them, naming the rank they came from: a rank's own problem, its GPU say, is not lost). A barrier too."""
        try:
            value, refusal = step(), None
        except ClassifyRefused as refused:
            value, refusal = None, refused.lines
        for rank, lines in enumerate(self.gather(refusal)):
            if lines:
                refused = ClassifyRefused(*(lines if rank == 0 else [f"rank {rank}: {line}" for line in lines]))
                refused.agreed = True
                raise refused
        return value

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# ---- the whole run -------------------------------------------------------------------------------------------


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


def resolve_device(name: str | None, ranks: Ranks) -> torch.device:
    """--device for this rank: under torchrun, "cuda" without an index is this rank's GPU, cuda:LOCAL_RANK."""
    from .checks import check_device

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = check_device(name)
    except ValueError as error:
        raise ClassifyRefused(f"argument --device: {error}") from None
    if device.type != "cuda" or device.index is not None or ranks.world_size == 1:
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise ClassifyRefused(
            f"argument --device: no cuda:{ranks.local_rank} for local rank {ranks.local_rank}: torchrun started "
            f"{ranks.local_world_size} processes on this machine, which has {torch.cuda.device_count()} GPU(s)"
        )
    return torch.device("cuda", ranks.local_rank)


def default_workers(device: torch.device, ranks: Ranks) -> int:
    """On a GPU, the machine's cores shared among its ranks, one kept for each rank's model loop (at most 16); on the
    CPU one, since there the model itself wants every core and decoding is a small share of its time."""
    if device.type != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores // ranks.local_world_size - 1))


def classify_dataset(options: Options, ranks: Ranks | None = None, out=None, err=None) -> int:
    """The whole run on this rank; rank 0 merges and prints the summary to `out` (progress and notes go to `err`)."""
    ranks = ranks or Ranks.from_env()
    coordinator = Coordinator(ranks)
    err = err or sys.stderr
    try:
        return _run(options, ranks, coordinator, out or sys.stdout, err)
    except ClassifyRefused as refused:
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
        raise ClassifyRefused(
            f"argument --input: the ranks listed {options.source} differently (is it changing?); every rank must see "
            "the same files"
        )
    notes = coordinator.agree(lambda: prepare_run_folder(files, record, options.overwrite) if first else [])
    if first:
        for note in listing.notes + notes:
            print(f"note: {note}", file=err)
    model = coordinator.agree(lambda: _load(options, device))
    # Every rank reads what is finished before any rank appends (agree() is a barrier): the same view, the same split.
    earlier, remaining, part = coordinator.agree(lambda: _finished_and_part(files, listing, ranks))
    mine = shard(remaining, ranks.rank, ranks.world_size)
    workers = options.workers if options.workers is not None else default_workers(device, ranks)
    setup_s = time.perf_counter() - setup_start
    start = time.perf_counter()
    times = coordinator.agree(lambda: _classify_part(model, mine, part, workers, options, ranks, err))
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
    if not (options.checkpoint / "config.json").is_file():
        raise ClassifyRefused(f"{options.checkpoint} has no config.json")
    with _as_refusals():
        _check_preprocessed_size(options)
        record = None
        if ranks.rank == 0:
            record = run_record(
                options.checkpoint, options.processor, options.source, options.top_k, options.dtype, options.backend
            )
    return listing, device, record


def _load(options: Options, device: torch.device):
    from .modeling import CvtForImageClassification

    with _as_refusals():
        return CvtForImageClassification.from_pretrained(
            options.checkpoint, backend=options.backend, device=device, dtype=options.dtype
        )


@contextlib.contextmanager
def _as_refusals():
    """cvt_fast's refusals (of a checkpoint, a config, a backend) as ClassifyRefused, which the ranks agree on: a
    rank's own failure is not lost, and the others do not wait for it."""
    from .config import ConfigError
    from .dispatch import KernelUnavailableError
    from .loading import CheckpointError, one_line

    try:
        yield
    except CheckpointError as error:
        raise ClassifyRefused(error.problem) from None  # without the remedy, a from_pretrained argument
    except (ConfigError, KernelUnavailableError) as error:
        raise ClassifyRefused(one_line(error, limit=1000)) from None


def _check_preprocessed_size(options: Options) -> None:
    """With resizing, every image comes out size x size: a size the model cannot take is refused before any work."""
    from .checks import check_image_size
    from .config import CvtConfig

    processor = options.processor
    if not processor.do_resize:
        return  # sizes vary with the images; each batch is checked
    config = CvtConfig.from_json_file(options.checkpoint / "config.json")
    try:
        check_image_size(config, processor.size, processor.size)
    except ValueError as error:
        raise ClassifyRefused(f"preprocessing makes every image {processor.size} px square, but {error}") from None


def _finished_and_part(files: RunFiles, listing: Listing, ranks: Ranks):
    """(images finished earlier, the listed images still to do, this rank's part file opened for appending)."""
    finished = finished_results(files)
    remaining = [path for path in listing.paths if path not in finished]
    try:
        part = files.part(ranks.rank).open("ab", buffering=0)  # unbuffered: each write() is one system call
    except OSError as error:
        raise ClassifyRefused(f"argument --output: cannot write {files.part(ranks.rank)} ({error})") from None
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
        raise ClassifyRefused(
            f"a batch of {options.batch_size} images does not fit in {model.device}'s memory; rerun with a smaller "
            "--batch-size (the images done so far are kept)"
        ) from None
    finally:
        part.close()
        if progress is not None:
            progress.close()


def merge(files: RunFiles, paths: Sequence[str]) -> list[str]:
    """Write OUTPUT: one line per listed image, in the listing's order (sorted by path), written beside it and renamed
    into place; then the part files go (run.json stays, so that a rerun knows the output is its own). The lines."""
    from .config import replacing

    finished = finished_results(files)
    missing = [path for path in paths if path not in finished]
    if missing:
        raise ClassifyRefused(
            f"{len(missing)} image(s) have no result in {files.folder} (first: {missing[0]}); every rank must write "
            "to the same filesystem (a shared one across machines); rerun the same command to finish them"
        )
    lines = [finished[path] for path in paths]
    with replacing(files.output) as temporary:
        with temporary.open("w") as file:
            file.writelines(lines)
            file.flush()
            os.fsync(file.fileno())
    for part in files.parts():
        part.unlink()
    return lines


def summary_lines(
    output: Path, lines: list[str], ranks: list[ShardTimes], earlier: int, wall_s: float, setup_s: float
) -> list[str]:
    """What the output holds (unreadable images named), then this run's throughput."""
    # (the substring first: parsing a million lines for a handful of errors would cost seconds)
    candidates = [_parse_line(line) for line in lines if '"error": ' in line]
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
