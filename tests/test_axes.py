"""The axis table (:mod:`harness.axes`) is the one definition of every axis.

The schema, the cell ids, the load key, the report rows, the conformance labels and the
workload fields ``compare`` checks are derived from it; a new axis is one entry there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import MISSING
from pathlib import Path

from harness import axes
from harness.cell import Cell
from harness.compare import WORKLOAD_FIELDS
from harness.matrix import LOAD_AXES
from harness.scenario import AXES as SCHEMA_AXES
from reports.conformance import FEATURE_FIELDS
from reports.table import ROW_FIELDS

ROOT = Path(__file__).resolve().parent.parent

#: The whole change a new axis needs: one entry in harness/axes.py's table.
NEW_AXIS_DIFF = '''\
     Axis("seed", int, 0, {"ge": 0}, id=_prefixed("seed"), label=_prefixed("seed ")),
+    Axis("vae_tiling", bool, False, load=True, id=_flag("tiled", "untiled"),
+         label=_flag("VAE tiling", "no VAE tiling")),
'''


def test_everything_that_knows_an_axis_is_derived_from_the_table() -> None:
    names = [axis.name for axis in axes.AXES]
    assert list(SCHEMA_AXES) == names
    assert LOAD_AXES == tuple(axis.name for axis in axes.AXES if axis.load)
    fields = axes.record_fields()
    assert set(fields) - {"batch"} <= set(ROW_FIELDS)
    assert set(fields) - {"backend", "offload"} <= set(FEATURE_FIELDS)
    assert set(fields) <= set(WORKLOAD_FIELDS)
    for axis in axes.AXES:  # a Cell field with a default has the axis's default
        field = Cell.__dataclass_fields__.get(axis.name)
        if field is not None and field.default is not MISSING:
            assert field.default == axis.default, axis.name


_PROBE = r'''
import json
from harness.scenario import parse_scenario
from harness.matrix import expand, LOAD_AXES
from harness.results import Result, ResultStore, load
from reports.table import build_tables
from reports.conformance import build_conformance
import tempfile

scenario = parse_scenario({"name": "tiles", "checks": ["determinism"], "matrix": {
    "model": "tiny", "vae_tiling": [False, True], "batch": [1, 2]}}, "tiles.yaml")
cells = expand(scenario)
out = tempfile.mkdtemp()
store = ResultStore(out)
for cell in cells:
    metrics = {"its": 2.0, "its_repeats": [2.0], "cpu_peak_gb": 1.0, "wall_s": 1.0,
               "check_results": {"determinism": {"status": "pass", "detail": "same"}}}
    store.append(Result(run_id="r", cell=cell, status="ok", metrics=metrics,
                        timestamp="2026-01-01T00:00:00+00:00"))
frame = load(out)
(table,) = build_tables(frame)
conformance = build_conformance(frame, lambda path: None)
print(json.dumps({
    "ids": [cell.id for cell in cells],
    "values": [cell.vae_tiling for cell in cells],
    "load_axes": list(LOAD_AXES),
    "groups": len({cell.load_key() for cell in cells}),
    "fingerprints": len({cell.fingerprint() for cell in cells}),
    "rows": [row.label for row in table.rows],
    "features": [group.label for matrix in conformance.matrices for group in matrix.groups],
}))
'''


def _apply(diff: str, text: str) -> str:
    context = [line[1:] for line in diff.splitlines() if line.startswith(" ")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+")]
    anchor = "\n".join(context) + "\n"
    assert text.count(anchor) == 1, "the diff's context is not in harness/axes.py any more"
    return text.replace(anchor, anchor + "\n".join(added) + "\n")


def test_a_new_axis_is_one_entry_in_the_table(tmp_path: Path) -> None:
    """Apply :data:`NEW_AXIS_DIFF` to a copy of the harness package and nothing else: the
    schema accepts the axis, cells carry it, ids, load groups, report rows and the conformance
    matrix spell it."""
    shutil.copytree(ROOT / "harness", tmp_path / "harness",
                    ignore=shutil.ignore_patterns("__pycache__"))
    table = tmp_path / "harness" / "axes.py"
    table.write_text(_apply(NEW_AXIS_DIFF, table.read_text()))
    changed = subprocess.run(["git", "diff", "--no-index", "--stat", str(ROOT / "harness"),
                              str(tmp_path / "harness")], capture_output=True, text=True)
    assert changed.stdout.strip().splitlines()[-1].strip().startswith("1 file changed, 2 ins")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=False,
        cwd=tmp_path, env=os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["ids"] == ["diffusers-untiled-b1", "diffusers-untiled-b2",
                            "diffusers-tiled-b1", "diffusers-tiled-b2"]
    assert found["values"] == [False, False, True, True]
    assert "vae_tiling" in found["load_axes"] and found["groups"] == 2
    assert found["fingerprints"] == 4
    assert found["rows"] == ["diffusers (no VAE tiling)", "diffusers (VAE tiling)"]
    assert found["features"] == [f"txt2img ({tiling}, batch {batch})"
                                 for tiling in ("no VAE tiling", "VAE tiling") for batch in (1, 2)]


def test_a_wrong_value_of_an_axis_names_the_field_and_the_type() -> None:
    import pytest

    from harness.errors import UserError
    from harness.scenario import parse_scenario

    with pytest.raises(UserError, match=r"x.yaml: matrix.steps\[0\]: Input should be"):
        parse_scenario({"matrix": {"steps": "many"}}, "x.yaml")
