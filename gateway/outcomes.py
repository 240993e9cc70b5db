"""Outcomes of served requests: feedback from the caller (``POST /v1/feedback``), per request and
kind, attached to the arm and version that served it.

Sent by the key that made the request (or an admin key), as late as it comes: a rollout counts
every outcome of its requests whenever it arrives. Sending the same kind again for a request
replaces the earlier value, so a retried call changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from loragate.database import read_session, write_session
from loragate.registry import Registry

from .errors import GatewayError
from .models import Feedback, MeterRecord, utcnow

if TYPE_CHECKING:
    import openai


class FeedbackRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=128, description="The x-request-id of the served request.")
    success: bool | None = Field(None, description="Did the answer do its job?")
    score: float | None = Field(None, ge=0, le=1, description="How good it was, 0..1.")
    label: str | None = Field(None, max_length=64, description="A label such as thumbs_up / thumbs_down.")
    comment: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _something(self) -> FeedbackRequest:
        if self.success is None and self.score is None and self.label is None:
            raise ValueError("send at least one of success, score, label")
        return self

    def rows(self) -> list[tuple[str, float | None, str | None]]:
        """(kind, value, label) for each kind given."""
        rows = []
        if self.success is not None:
            rows.append(("success", float(self.success), None))
        if self.score is not None:
            rows.append(("score", self.score, None))
        if self.label is not None:
            rows.append(("label", None, self.label))
        return rows


class FeedbackReceipt(BaseModel):
    request_id: str
    adapter: str | None
    version: int | None
    arm: str
    rollout_id: int | None
    kinds: list[str]


class FeedbackService:
    def __init__(self, registry: Registry):
        self.registry = registry

    def _served(self, request_id: str, queued: MeterRecord | None) -> MeterRecord:
        if queued is not None:
            return queued
        with read_session(self.registry.engine) as session:
            record = session.exec(select(MeterRecord).where(MeterRecord.request_id == request_id)).first()
        if record is None:
            raise GatewayError(404, f"no served request has the id '{request_id}' (if it was just answered by "
                                    f"another replica, retry in a second)", code="request_not_found",
                               param="request_id")
        return record

    def record(self, feedback: FeedbackRequest, key_id: str | None, admin: bool,
               queued: MeterRecord | None = None) -> FeedbackReceipt:
        """``queued``: the request's meter record if it is still in this replica's queue, looked up
        before the database (a record leaves the queue only once it is committed)."""
        served = self._served(feedback.request_id, queued)
        if not admin and served.key_id != key_id:
            raise GatewayError(403, "feedback must come from the key that made the request, or an admin key",
                               code="not_your_request", param="request_id")
        for kind, value, label in feedback.rows():
            try:
                self._upsert(served, kind, value, label, feedback.comment, key_id)
            except IntegrityError:  # the same kind arrived at once through another replica: update it
                self._upsert(served, kind, value, label, feedback.comment, key_id)
        return FeedbackReceipt(request_id=served.request_id, adapter=served.adapter, version=served.version,
                               arm=served.arm, rollout_id=served.rollout_id, kinds=[k for k, _, _ in feedback.rows()])

    def _upsert(self, served: MeterRecord, kind: str, value: float | None, label: str | None, comment: str | None,
                key_id: str | None) -> None:
        with write_session(self.registry.engine) as session:
            row = session.exec(select(Feedback).where(Feedback.request_id == served.request_id,
                                                      Feedback.kind == kind)).first()
            if row is None:
                row = Feedback(request_id=served.request_id, kind=kind, adapter=served.adapter,
                               version=served.version, arm=served.arm, rollout_id=served.rollout_id)
            row.value, row.label, row.comment, row.key_id, row.updated_at = value, label, comment, key_id, utcnow()
            session.add(row)

    def of_rollout(self, rollout_id: int) -> list[Feedback]:
        with read_session(self.registry.engine) as session:
            return list(session.exec(select(Feedback).where(Feedback.rollout_id == rollout_id)).all())


def send_feedback(client: openai.OpenAI, request_id: str, *, success: bool | None = None, score: float | None = None,
                  label: str | None = None, comment: str | None = None) -> FeedbackReceipt:
    """Send an outcome with the ``openai`` client already pointed at the gateway (its base URL and
    key): ``send_feedback(client, response.headers["x-request-id"], success=True)``."""
    body = FeedbackRequest(request_id=request_id, success=success, score=score, label=label, comment=comment)
    answer = client.post("/feedback", body=body.model_dump(exclude_none=True), cast_to=httpx.Response)
    return FeedbackReceipt.model_validate(answer.json())
