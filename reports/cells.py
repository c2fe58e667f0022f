"""Per-cell details, failures and status counts, computed from a results DataFrame.

Each cell becomes a :class:`CellDetail`: its identity, status, and its figures grouped the
way the report shows them (speed, time, step latency, memory, output checks), each figure
tagged with the formatter that displays it (a key of :data:`reports.formatting.FORMATTERS`).
Preview images are read here and carried as ``data:`` URIs, so the HTML needs no files.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.vocabulary import FAILED_STATUSES, STATUSES
from reports.formatting import number
from reports.table import latest_records

#: Statuses in the order the status line lists them: what ran, then each kind of failure.
STATUS_ORDER: tuple[str, ...] = (
    "ok",
    "unsupported",
    *(status for status in STATUSES if status in FAILED_STATUSES),
)

#: Sections of a cell's details: ``(title, ((label, column, formatter), ...))``.
FIGURE_SECTIONS: tuple[tuple[str, tuple[tuple[str, str, str], ...]], ...] = (
    (
        "speed",
        (
            ("it/s (median)", "its", "its"),
            ("it/s min", "its_min", "its"),
            ("it/s max", "its_max", "its"),
            ("it/s CV", "its_cv", "pct"),
            ("denoise it/s", "denoise_its", "its"),
            ("timed repeats", "repeats_done", "int"),
        ),
    ),
    (
        "compute",
        (
            ("TFLOP per image-step", "tflops_per_image_step", "tflop"),
            ("achieved TFLOP/s", "achieved_tflops", "tflop"),
            ("MFU", "mfu", "pct"),
            ("peak TFLOP/s", "mfu_peak_tflops", "tflop"),
        ),
    ),
    (
        "time",
        (
            ("wall (median)", "wall_s", "s"),
            ("encode", "encode_s", "s"),
            ("denoise", "denoise_s", "s"),
            ("decode", "decode_s", "s"),
            ("ControlNet (in denoise)", "controlnet_s", "s"),
            ("ControlNet share of denoise", "controlnet_share", "pct"),
            ("load", "load_s", "s"),
            ("first call", "first_call_s", "s"),
        ),
    ),
    (
        "step latency",
        (
            ("median", "step_ms_median", "ms"),
            ("p10", "step_ms_p10", "ms"),
            ("p90", "step_ms_p90", "ms"),
            ("min", "step_ms_min", "ms"),
            ("max", "step_ms_max", "ms"),
        ),
    ),
    (
        "memory (GB)",
        (
            ("cpu peak", "cpu_peak_gb", "gb"),
            ("cpu RSS sampled", "cpu_rss_sampled_gb", "gb"),
            ("cpu RSS OS peak", "cpu_rss_os_peak_gb", "gb"),
            ("gpu allocated peak", "gpu_allocated_peak_gb", "gb"),
            ("gpu reserved peak", "gpu_reserved_peak_gb", "gb"),
            ("gpu device used peak", "gpu_device_used_peak_gb", "gb"),
            ("gpu allocator retries", "gpu_alloc_retries", "int"),
            ("gpu OOMs", "gpu_ooms", "int"),
            ("load cpu peak", "load_cpu_peak_gb", "gb"),
            ("load gpu allocated peak", "load_gpu_allocated_peak_gb", "gb"),
        ),
    ),
    (
        "output",
        (
            ("shape", "output_shape", "text"),
            ("shape ok", "output_shape_ok", "bool"),
            ("finite", "output_finite", "bool"),
            ("not constant", "output_constant", "not"),
            ("std", "output_std", "p"),
        ),
    ),
)

#: Limit on an embedded preview image, bytes (previews are small thumbnails).
MAX_IMAGE_BYTES = 2 * 1024 * 1024
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                ".webp": "image/webp"}

ImageResolver = Callable[[str], str | None]


@dataclass(frozen=True)
class Figure:
    label: str
    value: Any
    kind: str


@dataclass(frozen=True)
class CellDetail:
    """Everything the report shows about one cell."""

    scenario: str
    cell_id: str
    nodeid: str
    batch: int
    status: str
    reason: str | None
    error_type: str | None
    traceback: str | None
    settings: tuple[tuple[str, str], ...]
    sections: tuple[tuple[str, tuple[Figure, ...]], ...]
    #: A ``data:`` URI of the preview image, or None when there is none.
    image: str | None = None

    @property
    def anchor(self) -> str:
        """An HTML id for links from the table."""
        return "cell-" + "".join(c if c.isalnum() or c in "-_" else "_"
                                 for c in f"{self.scenario}--{self.cell_id}")

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES


def _clean(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    return value


def _figure(record: dict[str, Any], label: str, column: str, kind: str) -> Figure:
    value = _clean(record.get(column))
    if kind == "not":  # "not constant" reads better than "constant: no"
        return Figure(label, None if value is None else not bool(value), "bool")
    return Figure(label, value, kind)


def _settings(record: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    def text(column: str) -> str:
        value = _clean(record.get(column))
        return "-" if value is None else str(value)

    return (
        ("backend", text("backend")),
        ("model", f"{text('model')} ({text('source')})"),
        ("workflow", text("workflow")),
        ("device / dtype", f"{text('device')} / {text('dtype')}"),
        ("offload", text("offload")),
        ("compile", f"{text('compile')}{' fullgraph' if record.get('fullgraph') else ''}"),
        ("attention", f"{text('attention')}"
                      f"{', channels-last' if record.get('channels_last') else ''}"),
        ("sampler", f"{text('sampler')}, {text('steps')} steps, cfg {text('guidance')}"),
        ("size", f"{text('width')}x{text('height')}, batch {text('batch')}, "
                 f"seed {text('seed')}"),
        ("prompt", text("prompt")),
        ("negative prompt", text("negative_prompt")),
        ("repeats", f"{text('repeats')} after {text('warmup')} warm-up"),
        ("run", f"{text('run_id')} at {text('timestamp')}"),
    )


def image_resolver(roots: Path | Sequence[Path] | None) -> ImageResolver:
    """Find a record's ``image`` (relative to its results directory) under ``roots``.

    A root may be a results directory or its ``results.jsonl``. The first existing file
    wins; paths that leave the root, unknown types and oversized files are ignored.
    """
    if roots is None:
        return lambda _relative: None
    if isinstance(roots, str | Path):
        roots = [roots]
    directories = [Path(r).parent if Path(r).is_file() else Path(r) for r in roots]

    def resolve(relative: str) -> str | None:
        for directory in directories:
            root = directory.resolve()
            path = (root / relative).resolve()
            media = _IMAGE_TYPES.get(path.suffix.lower())
            if media is None or not path.is_relative_to(root) or not path.is_file():
                continue
            if path.stat().st_size > MAX_IMAGE_BYTES:
                continue
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f"data:{media};base64,{data}"
        return None

    return resolve


def build_details(frame: pd.DataFrame, resolve_image: ImageResolver) -> list[CellDetail]:
    """One :class:`CellDetail` per cell (newest record), in results order."""
    if frame.empty:
        return []
    details = []
    for record in latest_records(frame).to_dict(orient="records"):
        status = str(record.get("status"))
        image = _clean(record.get("image"))
        sections = tuple(
            (title, tuple(_figure(record, *spec) for spec in specs))
            for title, specs in FIGURE_SECTIONS
        ) if status == "ok" or number(record.get("its")) is not None else ()
        details.append(
            CellDetail(
                scenario=str(record["scenario"]),
                cell_id=str(record["cell_id"]),
                nodeid=str(_clean(record.get("nodeid")) or record["cell_id"]),
                batch=int(record["batch"]),
                status=status,
                reason=_clean(record.get("reason")),
                error_type=_clean(record.get("error_type")),
                traceback=_clean(record.get("traceback")),
                settings=_settings(record),
                sections=sections,
                image=resolve_image(str(image)) if image else None,
            )
        )
    return details


def status_counts(details: Sequence[CellDetail]) -> tuple[tuple[str, int], ...]:
    """``(status, count)`` for each status present, in :data:`STATUS_ORDER`."""
    counts: dict[str, int] = {}
    for detail in details:
        counts[detail.status] = counts.get(detail.status, 0) + 1
    known = [(s, counts.pop(s)) for s in STATUS_ORDER if s in counts]
    return tuple(known + sorted(counts.items()))
