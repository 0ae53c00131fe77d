"""Reading a run: `open_run(OUT)` gives the items, masklets and per-frame tables (committed items only)
and each item's masks as a lazy Zarr array."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import zarr

from pipeline.paths import RunPaths
from pipeline.plan import RunPlan, load_run
from pipeline.store import metadata
from pipeline.store.commit import read_table
from pipeline.store.masks import open_masks


@dataclass
class RunResults:
    plan: RunPlan

    @property
    def paths(self) -> RunPaths:
        return self.plan.paths

    @property
    def random_weights(self) -> bool:
        """True when the masks came from a random-weight model: plumbing checks, never results."""
        return self.plan.random_weights

    @cached_property
    def items(self) -> pa.Table:
        return read_table(self.paths, "items", metadata.ITEMS_SCHEMA)

    @cached_property
    def masklets(self) -> pa.Table:
        return read_table(self.paths, "masklets", metadata.MASKLETS_SCHEMA)

    @cached_property
    def frames(self) -> pa.Table:
        return read_table(self.paths, "frames", metadata.FRAMES_SCHEMA)

    def item_ids(self, status: str = "done") -> list[str]:
        return self.items.filter(pc.equal(self.items["status"], status))["item_id"].to_pylist()

    def masks(self, item_id: str) -> zarr.Array:
        """bool (objects, frames, H, W), read lazily chunk by chunk (`[o, t]` reads one masklet-frame)."""
        if item_id not in set(self.item_ids("done")):
            raise KeyError(f"item {item_id!r} has no committed masks in {self.paths.root} (see `masklet status`)")
        return open_masks(self.paths, item_id)

    def masks_dask(self, item_id: str):
        import dask.array as da

        return da.from_zarr(self.masks(item_id))


def open_run(out: str | Path) -> RunResults:
    return RunResults(load_run(out))
