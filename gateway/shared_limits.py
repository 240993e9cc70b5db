"""Rate limits shared by every gateway replica, in Redis (``redis_url``).

Each key's requests and tokens are counted in fixed 60-second windows, as LiteLLM's proxy counts
them: one Lua script checks both counters and takes a request slot atomically, so N replicas
enforcing "100 rpm" admit 100 in a window, not N x 100. Both counters of a key share a Redis Cluster
hash tag (``{loragate:KEY_ID}``), so the script touches one slot. Each replica remembers the counts
Redis last told it: a key it already knows to be over its limit in this window is refused without
a round trip.

When Redis does not answer, ``gateway.limits_when_redis_down`` decides: ``local`` (each replica
enforces the limit on its own traffic, as without Redis), ``allow`` or ``deny``. Every such
decision counts in ``loragate_rate_limit_fallback_total``. After a failure the replica does not ask
again for ``_RETRY_AFTER_DOWN_S``, so an outage does not add a timeout to every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

from prometheus_client import Counter

from .keys import RateLimiter
from .models import ApiKey

log = logging.getLogger("loragate.gateway")
_WINDOW_S = 60
_RETRY_AFTER_DOWN_S = 1.0

# KEYS: requests counter, tokens counter. ARGV: rpm, tpm (-1: none), expiry seconds.
# Returns {admitted (1/0), requests in the window, tokens in the window}.
_CHECK = """
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if (rpm >= 0 and requests >= rpm) or (tpm >= 0 and tokens >= tpm) then
  return {0, requests, tokens}
end
requests = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, requests, tokens}
"""


class RedisRateLimiter:
    def __init__(self, url: str, *, when_down: Literal["local", "allow", "deny"], metrics_registry,
                 timeout_s: float = 0.5):
        import redis.asyncio as redis
        from redis.backoff import NoBackoff
        from redis.asyncio.retry import Retry

        # One retry: a pooled connection that broke (Redis restarted) is replaced at once.
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 1))
        self._check = self.client.register_script(_CHECK)
        self.when_down = when_down
        self.local = RateLimiter()  # the per-replica fallback
        self._known: dict[str, tuple[int, int, int]] = {}  # key id -> (window, requests, tokens) Redis last said
        self._pending: set[asyncio.Task] = set()
        self._down_until = 0.0  # monotonic time before which Redis is not asked again
        self.fallbacks = Counter("loragate_rate_limit_fallback", "Limit decisions taken without Redis (unreachable)",
                                 ["policy"], registry=metrics_registry)

    @staticmethod
    def _keys(key_id: str, window: int) -> list[str]:
        tag = f"{{loragate:{key_id}}}"  # one Redis Cluster slot for both counters
        return [f"{tag}:requests:{window}", f"{tag}:tokens:{window}"]

    async def check(self, key: ApiKey) -> float | None:
        """None when the request may go; else the seconds to wait (Retry-After)."""
        if key.rpm is None and key.tpm is None:
            return None
        now = time.time()
        window = int(now // _WINDOW_S)
        wait = (window + 1) * _WINDOW_S - now
        known = self._known.get(key.id)
        if known is not None and known[0] == window and _over(key, known[1], known[2]):
            return wait  # counts only grow within a window: no need to ask
        if time.monotonic() < self._down_until:
            return await self._fallback(key)
        try:
            admitted, requests, tokens = await self._check(
                keys=self._keys(key.id, window),
                args=[_limit(key.rpm), _limit(key.tpm), _WINDOW_S * 2])
        except Exception as exc:  # redis' ConnectionError, TimeoutError, ...: the stated policy decides
            self._down_until = time.monotonic() + _RETRY_AFTER_DOWN_S
            log.warning("Redis unreachable for rate limits (%s); policy %s", type(exc).__name__, self.when_down)
            return await self._fallback(key)
        self._known[key.id] = (window, int(requests), int(tokens))
        return None if admitted else wait

    async def _fallback(self, key: ApiKey) -> float | None:
        self.fallbacks.labels(self.when_down).inc()
        if self.when_down == "allow":
            return None
        if self.when_down == "deny":
            return 1.0
        return await self.local.check(key)

    def add_tokens(self, key_id: str, count: int) -> None:
        """Count a finished request's tokens in its key's window (in the background: the answer is out)."""
        self.local.add_tokens(key_id, count)
        task = asyncio.get_running_loop().create_task(self._add_tokens(key_id, count))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _add_tokens(self, key_id: str, count: int) -> None:
        window = int(time.time() // _WINDOW_S)
        key = self._keys(key_id, window)[1]
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                await pipe.incrby(key, count).expire(key, _WINDOW_S * 2).execute()
        except Exception as exc:
            self.fallbacks.labels("tokens_lost").inc()
            log.warning("Redis unreachable: %d tokens of key %s not counted (%s)", count, key_id, type(exc).__name__)

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.client.aclose()


def _limit(value: int | None) -> int:
    return -1 if value is None else value


def _over(key: ApiKey, requests: int, tokens: int) -> bool:
    return (key.rpm is not None and requests >= key.rpm) or (key.tpm is not None and tokens >= key.tpm)
