"""The registry's public types: what its API takes and returns (never live ORM rows)."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from loragate.text import is_json, normalize

from .errors import InvalidInput

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
LATEST = "latest"  # a read-only alias: the highest version
PRODUCTION = "production"

# What a score is of: a version, or a baseline it must be compared with on the same eval data: the
# base model, the prompted (few-shot) base, and for label tasks the majority label and a classical
# text classifier (TF-IDF + logistic regression) trained on the same train split.
Subject = Literal["adapter", "base", "prompted_base", "majority", "classical"]
BASELINES: tuple[Subject, ...] = ("base", "prompted_base", "majority", "classical")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise InvalidInput(
            f"adapter name {name!r} must start with a letter or digit and hold only "
            "letters, digits, '.', '_' or '-' (at most 100)"
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS_PATTERN.match(alias):
        raise InvalidInput(f"alias {alias!r} must be lower-case letters, digits, '_' or '-', starting with a letter")
    return alias


class Actor(BaseModel):
    """Who acts on the registry: an OS user at the CLI, an API key, or the gateway's rollout logic."""

    kind: Literal["user", "key", "rollout"] = "user"
    name: str
    admin: bool = False  # an admin-scope API key

    @property
    def label(self) -> str:
        """As the audit log names it: ``ana``, ``key:ci``, ``rollout:support``."""
        return self.name if self.kind == "user" else f"{self.kind}:{self.name}"


class VersionRef(BaseModel):
    """``name`` (= ``name@production``), ``name@3`` or ``name@candidate``."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str) -> VersionRef:
        name, sep, selector = text.partition("@")
        check_name(name)
        if not sep:
            return cls(name=name, alias=PRODUCTION)
        if selector.isdigit():
            return cls(name=name, version=int(selector))
        return cls(name=name, alias=check_alias(selector))

    def __str__(self) -> str:
        return f"{self.name}@{self.version if self.version is not None else self.alias}"


class OutputCheck(BaseModel):
    """What a version's answers must look like, declared with the version: the gateway checks every
    answer it serves and records the share that pass (a task-level success rate, no feedback needed)."""

    json_output: bool = False  # the answer parses as JSON
    labels: list[str] = Field(default_factory=list)  # the answer is one of these (compared normalized)

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        if len({normalize(label) for label in labels}) != len(labels) or not all(map(normalize, labels)):
            raise ValueError("labels must be distinct and not blank (compared without case or punctuation)")
        return labels

    @model_validator(mode="after")
    def _says_something(self) -> OutputCheck:
        if not self.json_output and not self.labels:
            raise ValueError("an output check needs json_output or labels")
        return self

    def passes(self, answer: str) -> bool:
        if self.json_output and not is_json(answer):
            return False
        return not self.labels or normalize(answer) in {normalize(label) for label in self.labels}

    def describe(self) -> str:
        parts = (["parses as JSON"] if self.json_output else []) + (
            [f"is one of {', '.join(self.labels)}"] if self.labels else [])
        return " and ".join(parts)


class EvalScore(BaseModel):
    subject: Subject
    suite: str
    metric: str
    value: float
    higher_is_better: bool
    sample_count: int
    eval_data_sha256: str | None
    created_at: datetime


class EvalInput(BaseModel):
    """One suite's scores, as `eval add` reads them from a JSON file."""

    suite: str = Field(min_length=1)
    metrics: dict[str, float] = Field(min_length=1)
    sample_count: int = Field(gt=0)
    eval_data_sha256: str | None = None
    # Metrics missing here count as higher-is-better; list losses and error rates as false.
    higher_is_better: dict[str, bool] = Field(default_factory=dict)

    @field_validator("metrics")
    @classmethod
    def _finite(cls, metrics: dict[str, float]) -> dict[str, float]:
        for metric, value in metrics.items():
            if not math.isfinite(value):
                raise ValueError(f"metric {metric} is {value}, not a finite number")
        return metrics


class VersionInfo(BaseModel):
    name: str
    version: int
    base_model: str
    licence: str
    peft_type: str
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str]
    artifact_sha256: str
    artifact_size: int
    training_data_sha256: str | None
    training_config: dict[str, Any]
    output_check: OutputCheck | None = None
    parent: str | None
    author: str
    notes: str | None
    created_at: datetime
    aliases: list[str] = Field(default_factory=list)
    evals: list[EvalScore] = Field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def score(self, suite: str, metric: str) -> EvalScore | None:
        """The newest score on suite/metric, if any."""
        matching = [e for e in self.evals if e.suite == suite and e.metric == metric]
        return max(matching, key=lambda e: e.created_at) if matching else None


class GateReport(BaseModel):
    target: str
    alias: str
    passed: bool
    reasons: list[str] = Field(description="Why the gate refuses; empty when it passes.")
    checks: list[str] = Field(description="What the gate checked and found good.")
    notes: list[str] = Field(default_factory=list,
                             description="What does not refuse but should be read, e.g. a classical "
                                         "classifier as good as the adapter.")


class DiffRow(BaseModel):
    field: str
    a: Any
    b: Any

    @property
    def same(self) -> bool:
        return self.a == self.b


class GcReport(BaseModel):
    removed: list[str]
    freed_bytes: int
    kept: int
    dry_run: bool


class StoreMigration(BaseModel):
    source: str
    target: str
    artifacts: int  # copied and read back from the target, sha256-checked
    bytes: int
    versions: int  # name@N records written for engines
    seconds: float


class AuditEntry(BaseModel):
    id: int
    created_at: datetime
    actor: str
    action: str
    target: str
    outcome: str
    before: dict[str, Any]
    after: dict[str, Any]
    reason: str | None
