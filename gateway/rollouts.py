"""A/B rollouts: a split between production and a candidate, sticky per user, with stats per arm
and an automatic rollback when the candidate misbehaves. State lives in the shared database, so
every gateway replica routes the same user to the same arm.

The rollback compares the arms' latency like for like: on *time per output token* (after the
first), between requests that ran at the same engine batch size. End-to-end latency would mostly
measure traffic share: a 5% arm on a busy engine waits for its adapter's turn (queueing), then
decodes with few other sequences (a batch of one decodes each token faster than a batch of four).
Neither says anything about the version. So each arm's requests are grouped by the batch size they
ran at (rounded), the candidate/production ratio of median time per output token is taken in every
group with ``MIN_PER_BATCH`` requests of each arm, and the ratios are averaged (geometric mean,
weighted by the smaller count). Until some group has both arms, there is no latency verdict.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel
from sqlmodel import col, select

from loragate.database import read_session, write_session
from loragate.registry import Conflict, InvalidInput, NotFound, Registry, VersionRef

from .models import MeterRecord, Rollout, utcnow

PRODUCTION, CANDIDATE = "production", "candidate"
MIN_PER_BATCH = 3  # requests of each arm at one batch size before that size is compared


def assign_arm(rollout_id: int, user_key: str, weight: float) -> str:
    """Sticky: a user's bucket depends only on the rollout and the user, so raising the weight
    moves users to the candidate but never back."""
    digest = hashlib.sha256(f"{rollout_id}:{user_key}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64 * 100
    return CANDIDATE if bucket < weight else PRODUCTION


class ArmStats(BaseModel):
    arm: str
    version: int
    requests: int
    errors: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    ttft_p50_ms: float | None
    queue_p50_ms: float | None  # waiting for an engine slot, part of the time to first token
    tpot_p50_ms: float | None  # time per output token after the first: what the rollback compares
    cost_per_1k_usd: float


class RolloutStatus(BaseModel):
    id: int
    adapter: str
    status: str
    weight: float
    started_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    arms: list[ArmStats]
    # Candidate over production time per output token at equal batch sizes; None until comparable.
    latency_ratio: float | None = None


def latency_ratio(candidate: list[MeterRecord], production: list[MeterRecord]) -> float | None:
    """Candidate over production median time per output token, like for like (see the module doc)."""
    def by_batch(records: list[MeterRecord]) -> dict[int, list[float]]:
        groups: dict[int, list[float]] = defaultdict(list)
        for r in records:
            if r.tpot_ms is not None and r.status == 200:
                groups[max(1, round(r.batch or 1))].append(r.tpot_ms)
        return groups

    ours, theirs = by_batch(candidate), by_batch(production)
    weighted = [(min(len(ours[b]), len(theirs[b])), math.log(percentile(ours[b], 50) / percentile(theirs[b], 50)))
                for b in ours.keys() & theirs.keys() if min(len(ours[b]), len(theirs[b])) >= MIN_PER_BATCH]
    if not weighted:
        return None
    return math.exp(sum(w * log for w, log in weighted) / sum(w for w, _ in weighted))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def arm_stats(arm: str, version: int, records: list[MeterRecord]) -> ArmStats:
    errors = sum(1 for r in records if r.status >= 500)
    latencies = [r.latency_ms for r in records]

    def median(field: str) -> float | None:
        return percentile([v for r in records if (v := getattr(r, field)) is not None], 50)

    return ArmStats(
        arm=arm, version=version, requests=len(records), errors=errors,
        error_rate=errors / len(records) if records else 0.0,
        p50_ms=percentile(latencies, 50), p95_ms=percentile(latencies, 95), ttft_p50_ms=median("ttft_ms"),
        queue_p50_ms=median("queue_ms"), tpot_p50_ms=median("tpot_ms"),
        cost_per_1k_usd=1000 * sum(r.cost_usd for r in records) / len(records) if records else 0.0,
    )


@dataclass(frozen=True)
class Thresholds:
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_latency_ratio: float = 1.5


class RolloutService:
    def __init__(self, registry: Registry):
        self.registry = registry

    def active(self, adapter: str) -> Rollout | None:
        with read_session(self.registry.engine) as session:
            return session.exec(select(Rollout).where(Rollout.adapter_name == adapter, Rollout.status == "active")).first()

    def all_active(self) -> list[Rollout]:
        with read_session(self.registry.engine) as session:
            return list(session.exec(select(Rollout).where(Rollout.status == "active")).all())

    def _get(self, session, adapter: str) -> Rollout:  # type: ignore[no-untyped-def]
        rollout = session.exec(
            select(Rollout).where(Rollout.adapter_name == adapter, Rollout.status == "active").with_for_update()
        ).first()
        if rollout is None:
            raise NotFound(f"{adapter} has no active rollout")
        return rollout

    def start(self, adapter: str, candidate: int, weight: float, thresholds: Thresholds = Thresholds()) -> Rollout:
        _check_weight(weight)
        production = self.registry.get(str(VersionRef(name=adapter, alias=PRODUCTION)))
        self.registry.get(f"{adapter}@{candidate}")
        if candidate == production.version:
            raise InvalidInput(f"{adapter}@{candidate} is already production")
        with write_session(self.registry.engine) as session:
            if session.exec(select(Rollout).where(Rollout.adapter_name == adapter, Rollout.status == "active")).first():
                raise Conflict(f"{adapter} already has an active rollout; abort or promote it first")
            rollout = Rollout(adapter_name=adapter, production_version=production.version, candidate_version=candidate,
                              weight=weight, min_requests=thresholds.min_requests,
                              max_error_rate=thresholds.max_error_rate,
                              max_latency_ratio=thresholds.max_latency_ratio, started_by=self.registry.settings.user)
            session.add(rollout)
        self.registry.record_event("rollout.start", f"{adapter}@{CANDIDATE}", after=rollout.model_dump(mode="json"))
        return rollout

    def set_weight(self, adapter: str, weight: float) -> Rollout:
        _check_weight(weight)
        with write_session(self.registry.engine) as session:
            rollout = self._get(session, adapter)
            before = rollout.weight
            rollout.weight = weight
            session.add(rollout)
        self.registry.record_event("rollout.set-weight", adapter, before={"weight": before}, after={"weight": weight})
        return rollout

    def _end(self, adapter: str, status: str, reason: str, outcome: str = "ok") -> Rollout:
        with write_session(self.registry.engine) as session:
            rollout = self._get(session, adapter)
            rollout.status, rollout.ended_at, rollout.end_reason = status, utcnow(), reason
            session.add(rollout)
        self.registry.record_event(f"rollout.{status}", adapter, after={"rollout": rollout.id, "status": status},
                                   reason=reason, outcome=outcome)
        return rollout

    def promote(self, adapter: str, *, reason: str | None = None) -> Rollout:
        """Promote the candidate through the registry's gate, then end the rollout."""
        rollout = self.active(adapter)
        if rollout is None:
            raise NotFound(f"{adapter} has no active rollout")
        self.registry.promote(f"{adapter}@{rollout.candidate_version}", to=PRODUCTION, reason=reason or "rollout")
        return self._end(adapter, "promoted", reason or "candidate promoted")

    def abort(self, adapter: str, *, reason: str | None = None) -> Rollout:
        return self._end(adapter, "aborted", reason or "aborted by hand")

    def _records(self, rollout: Rollout) -> list[MeterRecord]:
        with read_session(self.registry.engine) as session:
            return list(session.exec(select(MeterRecord).where(MeterRecord.rollout_id == rollout.id)
                                     .order_by(col(MeterRecord.id))).all())

    def status(self, adapter: str) -> RolloutStatus:
        with read_session(self.registry.engine) as session:
            rollout = session.exec(select(Rollout).where(Rollout.adapter_name == adapter)
                                   .order_by(col(Rollout.id).desc())).first()
        if rollout is None:
            raise NotFound(f"{adapter} has never had a rollout")
        records = self._records(rollout)
        per_arm = {arm: [r for r in records if r.arm == arm] for arm in (PRODUCTION, CANDIDATE)}
        arms = [arm_stats(arm, version, per_arm[arm])
                for arm, version in ((PRODUCTION, rollout.production_version), (CANDIDATE, rollout.candidate_version))]
        return RolloutStatus(id=rollout.id, adapter=adapter, status=rollout.status, weight=rollout.weight,
                             started_at=rollout.started_at, ended_at=rollout.ended_at, end_reason=rollout.end_reason,
                             arms=arms, latency_ratio=latency_ratio(per_arm[CANDIDATE], per_arm[PRODUCTION]))

    def check_rollback(self, rollout: Rollout) -> str | None:
        """End the rollout when the candidate breaks a threshold; returns the reason if it did."""
        status = self.status(rollout.adapter_name)
        production, candidate = status.arms
        if status.status != "active" or candidate.requests < rollout.min_requests:
            return None
        reason = None
        if candidate.error_rate > rollout.max_error_rate:
            reason = (f"candidate error rate {candidate.error_rate:.1%} over {rollout.max_error_rate:.1%} "
                      f"after {candidate.requests} requests")
        elif (status.latency_ratio is not None and status.latency_ratio > rollout.max_latency_ratio
              and production.requests >= rollout.min_requests):
            reason = (f"candidate time per output token {status.latency_ratio:.2f}x production's at equal batch "
                      f"sizes, over {rollout.max_latency_ratio:g}x")
        if reason is None:
            return None
        try:
            self._end(rollout.adapter_name, "rolled_back", reason, outcome="auto")
        except NotFound:
            return None  # another replica ended it first
        return reason


def _check_weight(weight: float) -> None:
    if not 0 <= weight <= 100:
        raise InvalidInput("weight is a percentage between 0 and 100")
