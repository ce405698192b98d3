"""The one timer of the benchmarks that share a machine's cores among contenders: interleaved rounds.

Rounds interleave the contenders, so that drift on a shared machine (another tenant, a clock that throttles) hits
all alike; within a round each runs a short block whose first call is not counted: the thread pools of torch,
ONNX Runtime and OpenVINO each take a call to get going after another's, which would otherwise be charged to
whoever runs next.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

BLOCK = 3  # calls per contender per round; the first of each block is not counted


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)  # seconds per counted call
    round_means: list[float] = field(default_factory=list)  # seconds per call, one mean per round

    @property
    def seconds(self) -> float:
        """The median call."""
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """How far the rounds' means lie apart, relative to their median: the noise a comparison must exceed."""
        return (max(self.round_means) - min(self.round_means)) / statistics.median(self.round_means)


def interleaved(
    contenders: dict[str, Callable[[int], object]],
    rounds: int,
    synchronize: Callable[[], None] = lambda: None,
    progress: Callable[[int], None] = lambda round_index: None,
) -> dict[str, Timing]:
    """Time each contender's `fn(round_index)` in `rounds` interleaved rounds of BLOCK calls; `synchronize` runs
    before and after each call (a CUDA device's, where the work is asynchronous)."""
    timings = {name: Timing() for name in contenders}
    for r in range(rounds):
        progress(r)
        for name, fn in contenders.items():
            block = []
            for call in range(BLOCK):
                synchronize()
                start = time.perf_counter()
                fn(r)
                synchronize()
                if call > 0:
                    block.append(time.perf_counter() - start)
            timings[name].samples += block
            timings[name].round_means.append(statistics.mean(block))
    return timings
