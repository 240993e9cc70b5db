"""One request through the gateway, whichever endpoint: route -> authorise -> generate -> shape -> meter.

The endpoints (``openai_api``) turn their body into a ``Generation`` input and a ``Shape``; this
module does the rest, and writes exactly one meter record per request, whatever happens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loragate.registry import RegistryError

from .auth import Caller, authorise
from .backends.adapter_scheduler import QueueFull
from .backends.base import AdapterHandle, BackendUnavailable, Delta, Generation, PromptTooLong
from .errors import GatewayError
from .keys import retry_after_header
from .models import MeterRecord
from .openai_types import ChatCompletionRequest, CompletionRequest
from .routing import Route
from .shapes import Shape
from .state import GatewayState


class Tracker:
    """Times a request and writes its meter record exactly once."""

    def __init__(self, state: GatewayState, route: Route, who: Caller, request_id: str):
        self.state, self.route, self.who, self.request_id = state, route, who, request_id
        self.started = time.perf_counter()
        self.ttft_ms: float | None = None
        self.last = Delta(text="")

    def first_token(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.started) * 1000

    def finish(self, status: int) -> None:
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
            batch=last.batch,
            latency_ms=latency_ms, status=status,
            cost_usd=served_by.cost(last.prompt_tokens, last.completion_tokens, latency_ms / 1000),
        ))


def backend_error(exc: Exception) -> tuple[int, GatewayError]:
    if isinstance(exc, GatewayError):
        return exc.status, exc
    if isinstance(exc, PromptTooLong):
        return 400, GatewayError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, QueueFull):
        return 503, GatewayError(503, str(exc), code="backend_busy", headers=retry_after_header(exc.retry_after_s))
    if isinstance(exc, BackendUnavailable):
        return 503, GatewayError(503, str(exc), code="backend_unavailable")
    if isinstance(exc, TimeoutError):
        return 504, GatewayError(504, "the backend did not answer in time", code="timeout")
    return 502, GatewayError(502, f"the backend failed: {type(exc).__name__}", code="backend_error")


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

    async def serve(self, body: ChatCompletionRequest | CompletionRequest, request: Request, who: Caller,
                    shape: Shape, text_input: dict) -> Response:
        user_key = body.user or request.headers.get("x-loragate-user") or who.user
        route = await asyncio.to_thread(self._resolve, body.model, user_key)
        authorise(self.state, who, route)
        max_tokens = self._max_tokens(body.token_limit)
        tracker = Tracker(self.state, route, who, shape.id)
        adapter = await self._adapter(route, tracker)
        generation = Generation(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=body.stop_list, seed=body.seed, adapter=adapter, **text_input)
        stream = self.state.backends[route.backend].generate(generation)
        first = await self._first_delta(stream, tracker)
        headers = _route_headers(route, shape.id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(stream, first, tracker, shape, include_usage),
                                     media_type="text/event-stream", headers=headers)
        text = await self._collect(stream, first, tracker)
        return JSONResponse(shape.response(text, tracker.last).model_dump(), headers=headers)

    async def _adapter(self, route: Route, tracker: Tracker) -> AdapterHandle | None:
        """The route's adapter files; a failure here counts against the arm that chose them."""
        try:
            return await asyncio.to_thread(self.state.router.handle, route)
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

    async def _collect(self, stream: AsyncIterator[Delta], first: Delta, tracker: Tracker) -> str:
        parts = [first.text]
        tracker.first_token()
        tracker.last = first
        try:
            if first.finish_reason is None:
                async with asyncio.timeout(self.timeout_s):
                    async for delta in stream:
                        parts.append(delta.text)
                        tracker.last = delta
        except Exception as exc:
            status, error = backend_error(exc)
            tracker.finish(status)
            raise error from exc
        finally:
            await stream.aclose()
        tracker.finish(200)
        return "".join(parts)

    async def _sse(self, stream: AsyncIterator[Delta], first: Delta, tracker: Tracker, shape: Shape,
                   include_usage: bool) -> AsyncIterator[str]:
        status = 499  # the client went away, unless we get to the end
        try:
            tracker.first_token()
            for chunk in shape.opening():
                yield f"data: {json.dumps(chunk)}\n\n"
            delta = first
            while True:
                tracker.last = delta
                for chunk in shape.chunks(delta) if (delta.text or delta.finish_reason) else []:
                    yield f"data: {json.dumps(chunk)}\n\n"
                if delta.finish_reason is not None:
                    break
                # asyncio.timeout, not wait_for: the generator must run in this task, so that a client
                # going away cancels it here and aclose() below finds it stopped, not still running.
                async with asyncio.timeout(self.timeout_s):
                    delta = await anext(stream)
            if include_usage:
                yield f"data: {json.dumps(shape.usage_chunk(delta))}\n\n"
            yield "data: [DONE]\n\n"
            status = 200
        except Exception as exc:
            status, error = backend_error(exc)
            body = {"error": {"message": error.message, "type": "api_error", "code": error.code}}
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            await stream.aclose()
            tracker.finish(status)
