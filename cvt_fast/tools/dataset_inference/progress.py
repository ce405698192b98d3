"""Rank 0's progress line while it runs: images done, images/s and ETA."""

from __future__ import annotations

import sys
import time


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
