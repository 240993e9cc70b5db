"""Cost and latency per adapter, version, arm or key, from the meter records."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel
from sqlmodel import col, select

from loragate.database import read_session
from loragate.registry import InvalidInput, Registry

from .models import MeterRecord, utcnow
from .rollouts import percentile

GroupBy = Literal["adapter", "version", "arm", "key"]
_DURATION = re.compile(r"^(\d+)([smhd])$")


class CostRow(BaseModel):
    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    p50_ms: float | None
    p95_ms: float | None
    error_rate: float
    cost_usd: float
    cost_per_1k_usd: float


def parse_since(text: str) -> datetime:
    """``30m``, ``2h``, ``7d`` ago, or an ISO date/time."""
    match = _DURATION.match(text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        try:
            return utcnow() - timedelta(**{unit: int(match.group(1))})
        except OverflowError:
            raise InvalidInput(f"--since {text} reaches back before the year 1") from None
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise InvalidInput(f"--since takes 30m, 2h, 7d or an ISO date, not {text!r}") from exc


def _group(record: MeterRecord, by: GroupBy) -> str:
    name = record.adapter or record.model
    if by == "adapter":
        return name
    if by == "version":
        return f"{name}@{record.version}" if record.version is not None else name
    if by == "arm":
        return f"{name}:{record.arm}"
    return record.key_id or "(no key)"


def cost_report(registry: Registry, *, since: datetime | None = None, by: GroupBy = "adapter") -> list[CostRow]:
    with read_session(registry.engine) as session:
        query = select(MeterRecord).order_by(col(MeterRecord.id))
        if since is not None:
            query = query.where(MeterRecord.created_at >= since)
        records = session.exec(query).all()
    groups: dict[str, list[MeterRecord]] = defaultdict(list)
    for record in records:
        groups[_group(record, by)].append(record)
    rows = []
    for group, items in sorted(groups.items()):
        latencies = [r.latency_ms for r in items]
        cost = sum(r.cost_usd for r in items)
        rows.append(CostRow(
            group=group, requests=len(items), prompt_tokens=sum(r.prompt_tokens for r in items),
            completion_tokens=sum(r.completion_tokens for r in items), p50_ms=percentile(latencies, 50),
            p95_ms=percentile(latencies, 95), error_rate=sum(r.status >= 500 for r in items) / len(items),
            cost_usd=cost, cost_per_1k_usd=1000 * cost / len(items),
        ))
    return rows
