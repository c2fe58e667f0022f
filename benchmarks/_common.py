"""What every benchmark script shares: interleaved rounds, ratio summaries, the models.

A benchmark compares two things measured in one process, alternately (A B B A, B A A B, …,
the order drawn per pair of rounds from a recorded seed, :func:`harness.paired.balanced_orders`),
so that the machine's drift lands on both sides; it reports the per-round ratios' median and
spread, and the Hodges–Lehmann estimate with its 95% interval (:mod:`harness.paired`).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python benchmarks/x.py`` from a checkout
    sys.path.insert(0, str(ROOT))

from harness.paired import balanced_orders, hodges_lehmann  # noqa: E402


@dataclass(frozen=True)
class Ratio:
    """``a / b`` over interleaved rounds."""

    name: str
    a: str
    b: str
    values: tuple[float, ...]
    a_values: tuple[float, ...]
    b_values: tuple[float, ...]
    unit: str = ""
    #: What the ratio divides: ``harness / bare`` (speeds), ``diffusers time / original time``.
    meaning: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def interval(self) -> tuple[float, float, float]:
        """(estimate, low, high): Hodges–Lehmann on the log ratios, 95%; the interval is the
        estimate itself below 6 rounds (no 95% interval exists there)."""
        import math

        logs = [math.log(v) for v in self.values]
        estimate, low, high = (math.exp(v) for v in hodges_lehmann(logs))
        return estimate, low, high

    def line(self) -> str:
        estimate, low, high = self.interval
        a_med, b_med = statistics.median(self.a_values), statistics.median(self.b_values)
        return (
            f"{self.name}: {self.meaning or f'{self.a} / {self.b}'} = {self.median:.3f} "
            f"(min {min(self.values):.3f}, max {max(self.values):.3f}; "
            f"HL {estimate:.3f} [{low:.3f}, {high:.3f}], {len(self.values)} rounds)  "
            f"{self.a} {a_med:.4g}{self.unit}, {self.b} {b_med:.4g}{self.unit}"
        )

    def to_dict(self) -> dict[str, object]:
        estimate, low, high = self.interval
        return {
            "name": self.name, "a": self.a, "b": self.b, "meaning": self.meaning,
            "median": self.median,
            "min": min(self.values), "max": max(self.values), "estimate": estimate,
            "low": low, "high": high, "rounds": len(self.values),
            "a_values": list(self.a_values), "b_values": list(self.b_values), "unit": self.unit,
        }


def interleave(
    name: str,
    a: tuple[str, Callable[[], float]],
    b: tuple[str, Callable[[], float]],
    rounds: int,
    *,
    seed: int = 0,
    unit: str = "",
    higher_is_better: bool = True,
) -> Ratio:
    """Measure ``a`` and ``b`` alternately for ``rounds`` rounds (each call returns one
    figure); the ratio is ``a / b`` for a higher-is-better figure (it/s), ``b / a`` for a
    time (so a ratio above 1 always means ``a`` is faster)."""
    label_a, measure_a = a
    label_b, measure_b = b
    values_a: list[float] = []
    values_b: list[float] = []
    for order in balanced_orders((rounds + 1) // 2, seed)[:rounds]:
        got: dict[str, float] = {}
        for side in order:  # "base" = a, "head" = b
            gc.collect()
            got[side] = measure_a() if side == "base" else measure_b()
        values_a.append(got["base"])
        values_b.append(got["head"])
    ratios = tuple(
        (x / y) if higher_is_better else (y / x) for x, y in zip(values_a, values_b, strict=True)
    )
    meaning = f"{label_a} / {label_b}" if higher_is_better else f"{label_b} time / {label_a} time"
    return Ratio(name, label_a, label_b, ratios, tuple(values_a), tuple(values_b), unit, meaning)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """The median seconds of ``repeats`` calls of ``fn`` (host clock; callers synchronise)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument("--quick", action="store_true",
                        help="tiny model, few rounds: checks that the script works (for tests)")
    result.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    result.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu)")
    result.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's)")
    result.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return result


def setup_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)


def write_json(path: Path | None, data: object) -> None:
    if path is None:
        return
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def print_ratios(title: str, ratios: Sequence[Ratio]) -> None:
    print(f"# {title}")
    for ratio in ratios:
        print(ratio.line())
