"""What each console page shows, read from the registry and the meter: plain models the templates
render and the charts draw. No HTML here, and nothing the CLI does not also read."""

from __future__ import annotations

import math
from datetime import datetime

from pydantic import BaseModel

from loragate.registry import GateReport, Registry, VersionInfo, VersionRef
from loragate.registry.models import AliasChange, VersionArtifact
from loragate.registry.schemas import AuditEntry, EvalScore

from ..cost import CostRow, GroupBy, cost_report, parse_since
from ..models import Rollout
from ..rollouts import PRODUCTION, RolloutService, RolloutStatus
from ..timeline import Timeline, timeline


class Scored(BaseModel):
    """A version's primary score beside the base model's and the prompted base's on the same data."""

    suite: str
    metric: str
    value: float | None = None
    base: float | None = None
    prompted: float | None = None


class VersionRow(BaseModel):
    info: VersionInfo
    score: Scored
    cost_usd: float | None


class AdapterSummary(BaseModel):
    name: str
    base_model: str
    versions: int
    aliases: dict[str, int]
    production: VersionRow | None
    rollout: Rollout | None  # the latest, active or not


class AdapterPage(BaseModel):
    name: str
    rows: list[VersionRow]
    rollout: Rollout | None

    @property
    def candidates(self) -> list[int]:
        """The versions a rollout could try: every one but production."""
        return [row.info.version for row in self.rows if PRODUCTION not in row.info.aliases]


class Quantized(BaseModel):
    """One served or exported form of a version, scored against the adapter itself."""

    suite: str
    score: float | None
    quality_loss_points: float | None
    tokens_per_s: float | None
    created_at: datetime


class VersionPage(BaseModel):
    row: VersionRow
    lineage: list[str]  # this version, its parent, ... and last the base model
    gate: GateReport  # what promoting it to production would decide now
    suites: list[EvalScore]  # every score recorded for this version, by suite and metric
    artifacts: list[VersionArtifact]
    quantized: list[Quantized]
    loss: list[dict[str, float]]  # the trainer's log: step, loss and/or eval_loss
    audit: list[AuditEntry]


class RolloutPage(BaseModel):
    status: RolloutStatus
    timeline: Timeline
    thresholds: dict[str, float]


def _scored(registry: Registry, info: VersionInfo) -> Scored:
    suite, metric = registry.primary_eval(info.name)
    found = Scored(suite=suite, metric=metric)
    score = info.score(suite, metric)
    if score is None:
        return found
    baselines = registry.baselines(info.base_model, suite, metric, score.eval_data_sha256)
    return found.model_copy(update={
        "value": score.value, "base": baselines["base"].value if "base" in baselines else None,
        "prompted": baselines["prompted_base"].value if "prompted_base" in baselines else None})


def _number(value: object) -> float | None:
    """A finite number from a training config written by whatever trained the version, else None."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _row(registry: Registry, info: VersionInfo) -> VersionRow:
    return VersionRow(info=info, score=_scored(registry, info), cost_usd=_number(info.training_config.get("cost_usd")))


def _loss_points(history: object) -> list[dict[str, float]]:
    """The trainer's loss log, keeping only finite numbers (a diverged run logs NaN)."""
    points = []
    for entry in history if isinstance(history, list) else []:
        if isinstance(entry, dict):
            point = {k: v for k in ("step", "loss", "eval_loss") if (v := _number(entry.get(k))) is not None}
            if "step" in point and len(point) > 1:
                points.append(point)
    return points


def _about(entry: AuditEntry, name: str, version: int) -> bool:
    """An audit entry on this version, or on an alias moved to, from or refused for it."""
    ref = f"{name}@{version}"
    if entry.target == ref:
        return True
    named = {entry.after.get("version"), entry.before.get("version")}
    return entry.target.split("@")[0] == name and (version in named or ref in named)


def adapters(registry: Registry, rollouts: RolloutService) -> list[AdapterSummary]:
    by_name: dict[str, list[VersionInfo]] = {}
    for info in registry.list_versions():
        by_name.setdefault(info.name, []).append(info)
    summaries = []
    for name, infos in by_name.items():
        aliases = {alias: info.version for info in infos for alias in info.aliases}
        production = next((i for i in infos if PRODUCTION in i.aliases), None)
        summaries.append(AdapterSummary(
            name=name, base_model=infos[-1].base_model, versions=len(infos), aliases=aliases,
            production=_row(registry, production) if production else None, rollout=rollouts.latest(name)))
    return summaries


def adapter_page(registry: Registry, rollouts: RolloutService, name: str) -> AdapterPage:
    rows = [_row(registry, info) for info in registry.list_versions(name)]
    return AdapterPage(name=name, rows=rows, rollout=rollouts.latest(name))


def lineage(registry: Registry, info: VersionInfo) -> list[str]:
    chain, seen = [info.ref], {info.ref}
    while info.parent and info.parent not in seen:
        info = registry.get(info.parent)
        chain.append(info.ref)
        seen.add(info.ref)
    return [*chain, info.base_model]


def version_page(registry: Registry, name: str, version: int) -> VersionPage:
    ref = str(VersionRef(name=name, version=version))
    info = registry.get(ref)
    row = _row(registry, info)
    suites = sorted(info.evals, key=lambda e: (e.suite, e.metric))
    quantized = []
    for suite in sorted({e.suite for e in info.evals if e.metric == "quality_loss_points"}):
        values = {e.metric: e for e in info.evals if e.suite == suite}
        primary = values.get(row.score.metric)
        quantized.append(Quantized(
            suite=suite, score=primary.value if primary else None,
            quality_loss_points=values["quality_loss_points"].value,
            tokens_per_s=values["tokens_per_s"].value if "tokens_per_s" in values else None,
            created_at=values["quality_loss_points"].created_at))
    return VersionPage(
        row=row, lineage=lineage(registry, info), gate=registry.check_gate(ref, to=PRODUCTION),
        suites=suites, artifacts=registry.derived_artifacts(ref), quantized=quantized,
        loss=_loss_points(info.training_config.get("loss_history")),
        audit=[e for e in registry.audit_log(target=f"{name}@", limit=1000) if _about(e, name, version)])


def alias_history(registry: Registry, name: str) -> list[AliasChange]:
    registry.adapter(name)  # NotFound for an unknown adapter, rather than an empty page
    return registry.alias_history(name)


def rollout_page(rollouts: RolloutService, name: str) -> RolloutPage:
    status, rollout, records = rollouts.watch(name)
    return RolloutPage(status=status, timeline=timeline(rollout, records), thresholds={
        "max_error_rate": rollout.max_error_rate, "max_latency_ratio": rollout.max_latency_ratio,
        "max_success_drop": rollout.max_success_drop, "min_requests": rollout.min_requests})


def cost(registry: Registry, since: str | None, by: GroupBy) -> list[CostRow]:
    return cost_report(registry, since=parse_since(since) if since else None, by=by)
