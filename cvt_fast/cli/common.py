"""What every command shares: one-line argument errors, number types, the device and backend checks, and which
process speaks for a torchrun job."""

from __future__ import annotations

import argparse
import difflib
import os

from ..errors import Refused


def first_rank() -> bool:
    """Whether this process speaks for the run: under torchrun, only rank 0 prints a refusal (every rank meets the same
    ones; a rank's own problem reaches rank 0 through cvt_fast.tools.dataset_inference), so it shows once, not N
    times."""
    return os.environ.get("RANK", "0") in ("0", "")


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # argparse's own report is the whole usage block, then the message: one line says it, and where to look.
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n" if first_rank() else None)

    def parse_args(self, args=None, namespace=None):
        # argparse leaves arguments nobody knows to the top-level parser, which names neither the command they were
        # given to nor the option that was meant: the command's own parser says both.
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self._command_parser(parsed) or self
            options = [o for action in command._actions for o in action.option_strings]
            flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
            meant = [guess[0] for flag in flags if (guess := difflib.get_close_matches(flag, options, n=1))]
            hint = f" (did you mean {' or '.join(meant)}?)" if meant else ""
            command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices.get(getattr(parsed, action.dest, None))
        return None


def at_least(smallest: int):
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < smallest:
            raise argparse.ArgumentTypeError(f"expected a number of at least {smallest}, got {value}")
        return value

    return whole_number


at_least_one = at_least(1)


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def device(name: str | None):
    """--device as a torch.device this machine has (default: CUDA when there is one)."""
    import torch

    from ..checks import check_device

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return check_device(name)
    except ValueError as error:
        raise Refused(f"argument --device: {error}") from None


def check_backend(backend: str | None) -> str:
    """--backend is checked by argparse; without it, CVT_FAST_BACKEND from the environment decides."""
    from ..ops.dispatch import resolve_backend

    try:
        return resolve_backend(backend)
    except ValueError as error:
        raise Refused(str(error)) from None
