"""Judging a new version against the old on live work: the statistics canaries and trials share.

A canary (a gunicorn worker on the new release beside the old workers) and a trial (a function's
new version beside the old one in one process) both end in the same question: on the calls each
version served, is the new one worse? The answer must come from the samples alone, with no
statistics package installed, and must never be given on too little data: a release that fails
one call in ten must not pass because the first twenty calls happened to succeed, and a good one
must not be rolled back on noise.

The rule (the defaults of the analysis tools people trust: Flagger, Argo Rollouts, Kayenta):

- **Inconclusive** while either arm has fewer than ``min_calls`` calls: the caller holds the step
  and waits (and rolls back when its own progress deadline runs out), never passes it silently.
- **Errors**: fail when the candidate's error rate is higher than the baseline's by a one-sided
  Fisher exact test at ``p < alpha`` *and* by at least ``min_error_diff`` (0.5 percentage points)
  in absolute terms, or when the candidate's success rate is below ``min_success`` (99%) whatever
  the baseline does, by an exact one-sided binomial test at ``p < alpha`` (a healthy service at
  0.5% errors has 3 errors in 200 calls one time in twelve: a bare "observed rate < 99%" would
  roll it back on noise). Fisher's test is exact at any count, including the usual case of a
  baseline with no error at all, where a normal approximation is wrong.
- **Latency**: fail when the candidate is slower by a one-sided Mann-Whitney U test at
  ``p < alpha`` *and* its median is more than ``max_median_shift`` (25%) above the baseline's, or
  when its p99 exceeds ``max_p99_s`` if one is given. Mann-Whitney compares whole distributions by
  rank, so a few huge outliers cannot decide it alone; the median shift keeps a statistically
  significant but harmless difference (2% slower on a million calls) from failing a release.
- Otherwise **pass**.

Latency samples are kept in a bounded reservoir per arm (uniform over every call the arm served,
``max_samples`` at most), so memory stays flat however long a step runs. ``compare_means`` (Welch's
t-test and confidence interval) is the report of an A/B experiment's recorded metrics.
"""

from __future__ import annotations

import math
import random
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Arm",
    "ArmSummary",
    "Decision",
    "MeanComparison",
    "Verdict",
    "compare_means",
    "error_rate_p_value",
    "judge",
    "mann_whitney_p_value",
    "quantile",
]

Decision = Literal["pass", "fail", "inconclusive"]

DEFAULT_MAX_SAMPLES = 10_000


@dataclass(frozen=True)
class ArmSummary:
    """What one arm served, at one moment: the figures every verdict reports."""

    calls: int
    errors: int
    latencies_s: tuple[float, ...]  # the reservoir: a uniform sample of every call's latency

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def latency_quantile(self, q: float) -> float | None:
        return quantile(self.latencies_s, q) if self.latencies_s else None


class Arm:
    """The calls, errors and a latency reservoir of one version; safe to record from any thread.

    Args:
        max_samples: the reservoir's size (latencies kept at most).
        seed: the reservoir's random seed (a fixed seed makes a run reproducible).
    """

    def __init__(self, *, max_samples: int = DEFAULT_MAX_SAMPLES, seed: int | None = None) -> None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be a positive int, not {max_samples!r}")
        self._max = max_samples
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._calls = 0
        self._errors = 0
        self._samples: list[float] = []

    def record(self, latency_s: float, *, error: bool = False) -> None:
        """Count one call (an error if ``error``) and offer its latency to the reservoir."""
        if not math.isfinite(latency_s) or latency_s < 0:
            raise ValueError(f"latency_s must be a finite number >= 0, not {latency_s!r}")
        with self._lock:
            self._calls += 1
            if error:
                self._errors += 1
            if len(self._samples) < self._max:
                self._samples.append(latency_s)
            else:  # Algorithm R: the call replaces a kept sample with probability max / calls
                slot = self._random.randrange(self._calls)
                if slot < self._max:
                    self._samples[slot] = latency_s

    def summary(self) -> ArmSummary:
        with self._lock:
            return ArmSummary(self._calls, self._errors, tuple(self._samples))


@dataclass(frozen=True)
class Verdict:
    """A judgement and everything it was made from (for the log event and the report)."""

    decision: Decision
    reason: str  # "", "min_calls", "error_rate", "success_rate", "latency", "latency_p99"
    detail: str  # one human sentence with the figures
    baseline: ArmSummary
    candidate: ArmSummary
    error_p_value: float | None = None
    latency_p_value: float | None = None
    median_shift: float | None = None  # candidate median / baseline median - 1

    def figures(self) -> dict[str, object]:
        """The verdict as flat, JSON-ready key/values (for structlog events and ``--json``)."""
        out: dict[str, object] = {
            "decision": self.decision,
            "reason": self.reason,
            "baseline_calls": self.baseline.calls,
            "baseline_errors": self.baseline.errors,
            "candidate_calls": self.candidate.calls,
            "candidate_errors": self.candidate.errors,
        }
        for name, value in (
            ("error_p_value", self.error_p_value),
            ("latency_p_value", self.latency_p_value),
            ("median_shift", self.median_shift),
        ):
            if value is not None:
                out[name] = value
        return out


def judge(
    baseline: ArmSummary,
    candidate: ArmSummary,
    *,
    min_calls: int = 100,
    alpha: float = 0.01,
    min_error_diff: float = 0.005,
    min_success: float | None = 0.99,
    max_median_shift: float = 0.25,
    min_median_rise_s: float = 0.0,
    max_p99_s: float | None = None,
) -> Verdict:
    """Is the candidate worse than the baseline? ``pass``, ``fail`` or ``inconclusive``.

    Args:
        baseline: the old version's figures over the same period.
        candidate: the new version's.
        min_calls: calls each arm needs before any judgement.
        alpha: significance level of both one-sided tests.
        min_error_diff: smallest error-rate excess (absolute, 0.005 = 0.5 pp) that can fail.
        min_success: the candidate's success rate below which it fails outright (None: no floor).
        max_median_shift: largest tolerated relative rise of the median latency (0.25 = 25%).
        min_median_rise_s: smallest absolute rise of the median latency, in seconds, that can
            fail (0: none): a 25% rise of a few microseconds is scheduling noise, not a defect.
        max_p99_s: an absolute bound on the candidate's p99 latency, in seconds (None: none).
    """
    _check_fraction("alpha", alpha, open_low=True)
    _check_fraction("min_error_diff", min_error_diff)
    if min_success is not None:
        _check_fraction("min_success", min_success)
    if isinstance(min_calls, bool) or not isinstance(min_calls, int) or min_calls < 1:
        raise ValueError(f"min_calls must be a positive int, not {min_calls!r}")

    def verdict(decision: Decision, reason: str, detail: str, **figures: float | None) -> Verdict:
        return Verdict(decision, reason, detail, baseline, candidate, **figures)

    if baseline.calls < min_calls or candidate.calls < min_calls:
        return verdict(
            "inconclusive",
            "min_calls",
            f"{candidate.calls} candidate and {baseline.calls} baseline calls; "
            f"{min_calls} each are needed",
        )
    error_p = error_rate_p_value(baseline.calls, baseline.errors, candidate.calls, candidate.errors)
    excess = candidate.error_rate - baseline.error_rate
    rates = (
        f"errors {candidate.errors}/{candidate.calls} ({candidate.error_rate:.2%}) against "
        f"{baseline.errors}/{baseline.calls} ({baseline.error_rate:.2%})"
    )
    if error_p < alpha and excess >= min_error_diff:
        return verdict("fail", "error_rate", f"{rates}, p={error_p:.2g}", error_p_value=error_p)
    if min_success is not None and 1 - candidate.error_rate < min_success:
        floor_p = _binomial_upper_tail(candidate.calls, candidate.errors, 1 - min_success)
        if floor_p < alpha:
            return verdict(
                "fail",
                "success_rate",
                f"{rates}: success below {min_success:.2%} (p={floor_p:.2g})",
                error_p_value=error_p,
            )

    latency_p: float | None = None
    shift: float | None = None
    if baseline.latencies_s and candidate.latencies_s:
        latency_p = mann_whitney_p_value(baseline.latencies_s, candidate.latencies_s)
        base_median = quantile(baseline.latencies_s, 0.5)
        cand_median = quantile(candidate.latencies_s, 0.5)
        shift = cand_median / base_median - 1 if base_median > 0 else None
        rise = cand_median - base_median
        if (
            latency_p < alpha
            and (shift is None or shift > max_median_shift)
            and rise >= min_median_rise_s
        ):
            return verdict(
                "fail",
                "latency",
                f"median latency {cand_median * 1e3:.3g} ms against {base_median * 1e3:.3g} ms"
                f" (p={latency_p:.2g})",
                error_p_value=error_p,
                latency_p_value=latency_p,
                median_shift=shift,
            )
    if max_p99_s is not None and candidate.latencies_s:
        p99 = quantile(candidate.latencies_s, 0.99)
        if p99 > max_p99_s:
            return verdict(
                "fail",
                "latency_p99",
                f"p99 latency {p99 * 1e3:.3g} ms over the bound of {max_p99_s * 1e3:.3g} ms",
                error_p_value=error_p,
                latency_p_value=latency_p,
                median_shift=shift,
            )
    return verdict(
        "pass",
        "",
        rates,
        error_p_value=error_p,
        latency_p_value=latency_p,
        median_shift=shift,
    )


# -- the tests ------------------------------------------------------------------------------------


def error_rate_p_value(
    baseline_calls: int, baseline_errors: int, candidate_calls: int, candidate_errors: int
) -> float:
    """One-sided Fisher exact test: P(candidate errors >= observed | no difference in rate).

    Conditioned on the total errors, the candidate's share is hypergeometric; the p-value is its
    upper tail, summed in log space from the observed count up (the terms fall off quickly past
    the mode, so the sum stops once they no longer change it).
    """
    for name, value in (
        ("baseline_calls", baseline_calls),
        ("baseline_errors", baseline_errors),
        ("candidate_calls", candidate_calls),
        ("candidate_errors", candidate_errors),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, not {value!r}")
    if baseline_errors > baseline_calls or candidate_errors > candidate_calls:
        raise ValueError("errors cannot exceed calls")
    total = baseline_calls + candidate_calls
    errors = baseline_errors + candidate_errors
    if total == 0 or errors == 0:
        return 1.0
    top = min(errors, candidate_calls)
    log_all = _log_choose(total, candidate_calls)

    def log_term(k: int) -> float:
        return _log_choose(errors, k) + _log_choose(total - errors, candidate_calls - k) - log_all

    mode = (candidate_calls + 1) * (errors + 1) // (total + 2)
    p = 0.0
    for k in range(candidate_errors, top + 1):
        term = math.exp(log_term(k))
        p += term
        if k > mode and term < p * 1e-17:
            break
    return min(1.0, p)


def mann_whitney_p_value(baseline: Sequence[float], candidate: Sequence[float]) -> float:
    """One-sided Mann-Whitney U: P(a U this large | the candidate is not slower).

    Normal approximation with the tie correction and a continuity correction (the arms here hold
    tens to thousands of samples, where it is accurate to well within the 0.01 level used).
    """
    n1, n2 = len(candidate), len(baseline)
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = sorted([(x, 1) for x in candidate] + [(x, 0) for x in baseline])
    n = n1 + n2
    rank_sum = 0.0
    tie_term = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        average_rank = (i + j) / 2 + 1
        rank_sum += average_rank * sum(arm for _, arm in pooled[i : j + 1])
        ties = j - i + 1
        tie_term += ties**3 - ties
        i = j + 1
    u = rank_sum - n1 * (n1 + 1) / 2
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance <= 0:  # every value the same: no evidence either way
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


@dataclass(frozen=True)
class MeanComparison:
    """Welch's comparison of two means: the difference (b - a), its interval and p-value."""

    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    p_value: float  # two-sided
    confidence: float

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - self.confidence


def compare_means(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95
) -> MeanComparison:
    """Welch's t-test of ``mean(b) - mean(a)``: interval at ``confidence`` and two-sided p-value.

    Raises:
        ValueError: fewer than two values in an arm, or a confidence outside (0, 1).
    """
    _check_fraction("confidence", confidence, open_low=True, open_high=True)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("each arm needs at least two values")
    mean_a, mean_b = math.fsum(a) / len(a), math.fsum(b) / len(b)
    var_a = math.fsum((x - mean_a) ** 2 for x in a) / (len(a) - 1)
    var_b = math.fsum((x - mean_b) ** 2 for x in b) / (len(b) - 1)
    se_a, se_b = var_a / len(a), var_b / len(b)
    difference = mean_b - mean_a
    se = math.sqrt(se_a + se_b)
    if se == 0:
        p = 1.0 if difference == 0 else 0.0
        return MeanComparison(mean_a, mean_b, difference, difference, difference, p, confidence)
    df = (se_a + se_b) ** 2 / (se_a**2 / (len(a) - 1) + se_b**2 / (len(b) - 1))
    t = difference / se
    p = _t_two_sided_p(abs(t), df)
    half = _t_quantile(1 - (1 - confidence) / 2, df) * se
    return MeanComparison(
        mean_a, mean_b, difference, difference - half, difference + half, p, confidence
    )


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    _check_fraction("q", q)
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# -- special functions ----------------------------------------------------------------------------


def _binomial_upper_tail(n: int, k: int, rate: float) -> float:
    """P(X >= k) for X ~ Binomial(n, rate), summed in log space from k up."""
    if k <= 0:
        return 1.0
    if rate <= 0:
        return 0.0
    if rate >= 1:
        return 1.0
    log_rate, log_rest = math.log(rate), math.log1p(-rate)
    mode = int((n + 1) * rate)
    p = 0.0
    for i in range(k, n + 1):
        term = math.exp(_log_choose(n, i) + i * log_rate + (n - i) * log_rest)
        p += term
        if i > mode and term < p * 1e-17:
            break
    return min(1.0, p)


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= t) for Student's t with ``df`` degrees of freedom: I_x(df/2, 1/2), x=df/(df+t²)."""
    return _regularized_beta(df / (df + t * t), df / 2, 0.5)


def _t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t: Newton's method on the distribution function.

    It starts from the normal quantile corrected by the first terms of the Cornish-Fisher
    expansion, which is within a few percent for df >= 3, so a handful of steps reach full
    precision; bisection keeps a step that would leave the bracket [0, 2x] from diverging.
    """
    z = statistics.NormalDist().inv_cdf(p)
    x = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    low, high = 0.0, max(2 * x, 1.0)
    while 1 - _t_two_sided_p(high, df) / 2 < p:
        high *= 2
    for _ in range(60):
        excess = (1 - _t_two_sided_p(x, df) / 2) - p  # F(x) - p
        density = math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))
        step = excess / density
        if abs(step) <= 1e-13 * max(1.0, x):
            return x - step
        if excess > 0:
            high = x
        else:
            low = x
        x = x - step if low < x - step < high else (low + high) / 2
    return x


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by the continued fraction of Numerical Recipes (modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1 - math.exp(log_front) * _beta_fraction(1 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _check_fraction(
    name: str, value: float, *, open_low: bool = False, open_high: bool = False
) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if open_low else value >= 0)
        and (value < 1 if open_high else value <= 1)
    )
    if not ok:
        raise ValueError(
            f"{name} must be a number in the range {'(' if open_low else '['}0, 1"
            f"{')' if open_high else ']'}, not {value!r}"
        )
