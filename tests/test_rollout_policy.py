"""The rollout's decisions, simulated at the level of its statistics: thousands of rollouts in
seconds, each checked as the gateway checks one (after every meter batch), through the same
``guardrail_failure``, ``shown_not_worse`` and ``latency_ratio`` the gateway calls. Rates of false
rollbacks, detection delays and ramps are properties of many runs, so they are proven here; the
end-to-end pass through a real gateway (``test_ab_simulation.py``) shows the wiring.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace

from loragate.gateway import sequential
from loragate.gateway.models import Rollout
from loragate.gateway.rollouts import (
    ArmStats,
    Comparison,
    RolloutStatus,
    guardrail_failure,
    latency_ratio,
    shown_not_worse,
)

BATCH = 10  # requests per arm between two checks, as a meter batch of a 50/50 split brings them


@dataclass
class Arm:
    requests: int = 0
    successes: int = 0
    tpot_ms: list | None = None  # meter records' time per output token, when latency is simulated


def _arm(arm: str, version: int, counts: Arm, outcomes: bool) -> ArmStats:
    """The fields the decisions read; the rest as an arm with no errors, scores or output checks."""
    return ArmStats.model_construct(
        arm=arm, version=version, requests=counts.requests, errors=0, error_rate=0.0, p50_ms=None, p95_ms=None,
        ttft_p50_ms=None, queue_p50_ms=None, tpot_p50_ms=None, cost_per_1k_usd=0.0,
        success_n=counts.requests if outcomes else 0, success_rate=None, score_n=0, mean_score=None, labels={},
        output_checked=0, output_ok_rate=None)


def status_of(rollout: Rollout, production: Arm, candidate: Arm, *, outcomes: bool) -> RolloutStatus:
    """What ``RolloutService._status`` computes from meter records and feedback, from the counts."""
    arms = [_arm("production", 1, production, outcomes), _arm("candidate", 2, candidate, outcomes)]
    success = sequential.rate_difference(candidate.successes, candidate.requests, production.successes,
                                         production.requests, rollout.alpha) if outcomes else None
    latency = None
    if candidate.tpot_ms is not None:
        records = [[SimpleNamespace(tpot_ms=t, status=200, batch=1) for t in arm.tpot_ms] for arm in (candidate, production)]
        latency = latency_ratio(records[0], records[1], rollout.alpha)
    return RolloutStatus.model_construct(
        id=1, adapter="support", status="active", weight=rollout.weight, started_at=None, ended_at=None,
        end_reason=None, arms=arms, latency_ratio=latency.estimate if latency else None,
        latency_ratio_interval=latency, success_diff=Comparison.of(success), score_diff=None, output_ok_diff=None,
        error_rate_diff=None, cost_per_1k_diff_usd=None, ramp=rollout.ramp, mode="split", shadow=None)


@dataclass
class Run:
    end: str  # rolled_back | promoted | active
    weight: float
    requests_per_arm: int


def simulate(rng: random.Random, rollout: Rollout, production_rate: float, candidate_rate: float, *,
             budget_per_arm: int, slowdown: float | None = None) -> Run:
    """One rollout: outcomes (and, with ``slowdown``, times per token) drawn per request, checked
    after every batch; a ramp step once the candidate had ``step_min_requests`` at its weight and is
    shown not worse; past the last step it is promoted."""
    production, candidate = Arm(), Arm()
    if slowdown is not None:
        production.tpot_ms, candidate.tpot_ms = [], []
    at_step = 0
    while production.requests < budget_per_arm:
        for arm, rate, factor in ((production, production_rate, 1.0), (candidate, candidate_rate, slowdown)):
            arm.requests += BATCH
            arm.successes += sum(rng.random() < rate for _ in range(BATCH))
            if arm.tpot_ms is not None:  # engine noise: log-normal around 20 ms a token
                arm.tpot_ms += [20 * factor * rng.lognormvariate(0, 0.25) for _ in range(BATCH)]
        at_step += BATCH
        status = status_of(rollout, production, candidate, outcomes=slowdown is None)
        if guardrail_failure(rollout, status) is not None:
            return Run("rolled_back", rollout.weight, production.requests)
        if rollout.ramp and at_step >= rollout.step_min_requests and shown_not_worse(rollout, status):
            later = [w for w in rollout.ramp if w > rollout.weight]
            if not later:
                return Run("promoted", rollout.weight, production.requests)
            rollout.weight, at_step = later[0], 0
    return Run("active", rollout.weight, production.requests)


def runs(seed: int, count: int, production_rate: float, candidate_rate: float, budget_per_arm: int,
         slowdown: float | None = None, **rollout: object) -> list[Run]:
    rng = random.Random(seed)
    return [simulate(rng, Rollout(adapter_name="support", production_version=1, candidate_version=2,
                                  started_by="test", **rollout),
                     production_rate, candidate_rate, budget_per_arm=budget_per_arm, slowdown=slowdown)
            for _ in range(count)]


def _share(found: list[Run], end: str) -> float:
    return sum(r.end == end for r in found) / len(found)


def _median(values: list[int]) -> int:
    return sorted(values)[len(values) // 2]


def test_a_better_version_ramps_to_production_in_nearly_every_run():
    found = runs(1, 1000, 0.80, 0.95, 2000, weight=5, ramp=[5, 25, 50, 100], step_min_requests=30)
    assert _share(found, "promoted") >= 0.99 and _share(found, "rolled_back") == 0
    assert _median([r.requests_per_arm for r in found]) <= 200


def test_equal_versions_are_falsely_rolled_back_at_most_alpha_of_the_time():
    """The strictest margin (any drop), checked after every batch up to 2 000 outcomes per arm."""
    found = runs(2, 600, 0.90, 0.90, 2000, weight=50, max_success_drop=0.0)
    assert _share(found, "rolled_back") <= 0.05


def test_a_version_five_points_worse_is_rolled_back_and_two_points_worse_never_ramps():
    worse5 = runs(3, 400, 0.98, 0.93, 4000, weight=50)
    assert _share(worse5, "rolled_back") >= 0.99
    assert _median([r.requests_per_arm for r in worse5]) <= 1200  # about 800 outcomes per arm
    # At the default margin (2 points) a 2-point drop is not "worse beyond the margin" (rarely rolled
    # back), but it is not shown "not worse" either: the ramp holds at its first step.
    worse2 = runs(4, 1000, 0.98, 0.96, 500, weight=5, ramp=[5, 25, 50, 100], step_min_requests=30)
    assert _share(worse2, "rolled_back") <= 0.05
    assert sum(r.weight == 5 for r in worse2) / len(worse2) >= 0.95


def test_a_slower_version_is_rolled_back_on_time_per_token_and_an_equal_one_is_not():
    slower = runs(5, 500, 1.0, 1.0, 300, slowdown=1.9, weight=50, max_latency_ratio=1.3, min_requests=8)
    assert _share(slower, "rolled_back") == 1.0
    assert _median([r.requests_per_arm for r in slower]) <= 40
    equal = runs(6, 500, 1.0, 1.0, 300, slowdown=1.0, weight=50, max_latency_ratio=1.3, min_requests=8)
    assert _share(equal, "rolled_back") <= 0.05
