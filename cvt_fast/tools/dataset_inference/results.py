"""Result lines, one JSON line per image, and the files that hold them: OUTPUT and its part files (OUTPUT.parts/),
repaired after a torn write, read for what earlier attempts finished, merged into OUTPUT at the end."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import Refused
from .images import IMAGE_EXTENSIONS

SCORE_DECIMALS = 6  # a probability to 1e-6 is all a reader uses, and it keeps a million lines short


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


def parse_line(line: str) -> dict | None:
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
        record = parse_line(line)
        if record is None:
            damaged += 1
        else:
            lines.setdefault(record["path"], line)
    return ResultFile(lines, damaged)


def repair(path: Path) -> int:
    """Rewrite a part file with only its whole, well-formed lines; the number of lines dropped."""
    from ...files import replacing

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
        raise Refused(
            f"argument --output: {output} has an image extension; the results are JSON lines (e.g. results.jsonl)"
        )
    if output.is_dir():
        raise Refused(f"argument --output: {output} is a folder; expected a file name such as results.jsonl")
    target = os.path.abspath(output)
    if target == os.path.abspath(source) or target in {os.path.abspath(p) for p in paths}:
        raise Refused(f"argument --output: {output} is one of the inputs; writing it would destroy it")


def finished_results(files: RunFiles) -> dict[str, str]:
    """path -> line for every image some earlier attempt finished: the last output first, then the part files."""
    finished: dict[str, str] = {}
    for path in [files.output, *files.parts()]:
        for image, line in read_results(path).lines.items():
            finished.setdefault(image, line)
    return finished


def merge(files: RunFiles, paths: Sequence[str]) -> list[str]:
    """Write OUTPUT: one line per listed image, in the listing's order (sorted by path), written beside it and renamed
    into place; then the part files go (run.json stays, so that a rerun knows the output is its own). The lines."""
    from ...files import replacing

    finished = finished_results(files)
    missing = [path for path in paths if path not in finished]
    if missing:
        raise Refused(
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
