"""The judge's statistics against an independent implementation, and its rule on clear cases.

Reference p-values and intervals were computed with SciPy 1.17.1 (``stats.fisher_exact(...,
alternative="greater")``, ``stats.mannwhitneyu(..., alternative="greater",
method="asymptotic", use_continuity=True)``, ``stats.ttest_ind(b, a, equal_var=False)`` and its
``confidence_interval``); hotpatch does not depend on SciPy.
"""

from __future__ import annotations

import random
import threading

import pytest

from hotpatch.judge import (
    Arm,
    ArmSummary,
    compare_means,
    error_rate_p_value,
    judge,
    mann_whitney_p_value,
    quantile,
)


@pytest.mark.parametrize(
    ("baseline_calls", "baseline_errors", "candidate_calls", "candidate_errors", "scipy"),
    [
        (1000, 0, 1000, 10, 0.0009547325826708071),
        (1000, 5, 1000, 12, 0.07088029152326587),
        (100, 0, 100, 3, 0.12311557788944724),
        (5000, 50, 200, 5, 0.05893995991697289),
        (20, 1, 20, 1, 0.7564102564102564),
        (100000, 100, 100000, 160, 0.00011836583833300487),
        (10, 10, 10, 10, 1.0),
        (50, 0, 50, 0, 1.0),
    ],
)
def test_error_rate_p_value_is_fishers_exact_test(
    baseline_calls: int,
    baseline_errors: int,
    candidate_calls: int,
    candidate_errors: int,
    scipy: float,
) -> None:
    got = error_rate_p_value(baseline_calls, baseline_errors, candidate_calls, candidate_errors)
    assert got == pytest.approx(scipy, rel=1e-8)


BASE = [12.1, 9.8, 11.0, 10.4, 10.0, 13.2, 9.9, 10.0, 11.7, 10.8, 12.5, 10.0]
CAND = [13.0, 11.9, 14.2, 10.0, 12.8, 15.1, 11.9, 13.3, 12.2, 10.4, 16.0, 12.5, 11.9, 14.4, 12.0]


def test_mann_whitney_p_value_with_ties_matches_scipy_in_both_directions() -> None:
    assert mann_whitney_p_value(BASE, CAND) == pytest.approx(0.0026506455563328774, rel=1e-9)
    assert mann_whitney_p_value(CAND, BASE) == pytest.approx(0.9977233528972861, rel=1e-9)


def test_mann_whitney_of_identical_values_is_no_evidence() -> None:
    assert mann_whitney_p_value([1.0] * 50, [1.0] * 50) == 1.0
    assert mann_whitney_p_value([], [1.0]) == 1.0


def test_compare_means_is_welchs_t_test_with_its_interval() -> None:
    a = [3.1, 2.9, 3.4, 3.0, 2.7, 3.3, 3.2]
    b = [3.6, 3.9, 3.1, 4.2, 3.8, 3.5, 4.0, 3.3, 3.7]
    result = compare_means(a, b)
    assert result.p_value == pytest.approx(0.0012564213689102912, rel=1e-9)
    assert (result.low, result.high) == pytest.approx((0.2768258032203165, 0.9073011809066678))
    assert result.significant
    wide = compare_means(a, b, confidence=0.99)
    assert (wide.low, wide.high) == pytest.approx((0.15432755910029333, 1.029799425026691))


def test_compare_means_rejects_equal_means_at_the_stated_rate_and_finds_a_real_difference() -> None:
    rng = random.Random(2026)
    runs = 2000
    false_alarms = sum(
        compare_means(
            [rng.gauss(10, 2) for _ in range(40)], [rng.gauss(10, 2) for _ in range(40)]
        ).significant
        for _ in range(runs)
    )
    assert 0.035 <= false_alarms / runs <= 0.065  # 5% stated; about 3 standard errors each side
    found = sum(
        compare_means(
            [rng.gauss(10, 2) for _ in range(40)], [rng.gauss(11.5, 2) for _ in range(40)]
        ).significant
        for _ in range(200)
    )
    assert found / 200 >= 0.85  # power of Welch's test here is about 0.93


def test_quantile_interpolates_like_numpy() -> None:
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.99) == pytest.approx(4.96)
    assert quantile([7.0], 0.99) == 7.0


def summary(calls: int, errors: int, latencies: list[float]) -> ArmSummary:
    return ArmSummary(calls, errors, tuple(latencies))


FAST = [0.010 + 0.0001 * (i % 37) for i in range(500)]


def test_below_min_calls_the_verdict_is_inconclusive_never_pass() -> None:
    verdict = judge(summary(99, 0, FAST[:99]), summary(500, 50, FAST), min_calls=100)
    assert verdict.decision == "inconclusive" and verdict.reason == "min_calls"


def test_a_candidate_failing_one_call_in_ten_fails_on_error_rate() -> None:
    verdict = judge(summary(500, 0, FAST), summary(500, 50, FAST))
    assert (verdict.decision, verdict.reason) == ("fail", "error_rate")
    assert verdict.error_p_value is not None and verdict.error_p_value < 1e-10
    assert verdict.figures()["candidate_errors"] == 50


def test_a_significant_but_tiny_error_excess_does_not_fail() -> None:
    # 0.10% against 0.25% on a million calls each: p is tiny, the excess is 0.15 pp < 0.5 pp.
    verdict = judge(summary(1_000_000, 1000, FAST), summary(1_000_000, 2500, FAST))
    assert verdict.error_p_value is not None and verdict.error_p_value < 1e-10
    assert verdict.decision == "pass", verdict.detail


def test_success_below_the_floor_fails_even_when_the_baseline_is_as_bad() -> None:
    verdict = judge(summary(1000, 20, FAST), summary(1000, 20, FAST))
    assert (verdict.decision, verdict.reason) == ("fail", "success_rate")
    assert judge(summary(1000, 20, FAST), summary(1000, 20, FAST), min_success=None).decision == (
        "pass"
    )


def test_the_success_floor_is_judged_on_evidence_not_on_a_few_unlucky_calls() -> None:
    # 3 errors in 200 calls: 1.5% observed, but a 0.5%-error service does that 1 time in 12.
    assert judge(summary(200, 1, FAST[:200]), summary(200, 3, FAST[:200])).decision == "pass"
    from hotpatch.judge import _binomial_upper_tail

    assert _binomial_upper_tail(1000, 20, 0.01) == pytest.approx(0.003288359787727457, rel=1e-9)
    assert _binomial_upper_tail(200, 3, 0.005) == pytest.approx(0.07983943195297737, rel=1e-9)


def test_an_old_and_new_version_that_behave_alike_are_rarely_failed() -> None:
    """A/A: 400 canaries of 300 calls each way, 0.5% errors, the same latency distribution."""
    rng = random.Random(11)
    failed = 0
    for _ in range(400):
        arms = [
            summary(
                300,
                sum(rng.random() < 0.005 for _ in range(300)),
                [rng.lognormvariate(-4.5, 0.4) for _ in range(300)],
            )
            for _ in range(2)
        ]
        failed += judge(arms[0], arms[1]).decision == "fail"
    assert failed / 400 <= 0.02, failed


def test_a_candidate_twice_as_slow_fails_on_latency_and_five_percent_slower_passes() -> None:
    slow = [x * 2 for x in FAST]
    verdict = judge(summary(500, 0, FAST), summary(500, 0, slow))
    assert (verdict.decision, verdict.reason) == ("fail", "latency")
    assert verdict.median_shift == pytest.approx(1.0)
    slightly = [x * 1.05 for x in FAST]
    verdict = judge(summary(500, 0, FAST), summary(500, 0, slightly))
    assert verdict.latency_p_value is not None and verdict.latency_p_value < 0.01
    assert verdict.decision == "pass", verdict.detail


def test_a_median_rise_below_the_absolute_floor_never_fails_on_latency() -> None:
    base = [x * 1e-5 for x in FAST]  # microsecond-scale calls: 25% is scheduling noise here
    slow = [x * 2 for x in base]
    rise = quantile(slow, 0.5) - quantile(base, 0.5)
    assert judge(summary(500, 0, base), summary(500, 0, slow)).decision == "fail"
    verdict = judge(summary(500, 0, base), summary(500, 0, slow), min_median_rise_s=rise * 1.01)
    assert verdict.decision == "pass", verdict.detail
    verdict = judge(summary(500, 0, base), summary(500, 0, slow), min_median_rise_s=rise * 0.99)
    assert (verdict.decision, verdict.reason) == ("fail", "latency")


def test_an_absolute_p99_bound_fails_a_candidate_with_a_slow_tail() -> None:
    tail = FAST[:490] + [1.0] * 10
    verdict = judge(summary(500, 0, FAST), summary(500, 0, tail), max_p99_s=0.5)
    assert (verdict.decision, verdict.reason) == ("fail", "latency_p99")
    assert judge(summary(500, 0, FAST), summary(500, 0, tail)).decision == "pass"


def test_arm_keeps_a_bounded_uniform_reservoir_and_counts_every_call_across_threads() -> None:
    arm = Arm(max_samples=1000, seed=1)
    for value in range(100_000):
        arm.record(float(value), error=value % 10 == 0)
    kept = arm.summary()
    assert (kept.calls, kept.errors, len(kept.latencies_s)) == (100_000, 10_000, 1000)
    assert 45_000 < sum(kept.latencies_s) / 1000 < 55_000  # uniform over all calls: mean ~50,000
    assert max(kept.latencies_s) > 90_000  # late calls are kept too, not only the first 1000

    shared = Arm(max_samples=100, seed=2)

    def record_many() -> None:
        for _ in range(10_000):
            shared.record(0.001)

    threads = [threading.Thread(target=record_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert shared.summary().calls == 40_000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Arm(max_samples=0), "max_samples"),
        (lambda: Arm().record(float("nan")), "latency_s"),
        (lambda: Arm().record(-1.0), "latency_s"),
        (lambda: error_rate_p_value(10, 11, 10, 0), "exceed"),
        (lambda: error_rate_p_value(10, -1, 10, 0), "baseline_errors"),
        (lambda: judge(summary(1, 0, []), summary(1, 0, []), alpha=0), "alpha"),
        (lambda: judge(summary(1, 0, []), summary(1, 0, []), min_calls=0), "min_calls"),
        (lambda: compare_means([1.0], [1.0, 2.0]), "two values"),
        (lambda: compare_means([1.0, 2.0], [1.0, 2.0], confidence=1.0), "confidence"),
        (lambda: quantile([], 0.5), "no values"),
    ],
)
def test_wrong_arguments_fail_at_once_naming_the_argument(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("p", "df", "scipy"),
    [
        (0.975, 5, 2.5705818356363146),
        (0.975, 1.5, 6.016663104427929),
        (0.995, 3, 5.840909309733355),
        (0.975, 1000, 1.9623390808264083),
        (0.9, 2.2, 1.8123849217763532),
        (0.995, 1.01, 61.21049319565298),
    ],
)
def test_t_quantile_matches_scipy_down_to_one_degree_of_freedom(
    p: float, df: float, scipy: float
) -> None:
    from hotpatch.judge import _t_quantile

    assert _t_quantile(p, df) == pytest.approx(scipy, rel=1e-9)
