"""The environment of the runs in a report, as a table with one column per environment.

A results frame carries the environment as ``env.<field>`` columns and a short
``env_fingerprint``. Usually a report holds one environment; merged runs, or a baseline
beside the current run, give several columns, and rows whose values differ are marked.
The ``doctor`` row summarises the recorded findings (:mod:`reports.doctor` lists them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from reports import doctor
from reports.formatting import text

#: Known fields, in display order; other ``env.*`` columns follow in frame order.
ENV_FIELDS: tuple[str, ...] = (
    "gpu_name",
    "gpu_count",
    "gpu_memory_gb",
    "driver",
    "cuda",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "python",
    "cpu",
    "cpu_count",
    "ram_gb",
    "os",
    "harness_commit",
    doctor.FIELD,
)
_PREFIX = "env."


@dataclass(frozen=True)
class Environment:
    """One environment: a heading and its fields."""

    heading: str
    fingerprint: str
    cells: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class EnvRow:
    field: str
    values: tuple[str, ...]
    differs: bool


@dataclass(frozen=True)
class EnvTable:
    headings: tuple[str, ...]
    rows: tuple[EnvRow, ...]

    @property
    def differences(self) -> tuple[str, ...]:
        return tuple(row.field for row in self.rows if row.differs)


def environments(frame: pd.DataFrame | None, name: str = "") -> list[Environment]:
    """The distinct environments of a frame (by fingerprint), newest record's fields each.

    ``name`` prefixes the headings (``baseline``, ``current``); with one environment the
    heading is the name alone (or ``this run``).
    """
    if frame is None or frame.empty:
        return []
    columns = [c for c in frame.columns if c.startswith(_PREFIX)]
    fingerprints = (
        frame["env_fingerprint"].fillna("").astype(str)
        if "env_fingerprint" in frame.columns
        else pd.Series([""] * len(frame), index=frame.index)
    )
    found: list[Environment] = []
    distinct = list(dict.fromkeys(fingerprints))
    for fingerprint in distinct:
        rows = frame[fingerprints == fingerprint]
        last = rows.iloc[-1]
        fields = {c[len(_PREFIX):]: _clean(last[c]) for c in columns}
        if len(distinct) == 1:
            heading = name or "this run"
        else:
            heading = f"{name} {fingerprint[:8] or '?'}".strip()
        found.append(Environment(heading, fingerprint, len(rows), fields))
    return found


def _clean(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    return value


def environment_table(envs: Sequence[Environment]) -> EnvTable:
    """Rows of fields, one column per environment; ``differs`` where the values disagree."""
    names: list[str] = [f for f in ENV_FIELDS if any(f in env.fields for env in envs)]
    for env in envs:
        names += [f for f in env.fields if f not in names]
    rows = []
    for field in names:
        show = doctor.summary if field == doctor.FIELD else text
        values = tuple(show(env.fields.get(field)) for env in envs)
        rows.append(EnvRow(field, values, differs=len(set(values)) > 1))
    return EnvTable(headings=tuple(env.heading for env in envs), rows=tuple(rows))
