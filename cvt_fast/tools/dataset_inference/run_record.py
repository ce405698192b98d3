"""run.json, what produced the results (the checkpoint's files, the preprocessing, the options that change a line): a
rerun with other ones is refused rather than mixing results. Rank 0 prepares the run folder with it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ...errors import Refused
from .images import folder_as_written
from .results import RunFiles, repair

RECORD_FORMAT = 1


def run_record(checkpoint: Path, processor, source: str, top_k: int, dtype: torch.dtype, backend: str) -> dict:
    """What decides the contents of the result lines. Batch size, workers, device and the number of ranks do not
    (they move scores by float rounding at most), so a run may resume with others."""
    from ...image_processing import PREPROCESSOR_NAME
    from ...loading import weight_files

    if checkpoint.is_file():  # a frozen package: config, weights and preprocessing in one file
        files = [checkpoint]
    else:
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
        raise Refused(f"argument --output: cannot write results beside {files.output} ({error})") from None
    has_results = files.output.exists() or any(part.stat().st_size for part in files.parts())
    if files.record.is_file() and has_results:
        _check_record(files, record)
    elif has_results:
        taken = files.output if files.output.exists() else files.folder
        raise Refused(
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
            raise Refused(f"argument --overwrite: cannot remove {path} ({error})") from None


def _check_record(files: RunFiles, record: dict) -> None:
    try:
        earlier = json.loads(files.record.read_text())
    except (OSError, ValueError) as error:
        raise Refused(
            f"{files.record}: cannot be read ({error}); pass --overwrite to start over, or choose another --output"
        ) from None
    differences = _differences(earlier, record) if isinstance(earlier, dict) else ["its contents"]
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise Refused(
            f"{files.output}: the results so far came from another model or other options ({shown}); rerun the "
            "same command to finish them, pass --overwrite to start over, or choose another --output"
        )


def _write_record(files: RunFiles, record: dict) -> None:
    from ...files import replacing

    try:
        with replacing(files.record) as temporary:
            temporary.write_text(json.dumps(record, indent=1) + "\n")
    except OSError as error:
        raise Refused(f"argument --output: cannot write results beside {files.output} ({error})") from None
