"""Rollout logic on a real database: sticky assignment, the latency and outcome rules of the rollback,
and the automatic ramp."""

import pytest

from loragate.database import write_session
from loragate.settings import AliasPolicy
from loragate.gateway.errors import GatewayError
from loragate.gateway.models import Feedback, MeterRecord
from loragate.gateway.outcomes import FeedbackRequest, FeedbackService
from loragate.gateway.rollouts import CANDIDATE, PRODUCTION, Ramp, RolloutService, Thresholds, assign_arm

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


def _service(registry, adapter_factory) -> RolloutService:
    """s@1 in production and s@2 registered."""
    for _ in range(2):
        registry.register("s", adapter_factory(), base=BASE_ID)
    registry.promote("s@1", force=True, reason="test")
    return RolloutService(registry)


@pytest.fixture
def rollout(registry, adapter_factory):
    service = _service(registry, adapter_factory)
    return service, service.start("s", 2, 50, Thresholds(min_requests=10, max_error_rate=0.5, max_latency_ratio=1.5))


def _meter(registry, rollout, arm, version, latencies, status=200, *, tpot_ms=10.0, queue_ms=0.0, batch=1.0,
           output_ok=None):
    """Requests of 31 output tokens: ``latency = queue + first token + 30 * tpot``, run at ``batch``;
    ``output_ok``: each request's output check result, if the version declares one."""
    checks = output_ok or [None] * len(latencies)
    with write_session(registry.engine) as session:
        session.add_all([MeterRecord(request_id=f"{arm}-{i}", model="s", adapter="s", version=version, arm=arm,
                                     rollout_id=rollout.id, backend="llamacpp", latency_ms=ms, status=status,
                                     ttft_ms=ms - 30 * tpot_ms, queue_ms=queue_ms, tpot_ms=tpot_ms, batch=batch,
                                     completion_tokens=31, cost_usd=0.001, output_ok=ok)
                         for i, (ms, ok) in enumerate(zip(latencies, checks, strict=True))])


def test_slow_candidate_is_rolled_back_on_time_per_output_token(registry, rollout):
    service, started = rollout
    _meter(registry, started, PRODUCTION, 1, [400.0] * 20, tpot_ms=10.0)
    _meter(registry, started, CANDIDATE, 2, [700.0] * 9, tpot_ms=20.0)
    assert service.check(started) is None  # below min_requests nothing happens
    _meter(registry, started, CANDIDATE, 2, [700.0] * 11, tpot_ms=20.0)
    reason = service.check(started)
    assert reason and "time per output token" in reason and "1.5x" in reason
    status = service.status("s")
    assert status.status == "rolled_back" and service.active("s") is None
    assert status.arms[1].cost_per_1k_usd == pytest.approx(1.0)
    assert registry.audit_log(target="s")[-1].action == "rollout.rolled_back"


def test_a_minority_arm_that_queues_longer_is_not_rolled_back(registry, rollout):
    """A 5% arm on a busy engine waits for its adapter's turn: its end-to-end p95 is far over 1.5x
    production's, but at equal batch sizes it generates as fast, and that is what is compared."""
    service, started = rollout
    _meter(registry, started, PRODUCTION, 1, [400.0] * 40, tpot_ms=10.0, queue_ms=20.0)
    _meter(registry, started, CANDIDATE, 2, [1100.0] * 20, tpot_ms=10.5, queue_ms=700.0)
    assert service.check(started) is None
    status = service.status("s")
    production, candidate = status.arms
    assert candidate.p95_ms > 2 * production.p95_ms and candidate.queue_p50_ms == 700.0
    assert status.latency_ratio == pytest.approx(1.05) and service.active("s") is not None


def test_latency_is_compared_at_equal_batch_sizes(registry, rollout):
    """Production runs mostly four at a time (25 ms a token), the minority candidate mostly alone
    (11 ms a token). Raw medians would call the candidate fast; a slow one is caught at equal batches,
    and until the arms share a batch size there is no latency verdict."""
    service, started = rollout
    _meter(registry, started, PRODUCTION, 1, [800.0] * 30, tpot_ms=25.0, batch=3.8)
    _meter(registry, started, CANDIDATE, 2, [400.0] * 20, tpot_ms=11.0, batch=1.2)
    assert service.status("s").latency_ratio is None and service.check(started) is None
    _meter(registry, started, PRODUCTION, 1, [350.0] * 5, tpot_ms=5.0, batch=1.0)
    status = service.status("s")
    assert status.latency_ratio == pytest.approx(2.2) and status.arms[1].tpot_p50_ms < status.arms[0].tpot_p50_ms
    reason = service.check(started)
    assert reason and "2.20x" in reason and service.status("s").status == "rolled_back"


def test_healthy_candidate_stays_and_promotion_goes_through_the_gate(registry, rollout):
    service, started = rollout
    _meter(registry, started, PRODUCTION, 1, [100.0] * 20)
    _meter(registry, started, CANDIDATE, 2, [110.0] * 20)
    assert service.check(started) is None
    from loragate.registry import GateRefused

    with pytest.raises(GateRefused):  # no scores: the registry's gate applies to rollouts too
        service.promote("s")
    assert service.active("s") is not None


def _outcomes(registry, rollout, arm, version, successes: int, failures: int, prefix: str = "") -> None:
    """Feedback on requests of ``arm``: this many successes and failures (each on a request of its own)."""
    with write_session(registry.engine) as session:
        for i, ok in enumerate([1.0] * successes + [0.0] * failures):
            session.add(Feedback(request_id=f"{prefix}{arm}-{i}", kind="success", value=ok, adapter="s",
                                 version=version, arm=arm, rollout_id=rollout.id))


def test_a_candidate_that_answers_worse_is_rolled_back_without_any_http_error(registry, rollout):
    service, started = rollout
    _meter(registry, started, PRODUCTION, 1, [400.0] * 300)
    _meter(registry, started, CANDIDATE, 2, [400.0] * 300)
    _outcomes(registry, started, PRODUCTION, 1, 270, 30)  # 90%
    _outcomes(registry, started, CANDIDATE, 2, 225, 75)  # 75%: -15 points
    status = service.status("s")
    assert status.arms[1].success_n == 300 and status.success_diff.estimate == pytest.approx(-0.15)
    assert status.success_diff.high < -0.02 and status.arms[1].error_rate == 0
    reason = service.check(started)
    assert reason and "success rate" in reason and "-15.0 points" in reason
    assert service.status("s").status == "rolled_back"


def test_answers_that_fail_the_output_check_roll_back_with_no_feedback_at_all(registry, rollout):
    """The versions declare their labels; the gateway checked every answer: 98% of production's
    were a label, 80% of the candidate's."""
    service, started = rollout
    _meter(registry, started, PRODUCTION, 1, [400.0] * 300, output_ok=[1.0] * 294 + [0.0] * 6)
    _meter(registry, started, CANDIDATE, 2, [400.0] * 100, output_ok=[1.0] * 80 + [0.0] * 20)
    status = service.status("s")
    assert (status.arms[0].output_checked, status.arms[1].output_checked) == (300, 100)
    assert status.output_ok_diff.estimate == pytest.approx(-0.18) and status.success_diff is None
    reason = service.check(started)
    assert reason and "output check pass rate -18.0 points" in reason and "after 100 outcomes" in reason


def test_a_drop_on_few_outcomes_is_not_a_verdict(registry, rollout):
    service, started = rollout
    _outcomes(registry, started, PRODUCTION, 1, 54, 6)
    _outcomes(registry, started, CANDIDATE, 2, 45, 15)  # -15 points, but 60 outcomes a side: could be noise
    assert service.check(started) is None and service.status("s").status == "active"


@pytest.fixture
def ramping(registry, adapter_factory):
    service = _service(registry, adapter_factory)
    return service, service.start("s", 2, 0, Thresholds(min_requests=20), Ramp([10, 50, 100], step_min_requests=30))


def test_the_ramp_steps_on_evidence_holds_without_it_and_promotes_through_the_gate(registry, ramping):
    service, started = ramping
    assert started.weight == 10
    _meter(registry, started, PRODUCTION, 1, [400.0] * 200)
    _meter(registry, started, CANDIDATE, 2, [400.0] * 40)
    assert service.check(started) is None  # no outcomes yet, and 40 requests do not show 5% errors unlikely
    _outcomes(registry, started, PRODUCTION, 1, 160, 40)  # 80%
    _outcomes(registry, started, CANDIDATE, 2, 36, 4)  # 90%, but only 40 outcomes: not yet shown not worse
    assert service.check(started) is None and service.active("s").weight == 10
    _outcomes(registry, started, CANDIDATE, 2, 190, 10, prefix="more-")  # 230 outcomes, 91%
    reason = service.check(started)
    assert reason.startswith("ramp 10% -> 50%") and "success rate" in reason
    stale = started  # another replica still holding the old weight does not step again
    assert service.check(stale) is None and service.active("s").weight == 50
    step = [e for e in registry.audit_log(target="s") if e.action == "rollout.step"][0]
    assert step.after["weight"] == 50 and step.after["figures"]["candidate_requests_at_step"] == 40

    at_50 = service.active("s")
    assert service.check(at_50) is None  # a new step needs new candidate requests
    _meter(registry, at_50, CANDIDATE, 2, [400.0] * 30)
    assert service.check(at_50).startswith("ramp 50% -> 100%")
    at_100 = service.active("s")
    _meter(registry, at_100, CANDIDATE, 2, [400.0] * 30)
    assert service.check(at_100) is None  # the gate refuses s@2 (no eval scores): it holds at 100%
    assert service.active("s").weight == 100
    registry.settings.gate.aliases = []  # a team that does not gate production
    _meter(registry, at_100, PRODUCTION, 1, [400.0] * 100, output_ok=[1.0] * 100)
    _meter(registry, at_100, CANDIDATE, 2, [400.0] * 100, output_ok=[1.0] * 96 + [0.0] * 4)
    # Feedback shows it not worse; the output check, now declared, does not yet: every kind must.
    assert service.check(service.active("s")) is None and service.active("s") is not None
    _meter(registry, at_100, PRODUCTION, 1, [400.0] * 900, output_ok=[1.0] * 900)
    _meter(registry, at_100, CANDIDATE, 2, [400.0] * 900, output_ok=[1.0] * 900)
    registry.settings.gate.protected_aliases = {"production": AliasPolicy(rollouts=False)}  # a person promotes
    assert service.check(service.active("s")) is None and registry.get("s@production").version == 1
    assert not [e for e in registry.audit_log(target="s@production") if e.outcome == "refused"]  # asked, not tried
    registry.settings.gate.protected_aliases = {}
    assert service.check(service.active("s")).startswith("ramp complete at 100%")
    assert registry.get("s@production").version == 2 and service.status("s").status == "promoted"


def test_feedback_comes_from_the_requests_key_or_an_admin_and_is_kept_once_per_kind(registry, rollout):
    service, started = rollout
    with write_session(registry.engine) as session:
        session.add(MeterRecord(request_id="r1", model="s", adapter="s", version=2, arm=CANDIDATE, key_id="lg_a",
                                rollout_id=started.id, backend="llamacpp", latency_ms=5, status=200))
    outcomes = FeedbackService(registry)
    with pytest.raises(GatewayError) as refused:
        outcomes.record(FeedbackRequest(request_id="r1", success=True), key_id="lg_b", admin=False)
    assert refused.value.status == 403
    with pytest.raises(GatewayError) as unknown:
        outcomes.record(FeedbackRequest(request_id="r2", success=True), key_id="lg_a", admin=False)
    assert unknown.value.status == 404
    for _ in range(2):  # a retried call changes nothing
        receipt = outcomes.record(FeedbackRequest(request_id="r1", success=True, score=0.5), key_id="lg_a",
                                  admin=False)
    outcomes.record(FeedbackRequest(request_id="r1", success=False), key_id="lg_admin", admin=True)
    assert (receipt.arm, receipt.version, receipt.rollout_id) == (CANDIDATE, 2, started.id)
    rows = {f.kind: f.value for f in outcomes.of_rollout(started.id)}
    assert rows == {"success": 0.0, "score": 0.5}
    assert service.status("s").arms[1].success_n == 1
