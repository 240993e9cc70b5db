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

from loragate.database import write_session
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
    def __init__(self, router: Router, backends: dict, meter: Meter, engine, *, queue_size: int, workers: int):
        self.router, self.backends, self.meter, self.engine = router, backends, meter, engine
        self.workers = workers
        self._queue: asyncio.Queue[ShadowCopy] = asyncio.Queue(queue_size)
        self._tasks: list[asyncio.Task] = []
        self._writes: set[asyncio.Task] = set()  # referenced until done, so none is collected mid-way

    def offer(self, copy: ShadowCopy) -> None:
        """Queue a copy, or drop it (recorded as such) when the queue is full; never waits."""
        try:
            self._queue.put_nowait(copy)
        except asyncio.QueueFull:
            self._store_soon(self._pair(copy, status="dropped"))
            self.meter.metrics.shadow.labels(copy.route.adapter, "dropped").inc()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._writes, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            copy = await self._queue.get()
            try:
                pair = await self._run(copy)
            except Exception as exc:  # a shadow failure is the candidate's, never the user's
                log.warning("shadow copy of %s failed: %s", copy.request_id, exc)
                pair = self._pair(copy, status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            self.meter.metrics.shadow.labels(copy.route.adapter, pair.status).inc()
            await asyncio.to_thread(self._store, pair)

    async def _run(self, copy: ShadowCopy) -> ShadowPair:
        route = replace(copy.route, arm=SHADOW, version=copy.route.shadow_version, shadow_version=None,
                        output_check=None)
        handle = await asyncio.to_thread(self.router.handle, route)
        backend = self.backends[route.backend]
        started = time.perf_counter()
        text, last = [], None
        stream = backend.generate(replace(copy.generation, adapter=handle, background=True))
        try:
            async for delta in stream:
                text.append(delta.text)
                if delta.finish_reason is not None:
                    last = delta
                    break
        finally:
            await stream.aclose()
        latency_ms = (time.perf_counter() - started) * 1000
        prompt, completion = (last.prompt_tokens, last.completion_tokens) if last else (0, 0)
        self.meter.record(MeterRecord(
            request_id=copy.request_id, model=route.model, adapter=route.adapter, version=route.version, arm=SHADOW,
            rollout_id=route.rollout_id, backend=backend.name, key_id=None, prompt_tokens=prompt,
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

    def _store_soon(self, pair: ShadowPair) -> None:
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._store, pair))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _store(self, pair: ShadowPair) -> None:
        with write_session(self.engine) as session:
            session.add(pair)
