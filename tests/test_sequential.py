"""The always-valid intervals behind the rollout guardrails, on simulated traffic with a known truth:
checked after every 10 outcomes, as the gateway checks after every meter batch, false alarms stay
within alpha, and real drops are found."""

import random

from loragate.gateway import sequential

ALPHA, DROP = 0.05, 0.02  # the playbook's defaults: 95% confidence, roll back beyond -2 points


def _first_alarm(rng: random.Random, production: float, candidate: float, per_arm: int) -> int | None:
    """Outcomes per arm when the rollback would fire (the interval entirely below -DROP), or None."""
    succ_c = succ_p = 0
    for n in range(1, per_arm + 1):
        succ_c += rng.random() < candidate
        succ_p += rng.random() < production
        if n % 10 == 0 and n >= 20:
            diff = sequential.rate_difference(succ_c, n, succ_p, n, ALPHA)
            if diff.high < -DROP:
                return n
    return None


def test_false_rollbacks_stay_within_alpha_under_continuous_monitoring():
    rng = random.Random(7)
    runs = 300
    equal = sum(_first_alarm(rng, 0.8, 0.8, 2000) is not None for _ in range(runs))
    at_margin = sum(_first_alarm(rng, 0.8, 0.8 - DROP, 2000) is not None for _ in range(runs))
    assert equal / runs <= 0.01  # the arms are equal: essentially never
    assert at_margin / runs <= ALPHA  # exactly at the margin: at most alpha, however often we look


def test_real_drops_are_found_and_the_bigger_the_sooner():
    rng = random.Random(11)
    ten = [_first_alarm(rng, 0.8, 0.70, 4000) for _ in range(50)]
    five = [_first_alarm(rng, 0.8, 0.75, 8000) for _ in range(50)]
    assert all(n is not None for n in ten) and sum(n is not None for n in five) >= 45
    median = sorted(n for n in ten if n)[len(ten) // 2]
    assert median < sorted(n for n in five if n)[len(five) // 2]


def test_intervals_cover_the_truth_at_every_look():
    """Always valid: the share of runs whose interval ever excludes the true difference is <= alpha."""
    rng = random.Random(3)
    missed = 0
    for _ in range(200):
        succ_c = succ_p = 0
        for n in range(1, 1001):
            succ_c += rng.random() < 0.6
            succ_p += rng.random() < 0.5
            if n % 10 == 0:
                diff = sequential.rate_difference(succ_c, n, succ_p, n, ALPHA)
                if not diff.low <= 0.1 <= diff.high:
                    missed += 1
                    break
    assert missed / 200 <= ALPHA


def test_an_error_rate_of_every_request_is_certain_soon_and_one_error_is_not():
    assert sequential.rate(20, 20, ALPHA).low > 0.5
    assert sequential.rate(1, 20, ALPHA).low < 0.05 < sequential.rate(1, 20, ALPHA).high


def _latency_alarm(rng: random.Random, slowdown: float, per_arm: int, margin: float = 1.5) -> int | None:
    """Requests per arm when the latency rollback would fire: times per token log-normal (30%
    spread), half of each arm's requests at batch 1 and half at batch 4 (2.5x slower per token)."""
    strata = {1: ([], []), 4: ([], [])}
    for n in range(1, per_arm + 1):
        batch = 1 if n % 2 else 4
        speed = 10.0 * (2.5 if batch == 4 else 1.0)
        strata[batch][0].append(speed * slowdown * rng.lognormvariate(0, 0.3))
        strata[batch][1].append(speed * rng.lognormvariate(0, 0.3))
        if n % 10 == 0:
            ratio = sequential.stratified_ratio(list(strata.values()), ALPHA)
            if ratio.low > margin:
                return n
    return None


def test_latency_ratio_rollbacks_are_rare_at_the_margin_and_quick_beyond_it():
    rng = random.Random(5)
    at_margin = sum(_latency_alarm(rng, 1.5, 1000) is not None for _ in range(200))
    assert at_margin / 200 <= ALPHA
    slower = [_latency_alarm(rng, 2.0, 1000) for _ in range(50)]
    assert all(n is not None for n in slower) and sorted(slower)[25] <= 100
    ratio = sequential.stratified_ratio([([20.0, 22.0, 21.0], [10.0, 11.0, 10.5])], ALPHA)
    assert 1.9 < ratio.estimate < 2.1 and ratio.low < ratio.estimate < ratio.high
