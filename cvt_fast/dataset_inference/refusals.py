"""ClassifyRefused: a problem the user can fix, raised by any step; the ranks agree on it (ranks.Coordinator)."""

from __future__ import annotations


class ClassifyRefused(Exception):
    """A problem the user can fix (the input, the output, an earlier run with other parameters): one line each."""

    def __init__(self, *lines: str):
        super().__init__("\n".join(lines))
        self.lines = lines
        self.agreed = False  # every rank raised it together (Coordinator.agree)
        self.reported = False  # already printed (by rank 0, before any rank exited)
