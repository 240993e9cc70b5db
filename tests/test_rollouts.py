"""Rollout logic on a real database: sticky assignment, and the latency rule of the rollback."""

import pytest

from loragate.database import write_session
from loragate.gateway.models import MeterRecord
from loragate.gateway.rollouts import CANDIDATE, PRODUCTION, RolloutService, Thresholds, assign_arm

from .conftest import BASE_ID


def test_assignment_is_sticky_near_its_weight_and_monotonic():
    users = [f"user-{n}" for n in range(10_000)]
    at_10 = {u for u in users if assign_arm(7, u, 10) == CANDIDATE}
    at_30 = {u for u in users if assign_arm(7, u, 30) == CANDIDATE}
    assert 0.09 < len(at_10) / len(users) < 0.11 and 0.28 < len(at_30) / len(users) < 0.32
    assert at_10 <= at_30  # raising the weight never moves a user back to production
    assert all(assign_arm(7, u, 30) == (CANDIDATE if u in at_30 else PRODUCTION) for u in users[:500])
    assert {u for u in users if assign_arm(8, u, 10) == CANDIDATE} != at_10  # each rollout re-draws
    assert all(assign_arm(7, u, 0) == PRODUCTION and assign_arm(7, u, 100) == CANDIDATE for u in users[:100])


@pytest.fixture
def rollout(registry, adapter_factory):
    for _ in range(2):
        registry.register("s", adapter_factory(), base=BASE_ID)
    registry.promote("s@1", force=True, reason="test")
    service = RolloutService(registry)
    return service, service.start("s", 2, 50, Thresholds(min_requests=10, max_error_rate=0.5, max_latency_ratio=1.5))


def _meter(registry, rollout, arm, version, latencies, status=200):
    with write_session(registry.engine) as session:
        session.add_all([MeterRecord(request_id=f"{arm}-{i}", model="s", adapter="s", version=version, arm=arm,
                                     rollout_id=rollout.id, backend="llamacpp", latency_ms=ms, status=status,
                                     cost_usd=0.001) for i, ms in enumerate(latencies)])


def test_slow_candidate_is_rolled_back_on_p95(registry, rollout):
    service, started = rollout
    _meter(registry, started, PRODUCTION, 1, [100.0] * 20)
    _meter(registry, started, CANDIDATE, 2, [120.0] * 9)
    assert service.check_rollback(started) is None  # below min_requests nothing happens
    _meter(registry, started, CANDIDATE, 2, [400.0] * 11)
    reason = service.check_rollback(started)
    assert reason and "p95" in reason and "1.5x" in reason
    status = service.status("s")
    assert status.status == "rolled_back" and service.active("s") is None
    assert status.arms[1].cost_per_1k_usd == pytest.approx(1.0)
    assert registry.audit_log(target="s")[-1].action == "rollout.rolled_back"


def test_healthy_candidate_stays_and_promotion_goes_through_the_gate(registry, rollout):
    service, started = rollout
    _meter(registry, started, PRODUCTION, 1, [100.0] * 20)
    _meter(registry, started, CANDIDATE, 2, [110.0] * 20)
    assert service.check_rollback(started) is None
    from loragate.registry import GateRefused

    with pytest.raises(GateRefused):  # no scores: the registry's gate applies to rollouts too
        service.promote("s")
    assert service.active("s") is not None
