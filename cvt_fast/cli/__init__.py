"""Command line: `cvt-fast classify` (top labels for local images, or a whole folder into a results file),
`cvt-fast evaluate` (accuracy on a labelled folder), `cvt-fast bench` (throughput, every speed beside its error),
`cvt-fast export` (ONNX, validated with ONNX Runtime, or a frozen CPU package on this CPU's fastest engine) and
`cvt-fast convert` (an original CvT checkpoint into transformers' format).

Also reachable as `python -m cvt_fast`, which is also torchrun's way in (`torchrun -m cvt_fast classify --input ...`).
A failure the user can cause (an argument, an image, a checkpoint or a config file) ends in one line per problem,
`cvt-fast <command>: ...`, naming what is wrong and what was expected, and exit status 2; a traceback means a bug in
cvt_fast. torch is imported only once the arguments parse, so that `--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError, one_line
from . import bench, classify, convert, evaluate, export
from .common import Parser, first_rank


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="cvt-fast", description=__doc__.split("\n\n")[0].replace("\n", " "))
    sub = top.add_subparsers(dest="command", required=True)
    for command in (classify, evaluate, bench, export, convert):
        command.add_parser(sub)
    return top


def user_error_lines(error: Exception) -> tuple[str, ...] | None:
    """The lines to print for a failure the user caused, or None for anything else (a bug: let it show)."""
    if isinstance(error, UserError):
        return () if error.reported else tuple(one_line(line, limit=1000) for line in error.lines)
    if isinstance(error, (FileNotFoundError, ImportError)):  # a path given, an optional package missing
        return (one_line(error, limit=1000),)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    prog = f"cvt-fast {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt as interrupt:
        # A command that knows how far it got (classify --input) says so, and how to go on.
        if first_rank():
            print(f"{prog}: interrupted{': ' + str(interrupt) if str(interrupt) else ''}", file=sys.stderr)
        return 130
    except Exception as error:
        lines = user_error_lines(error)
        if lines is None and _failed_its_own_check(error):
            print(f"{prog}: {one_line(error, limit=1000)}", file=sys.stderr)  # not the user's doing, nor a crash
            return 1
        if lines is None:
            raise
        for line in lines if first_rank() else ():
            print(f"{prog}: {line}", file=sys.stderr)
        return 2


def _failed_its_own_check(error: Exception) -> bool:
    """An export or a freeze whose result failed its check against the model: nothing was written or returned. (The
    modules are looked up, not imported: whenever such an error can have been raised, they are imported already.)"""
    checks = [("cvt_fast.export", "ExportError"), ("cvt_fast.frozen.freezing", "FreezeError")]
    return any(
        (module := sys.modules.get(name)) is not None and isinstance(error, getattr(module, kind))
        for name, kind in checks
    )


if __name__ == "__main__":
    sys.exit(main())
