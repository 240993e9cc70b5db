"""What one gateway holds while it runs, built from settings; routes reach it as a dependency."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from fastapi import Request

from loragate.registry import Registry, WebhookSender
from loragate.settings import Settings

from .backends.base import Backend
from .keys import KeyStore, RateLimiter
from .shared_limits import RedisRateLimiter
from .lookup_cache import WouldWait, answered_now
from .loop_lag import LoopLagMonitor
from .metering import Meter, Metrics
from .outcomes import FeedbackService
from .rollouts import RolloutService
from .routing import Router
from .shadow import ShadowRunner

T = TypeVar("T")


@dataclass
class GatewayState:
    settings: Settings
    registry: Registry
    backend: Backend  # serves the base model and the registry's adapters
    backends: dict[str, Backend]  # by name: the backend above and the upstreams
    router: Router
    keys: KeyStore
    limiter: RateLimiter | RedisRateLimiter
    rollouts: RolloutService
    metrics: Metrics
    meter: Meter
    feedback: FeedbackService
    shadow: ShadowRunner
    webhooks: WebhookSender | None  # sends the outbox's events, unless settings leave that to another process
    # The request path's lookups (key, route) run here, not in the default pool, where the database
    # work of the console, feedback and background loops can pile up while the database hangs; each
    # lookup returns within gateway.lookup_wait_s (lookup_cache.py), so these threads never do.
    _lookup_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=16, thread_name_prefix="request-lookup"))
    _loop_lag: LoopLagMonitor | None = field(default=None, init=False)

    @classmethod
    def build(cls, settings: Settings, backend: Backend | None = None) -> GatewayState:
        from .backends.factory import default_backend, upstream_backends

        registry = Registry(settings)
        metrics = Metrics()
        backend = backend or default_backend(settings, registry, metrics.registry)
        upstreams = upstream_backends(settings)
        rollouts = RolloutService(registry)

        def check_rollouts(rollout_ids: set[int]) -> None:
            for rollout in rollouts.all_active():
                if rollout.id in rollout_ids:
                    rollouts.check(rollout)

        meter = Meter(registry, metrics, interval_s=settings.gateway.meter_flush_interval_s,
                      batch_size=settings.gateway.meter_batch_size, after_flush=check_rollouts,
                      before_answer=settings.gateway.meter_before_answer,
                      commit_wait_s=settings.gateway.meter_commit_wait_s)
        backends = {b.name: b for b in (backend, *upstreams)}
        router = Router(registry, rollouts, backend, settings.gateway.routing_cache_s, upstreams,
                        stale=metrics.stale_lookups.labels("routing"))
        return cls(settings=settings, registry=registry, backend=backend, backends=backends, router=router,
                   keys=KeyStore(registry, metrics.stale_lookups.labels("keys")), limiter=_limiter(settings, metrics),
                   rollouts=rollouts, metrics=metrics,
                   meter=meter,
                   feedback=FeedbackService(registry),
                   shadow=ShadowRunner(router, backends, meter, queue_size=settings.gateway.shadow_queue,
                                       workers=settings.gateway.shadow_workers,
                                       timeout_s=settings.gateway.request_timeout_s),
                   webhooks=WebhookSender(registry) if settings.webhooks.deliver_in_gateway else None)

    async def engines(self) -> dict[str, dict]:
        """Each backend's own report of its engines (up, pid, adapters; a pool's replicas)."""
        return {b.name: await b.health() for b in self.backends.values() if hasattr(b, "health")}

    async def lookup(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, a request-path lookup: on the loop where all it needs is kept, else on a thread."""
        try:
            with answered_now():
                return fn(*args)
        except WouldWait:
            return await asyncio.get_running_loop().run_in_executor(self._lookup_pool, partial(fn, *args))

    async def start(self) -> None:
        self._loop_lag = LoopLagMonitor(self.metrics.loop_lag)
        self._loop_lag.start()
        for each in self.backends.values():
            await each.start()
        if hasattr(self.backend, "warm"):  # load what serves now, rather than on its first request
            await self.backend.warm(await asyncio.to_thread(self.router.serving_handles))
        await self.meter.start()
        await self.shadow.start()
        if self.webhooks is not None:
            self.webhooks.start()
        # What start-up built (the libraries: half a million objects) lives as long as the process:
        # out of the collector's sight, a full collection takes under a millisecond, not 400 ms of
        # stalled loop (measured with litellm loaded).
        gc.collect()
        gc.freeze()

    async def stop(self) -> None:
        await self._loop_lag.stop()
        await self.shadow.stop()  # its last meter records go with the meter's final write
        await self.meter.stop()
        if self.webhooks is not None:
            await asyncio.to_thread(self.webhooks.stop)
        for each in self.backends.values():
            await each.stop()
        await self.limiter.close()
        self._lookup_pool.shutdown(wait=False)


def _limiter(settings: Settings, metrics: Metrics) -> RateLimiter | RedisRateLimiter:
    if settings.redis_url is None:
        return RateLimiter()
    return RedisRateLimiter(settings.redis_url, when_down=settings.gateway.limits_when_redis_down,
                            metrics_registry=metrics.registry)


async def gateway_state(request: Request) -> GatewayState:
    """A dependency; async, since FastAPI runs a plain function's in a thread pool, a hop per request."""
    return request.app.state.gateway
