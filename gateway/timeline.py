"""A rollout's arms over time: the meter records cut into equal time buckets, each summarised the
way ``rollout status`` summarises the whole rollout (``arm_stats``), for the console's charts."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from pydantic import BaseModel

from .models import MeterRecord, Rollout, utcnow
from .rollouts import CANDIDATE, PRODUCTION, SHADOW, arm_stats

SERIES = ("requests", "error_rate", "p50_ms", "p95_ms", "ttft_p50_ms", "tpot_p50_ms", "cost_per_1k_usd")


class Timeline(BaseModel):
    bucket_s: float
    starts: list[datetime]  # each bucket's start
    # arm -> series name (SERIES) -> one value per bucket; None where the arm had no request then
    arms: dict[str, dict[str, list[float | None]]]


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=utcnow().tzinfo)


def timeline(rollout: Rollout, records: list[MeterRecord], points: int = 40) -> Timeline:
    start = _aware(rollout.started_at)
    end = _aware(rollout.ended_at) if rollout.ended_at else utcnow()
    # Whole seconds, at least one, so a page polling every few seconds sees stable buckets.
    bucket_s = max(1.0, float(int((end - start).total_seconds() / points) + 1))
    count = max(1, int((end - start).total_seconds() // bucket_s) + 1)  # at least one, whatever the clocks say
    versions = {PRODUCTION: rollout.production_version, CANDIDATE: rollout.candidate_version,
                SHADOW: rollout.candidate_version}
    buckets: dict[str, list[list[MeterRecord]]] = defaultdict(lambda: [[] for _ in range(count)])
    for record in records:
        index = int((_aware(record.created_at) - start).total_seconds() // bucket_s)
        buckets[record.arm][min(max(index, 0), count - 1)].append(record)
    arms: dict[str, dict[str, list[float | None]]] = {}
    for arm, per_bucket in sorted(buckets.items()):
        stats = [arm_stats(arm, versions.get(arm, 0), items, [], rollout.alpha) if items else None
                 for items in per_bucket]
        arms[arm] = {name: [getattr(s, name) if s else (0 if name == "requests" else None) for s in stats]
                     for name in SERIES}
    return Timeline(bucket_s=bucket_s, starts=[start + timedelta(seconds=i * bucket_s) for i in range(count)],
                    arms=arms)
