"""``loragate engine serve``."""

from __future__ import annotations

import typer

from loragate.console import console
from loragate.extras import require
from loragate.settings import Settings

engine_app = typer.Typer(help="Engine replicas for a gateway's engine pool.", no_args_is_help=True)


@engine_app.command()
def serve(host: str | None = typer.Option(None, help="Default: settings engine.host (127.0.0.1)."),
          port: int | None = typer.Option(None, help="Default: settings engine.port (8100)."),
          advertise_url: str | None = typer.Option(None, help="How gateways reach it; default http://HOST:PORT.")) -> None:
    """A llama.cpp engine replica: the base model and any registered version (model="name@N"),
    fetched from the store; it announces itself to the pools (gateway.backend: pool)."""
    import uvicorn

    from .app import create_engine_app

    require("llamacpp", what="engine serve")
    settings = Settings()
    host, port = host or settings.engine.host, port or settings.engine.port
    url = (advertise_url or settings.engine.advertise_url or f"http://{host}:{port}").rstrip("/")
    console.print(f"engine replica of {settings.gateway.llamacpp.base_model} at {url}")
    uvicorn.run(create_engine_app(settings, url), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=30)
