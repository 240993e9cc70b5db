"""The meter: one record per request, committed before the answer completes.

Records queue in memory and a background task writes them in one transaction per batch (group
commit): with ``meter_before_answer`` (the default) a finished request wakes it at once and the
answer's last bytes (a JSON body, a stream's ``[DONE]``) wait for that commit, so a ``kill -9``
loses no record of an answered request, and feedback sent to any replica finds it. If the database
does not answer within ``meter_commit_wait_s`` the answer goes out anyway (counted in
``loragate_meter_unconfirmed_total``) and the record waits for the next try. Without it, batches
go every ``meter_flush_interval_s`` (or at ``meter_batch_size``) and a ``kill -9`` loses the batch
not yet written. The rollouts the written records touched (and those with new feedback) are
checked at most every ``meter_flush_interval_s``: rollback, ramp steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import insert
from sqlmodel import SQLModel

from loragate.database import write_session
from loragate.registry import Registry

from .models import MeterRecord

log = logging.getLogger("loragate.gateway")
_LABELS = ("adapter", "version", "arm", "backend")


class Metrics:
    """Prometheus collectors, on a registry of the app's own (several apps can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("loragate_requests", "Requests served", [*_LABELS, "status"], registry=self.registry)
        self.latency = Histogram("loragate_request_latency_seconds", "Total request latency", _LABELS,
                                 registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.ttft = Histogram("loragate_time_to_first_token_seconds", "Time to first token", _LABELS,
                              registry=self.registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
        self.tokens = Counter("loragate_tokens", "Tokens processed", [*_LABELS, "kind"], registry=self.registry)
        self.cost = Counter("loragate_cost_usd", "Cost of the requests served, in US dollars", _LABELS,
                            registry=self.registry)
        self.queue = Gauge("loragate_backend_queue_depth", "Requests waiting for a backend slot", ["backend"],
                           registry=self.registry)
        self.unconfirmed = Counter("loragate_meter_unconfirmed", "Answers sent before their meter record was "
                                   "committed (the database did not answer in time)", registry=self.registry)
        self.stale_lookups = Counter("loragate_lookups_stale", "Routing and key lookups answered from the cache "
                                     "because the database was unavailable", ["what"], registry=self.registry)
        # Outcomes received by this replica (a repeated one counts again): success rate per arm is
        # rate(...{kind="success",outcome="true"}) / rate(...{kind="success"}).
        self.feedback = Counter("loragate_feedback", "Outcomes received on served requests",
                                ["adapter", "version", "arm", "kind", "outcome"], registry=self.registry)
        # Answers checked against their version's output check; pass rate = passed / checked.
        self.output_checked = Counter("loragate_output_checked", "Answers checked against the version's output check",
                                      _LABELS, registry=self.registry)
        # Shadow copies by outcome: compared, dropped (queue full), failed.
        self.shadow = Counter("loragate_shadow_copies", "Shadow copies of live requests, by outcome",
                              ["adapter", "outcome"], registry=self.registry)
        self.loop_lag = Histogram("loragate_event_loop_lag_seconds", "How much later than asked the event loop "
                                  "ran a timer (loop_lag.py): the gateway's own stalls", registry=self.registry,
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.output_passed = Counter("loragate_output_passed", "Answers that passed the version's output check",
                                     _LABELS, registry=self.registry)

    def observe(self, record: MeterRecord) -> None:
        labels = (record.adapter or "-", str(record.version or "-"), record.arm, record.backend)
        self.requests.labels(*labels, str(record.status)).inc()
        self.latency.labels(*labels).observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            self.ttft.labels(*labels).observe(record.ttft_ms / 1000)
        self.tokens.labels(*labels, "prompt").inc(record.prompt_tokens)
        self.tokens.labels(*labels, "completion").inc(record.completion_tokens)
        self.cost.labels(*labels).inc(record.cost_usd)
        if record.output_ok is not None:
            self.output_checked.labels(*labels).inc()
            self.output_passed.labels(*labels).inc(record.output_ok)


class Meter:
    def __init__(self, registry: Registry, metrics: Metrics, *, interval_s: float, batch_size: int,
                 after_flush: Callable[[set[int]], None], before_answer: bool = True, commit_wait_s: float = 5.0):
        self.registry, self.metrics = registry, metrics
        self.interval_s, self.batch_size, self.after_flush = interval_s, batch_size, after_flush
        self.before_answer, self.commit_wait_s = before_answer, commit_wait_s
        self._committed: dict[str, asyncio.Future] = {}  # request id -> resolved when its record is written
        self._due: set[int] = set()  # rollouts with new evidence, checked at most every interval_s
        self._checked_at = 0.0
        self._failing = False  # the last write failed
        self._pending: list[MeterRecord] = []
        self._writing: list[MeterRecord] = []  # the batch being written now
        self._touched: set[int] = set()  # rollouts with new evidence other than requests (feedback)
        self._rows: list[SQLModel] = []  # other rows written with the next batch (shadow pairs)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    def record(self, record: MeterRecord) -> None:
        self.metrics.observe(record)
        self._pending.append(record)
        if self.before_answer:
            self._committed[record.request_id] = asyncio.get_running_loop().create_future()
            self._wake.set()
        elif len(self._pending) >= self.batch_size:
            self._wake.set()

    async def committed(self, request_id: str) -> None:
        """Wait until the request's record is written (``meter_before_answer``), at most ``commit_wait_s``."""
        waiter = self._committed.get(request_id)
        if waiter is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.commit_wait_s)
        except TimeoutError:
            self.metrics.unconfirmed.inc()

    def add(self, row: SQLModel) -> None:
        """Write ``row`` with the next batch, off the request path like the records."""
        self._rows.append(row)

    def pending_record(self, request_id: str) -> MeterRecord | None:
        """A record still queued here (feedback can arrive before its batch is written)."""
        return next((r for r in (*self._writing, *self._pending) if r.request_id == request_id), None)

    def touch(self, rollout_id: int) -> None:
        """New evidence for a rollout (feedback): check it at the next flush, requests or not."""
        self._touched.add(rollout_id)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        await self.flush()

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
            except TimeoutError:
                pass
            if self._failing:  # the database is away: try again once an interval, not at every request
                await asyncio.sleep(self.interval_s)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        self._due |= self._touched
        self._touched = set()
        if self._pending or self._rows:
            batch, self._pending = self._pending, []
            rows, self._rows = self._rows, []
            self._writing = batch
            try:
                await asyncio.to_thread(self._write, batch, rows)
            except Exception:  # the database is away: keep the records and try again next time
                if not self._failing:  # once an outage, not once a try
                    log.exception("meter write failed; %d records kept for the next try", len(batch) + len(rows))
                self._failing = True
                self._pending = batch + self._pending
                self._rows = rows + self._rows
                return
            finally:
                self._writing = []
            if self._failing:
                log.warning("meter writes again; the records kept meanwhile are written")
                self._failing = False
            for record in batch:
                waiter = self._committed.pop(record.request_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            self._due |= {r.rollout_id for r in batch if r.rollout_id is not None}
        if self._due and (self._stopping or time.monotonic() - self._checked_at >= self.interval_s):
            due, self._due = self._due, set()
            self._checked_at = time.monotonic()
            await self._check(due)

    async def _check(self, rollouts: set[int]) -> None:
        try:
            await asyncio.to_thread(self.after_flush, rollouts)
        except Exception:  # a failed check must not stop the meter; the next batch checks again
            log.exception("rollout check failed for %s", sorted(rollouts))

    def _write(self, batch: list[MeterRecord], rows: list[SQLModel]) -> None:
        with write_session(self.registry.engine) as session:
            if batch:  # one executemany, not the ORM's unit of work: it runs while answers wait for it
                session.execute(insert(MeterRecord), [r.model_dump(exclude={"id"}) for r in batch])
            session.add_all(rows)
