"""A llama.cpp engine replica for engine pools, on any machine that reaches the database and store.

It serves the base model and ``model="name@N"`` as a vLLM server with loragate's resolver does, so
a gateway's pool talks to both alike (``backends/pool.py``): the version's GGUF LoRA is fetched from
the store by sha256 and checked, the engine (``LlamaCppBackend``) keeps the ``max_loras`` most
recently used, and it answers

- ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed or not);
- ``GET /v1/models``: the base and the adapters the engine holds now (``parent``: the base);
- ``GET /metrics``: ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``, as vLLM names them;
- ``GET /health``: 200 while the server answers (its engine restarts on demand).

While it runs it announces itself in the database (``announce.py``); pools with ``discover`` find it.
No keys: like a vLLM server, it belongs on a private network, behind the gateways.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from loragate.offline_base import llamacpp_base_gguf
from loragate.registry import Registry
from loragate.settings import Settings

from ..backends.base import AdapterHandle, BackendUnavailable, Delta, PromptTooLong
from ..backends.llamacpp import LlamaCppBackend
from ..errors import GatewayError, install_error_handlers
from ..routing import adapter_handle
from .announce import Announcer
from .protocol import ChunkWriter, EngineRequest

log = logging.getLogger("loragate.engine")


class EngineReplicaServer:
    def __init__(self, settings: Settings, url: str):
        self.settings, self.url = settings, url
        self.registry = Registry(settings)
        llamacpp = settings.gateway.llamacpp
        self.backend = LlamaCppBackend(llamacpp, llamacpp_base_gguf(self.registry), settings.gateway.request_timeout_s,
                                       settings.home / "logs")
        self.announcer = Announcer(self.registry, url, llamacpp, settings.engine.heartbeat_s)
        self._handles: dict[str, AdapterHandle] = {}  # a version is immutable: resolved once
        self.metrics = CollectorRegistry()
        self.running = Gauge("vllm:num_requests_running", "Requests decoding", registry=self.metrics)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a slot", registry=self.metrics)

    def handle(self, model: str) -> AdapterHandle | None:
        """None for the base; the version's checked GGUF LoRA for ``name@N``; else a 404."""
        if model == self.backend.base_model:
            return None
        if model not in self._handles:
            self._handles[model] = adapter_handle(self.registry, self.backend, model)
        return self._handles[model]

    async def models(self) -> dict:
        base = self.backend.base_model
        held = (await self.backend.health())["adapters"]  # what the running engine has loaded
        return {"object": "list", "data": [{"id": base, "object": "model", "owned_by": "loragate", "parent": None},
                                           *({"id": key, "object": "model", "owned_by": "loragate", "parent": base}
                                             for key in held)]}


def create_engine_app(settings: Settings, url: str) -> FastAPI:
    server = EngineReplicaServer(settings, url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await server.backend.start()
        server.announcer.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.announcer.stop)
            await server.backend.stop()

    app = FastAPI(title="loragate engine replica", lifespan=lifespan)

    install_error_handlers(app)  # the gateway's: OpenAI-shaped errors, never a stack trace

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def generate(body: EngineRequest, request: Request) -> Response:
        chat = request.url.path.endswith("/chat/completions")
        if chat != (body.messages is not None):
            raise GatewayError(400, "chat takes messages, completions a prompt", code="invalid_request")
        adapter = await asyncio.to_thread(server.handle, body.model)
        writer = ChunkWriter(body.model, chat)
        stream = server.backend.generate(body.generation(adapter))
        try:
            first = await anext(stream)
        except BackendUnavailable as exc:
            raise GatewayError(503, str(exc), code="engine_unavailable") from exc
        except PromptTooLong as exc:
            raise GatewayError(400, f"maximum context length exceeded: {exc}", code="context_length_exceeded") from exc
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(first, stream, writer, usage), media_type="text/event-stream")
        return JSONResponse(await _collect(first, stream, writer))

    @app.get("/v1/models")
    async def models() -> dict:
        return await server.models()

    @app.get("/metrics")
    async def metrics() -> Response:
        server.running.set(server.backend.scheduler.in_flight)
        server.waiting.set(server.backend.scheduler.queue_depth)
        return Response(generate_latest(server.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> dict:
        """200 while this server answers: an engine restarting with a new adapter set (a load) or after
        a crash still takes requests, which wait for it."""
        return await server.backend.health()

    return app


async def _sse(first: Delta, stream: AsyncIterator[Delta], writer: ChunkWriter, usage: bool) -> AsyncIterator[str]:
    try:
        delta = first
        while True:
            yield f"data: {json.dumps(writer.chunk(delta))}\n\n"
            if delta.finish_reason is not None:
                if usage:
                    yield f"data: {json.dumps(writer.usage_chunk(delta))}\n\n"
                break
            delta = await anext(stream)
    except (BackendUnavailable, GatewayError) as exc:  # after the first chunk: the stream ends with an error
        log.warning("engine stream failed: %s", exc)
        yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'service_unavailable'}})}\n\n"
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


async def _collect(first: Delta, stream: AsyncIterator[Delta], writer: ChunkWriter) -> dict:
    text, logprobs, delta = [], [], first
    try:
        while True:
            text.append(delta.text)
            logprobs.extend(delta.logprobs or [])
            if delta.finish_reason is not None:
                return writer.response("".join(text), delta, logprobs)
            delta = await anext(stream)
    finally:
        await stream.aclose()
