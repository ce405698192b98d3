"""The processes of a run: which one this is under torchrun (Ranks), and agreement between them (Coordinator, gloo)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from ...errors import Refused

# A rank that finished its shard waits for the slowest one; on a long job that can be hours (a throttled GPU). A rank
# that dies does not leave the others waiting: torchrun stops them all.
COORDINATION_TIMEOUT = timedelta(hours=24)

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """torchrun's RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; one process without them."""
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1)):
            text = os.environ.get(name, str(default))
            try:
                values[name.lower()] = int(text)
            except ValueError:
                raise Refused(f"environment variable {name} is {text!r}; expected a whole number") from None
        return cls(**values)


class Coordinator:
    """Agreement between the ranks; with one process every method is trivial."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.distributed = ranks.world_size > 1
        if self.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():  # under torchrun: the env:// rendezvous it set up
                dist.init_process_group("gloo", timeout=COORDINATION_TIMEOUT)

    def gather(self, value: T) -> list[T]:
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def agree(self, step: Callable[[], T]) -> T:
        """Run `step` on every rank; if any rank refuses, every rank refuses with the first refusal's lines (rank 0
        prints them, naming the rank they came from: a rank's own problem, its GPU say, is not lost). A barrier too."""
        try:
            value, refusal = step(), None
        except Refused as refused:
            value, refusal = None, refused.lines
        for rank, lines in enumerate(self.gather(refusal)):
            if lines:
                refused = Refused(*(lines if rank == 0 else [f"rank {rank}: {line}" for line in lines]))
                refused.agreed = True
                raise refused
        return value

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
