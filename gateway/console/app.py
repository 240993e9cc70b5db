"""Where the console is served: inside the gateway, or alone for a registry without one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from loragate.registry import Registry
from loragate.settings import Settings

from ..errors import install_error_handlers
from ..keys import KeyStore
from ..rollouts import RolloutService
from . import routes
from .auth import ConsoleContext


def mount_console(app: FastAPI, registry: Registry, rollouts: RolloutService, keys: KeyStore,
                  engines: Callable[[], Awaitable[dict[str, dict]]] | None = None) -> None:
    routes.install(app, ConsoleContext(registry=registry, rollouts=rollouts, keys=keys,
                                       refresh_s=registry.settings.gateway.console_refresh_s, engines=engines))


def create_console_app(settings: Settings | None = None) -> FastAPI:
    """`loragate ui`: the console and nothing else; the gateway's pages read the same database."""
    registry = Registry(settings or Settings())
    app = FastAPI(title="loragate console", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    mount_console(app, registry, RolloutService(registry), KeyStore(registry))

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui")

    return app
