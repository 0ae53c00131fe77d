"""What every executor offers: launch shards of a run folder and say when they are finished."""
from __future__ import annotations

from typing import Protocol, Sequence


class Executor(Protocol):
    name: str

    def launch(self, run_dir: str, shard_ids: Sequence[int]) -> None:
        """Start (or run) the given shards. Local executors block until they are done."""
        ...
