"""The doctor's findings in a report: per environment, and as notes beside the tables.

A result's environment carries the warn and fail findings of ``python -m harness doctor`` at
the time of the run (``env.doctor``: a list of dicts, see :mod:`harness.doctor`). The
environment section lists them; a scenario's table gets a note with the findings that bear on
its figures: a finding of ``scope`` ``gpu`` only where a cell was measured on a GPU (it has a
GPU memory figure), a ``host`` finding wherever a cell ran. Findings with the same outcome
(``no CUDA device: not checked``) are listed once, naming their checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from reports.formatting import number

#: How the report names the figures a finding affects (``harness.doctor.AFFECTS``).
AFFECT_LABELS: dict[str, str] = {"speed": "it/s", "memory": "memory", "load": "load time"}
FIELD = "doctor"


@dataclass(frozen=True)
class DoctorNote:
    """One outcome of the doctor, with the checks that gave it."""

    status: str
    checks: tuple[str, ...]
    detail: str
    advice: str | None
    affects: tuple[str, ...]

    @property
    def affects_text(self) -> str:
        return ", ".join(AFFECT_LABELS.get(name, name) for name in self.affects)


@dataclass(frozen=True)
class EnvDoctor:
    """The findings recorded in one environment of the report."""

    heading: str
    notes: tuple[DoctorNote, ...]


def findings(value: Any) -> list[dict[str, Any]]:
    """The findings in an ``env.doctor`` value (missing in results older than the doctor)."""
    if not isinstance(value, list | tuple):
        return []
    return [item for item in value if isinstance(item, dict) and "status" in item]


def notes(found: Iterable[dict[str, Any]]) -> tuple[DoctorNote, ...]:
    """Distinct outcomes, fails first, each with every check that gave it and everything
    those checks affect."""
    grouped: dict[tuple[str, str, Any], tuple[list[str], list[str]]] = {}
    for item in found:
        key = (str(item["status"]), str(item.get("detail", "")), item.get("advice"))
        checks, affects = grouped.setdefault(key, ([], []))
        checks += [str(item.get("check"))] if str(item.get("check")) not in checks else []
        affects += [str(a) for a in item.get("affects") or () if str(a) not in affects]
    ordered = sorted(grouped.items(), key=lambda entry: entry[0][0] != "fail")
    return tuple(
        DoctorNote(status, tuple(checks), detail, advice, _in_order(affects))
        for (status, detail, advice), (checks, affects) in ordered
    )


def _in_order(affects: list[str]) -> tuple[str, ...]:
    known = [name for name in AFFECT_LABELS if name in affects]
    return (*known, *(name for name in affects if name not in known))


def summary(value: Any) -> str:
    """The environment table's ``doctor`` row: ``1 fail, 2 warn: clocks, ecc, processes``."""
    found = findings(value)
    if not found:
        return "no warnings"
    tally = [f"{sum(f['status'] == s for f in found)} {s}" for s in ("fail", "warn")]
    counted = ", ".join(text for text in tally if not text.startswith("0 "))
    return f"{counted}: {', '.join(dict.fromkeys(str(f.get('check')) for f in found))}"


def environment_notes(envs: Sequence[Any]) -> tuple[EnvDoctor, ...]:
    """Per environment (:class:`reports.environment.Environment`), its recorded findings."""
    return tuple(
        EnvDoctor(env.heading, notes(findings(env.fields.get(FIELD))))
        for env in envs
        if findings(env.fields.get(FIELD))
    )


def table_notes(records: Iterable[dict[str, Any]]) -> tuple[DoctorNote, ...]:
    """The findings that bear on a table's figures (its records: ``latest_records`` rows)."""
    found: list[dict[str, Any]] = []
    for record in records:
        if record.get("status") != "ok":
            continue
        on_gpu = number(record.get("gpu_allocated_peak_gb")) is not None
        found += [
            item
            for item in findings(record.get(f"env.{FIELD}"))
            if item.get("affects") and (item.get("scope") != "gpu" or on_gpu)
        ]
    return notes(found)
