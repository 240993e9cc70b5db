"""The OpenAI-compatible server: ``create_app()`` builds the gateway's state and mounts its routes.

Where things are: ``openai_api`` (the /v1 routes) and ``admin_api`` (rollouts, health, metrics)
declare routes; ``pipeline`` serves one generation request (route -> authorise -> generate ->
shape -> meter); ``auth`` says who calls; ``state`` holds the registry, backends, router and meter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from loragate.settings import Settings

from . import admin_api, feedback_api, openai_api
from .backends.base import Backend
from .console import mount_console
from .errors import GatewayError, error_response, install_error_handlers
from .responses.api_router import router as responses_router
from .state import GatewayState


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    state = GatewayState.build(settings or Settings(), backend)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="loragate gateway", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible serving of registered LoRA adapter versions.")
    app.state.gateway = state
    install_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(responses_router)
    app.include_router(feedback_api.router)
    app.include_router(admin_api.rollouts)
    app.include_router(admin_api.aliases)
    app.include_router(admin_api.keys)
    app.include_router(admin_api.operations)
    if state.settings.gateway.console:
        mount_console(app, state.registry, state.rollouts, state.keys, state.engines)
    app.add_middleware(BodyLimit, max_bytes=state.settings.gateway.max_body_bytes)

    return app


class BodyLimit:
    """413 for a declared body over the limit. Plain ASGI, not ``@app.middleware("http")``, whose
    wrapper relays every streamed chunk through an extra task: CPU taken from the engine."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                error = GatewayError(413, f"request body over {self.max_bytes} bytes", code="request_too_large")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
