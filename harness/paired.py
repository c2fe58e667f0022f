"""Verdicts from paired rounds: base and head measured alternately, judged by their ratios.

Pure functions over lists (asv's ``step_detect.py`` habit). A/B rounds give one value per side
per round; the round's ratio ``head / base`` cancels whatever the machine did to both (drift,
a neighbour burning CPU), and the ABBA / BAAB order cancels linear drift within a pair of
rounds. The ratios are judged on their logarithms:

- **estimate**: the Hodges–Lehmann estimator, the median of the Walsh averages
  ``(x_i + x_j) / 2`` (i ≤ j) of the log ratios — robust to a few outlying rounds;
- **interval**: the distribution-free confidence interval that inverts the Wilcoxon
  signed-rank test: the Walsh averages of ranks ``k`` and ``M + 1 − k``, with ``M = n(n+1)/2``
  and ``k`` the largest count with ``P(T⁺ < k) ≤ (1 − confidence) / 2`` under the exact null
  distribution of the signed-rank statistic ``T⁺`` (the normal approximation past 60
  rounds). :func:`wilcoxon_p` gives the same test's p-value through ``scipy.stats.wilcoxon``;
  the tests check that the two agree;
- **verdict** against the threshold ``t`` (for a metric where higher is better):
  ``regression`` when the whole interval lies below ``1 − t``, ``improvement`` when it lies
  above ``1 + t``, ``unchanged`` when it lies inside ``[1 − t, 1 + t]``, else
  ``inconclusive`` (more rounds may decide it) — also while there are too few rounds for any
  interval of that confidence (fewer than 6 at 95%). For lower-is-better metrics the sides
  swap;
- **precision**: a ``regression`` or ``improvement`` also needs an interval no wider than
  twice the band it is judged against, ``high / low ≤ (1 + t)⁴`` (×1.22 at t = 5%). A wider
  interval beyond the threshold says the rounds disagree more than the gate can resolve (on
  a loaded machine six rounds of ×0.27–×0.94 are as likely a starved worker as a slower
  head); the cell stays inconclusive and measures on. (Once the band itself, ``(1 + t)²``:
  that held back real 15% changes measured at ×1.11 width after 30 rounds.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

#: Verdicts of a paired comparison, in the order reports list them.
PAIRED_VERDICTS: tuple[str, ...] = ("regression", "improvement", "unchanged", "inconclusive")
DEFAULT_CONFIDENCE = 0.95
#: Rounds before the first look, and the budget after which a cell stays inconclusive.
DEFAULT_MIN_ROUNDS = 6
DEFAULT_MAX_ROUNDS = 30
#: Rounds above which the signed-rank null distribution is taken as normal.
_EXACT_UP_TO = 60


@dataclass(frozen=True)
class PairedVerdict:
    """The judgement of one metric of one cell over its rounds."""

    metric: str
    verdict: str
    #: Hodges–Lehmann estimate of head / base, and its confidence interval.
    ratio: float
    low: float
    high: float
    rounds: int
    threshold: float
    confidence: float
    higher_is_better: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def change(self) -> float:
        return self.ratio - 1.0


def ratios(base: Sequence[float], head: Sequence[float]) -> list[float]:
    """Per-round ``head / base``; rounds missing a positive value on either side are dropped."""
    return [h / b for b, h in zip(base, head, strict=True) if b > 0 and h > 0]


@lru_cache(maxsize=128)
def _signed_rank_counts(n: int) -> tuple[int, ...]:
    """How many of the 2^n sign patterns give each value of T⁺ (0 … n(n+1)/2)."""
    counts = [1]
    for rank in range(1, n + 1):
        grown = counts + [0] * rank
        for total, ways in enumerate(counts):
            grown[total + rank] += ways
        counts = grown
    return tuple(counts)


def _rank_k(n: int, confidence: float) -> int:
    """The largest k with ``P(T⁺ < k) ≤ (1 − confidence) / 2`` (k ≥ 1: else [min, max])."""
    tail = (1.0 - confidence) / 2.0
    if n > _EXACT_UP_TO:
        mean, sd = n * (n + 1) / 4.0, math.sqrt(n * (n + 1) * (2 * n + 1) / 24.0)
        from scipy import stats

        return max(1, int(math.floor(mean + stats.norm.ppf(tail) * sd + 0.5)))
    counts = _signed_rank_counts(n)
    total = float(2**n)
    below, k = 0.0, 0
    while k < len(counts) and (below + counts[k]) / total <= tail:
        below += counts[k]
        k += 1
    return max(1, k)


def hodges_lehmann(
    values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float, float]:
    """(estimate, low, high) of the pseudo-median of ``values`` (see the module docstring)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to estimate from")
    walsh = sorted(
        (values[i] + values[j]) / 2.0 for i in range(n) for j in range(i, n)
    )
    middle = len(walsh) // 2
    estimate = walsh[middle] if len(walsh) % 2 else (walsh[middle - 1] + walsh[middle]) / 2.0
    k = min(_rank_k(n, confidence), len(walsh))
    return estimate, walsh[k - 1], walsh[len(walsh) - k]


def wilcoxon_p(log_ratios: Sequence[float], shift: float, alternative: str) -> float:
    """``scipy.stats.wilcoxon`` of ``log_ratios − shift`` (exact where scipy can)."""
    shifted = [value - shift for value in log_ratios]
    from scipy import stats

    return float(stats.wilcoxon(shifted, alternative=alternative).pvalue)


def judge(
    metric: str,
    base: Sequence[float],
    head: Sequence[float],
    threshold: float,
    *,
    higher_is_better: bool,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PairedVerdict:
    """The paired verdict of one metric (see the module docstring)."""
    logs = [math.log(r) for r in ratios(base, head)]
    if not logs:
        raise ValueError(f"{metric}: no round has a value on both sides")
    estimate, low, high = (math.exp(v) for v in hodges_lehmann(logs, confidence))
    worse_low, better_high = 1.0 - threshold, 1.0 + threshold
    precise = high / low <= better_high**4
    if not higher_is_better:  # memory, load time: a ratio above 1 is worse
        below, above = "improvement", "regression"
    else:
        below, above = "regression", "improvement"
    if 2.0 / 2.0 ** len(logs) > 1.0 - confidence:
        verdict = "inconclusive"  # too few rounds for an interval of this confidence
    elif high < worse_low and precise:
        verdict = below
    elif low > better_high and precise:
        verdict = above
    elif low >= worse_low and high <= better_high:
        verdict = "unchanged"
    else:
        verdict = "inconclusive"
    return PairedVerdict(
        metric=metric,
        verdict=verdict,
        ratio=estimate,
        low=low,
        high=high,
        rounds=len(logs),
        threshold=threshold,
        confidence=confidence,
        higher_is_better=higher_is_better,
    )


def balanced_orders(blocks: int, seed: int) -> list[tuple[str, str]]:
    """Side order of each round, two rounds a block: ABBA or BAAB, chosen per block from
    ``seed`` (``("base", "head")`` = base first)."""
    rng = random.Random(seed)
    orders: list[tuple[str, str]] = []
    for _ in range(blocks):
        first = ("base", "head") if rng.random() < 0.5 else ("head", "base")
        orders += [first, (first[1], first[0])]
    return orders


def settled(verdict: PairedVerdict, max_rounds: int) -> bool:
    """Stop measuring: the interval decided, or the round budget is spent."""
    return verdict.verdict != "inconclusive" or verdict.rounds >= max_rounds
