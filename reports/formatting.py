"""Display formatting: the only place where numbers are rounded for people to read.

Everything in :mod:`reports` above this layer carries full-precision numbers; the templates
call these functions as jinja filters (``{{ value|fmt("its") }}``) and the Markdown renderer
uses them too, so the HTML and the Markdown table always show the same text.

Rounding rules (``docs/reports.md`` repeats them):

- it/s: 2 decimals (``7.99``); below 0.1 two significant digits (``0.046``), so a slow CPU
  run does not read ``0.00``.
- GB: 1 decimal from 1 GB up (``6.7``), 2 decimals below (``0.43``).
- seconds: 2 decimals; milliseconds: 1 decimal; relative changes: signed percent, 1 decimal.
- PSNR: 1 decimal in dB, ``identical`` at 100 dB; relative errors: 3 significant digits.
- a missing value is ``-``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from harness.axes import embedding_label, extra_name, lora_label

__all__ = ["embedding_label", "extra_name", "lora_label"]  # spelled by the axis table

MISSING = "-"


def number(value: Any) -> float | None:
    """A finite float, or None for None, NaN, inf and anything that is not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def its(value: Any) -> str:
    """Iterations per second: ``7.99``; ``0.046`` below 0.1."""
    v = number(value)
    if v is None:
        return MISSING
    return f"{v:.2f}" if abs(v) >= 0.1 or v == 0 else f"{v:.2g}"


def gb(value: Any) -> str:
    """Gigabytes (GiB): ``6.7`` from 1 GB up, ``0.43`` below."""
    v = number(value)
    if v is None:
        return MISSING
    return f"{v:.1f}" if abs(v) >= 1 else f"{v:.2f}"


def seconds(value: Any) -> str:
    v = number(value)
    return MISSING if v is None else f"{v:.2f} s"


def ms(value: Any) -> str:
    v = number(value)
    return MISSING if v is None else f"{v:.1f} ms"


def percent(value: Any) -> str:
    """A fraction as a percentage: ``0.034`` -> ``3.4%``."""
    v = number(value)
    return MISSING if v is None else f"{v * 100:.1f}%"


def tflop(value: Any) -> str:
    """TFLOP or TFLOP/s with 3 significant digits: ``0.0123``, ``312``."""
    v = number(value)
    return MISSING if v is None else f"{v:.3g}"


def spread(value: Any) -> str:
    """A figure's spread over its repeats (a CV): ``0.034`` -> ``±3.4%``, ``0.12`` -> ``±12%``."""
    v = number(value)
    if v is None:
        return MISSING
    return f"±{v * 100:.1f}%" if v < 0.1 else f"±{v * 100:.0f}%"


#: The word that marks a figure whose spread is beyond the scenario's noise limit.
NOISY = "noisy"


def change(value: Any) -> str:
    """A relative change, signed: ``-0.12`` -> ``-12.0%``."""
    v = number(value)
    return MISSING if v is None else f"{v * 100:+.1f}%"


def p_value(value: Any) -> str:
    v = number(value)
    return MISSING if v is None else f"{v:.3g}"


def integer(value: Any) -> str:
    v = number(value)
    return MISSING if v is None else str(int(v))


def yes_no(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return "yes" if bool(value) else "no"


def text(value: Any) -> str:
    """Any value as text; None/NaN as ``-``, lists as ``[a, b]``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return str(value)


#: The PSNR ``harness.conformance`` records for identical images (the true value is infinite).
PSNR_IDENTICAL_DB = 100.0


def psnr(value: Any) -> str:
    """Image PSNR: ``19.7 dB``; ``identical`` at :data:`PSNR_IDENTICAL_DB`."""
    v = number(value)
    if v is None:
        return MISSING
    return "identical" if v >= PSNR_IDENTICAL_DB else f"{v:.1f} dB"


def rel_error(value: Any) -> str:
    """A relative error, 3 significant digits: ``3.1e-06``, ``0.709``, ``0``."""
    v = number(value)
    return MISSING if v is None else f"{v:.3g}"


def short(value: Any, limit: int = 80) -> str:
    """The first line of a text, cut to ``limit`` characters with ``…``."""
    lines = text(value).strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def metric(name: str, value: Any) -> str:
    """A value of a results column by the column's unit (used for verdict rows)."""
    if name.endswith("_gb"):
        return f"{gb(value)} GB" if number(value) is not None else MISSING
    if name.endswith("_s"):
        return seconds(value)
    if name.endswith("_ms"):
        return ms(value)
    if "its" in name:
        return its(value)
    return text(value)


def stage_its(stages: Any) -> str:
    """A multi-stage model's per-stage it/s: ``prior 216 · decoder 59.57``; ``-`` for none."""
    if not stages:
        return MISSING
    return " · ".join(f"{name} {its(value)}" for name, value in stages)


#: Formatter names usable from templates as ``value|fmt(kind)``.
FORMATTERS: dict[str, Callable[[Any], str]] = {
    "its": its,
    "gb": gb,
    "s": seconds,
    "ms": ms,
    "pct": percent,
    "spread": spread,
    "tflop": tflop,
    "change": change,
    "p": p_value,
    "int": integer,
    "bool": yes_no,
    "text": text,
    "db": psnr,
    "rel": rel_error,
    "stage_its": stage_its,
}


def fmt(value: Any, kind: str) -> str:
    """Format ``value`` with the formatter named ``kind`` (a key of :data:`FORMATTERS`)."""
    try:
        formatter = FORMATTERS[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {sorted(FORMATTERS)}, got {kind!r}") from None
    return formatter(value)


def md_cell(value: Any) -> str:
    """Text safe inside a GitHub Markdown table cell: one line, pipes and HTML escaped."""
    result = text(value)
    result = " ".join(result.split())
    replacements = {"\\": "\\\\", "|": "\\|", "<": "&lt;", ">": "&gt;", "`": "\\`"}
    return "".join(replacements.get(char, char) for char in result)
