"""The gateway's tables: API keys, rollouts, the per-request meter and feedback on requests.

They live in the same database as the registry, so every gateway replica shares them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Column, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel

from loragate.registry.models import utcnow


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_key"

    id: str = Field(primary_key=True)  # the public prefix of the key, e.g. lg_3f9a1c2b
    name: str
    key_sha256: str = Field(index=True, unique=True)
    scope: str = "user"  # user | admin
    rpm: int | None = None
    tpm: int | None = None
    # Model names (adapter names or base ids) this key may call; empty means all.
    models: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class Rollout(SQLModel, table=True):
    """A traffic split between an adapter's production version and a candidate."""

    id: int | None = Field(default=None, primary_key=True)
    adapter_name: str = Field(index=True)
    production_version: int
    candidate_version: int
    weight: float  # percent of users sent to the candidate (shadow: whose requests it answers unseen)
    # split: the candidate answers `weight`% of users; shadow: production answers everyone and the
    # candidate gets a copy of `weight`% of the requests off the response path (``shadow.py``).
    mode: str = "split"
    status: str = "active"  # active | promoted | aborted | rolled_back
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_latency_ratio: float = 1.5  # candidate over production, median time per output token
    # Outcomes: roll back once the candidate's success rate is below production's by more than this
    # (a fraction: 0.02 is 2 points), at confidence 1 - alpha (see sequential.py).
    max_success_drop: float = 0.02
    alpha: float = 0.05
    # Automatic ramp: the weights to go through, a step once the current one has lasted this long.
    ramp: list[float] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    step_min_requests: int = 100  # candidate requests at the current weight
    step_min_minutes: float = 0.0
    step_started_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True),
                                                                               nullable=False))
    started_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    ended_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    end_reason: str | None = None
    started_by: str


class ShadowPair(SQLModel, table=True):
    """One request of a shadow rollout: production's answer and the candidate's, compared."""

    __tablename__ = "shadow_pair"

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(index=True)
    request_id: str
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    status: str  # compared | dropped (the shadow queue was full) | failed (the candidate erred)
    prompt_sha256: str | None = None
    production_sha256: str | None = None
    candidate_sha256: str | None = None
    # None where the request said `"store": false`: only the hashes are kept.
    prompt: str | None = None  # the chat messages as JSON, or the completion prompt
    production_output: str | None = None
    candidate_output: str | None = None
    exact: bool | None = None  # the two answers equal after normalising
    token_f1: float | None = None  # their token overlap
    latency_ms: float | None = None  # the candidate's
    error: str | None = None


class Feedback(SQLModel, table=True):
    """An outcome of one served request: one row per request and kind, the latest value wins.

    The arm, version and rollout are copied from the request's meter record, so a rollout's
    outcomes are read without a join, however late they come."""

    __table_args__ = (UniqueConstraint("request_id", "kind"),)

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(index=True)
    kind: str  # success | score | label
    value: float | None = None  # success: 1 or 0; score: 0..1
    label: str | None = None
    comment: str | None = None
    key_id: str | None = None  # who sent it
    adapter: str | None = None
    version: int | None = None
    arm: str
    rollout_id: int | None = Field(default=None, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


class MeterRecord(SQLModel, table=True):
    """One record per request: who was served by what, how fast, at what cost."""

    __tablename__ = "meter_record"

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False,
                                                                          index=True))
    model: str
    adapter: str | None = Field(default=None, index=True)
    version: int | None = None
    arm: str  # production | candidate | pinned | alias | base
    rollout_id: int | None = Field(default=None, index=True)
    backend: str
    key_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV the engine reused (prefix cache)
    ttft_ms: float | None = None
    queue_ms: float | None = None  # waiting for an engine slot (part of ttft_ms)
    tpot_ms: float | None = None  # time per output token after the first
    batch: float | None = None  # requests the engine ran at once, on average, during this one
    latency_ms: float
    status: int
    cost_usd: float = 0.0
    # Share of the answers (n choices) that passed the version's output check; None: no check declared.
    output_ok: float | None = None


class EngineReplica(SQLModel, table=True):
    """An engine replica that announced itself (``loragate engine serve``): gateways with
    ``pool.discover`` route to it while its heartbeat is fresh."""

    __tablename__ = "engine_replica"

    url: str = Field(primary_key=True)  # how gateways reach it
    base_model: str = Field(index=True)  # registry id of the base it serves
    kind: str  # llamacpp | vllm
    max_loras: int
    slots: int
    started_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    heartbeat_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


class StoredResponse(SQLModel, table=True):
    """A Responses API answer kept for ``GET /v1/responses/{id}`` and ``previous_response_id``
    (``store: true``, the default), readable by every gateway replica that shares the database."""

    __tablename__ = "stored_response"

    id: str = Field(primary_key=True)  # resp_...
    key_id: str | None = Field(default=None, index=True)  # whose it is: only that key (or an admin) reads it
    previous_response_id: str | None = None  # the conversation it continues
    input_items: list[dict] = Field(sa_column=Column(JSON, nullable=False))  # this request's, each with its id
    response: dict = Field(sa_column=Column(JSON, nullable=False))  # the response object as answered
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
