"""Matrix expansion: a :class:`~harness.scenario.Scenario` becomes a list of :class:`Cell`.

Order of operations follows CI matrices: the cartesian product of the axis lists, minus every
combination that matches an ``exclude`` entry (all keys of the entry equal), plus one cell per
``include`` entry (axes the entry does not name take the first value listed for that axis).
Duplicates are dropped, keeping the first.

Cells that share a :meth:`Cell.load_key` are run from one loaded model, so a sweep of batch
sizes, steps, resolutions or samplers costs one load.
"""

from __future__ import annotations

import itertools
from typing import Any

from harness import axes as axis_table
from harness.cell import LOAD_AXES, Cell, field_names, own_axes
from harness.errors import UserError
from harness.scenario import AXES, Scenario
from harness.vocabulary import CONTROLNET_WORKFLOWS

__all__ = ["LOAD_AXES", "Cell", "expand", "group_by_load"]

def _matches(combo: dict[str, Any], entry: dict[str, Any]) -> bool:
    return all(combo[key] == value for key, value in entry.items())


def _entry(model: Any) -> dict[str, Any]:
    return {key: value for key, value in model.model_dump().items() if value is not None}


def expand(scenario: Scenario) -> list[Cell]:
    """Expand the scenario's matrix into cells with readable, unique ids."""
    matrix = scenario.matrix
    axes = {name: list(getattr(matrix, name)) for name in AXES}
    combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    excludes = [_entry(entry) for entry in matrix.exclude]
    combos = [combo for combo in combos if not any(_matches(combo, e) for e in excludes)]
    for include in matrix.include:
        combos.append({name: values[0] for name, values in axes.items()} | _entry(include))

    unique: list[dict[str, Any]] = []
    for combo in combos:
        if combo not in unique:
            unique.append(combo)

    _check_backends(scenario, unique)
    _check_control_windows(scenario, unique)
    table = axis_table.AXES
    varying = [axis for axis in table if len({repr(c[axis.name]) for c in unique}) > 1]
    shown = [table[0], *(axis for axis in varying if axis is not table[0])]  # backend first
    own = field_names()
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for combo in unique:
        base_id = "-".join(
            axis.id(combo[axis.name]) for axis in shown if axis_table.shown_in_id(axis, combo)
        )
        seen[base_id] = seen.get(base_id, 0) + 1
        cell_id = base_id if seen[base_id] == 1 else f"{base_id}-{seen[base_id]}"
        width, height = combo.pop("resolution")
        cells.append(
            Cell(
                scenario=scenario.name,
                scenario_path=scenario.path,
                scenario_fingerprint=scenario.fingerprint(),
                id=cell_id,
                width=width,
                height=height,
                prompt=scenario.prompt,
                negative_prompt=scenario.negative_prompt,
                repeats=scenario.repeats,
                warmup=scenario.warmup,
                timeout_s=scenario.timeout_s,
                load_timeout_s=scenario.load_timeout_s,
                noise_limit=scenario.thresholds.noise,
                checks=tuple(scenario.checks),
                axes=own_axes(combo),
                **{name: value for name, value in combo.items() if name in own},
            )
        )
    return cells


def _check_backends(scenario: Scenario, combos: list[dict[str, Any]]) -> None:
    """Every backend named must be known (built-in, a plugin's entry point, or an importable
    ``module:Class``); else a one-line :class:`UserError` naming the file and the field."""
    import backends

    for name in dict.fromkeys(combo["backend"] for combo in combos):
        problem = backends.unknown(name)
        if problem is None:
            continue
        listed = list(getattr(scenario.matrix, "backend"))  # noqa: B009 - a built field
        if name in listed:
            where = f"matrix.backend[{listed.index(name)}]"
        else:
            entries = [getattr(entry, "backend") for entry in scenario.matrix.include]  # noqa: B009
            where = f"matrix.include[{entries.index(name)}].backend"
        raise UserError(f"{scenario.path}: {where}: {problem}")


def _check_control_windows(scenario: Scenario, combos: list[dict[str, Any]]) -> None:
    """A ControlNet cell's ``control_start`` must be below its ``control_end``."""
    for combo in combos:
        if combo["workflow"] not in CONTROLNET_WORKFLOWS:
            continue
        start, end = combo["control_start"], combo["control_end"]
        if start >= end:
            raise UserError(
                f"{scenario.path}: matrix: control_start {start:g} with control_end {end:g}: "
                "expected control_start below control_end (fractions of the steps)"
            )


def group_by_load(cells: list[Cell]) -> list[list[Cell]]:
    """Groups of cells sharing a load key, in first-seen order, each group in cell order."""
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.load_key(), []).append(cell)
    return list(groups.values())
