"""Frozen packages on disk: one file that holds an engine's model and the record of what it was made from and for.

  FILE.cvt   any engine: a zip archive of cvt_fast.json (the record) and the engine's files, stored as they are
  FILE.pt2   inductor's alone: torch's AOTInductor archive, the record in its metadata

Loading (cvt_fast.frozen.snapshot.load_frozen) reads the record first, from the archive alone, and refuses in one
line a package this process cannot run (an engine that is missing or of another version, another torch for native
code, a CPU without the instructions it was built for) before any of its code loads.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

from ..cpu_target import this_cpu
from ..errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError, InputError, one_line
from ..files import replacing
from .engines import NAMES, engine
from .record import FrozenInfo

RECORD = "cvt_fast.json"  # a .cvt archive's record
SUFFIXES = (".cvt", ".pt2")


class PackageMismatchError(CheckpointError):
    """A frozen package this process cannot run: its engine missing or of another version, native code compiled for
    another torch or for instructions this CPU lacks."""


def is_package(path) -> bool:
    """Whether a path names a frozen package (by its suffix) rather than a checkpoint."""
    return Path(path).suffix in SUFFIXES


def write_package(path: Path, info: FrozenInfo, files: dict[str, Path]) -> Path:
    if path.suffix not in SUFFIXES:
        raise InputError(f"save: {path} should end in .cvt (a cvt_fast package, any engine) or .pt2 (inductor's "
                         "alone)")  # fmt: skip
    if path.suffix == ".pt2" and info.engine != "inductor":
        raise InputError(f"save: {path}: a .pt2 file holds inductor's packages only, and this one runs on "
                         f"{info.engine}; save it as {path.with_suffix('.cvt').name}")  # fmt: skip
    if path.is_dir():
        raise InputError(f"save: {path} is a folder; expected the path of the {path.suffix} file to write")
    if not path.parent.is_dir():
        raise InputError(f"save: {path.parent} is not a folder to write {path.name} in")
    try:
        with replacing(path) as temporary:
            if path.suffix == ".pt2":
                shutil.copyfile(files[engine("inductor").ARTIFACT], temporary)
            else:
                with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
                    archive.writestr(RECORD, info.to_json())
                    for name, file in files.items():
                        archive.write(file, name)
    except OSError as error:
        raise CheckpointWriteError(f"{path}: cannot be written ({error.strerror or error})") from None
    return path


def read_package_info(path: str | os.PathLike) -> FrozenInfo:
    """What a package was made from and for, read from the archive alone (none of its code is loaded)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a .cvt or .pt2 file written by FrozenCvt.save")
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read(RECORD).decode() if RECORD in archive.namelist() else _inductor_record(archive)
    except zipfile.BadZipFile as error:
        raise CheckpointError(
            f"{path}: not a readable package ({one_line(error)}: an incomplete copy or download, or not a package)"
        ) from None
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: its record cannot be read ({one_line(error)}); is the file damaged?") from None
    if text is None:
        raise CheckpointError(
            f"{path}: not a cvt_fast frozen package (no cvt_fast record in it; other AOTInductor packages load with "
            "torch._inductor.aoti_load_package)"
        )
    try:
        return FrozenInfo.from_json(text)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its cvt_fast record is damaged ({type(error).__name__}: {error})") from None


def _inductor_record(archive: zipfile.ZipFile) -> str | None:
    from .engines.inductor import record_in

    return record_in(archive)


def check_runnable(path: Path, info: FrozenInfo) -> None:
    """PackageMismatchError, in one line, unless this process can run the package."""
    if info.engine not in NAMES:
        raise PackageMismatchError(f"{path} runs on {info.engine!r}, an engine this cvt_fast does not know (it knows "
                                   f"{', '.join(NAMES)})")  # fmt: skip
    module = engine(info.engine)
    installed = module.version()
    if installed is None:
        raise PackageMismatchError(f"{path} runs on {info.engine}, which is not installed here ({module.INSTALL})")
    if installed != info.engine_version:
        if info.engine == "inductor":
            raise PackageMismatchError(f"{path} was compiled with torch {info.engine_version}; this is torch "
                                       f"{installed}: freeze and save it again with this torch")  # fmt: skip
        raise PackageMismatchError(
            f"{path} was built and checked with {info.engine} {info.engine_version}; this is {info.engine} "
            f"{installed}: freeze it again here, or install {info.engine}=={info.engine_version}"
        )
    here = this_cpu()
    reason = module.cannot_run(info, here)
    if reason is not None:
        raise PackageMismatchError(
            f"{path} cannot run on this CPU: {reason} (built for {info.target.describe()}, this is "
            f"{here.describe()}); freeze and save it again on a CPU of this class"
        )


def is_cvt_archive(path: Path) -> bool:
    """A .cvt archive (the record a file of its own), rather than a bare .pt2."""
    with zipfile.ZipFile(path) as archive:
        return RECORD in archive.namelist()


def unpack(path: Path, names: tuple[str, ...], folder: Path) -> dict[str, Path]:
    """The engine's files (and nothing else: the names are the engine's, never the archive's) copied into folder."""
    files = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in names:
                with archive.open(name) as source, open(folder / name, "wb") as target:
                    shutil.copyfileobj(source, target)
                files[name] = folder / name
    except KeyError as error:
        raise CheckpointError(f"{path}: damaged, {one_line(error)} (it lacks a file of its engine)") from None
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise CheckpointError(f"{path}: damaged ({one_line(error)}); is it an incomplete copy?") from None
    return files
