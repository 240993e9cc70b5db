"""Always-valid intervals for comparing a rollout's arms: safe to look at after every request.

The gateway checks a rollout each time it writes a batch of meter records or gets feedback, so a
fixed-sample test (a t-test at 95%) would be checked hundreds of times and raise false alarms far
more often than 5%. This is the mixture sequential probability ratio test (mSPRT) of Johari,
Koomen, Pekelis and Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests"
(Operations Research, 2022), the test behind Optimizely's Stats Engine. For an estimate ``d`` of
a difference with (estimated) variance ``V`` and a normal mixture of alternatives with spread
``tau``, the statistic

    L(theta) = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta)^2 / (2 V (V + tau^2)))

exceeds 1/alpha at *any* time with probability at most alpha when the true difference is theta,
however often it is looked at. The thetas it has not rejected form the interval

    d +- sqrt(2 V (V + tau^2) / tau^2 * log(sqrt((V + tau^2) / V) / alpha)),

which holds for all sample sizes at once with probability 1 - alpha. ``tau`` tunes which effect
sizes are seen soonest; 0.05 suits differences of a few points in a success rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TAU = 0.05
LOG_RATIO_TAU = 0.3  # for ratios compared on the log scale: a 1.5x slowdown is log 1.5 = 0.41


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def always_valid(estimate: float, variance: float, alpha: float, tau: float = TAU) -> Interval:
    variance = max(variance, 1e-12)
    tau2 = tau * tau
    half = math.sqrt(2 * variance * (variance + tau2) / tau2 * math.log(math.sqrt((variance + tau2) / variance) / alpha))
    return Interval(estimate, estimate - half, estimate + half)


def _rate(successes: int, n: int) -> tuple[float, float]:
    """The observed rate, and the rate used for its variance: pulled off 0 and 1 (add one half of
    a success and of a failure) so that 20 errors out of 20 still have some uncertainty."""
    return successes / n, (successes + 0.5) / (n + 1)


def rate(successes: int, n: int, alpha: float) -> Interval | None:
    """One arm's rate (an error rate, a success rate)."""
    if n == 0:
        return None
    observed, smoothed = _rate(successes, n)
    interval = always_valid(observed, smoothed * (1 - smoothed) / n, alpha)
    return Interval(observed, max(interval.low, 0.0), min(interval.high, 1.0))  # a rate lies in [0, 1]


def rate_difference(successes_a: int, n_a: int, successes_b: int, n_b: int, alpha: float) -> Interval | None:
    """Rate of A minus rate of B."""
    if n_a == 0 or n_b == 0:
        return None
    (a, sa), (b, sb) = _rate(successes_a, n_a), _rate(successes_b, n_b)
    return always_valid(a - b, sa * (1 - sa) / n_a + sb * (1 - sb) / n_b, alpha)


def _mean_and_variance(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def mean_difference(a: list[float], b: list[float], alpha: float) -> Interval | None:
    """Mean of A minus mean of B (scores in [0, 1])."""
    if len(a) < 2 or len(b) < 2:
        return None
    (ma, va), (mb, vb) = _mean_and_variance(a), _mean_and_variance(b)
    return always_valid(ma - mb, va / len(a) + vb / len(b), alpha)


def stratified_ratio(strata: list[tuple[list[float], list[float]]], alpha: float) -> Interval | None:
    """A over B for positive values (times) compared within strata: in each stratum the difference of
    mean logs, averaged over strata weighted by the smaller count; the interval is taken on the log
    scale and returned as ratios. Strata need two values a side."""
    strata = [(a, b) for a, b in strata if len(a) >= 2 and len(b) >= 2]
    if not strata:
        return None
    weights = [min(len(a), len(b)) for a, b in strata]
    total = sum(weights)
    estimate = variance = 0.0
    for weight, (a, b) in zip(weights, strata):
        (ma, va), (mb, vb) = _mean_and_variance([math.log(x) for x in a]), _mean_and_variance([math.log(x) for x in b])
        estimate += weight / total * (ma - mb)
        variance += (weight / total) ** 2 * (va / len(a) + vb / len(b))
    log_interval = always_valid(estimate, variance, alpha, tau=LOG_RATIO_TAU)
    return Interval(math.exp(log_interval.estimate), math.exp(log_interval.low), math.exp(log_interval.high))
