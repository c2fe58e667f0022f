"""Which cells run: shards, resume, longest groups first (pure functions, no models)."""

from __future__ import annotations

import dataclasses

import pytest

from harness import expand, group_by_load, parse_scenario
from harness.errors import UserError
from harness.plan import cost, longest_first, parse_shard, pending, shard
from harness.results import Result

MATRIX = {
    "backend": ["diffusers", "original"],
    "model": "tiny",
    "source": "safetensors",
    "dtype": ["fp32", "fp16", "bf16"],
    "offload": ["none", "medvram"],
    "batch": [1, 2, 4],
    "resolution": [64, 128],
}


def _groups() -> list:
    return group_by_load(expand(parse_scenario({"name": "p", "matrix": MATRIX})))


@pytest.mark.parametrize("count", [1, 2, 3, 5, 12, 20])
def test_shards_are_disjoint_cover_everything_and_keep_groups_whole(count: int) -> None:
    groups = _groups()
    parts = [shard(groups, index, count) for index in range(1, count + 1)]
    seen = [cell.id for part in parts for group in part for cell in group]
    assert sorted(seen) == sorted(cell.id for group in groups for cell in group)
    assert len(seen) == len(set(seen))  # disjoint
    for part in parts:  # a group is never split
        for group in part:
            assert group in groups
    assert parts == [shard(_groups(), index, count) for index in range(1, count + 1)]
    if count <= len(groups):
        loads = [sum(cost(group) for group in part) for part in parts]
        assert max(loads) <= 2 * min(loads)  # balanced by estimated cost


def test_parse_shard() -> None:
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ("0/2", "3/2", "1-2", "a/b", ""):
        with pytest.raises(UserError, match="--shard: expected K/N"):
            parse_shard(bad)


def test_longest_groups_first() -> None:
    groups = _groups()
    ordered = longest_first(groups)
    costs = [cost(group) for group in ordered]
    assert costs == sorted(costs, reverse=True) and len(ordered) == len(groups)


def _record(cell, status: str = "ok", env: str = "env1", timestamp: str = "2026-12-01T10:00:00"):
    metrics = {"its": 1.0} if status == "ok" else {}
    return Result("r", cell, status, reason=None if status == "ok" else "x", metrics=metrics,
                  env_fingerprint=env, timestamp=timestamp)


def test_pending_skips_finished_cells_of_the_same_workload_and_environment() -> None:
    a, b, c, d, e = expand(parse_scenario({"name": "p", "matrix": {"batch": [1, 2, 3, 4, 5]}}))
    changed = dataclasses.replace(d, repeats=d.repeats + 1)
    records = [
        _record(a),
        _record(b, "crashed"),
        _record(c, env="env2"),  # another machine or library version
        _record(d),
        _record(e, "timeout", timestamp="2026-12-01T10:00:00"),
        _record(e, "ok", timestamp="2026-12-01T10:05:00"),  # the latest counts
    ]
    assert pending([a, b, c, changed, e], records, "env1") == [c, changed]
    assert pending([a, b, c, changed, e], records, "env1", rerun_failed=True) == [b, c, changed]
    relocated = dataclasses.replace(a, scenario_path="elsewhere.yaml", timeout_s=9.0)
    assert pending([relocated], records, "env1") == []  # neither path nor budget is workload
