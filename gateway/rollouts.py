"""A/B rollouts: a split between production and a candidate, sticky per user, with stats per arm
and an automatic rollback when the candidate misbehaves. State lives in the shared database, so
every gateway replica routes the same user to the same arm.

The rollback compares the arms' latency like for like: on *time per output token* (after the
first), between requests that ran at the same engine batch size. End-to-end latency would mostly
measure traffic share: a 5% arm on a busy engine waits for its adapter's turn (queueing), then
decodes with few other sequences (a batch of one decodes each token faster than a batch of four).
Neither says anything about the version. So each arm's requests are grouped by the batch size they
ran at (rounded); in every group with ``MIN_PER_BATCH`` requests of each arm the difference of
mean log time per output token is taken, and these are averaged (weighted by the smaller count):
a candidate/production ratio with an always-valid interval. Until some group has both arms there
is no latency verdict; the rollback needs the whole interval above ``max_latency_ratio``.

Outcomes (``POST /v1/feedback``: success, score, label) are compared with always-valid intervals
(``sequential``), so the checks after every meter batch do not inflate false alarms: the rollback
fires once the candidate's success rate (or mean score) is below production's by more than
``max_success_drop`` at confidence 1 - ``alpha``, or its error rate is above ``max_error_rate`` at
that confidence. With a ``ramp`` the gateway raises the weight one step at a time, once a step has
lasted ``step_min_requests`` candidate requests and ``step_min_minutes`` and the candidate is shown
not worse (success or score no more than ``max_success_drop`` below production, at confidence; with
no outcomes at all, an error rate shown under ``max_error_rate``); after the last step it promotes
through the registry's gate. Every step is audited with the figures behind it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import case, func
from sqlmodel import col, select

from loragate.registry.errors import Forbidden, GateRefused

from loragate.database import read_session, write_session
from loragate.registry import Actor, Conflict, EvalInput, InvalidInput, NotFound, Registry, VersionRef

from . import sequential
from .models import Feedback, MeterRecord, Rollout, ShadowPair, utcnow

PRODUCTION, CANDIDATE, SHADOW = "production", "candidate", "shadow"
SHADOW_SUITE = "shadow"  # the eval suite a shadow's agreement is recorded under when it is promoted
MIN_PER_BATCH = 3  # requests of each arm at one batch size before that size is compared


def assign_arm(rollout_id: int, user_key: str, weight: float) -> str:
    """Sticky: a user's bucket depends only on the rollout and the user, so raising the weight
    moves users to the candidate but never back."""
    digest = hashlib.sha256(f"{rollout_id}:{user_key}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64 * 100
    return CANDIDATE if bucket < weight else PRODUCTION


class Comparison(BaseModel):
    """An estimate with its always-valid interval at the rollout's confidence (see sequential.py)."""

    estimate: float
    low: float
    high: float

    @classmethod
    def of(cls, interval: sequential.Interval | None) -> Comparison | None:
        return None if interval is None else cls(estimate=interval.estimate, low=interval.low, high=interval.high)


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
    # Outcomes sent as feedback: success (with its always-valid interval), mean score, label counts.
    success_n: int = 0
    success_rate: Comparison | None = None
    score_n: int = 0
    mean_score: float | None = None
    labels: dict[str, int] = {}
    # Requests whose answers the gateway checked against the version's output check (no feedback needed).
    output_checked: int = 0
    output_ok_rate: Comparison | None = None


class ShadowStats(BaseModel):
    """A shadow rollout's candidate against production on the same requests (``shadow.py``)."""

    pairs: int  # requests both answered
    dropped: int  # copies dropped because the shadow queue was full
    failed: int  # copies the candidate failed to answer
    exact_agreement: float | None  # share of pairs with equal answers (normalised)
    token_f1: float | None  # mean token overlap of the candidate's answer with production's
    p50_ms: float | None  # the candidate's latency on the copies
    cost_per_1k_usd: float  # what a thousand copies cost (metered as arm shadow, billed to no key)


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
    latency_ratio_interval: Comparison | None = None
    # Candidate minus production, with always-valid intervals; None until both arms have data.
    success_diff: Comparison | None = None
    score_diff: Comparison | None = None
    output_ok_diff: Comparison | None = None
    error_rate_diff: Comparison | None = None
    cost_per_1k_diff_usd: float | None = None
    ramp: list[float] = []
    step_started_at: datetime | None = None
    mode: str = "split"
    shadow: ShadowStats | None = None  # shadow rollouts only


def latency_ratio(candidate: list[MeterRecord], production: list[MeterRecord], alpha: float) -> Comparison | None:
    """Candidate over production time per output token, like for like (see the module doc)."""
    def by_batch(records: list[MeterRecord]) -> dict[int, list[float]]:
        groups: dict[int, list[float]] = defaultdict(list)
        for r in records:
            if r.tpot_ms and r.status == 200:
                groups[max(1, round(r.batch or 1))].append(r.tpot_ms)
        return groups

    ours, theirs = by_batch(candidate), by_batch(production)
    strata = [(ours[b], theirs[b]) for b in sorted(ours.keys() & theirs.keys())
              if min(len(ours[b]), len(theirs[b])) >= MIN_PER_BATCH]
    return Comparison.of(sequential.stratified_ratio(strata, alpha))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def arm_stats(arm: str, version: int, records: list[MeterRecord], outcomes: list[Feedback], alpha: float) -> ArmStats:
    errors = sum(1 for r in records if r.status >= 500)
    successes = [f.value for f in outcomes if f.kind == "success"]
    scores = [f.value for f in outcomes if f.kind == "score"]
    labels: dict[str, int] = defaultdict(int)
    for f in outcomes:
        if f.kind == "label":
            labels[f.label] += 1
    latencies = [r.latency_ms for r in records]
    checked = [r.output_ok for r in records if r.output_ok is not None]

    def median(field: str) -> float | None:
        return percentile([v for r in records if (v := getattr(r, field)) is not None], 50)

    return ArmStats(
        arm=arm, version=version, requests=len(records), errors=errors,
        error_rate=errors / len(records) if records else 0.0,
        p50_ms=percentile(latencies, 50), p95_ms=percentile(latencies, 95), ttft_p50_ms=median("ttft_ms"),
        queue_p50_ms=median("queue_ms"), tpot_p50_ms=median("tpot_ms"),
        cost_per_1k_usd=1000 * sum(r.cost_usd for r in records) / len(records) if records else 0.0,
        success_n=len(successes), success_rate=Comparison.of(sequential.rate(int(sum(successes)), len(successes), alpha)),
        score_n=len(scores), mean_score=sum(scores) / len(scores) if scores else None, labels=dict(labels),
        output_checked=len(checked),
        output_ok_rate=Comparison.of(sequential.rate(round(sum(checked)), len(checked), alpha)),
    )


@dataclass(frozen=True)
class Thresholds:
    min_requests: int = 20  # per arm, of requests and of each outcome kind, before any verdict
    max_error_rate: float = 0.05
    max_latency_ratio: float = 1.5
    max_success_drop: float = 0.02  # success rate (or mean score) points below production, as a fraction
    alpha: float = 0.05  # 1 - confidence of every verdict


@dataclass(frozen=True)
class Ramp:
    steps: list[float]  # weights, the first is where the rollout starts; 100 at the end promotes
    step_min_requests: int = 100
    step_min_minutes: float = 0.0


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

    def start(self, adapter: str, candidate: int, weight: float, thresholds: Thresholds = Thresholds(),
              ramp: Ramp | None = None, *, mode: str = "split") -> Rollout:
        """Split traffic; with a ``ramp`` the weight starts at its first step (``weight`` is ignored).
        ``mode="shadow"``: production answers everyone, the candidate a copy of ``weight``% of requests."""
        if ramp is not None:
            if not ramp.steps or any(b <= a for a, b in zip(ramp.steps, ramp.steps[1:])):
                raise InvalidInput("a ramp is a list of increasing weights, e.g. 5,10,25,50,100")
            weight = ramp.steps[0]
        for step in (ramp.steps if ramp else [weight]):
            _check_weight(step)
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
                              max_latency_ratio=thresholds.max_latency_ratio,
                              max_success_drop=thresholds.max_success_drop, alpha=thresholds.alpha,
                              ramp=ramp.steps if ramp else [],
                              step_min_requests=ramp.step_min_requests if ramp else 0,
                              step_min_minutes=ramp.step_min_minutes if ramp else 0.0,
                              started_by=self.registry.actor.label, mode=mode)
            session.add(rollout)
            session.flush()
            self.registry.audit(session, f"{_kind(rollout)}.start", f"{adapter}@{CANDIDATE}",
                                after=rollout.model_dump(mode="json"))
        return rollout

    def shadow(self, adapter: str, candidate: int, percent: float) -> Rollout:
        """Send a copy of ``percent``% of users' requests to ``candidate``, off the response path."""
        return self.start(adapter, candidate, percent, mode="shadow")

    def set_weight(self, adapter: str, weight: float) -> Rollout:
        _check_weight(weight)
        with write_session(self.registry.engine) as session:
            rollout = self._get(session, adapter)
            before = rollout.weight
            rollout.weight = weight
            session.add(rollout)
            self.registry.audit(session, "rollout.set-weight", adapter, before={"weight": before}, after={"weight": weight})
        return rollout

    def _end(self, adapter: str, status: str, reason: str, outcome: str = "ok") -> Rollout:
        with write_session(self.registry.engine) as session:
            rollout = self._get(session, adapter)
            rollout.status, rollout.ended_at, rollout.end_reason = status, utcnow(), reason
            session.add(rollout)
            self.registry.audit(session, f"{_kind(rollout)}.{status}", adapter,
                                after={"rollout": rollout.id, "status": status}, reason=reason, outcome=outcome)
        return rollout

    def promote(self, adapter: str, *, reason: str | None = None, actor: Actor | None = None) -> Rollout:
        """Promote the candidate through the registry's gate (and production's policy, asked about
        ``actor``: by default the registry's own), then end the rollout."""
        rollout = self.active(adapter)
        if rollout is None:
            raise NotFound(f"{adapter} has no active rollout")
        registry = self.registry.acting_as(actor) if actor else self.registry
        if rollout.mode == "shadow":  # its agreement with production, recorded for the gate to weigh
            self._record_agreement(rollout)
        registry.promote(f"{adapter}@{rollout.candidate_version}", to=PRODUCTION, reason=reason or "rollout")
        return self._end(adapter, "promoted", reason or "candidate promoted")

    def abort(self, adapter: str, *, reason: str | None = None) -> Rollout:
        return self._end(adapter, "aborted", reason or "aborted by hand")

    def _records(self, rollout: Rollout) -> tuple[list[MeterRecord], list[Feedback]]:
        with read_session(self.registry.engine) as session:
            records = list(session.exec(select(MeterRecord).where(MeterRecord.rollout_id == rollout.id)
                                        .order_by(col(MeterRecord.id))).all())
            outcomes = list(session.exec(select(Feedback).where(Feedback.rollout_id == rollout.id)).all())
        return records, outcomes

    def status(self, adapter: str) -> RolloutStatus:
        return self.watch(adapter)[0]

    def latest(self, adapter: str) -> Rollout | None:
        """The adapter's latest rollout, active or ended."""
        with read_session(self.registry.engine) as session:
            return session.exec(select(Rollout).where(Rollout.adapter_name == adapter)
                                .order_by(col(Rollout.id).desc())).first()

    def watch(self, adapter: str) -> tuple[RolloutStatus, Rollout, list[MeterRecord]]:
        """The latest rollout's status, with the rollout and its meter records (the console charts them)."""
        rollout = self.latest(adapter)
        if rollout is None:
            raise NotFound(f"{adapter} has never had a rollout")
        records, outcomes = self._records(rollout)
        return self._status(rollout, records, outcomes), rollout, records

    def shadow_pairs(self, adapter: str, *, limit: int | None = None) -> tuple[Rollout, list[ShadowPair]]:
        """The latest shadow rollout of ``adapter`` and its compared pairs that kept their content."""
        with read_session(self.registry.engine) as session:
            rollout = session.exec(select(Rollout).where(Rollout.adapter_name == adapter, Rollout.mode == "shadow")
                                   .order_by(col(Rollout.id).desc())).first()
            if rollout is None:
                raise NotFound(f"{adapter} has never had a shadow rollout")
            pairs = session.exec(select(ShadowPair).where(
                ShadowPair.rollout_id == rollout.id, ShadowPair.status == "compared",
                col(ShadowPair.prompt).is_not(None)).order_by(col(ShadowPair.id)).limit(limit)).all()
        return rollout, list(pairs)

    def _record_agreement(self, rollout: Rollout) -> None:
        stats = self._shadow_stats(rollout, self._records(rollout)[0])
        if not stats.pairs:
            return
        self.registry.add_eval(EvalInput(
            suite=SHADOW_SUITE, metrics={"agreement_exact": stats.exact_agreement, "agreement_token_f1": stats.token_f1},
            sample_count=stats.pairs), ref=f"{rollout.adapter_name}@{rollout.candidate_version}")

    def _shadow_stats(self, rollout: Rollout, records: list[MeterRecord]) -> ShadowStats:
        # Aggregated in the database: pairs hold whole texts. (PostgreSQL casts no boolean to a float.)
        with read_session(self.registry.engine) as session:
            rows = session.exec(
                select(ShadowPair.status, func.count(), func.avg(case((ShadowPair.exact, 1.0), else_=0.0)),
                       func.avg(ShadowPair.token_f1))
                .where(ShadowPair.rollout_id == rollout.id).group_by(ShadowPair.status)).all()
        by_status = {status: (count, exact, f1) for status, count, exact, f1 in rows}
        pairs, exact, f1 = by_status.get("compared", (0, None, None))
        shadows = [r for r in records if r.arm == SHADOW]
        return ShadowStats(
            pairs=pairs, dropped=by_status.get("dropped", (0,))[0], failed=by_status.get("failed", (0,))[0],
            exact_agreement=exact, token_f1=f1, p50_ms=percentile([r.latency_ms for r in shadows], 50),
            cost_per_1k_usd=1000 * sum(r.cost_usd for r in shadows) / len(shadows) if shadows else 0.0)

    def _status(self, rollout: Rollout, records: list[MeterRecord], outcomes: list[Feedback]) -> RolloutStatus:
        per_arm = {arm: [r for r in records if r.arm == arm] for arm in (PRODUCTION, CANDIDATE)}
        outcomes_of = {arm: [f for f in outcomes if f.arm == arm] for arm in (PRODUCTION, CANDIDATE)}
        arms = [arm_stats(arm, version, per_arm[arm], outcomes_of[arm], rollout.alpha)
                for arm, version in ((PRODUCTION, rollout.production_version), (CANDIDATE, rollout.candidate_version))]
        production, candidate = arms

        def values(arm: str, kind: str) -> list[float]:
            return [f.value for f in outcomes_of[arm] if f.kind == kind]

        success = [values(arm, "success") for arm in (CANDIDATE, PRODUCTION)]
        checked = [[r.output_ok for r in per_arm[arm] if r.output_ok is not None] for arm in (CANDIDATE, PRODUCTION)]
        latency = latency_ratio(per_arm[CANDIDATE], per_arm[PRODUCTION], rollout.alpha)
        return RolloutStatus(
            id=rollout.id, adapter=rollout.adapter_name, status=rollout.status, weight=rollout.weight,
            started_at=rollout.started_at, ended_at=rollout.ended_at, end_reason=rollout.end_reason, arms=arms,
            latency_ratio=latency.estimate if latency else None, latency_ratio_interval=latency,
            success_diff=Comparison.of(sequential.rate_difference(
                int(sum(success[0])), len(success[0]), int(sum(success[1])), len(success[1]), rollout.alpha)),
            score_diff=Comparison.of(sequential.mean_difference(values(CANDIDATE, "score"), values(PRODUCTION, "score"),
                                                                rollout.alpha)),
            output_ok_diff=Comparison.of(sequential.rate_difference(
                round(sum(checked[0])), len(checked[0]), round(sum(checked[1])), len(checked[1]), rollout.alpha)),
            error_rate_diff=Comparison.of(sequential.rate_difference(
                candidate.errors, candidate.requests, production.errors, production.requests, rollout.alpha)),
            cost_per_1k_diff_usd=candidate.cost_per_1k_usd - production.cost_per_1k_usd
            if candidate.requests and production.requests else None,
            ramp=rollout.ramp, step_started_at=rollout.step_started_at, mode=rollout.mode,
            shadow=self._shadow_stats(rollout, records) if rollout.mode == "shadow" else None)

    def check(self, rollout: Rollout) -> str | None:
        """After new meter records or feedback: roll back on a failed guardrail, else take a ramp step
        when it is due. Returns what was done, if anything."""
        records, outcomes = self._records(rollout)
        status = self._status(rollout, records, outcomes)
        if status.status != "active":
            return None
        reason = guardrail_failure(rollout, status)
        if reason is not None:
            try:
                self._end(rollout.adapter_name, "rolled_back", reason, outcome="auto")
            except NotFound:
                return None  # another replica ended it first
            return reason
        if rollout.ramp:
            return self._ramp(rollout, status, records)
        return None

    def _ramp(self, rollout: Rollout, status: RolloutStatus, records: list[MeterRecord]) -> str | None:
        at_step = sum(1 for r in records if r.arm == CANDIDATE and r.created_at.replace(tzinfo=None)
                      >= rollout.step_started_at.replace(tzinfo=None))
        minutes = (utcnow().replace(tzinfo=None) - rollout.step_started_at.replace(tzinfo=None)).total_seconds() / 60
        if at_step < rollout.step_min_requests or minutes < rollout.step_min_minutes:
            return None
        evidence = shown_not_worse(rollout, status)
        if evidence is None:
            return None  # hold: not shown worse (no rollback) but not shown good enough either
        later = [w for w in rollout.ramp if w > rollout.weight]
        figures = {"weight": rollout.weight, "candidate_requests_at_step": at_step, "minutes_at_step": round(minutes, 2),
                   "success_diff": status.success_diff.model_dump() if status.success_diff else None,
                   "score_diff": status.score_diff.model_dump() if status.score_diff else None,
                   "output_ok_diff": status.output_ok_diff.model_dump() if status.output_ok_diff else None,
                   "error_rate_diff": status.error_rate_diff.model_dump() if status.error_rate_diff else None,
                   "latency_ratio": status.latency_ratio_interval.model_dump()
                   if status.latency_ratio_interval else None}
        if not later:
            return self._promote_at_end(rollout, evidence, figures)
        with write_session(self.registry.engine) as session:
            current = self._get(session, rollout.adapter_name)  # locked: one replica steps at a time
            if current.id != rollout.id or current.weight != rollout.weight:
                return None  # another replica took this step
            current.weight, current.step_started_at = later[0], utcnow()
            session.add(current)
            reason = f"ramp {rollout.weight:g}% -> {later[0]:g}%: {evidence}"
            self.registry.audit(session, "rollout.step", rollout.adapter_name, before={"weight": rollout.weight},
                                after={"weight": later[0], "figures": figures}, reason=reason, outcome="auto")
        return reason

    def _promote_at_end(self, rollout: Rollout, evidence: str, figures: dict) -> str | None:
        reason = f"ramp complete at {rollout.weight:g}%: {evidence}"
        # Asked first, so that a refusing gate is not asked (and audited) again at every check.
        gated = PRODUCTION in self.registry.settings.gate.aliases
        if gated and not self.registry.check_gate(f"{rollout.adapter_name}@{rollout.candidate_version}").passed:
            return None  # it holds at the last step; `rollout status` and the gate report say why
        actor = Actor(kind="rollout", name=rollout.adapter_name)
        if self.registry.acting_as(actor).refusal_to_move(PRODUCTION):
            return None  # production's policy leaves the promotion to a person it names (`rollout promote`)
        try:
            self.promote(rollout.adapter_name, reason=reason, actor=actor)
        except (NotFound, GateRefused, Forbidden):
            return None  # another replica promoted it, or the gate or the policy changed meanwhile
        self.registry.record_event("rollout.ramp-complete", rollout.adapter_name, after={"figures": figures},
                                   reason=reason, outcome="auto")
        return reason


def guardrail_failure(rollout: Rollout, status: RolloutStatus) -> str | None:
    """Why the candidate must be rolled back now (errors, time per token, outcomes), or None."""
    production, candidate = status.arms
    enough = rollout.min_requests
    errors = sequential.rate(candidate.errors, candidate.requests, rollout.alpha)
    if candidate.requests >= enough and errors.low > rollout.max_error_rate:
        return (f"candidate error rate {candidate.error_rate:.1%} (at least {errors.low:.1%} at "
                f"{1 - rollout.alpha:.0%} confidence) over {rollout.max_error_rate:.1%} after "
                f"{candidate.requests} requests")
    latency = status.latency_ratio_interval
    if (latency is not None and latency.low > rollout.max_latency_ratio
            and min(candidate.requests, production.requests) >= enough):
        return (f"candidate time per output token {latency.estimate:.2f}x production's at equal batch sizes "
                f"(at least {latency.low:.2f}x at {1 - rollout.alpha:.0%} confidence, always-valid), over "
                f"{rollout.max_latency_ratio:g}x")
    for name, diff, n in _outcome_diffs(status):
        if diff is not None and n >= enough and diff.high < -rollout.max_success_drop:
            return (f"candidate {name} {_points(diff.estimate)} against production (at most {_points(diff.high)} "
                    f"at {1 - rollout.alpha:.0%} confidence, always-valid), below the allowed "
                    f"-{rollout.max_success_drop * 100:g} points, after {n} outcomes per arm")
    return None


def shown_not_worse(rollout: Rollout, status: RolloutStatus) -> str | None:
    """Why the candidate is shown not worse, or None while the evidence is lacking. Every kind of
    outcome that comes in must show it; with none, the error rate must."""
    candidate = status.arms[1]
    shown = []
    for name, diff, n in _outcome_diffs(status):
        if not n:
            continue
        if diff is None or n < rollout.min_requests or diff.low < -rollout.max_success_drop:
            return None
        shown.append(f"{name} {_points(diff.estimate)} against production, at least {_points(diff.low)} at "
                     f"{1 - rollout.alpha:.0%} confidence, over {n} outcomes per arm")
    if shown:
        return "; ".join(shown)
    errors = sequential.rate(candidate.errors, candidate.requests, rollout.alpha)
    if errors is not None and errors.high <= rollout.max_error_rate:
        return (f"no outcomes sent; candidate error rate at most {errors.high:.1%} at {1 - rollout.alpha:.0%} "
                f"confidence over {candidate.requests} requests")
    return None


def _outcome_diffs(status: RolloutStatus) -> list[tuple[str, Comparison | None, int]]:
    """Each kind of outcome: its candidate - production comparison and the outcomes per arm behind it."""
    production, candidate = status.arms
    return [("success rate", status.success_diff, min(candidate.success_n, production.success_n)),
            ("mean score", status.score_diff, min(candidate.score_n, production.score_n)),
            ("output check pass rate", status.output_ok_diff,
             min(candidate.output_checked, production.output_checked))]


def _points(fraction: float) -> str:
    return f"{fraction * 100:+.1f} points"


def _check_weight(weight: float) -> None:
    if not 0 <= weight <= 100:
        raise InvalidInput("weight is a percentage between 0 and 100")


def _kind(rollout: Rollout) -> str:
    """What its audit actions (and webhook events) are named after: rollout or shadow."""
    return "shadow" if rollout.mode == "shadow" else "rollout"
