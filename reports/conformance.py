"""The conformance matrix and the parity table, computed from a results DataFrame.

``harness.conformance`` records, per cell, a ``checks`` dict (name -> ``{"status", "detail",
"value"}``) and, on the later cell of a pair that two backends ran with the same parity key,
the parity figures ``parity_ref``, ``parity_ref_backend``, ``parity_latent_rel_err``,
``parity_psnr_db`` and ``parity_status``. This module turns them into:

- :class:`ParityRow`: one per parity cell — the pair, the figures, the limits of its dtype
  (``harness.conformance.PARITY_THRESHOLDS``) and both preview images;
- the network-types table (:attr:`Conformance.networks`, a :class:`ConformanceMatrix`): one
  group per network type of the LoRA cells of every scenario with conformance data
  (``lora_types``), ``runs`` and the checks per backend — which files load where, with the
  loader's message for every unsupported cell;
- :class:`ConformanceMatrix`: one per scenario with conformance data. **Columns** are the
  backends (with the offload mode when the scenario varies it). **Rows** come in groups, one
  group per *feature* — the workflow (``inpaint (9-channel)`` on an inpainting model), then
  ``sampler X`` when the scenario sweeps samplers, ``LoRA …``, ``embedding …``, the workflow
  parameters and any other field that varies — and one row per check within the group: first
  ``runs`` (the cell's own status), then every check any of its cells recorded. So every check
  result of every cell has a place, and a slot never holds two cells.

A slot is an :class:`Outcome`: ``pass``, ``fail`` (a failed or broken check, or a cell that
errored), ``differs`` (the metric), ``unsupported`` (the reason), ``reference`` (the cell
another backend's parity was measured against), ``not run`` (the cell did not run) or ``none``.
Numbers stay unrounded; :mod:`reports.render`'s filters format them (STYLE.md habit 9).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import pandas as pd

from harness import axes as axis_table
from harness.vocabulary import KEEPS, NETWORK_TYPES, TRUNCATES, Workflow
from reports.cells import ImageResolver
from reports.formatting import number
from reports.table import latest_records

#: Workflows in the order the matrix lists them (``harness.vocabulary.Workflow``).
WORKFLOW_ORDER: tuple[str, ...] = get_args(Workflow)
#: The axes that are the matrix's columns, and the one that heads every feature label.
COLUMN_AXES: tuple[str, ...] = ("backend", "offload")
HEAD_AXIS = "workflow"
#: Fields that tell features apart: every axis's fields but the columns' (from
#: :data:`harness.axes.AXES`), then the prompts.
FEATURE_FIELDS: tuple[str, ...] = (
    *(name for axis in axis_table.AXES if axis.name not in COLUMN_AXES
      for name in axis.record_fields),
    "prompt",
    "negative_prompt",
)
#: The pseudo-check of a cell's own status, and the parity check.
RUN = "run"
PARITY = "parity"
#: Row labels of the checks ``harness.conformance`` records, in the order rows list them;
#: checks not named here follow under their own name.
CHECK_LABELS: dict[str, str] = {
    RUN: "runs",
    "determinism": "same seed twice",
    "long_prompt": "long prompt",
    "img2img_strength0": "strength 0 returns the input",
    "inpaint_keeps_unmasked": "unmasked area kept",
    "lora_strength0": "LoRA at strength 0 = no LoRA",
    "lora_monotonic": "LoRA effect grows with strength",
    "lora_merged": "LoRAs = weights merged by hand",
    "embedding_effect": "trigger word takes effect",
    "embedding_by_hand": "vectors by hand = the file",
    "controlnet_scale0": "ControlNet at scale 0 = no ControlNet",
    "controlnet_image_effect": "control image takes effect",
    PARITY: "parity with the other backend",
}
#: Every outcome a slot can have; the first four are counted.
OUTCOMES: tuple[str, ...] = ("pass", "fail", "differs", "unsupported", "reference", "not run",
                             "none")
COUNTED: tuple[str, ...] = OUTCOMES[:4]
#: How a recorded check status shows in the matrix (a check that raised is a failure).
_CHECK_OUTCOME = {"pass": "pass", "fail": "fail", "error": "fail", "differs": "differs",
                  "unsupported": "unsupported"}
_CELL_OUTCOME = {"ok": "pass", "unsupported": "unsupported"}  # error, oom, timeout: fail
_OFFLOAD_ORDER: tuple[str, ...] = ("none", "medvram", "lowvram")
#: ``harness.conformance.check_long_prompt``'s wording: which outcome means what.
_KEEPS, _TRUNCATES = KEEPS, TRUNCATES


@dataclass(frozen=True)
class Thumbnail:
    """A preview image of one backend's cell (``image`` is a ``data:`` URI or None)."""

    backend: str
    cell_id: str
    image: str | None


@dataclass(frozen=True)
class Outcome:
    """One slot of the matrix: a check (or the run) of one cell."""

    status: str
    cell_id: str | None = None
    #: Why: a cell's reason, or the check's detail as recorded.
    reason: str | None = None
    #: The status as recorded (``error`` for a check that raised, ``oom`` for a cell…).
    recorded: str | None = None
    #: The check's metric (a latent relative error for the checks that compare outputs).
    value: float | None = None
    #: Parity only: image PSNR in dB.
    psnr_db: float | None = None
    #: Long prompt only: ``keeps`` or ``truncates``.
    behaviour: str | None = None
    #: Parity only: the reference's and this cell's previews, side by side.
    thumbnails: tuple[Thumbnail, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in OUTCOMES:
            raise ValueError(f"status must be one of {OUTCOMES}, got {self.status!r}")

    @property
    def css_class(self) -> str:
        return "outcome-" + self.status.replace(" ", "-")

    @property
    def explained(self) -> bool:
        """A fail, differs or unsupported slot with a reason to unfold."""
        return bool(self.reason) and self.status in ("fail", "differs", "unsupported")


@dataclass(frozen=True)
class MatrixRow:
    """One check of one feature, across the columns."""

    check: str
    outcomes: tuple[Outcome, ...]

    @property
    def label(self) -> str:
        return CHECK_LABELS.get(self.check, self.check.replace("_", " "))


@dataclass(frozen=True)
class FeatureGroup:
    """The rows of one feature (``txt2img · sampler euler``): ``runs`` first, then checks."""

    label: str
    rows: tuple[MatrixRow, ...]


@dataclass(frozen=True)
class LongPromptFinding:
    """What the ``long_prompt`` checks of one backend (column) found."""

    backend: str
    #: Cells where tokens past 77 changed the output / changed nothing.
    keeps: int
    truncates: int
    #: Failed checks: the backend's claim (``Backend.long_prompts``) did not hold.
    wrong_claims: int

    @property
    def behaviour(self) -> str:
        """``keeps``, ``truncates`` or ``mixed``."""
        if self.keeps and self.truncates:
            return "mixed"
        return _KEEPS if self.keeps else _TRUNCATES

    @property
    def statement(self) -> str:
        words = {
            _KEEPS: f"{self.backend} keeps long prompts (tokens past 77 change the output)",
            _TRUNCATES: f"{self.backend} truncates prompts at 77 tokens",
            "mixed": f"{self.backend} keeps tokens past 77 in {self.keeps} cell"
                     f"{'s' if self.keeps != 1 else ''} and truncates in {self.truncates}",
        }[self.behaviour]
        if self.wrong_claims:
            words += (f", against its claim in {self.wrong_claims} cell"
                      f"{'s' if self.wrong_claims != 1 else ''}")
        return words


@dataclass(frozen=True)
class ConformanceMatrix:
    """The conformance matrix of one scenario."""

    scenario: str
    columns: tuple[str, ...]
    groups: tuple[FeatureGroup, ...]
    long_prompts: tuple[LongPromptFinding, ...] = ()

    @property
    def anchor(self) -> str:
        return "conformance-" + "".join(c if c.isalnum() or c in "-_" else "_"
                                        for c in self.scenario)

    @property
    def rows(self) -> tuple[tuple[str, MatrixRow], ...]:
        """``(feature label, row)`` for every row, in order."""
        return tuple((group.label, row) for group in self.groups for row in group.rows)

    @property
    def counts(self) -> tuple[tuple[str, int], ...]:
        """``(outcome, count)`` of pass / fail / differs / unsupported, zero counts left out."""
        found = [o.status for _, row in self.rows for o in row.outcomes]
        return tuple((name, found.count(name)) for name in COUNTED if name in found)

    @property
    def long_prompt_statement(self) -> str | None:
        """``Long prompts: diffusers truncates prompts at 77 tokens; original keeps …``."""
        if not self.long_prompts:
            return None
        ordered = sorted(self.long_prompts, key=lambda f: f.behaviour != _TRUNCATES)
        return "Long prompts: " + "; ".join(f.statement for f in ordered) + "."


@dataclass(frozen=True)
class ParityRow:
    """One parity cell: its figures against the reference cell of the other backend."""

    scenario: str
    feature: str
    cell_id: str
    backend: str
    ref_cell_id: str
    ref_backend: str
    sampler: str
    dtype: str
    latent_rel_err: float | None
    psnr_db: float | None
    status: str
    detail: str | None
    #: The limits of the dtype (``harness.conformance.PARITY_THRESHOLDS``), when known.
    max_rel_err: float | None
    min_psnr_db: float | None
    image: str | None
    ref_image: str | None

    @property
    def css_class(self) -> str:
        return "outcome-" + _CHECK_OUTCOME.get(self.status, "fail")


@dataclass(frozen=True)
class Conformance:
    """Everything the conformance and parity sections show."""

    matrices: tuple[ConformanceMatrix, ...] = ()
    parity: tuple[ParityRow, ...] = ()
    #: Network type x backend x check, over every scenario's LoRA cells (None: none ran).
    networks: ConformanceMatrix | None = None
    #: ``(type, what tells it apart)`` of the types the network table shows.
    network_types: tuple[tuple[str, str], ...] = ()


# --- reading records ----------------------------------------------------------------------


def _clean(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN
        return None
    return value


def check_results(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The cell's recorded checks (its ``check_results``: name -> dict); ``{}`` when none.

    The parity figures count as the ``parity`` check when the record has no ``parity`` entry
    of its own. (The ``checks`` column holds the check kinds the scenario asked for.)
    """
    found = record.get("check_results")
    results = {str(k): dict(v) for k, v in found.items()} if isinstance(found, dict) else {}
    if PARITY not in results and _clean(record.get("parity_ref")) is not None:
        results[PARITY] = {"status": _clean(record.get("parity_status")) or "differs",
                           "detail": None, "value": number(record.get("parity_latent_rel_err"))}
    return results


def has_conformance(record: dict[str, Any]) -> bool:
    """Did the cell ask for checks, record any, or carry parity figures?"""
    requested = record.get("checks")
    if isinstance(requested, list | tuple) and len(requested) > 0:
        return True
    return bool(check_results(record))


def parity_limits(dtype: str) -> tuple[float | None, float | None]:
    """``(max latent rel. error, min PSNR dB)`` of ``dtype`` from the harness, if known."""
    try:  # lazy: it imports torch, and only parity reports need it
        from harness.conformance import PARITY_THRESHOLDS
    except ImportError:  # pragma: no cover - the harness is installed with the reports
        return None, None
    limits = PARITY_THRESHOLDS.get(dtype)
    return limits if limits is not None else (None, None)


# --- feature labels -----------------------------------------------------------------------


def is_nine_channel(model: Any) -> bool:
    """An inpainting model (``tiny-inpaint``, ``sd15-inpaint``, ``…inpainting.safetensors``)."""
    return "inpaint" in str(model).lower()


def _base_model(model: Any) -> str:
    return re.sub(r"[-_.]?inpaint(ing)?", "", str(model), flags=re.IGNORECASE)


def _features(record: dict[str, Any]) -> dict[str, Any]:
    """The record's :data:`FEATURE_FIELDS`, parameters of other workflows blanked."""
    workflow = record.get(HEAD_AXIS)
    values = {name: _clean(record.get(name)) for name in FEATURE_FIELDS}
    for axis in axis_table.AXES:
        if not axis.used_by(workflow):
            values.update(dict.fromkeys(axis.record_fields))
    return values


def _varying(features: Sequence[dict[str, Any]]) -> set[str]:
    varying = {name for name in FEATURE_FIELDS
               if len({repr(f[name]) for f in features if f[name] is not None}) > 1}
    if "model" in varying and len({_base_model(f["model"]) for f in features}) == 1:
        varying.discard("model")  # "(9-channel)" already tells tiny from tiny-inpaint
    return varying


def feature_label(values: dict[str, Any], varying: set[str],
                  distinct: dict[str, list[Any]]) -> str:
    """``inpaint (9-channel) · LoRA style@0.5 · strength 0.5 (fp16, 30 steps)``.

    The workflow, then the *feature* axes (:attr:`harness.axes.Axis.feature`) that vary or
    have a value other than their quiet one, joined with ``·``; every other field that varies
    in the scenario follows in parentheses. Every axis is spelled as report rows spell it
    (:attr:`harness.axes.Axis.label`); an inpainting model reads as its base model plus
    ``(9-channel)``.
    """
    workflow = values[HEAD_AXIS]
    parts = [str(workflow) + (" (9-channel)" if is_nine_channel(values["model"]) else "")]
    extras: list[str] = []
    for axis in axis_table.AXES:
        if axis.name in (*COLUMN_AXES, HEAD_AXIS):
            continue
        value = axis.value_of(values)
        if value is None or not axis.used_by(workflow) or axis.is_quiet(value):
            continue
        if axis.name == "model":
            value = _base_model(value)
        if axis.feature:
            if axis.name in varying or axis.has_quiet:
                parts.append(axis.label(value))
        elif set(axis.record_fields) & varying:
            extras.append(axis.label(value))
    for name in ("prompt", "negative_prompt"):
        if name in varying:
            extras.append(f"{name.replace('_', ' ')} #{distinct[name].index(values[name]) + 1}")
    return " · ".join(parts) + (f" ({', '.join(extras)})" if extras else "")


def _sort_key(values: dict[str, Any], first_seen: int) -> tuple[int, ...]:
    workflow = str(values["workflow"])
    order = WORKFLOW_ORDER.index(workflow) if workflow in WORKFLOW_ORDER else len(WORKFLOW_ORDER)
    extra = 2 if values["embedding"] not in (None, "none") else int(
        values["lora"] not in (None, "none"))  # plain, then LoRA, then embedding
    return (order, int(is_nine_channel(values["model"])), extra, first_seen)


# --- columns ------------------------------------------------------------------------------


def _columns(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """``(backend, offload)`` per column; offload is ``none`` unless the scenario varies it."""
    backends = list(dict.fromkeys(str(r.get("backend")) for r in records))
    offloads = list(dict.fromkeys(str(_clean(r.get("offload")) or "none") for r in records))
    if len(offloads) == 1:
        offloads = ["none"]
    offloads.sort(key=lambda o: _OFFLOAD_ORDER.index(o) if o in _OFFLOAD_ORDER else 99)
    return [(backend, offload) for backend in backends for offload in offloads]


def _column_of(record: dict[str, Any], varies_offload: bool) -> tuple[str, str]:
    offload = str(_clean(record.get("offload")) or "none") if varies_offload else "none"
    return str(record.get("backend")), offload


def column_label(column: tuple[str, str]) -> str:
    backend, offload = column
    return backend if offload == "none" else f"{backend} {offload}"


# --- outcomes -----------------------------------------------------------------------------


class _Images:
    """Resolves each record's preview once (a cell's image appears in several places)."""

    def __init__(self, resolve: ImageResolver,
                 records: dict[tuple[str, str], dict[str, Any]]) -> None:
        self._resolve = resolve
        self._records = records
        self._cache: dict[tuple[str, str], str | None] = {}

    def image(self, scenario: str, cell_id: str | None) -> str | None:
        if cell_id is None:
            return None
        key = (scenario, cell_id)
        if key not in self._cache:
            record = self._records.get(key)
            relative = _clean(record.get("image")) if record else None
            self._cache[key] = self._resolve(str(relative)) if relative else None
        return self._cache[key]


def run_outcome(record: dict[str, Any]) -> Outcome:
    """The ``runs`` slot: ok -> pass; unsupported (reason); error/oom/timeout -> fail."""
    status = str(record.get("status"))
    return Outcome(
        status=_CELL_OUTCOME.get(status, "fail"),
        cell_id=str(record["cell_id"]),
        reason=_clean(record.get("reason")),
        recorded=status,
    )


def _long_prompt_behaviour(check: dict[str, Any]) -> str | None:
    """``keeps`` / ``truncates``: what ``check_long_prompt`` observed (its ``finding``),
    whatever the backend claimed; None for an error or a record without it."""
    finding = check.get("finding")
    return finding if finding in (_KEEPS, _TRUNCATES) else None


def check_outcome(name: str, check: dict[str, Any], record: dict[str, Any],
                  images: _Images) -> Outcome:
    """A recorded check as a slot; parity adds its PSNR and both backends' previews."""
    recorded = str(check.get("status"))
    outcome = Outcome(
        status=_CHECK_OUTCOME.get(recorded, "fail"),
        cell_id=str(record["cell_id"]),
        reason=_clean(check.get("detail")),
        recorded=recorded,
        value=number(check.get("value")),
        behaviour=_long_prompt_behaviour(check) if name == "long_prompt" else None,
    )
    if name != PARITY:
        return outcome
    scenario = str(record["scenario"])
    ref_id = _clean(record.get("parity_ref"))
    ref_backend = _clean(record.get("parity_ref_backend"))
    thumbnails: tuple[Thumbnail, ...] = ()
    if ref_id is not None:
        thumbnails = (
            Thumbnail(str(ref_backend or "reference"), str(ref_id),
                      images.image(scenario, str(ref_id))),
            Thumbnail(str(record.get("backend")), outcome.cell_id or "",
                      images.image(scenario, outcome.cell_id)),
        )
    value = number(record.get("parity_latent_rel_err"))
    return Outcome(
        status=outcome.status,
        cell_id=outcome.cell_id,
        reason=outcome.reason,
        recorded=recorded,
        value=value if value is not None else outcome.value,
        psnr_db=number(record.get("parity_psnr_db")),
        thumbnails=thumbnails,
    )


def _slot(check: str, record: dict[str, Any] | None, referenced: dict[str, str],
          labels: dict[str, str], images: _Images) -> Outcome:
    if record is None:
        return Outcome("none")
    cell_id = str(record["cell_id"])
    if check == RUN:
        return run_outcome(record)
    if record.get("status") != "ok":
        return Outcome("not run", cell_id, reason=f"the cell is {record.get('status')}",
                       recorded=str(record.get("status")))
    found = check_results(record).get(check)
    if found is not None:
        return check_outcome(check, found, record, images)
    if check == PARITY and cell_id in referenced:
        return Outcome("reference", cell_id,
                       reason=f"reference of {labels.get(referenced[cell_id], 'another cell')}"
                              f" ({referenced[cell_id]})")
    return Outcome("none", cell_id, reason="not checked on this cell")


def _check_order(names: Sequence[str]) -> list[str]:
    known = [name for name in CHECK_LABELS if name in names]
    return known + [name for name in names if name not in CHECK_LABELS]


# --- building -----------------------------------------------------------------------------


def _group_rows(layer: dict[tuple[str, str], dict[str, Any]], columns: Sequence[tuple[str, str]],
                column_labels: dict[str, str], images: _Images) -> tuple[MatrixRow, ...]:
    """A group's rows: ``runs``, then every check any of its cells recorded, then parity."""
    cells = list(layer.values())
    names = [RUN, *dict.fromkeys(n for r in cells if r.get("status") == "ok"
                                 for n in check_results(r))]
    referenced = {str(r["parity_ref"]): str(r["cell_id"]) for r in cells
                  if _clean(r.get("parity_ref")) is not None}
    if referenced and PARITY not in names:
        names.append(PARITY)
    return tuple(
        MatrixRow(name, tuple(_slot(name, layer.get(column), referenced, column_labels, images)
                              for column in columns))
        for name in _check_order(names)
    )


def _layered(records: Sequence[dict[str, Any]], key: Any, varies_offload: bool,
             groups: dict[Any, list[dict[tuple[str, str], dict[str, Any]]]]) -> None:
    """File each record under ``key(record)``; a second record of a key and column opens a
    layer (a numbered group) of its own, so a slot never holds two cells."""
    for record in records:
        layers = groups.setdefault(key(record), [])
        column = _column_of(record, varies_offload)
        layer = next((layer for layer in layers if column not in layer), None)
        if layer is None:
            layer = {}
            layers.append(layer)
        layer[column] = record


def _network_matrix(
    records: Sequence[dict[str, Any]], images: _Images
) -> tuple[ConformanceMatrix | None, tuple[tuple[str, str], ...]]:
    """The network-types table: one group per (network type, ``lora`` value) across every
    scenario, ``runs`` (loads, or unsupported with the loader's message) and the checks, per
    backend; and ``(type, description)`` of the types it shows. Records carry their files'
    types as ``lora_types`` (``harness.inputs``)."""
    chosen = [r for r in records if _clean(r.get("lora_types"))]
    if not chosen:
        return None, ()
    shown = {part for r in chosen for part in str(r["lora_types"]).split("+")}
    order = list(NETWORK_TYPES)

    def rank(record: dict[str, Any]) -> tuple[int, str]:
        first = str(record["lora_types"]).split("+")[0]
        return (order.index(first) if first in order else len(order), str(record["lora_types"]))

    chosen.sort(key=rank)
    columns = _columns(chosen)
    varies_offload = len({c[1] for c in columns}) > 1
    scenarios = len({str(r["scenario"]) for r in chosen}) > 1
    groups: dict[tuple[str, str, str], list[dict[tuple[str, str], dict[str, Any]]]] = {}
    _layered(chosen, lambda r: (str(r["lora_types"]), str(r.get("lora")),
                                str(r["scenario"]) if scenarios else ""), varies_offload, groups)
    column_labels = {str(r["cell_id"]): column_label(_column_of(r, varies_offload))
                     for r in chosen}
    built = []
    for (types, lora, scenario), layers in groups.items():
        base = f"{types} · {axis_table.lora_label(lora)}" + (f" · {scenario}" if scenario else "")
        for number_, layer in enumerate(layers, start=1):
            label = base if number_ == 1 else f"{base} #{number_}"
            built.append(FeatureGroup(label, _group_rows(layer, columns, column_labels, images)))
    matrix = ConformanceMatrix(
        scenario="network types",
        columns=tuple(column_label(c) for c in columns),
        groups=tuple(built),
    )
    return matrix, tuple((name, text) for name, text in NETWORK_TYPES.items() if name in shown)


def _build_matrix(scenario: str, records: list[dict[str, Any]],
                  images: _Images) -> tuple[ConformanceMatrix, dict[str, str]]:
    """The scenario's matrix, and each cell's feature label (for the parity table)."""
    columns = _columns(records)
    varies_offload = len({c[1] for c in columns}) > 1
    features = [_features(r) for r in records]
    varying = _varying(features)
    distinct = {name: list(dict.fromkeys(f[name] for f in features)) for name in FEATURE_FIELDS}

    # group by feature; a second cell of the same feature and column (cells that differ only
    # in a parameter their workflow ignores) opens a numbered group of its own
    groups: dict[tuple[Any, ...], list[dict[tuple[str, str], dict[str, Any]]]] = {}
    first_seen: dict[tuple[Any, ...], tuple[int, dict[str, Any]]] = {}
    keys = {id(record): tuple(repr(values[name]) for name in FEATURE_FIELDS)
            for record, values in zip(records, features, strict=True)}
    for index, (record, values) in enumerate(zip(records, features, strict=True)):
        first_seen.setdefault(keys[id(record)], (index, values))
    _layered(records, lambda r: keys[id(r)], varies_offload, groups)

    column_labels = {str(r["cell_id"]): column_label(_column_of(r, varies_offload))
                     for r in records}
    labels: dict[str, str] = {}
    built: list[tuple[tuple[int, ...], FeatureGroup]] = []
    for key, layers in groups.items():
        index, values = first_seen[key]
        base = feature_label(values, varying, distinct)
        for number_, layer in enumerate(layers, start=1):
            label = base if number_ == 1 else f"{base} #{number_}"
            for record in layer.values():
                labels[str(record["cell_id"])] = label
            rows = _group_rows(layer, columns, column_labels, images)
            built.append((_sort_key(values, index) + (number_,), FeatureGroup(label, rows)))
    built.sort(key=lambda item: item[0])
    matrix = ConformanceMatrix(
        scenario=scenario,
        columns=tuple(column_label(c) for c in columns),
        groups=tuple(group for _, group in built),
        long_prompts=_long_prompt_findings(records, varies_offload),
    )
    return matrix, labels


def _long_prompt_findings(records: Sequence[dict[str, Any]],
                          varies_offload: bool) -> tuple[LongPromptFinding, ...]:
    tally: dict[str, list[int]] = {}
    for record in records:
        check = check_results(record).get("long_prompt")
        behaviour = _long_prompt_behaviour(check) if check is not None else None
        if behaviour is None or check is None:
            continue
        counts = tally.setdefault(column_label(_column_of(record, varies_offload)), [0, 0, 0])
        counts[0 if behaviour == _KEEPS else 1] += 1
        counts[2] += check.get("status") == "fail"
    return tuple(LongPromptFinding(backend, *counts) for backend, counts in tally.items())


def _parity_rows(scenario: str, records: Sequence[dict[str, Any]], labels: dict[str, str],
                 images: _Images) -> list[ParityRow]:
    rows = []
    for record in records:
        check = check_results(record).get(PARITY)
        ref_id = _clean(record.get("parity_ref"))
        if check is None or ref_id is None:
            continue
        dtype = str(record.get("dtype"))
        max_error, min_psnr = parity_limits(dtype)
        cell_id = str(record["cell_id"])
        rows.append(ParityRow(
            scenario=scenario,
            feature=labels.get(cell_id, ""),
            cell_id=cell_id,
            backend=str(record.get("backend")),
            ref_cell_id=str(ref_id),
            ref_backend=str(_clean(record.get("parity_ref_backend")) or "-"),
            sampler=str(record.get("sampler")),
            dtype=dtype,
            latent_rel_err=number(record.get("parity_latent_rel_err")),
            psnr_db=number(record.get("parity_psnr_db")),
            status=str(_clean(record.get("parity_status")) or check.get("status")),
            detail=_clean(check.get("detail")),
            max_rel_err=max_error,
            min_psnr_db=min_psnr,
            image=images.image(scenario, cell_id),
            ref_image=images.image(scenario, str(ref_id)),
        ))
    return rows


def build_conformance(frame: pd.DataFrame, resolve_image: ImageResolver) -> Conformance:
    """The matrices (one per scenario with conformance data) and the parity rows.

    Only the newest record of each cell counts (:func:`reports.table.latest_records`).
    """
    if frame.empty:
        return Conformance()
    records = latest_records(frame).to_dict(orient="records")
    images = _Images(resolve_image,
                     {(str(r["scenario"]), str(r["cell_id"])): r for r in records})
    matrices: list[ConformanceMatrix] = []
    parity: list[ParityRow] = []
    checked: list[dict[str, Any]] = []
    for scenario in dict.fromkeys(str(r["scenario"]) for r in records):
        own = [r for r in records if str(r["scenario"]) == scenario]
        if not any(has_conformance(r) for r in own):
            continue
        matrix, labels = _build_matrix(scenario, own, images)
        matrices.append(matrix)
        parity += _parity_rows(scenario, own, labels, images)
        checked += own
    networks, network_types = _network_matrix(checked, images)
    return Conformance(matrices=tuple(matrices), parity=tuple(parity), networks=networks,
                       network_types=network_types)
