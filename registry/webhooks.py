"""Webhooks: other systems told when versions, scores, aliases and rollouts change.

Delivery is at least once, from an outbox: ``Registry.audit`` writes one ``WebhookDelivery`` row per
subscribed webhook in the transaction of the change it reports, so a change that commits has its
events and a crash of any process loses none. ``WebhookSender`` (``webhook_sender.py``: in every
gateway replica, or ``loragate webhooks deliver``) posts them, signed as Standard Webhooks specifies
(https://www.standardwebhooks.com, the scheme of OpenAI's own webhooks):

    webhook-id: evt_...                      the event's id; deduplicate on it
    webhook-timestamp: 1764322800            unix seconds; refuse old ones (replay window)
    webhook-signature: v1,<base64 HMAC-SHA256 over "id.timestamp.body", keyed by the secret>

Any Standard Webhooks library verifies it (``standardwebhooks.Webhook(secret).verify(body,
headers)`` allows 5 minutes of clock difference either way).
"""

from __future__ import annotations

import json
import secrets
import uuid
from base64 import b64encode
from datetime import datetime
from typing import TYPE_CHECKING

import httpx
from pydantic import BaseModel
from sqlalchemy import text
from sqlmodel import Session, col, select
from standardwebhooks import Webhook as Signer

from loragate.database import read_session, write_session

from .errors import Conflict, InvalidInput, NotFound
from .models import AuditEvent, Webhook, WebhookDelivery, utcnow

if TYPE_CHECKING:
    from .api import Registry

# Event types and what they report; each comes from the audited registry or rollout action.
EVENT_TYPES: dict[str, str] = {
    "version.registered": "a version was registered",
    "eval.recorded": "eval scores were recorded for a version or a base",
    "alias.moved": "an alias moved: promote, rollback, alias set or removed",
    "promotion.refused": "the gate or an alias policy refused to move an alias",
    "rollout.started": "a rollout began splitting traffic",
    "rollout.weight_changed": "a rollout's weight changed, by hand or by a ramp step",
    "rollout.promoted": "a rollout ended with its candidate in production",
    "rollout.aborted": "a rollout was aborted by hand",
    "rollout.rolled_back": "a guardrail ended a rollout",
    "shadow.started": "a shadow rollout began sending copies of requests to a candidate",
    "shadow.ended": "a shadow rollout ended: promoted or aborted",
}
_BY_ACTION = {
    "register": "version.registered",
    "eval.add": "eval.recorded",
    **dict.fromkeys(("promote", "promote.forced", "rollback", "alias.set", "alias.rm"), "alias.moved"),
    "rollout.start": "rollout.started",
    "rollout.set-weight": "rollout.weight_changed",
    "rollout.step": "rollout.weight_changed",
    "rollout.promoted": "rollout.promoted",
    "rollout.aborted": "rollout.aborted",
    "rollout.rolled_back": "rollout.rolled_back",
    "shadow.start": "shadow.started",
    **dict.fromkeys(("shadow.promoted", "shadow.aborted", "shadow.rolled_back"), "shadow.ended"),
}
ALL = "*"


def event_type(action: str, outcome: str) -> str | None:
    """The webhook event an audited action is, if any."""
    kind = _BY_ACTION.get(action)
    if outcome == "refused":
        return "promotion.refused" if kind == "alias.moved" else None
    return kind


def enqueue(session: Session, event: AuditEvent) -> None:
    """Write ``event``'s deliveries, one per webhook that wants it, in the caller's transaction."""
    kind = event_type(event.action, event.outcome)
    if kind is None:
        return
    hooks = [h for h in session.exec(select(Webhook).where(col(Webhook.removed_at).is_(None))).all()
             if ALL in h.events or kind in h.events]
    if not hooks:
        return
    event_id = f"evt_{uuid.uuid4().hex}"
    adapter = event.target.partition("@")[0] if ":" not in event.target else ""
    if session.get_bind().dialect.name == "postgresql":
        # Outbox ids are taken at insert, not at commit: without this, two transactions about one
        # adapter (a rollout's rollback, an alias set) could commit out of id order and the sender
        # would deliver them out of order. SQLite serialises every writer already.
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:adapter))"), {"adapter": f"webhook:{adapter}"})
    session.flush()  # the audit id goes into the body
    body = json.dumps({
        "id": event_id, "type": kind, "created_at": event.created_at.isoformat(), "adapter": adapter or None,
        "data": {"action": event.action, "target": event.target, "actor": event.actor, "outcome": event.outcome,
                 "before": event.before, "after": event.after, "reason": event.reason, "audit_id": event.id},
    }, sort_keys=True)
    for hook in hooks:
        session.add(WebhookDelivery(webhook_id=hook.id, event_id=event_id, event_type=kind, adapter=adapter,
                                    body=body))


class WebhookInfo(BaseModel):
    id: int
    url: str
    events: list[str]
    pending: int = 0
    delivered: int = 0
    failed: int = 0


class CreatedWebhook(BaseModel):
    webhook: WebhookInfo
    secret: str  # shown once by the CLI; receivers verify with it


class DeliveryInfo(BaseModel):
    id: int
    webhook_id: int
    event_id: str
    event_type: str
    adapter: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class Webhooks:
    """Subscriptions and their delivery log.

    >>> hooks = Webhooks(Registry())
    >>> created = hooks.add("https://ci.example.com/loragate", events=["alias.moved"])
    """

    def __init__(self, registry: Registry):
        self.registry = registry

    def add(self, url: str, *, events: list[str] | None = None, secret: str | None = None) -> CreatedWebhook:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise InvalidInput(f"{url!r} is not a URL ({exc})") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise InvalidInput(f"a webhook URL is http:// or https:// with a host, not {url!r}")
        wanted = events or [ALL]
        unknown = [e for e in wanted if e != ALL and e not in EVENT_TYPES]
        if unknown:
            raise InvalidInput(f"unknown event types {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}")
        secret = secret or "whsec_" + b64encode(secrets.token_bytes(32)).decode()
        try:
            Signer(secret)
        except Exception as exc:  # the library says why (not base64, empty)
            raise InvalidInput(f"a webhook secret is whsec_ followed by base64 ({exc})") from exc

        with write_session(self.registry.engine) as session:
            hook = Webhook(url=url, events=wanted, secret=secret)
            session.add(hook)
            session.flush()
            self.registry.audit(session, "webhook.add", f"webhook:{hook.id}", after={"url": url, "events": wanted})
        return CreatedWebhook(webhook=WebhookInfo(id=hook.id, url=url, events=wanted), secret=secret)

    def remove(self, webhook_id: int) -> None:
        """Stop sending to it; what is still pending for it is dropped (kept in the log as failed)."""
        with write_session(self.registry.engine) as session:
            hook = session.get(Webhook, webhook_id)
            if hook is None or hook.removed_at is not None:
                raise NotFound(f"no webhook {webhook_id}")
            hook.removed_at = utcnow()
            session.add(hook)
            for delivery in session.exec(select(WebhookDelivery).where(
                    WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.status == "pending")).all():
                delivery.status, delivery.last_error = "failed", "webhook removed"
                session.add(delivery)
            self.registry.audit(session, "webhook.rm", f"webhook:{webhook_id}", before={"url": hook.url})

    def list(self) -> list[WebhookInfo]:
        with read_session(self.registry.engine) as session:
            hooks = session.exec(select(Webhook).where(col(Webhook.removed_at).is_(None)).order_by(Webhook.id)).all()
            counts: dict[tuple[int, str], int] = {}
            for webhook_id, status in session.exec(select(WebhookDelivery.webhook_id, WebhookDelivery.status)).all():
                counts[webhook_id, status] = counts.get((webhook_id, status), 0) + 1
        return [WebhookInfo(id=h.id, url=h.url, events=h.events, **{s: counts.get((h.id, s), 0)
                                                                  for s in ("pending", "delivered", "failed")})
                for h in hooks]

    def deliveries(self, *, webhook_id: int | None = None, status: str | None = None,
                   limit: int = 100) -> list[DeliveryInfo]:
        """The delivery log, newest first."""
        with read_session(self.registry.engine) as session:
            query = select(WebhookDelivery).order_by(col(WebhookDelivery.id).desc()).limit(limit)
            if webhook_id is not None:
                query = query.where(WebhookDelivery.webhook_id == webhook_id)
            if status is not None:
                query = query.where(WebhookDelivery.status == status)
            return [DeliveryInfo.model_validate(d, from_attributes=True) for d in session.exec(query).all()]

    def redeliver(self, delivery_id: int) -> None:
        """Send a failed (or delivered) event again, from a fresh count of attempts."""
        with write_session(self.registry.engine) as session:
            delivery = session.get(WebhookDelivery, delivery_id)
            if delivery is None:
                raise NotFound(f"no webhook delivery {delivery_id}")
            if delivery.status == "pending":
                raise Conflict(f"delivery {delivery_id} is still pending: it is being sent or retried")
            hook = session.get(Webhook, delivery.webhook_id)
            if hook is None or hook.removed_at is not None:
                raise InvalidInput(f"webhook {delivery.webhook_id} was removed")
            delivery.status, delivery.attempts, delivery.next_attempt_at, delivery.leased_until = "pending", 0, 0.0, None
            session.add(delivery)
