import json

import pytest

from pipeline.config import PlanConfig, load_config
from pipeline.plan import RunMismatchError, load_run, make_plan, prepare_run
from pipeline.records import MediaItem


def _items(n, frames=lambda i: 10 + (i * 7) % 13):
    return [MediaItem(f"item{i:03d}", f"/data/{i}.mp4", "video", frames(i), 24.0, 64, 48, "h264", 100) for i in range(n)]


def test_every_item_in_exactly_one_shard_and_shards_balanced():
    items = _items(50)
    shards = make_plan(items, PlanConfig(max_items_per_shard=8))
    assert len(shards) == 7
    ids = [i for s in shards for i in s.item_ids]
    assert sorted(ids) == sorted(it.item_id for it in items)
    assert all(len(s.item_ids) <= 8 for s in shards)
    costs = [s.cost for s in shards]
    assert max(costs) <= 1.25 * (sum(costs) / len(costs))


def test_plan_is_deterministic_and_independent_of_workers():
    items = _items(30)
    assert make_plan(items, PlanConfig(num_shards=4)) == make_plan(items, PlanConfig(num_shards=4))


def test_one_huge_item_gets_a_shard_of_its_own():
    items = _items(9, frames=lambda i: 1000 if i == 4 else 10)
    shards = make_plan(items, PlanConfig(num_shards=3))
    big = [s for s in shards if "item004" in s.item_ids][0]
    assert len(big.item_ids) <= 3


def test_prepare_run_freezes_and_refuses_changes(tmp_path):
    items = _items(5)
    cfg = load_config(None, ["plan.max_items_per_shard=2"])
    plan = prepare_run(tmp_path / "run", items, cfg)
    frozen = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert frozen["version"] == 2 and sorted(frozen["shards"]["num_items"]) == [1, 2, 2] and len(plan.shards) == 3
    again = prepare_run(tmp_path / "run", items, load_config(None, ["plan.max_items_per_shard=2", "retries=3"]))
    assert again.shards == plan.shards, "executor-side settings may change between launches"
    with pytest.raises(RunMismatchError, match="another config"):
        prepare_run(tmp_path / "run", items, load_config(None, ["prompt.points_per_side=8"]))
    with pytest.raises(RunMismatchError, match="different manifest"):
        prepare_run(tmp_path / "run", items[:4], cfg)
    assert load_run(tmp_path / "run").items.keys() == {it.item_id for it in items}


def test_item_ids_that_could_escape_the_run_folder_are_refused(tmp_path):
    bad = [MediaItem("../../etc", "/x.mp4", "video", 1, None, 8, 8, None, 1)]
    with pytest.raises(ValueError, match="not safe"):
        prepare_run(tmp_path / "run", bad, load_config())
