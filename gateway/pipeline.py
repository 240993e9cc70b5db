"""One request through the gateway, whichever endpoint: route -> authorise -> generate -> shape -> meter.

The endpoints (``openai_api``) turn their body into a ``Generation`` input and a ``Shape``; this
module does the rest, and writes exactly one meter record per request, whatever happens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from loragate.registry import RegistryError

from .auth import Caller, authorise
from .backends.adapter_scheduler import QueueFull
from .backends.base import AdapterHandle, BackendUnavailable, Delta, Generation, PromptTooLong
from .errors import RETRY_DOWN_S, GatewayError
from .keys import retry_after_header
from .models import MeterRecord
from .openai_types import ChatCompletionRequest, CompletionRequest, PromptTokensDetails, Usage, unsupported_params
from .routing import Route
from .shadow import ShadowCopy
from .shapes import Shape
from .state import GatewayState


class Tracker:
    """Times a request and writes its meter record exactly once."""

    def __init__(self, state: GatewayState, route: Route, who: Caller, shape: Shape):
        self.state, self.route, self.who, self.shape = state, route, who, shape
        self.request_id = shape.id
        self.started = time.perf_counter()
        self.ttft_ms: float | None = None
        self.closing: dict[int, Delta] = {}  # each choice's last delta: its finish reason and usage
        self.finished = False

    def note(self, delta: Delta) -> None:
        if delta.finish_reason is not None:
            self.closing[delta.index] = delta

    def all_ended(self) -> bool:
        return len(self.closing) == len(self.shape.choices)

    def output_ok(self) -> float | None:
        """Share of the answers that passed the version's output check (a few microseconds a request)."""
        check = self.route.output_check
        if check is None:
            return None
        return sum(check.passes(choice.text) for choice in self.shape.choices) / len(self.shape.choices)

    @property
    def last(self) -> Delta:
        """The whole request's usage: the prompt once (OpenAI counts it once for ``n`` choices)."""
        done = list(self.closing.values()) or [Delta(text="")]
        return Delta(text="", prompt_tokens=max(d.prompt_tokens for d in done),
                     completion_tokens=sum(d.completion_tokens for d in done),
                     cached_tokens=max(d.cached_tokens for d in done), queue_ms=done[0].queue_ms,
                     batch=done[0].batch)

    def usage(self) -> Usage:
        last = self.last
        return Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                     total_tokens=last.prompt_tokens + last.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=last.cached_tokens))

    def first_token(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000

    def finish(self, status: int) -> None:
        """Write the meter record; once (later calls change nothing)."""
        if self.finished:
            return
        self.finished = True
        latency_ms = (time.perf_counter() - self.started) * 1000
        last, served_by = self.last, self.state.backends[self.route.backend]
        if self.who.key is not None:
            self.state.limiter.add_tokens(self.who.key.id, last.prompt_tokens + last.completion_tokens)
        # Time per output token after the first: what an arm's latency is compared on, since it does
        # not depend on how long the request queued (see rollouts.py).
        tpot_ms = ((latency_ms - self.ttft_ms) / (last.completion_tokens - 1)
                   if self.ttft_ms is not None and last.completion_tokens > 1 and status == 200 else None)
        self.state.meter.record(MeterRecord(
            request_id=self.request_id, model=self.route.model, adapter=self.route.adapter,
            version=self.route.version, arm=self.route.arm, rollout_id=self.route.rollout_id,
            backend=served_by.name, key_id=self.who.key.id if self.who.key else None,
            prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
            cached_tokens=last.cached_tokens, ttft_ms=self.ttft_ms, tpot_ms=tpot_ms, queue_ms=last.queue_ms,
            batch=last.batch, latency_ms=latency_ms, status=status,
            cost_usd=served_by.cost(last.prompt_tokens, last.completion_tokens, latency_ms / 1000),
            output_ok=self.output_ok() if status == 200 else None,
        ))


def backend_error(exc: Exception) -> tuple[int, GatewayError]:
    if isinstance(exc, GatewayError):
        return exc.status, exc
    if isinstance(exc, PromptTooLong):
        return 400, GatewayError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, QueueFull):
        return 503, GatewayError(503, str(exc), code="backend_busy", headers=retry_after_header(exc.retry_after_s))
    if isinstance(exc, BackendUnavailable):  # down or restarting: a client (or balancer) may come back shortly
        return 503, GatewayError(503, str(exc), code="backend_unavailable", headers=retry_after_header(RETRY_DOWN_S))
    if isinstance(exc, TimeoutError):
        return 504, GatewayError(504, "the backend did not answer in time", code="timeout")
    return 502, GatewayError(502, f"the backend failed: {type(exc).__name__}", code="backend_error")


def refuse_unsupported(body: BaseModel) -> None:
    """Refuse, by name, what we cannot honour rather than silently ignore it."""
    unsupported = unsupported_params(body)
    if unsupported:
        raise GatewayError(400, f"Unsupported parameter(s): {', '.join(unsupported)}; see the README for what "
                                f"loragate serves", code="unsupported_parameter", param=unsupported[0])


def _route_headers(route: Route, request_id: str) -> dict[str, str]:
    headers = {"x-request-id": request_id, "x-loragate-arm": route.arm, "x-loragate-backend": route.backend}
    if route.adapter:
        headers["x-loragate-adapter"] = route.adapter
        headers["x-loragate-version"] = f"{route.adapter}@{route.version}"
    return headers


class Pipeline:
    def __init__(self, state: GatewayState):
        self.state = state
        self.timeout_s = state.settings.gateway.request_timeout_s

    def _resolve(self, model: str, user_key: str) -> Route:
        try:
            return self.state.router.resolve(model, user_key)
        except RegistryError as exc:
            raise GatewayError(404, f"The model '{model}' does not exist ({exc})", code="model_not_found") from exc

    def _max_tokens(self, limit: int | None) -> int:
        tokens = limit or 256
        ceiling = self.state.settings.gateway.max_tokens_limit
        if tokens > ceiling:
            raise GatewayError(400, f"max_tokens may be at most {ceiling}", code="invalid_request", param="max_tokens")
        return tokens

    def _check_params(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        """Refuse, by name, what we cannot honour rather than silently ignore it."""
        refuse_unsupported(body)
        max_n = self.state.settings.gateway.max_n
        if body.n > max_n:
            raise GatewayError(400, f"n may be at most {max_n}", code="invalid_request", param="n")

    async def serve(self, body: ChatCompletionRequest | CompletionRequest, request: Request, who: Caller,
                    shape: Shape, engine_input: dict) -> Response:
        """``engine_input``: the endpoint's own part of the ``Generation`` (messages or prompt ...)."""
        self._check_params(body)
        user_key = body.user or request.headers.get("x-loragate-user") or who.user
        route = await self.state.lookup(self._resolve, body.model, user_key)
        await authorise(self.state, who, route)
        max_tokens = self._max_tokens(body.token_limit)
        tracker = Tracker(self.state, route, who, shape)
        adapter = await self._adapter(route, tracker)
        generation = Generation(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stop_list,
            seed=body.seed, presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=body.logit_bias, top_logprobs=body.top_logprobs_count, adapter=adapter, **engine_input)
        stream = self._generate(route, generation, body.n)
        first = await self._first_delta(stream, tracker)
        headers = _route_headers(route, shape.id)
        # Once production has answered, a shadow rollout's candidate answers a copy, unseen (shadow.py).
        shadow = (lambda: self._shadow(route, shape, generation, body.stores_content)) if route.shadow_version else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(stream, first, tracker, shape, include_usage, shadow),
                                     media_type="text/event-stream", headers=headers)
        await self._collect(stream, first, tracker, shape)
        usage = tracker.usage()
        await shape.complete(usage)
        if shadow:
            shadow()
        return JSONResponse(shape.response(usage), headers=headers)

    def _shadow(self, route: Route, shape: Shape, generation: Generation, store: bool) -> None:
        self.state.shadow.offer(ShadowCopy(route=route, request_id=shape.id, generation=generation,
                                           production_output=shape.choices[0].text, store=store))

    def _generate(self, route: Route, generation: Generation, n: int) -> AsyncIterator[Delta]:
        """One stream for the ``n`` choices: each is a request of its own to the backend (a seed,
        if given, moves on by one per choice so that they differ and still repeat)."""
        backend = self.state.backends[route.backend]
        if n == 1:
            return backend.generate(generation)
        seeds = [None if generation.seed is None else generation.seed + i for i in range(n)]
        return interleave([backend.generate(replace(generation, seed=seed)) for seed in seeds])

    async def _adapter(self, route: Route, tracker: Tracker) -> AdapterHandle | None:
        """The route's adapter files; a failure here counts against the arm that chose them."""
        try:
            return await self.state.lookup(self.state.router.handle, route)
        except GatewayError as exc:
            tracker.finish(exc.status)
            raise

    async def _first_delta(self, stream: AsyncIterator[Delta], tracker: Tracker) -> Delta:
        """Pull the first piece before answering, so engine errors still get a proper status."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await anext(stream)
        except StopAsyncIteration:
            return Delta(text="", finish_reason="stop")
        except Exception as exc:
            status, error = backend_error(exc)
            tracker.finish(status)
            raise error from exc

    async def _collect(self, stream: AsyncIterator[Delta], first: Delta, tracker: Tracker, shape: Shape) -> None:
        tracker.first_token()
        shape.add(first)
        tracker.note(first)
        try:
            if not tracker.all_ended():
                async with asyncio.timeout(self.timeout_s):
                    async for delta in stream:
                        shape.add(delta)
                        tracker.note(delta)
                        if tracker.all_ended():
                            break
        except Exception as exc:
            status, error = backend_error(exc)
            tracker.finish(status)
            raise error from exc
        finally:
            await stream.aclose()
        tracker.finish(200)
        await self.state.meter.committed(tracker.request_id)  # answered means metered (kill -9 included)

    async def _sse(self, stream: AsyncIterator[Delta], first: Delta, tracker: Tracker, shape: Shape,
                   include_usage: bool, shadow: Callable[[], None] | None) -> AsyncIterator[str]:
        status = 499  # the client went away, unless we get to the end
        try:
            tracker.first_token()
            for chunk in shape.opening():
                yield shape.frame(chunk)
            delta = first
            while True:
                for chunk in shape.chunks(delta):
                    yield shape.frame(chunk)
                tracker.note(delta)
                if tracker.all_ended():
                    break
                # asyncio.timeout, not wait_for: the generator must run in this task, so that a client
                # going away cancels it here and aclose() below finds it stopped, not still running.
                async with asyncio.timeout(self.timeout_s):
                    delta = await anext(stream)
            status = 200
            tracker.finish(status)  # before the last frame: feedback sent on it finds the meter record
            await self.state.meter.committed(tracker.request_id)
            usage = tracker.usage()
            await shape.complete(usage)
            if shadow:
                shadow()
            for frame in shape.closing(usage, include_usage):
                yield frame
        except Exception as exc:
            status, error = backend_error(exc)
            yield shape.error_frame(error)
        finally:
            await stream.aclose()
            tracker.finish(status)


async def interleave(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """Several choices' streams as one, as their deltas come, each labelled with its choice's index."""
    queue: asyncio.Queue[Delta | Exception] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                delta.index = index
                await queue.put(delta)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        ended = 0
        while ended < len(streams):
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            ended += item.finish_reason is not None
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
