"""An engine pool: one base model served by many engine replicas, each request sent to one.

Replicas are vLLM servers with loragate's resolver and ``loragate engine serve`` processes
(llama.cpp): both serve ``model="name@N"`` by fetching that version from the store, and both
answer vLLM's ``/health``, ``/metrics`` and ``/v1/models``, so one client (``VllmBackend`` in
resolver mode, one per replica) talks to either.

Which replica: ``placement.py`` decides from this gateway's own view of each replica (the adapters
it holds, least recently used first, and its load), which the watch loop corrects every
``health_interval_s`` from the replica itself: ``/v1/models`` for its adapters, ``/metrics`` for the
requests it runs and queues (other gateways' included), ``/health`` for whether it is up.
Membership: ``pool.replicas``; every address that a ``pool.dns`` URL's host name resolves to now (a
Kubernetes headless Service lists its ready pods so); and, with ``pool.discover``, the engines whose
heartbeat in the database is fresh. They join and leave while the gateway runs.

Failover: a replica that fails before anything was streamed is marked down and the request goes
once to another; one that fails mid-stream ends the answer with an error (the client has text
already). The gateway meters each request once, whichever replicas it tried.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select

from loragate.database import read_session
from loragate.registry import Registry
from loragate.settings import PoolSettings, VllmSettings

from ..models import EngineReplica, utcnow
from .base import BackendUnavailable, Delta, Generation
from .placement import POLICIES, AffinityPolicy, NoReplica, ReplicaState
from .vllm import VllmBackend

log = logging.getLogger("loragate.gateway")
_RUNNING, _WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"


@dataclass
class Replica:
    url: str
    backend: VllmBackend
    state: ReplicaState
    in_flight: int = 0  # this gateway's requests there now
    others: int = 0  # the replica's own count beyond ours at the last probe: other gateways' requests
    # Why it is in the pool: "settings", "heartbeat" (announced in the database; leaves when that stops)
    # or the pool.dns URL whose name resolved to it (leaves when the name no longer does).
    source: str = "settings"
    failed_probes: int = 0  # in a row
    # Adapters we sent it to load, and when: a probe may not list them yet.
    placed: dict[str, float] = field(default_factory=dict)

    def count(self, adapter: str | None, change: int) -> None:
        self.in_flight += change
        self.state.load = self.in_flight + self.others
        if adapter is not None:
            self.state.active[adapter] += change


class PoolMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.decisions = Counter("loragate_pool_routing_decisions", "Requests routed to an engine replica, by reason",
                                 ["replica", "reason"], registry=registry)
        self.loads = Counter("loragate_pool_adapter_loads", "Requests that made a replica load their adapter",
                             ["replica", "adapter"], registry=registry)
        self.evictions = Counter("loragate_pool_adapter_evictions", "Adapters a load evicted from a replica "
                                 "(its least recently used)", ["replica", "adapter"], registry=registry)
        self.load_seconds = Histogram("loragate_pool_load_first_token_seconds", "Time to first token of requests "
                                      "that loaded their adapter", ["replica"], registry=registry,
                                      buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.failovers = Counter("loragate_pool_failovers", "Requests sent to another replica after one failed "
                                 "before streaming", ["replica"], registry=registry)
        self.queue = Gauge("loragate_pool_replica_requests", "Requests running or waiting at a replica (all "
                           "gateways')", ["replica"], registry=registry)
        self.resident = Gauge("loragate_pool_replica_adapters", "Adapters a replica holds, in this gateway's view",
                              ["replica"], registry=registry)
        self.up = Gauge("loragate_pool_replica_up", "Whether the replica answers its health check", ["replica"],
                        registry=registry)


class EnginePool:
    name = "pool"
    artifact_kind = "peft"  # vLLM's resolver reads the store's version record; engine serve resolves its GGUF
    fetches_artifacts = True

    def __init__(self, settings: PoolSettings, timeout_s: float, registry: Registry,
                 metrics_registry: CollectorRegistry, heartbeat_s: float):
        self.settings, self.timeout_s, self.registry = settings, timeout_s, registry
        self.base_model, self.weights, self.slots = settings.base_model, settings.served_name, settings.slots
        self.policy = (AffinityPolicy(settings.hot_queue) if settings.policy == "affinity"
                       else POLICIES[settings.policy]())
        self.metrics = PoolMetrics(metrics_registry)
        self.fresh_s = 3 * heartbeat_s  # an announced engine silent longer has left
        self.replicas: dict[str, Replica] = {}
        self._rows: dict[str, EngineReplica] = {}  # the announced engines at the last look
        self._leaving: list[Replica] = []  # out of the pool, closed once their requests end
        self._clock = itertools.count()
        self._client: httpx.AsyncClient | None = None
        self._watch: asyncio.Task | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, busy_s: float) -> float:
        return self.settings.price.request_cost(tokens=prompt_tokens + completion_tokens, busy_s=busy_s,
                                                slots=self.slots)

    @property
    def queue_depth(self) -> int:
        return sum(r.state.load for r in self.replicas.values())

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=2)
        await self.refresh()
        self._watch = asyncio.create_task(self._watch_loop())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for replica in [*self.replicas.values(), *self._leaving]:
            await replica.backend.stop()
        if self._client is not None:
            await self._client.aclose()

    async def health(self) -> dict:
        """What the gateway's /health reports: each replica, whether it is up, and what it holds."""
        return {"up": any(r.state.healthy for r in self.replicas.values()), "policy": self.settings.policy,
                "replicas": [{"url": r.url, "up": r.state.healthy, "load": r.state.load, "max_loras": r.state.max_loras,
                              "adapters": list(r.state.resident), "source": r.source}
                             for r in self.replicas.values()]}

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: Generation) -> AsyncIterator[Delta]:
        adapter = request.adapter.key if request.adapter else None
        tried: set[str] = set()
        while True:
            replica, loads = self._place(adapter, tried)
            replica.count(adapter, +1)
            started = time.perf_counter()
            stream = replica.backend.generate(request)
            try:
                first = await anext(stream)
            except BackendUnavailable:  # nothing was streamed: another replica may answer
                replica.count(adapter, -1)
                await stream.aclose()
                self._mark_down(replica)
                if tried:
                    raise
                tried.add(replica.url)
                self.metrics.failovers.labels(replica.url).inc()
                log.warning("engine replica %s failed before streaming; trying another", replica.url)
                continue
            except BaseException:
                replica.count(adapter, -1)
                await stream.aclose()
                raise
            if loads:
                self.metrics.load_seconds.labels(replica.url).observe(time.perf_counter() - started)
            try:
                yield first
                async for delta in stream:
                    yield delta
            finally:
                replica.count(adapter, -1)
                await stream.aclose()
            return

    def _place(self, adapter: str | None, excluded: set[str]) -> tuple[Replica, bool]:
        candidates = [r.state for url, r in self.replicas.items() if url not in excluded]
        try:
            placement = self.policy.choose(adapter, candidates)
        except NoReplica as exc:
            raise BackendUnavailable(f"no engine replica of {self.base_model} is up; try again shortly") from exc
        replica = self.replicas[placement.replica]
        evicted = replica.state.use(adapter, next(self._clock))
        self.metrics.decisions.labels(replica.url, placement.reason).inc()
        if placement.loads:
            self.metrics.loads.labels(replica.url, adapter).inc()
            replica.placed[adapter] = time.monotonic()
        if evicted is not None:
            self.metrics.evictions.labels(replica.url, evicted).inc()
        return replica, placement.loads

    def _mark_down(self, replica: Replica) -> None:
        replica.state.healthy = False
        replica.state.resident.clear()  # what it holds when it is back, its /v1/models will say
        self.metrics.up.labels(replica.url).set(0)

    # -- membership and probes -----------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.refresh()
            except Exception:  # a probe's surprise must not end the loop
                log.exception("engine pool: refresh failed")

    async def refresh(self) -> None:
        """Bring membership up to date, then probe every replica."""
        wanted = dict.fromkeys(self.settings.replicas, "settings")
        wanted.update(await self._resolved())
        if self.settings.discover:
            announced = await asyncio.to_thread(self._announced)
            if announced is None:  # the database is away: keep the announced engines we know
                announced = {u: r.source for u, r in self.replicas.items() if r.source == "heartbeat"}
            wanted.update(announced)
        for url in list(self.replicas):
            if url not in wanted:
                self._leave(url)
        for url, source in wanted.items():
            if url not in self.replicas:
                await self._join(url, source)
        await asyncio.gather(*(self._probe(r) for r in self.replicas.values()))
        for replica in [r for r in self._leaving if r.in_flight == 0]:
            self._leaving.remove(replica)
            await replica.backend.stop()

    async def _resolved(self) -> dict[str, str]:
        """A URL per address each ``pool.dns`` URL's host name resolves to now, mapped to that entry. A name
        that does not resolve in time (the resolver away, a Service with no ready pod) keeps its members."""
        found: dict[str, str] = {}
        for entry, addresses in zip(self.settings.dns, await asyncio.gather(
                *(self._addresses(httpx.URL(entry)) for entry in self.settings.dns))):
            if addresses is None:
                found.update({u: entry for u, r in self.replicas.items() if r.source == entry})
            for url in addresses or ():
                found[url] = entry
        return found

    @staticmethod
    async def _addresses(url: httpx.URL) -> list[str] | None:
        try:
            # Bounded: a slow resolver must not hold up the probes of the replicas we have.
            addresses = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(
                url.host, url.port, type=socket.SOCK_STREAM), timeout=2)
        except (OSError, TimeoutError):
            return None
        return [f"{url.scheme}://{f'[{a[0]}]' if family == socket.AF_INET6 else a[0]}:{url.port}{url.path}".rstrip("/")
                for family, *_, a in addresses]

    def _announced(self) -> dict[str, str] | None:
        since = utcnow() - timedelta(seconds=self.fresh_s)
        try:
            with read_session(self.registry.engine) as session:
                rows = session.exec(select(EngineReplica).where(EngineReplica.base_model == self.base_model,
                                                                col(EngineReplica.heartbeat_at) >= since)).all()
        except OperationalError:
            return None
        self._rows = {row.url.rstrip("/"): row for row in rows}
        return dict.fromkeys(self._rows, "heartbeat")

    async def _join(self, url: str, source: str) -> None:
        row = self._rows.get(url) if source == "heartbeat" else None  # an engine announces its own slots
        max_loras = row.max_loras if row is not None else self.settings.max_loras
        backend = VllmBackend(VllmSettings(base_model=self.base_model, url=url, served_model_name=self.settings.served_name,
                                           adapters="resolver", max_loras=max_loras, retry_s=0,
                                           slots=row.slots if row is not None else self.slots),
                              self.timeout_s)
        await backend.start()
        self.replicas[url] = Replica(url, backend, ReplicaState(id=url, max_loras=max_loras, healthy=False),
                                     source=source)
        log.info("engine pool: %s joined (%d adapter slots)", url, max_loras)

    def _leave(self, url: str) -> None:
        replica = self.replicas.pop(url)
        self._leaving.append(replica)
        for gauge in (self.metrics.up, self.metrics.queue, self.metrics.resident):
            try:
                gauge.remove(url)
            except KeyError:  # never probed up
                pass
        log.info("engine pool: %s left", url)

    async def _probe(self, replica: Replica) -> None:
        try:
            health, metrics, models = await asyncio.gather(
                self._client.get(f"{replica.url}/health"), self._client.get(f"{replica.url}/metrics"),
                self._client.get(f"{replica.url}/v1/models"))
            up = health.status_code == 200 and models.status_code == 200
        except httpx.HTTPError:
            up = False
        if not up:
            replica.failed_probes += 1
            if replica.failed_probes >= 2 or not replica.state.healthy:  # one slow answer is not down
                if replica.state.healthy:
                    log.warning("engine pool: %s is down", replica.url)
                self._mark_down(replica)
            return
        replica.failed_probes = 0
        if not replica.state.healthy:
            log.info("engine pool: %s is up", replica.url)
        replica.state.healthy = True
        running = _metric_sum(metrics.text, {_RUNNING, _WAITING})
        replica.others = max(0, int(running) - replica.in_flight)
        replica.count(None, 0)
        self._correct_adapters(replica, [m["id"] for m in models.json().get("data", [])
                                         if m.get("parent") and m["id"] != self.settings.served_name],
                               since=time.monotonic() - 2 * self.settings.health_interval_s)
        self.metrics.up.labels(replica.url).set(1)
        self.metrics.queue.labels(replica.url).set(replica.state.load)
        self.metrics.resident.labels(replica.url).set(len(replica.state.resident))

    @staticmethod
    def _correct_adapters(replica: Replica, listed: list[str], since: float) -> None:
        """Our view, less what the replica does not hold, unless it may be loading it (we placed it there
        since ``since``, or our requests for it are there now); what it holds that we did not place
        (another gateway did) counts as least recently used, within its slots."""
        resident = replica.state.resident
        replica.placed = {a: at for a, at in replica.placed.items() if at >= since}
        for adapter in [a for a in resident if a not in listed and a not in replica.placed
                        and not replica.state.active[a]]:
            del resident[adapter]
        for adapter in listed:
            if adapter not in resident:
                resident[adapter] = -1
                resident.move_to_end(adapter, last=False)
        while len(resident) > replica.state.max_loras:
            resident.popitem(last=False)


def _metric_sum(text: str, names: set[str]) -> float:
    """The sum over the series of these metrics in a Prometheus exposition (0 if absent), parsed once."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name in names)
