"""The JSONL results store: one flushed line per cell, versioned, loadable into pandas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import UserError, expand, parse_scenario
from harness.results import SCHEMA_VERSION, Result, ResultStore, latest, load


def _cells() -> list:
    return expand(parse_scenario({"name": "r", "matrix": {"batch": [1, 2, 4]}}, "r.yaml"))


def _ok(cell, its: float, run_id: str = "run-1") -> Result:
    return Result(
        run_id=run_id,
        cell=cell,
        status="ok",
        metrics={"its": its, "its_repeats": [its, its], "cpu_peak_gb": 1.25},
        env={"torch": "2.13.0", "gpu_name": None},
        env_fingerprint="abc",
    )


def test_append_and_load(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    first, second, third = _cells()
    store.append(_ok(first, 3.5))
    store.append(Result(run_id="run-1", cell=second, status="unsupported", reason="no GPU"))
    store.append(
        Result(
            run_id="run-1",
            cell=third,
            status="error",
            reason="RuntimeError: boom",
            error_type="RuntimeError",
            traceback="Traceback ...",
        )
    )
    frame = load(tmp_path)
    assert list(frame["cell_id"]) == [first.id, second.id, third.id]
    assert list(frame["status"]) == ["ok", "unsupported", "error"]
    assert frame.loc[0, "its"] == 3.5 and frame.loc[0, "env.torch"] == "2.13.0"
    assert frame.loc[1, "reason"] == "no GPU"
    assert frame.loc[0, "batch"] == 1 and frame.loc[2, "batch"] == 4
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert all(json.loads(line)["schema_version"] == SCHEMA_VERSION for line in lines)


def test_round_trip_and_nan_stored_as_null(tmp_path: Path) -> None:
    cell = _cells()[0]
    result = _ok(cell, 2.0)
    assert Result.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    store = ResultStore(tmp_path)
    store.append(
        Result(run_id="r", cell=cell, status="ok", metrics={"its": 1.0, "denoise_its": float("nan")})
    )
    assert json.loads((tmp_path / "results.jsonl").read_text())["metrics"]["denoise_its"] is None


def test_a_cut_last_line_is_skipped(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    for cell, its in zip(_cells(), (1.0, 2.0, 3.0), strict=True):
        store.append(_ok(cell, its))
    path = tmp_path / "results.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # the third line cut mid-write by a kill
    assert list(load(path)["its"]) == [1.0, 2.0]
    store.append(_ok(_cells()[2], 4.0))  # a resumed run drops the cut line, then appends
    assert list(load(path)["its"]) == [1.0, 2.0, 4.0]
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 3


def test_bad_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    cells = _cells()
    store.append(_ok(cells[0], 1.0))
    with (tmp_path / "results.jsonl").open("a") as handle:
        handle.write("{not json\n")
    store.append(_ok(cells[1], 2.0))
    with pytest.raises(UserError, match=r"results.jsonl:2: not a JSON record"):
        load(tmp_path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    record = _ok(_cells()[0], 1.0).to_dict() | {"schema_version": SCHEMA_VERSION + 1}
    (tmp_path / "results.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="newer than this sdbench reads"):
        load(tmp_path)


def test_missing_results() -> None:
    with pytest.raises(UserError, match="no results file"):
        load("does-not-exist")


def test_records_validate_their_status() -> None:
    cell = _cells()[0]
    with pytest.raises(ValueError, match="status must be one of"):
        Result(run_id="r", cell=cell, status="fine", reason="x")
    with pytest.raises(ValueError, match="needs measured figures"):
        Result(run_id="r", cell=cell, status="ok")
    with pytest.raises(ValueError, match="needs a reason"):
        Result(run_id="r", cell=cell, status="error")


def test_latest_keeps_newest_record_per_cell(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    cells = _cells()
    store.append(_ok(cells[0], 1.0, "run-1"))
    store.append(_ok(cells[1], 1.0, "run-1"))
    store.append(_ok(cells[0], 5.0, "run-2"))
    frame = latest(load(tmp_path))
    assert len(frame) == 2
    assert frame.set_index("cell_id").loc[cells[0].id, "its"] == 5.0


def test_latest_is_by_timestamp_then_file_order(tmp_path: Path) -> None:
    import dataclasses

    cells = _cells()
    newer = dataclasses.replace(_ok(cells[0], 7.0, "run-2"), timestamp="2026-12-01T10:00:05")
    older = dataclasses.replace(_ok(cells[0], 3.0, "run-1"), timestamp="2026-12-01T10:00:00")
    tie = dataclasses.replace(_ok(cells[0], 9.0, "run-3"), timestamp="2026-12-01T10:00:05")
    first, second = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b")
    first.append(newer)
    second.append(older)  # merged directories: file order alone would pick this one
    assert latest(load([tmp_path / "a", tmp_path / "b"]))["its"].tolist() == [7.0]
    second.append(tie)  # equal timestamps: the later line wins
    assert latest(load([tmp_path / "a", tmp_path / "b"]))["its"].tolist() == [9.0]


def test_compare_reports_and_resume_agree_on_the_latest_record(tmp_path: Path) -> None:
    """One rule (:func:`harness.results.newest`) for every reader of merged directories."""
    import dataclasses

    from harness.compare import compare
    from harness.plan import pending
    from reports.table import build_tables

    cells = _cells()
    newer = dataclasses.replace(_ok(cells[0], 7.0, "run-2"), timestamp="2026-12-01T10:00:05")
    older = dataclasses.replace(_ok(cells[0], 3.0, "run-1"), timestamp="2026-12-01T10:00:00")
    ResultStore(tmp_path / "a").append(newer)
    ResultStore(tmp_path / "b").append(older)  # later in file order, older in time
    merged = load([tmp_path / "a", tmp_path / "b"])
    (table,) = build_tables(merged)
    assert table.rows[0].slots[0].its == 7.0
    compared = compare(merged, merged).table
    assert set(compared[compared["metric"] == "its"]["current"]) == {7.0}
    records = [newer, older]
    assert pending([cells[0]], records, newer.env_fingerprint) == []  # the newer one counts
    assert pending([cells[0]], records, "another environment") == [cells[0]]
