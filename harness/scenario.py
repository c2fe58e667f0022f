"""Scenario files: YAML that users write, validated once into a :class:`Scenario`.

A scenario names a workload matrix. Every axis may be a scalar or a list; the matrix is the
cartesian product of the lists, then ``exclude`` entries remove matching combinations and
``include`` entries add cells (as in a CI matrix: exclude first, then include). Validation is
pure: it reads the file and nothing else (no device probing, no model resolution).

Errors are :class:`~harness.errors.UserError` with one line that names the file, the field
and what was expected, e.g.::

    scenarios/bad.yaml: matrix.sampler[1]: unknown sampler 'eulr'; expected one of euler, ...
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
)

from harness import axes as axis_table
from harness.cell import DEFAULT_LOAD_TIMEOUT_S, DEFAULT_NOISE_LIMIT
from harness.errors import UserError


def _annotation(axis: axis_table.Axis) -> Any:
    """The pydantic type of one axis value, from the axis table."""
    metadata: list[Any] = []
    if axis.check is not None:
        metadata.append(BeforeValidator(axis.check))
    if axis.bounds:
        metadata.append(Field(**axis.bounds))
    return Annotated[axis.type, *metadata] if metadata else axis.type


def _schema_axes() -> dict[str, tuple[Any, Any]]:
    return {axis.name: (_annotation(axis), axis.default) for axis in axis_table.AXES}


#: Every axis with its schema type and default, derived from :data:`harness.axes.AXES`.
#: The matrix and the include/exclude entries are built from it. A backend name is any
#: non-empty string here: it is checked against the backend registry when the matrix is
#: expanded (:func:`harness.matrix.expand`), where installed plugins are known.
AXES: dict[str, tuple[Any, Any]] = _schema_axes()


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


_STRICT = ConfigDict(extra="forbid", strict=False, frozen=True)

#: One combination of axis values, every key optional (an ``include`` / ``exclude`` entry).
AxisValues: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "AxisValues",
    __config__=_STRICT,
    **{name: (kind | None, None) for name, (kind, _default) in AXES.items()},
)

#: Every axis as a non-empty list of values (a scalar in the file is a list of one).
_MatrixAxes: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "_MatrixAxes",
    __config__=_STRICT,
    **{
        name: (
            Annotated[list[kind], BeforeValidator(_as_list), Field(min_length=1)],  # type: ignore[valid-type]
            [default],
        )
        for name, (kind, default) in AXES.items()
    },
)


class Matrix(_MatrixAxes):  # type: ignore[misc,valid-type]
    """The axes of a scenario plus ``include`` / ``exclude`` entries."""

    include: list[AxisValues] = []  # type: ignore[valid-type]
    exclude: list[AxisValues] = []  # type: ignore[valid-type]


class Thresholds(BaseModel):
    """Relative changes a regression verdict must exceed (0.05 = 5%), and the spread over
    a cell's repeats beyond which its it/s is marked noisy (``noise``, a CV)."""

    model_config = _STRICT
    speed: float = Field(0.05, gt=0, lt=1)
    memory: float = Field(0.10, gt=0, lt=10)
    load: float = Field(0.25, gt=0, lt=10)
    noise: float = Field(DEFAULT_NOISE_LIMIT, gt=0, lt=1)


CheckName = Literal["determinism", "parity", "semantics"]


class Scenario(BaseModel):
    """A validated scenario file."""

    model_config = _STRICT

    name: str = Field(min_length=1)
    description: str = ""
    prompt: str = "a photograph of an astronaut riding a horse"
    negative_prompt: str = ""
    repeats: int = Field(3, ge=1, le=1000)
    warmup: int = Field(1, ge=0, le=100)
    #: Wall-clock budget of one cell's warm-up and timed repeats (and, again, of its checks);
    #: None = no limit. The parent kills a worker that overruns it (docs/scenarios.md).
    timeout_s: float | None = Field(None, gt=0)
    #: Wall-clock budget of one model load in a worker.
    load_timeout_s: float = Field(DEFAULT_LOAD_TIMEOUT_S, gt=0)
    thresholds: Thresholds = Thresholds()
    #: Conformance checks run on every cell after its measurement (see docs/conformance.md).
    checks: list[CheckName] = []
    matrix: Matrix = Matrix()
    #: Where the scenario came from; set by :func:`load_scenario`, not written by users.
    path: str = Field("<memory>", exclude=True)

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"use letters, digits, '.', '_' and '-' only, got {value!r}")
        return value

    def fingerprint(self) -> str:
        """A short hash of everything that defines the workload (not the file's path, not
        the load budget, which stops a hung load but does not change what is measured)."""
        canonical = json.dumps(
            self.model_dump(mode="json", exclude={"load_timeout_s"}), sort_keys=True
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _format_location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or "(" in part):
            continue  # pydantic's internal validator names, not user fields
        else:
            text += f".{part}" if text else str(part)
    return text or "<top level>"


def _one_line(path: str, error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    where = _format_location(tuple(first["loc"]))
    kind = first["type"]
    if kind == "extra_forbidden":
        parent_fields = _fields_at(tuple(first["loc"])[:-1])
        expected = f"; expected one of {', '.join(parent_fields)}" if parent_fields else ""
        return f"{path}: {where}: unknown key{expected}"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    received = first.get("input")
    shown = "" if "got " in message or kind == "missing" else f" (got {received!r})"
    more = len(error.errors()) - 1
    tail = f" [+{more} more error{'s' if more > 1 else ''}]" if more else ""
    return f"{path}: {where}: {message}{shown}{tail}"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Scenario
    for part in loc:
        if isinstance(part, int):
            continue
        if part in ("include", "exclude"):
            model = AxisValues
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return [name for name in model.model_fields if name != "path"]


def parse_scenario(data: Any, path: str = "<memory>") -> Scenario:
    """Validate already-parsed YAML/JSON data; raise :class:`UserError` with one line."""
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: <top level>: expected a mapping of scenario fields, got {type(data).__name__}"
        )
    if "name" not in data:
        data = {"name": Path(path).stem if path != "<memory>" else "scenario", **data}
    try:
        scenario = Scenario.model_validate({**data, "path": path})
    except ValidationError as error:
        raise UserError(_one_line(path, error)) from None
    return scenario


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file."""
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{shown}: no such scenario file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise UserError(f"{shown}: cannot read scenario file: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{shown}: YAML syntax error at {where}: {problem}") from None
    return parse_scenario(data, shown)
