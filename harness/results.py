"""Result records and the JSONL results store.

Every cell that ends — ok, error, oom, timeout or unsupported — is appended to
``DIR/results.jsonl`` as one JSON line and flushed (and fsync'ed) at once, so a killed run
keeps every finished cell. Each line is a :class:`Result`: a schema version, the run id, the
cell, its status, the measured figures and the environment.

:func:`load` reads one or more stores into a pandas DataFrame with one row per line; its
columns are documented in ``docs/results.md``: the cell's fields under their own names,
the figures of :meth:`harness.measure.Measurement.summary`, ``status``/``reason``/``error_*``,
and the environment as ``env.<field>``.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from harness.errors import UserError
from harness.matrix import Cell
from harness.vocabulary import STATUSES

T = TypeVar("T")

#: Version of the record layout. Readers refuse newer versions and migrate older ones.
SCHEMA_VERSION = 1
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class Result:
    """The outcome of one cell."""

    run_id: str
    cell: Cell
    status: str
    #: Why a cell is unsupported, or the one-line error of a failed cell.
    reason: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    #: Flat figures (:meth:`harness.measure.Measurement.summary`) plus output checks.
    metrics: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    env_fingerprint: str = ""
    timestamp: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "ok" and "its" not in self.metrics:
            raise ValueError("an ok result needs measured figures (metrics['its'])")
        if self.status != "ok" and not self.reason:
            raise ValueError(f"a {self.status} result needs a reason")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "run_id": self.run_id,
            "timestamp": self.timestamp,
            "cell": self.cell.to_dict(),
            "status": self.status,
            "reason": self.reason,
            "error_type": self.error_type,
            "traceback": self.traceback,
            "metrics": self.metrics,
            "env": self.env,
            "env_fingerprint": self.env_fingerprint,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        data = migrate(data)
        return cls(
            run_id=data["run_id"],
            cell=Cell.from_dict(data["cell"]),
            status=data["status"],
            reason=data.get("reason"),
            error_type=data.get("error_type"),
            traceback=data.get("traceback"),
            metrics=data.get("metrics") or {},
            env=data.get("env") or {},
            env_fingerprint=data.get("env_fingerprint", ""),
            timestamp=data.get("timestamp", ""),
        )


def migrate(data: dict[str, Any], where: str = "record") -> dict[str, Any]:
    """Bring a record to :data:`SCHEMA_VERSION`, refusing files from a newer sdbench."""
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise UserError(f"{where}: schema_version: expected an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise UserError(
            f"{where}: schema_version {version} is newer than this sdbench reads "
            f"({SCHEMA_VERSION}); upgrade sdbench to read it"
        )
    # Version 1 is the first layout; later versions add their migrations here, oldest first.
    return data


def jsonable(value: Any) -> Any:
    """JSON has no NaN/inf (stored as null) and no tuples (lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return value


class ResultStore:
    """Appends results to ``DIR/results.jsonl``, one flushed line per cell.

    Several processes may append to one store (pytest-xdist workers, shards sharing a disk):
    each line is written in one ``write`` under an exclusive ``flock``. A last line cut short
    by a killed writer is dropped before the next append, so the file stays one record a line.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / RESULTS_FILE

    def append(self, result: Result) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        line = json.dumps(jsonable(result.to_dict()), sort_keys=True, allow_nan=False) + "\n"
        descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            _drop_partial_line(descriptor)
            os.write(descriptor, line.encode("utf-8"))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)  # releases the lock


def _drop_partial_line(descriptor: int) -> None:
    """Truncate the file after its last newline (a record cut short by a killed writer)."""
    size = os.fstat(descriptor).st_size
    if size == 0 or os.pread(descriptor, 1, size - 1) == b"\n":
        return
    position, chunk = size, 1 << 16
    while position > 0:
        start = max(0, position - chunk)
        found = os.pread(descriptor, position - start, start).rfind(b"\n")
        if found >= 0:
            os.ftruncate(descriptor, start + found + 1)
            return
        position = start
    os.ftruncate(descriptor, 0)


def _results_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise UserError(f"{path}: no results file (expected a run directory or a .jsonl file)")
    return path


def iter_results(path: str | Path) -> Iterator[Result]:
    """Read the records of one store (a run directory or a ``.jsonl`` file).

    A last line cut short by a killed run is skipped; any other bad line is a UserError.
    """
    file = _results_path(path)
    lines = file.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                continue  # the line a killed process was writing
            raise UserError(f"{file}:{number}: not a JSON record ({error.msg})") from None
        try:
            yield Result.from_dict(migrate(data, f"{file}:{number}"))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{file}:{number}: malformed result record: {error}") from None


def to_row(result: Result) -> dict[str, Any]:
    """One flat DataFrame row: cell fields, status, metrics, ``env.*``."""
    row: dict[str, Any] = {
        "schema_version": result.schema_version,
        "run_id": result.run_id,
        "timestamp": result.timestamp,
        **result.cell.to_dict(),
        "cell_id": result.cell.id,
        "nodeid": result.cell.nodeid,
        "status": result.status,
        "reason": result.reason,
        "error_type": result.error_type,
        "traceback": result.traceback,
        "env_fingerprint": result.env_fingerprint,
    }
    row.update(result.metrics)
    row.update({f"env.{key}": value for key, value in result.env.items()})
    return row


def load(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Load one or more results stores into a DataFrame (one row per record).

    ``paths`` may be run directories or ``results.jsonl`` files.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    rows = [to_row(result) for path in paths for result in iter_results(path)]
    return pd.DataFrame(rows)


def newest(
    items: Iterable[T], key: Callable[[T], Hashable], timestamp: Callable[[T], str | None]
) -> list[T]:
    """The newest item per ``key``: the one rule for "the latest record of a cell".

    Items are ordered by timestamp (stable, so file order breaks ties; a missing timestamp
    counts as the oldest) and the last one of each key is kept, in the order of the kept
    items. This makes merging several results directories order-independent. :func:`latest`
    is the same rule on a DataFrame; the resume plan and A/B records use this one.
    """
    chosen: dict[Hashable, T] = {}
    for item in sorted(items, key=lambda i: timestamp(i) or ""):
        chosen.pop(key(item), None)
        chosen[key(item)] = item
    return list(chosen.values())


def latest(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest record of each cell (by scenario and cell id): :func:`newest` on a frame."""
    if frame.empty:
        return frame
    ordered = frame
    if "timestamp" in frame.columns:
        ordered = frame.sort_values("timestamp", kind="stable", na_position="first")
    return ordered.drop_duplicates(subset=["scenario", "cell_id"], keep="last").reset_index(
        drop=True
    )
