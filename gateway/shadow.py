"""Shadow rollouts: the candidate answers a copy of live requests that nobody sees.

Production answers every request as usual. Once a request sampled for the shadow (``weight``% of
users, sticky, as splits draw them) has been answered, ``ShadowRunner.offer`` puts a copy on a
bounded queue and returns at once: the user's answer, status and timing never wait for it. A few
workers send the copies to the same backend as *background* requests, which the llama.cpp
scheduler admits only while no live request waits; a copy that finds the queue full is dropped
and counted. Each copy's answer is compared with production's (exact match and token F1 after
normalising) and stored as a ``ShadowPair`` (with both answers, or only their hashes when the
request said ``"store": false``), and metered as arm ``shadow`` with no API key, so it is costed
but never billed to, or rate-limited against, the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace

from loragate.text import normalize, token_overlap_f1

from .backends.base import Generation
from .metering import Meter
from .models import MeterRecord, ShadowPair
from .rollouts import SHADOW
from .routing import Route, Router

log = logging.getLogger("loragate.gateway")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ShadowCopy:
    """A live request, answered, to be sent again to the candidate."""

    route: Route  # production's route, with the shadow version to try
    request_id: str
    generation: Generation  # production's, adapter included; the candidate's replaces it
    production_output: str
    store: bool  # False: keep only hashes of the prompt and answers


class ShadowRunner:
    def __init__(self, router: Router, backends: dict, meter: Meter, *, queue_size: int, workers: int,
                 timeout_s: float):
        self.router, self.backends, self.meter = router, backends, meter
        self.workers, self.timeout_s = workers, timeout_s
        self._queue: asyncio.Queue[ShadowCopy] = asyncio.Queue(queue_size)
        self._tasks: list[asyncio.Task] = []

    def offer(self, copy: ShadowCopy) -> None:
        """Queue a copy, or drop it (recorded as such) when the queue is full; never waits."""
        try:
            self._queue.put_nowait(copy)
        except asyncio.QueueFull:
            self._finish(copy, self._pair(copy, status="dropped", error="the shadow queue was full"))

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        """Before the meter stops: its final write takes the last pairs."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _finish(self, copy: ShadowCopy, pair: ShadowPair) -> None:
        """Count the pair and write it with the meter's next batch (drops under load cost no write of their own)."""
        self.meter.metrics.shadow.labels(copy.route.adapter, pair.status).inc()
        self.meter.add(pair)

    async def _work(self) -> None:
        while True:
            copy = await self._queue.get()
            run = asyncio.create_task(self._run(copy))
            try:
                pair = await run
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # the gateway stops
                    run.cancel()
                    raise
                # Live traffic needed the engine (adapter_scheduler.py): the copy gave way.
                pair = self._pair(copy, status="dropped", error="preempted by live traffic")
            except TimeoutError:  # mostly waiting for an idle engine under steady live load
                pair = self._pair(copy, status="dropped", error=f"not answered within {self.timeout_s:g} s")
            except Exception as exc:  # a shadow failure is the candidate's, never the user's
                log.warning("shadow copy of %s failed: %s", copy.request_id, exc)
                pair = self._pair(copy, status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            self._finish(copy, pair)

    async def _run(self, copy: ShadowCopy) -> ShadowPair:
        route = replace(copy.route, arm=SHADOW, version=copy.route.shadow_version, shadow_version=None,
                        output_check=None)
        handle = await asyncio.to_thread(self.router.handle, route)
        backend = self.backends[route.backend]
        started = time.perf_counter()
        text, last = [], None
        stream = backend.generate(replace(copy.generation, adapter=handle, background=True))
        try:
            async with asyncio.timeout(self.timeout_s):
                async for delta in stream:
                    text.append(delta.text)
                    if delta.finish_reason is not None:
                        last = delta
                        break
        finally:
            await stream.aclose()
        # What the candidate took to answer, without the wait for an idle engine that a copy makes.
        latency_ms = (time.perf_counter() - started) * 1000 - ((last.queue_ms or 0) if last else 0)
        prompt, completion = (last.prompt_tokens, last.completion_tokens) if last else (0, 0)
        self.meter.record(MeterRecord(
            request_id=f"{copy.request_id}:shadow", model=route.model, adapter=route.adapter, version=route.version,
            arm=SHADOW, rollout_id=route.rollout_id, backend=backend.name, key_id=None, prompt_tokens=prompt,
            completion_tokens=completion, queue_ms=last.queue_ms if last else None, latency_ms=latency_ms, status=200,
            cost_usd=backend.cost(prompt, completion, latency_ms / 1000)))
        return self._pair(copy, status="compared", candidate_output="".join(text), latency_ms=latency_ms)

    @staticmethod
    def _pair(copy: ShadowCopy, *, status: str, candidate_output: str | None = None, latency_ms: float | None = None,
              error: str | None = None) -> ShadowPair:
        messages = copy.generation.messages
        prompt = json.dumps(messages, sort_keys=True) if messages is not None else copy.generation.prompt or ""
        compared = candidate_output is not None
        return ShadowPair(
            rollout_id=copy.route.rollout_id, request_id=copy.request_id, status=status,
            prompt_sha256=_sha256(prompt), production_sha256=_sha256(copy.production_output),
            candidate_sha256=_sha256(candidate_output) if compared else None,
            prompt=prompt if copy.store else None,
            production_output=copy.production_output if copy.store else None,
            candidate_output=candidate_output if copy.store else None,
            exact=normalize(candidate_output) == normalize(copy.production_output) if compared else None,
            token_f1=token_overlap_f1(candidate_output, copy.production_output) if compared else None,
            latency_ms=latency_ms, error=error)
