"""``WebhookSender``: posts the outbox's due deliveries, signed, with retries and backoff.

Any number of senders (gateway replicas, ``loragate webhooks deliver``) may run against one
database: a sender claims a delivery by setting its lease with a conditional UPDATE, so only one
holds it at a time, and a sender killed mid-send leaves a lease that runs out, after which another
sends the event again (at least once; receivers deduplicate on ``webhook-id``). Per webhook and
adapter only the oldest pending delivery is sent, so one adapter's events arrive in order; a
receiver that is down or slow holds its own queue and nothing else (each send is one worker of a
pool, bounded by ``timeout_s``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import NamedTuple

import httpx
from sqlalchemy import or_, update
from sqlmodel import col, select
from standardwebhooks import Webhook as Signer

from loragate.database import read_session, write_session
from loragate.settings import WebhookSettings

from .api import Registry
from .models import Webhook, WebhookDelivery, utcnow

log = logging.getLogger("loragate.webhooks")
Queue = tuple[int, str]  # (webhook id, adapter): the unit of ordering


class _Head(NamedTuple):
    """The oldest pending delivery of a queue, as much of it as scheduling needs."""

    id: int
    webhook_id: int
    adapter: str
    next_attempt_at: float
    leased_until: float | None


class WebhookSender:
    def __init__(self, registry: Registry, settings: WebhookSettings | None = None):
        self.registry = registry
        self.settings = settings or registry.settings.webhooks
        self._client = httpx.Client(timeout=self.settings.timeout_s, follow_redirects=False,
                                    headers={"user-agent": "loragate-webhooks"})
        self._pool = ThreadPoolExecutor(self.settings.workers, thread_name_prefix="webhook")
        self._in_flight: dict[Queue, Future] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass -----------------------------------------------------------------------------

    def send_due(self) -> int:
        """Claim and start sending the head of every queue that is due and not already in flight, as
        far as free workers go; one webhook takes at most half of them, so a slow one leaves room."""
        self._in_flight = {q: f for q, f in self._in_flight.items() if not f.done()}
        now = time.time()
        started = 0
        per_webhook = max(1, self.settings.workers // 2)
        for delivery in self._due_heads(now):
            queue = (delivery.webhook_id, delivery.adapter)
            if len(self._in_flight) >= self.settings.workers:
                break
            busy = sum(1 for webhook_id, _ in self._in_flight if webhook_id == delivery.webhook_id)
            if queue in self._in_flight or busy >= per_webhook:
                continue
            lease = self._claim(delivery.id, now)
            if lease is None:
                continue
            self._in_flight[queue] = self._pool.submit(self._send, delivery.id, lease)
            started += 1
        return started

    def _due_heads(self, now: float) -> list[_Head]:
        # The scheduling columns only: this runs every tick in every replica, and bodies are read at send.
        with read_session(self.registry.engine) as session:
            pending = session.exec(select(WebhookDelivery.id, WebhookDelivery.webhook_id, WebhookDelivery.adapter,
                                          WebhookDelivery.next_attempt_at, WebhookDelivery.leased_until)
                                   .where(WebhookDelivery.status == "pending").order_by(col(WebhookDelivery.id))).all()
        heads: dict[Queue, _Head] = {}
        for row in pending:
            heads.setdefault((row.webhook_id, row.adapter), _Head(*row))
        return [d for d in heads.values()
                if d.next_attempt_at <= now and (d.leased_until is None or d.leased_until < now)]

    def _claim(self, delivery_id: int, now: float) -> float | None:
        """Hold a due delivery until the returned lease (its token), or None if another sender holds it."""
        lease = now + self.settings.lease_s
        with write_session(self.registry.engine) as session:
            claimed = session.exec(  # type: ignore[call-overload]
                update(WebhookDelivery)
                .where(col(WebhookDelivery.id) == delivery_id, col(WebhookDelivery.status) == "pending",
                       col(WebhookDelivery.next_attempt_at) <= now,
                       or_(col(WebhookDelivery.leased_until).is_(None), col(WebhookDelivery.leased_until) < now))
                .values(leased_until=lease))
            return lease if claimed.rowcount == 1 else None

    def _send(self, delivery_id: int, lease: float) -> None:
        with read_session(self.registry.engine) as session:
            delivery = session.get(WebhookDelivery, delivery_id)
            hook = session.get(Webhook, delivery.webhook_id)
        if hook.removed_at is not None:
            return self._record(delivery, lease, None, "webhook removed", give_up=True)
        try:
            timestamp = datetime.now(UTC)
            headers = {"content-type": "application/json", "webhook-id": delivery.event_id,
                       "webhook-timestamp": str(int(timestamp.timestamp())),
                       "webhook-signature": Signer(hook.secret).sign(delivery.event_id, timestamp, delivery.body)}
            response = self._client.post(hook.url, content=delivery.body.encode(), headers=headers)
        except Exception as exc:  # refused, timed out, a URL httpx cannot use: a failed attempt, recorded
            return self._record(delivery, lease, None, f"{type(exc).__name__}: {exc}"[:500])
        error = None if response.is_success else f"HTTP {response.status_code}: {response.text[:200]}"
        self._record(delivery, lease, response.status_code, error)

    def _record(self, delivery: WebhookDelivery, lease: float, status_code: int | None, error: str | None,
                give_up: bool = False) -> None:
        """Write an attempt's outcome, unless the lease ran out meanwhile and another sender holds it."""
        attempts = delivery.attempts + 1
        values: dict = {"attempts": attempts, "last_status_code": status_code, "last_error": error, "leased_until": None}
        if error is None:
            values.update(status="delivered", delivered_at=utcnow())
        elif give_up or attempts >= self.settings.max_attempts:
            values.update(status="failed")
        else:  # exponential backoff with jitter, so that receivers coming back are not stampeded
            wait = min(self.settings.max_backoff_s, self.settings.backoff_s * 2 ** (attempts - 1))
            values.update(next_attempt_at=time.time() + wait * random.uniform(0.8, 1.2))
        with write_session(self.registry.engine) as session:
            session.exec(update(WebhookDelivery)  # type: ignore[call-overload]
                         .where(col(WebhookDelivery.id) == delivery.id, col(WebhookDelivery.status) == "pending",
                                col(WebhookDelivery.leased_until) == lease)
                         .values(**values))

    # -- running ----------------------------------------------------------------------------

    def run(self, *, once: bool = False) -> None:
        """Send until stopped (``once``: what is due now, each queue drained as far as it goes, then return)."""
        while not self._stop.is_set():
            try:
                started = self.send_due()
            except Exception:  # the database is away: try again at the next tick, never stop sending
                log.exception("webhook sender: looking for due deliveries failed")
                started = 0
            if once and not started and not any(not f.done() for f in self._in_flight.values()):
                return
            self._stop.wait(self.settings.interval_s if not once else 0.05)

    def start(self) -> None:
        """Send in a background thread (the gateway's)."""
        self._thread = threading.Thread(target=self.run, name="webhook-sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout_s + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
