"""Reading and writing files so that nothing is half-done: JSON objects read with one-line errors, and writes that
replace a file in one step."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import describe_value


def read_json_object(path: str | os.PathLike, error: type[Exception]) -> dict[str, Any]:
    """The JSON object (dict) in a file, or `error` with one line that names the file and what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as reason:
        raise error(f"{path}: cannot be read ({reason.strerror or reason})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: is not UTF-8 text, so not JSON") from None
    except json.JSONDecodeError as reason:
        raise error(f"{path}: is not valid JSON ({reason.msg} at line {reason.lineno} column {reason.colno})") from None
    except RecursionError:
        raise error(f"{path}: is JSON nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object ({{...}}), got {describe_value(data)}")
    return data


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; once written it replaces `path` in one step (os.replace),
    and a write that fails is deleted instead: no half-written file ever stands where a good one was."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        # The permissions a plain open() gives: some writers (safetensors) create their file readable by its owner
        # only, and a checkpoint folder is often shared.
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask: read from /proc where Linux shows it, since os.umask can only read it by setting it,
    and for that moment another thread's new files would get the wrong permissions."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
