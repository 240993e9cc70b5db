"""The registry's tables. Every change goes through alembic (``migrations/``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def _timestamp() -> Any:
    return Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


def _json(default_factory: Any = dict) -> Any:
    return Field(default_factory=default_factory, sa_column=Column(JSON, nullable=False))


class Licence(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str
    commercial_use: bool
    mau_cap: int | None = None
    acceptable_use: list[str] = _json(list)
    derivatives_redistribution: bool = True
    attribution_required: bool = False
    url: str | None = None


class BaseModelRecord(SQLModel, table=True):
    __tablename__ = "base_model"

    id: str = Field(primary_key=True)
    source: str
    hub_id: str | None = None
    architecture: str | None = None
    licence_id: str = Field(foreign_key="licence.id")
    # hidden_size, num_hidden_layers, ...: lets `register` catch an adapter built for another base.
    config: dict[str, Any] = _json()
    # The GGUF of this base the llama.cpp backend serves when settings name none (path, type,
    # sha256, size), chosen by measured loss: see `loragate quantize base-gguf`.
    serving_gguf: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = _timestamp()


class Adapter(SQLModel, table=True):
    name: str = Field(primary_key=True)
    description: str | None = None
    primary_suite: str | None = None
    primary_metric: str | None = None
    created_at: datetime = _timestamp()


class AdapterVersion(SQLModel, table=True):
    __tablename__ = "adapter_version"
    __table_args__ = (UniqueConstraint("adapter_name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_name: str = Field(foreign_key="adapter.name", index=True)
    version: int
    base_model_id: str = Field(foreign_key="base_model.id")
    licence_id: str = Field(foreign_key="licence.id")
    peft_type: str = "LORA"
    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    target_modules: list[str] = _json(list)
    artifact_sha256: str = Field(index=True)
    artifact_size: int
    training_data_sha256: str | None = None
    training_config: dict[str, Any] = _json()
    # An OutputCheck (schemas.py) the gateway applies to every answer this version serves.
    output_check: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    parent_id: int | None = Field(default=None, foreign_key="adapter_version.id")
    author: str
    notes: str | None = None
    created_at: datetime = _timestamp()


class EvalResult(SQLModel, table=True):
    """One score. ``subject`` is ``adapter`` (with a version) or a baseline of the base model:
    ``base`` (no adapter) or ``prompted_base`` (the base with the best prompt we have)."""

    __tablename__ = "eval_result"

    id: int | None = Field(default=None, primary_key=True)
    subject: str = "adapter"
    version_id: int | None = Field(default=None, foreign_key="adapter_version.id", index=True)
    base_model_id: str = Field(foreign_key="base_model.id", index=True)
    suite: str
    metric: str
    value: float
    higher_is_better: bool = True
    sample_count: int
    eval_data_sha256: str | None = None
    created_at: datetime = _timestamp()


class ContaminationCheck(SQLModel, table=True):
    """Whether held-out data leaked into a training set, keyed by the training data's sha256."""

    __tablename__ = "contamination_check"

    id: int | None = Field(default=None, primary_key=True)
    training_data_sha256: str = Field(index=True)
    passed: bool
    method: str
    details: dict[str, Any] = _json()
    created_at: datetime = _timestamp()


class Alias(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("adapter_name", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    adapter_name: str = Field(foreign_key="adapter.name", index=True)
    name: str
    version_id: int = Field(foreign_key="adapter_version.id")
    updated_at: datetime = _timestamp()


class AliasChange(SQLModel, table=True):
    """The history `rollback` walks back through."""

    __tablename__ = "alias_change"

    id: int | None = Field(default=None, primary_key=True)
    adapter_name: str = Field(index=True)
    alias: str
    from_version: int | None = None
    to_version: int | None = None
    action: str
    actor: str
    reason: str | None = None
    created_at: datetime = _timestamp()


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = _timestamp()
    actor: str
    action: str
    target: str = Field(index=True)
    outcome: str = "ok"
    before: dict[str, Any] = _json()
    after: dict[str, Any] = _json()
    reason: str | None = None


class VersionArtifact(SQLModel, table=True):
    """A file derived from a version for one backend: a GGUF LoRA, a merged model, a GGUF."""

    __tablename__ = "version_artifact"
    __table_args__ = (UniqueConstraint("version_id", "kind", "type"),)

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="adapter_version.id", index=True)
    kind: str  # gguf-lora | merged | gguf
    type: str  # f16, q8_0, q4_k_m, safetensors ...
    sha256: str = Field(index=True)
    size: int
    created_at: datetime = _timestamp()


class Webhook(SQLModel, table=True):
    """A receiver told about registry and rollout events (``registry/webhooks.py``)."""

    __tablename__ = "webhook"

    id: int | None = Field(default=None, primary_key=True)
    url: str
    events: list[str] = _json(list)  # event types, or ["*"] for all
    # Needed to sign every delivery, so kept as given: the database is as sensitive as the secret.
    secret: str
    created_at: datetime = _timestamp()
    removed_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class WebhookDelivery(SQLModel, table=True):
    """The outbox: one event for one webhook, written in the transaction of the change it reports."""

    __tablename__ = "webhook_delivery"

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: int = Field(foreign_key="webhook.id", index=True)
    event_id: str  # the body's id and the webhook-id header: receivers deduplicate on it
    event_type: str
    adapter: str  # ordering key: one adapter's events reach a webhook in the order they happened
    body: str  # the exact JSON signed and sent at every attempt
    status: str = Field(default="pending", index=True)  # pending | delivered | failed
    attempts: int = 0
    # Unix seconds, compared the same way on SQLite and PostgreSQL.
    next_attempt_at: float = 0.0
    leased_until: float | None = None  # a sender holds it until then; past it (sender killed) it is sent again
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime = _timestamp()
    delivered_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
