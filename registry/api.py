"""``Registry``: the Python API behind every ``loragate registry`` command.

Each operation is one database transaction. A failure anywhere (bad folder, unknown version,
gate refusal) rolls it back whole; the artifact store is content-addressed, so a copy made
before a failed transaction is harmless and `gc` reclaims it.
"""

from __future__ import annotations

import copy
import logging
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, col, select

from loragate.settings import Settings, StoreSettings

from loragate.database import get_engine, migrate, read_session, write_session
from .errors import ArtifactCorrupt, Conflict, Forbidden, GateRefused, InvalidInput, NotFound, StoreUnavailable
from .gate import GateInputs, ServedPath, evaluate_gate, served_suite
from .licences import PRESETS
from .policy import alias_refusal
from .models import (
    Adapter,
    AdapterVersion,
    Alias,
    AliasChange,
    AuditEvent,
    BaseModelRecord,
    ContaminationCheck,
    EvalResult,
    Licence,
    VersionArtifact,
    utcnow,
)
from .schemas import (
    BASELINES,
    Actor,
    LATEST,
    AuditEntry,
    DiffRow,
    EvalInput,
    EvalScore,
    GateReport,
    GcReport,
    OutputCheck,
    StoreMigration,
    Subject,
    VersionInfo,
    VersionRef,
    check_alias,
    check_name,
)
from . import webhooks
from .object_store import open_store
from .store import VersionRecord, export_artifact, file_sha256
from .validation import inspect_adapter

T = TypeVar("T")
log = logging.getLogger("loragate.registry")
_RETRIES = 5
METADATA_FILE = "loragate-version.json"


class Registry:
    """Versioned LoRA adapters with lineage, scores, licences, aliases and an audit trail.

    >>> registry = Registry()                      # settings from env / loragate.yaml
    >>> v = registry.register("support", Path("out/adapter"), base="SmolLM2-135M-Instruct")
    >>> registry.promote(v.ref, to="production")
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.actor = Actor(kind="user", name=self.settings.user)  # audited; protected aliases ask who
        self.engine = get_engine(self.settings.resolved_database_url)
        migrate(self.engine)
        self.store = open_store(self.settings.store, self.settings.store_dir, self.settings.store_cache_dir)
        self._seed_licences()

    def acting_as(self, actor: Actor) -> Registry:
        """The same registry (engine, store) acting for ``actor``: an API key, a rollout."""
        other = copy.copy(self)
        other.actor = actor
        return other

    # -- plumbing -------------------------------------------------------------------------

    def _write(self, operation: Callable[[Session], T]) -> T:
        """Run one write transaction, retrying when a concurrent writer won a race."""
        for attempt in range(_RETRIES):
            try:
                with write_session(self.engine) as session:
                    return operation(session)
            except (IntegrityError, OperationalError) as exc:
                if attempt == _RETRIES - 1 or not _is_race(exc):
                    raise
        raise AssertionError("unreachable")

    def audit(
        self,
        session: Session,
        action: str,
        target: str,
        *,
        before: dict[str, Any] | None = None,
        after: dict[str, Any] | None = None,
        reason: str | None = None,
        outcome: str = "ok",
    ) -> None:
        """Audit a change in the caller's transaction (``session``), with the webhook deliveries that report it."""
        event = AuditEvent(actor=self.actor.label, action=action, target=target, outcome=outcome,
                           before=before or {}, after=after or {}, reason=reason)
        session.add(event)
        webhooks.enqueue(session, event)

    def refusal_to_move(self, alias: str) -> str | None:
        """Why this registry's actor may not move ``alias`` (its policy), or None when it may."""
        return alias_refusal(self.settings.gate.policy(alias), self.actor, alias)

    def _authorize(self, action: str, name: str, alias: str) -> None:
        """Refuse (and audit) a move of a protected alias by an actor its policy does not name."""
        why = self.refusal_to_move(alias)
        if why is not None:
            self._write(lambda session: self.audit(session, action, f"{name}@{alias}", outcome="refused", reason=why))
            raise Forbidden(why)

    def _seed_licences(self) -> None:
        with read_session(self.engine) as session:
            present = set(session.exec(select(Licence.id)).all())
        missing = [p for p in PRESETS if p.id not in present]
        if not missing:
            return

        def seed(session: Session) -> None:
            present = set(session.exec(select(Licence.id)).all())
            for preset in missing:
                if preset.id not in present:
                    session.add(Licence.model_validate(preset.model_dump()))

        self._write(seed)

    @staticmethod
    def _lock_adapter(session: Session, name: str) -> Adapter:
        adapter = session.exec(select(Adapter).where(Adapter.name == name).with_for_update()).first()
        if adapter is None:
            raise NotFound(f"no adapter named {name!r}")
        return adapter

    @staticmethod
    def _version_row(session: Session, ref: VersionRef) -> AdapterVersion:
        query = select(AdapterVersion).where(AdapterVersion.adapter_name == ref.name)
        if ref.version is not None:
            row = session.exec(query.where(AdapterVersion.version == ref.version)).first()
        elif ref.alias == LATEST:
            row = session.exec(query.order_by(col(AdapterVersion.version).desc())).first()
        else:
            row = session.exec(
                select(AdapterVersion)
                .join(Alias, col(Alias.version_id) == col(AdapterVersion.id))
                .where(Alias.adapter_name == ref.name, Alias.name == ref.alias)
            ).first()
        if row is None:
            if session.get(Adapter, ref.name) is None:
                raise NotFound(f"no adapter named {ref.name!r}")
            what = f"version {ref.version}" if ref.version is not None else f"alias {ref.alias!r}"
            raise NotFound(f"adapter {ref.name!r} has no {what}")
        return row

    @staticmethod
    def _alias_row(session: Session, name: str, alias: str) -> Alias | None:
        return session.exec(select(Alias).where(Alias.adapter_name == name, Alias.name == alias)).first()

    def _locked_alias(self, session: Session, name: str, alias: str) -> tuple[Alias, int]:
        """Lock the adapter; return its alias row and the version number it points at."""
        self._lock_adapter(session, name)
        current = self._alias_row(session, name, alias)
        if current is None:
            raise NotFound(f"adapter {name!r} has no alias {alias!r}")
        return current, session.get(AdapterVersion, current.version_id).version

    def _info(self, session: Session, row: AdapterVersion) -> VersionInfo:
        aliases = session.exec(select(Alias.name).where(Alias.version_id == row.id)).all()
        evals = session.exec(
            select(EvalResult).where(EvalResult.version_id == row.id).order_by(col(EvalResult.id))
        ).all()
        parent = session.get(AdapterVersion, row.parent_id) if row.parent_id else None
        return VersionInfo(
            name=row.adapter_name, version=row.version, base_model=row.base_model_id, licence=row.licence_id,
            peft_type=row.peft_type, r=row.r, lora_alpha=row.lora_alpha, lora_dropout=row.lora_dropout,
            target_modules=row.target_modules, artifact_sha256=row.artifact_sha256,
            artifact_size=row.artifact_size, training_data_sha256=row.training_data_sha256,
            training_config=row.training_config,
            output_check=OutputCheck.model_validate(row.output_check) if row.output_check else None,
            parent=f"{parent.adapter_name}@{parent.version}" if parent else None,
            author=row.author, notes=row.notes, created_at=row.created_at, aliases=sorted(aliases),
            evals=[EvalScore.model_validate(e, from_attributes=True) for e in evals],
        )

    # -- base models and licences -----------------------------------------------------------

    def add_base_model(
        self,
        model_id: str,
        *,
        source: str,
        licence: str = "apache-2.0",
        hub_id: str | None = None,
        folder: Path | None = None,
    ) -> BaseModelRecord:
        """Record a base model; with ``folder`` (a Hugging Face model folder) its config is read
        so that `register` can check adapters against the real layer shapes."""
        check_name(model_id)
        architecture, config = None, {}
        if folder is not None:
            config_path = folder / "config.json"
            if not config_path.is_file():
                raise InvalidInput(f"{folder} has no config.json")
            hf_config = json.loads(config_path.read_text())
            architecture = (hf_config.get("architectures") or [None])[0]
            keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size")
            config = {k: hf_config[k] for k in keys if k in hf_config}

        def add(session: Session) -> BaseModelRecord:
            if session.get(Licence, licence) is None:
                raise NotFound(f"no licence {licence!r}; see `loragate registry licences`")
            if session.get(BaseModelRecord, model_id) is not None:
                raise Conflict(f"base model {model_id!r} is already registered")
            record = BaseModelRecord(
                id=model_id, source=source, hub_id=hub_id, architecture=architecture,
                licence_id=licence, config=config,
            )
            session.add(record)
            self.audit(session, "base.add", model_id, after=record.model_dump(mode="json"))
            return record

        return self._write(add)

    def base_models(self) -> list[BaseModelRecord]:
        with read_session(self.engine) as session:
            return list(session.exec(select(BaseModelRecord).order_by(BaseModelRecord.id)).all())

    def base_model_folder(self, base: str) -> Path:
        """The base model's local Hugging Face folder (training, merging and conversion read it)."""
        with read_session(self.engine) as session:
            record = session.get(BaseModelRecord, base)
        if record is None:
            raise NotFound(f"no base model {base!r}; add it with `loragate registry base add`")
        folder = Path(record.source)
        if not (folder / "config.json").is_file():
            raise NotFound(f"base model {base}: source {record.source} is not a local Hugging Face model folder")
        return folder

    def set_serving_gguf(self, base: str, gguf: Path | None, *, out_type: str | None = None,
                         reason: str | None = None) -> BaseModelRecord:
        """Record (or with None, forget) the GGUF of ``base`` that the llama.cpp backend serves when
        settings name none; its sha256 is checked when a gateway starts on it."""
        serving = None if gguf is None else self._store_file(gguf) | {"type": out_type}

        def record(session: Session) -> BaseModelRecord:
            row = session.get(BaseModelRecord, base)
            if row is None:
                raise NotFound(f"no base model {base!r}; add it with `loragate registry base add`")
            before, row.serving_gguf = row.serving_gguf, serving
            session.add(row)
            self.audit(session, "base.serving-gguf", base, before={"serving_gguf": before},
                        after={"serving_gguf": serving}, reason=reason)
            return row

        return self._write(record)

    def serving_gguf(self, base: str) -> Path | None:
        """The GGUF recorded for ``base`` (``set_serving_gguf``), fetched from the store and
        sha256-checked; None if none is."""
        with read_session(self.engine) as session:
            row = session.get(BaseModelRecord, base)
        if row is None or row.serving_gguf is None:
            return None
        recorded = row.serving_gguf
        hint = f"export it again (`loragate quantize base-gguf {base} --type {recorded['type']}`)"
        if "artifact" in recorded:
            return self._open_artifact(f"base model {base}'s serving GGUF", recorded["artifact"], hint=hint) / \
                recorded["file"]
        # Recorded before the store held serving GGUFs: a path on this machine.
        path = Path(recorded["path"])
        if not path.is_file() or file_sha256(path) != recorded["sha256"]:
            raise ArtifactCorrupt(f"base model {base}: its serving GGUF {path} is missing or changed; {hint}")
        return path

    def licences(self) -> list[Licence]:
        with read_session(self.engine) as session:
            return list(session.exec(select(Licence).order_by(Licence.id)).all())

    def add_licence(self, licence: Licence) -> Licence:
        def add(session: Session) -> Licence:
            if session.get(Licence, licence.id) is not None:
                raise Conflict(f"licence {licence.id!r} already exists")
            session.add(licence)
            self.audit(session, "licence.add", licence.id, after=licence.model_dump(mode="json"))
            return licence

        return self._write(add)

    # -- versions --------------------------------------------------------------------------

    def register(
        self,
        name: str,
        folder: Path,
        *,
        base: str,
        licence: str | None = None,
        training_data_sha256: str | None = None,
        training_config: dict[str, Any] | None = None,
        parent: str | None = None,
        author: str | None = None,
        notes: str | None = None,
        description: str | None = None,
        primary_suite: str | None = None,
        primary_metric: str | None = None,
        output_check: OutputCheck | None = None,
    ) -> VersionInfo:
        """Validate a peft LoRA folder, store it by sha256 and record it as ``name@N+1``.

        ``primary_suite``/``primary_metric`` set the adapter's gate eval (default: settings)."""
        check_name(name)
        with read_session(self.engine) as session:
            base_record = session.get(BaseModelRecord, base)
            if base_record is None:
                raise NotFound(f"no base model {base!r}; add it with `loragate registry base add`")
        spec = inspect_adapter(Path(folder), base_record)
        artifact = self.store.put(Path(folder))

        def record(session: Session) -> VersionInfo:
            if session.get(Licence, licence or base_record.licence_id) is None:
                raise NotFound(f"no licence {licence!r}; see `loragate registry licences`")
            adapter = session.exec(select(Adapter).where(Adapter.name == name).with_for_update()).first()
            if adapter is None:
                adapter = Adapter(name=name)
                session.add(adapter)
                session.flush()  # a concurrent creator makes this raise, and _write retries
            for field, value in (("description", description), ("primary_suite", primary_suite),
                                 ("primary_metric", primary_metric)):
                if value is not None:
                    setattr(adapter, field, value)
            duplicate = session.exec(
                select(AdapterVersion).where(
                    AdapterVersion.adapter_name == name, AdapterVersion.artifact_sha256 == artifact.sha256
                )
            ).first()
            if duplicate is not None:
                raise Conflict(f"these exact files are already {name}@{duplicate.version}")
            parent_row = self._version_row(session, VersionRef.parse(parent)) if parent else None
            latest = session.exec(
                select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_name == name)
            ).one()
            row = AdapterVersion(
                adapter_name=name, version=(latest or 0) + 1, base_model_id=base,
                licence_id=licence or base_record.licence_id, peft_type=spec.peft_type, r=spec.r,
                lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                target_modules=spec.target_modules, artifact_sha256=artifact.sha256,
                artifact_size=artifact.size, training_data_sha256=training_data_sha256,
                training_config=training_config or {}, parent_id=parent_row.id if parent_row else None,
                output_check=output_check.model_dump() if output_check else None,
                author=author or self.settings.user, notes=notes,
            )
            session.add(row)
            session.flush()
            info = self._info(session, row)
            self.audit(session, "register", info.ref, after=info.model_dump(mode="json", exclude={"evals"}))
            return info

        info = self._write(record)
        try:
            self.publish_version(info)
        except (StoreUnavailable, Conflict) as exc:  # registered; the gateway tries again on first use
            log.warning("%s is registered, but engines cannot resolve it from the store yet: %s", info.ref, exc)
        return info

    def publish_version(self, info: VersionInfo) -> None:
        """Write ``name@N``'s record into the store, where engines that share nothing with us but the
        store resolve it (vLLM's loragate resolver). Idempotent: the gateway repeats it on first use,
        which covers a crash between the database commit and this write."""
        self.store.write_version(VersionRecord(info.name, info.version, info.artifact_sha256, info.base_model))

    def get(self, ref: str) -> VersionInfo:
        with read_session(self.engine) as session:
            return self._info(session, self._version_row(session, VersionRef.parse(ref)))

    def list_versions(self, name: str | None = None) -> list[VersionInfo]:
        with read_session(self.engine) as session:
            query = select(AdapterVersion).order_by(AdapterVersion.adapter_name, AdapterVersion.version)
            if name is not None:
                if session.get(Adapter, check_name(name)) is None:
                    raise NotFound(f"no adapter named {name!r}")
                query = query.where(AdapterVersion.adapter_name == name)
            return [self._info(session, row) for row in session.exec(query).all()]

    def adapter(self, name: str) -> Adapter:
        with read_session(self.engine) as session:
            adapter = session.get(Adapter, check_name(name))
            if adapter is None:
                raise NotFound(f"no adapter named {name!r}")
            return adapter

    def diff(self, a: str, b: str) -> list[DiffRow]:
        """Config and scores of two versions, side by side (training config flattened)."""
        left, right = self.get(a), self.get(b)
        fields = ("base_model", "licence", "r", "lora_alpha", "lora_dropout", "target_modules",
                  "artifact_sha256", "artifact_size", "training_data_sha256", "parent", "author",
                  "aliases")
        rows = [DiffRow(field=f, a=getattr(left, f), b=getattr(right, f)) for f in fields]
        for key in sorted(set(left.training_config) | set(right.training_config)):
            rows.append(DiffRow(field=f"training_config.{key}", a=left.training_config.get(key),
                                b=right.training_config.get(key)))
        metrics = sorted({(e.suite, e.metric) for e in left.evals + right.evals})
        for suite, metric in metrics:
            scores = [info.score(suite, metric) for info in (left, right)]
            rows.append(DiffRow(field=f"eval.{suite}/{metric}",
                                a=scores[0].value if scores[0] else None,
                                b=scores[1].value if scores[1] else None))
        return rows

    # -- evals and data checks -------------------------------------------------------------

    def add_eval(
        self, scores: EvalInput, *, ref: str | None = None, base: str | None = None,
        subject: Subject = "adapter",
    ) -> list[EvalScore]:
        """Record scores for a version (``ref``) or a baseline (``base`` with a baseline subject:
        ``base``, ``prompted_base``, ``majority`` or ``classical``), kept with the base model's id."""
        if (ref is None) == (base is None) or (ref is not None) != (subject == "adapter"):
            raise InvalidInput(f"give a version for adapter scores, or a base model for baselines "
                               f"({', '.join(BASELINES)})")

        def add(session: Session) -> list[EvalScore]:
            if ref is not None:
                parsed = VersionRef.parse(ref)
                self._lock_adapter(session, parsed.name)
                row = self._version_row(session, parsed)
                version_id, base_id, target = row.id, row.base_model_id, f"{row.adapter_name}@{row.version}"
            else:
                if session.get(BaseModelRecord, base) is None:
                    raise NotFound(f"no base model {base!r}")
                version_id, base_id, target = None, base, f"base:{base}"
            results = [
                EvalResult(
                    subject=subject, version_id=version_id, base_model_id=base_id, suite=scores.suite,
                    metric=metric, value=value, higher_is_better=scores.higher_is_better.get(metric, True),
                    sample_count=scores.sample_count, eval_data_sha256=scores.eval_data_sha256,
                )
                for metric, value in scores.metrics.items()
            ]
            session.add_all(results)
            session.flush()
            self.audit(session, "eval.add", target, after={"subject": subject, **scores.model_dump()})
            return [EvalScore.model_validate(r, from_attributes=True) for r in results]

        return self._write(add)

    def baselines(self, base: str, suite: str, metric: str, eval_data_sha256: str | None) -> dict[str, EvalScore]:
        """The newest base and prompted-base scores on the same suite, metric and eval data."""
        with read_session(self.engine) as session:
            return self._baselines(session, base, suite, metric, eval_data_sha256)

    @staticmethod
    def _baselines(
        session: Session, base: str, suite: str, metric: str, eval_data_sha256: str | None
    ) -> dict[str, EvalScore]:
        found: dict[str, EvalScore] = {}
        for subject in BASELINES:
            row = session.exec(
                select(EvalResult)
                .where(EvalResult.subject == subject, EvalResult.base_model_id == base,
                       EvalResult.suite == suite, EvalResult.metric == metric,
                       EvalResult.eval_data_sha256 == eval_data_sha256)
                .order_by(col(EvalResult.id).desc())
            ).first()
            if row is not None:
                found[subject] = EvalScore.model_validate(row, from_attributes=True)
        return found

    def record_contamination_check(
        self, training_data_sha256: str, *, passed: bool, method: str, details: dict[str, Any] | None = None
    ) -> ContaminationCheck:
        def add(session: Session) -> ContaminationCheck:
            check = ContaminationCheck(
                training_data_sha256=training_data_sha256, passed=passed, method=method, details=details or {}
            )
            session.add(check)
            self.audit(session, "contamination.record", f"data:{training_data_sha256[:12]}",
                        after=check.model_dump(mode="json", exclude={"id", "created_at"}))
            return check

        return self._write(add)

    @staticmethod
    def _latest_contamination(session: Session, data_sha256: str | None) -> ContaminationCheck | None:
        if data_sha256 is None:
            return None
        return session.exec(
            select(ContaminationCheck)
            .where(ContaminationCheck.training_data_sha256 == data_sha256)
            .order_by(col(ContaminationCheck.id).desc())
        ).first()

    # -- aliases, the gate, promotion and rollback -----------------------------------------

    def _move_alias(
        self, session: Session, row: AdapterVersion, alias: str, action: str, reason: str | None
    ) -> int | None:
        """Point ``alias`` at ``row``; record the change; return the version it pointed at."""
        current = self._alias_row(session, row.adapter_name, alias)
        previous = session.get(AdapterVersion, current.version_id).version if current else None
        if current is None:
            session.add(Alias(adapter_name=row.adapter_name, name=alias, version_id=row.id))
        else:
            current.version_id = row.id
            current.updated_at = utcnow()
            session.add(current)
        session.add(AliasChange(adapter_name=row.adapter_name, alias=alias, from_version=previous,
                                to_version=row.version, action=action, actor=self.actor.label,
                                reason=reason))
        self.audit(session, action, f"{row.adapter_name}@{alias}", before={"version": previous},
                    after={"version": row.version}, reason=reason)
        return previous

    def set_alias(self, ref: str, alias: str, *, reason: str | None = None) -> VersionInfo:
        """Point a free alias (``candidate``, ``staging``...) at a version; gated aliases need `promote`."""
        check_alias(alias)
        if alias == LATEST:
            raise InvalidInput("'latest' always means the highest version and cannot be set")
        if alias in self.settings.gate.aliases:
            raise InvalidInput(f"{alias!r} is guarded by the promotion gate: use `promote {ref} --to {alias}`")
        parsed = VersionRef.parse(ref)
        self._authorize("alias.set", parsed.name, alias)

        def move(session: Session) -> VersionInfo:
            self._lock_adapter(session, parsed.name)
            row = self._version_row(session, parsed)
            self._move_alias(session, row, alias, "alias.set", reason)
            return self._info(session, row)

        return self._write(move)

    def set_output_check(self, ref: str, check: OutputCheck | None, *, reason: str | None = None) -> VersionInfo:
        """Declare (or with None, clear) what this version's answers must look like; the gateway
        applies it from its next routing-cache refresh."""
        parsed = VersionRef.parse(ref)

        def declare(session: Session) -> VersionInfo:
            self._lock_adapter(session, parsed.name)
            row = self._version_row(session, parsed)
            before = row.output_check
            row.output_check = check.model_dump() if check else None
            session.add(row)
            session.flush()
            info = self._info(session, row)
            self.audit(session, "output-check.set", info.ref, before={"output_check": before},
                        after={"output_check": row.output_check}, reason=reason)
            return info

        return self._write(declare)

    def remove_alias(self, name: str, alias: str, *, reason: str | None = None) -> None:
        self._authorize("alias.rm", name, alias)

        def remove(session: Session) -> None:
            current, version = self._locked_alias(session, name, alias)
            session.delete(current)
            session.add(AliasChange(adapter_name=name, alias=alias, from_version=version, to_version=None,
                                    action="alias.rm", actor=self.actor.label, reason=reason))
            self.audit(session, "alias.rm", f"{name}@{alias}", before={"version": version}, reason=reason)

        self._write(remove)

    def primary_eval(self, name: str) -> tuple[str, str]:
        """The suite and metric the gate reads for adapter ``name``."""
        return self._primary_eval(self.adapter(name))

    def _primary_eval(self, adapter: Adapter) -> tuple[str, str]:
        return (adapter.primary_suite or self.settings.gate.primary_suite,
                adapter.primary_metric or self.settings.gate.primary_metric)

    def _gate(
        self, session: Session, row: AdapterVersion, alias: str, commercial: bool | None, mau: int | None
    ) -> GateReport:
        suite, metric = self._primary_eval(session.get(Adapter, row.adapter_name))
        candidate = self._info(session, row)
        score = candidate.score(suite, metric)
        baselines = (
            self._baselines(session, row.base_model_id, suite, metric, score.eval_data_sha256) if score else {}
        )
        current_alias = self._alias_row(session, row.adapter_name, alias)
        current = (
            self._info(session, session.get(AdapterVersion, current_alias.version_id)) if current_alias else None
        )
        base_record = session.get(BaseModelRecord, row.base_model_id)
        licence_ids = dict.fromkeys([row.licence_id, base_record.licence_id])
        deployment = self.settings.deployment
        return evaluate_gate(GateInputs(
            candidate=candidate, alias=alias, suite=suite, metric=metric,
            tolerance=self.settings.gate.tolerance,
            baselines=baselines,
            served=_served_path(candidate, suite, metric, score),
            serves_quantized=self.settings.gateway.backend == "llamacpp",
            max_quality_loss_points=self.settings.quantize.max_quality_loss_points,
            current=current, licences=tuple(session.get(Licence, i) for i in licence_ids),
            contamination=self._latest_contamination(session, row.training_data_sha256),
            commercial=deployment.commercial if commercial is None else commercial,
            monthly_active_users=deployment.monthly_active_users if mau is None else mau,
        ))

    def check_gate(
        self, ref: str, *, to: str = "production", commercial: bool | None = None, mau: int | None = None
    ) -> GateReport:
        """What `promote` would decide, without moving anything."""
        with read_session(self.engine) as session:
            return self._gate(session, self._version_row(session, VersionRef.parse(ref)), to, commercial, mau)

    def promote(
        self,
        ref: str,
        *,
        to: str = "production",
        force: bool = False,
        reason: str | None = None,
        commercial: bool | None = None,
        mau: int | None = None,
    ) -> GateReport:
        """Move ``to`` to this version if the gate passes (or with ``force`` and a reason).

        Only the aliases in ``settings.gate.aliases`` are gated; for others the report is
        advisory and the alias moves."""
        check_alias(to)
        if force and not (reason and reason.strip()):
            raise InvalidInput("--force needs --reason: forced promotions are audited with their reason")
        parsed = VersionRef.parse(ref)
        gated = to in self.settings.gate.aliases
        self._authorize("promote.forced" if force else "promote", parsed.name, to)

        def attempt(session: Session) -> GateReport:
            self._lock_adapter(session, parsed.name)
            row = self._version_row(session, parsed)
            report = self._gate(session, row, to, commercial, mau)
            if gated and not report.passed and not force:
                return report
            forced = gated and not report.passed
            why = f"{reason} (gate: {'; '.join(report.reasons)})" if forced else reason
            self._move_alias(session, row, to, "promote.forced" if forced else "promote", why)
            return report

        report = self._write(attempt)
        if gated and not report.passed and not force:
            self._write(lambda session: self.audit(
                session, "promote", f"{parsed.name}@{to}", outcome="refused",
                after={"version": report.target}, reason="; ".join(report.reasons),
            ))
            raise GateRefused(report.target, report.reasons)
        return report

    def rollback(self, name: str, *, alias: str = "production", reason: str | None = None) -> VersionInfo:
        """Point ``alias`` back at the version it pointed to before its latest move."""
        check_name(name)
        self._authorize("rollback", name, alias)

        def roll_back(session: Session) -> VersionInfo:
            _, current_version = self._locked_alias(session, name, alias)
            # The newest forward move onto the current version says where it came from.
            change = session.exec(
                select(AliasChange)
                .where(AliasChange.adapter_name == name, AliasChange.alias == alias,
                       AliasChange.to_version == current_version, AliasChange.action != "rollback")
                .order_by(col(AliasChange.id).desc())
            ).first()
            if change is None or change.from_version is None:
                raise Conflict(f"{name}@{alias} has no earlier version to roll back to")
            target = self._version_row(session, VersionRef(name=name, version=change.from_version))
            self._move_alias(session, target, alias, "rollback", reason)
            return self._info(session, target)

        return self._write(roll_back)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasChange]:
        with read_session(self.engine) as session:
            query = select(AliasChange).where(AliasChange.adapter_name == name)
            if alias is not None:
                query = query.where(AliasChange.alias == alias)
            return list(session.exec(query.order_by(col(AliasChange.id))).all())

    # -- artifacts -------------------------------------------------------------------------

    def artifact_path(self, ref: str) -> Path:
        """The version's files, re-hashed against their sha256 before the path is returned."""
        return self._open_artifact(ref, self.get(ref).artifact_sha256)

    def _open_artifact(self, what: str, sha256: str, *, hint: str = "") -> Path:
        """``store.open``, its errors naming what the artifact is (a version, a base's GGUF)."""
        try:
            return self.store.open(sha256)
        except (ArtifactCorrupt, NotFound, StoreUnavailable) as exc:
            raise type(exc)(f"{what}: {exc}" + (f"; {hint}" if hint else "")) from exc

    def _store_file(self, path: Path) -> dict[str, Any]:
        """Put one file in the store (as a one-file artifact): how to find it again."""
        self.settings.home.mkdir(parents=True, exist_ok=True)  # with an object store it may hold nothing yet
        with tempfile.TemporaryDirectory(dir=self.settings.home) as staging:
            linked = Path(staging) / path.name
            try:
                os.link(path, linked)  # no copy where the file system allows
            except OSError:
                shutil.copyfile(path, linked)
            artifact = self.store.put(Path(staging))
        return {"artifact": artifact.sha256, "file": path.name, "sha256": artifact.files[0].sha256,
                "size": artifact.size}

    def add_artifact(self, ref: str, folder: Path, *, kind: str, type: str) -> VersionArtifact:
        """Store a file derived from a version (a GGUF LoRA, a merged model) and link it to the
        version; a newer artifact of the same kind and type replaces the link."""
        artifact = self.store.put(Path(folder))
        parsed = VersionRef.parse(ref)

        def link(session: Session) -> VersionArtifact:
            self._lock_adapter(session, parsed.name)
            row = self._version_row(session, parsed)
            existing = session.exec(select(VersionArtifact).where(
                VersionArtifact.version_id == row.id, VersionArtifact.kind == kind, VersionArtifact.type == type)).first()
            before = {"sha256": existing.sha256} if existing else {}
            if existing is not None:
                session.delete(existing)
                session.flush()
            linked = VersionArtifact(version_id=row.id, kind=kind, type=type, sha256=artifact.sha256,
                                     size=artifact.size)
            session.add(linked)
            self.audit(session, "artifact.add", f"{row.adapter_name}@{row.version}", before=before,
                        after={"kind": kind, "type": type, "sha256": artifact.sha256, "size": artifact.size})
            return linked

        return self._write(link)

    def derived_artifacts(self, ref: str) -> list[VersionArtifact]:
        with read_session(self.engine) as session:
            row = self._version_row(session, VersionRef.parse(ref))
            return list(session.exec(select(VersionArtifact).where(VersionArtifact.version_id == row.id)).all())

    def derived_artifact_path(self, ref: str, *, kind: str, type: str) -> Path:
        """The folder of a derived artifact, re-hashed before the path is returned."""
        found = [a for a in self.derived_artifacts(ref) if a.kind == kind and a.type == type]
        if not found:
            raise NotFound(f"{ref} has no {kind} artifact of type {type}")
        return self._open_artifact(f"{ref}'s {kind} artifact ({type})", found[0].sha256)

    def export(self, ref: str, destination: Path) -> Path:
        """Write the version's adapter files (verified) plus its record as JSON."""
        info = self.get(ref)
        try:
            export_artifact(self.store, info.artifact_sha256, Path(destination))
        except (ArtifactCorrupt, NotFound, StoreUnavailable) as exc:
            raise type(exc)(f"{ref}: {exc}") from exc
        (Path(destination) / METADATA_FILE).write_text(info.model_dump_json(indent=2))
        return Path(destination)

    def gc(self, *, dry_run: bool = False, grace_s: float = 3600) -> GcReport:
        """Delete stored artifacts no version references. ``grace_s`` spares fresh copies that a
        concurrent `register` has stored but not yet committed."""
        with read_session(self.engine) as session:
            referenced = set(session.exec(select(AdapterVersion.artifact_sha256)).all())
            referenced |= set(session.exec(select(VersionArtifact.sha256)).all())
            referenced |= {base.serving_gguf["artifact"] for base in session.exec(select(BaseModelRecord)).all()
                           if base.serving_gguf and "artifact" in base.serving_gguf}
        removed, freed = [], 0
        for digest in self.store.digests():
            if digest in referenced or self.store.age_s(digest) < grace_s:
                continue
            removed.append(digest)
            freed += self.store.size_of(digest)
            if not dry_run:
                self.store.remove(digest)
        if not dry_run:
            self.store.sweep(grace_s)
            if removed:
                self._write(lambda s: self.audit(s, "gc", "store", before={"removed": removed},
                                                  after={"freed_bytes": freed}))
        return GcReport(removed=removed, freed_bytes=freed, kept=len(referenced), dry_run=dry_run)

    def migrate_store(self, target: StoreSettings) -> StoreMigration:
        """Copy every artifact to the object store ``target``, read each back through an empty cache
        and check its sha256, and write every version's record there. Then point ``store.url`` at it."""
        if target.url is None or target.url == self.settings.store.url:
            raise InvalidInput("migrate-store needs an object store (s3://bucket/prefix) other than the current one")
        started = time.monotonic()
        copied, size = 0, 0
        self.settings.home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.settings.home) as scratch:
            destination = open_store(target, Path(scratch) / "unused", Path(scratch) / "upload-cache")
            reader = open_store(target, Path(scratch) / "unused", Path(scratch) / "check-cache")
            for digest in self.store.digests():
                stored = destination.put(self._open_artifact(f"artifact {digest[:12]}", digest))
                if stored.sha256 != digest:
                    raise ArtifactCorrupt(f"artifact {digest[:12]} arrived as {stored.sha256[:12]}")
                reader.open(digest)  # downloaded and re-hashed: the copy is whole
                reader.cache.remove(digest)  # the scratch holds one artifact at a time
                destination.cache.remove(digest)
                copied, size = copied + 1, size + stored.size
            versions = self.list_versions()
            for info in versions:
                destination.write_version(VersionRecord(info.name, info.version, info.artifact_sha256, info.base_model))
        report = StoreMigration(source=self.settings.store.url or str(self.settings.store_dir), target=target.url,
                                artifacts=copied, bytes=size, versions=len(versions),
                                seconds=round(time.monotonic() - started, 2))
        self.record_event("store.migrate", target.url, after=report.model_dump())
        return report

    def record_event(self, action: str, target: str, *, before: dict[str, Any] | None = None,
                     after: dict[str, Any] | None = None, reason: str | None = None, outcome: str = "ok") -> None:
        """Audit something done outside the registry's own operations (publish, rollouts)."""
        self._write(lambda s: self.audit(s, action, target, before=before, after=after, reason=reason,
                                          outcome=outcome))

    # -- audit -----------------------------------------------------------------------------

    def audit_log(self, *, target: str | None = None, limit: int = 100) -> list[AuditEntry]:
        with read_session(self.engine) as session:
            query = select(AuditEvent).order_by(col(AuditEvent.id).desc()).limit(limit)
            if target is not None:
                query = query.where(col(AuditEvent.target).startswith(target))
            rows = session.exec(query).all()
            return [AuditEntry.model_validate(r, from_attributes=True) for r in reversed(rows)]


def _is_race(exc: Exception) -> bool:
    """Unique violations and lock time-outs from a concurrent writer are worth a retry."""
    text = str(exc).lower()
    return any(s in text for s in ("unique", "duplicate key", "database is locked", "deadlock"))


def _served_path(candidate: VersionInfo, suite: str, metric: str, score: EvalScore | None) -> ServedPath | None:
    """The served path's newest score and loss, when measured on the primary score's eval data."""
    if score is None:
        return None
    served, loss = (candidate.score(served_suite(suite), m) for m in (metric, "quality_loss_points"))
    if served is None or loss is None or served.eval_data_sha256 != score.eval_data_sha256:
        return None
    return ServedPath(score=served, loss_points=loss.value)
