"""The table users want (DESIGN.md), computed from a results DataFrame.

One table per scenario. A **row** is a pipeline: every axis of the cell fixed except the
batch size. Its label is the backend, the offload mode when not ``none``, ``with SOURCE`` when
the source is not the hub folder, and — in parentheses — every other field that varies between
the scenario's rows (dtype, compile, attention, sampler, resolution, steps, model, …), so two
rows never share a label and no row merges cells that differ in anything but the batch.

The **columns** are it/s per batch size (one slot per batch size seen in the scenario), the
MFU per batch size where known, the ControlNets' share of the denoising time per batch size
for ControlNet rows (what the add-on costs), each stage's it/s per batch size for a
multi-stage model (Kandinsky 2.2's prior and decoder, DeepFloyd IF's stages), and memory: the
largest ``cpu_peak_gb`` and ``gpu_allocated_peak_gb`` over the row's ok cells.
A slot whose cell did not run ok carries its status instead of a figure. An ok slot also
carries its spread over the repeats (``its_cv``) and is **noisy** when that spread is beyond
the scenario's noise limit (``thresholds.noise``, recorded per cell as ``noise_limit``), so
nobody reads two figures apart by less than their noise as a finding.

Only the newest record of each cell counts (:func:`latest_records`). Numbers stay unrounded
here; :mod:`reports.formatting` rounds them for display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from harness import axes as axis_table
from harness.cell import DEFAULT_NOISE_LIMIT
from reports.formatting import number
from reports.verdicts import SPEED_METRIC, Verdict, VerdictIndex

#: Fields that define a row that are not axes: the scenario's settings and the environment,
#: which may differ between records of one scenario when the results of several runs are
#: merged. Row labels spell them after the axes.
RUN_FIELDS: tuple[str, ...] = ("prompt", "negative_prompt", "repeats", "warmup", "env_fingerprint")
#: The axes a row label starts with (``diffusers medvram with safetensors``); the others follow
#: in parentheses, in the axis table's order.
HEAD_AXES: tuple[str, ...] = ("backend", "offload", "source")
#: Fields that define a row (a pipeline): every axis's fields but ``batch`` (the columns),
#: from :data:`harness.axes.AXES`, then :data:`RUN_FIELDS`.
ROW_FIELDS: tuple[str, ...] = (
    *(name for name in axis_table.record_fields() if name != "batch"),
    *RUN_FIELDS,
)
#: Preferred value order for row sorting; other fields sort by first appearance.
_VALUE_ORDER: dict[str, tuple[Any, ...]] = {
    "offload": ("none", "medvram", "lowvram"),
    "source": ("hub", "safetensors", "ckpt"),
}
#: Fields sorted before the others, in this order (DESIGN.md's table: backend, source, offload).
_SORT_FIRST: tuple[str, ...] = ("backend", "source", "offload")

ITS_HEADER = "performance it/s"
MEMORY_HEADER = "memory cpu/gpu (GB)"
MFU_HEADER = "MFU"
CONTROLNET_HEADER = "ControlNet share of denoise"
STAGES_HEADER = "per-stage it/s"


@dataclass(frozen=True)
class Slot:
    """One batch size of one row: a figure, a status, or nothing (no such cell)."""

    batch: int
    cell_id: str | None = None
    status: str | None = None
    its: float | None = None
    reason: str | None = None
    #: The baseline's it/s of the same cell, when a baseline is given.
    baseline_its: float | None = None
    #: ``compare``'s verdict for this cell's it/s, when verdicts are given.
    verdict: Verdict | None = None
    #: The it/s spread over the repeats (``its_cv``); None for a single repeat.
    cv: float | None = None
    #: The scenario's noise limit for this cell (``thresholds.noise``).
    noise_limit: float = DEFAULT_NOISE_LIMIT
    #: Model FLOPs utilisation of the denoising (GPU cells with a known peak; ``mfu``).
    mfu: float | None = None
    #: The ControlNets' share of the denoising time (``controlnet_share``; ControlNet cells).
    controlnet_share: float | None = None
    #: A multi-stage model's ``(stage, STAGE_its)`` in running order (``stages``).
    stage_its: tuple[tuple[str, float | None], ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.its is not None

    @property
    def noisy(self) -> bool:
        """The figure's spread over its repeats is beyond the scenario's noise limit."""
        return self.ok and self.cv is not None and self.cv > self.noise_limit


@dataclass(frozen=True)
class Row:
    """One pipeline."""

    label: str
    #: The values of :data:`ROW_FIELDS`, which identify the row.
    key: tuple[Any, ...]
    slots: tuple[Slot, ...]
    cpu_gb: float | None
    gpu_gb: float | None
    baseline_cpu_gb: float | None = None
    baseline_gpu_gb: float | None = None
    #: Memory verdicts of the row's cells, most severe first.
    memory_verdicts: tuple[Verdict, ...] = ()

    @property
    def cell_ids(self) -> tuple[str, ...]:
        return tuple(slot.cell_id for slot in self.slots if slot.cell_id is not None)

    @property
    def memory_verdict(self) -> Verdict | None:
        return self.memory_verdicts[0] if self.memory_verdicts else None


@dataclass(frozen=True)
class Table:
    """The table of one scenario."""

    scenario: str
    batches: tuple[int, ...]
    rows: tuple[Row, ...]

    @property
    def its_header(self) -> str:
        """``performance it/s (batch 1 / 2 / 4 / 8 / 16)``."""
        return f"{ITS_HEADER} (batch {' / '.join(str(b) for b in self.batches)})"

    @property
    def memory_header(self) -> str:
        return MEMORY_HEADER

    @property
    def has_mfu(self) -> bool:
        """Some cell has an MFU (a GPU run on a GPU of known peak): the table shows it."""
        return any(slot.mfu is not None for row in self.rows for slot in row.slots)

    @property
    def mfu_header(self) -> str:
        return f"{MFU_HEADER} (batch {' / '.join(str(b) for b in self.batches)})"

    @property
    def has_controlnet(self) -> bool:
        """Some cell ran ControlNets: the table shows what they cost."""
        return any(slot.controlnet_share is not None for row in self.rows for slot in row.slots)

    @property
    def controlnet_header(self) -> str:
        return f"{CONTROLNET_HEADER} (batch {' / '.join(str(b) for b in self.batches)})"

    @property
    def has_stages(self) -> bool:
        """Some cell ran a multi-stage model: the table shows each stage's it/s."""
        return any(slot.stage_its for row in self.rows for slot in row.slots)

    @property
    def stages_header(self) -> str:
        return f"{STAGES_HEADER} (batch {' / '.join(str(b) for b in self.batches)})"

    @property
    def has_spread(self) -> bool:
        """Some figure has a spread over repeats to show."""
        return any(slot.ok and slot.cv is not None for row in self.rows for slot in row.slots)

    @property
    def noise_limits(self) -> tuple[float, ...]:
        """The noise limits of the table's ok cells (one, unless merged runs differ)."""
        return tuple(sorted({slot.noise_limit for row in self.rows for slot in row.slots
                             if slot.ok}))


def latest_records(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest record of each cell: :func:`harness.results.latest`."""
    from harness.results import latest

    return latest(frame)


def _value(record: dict[str, Any], field: str) -> Any:
    value = record.get(field)
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


def _row_key(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(_value(record, field) for field in ROW_FIELDS)


def _varying(keys: Sequence[tuple[Any, ...]]) -> set[str]:
    return {
        field
        for index, field in enumerate(ROW_FIELDS)
        if len({repr(key[index]) for key in keys}) > 1
    }


def _ordinal(values: list[Any], value: Any) -> int:
    return values.index(value) + 1


def _labels(keys: Sequence[tuple[Any, ...]], varying: set[str],
            distinct: dict[str, list[Any]]) -> dict[tuple[Any, ...], str]:
    """Each key's label; short ones (see :func:`_label`) unless two of them would coincide."""
    short = {key: _label(key, varying, distinct, brief=True) for key in keys}
    if len(set(short.values())) == len(short):
        return short
    return {key: _label(key, varying, distinct) for key in keys}


def _label(key: tuple[Any, ...], varying: set[str], distinct: dict[str, list[Any]],
           brief: bool = False) -> str:
    """``diffusers medvram with safetensors (fp16, 30 steps)``.

    Every varying field appears spelled with its value (defaults included), as its axis
    spells it (:attr:`harness.axes.Axis.label`), so labels of different keys always differ.
    ``brief`` leaves out what tells nothing apart in practice: a workflow parameter of another
    workflow (the strength of a txt2img cell) and a quiet feature value (``none`` LoRA /
    embedding: the rows that have one say so).
    """
    values = dict(zip(ROW_FIELDS, key, strict=True))
    words = [str(values["backend"])]
    extras: list[str] = []
    for axis in axis_table.AXES:
        value = axis.value_of(values)
        if axis.name in HEAD_AXES[1:]:
            if value is not None and not axis.is_quiet(value):
                words.append(axis.label(value))
            continue
        if axis.name in HEAD_AXES or not set(axis.record_fields) & varying or value is None:
            continue
        if brief and (not axis.used_by(values["workflow"])
                      or (axis.feature and axis.is_quiet(value))):
            continue
        extras.append(axis.label(value))
    for field in RUN_FIELDS:
        if field not in varying:
            continue
        value = values[field]
        if field in ("prompt", "negative_prompt"):
            extras.append(f"{field.replace('_', ' ')} #{_ordinal(distinct[field], value)}")
        elif field == "env_fingerprint":
            extras.append(f"env {str(value)[:8]}")
        else:
            extras.append(f"{field} {value}")
    return " ".join(words) + (f" ({', '.join(extras)})" if extras else "")


def _sort_key(key: tuple[Any, ...], first_seen: dict[str, list[Any]]) -> tuple[int, ...]:
    values = dict(zip(ROW_FIELDS, key, strict=True))

    def rank(field: str) -> int:
        preferred = _VALUE_ORDER.get(field, ())
        value = values[field]
        if value in preferred:
            return preferred.index(value)
        return len(preferred) + first_seen[field].index(value)

    order = (*_SORT_FIRST, *(f for f in ROW_FIELDS if f not in _SORT_FIRST))
    return tuple(rank(field) for field in order)


def _max(values: list[Any]) -> float | None:
    numbers = [v for v in (number(value) for value in values) if v is not None]
    return max(numbers) if numbers else None


def _baseline_index(baseline: pd.DataFrame | None) -> dict[tuple[str, str], dict[str, Any]]:
    if baseline is None or baseline.empty:
        return {}
    records = latest_records(baseline).to_dict(orient="records")
    return {(str(r["scenario"]), str(r["cell_id"])): r for r in records}


def build_tables(
    frame: pd.DataFrame,
    *,
    baseline: pd.DataFrame | None = None,
    verdicts: VerdictIndex | None = None,
) -> list[Table]:
    """One :class:`Table` per scenario, in order of first appearance.

    ``baseline`` adds each slot's baseline it/s and each row's baseline memory (matched by
    scenario and cell id); ``verdicts`` attaches ``compare``'s verdicts to slots and rows.
    """
    if frame.empty:
        return []
    records = latest_records(frame).to_dict(orient="records")
    base = _baseline_index(baseline)
    scenarios = list(dict.fromkeys(str(r["scenario"]) for r in records))
    return [
        _build_table(scenario, [r for r in records if str(r["scenario"]) == scenario],
                     base, verdicts)
        for scenario in scenarios
    ]


def _build_table(
    scenario: str,
    records: list[dict[str, Any]],
    base: dict[tuple[str, str], dict[str, Any]],
    verdicts: VerdictIndex | None,
) -> Table:
    batches = tuple(sorted({int(r["batch"]) for r in records}))
    groups: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = {}
    for record in records:  # in timestamp order: a later record of the same slot wins
        groups.setdefault(_row_key(record), {})[int(record["batch"])] = record

    keys = list(groups)
    varying = _varying(keys)
    first_seen = {
        field: list(dict.fromkeys(key[index] for key in keys))
        for index, field in enumerate(ROW_FIELDS)
    }
    labels = _labels(keys, varying, first_seen)
    rows: list[Row] = []
    for key in sorted(keys, key=lambda k: _sort_key(k, first_seen)):
        by_batch = groups[key]
        slots = tuple(_slot(scenario, batch, by_batch.get(batch), base, verdicts)
                      for batch in batches)
        cells = list(by_batch.values())
        ok_cells = [c for c in cells if c.get("status") == "ok"]
        base_cells = [base[(scenario, str(c["cell_id"]))] for c in cells
                      if (scenario, str(c["cell_id"])) in base]
        base_ok = [c for c in base_cells if c.get("status") == "ok"]
        cell_ids = [str(c["cell_id"]) for c in cells]
        rows.append(
            Row(
                label=labels[key],
                key=key,
                slots=slots,
                cpu_gb=_max([c.get("cpu_peak_gb") for c in ok_cells]),
                gpu_gb=_max([c.get("gpu_allocated_peak_gb") for c in ok_cells]),
                baseline_cpu_gb=_max([c.get("cpu_peak_gb") for c in base_ok]),
                baseline_gpu_gb=_max([c.get("gpu_allocated_peak_gb") for c in base_ok]),
                memory_verdicts=verdicts.memory(scenario, cell_ids) if verdicts else (),
            )
        )
    return Table(scenario=scenario, batches=batches, rows=tuple(rows))


def _slot(
    scenario: str,
    batch: int,
    record: dict[str, Any] | None,
    base: dict[tuple[str, str], dict[str, Any]],
    verdicts: VerdictIndex | None,
) -> Slot:
    if record is None:
        return Slot(batch=batch)
    cell_id = str(record["cell_id"])
    status = str(record.get("status"))
    baseline = base.get((scenario, cell_id))
    baseline_its = (
        number(baseline.get("its")) if baseline and baseline.get("status") == "ok" else None
    )
    repeats = record.get("its_repeats")
    single = not isinstance(repeats, list | tuple) or len(repeats) < 2
    noise_limit = number(record.get("noise_limit"))
    return Slot(
        batch=batch,
        cell_id=cell_id,
        status=status,
        its=number(record.get("its")) if status == "ok" else None,
        reason=_value(record, "reason"),
        baseline_its=baseline_its,
        verdict=verdicts.get(scenario, cell_id, SPEED_METRIC) if verdicts else None,
        cv=None if status != "ok" or single else number(record.get("its_cv")),
        mfu=number(record.get("mfu")) if status == "ok" else None,
        controlnet_share=number(record.get("controlnet_share")) if status == "ok" else None,
        stage_its=_stage_its(record) if status == "ok" else (),
        noise_limit=DEFAULT_NOISE_LIMIT if noise_limit is None else noise_limit,
    )


def _stage_its(record: dict[str, Any]) -> tuple[tuple[str, float | None], ...]:
    """``(stage, STAGE_its)`` of a multi-stage model's record (its ``stages``), else ()."""
    stages = _value(record, "stages")
    if not isinstance(stages, str) or not stages:
        return ()
    return tuple((name, number(record.get(f"{name}_its"))) for name in stages.split("+"))
