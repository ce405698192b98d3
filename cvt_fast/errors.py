"""The errors a user can cause and fix, as one family: UserError and its kinds. Each message names what is wrong (an
argument, a file, a config field, a tensor) and what was expected; the CLI prints one line per problem and exits
with status 2. Anything else that escapes is a bug in cvt_fast.

The kinds keep the built-in base that callers already catch: a ConfigError is a ValueError, a missing checkpoint
a FileNotFoundError, a failed write an OSError.
"""

from __future__ import annotations

import re
from typing import Any


class UserError(Exception):
    """A problem the user can fix. `lines`: one line per problem. `reported`: already printed (torchrun's rank 0
    prints an agreed refusal before any rank exits), so the CLI prints nothing more."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = lines
        self.reported = False


class Refused(UserError):
    """A command or a run that cannot go ahead as asked: an argument, an input or output path, an earlier run with
    other parameters, a benchmark that would measure nothing."""

    def __init__(self, *lines: str):
        super().__init__(*lines)
        self.agreed = False  # under torchrun: every rank raised it together (dataset_inference.ranks)


class ConfigError(UserError, ValueError):
    """A config field (or config.json, preprocessor_config.json) that no CvT can have."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded: unreadable or corrupt files, or keys that do not fit the model. The message
    names the file or the keys; `remedy`, when there is one, is the from_pretrained argument that would accept it."""

    def __init__(self, problem: str, remedy: str | None = None):
        super().__init__(problem + (f" ({remedy})" if remedy else ""))
        self.lines = (problem,)  # without the remedy: a from_pretrained argument, which the CLI does not offer
        self.problem = problem
        self.remedy = remedy


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint under that name: no such folder, nothing on the Hub, or no weights or config in the folder."""


class CheckpointWriteError(CheckpointError, OSError):
    """save_pretrained could not write; whatever the folder held before is left as it was."""


class InputError(UserError, ValueError):
    """A tensor, label, device or argument given to the model that it cannot take."""


class InputTypeError(UserError, TypeError):
    """An input of the wrong type (a list where a tensor was expected, integer pixels, ...)."""


class KernelUnavailableError(UserError, RuntimeError):
    """backend="triton" was asked for, but the kernels cannot run on these inputs."""


class MissingDependencyError(UserError, ImportError):
    """An optional package that this feature needs is not installed; the message gives the pip command."""


def one_line(error: Exception | str, first_sentence: bool = False, limit: int = 200) -> str:
    """An exception's message on one line, without terminal colour codes, bounded in length."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())
    if first_sentence:
        text = text.split(". ", 1)[0]
    if not text and isinstance(error, Exception):
        text = type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_value(value: Any) -> str:
    """A value as a message shows it: its type (which is often the mistake) and a bounded repr."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
