"""Paired A/B statistics on seeded synthetic rounds: drift, noise, steps, outliers."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from harness.paired import (
    DEFAULT_MAX_ROUNDS,
    DEFAULT_MIN_ROUNDS,
    balanced_orders,
    hodges_lehmann,
    judge,
    settled,
    wilcoxon_p,
)


def _simulate(step: float, drift: float, noise: float, rng: random.Random, burn_at=None):
    """One A/B cell: it/s of base and head per round, as the engine measures them.

    The machine drifts linearly by ``drift`` over the whole budget and, with ``burn_at``,
    loses 30% from that generation on (a CPU burner starting halfway); head is ``step``
    faster (negative: slower). Measured in ABBA/BAAB blocks until the verdict settles.
    """
    orders = balanced_orders(DEFAULT_MAX_ROUNDS // 2, rng.randrange(1 << 30))
    total = 2 * DEFAULT_MAX_ROUNDS
    base: list[float] = []
    head: list[float] = []
    generation = 0
    for index, order in enumerate(orders):
        pair = {}
        for side in order:
            machine = 1.0 - drift * generation / total
            if burn_at is not None and generation >= burn_at:
                machine *= 0.7
            speed = 10.0 * machine * (1.0 + (step if side == "head" else 0.0))
            pair[side] = speed * math.exp(rng.gauss(0.0, noise))
            generation += 1
        base.append(pair["base"])
        head.append(pair["head"])
        rounds = index + 1
        if rounds >= DEFAULT_MIN_ROUNDS and rounds % 2 == 0:
            verdict = judge("its", base, head, 0.05, higher_is_better=True)
            if settled(verdict, DEFAULT_MAX_ROUNDS):
                return verdict
    return judge("its", base, head, 0.05, higher_is_better=True)


def test_drift_and_noise_give_no_false_regression() -> None:
    rng = random.Random(20261201)
    verdicts = [_simulate(0.0, 0.20, 0.03, rng).verdict for _ in range(100)]
    assert verdicts.count("regression") <= 1
    assert verdicts.count("improvement") <= 1


def test_a_cpu_burner_halfway_gives_no_false_regression() -> None:
    rng = random.Random(7)
    verdicts = [
        _simulate(0.0, 0.10, 0.03, rng, burn_at=rng.randrange(4, 40)).verdict for _ in range(100)
    ]
    assert verdicts.count("regression") <= 1


@pytest.mark.parametrize("step, expected", [(-0.10, "regression"), (0.10, "improvement")])
def test_a_ten_percent_step_is_found(step: float, expected: str) -> None:
    rng = random.Random(11)
    verdicts = [_simulate(step, 0.20, 0.03, rng) for _ in range(100)]
    assert sum(v.verdict == expected for v in verdicts) >= 95
    assert all(v.rounds <= DEFAULT_MAX_ROUNDS for v in verdicts)


def test_unchanged_needs_the_interval_inside_the_threshold() -> None:
    rng = random.Random(3)
    base = [10.0 * math.exp(rng.gauss(0, 0.005)) for _ in range(20)]
    head = [value * math.exp(rng.gauss(0, 0.005)) for value in base]
    verdict = judge("its", base, head, 0.05, higher_is_better=True)
    assert verdict.verdict == "unchanged" and verdict.low > 0.95 and verdict.high < 1.05
    few = judge("its", base[:3], head[:3], 0.05, higher_is_better=True)
    assert few.verdict == "inconclusive"  # [min, max] of 3 rounds is not evidence
    memory = judge("cpu_peak_gb", [1.0] * 8, [1.3] * 8, 0.10, higher_is_better=False)
    assert memory.verdict == "regression" and memory.ratio == pytest.approx(1.3)


def test_a_wide_interval_beyond_the_threshold_is_not_a_verdict() -> None:
    # six A/A rounds of a starved worker (a CPU burner on a 2-core machine, measured): all
    # below ×0.94, but spread over ×0.27–×0.94 — not evidence at a ±5% threshold
    base = [10.0] * 6
    head = [2.72, 9.39, 6.1, 4.8, 7.7, 5.5]
    wide = judge("its", base, head, 0.05, higher_is_better=True)
    assert wide.high < 0.95 and wide.verdict == "inconclusive"
    assert not settled(wide, DEFAULT_MAX_ROUNDS)
    narrow = judge("its", base, [8.6, 8.7, 8.5, 8.8, 8.6, 8.7], 0.05, higher_is_better=True)
    assert narrow.verdict == "regression" and narrow.high / narrow.low <= 1.05**4
    # a real 15% slowdown as this machine measures one (30 rounds, log-ratio SD 0.11): an
    # interval wider than the band itself, (1 + t)², and still a regression
    rng = random.Random(0)
    slow = [math.exp(rng.gauss(math.log(0.874), 0.11)) for _ in range(30)]
    spread = judge("its", [1.0] * 30, slow, 0.05, higher_is_better=True)
    assert spread.verdict == "regression" and spread.high / spread.low > 1.05**2


@pytest.mark.parametrize("n", [6, 9, 14, 25])
def test_interval_inverts_scipys_wilcoxon_test(n: int) -> None:
    rng = random.Random(n)
    values = [rng.gauss(0.02, 0.05) for _ in range(n)]
    estimate, low, high = hodges_lehmann(values, confidence=0.95)
    assert low <= estimate <= high
    # shifting by a bound puts the one-sided p-value at the edge of 2.5% (exact test)
    inside = 1e-9
    assert wilcoxon_p(values, low - inside, "greater") <= 0.025
    assert wilcoxon_p(values, low + inside, "greater") > 0.025
    assert wilcoxon_p(values, high + inside, "less") <= 0.025
    assert wilcoxon_p(values, high - inside, "less") > 0.025
    assert estimate == pytest.approx(
        stats.scoreatpercentile([(a + b) / 2 for i, a in enumerate(values) for b in values[i:]],
                                50)
    )


def test_orders_are_balanced_and_seeded() -> None:
    orders = balanced_orders(10, seed=5)
    assert orders == balanced_orders(10, seed=5) and orders != balanced_orders(10, seed=6)
    for first, second in zip(orders[::2], orders[1::2], strict=True):
        assert second == (first[1], first[0])  # ABBA or BAAB
    assert {order for order in orders} == {("base", "head"), ("head", "base")}
