"""The OpenAI-compatible server: ``create_app()`` wires registry, router, backend and meter."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from loragate.registry import Registry, RegistryError
from loragate.settings import Settings

from .backends.base import Backend, BackendUnavailable, Delta, Generation, PromptTooLong
from .errors import GatewayError, error_response, install_error_handlers
from .keys import KeyStore, RateLimiter, retry_after_header
from .metering import Meter, Metrics
from .models import ApiKey, MeterRecord
from .openai_types import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from .rollouts import RolloutService, RolloutStatus, Thresholds
from .routing import Route, Router
from .shapes import ChatShape, CompletionShape, Shape

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 502, 503, 504)}


@dataclass
class Caller:
    key: ApiKey | None  # None: no keys are configured and the caller is on loopback
    user: str

    @property
    def admin(self) -> bool:
        return self.key is None or self.key.scope == "admin"


class RolloutRequest(BaseModel):
    adapter: str
    candidate: int = Field(ge=1)
    weight: float = Field(ge=0, le=100)
    min_requests: int = Field(20, ge=1)
    max_error_rate: float = Field(0.05, ge=0, le=1)
    max_latency_ratio: float = Field(1.5, gt=0)


class WeightRequest(BaseModel):
    weight: float = Field(ge=0, le=100)


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = Registry(settings)
    from .backends.factory import default_backend, upstream_backends

    backend = backend or default_backend(settings, registry)
    upstreams = upstream_backends(settings)
    backends = {b.name: b for b in (backend, *upstreams)}
    keys, limiter, rollouts = KeyStore(registry), RateLimiter(), RolloutService(registry)
    router = Router(registry, rollouts, backend, settings.gateway.routing_cache_s, upstreams)
    metrics = Metrics()

    def after_flush(rollout_ids: set[int]) -> None:
        for rollout in rollouts.all_active():
            if rollout.id in rollout_ids:
                rollouts.check_rollback(rollout)

    meter = Meter(registry, metrics, interval_s=settings.gateway.meter_flush_interval_s,
                  batch_size=settings.gateway.meter_batch_size, after_flush=after_flush)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for each in backends.values():
            await each.start()
        await meter.start()
        try:
            yield
        finally:
            await meter.stop()
            for each in backends.values():
                await each.stop()

    app = FastAPI(title="loragate gateway", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving of registered LoRA adapter versions.")
    app.state.meter, app.state.backend, app.state.registry = meter, backend, registry
    install_error_handlers(app)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):  # type: ignore[no-untyped-def]
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.gateway.max_body_bytes:
            return error_response(GatewayError(413, f"request body over {settings.gateway.max_body_bytes} bytes",
                                               code="request_too_large"))
        return await call_next(request)

    async def caller(request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        host = request.client.host if request.client else None
        if await asyncio.to_thread(keys.any_active):
            if not token:
                raise GatewayError(401, "Missing API key: send 'Authorization: Bearer <key>'",
                                   code="missing_api_key")
            key = await asyncio.to_thread(keys.verify, token)
            if key is None:
                raise GatewayError(401, "Incorrect API key provided", code="invalid_api_key")
            return Caller(key=key, user=key.id)
        # No keys exist: like vLLM without --api-key, any token is ignored, but only loopback is served.
        if not _is_loopback(host):
            raise GatewayError(403, "no API keys are configured, so only loopback clients are served",
                               code="keys_required")
        return Caller(key=None, user=host or "local")

    async def admin(who: Caller = Depends(caller)) -> Caller:
        if not who.admin:
            raise GatewayError(403, "this route needs an admin key", code="admin_required")
        return who

    def authorise(who: Caller, route: Route) -> None:
        name = route.adapter or route.base_model
        if who.key is not None and who.key.models and name not in who.key.models:
            raise GatewayError(403, f"this key may not use '{route.model}'", code="model_not_allowed", param="model")
        if who.key is not None:
            wait = limiter.check(who.key)
            if wait is not None:
                raise GatewayError(429, "Rate limit reached for this key", code="rate_limit_exceeded",
                                   headers=retry_after_header(wait))

    def route_headers(route: Route, request_id: str) -> dict[str, str]:
        headers = {"x-request-id": request_id, "x-loragate-arm": route.arm, "x-loragate-backend": route.backend}
        if route.adapter:
            headers["x-loragate-adapter"] = route.adapter
            headers["x-loragate-version"] = f"{route.adapter}@{route.version}"
        return headers

    class Tracker:
        """Times a request and writes its meter record exactly once."""

        def __init__(self, route: Route, who: Caller, request_id: str):
            self.route, self.who, self.request_id = route, who, request_id
            self.started = time.perf_counter()
            self.ttft_ms: float | None = None
            self.prompt_tokens = self.completion_tokens = 0

        def first_token(self) -> None:
            if self.ttft_ms is None:
                self.ttft_ms = (time.perf_counter() - self.started) * 1000

        def finish(self, status: int) -> None:
            latency_s = time.perf_counter() - self.started
            served_by = backends[self.route.backend]
            if self.who.key is not None:
                limiter.add_tokens(self.who.key.id, self.prompt_tokens + self.completion_tokens)
            meter.record(MeterRecord(
                request_id=self.request_id, model=self.route.model, adapter=self.route.adapter,
                version=self.route.version, arm=self.route.arm, rollout_id=self.route.rollout_id,
                backend=served_by.name, key_id=self.who.key.id if self.who.key else None,
                prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, ttft_ms=self.ttft_ms,
                latency_ms=latency_s * 1000, status=status,
                cost_usd=served_by.cost(self.prompt_tokens, self.completion_tokens, latency_s),
            ))

    def user_key(request: Request, body_user: str | None, who: Caller) -> str:
        return body_user or request.headers.get("x-loragate-user") or who.user

    def resolve(model: str, key: str) -> Route:
        try:
            return router.resolve(model, key)
        except RegistryError as exc:
            raise GatewayError(404, f"The model '{model}' does not exist ({exc})", code="model_not_found") from exc

    def check_limits(limit: int | None) -> int:
        tokens = limit or 256
        if tokens > settings.gateway.max_tokens_limit:
            raise GatewayError(400, f"max_tokens may be at most {settings.gateway.max_tokens_limit}",
                               code="invalid_request", param="max_tokens")
        return tokens

    async def adapter_for(route: Route, tracker: Tracker):  # type: ignore[no-untyped-def]
        """Load the route's adapter files; a failure here counts against the arm that chose them."""
        try:
            return await asyncio.to_thread(router.handle, route)
        except GatewayError as exc:
            tracker.finish(exc.status)
            raise

    async def first_delta(stream: AsyncIterator[Delta], tracker: Tracker) -> Delta:
        """Pull the first piece before answering, so engine errors still get a proper status."""
        try:
            async with asyncio.timeout(settings.gateway.request_timeout_s):
                return await anext(stream)
        except StopAsyncIteration:
            return Delta(text="", finish_reason="stop")
        except Exception as exc:
            status, error = _backend_error(exc)
            tracker.finish(status)
            raise error from exc

    async def collect(stream: AsyncIterator[Delta], first: Delta, tracker: Tracker) -> tuple[str, Delta]:
        parts, last = [first.text], first
        tracker.first_token()

        async def rest() -> None:
            nonlocal last
            async for delta in stream:
                parts.append(delta.text)
                last = delta

        try:
            if first.finish_reason is None:
                async with asyncio.timeout(settings.gateway.request_timeout_s):
                    await rest()
        except Exception as exc:
            status, error = _backend_error(exc)
            tracker.finish(status)
            raise error from exc
        finally:
            await stream.aclose()
        tracker.prompt_tokens, tracker.completion_tokens = last.prompt_tokens, last.completion_tokens
        tracker.finish(200)
        return "".join(parts), last

    async def sse(stream: AsyncIterator[Delta], first: Delta, tracker: Tracker, shape: Shape,
                  include_usage: bool) -> AsyncIterator[str]:
        status = 499  # the client went away, unless we get to the end
        try:
            tracker.first_token()
            for chunk in shape.opening():
                yield f"data: {json.dumps(chunk)}\n\n"
            delta = first
            while True:
                for chunk in shape.chunks(delta) if (delta.text or delta.finish_reason) else []:
                    yield f"data: {json.dumps(chunk)}\n\n"
                if delta.finish_reason is not None:
                    break
                # asyncio.timeout, not wait_for: the generator must run in this task, so that a client
                # going away cancels it here and aclose() below finds it stopped, not still running.
                async with asyncio.timeout(settings.gateway.request_timeout_s):
                    delta = await anext(stream)
            tracker.prompt_tokens, tracker.completion_tokens = delta.prompt_tokens, delta.completion_tokens
            if include_usage:
                yield f"data: {json.dumps(shape.usage_chunk(delta))}\n\n"
            yield "data: [DONE]\n\n"
            status = 200
        except Exception as exc:
            status, error = _backend_error(exc)
            body = {"error": {"message": error.message, "type": "api_error", "code": error.code}}
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            await stream.aclose()
            tracker.finish(status)

    async def serve(body: ChatCompletionRequest | CompletionRequest, request: Request, who: Caller,
                    shape: Shape, text_input: dict) -> Response:
        """One request, whichever endpoint: route, authorise, generate, shape, meter."""
        route = await asyncio.to_thread(resolve, body.model, user_key(request, body.user, who))
        authorise(who, route)
        max_tokens = check_limits(body.token_limit)
        tracker = Tracker(route, who, shape.id)
        generation = Generation(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=body.stop_list, seed=body.seed, adapter=await adapter_for(route, tracker),
                                **text_input)
        stream = backends[route.backend].generate(generation)
        first = await first_delta(stream, tracker)
        headers = route_headers(route, shape.id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(stream, first, tracker, shape, include_usage),
                                     media_type="text/event-stream", headers=headers)
        text, last = await collect(stream, first, tracker)
        return JSONResponse(shape.response(text, last).model_dump(), headers=headers)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request, who: Caller = Depends(caller)):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        return await serve(body, request, who, ChatShape(body.model), {"messages": messages})

    @app.post("/v1/completions", response_model=Completion, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request, who: Caller = Depends(caller)):
        return await serve(body, request, who, CompletionShape(body.model), {"prompt": body.prompt_text})

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models(who: Caller = Depends(caller)) -> ModelList:
        names = await asyncio.to_thread(router.served_models)
        if who.key is not None and who.key.models:
            names = [n for n in names if n in who.key.models]
        created = int(time.time())
        return ModelList(data=[ModelCard(id=name, created=created) for name in names])

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        for each in backends.values():
            metrics.queue.labels(each.name).set(getattr(each, "queue_depth", 0))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict:
        """The gateway answers; ``engines`` says whether the servers it forwards to (vLLM) do."""
        engines = {b.name: await b.health() for b in backends.values() if hasattr(b, "health")}
        return {"status": "ok" if all(e["up"] for e in engines.values()) else "degraded",
                "backends": {b.name: b.base_model for b in backends.values()}, "engines": engines}

    @app.post("/admin/rollouts", response_model=RolloutStatus, responses=_ERRORS)
    async def start_rollout(body: RolloutRequest, _: Caller = Depends(admin)) -> RolloutStatus:
        thresholds = Thresholds(body.min_requests, body.max_error_rate, body.max_latency_ratio)
        await asyncio.to_thread(rollouts.start, body.adapter, body.candidate, body.weight, thresholds)
        return await asyncio.to_thread(rollouts.status, body.adapter)

    @app.get("/admin/rollouts/{adapter}", response_model=RolloutStatus, responses=_ERRORS)
    async def rollout_status(adapter: str, _: Caller = Depends(admin)) -> RolloutStatus:
        return await asyncio.to_thread(rollouts.status, adapter)

    @app.post("/admin/rollouts/{adapter}/weight", response_model=RolloutStatus, responses=_ERRORS)
    async def rollout_weight(adapter: str, body: WeightRequest, _: Caller = Depends(admin)) -> RolloutStatus:
        await asyncio.to_thread(rollouts.set_weight, adapter, body.weight)
        return await asyncio.to_thread(rollouts.status, adapter)

    @app.post("/admin/rollouts/{adapter}/promote", response_model=RolloutStatus, responses=_ERRORS)
    async def rollout_promote(adapter: str, _: Caller = Depends(admin)) -> RolloutStatus:
        await asyncio.to_thread(rollouts.promote, adapter)
        return await asyncio.to_thread(rollouts.status, adapter)

    @app.post("/admin/rollouts/{adapter}/abort", response_model=RolloutStatus, responses=_ERRORS)
    async def rollout_abort(adapter: str, _: Caller = Depends(admin)) -> RolloutStatus:
        await asyncio.to_thread(rollouts.abort, adapter)
        return await asyncio.to_thread(rollouts.status, adapter)

    @app.exception_handler(RegistryError)
    async def _registry_error(_: Request, exc: RegistryError) -> JSONResponse:
        from loragate.registry import Conflict, GateRefused, NotFound

        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict | GateRefused) else 400
        return error_response(GatewayError(status, str(exc), code=type(exc).__name__))

    return app


def _backend_error(exc: Exception) -> tuple[int, GatewayError]:
    if isinstance(exc, GatewayError):
        return exc.status, exc
    if isinstance(exc, PromptTooLong):
        return 400, GatewayError(400, str(exc), code="context_length_exceeded", param="messages")
    if isinstance(exc, BackendUnavailable):
        return 503, GatewayError(503, str(exc), code="backend_unavailable")
    if isinstance(exc, TimeoutError):
        return 504, GatewayError(504, "the backend did not answer in time", code="timeout")
    return 502, GatewayError(502, f"the backend failed: {type(exc).__name__}", code="backend_error")
