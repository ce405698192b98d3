"""The images of a run: reading one (or UnreadableImage, saying why not), listing a folder or a list file, and each
rank's share of the listing."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from ...errors import Refused

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")

T = TypeVar("T")


class UnreadableImage(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_pixel_values(path: str, processor) -> np.ndarray:
    """(3, H, W) float32 pixel values of the image at `path`, or UnreadableImage saying why not."""
    from PIL import Image, UnidentifiedImageError

    from ...errors import one_line

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


@dataclass
class Listing:
    paths: list[str]  # sorted by path, each once
    notes: list[str] = field(default_factory=list)


def list_images(source: str) -> Listing:
    """A folder's image files (recursively), or the paths a text file lists one per line."""
    if not source:
        raise Refused("argument --input: an empty name is not a folder or a file")
    if os.path.isdir(source):
        return _list_folder(folder_as_written(source))
    if os.path.isfile(source):
        return _list_file(source)
    if not os.path.exists(source):
        raise Refused(f"argument --input: {source}: no such folder or file")
    raise Refused(f"argument --input: {source} is neither a folder nor a file")


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
        raise Refused(f"argument --input: {error.filename}: cannot be listed ({error.strerror})")

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
        raise Refused(
            f"argument --input: {folder} holds no image files (searched it recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}; {others} other file(s))"
        )
    notes = [f"{folder}: {others} file(s) without an image extension left out"] if others else []
    return Listing(sorted(found), notes)


def _list_file(list_file: str) -> Listing:
    """One path per line, as written (relative ones to the working directory, as a shell reads them); lines of
    nothing but white space skipped."""
    if list_file.lower().endswith(IMAGE_EXTENSIONS):
        raise Refused(
            f"argument --input: {list_file} is an image; --input takes a folder or a text file listing images "
            "(image files themselves go without --input)"
        )
    try:
        # surrogateescape: a file name that is not UTF-8 survives the round trip to the path it names
        text = Path(list_file).read_bytes().decode("utf-8", "surrogateescape")
    except OSError as error:
        raise Refused(f"argument --input: {list_file}: cannot be read ({error.strerror})") from None
    if "\0" in text:
        raise Refused(f"argument --input: {list_file} is not a text file of image paths (it holds NUL bytes)")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    named = [line for line in lines if line.strip()]
    if not named:
        raise Refused(f"argument --input: {list_file} names no image files (it has no non-blank line)")
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
