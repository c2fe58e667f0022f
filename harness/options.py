"""Options shared by the pytest plugin and ``python -m harness``.

As pytest-benchmark's ``add_*_options(addoption, prefix)``: the same function adds the options
to pytest (``parser.getgroup(...).addoption``, prefix ``bench-``) and to argparse
(``parser.add_argument``, any prefix), so names, defaults and help texts cannot drift apart.
Read them back with :func:`get_option` using the same prefix.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

AddOption = Callable[..., Any]
PYTEST_PREFIX = "bench-"
DEFAULT_RESULTS = Path("results")
DEFAULT_BASELINES = Path(".sdbench/baselines")
#: How cells are isolated (:mod:`harness.runner`); the first is the default.
ISOLATION: tuple[str, ...] = ("load", "cell", "none")
#: Significance level of the test on the repeats (see :mod:`harness.compare`).
DEFAULT_ALPHA = 0.005


def _fraction(text: str) -> float:
    """``0.05`` or ``5%`` -> 0.05."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction or a percentage, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a value above 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _fraction(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a value between 0 and 1, got {text!r}")
    return value


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}".replace("-", "_")


def get_option(options: Any, prefix: str, name: str) -> Any:
    """Read an option added with ``prefix`` from an argparse namespace or pytest's option."""
    return getattr(options, _dest(prefix, name), None)


def add_threshold_options(addoption: AddOption, prefix: str = PYTEST_PREFIX) -> None:
    """``--{prefix}speed-threshold`` etc.: override the scenarios' thresholds, and alpha."""
    for kind, what in (
        ("speed", "it/s and denoise it/s"),
        ("memory", "CPU and GPU memory peaks"),
        ("load", "load time"),
    ):
        addoption(
            f"--{prefix}{kind}-threshold",
            dest=_dest(prefix, f"{kind}-threshold"),
            type=_fraction,
            default=None,
            metavar="FRACTION",
            help=f"relative change of {what} that counts as a regression or an improvement "
            "(0.05 or 5%%); default: the scenario's thresholds",
        )
    addoption(
        f"--{prefix}alpha",
        dest=_dest(prefix, "alpha"),
        type=_probability,
        default=None,
        metavar="P",
        help=f"significance level of the test on the repeats (default {DEFAULT_ALPHA})",
    )


def add_bench_options(addoption: AddOption, prefix: str = PYTEST_PREFIX) -> None:
    """Results directory, baseline, report and thresholds."""
    addoption(
        f"--{prefix}results",
        dest=_dest(prefix, "results"),
        type=Path,
        default=DEFAULT_RESULTS,
        metavar="DIR",
        help=f"directory of the results store (results.jsonl); default {DEFAULT_RESULTS}",
    )
    addoption(
        f"--{prefix}baseline",
        dest=_dest(prefix, "baseline"),
        type=Path,
        default=None,
        metavar="PATH",
        help="compare against a baseline: a results dir, a results .jsonl file or a "
        f"baselines root ({DEFAULT_BASELINES}, the current environment's baseline is chosen)",
    )
    addoption(
        f"--{prefix}report",
        dest=_dest(prefix, "report"),
        type=Path,
        default=None,
        metavar="PATH",
        help="write the HTML report (with verdicts when a baseline is given) to PATH",
    )
    add_threshold_options(addoption, prefix)


def threshold_overrides(options: Any, prefix: str = "") -> dict[str, float]:
    """The threshold options that were given, as ``Thresholds`` field -> value."""
    found: dict[str, float] = {}
    for kind in ("speed", "memory", "load"):
        value = get_option(options, prefix, f"{kind}-threshold")
        if value is not None:
            found[kind] = float(value)
    return found


def alpha_option(options: Any, prefix: str = "") -> float:
    value = get_option(options, prefix, "alpha")
    return DEFAULT_ALPHA if value is None else float(value)


def add_isolate_option(addoption: AddOption, prefix: str = PYTEST_PREFIX) -> None:
    """``--{prefix}isolate load|cell|none``: worker processes per load group, per cell, or none."""
    addoption(
        f"--{prefix}isolate",
        dest=_dest(prefix, "isolate"),
        choices=ISOLATION,
        default=ISOLATION[0],
        help="a fresh worker process per load group (default), per cell, or none (in this "
        "process, for pdb: no hard timeout, a crash ends the run)",
    )
