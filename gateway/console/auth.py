"""Who looks at the console: the same keys as the API. A browser signs in once by posting its key,
which comes back as an HttpOnly, SameSite=Strict cookie: never in a URL, never in a page, out of
reach of the page's scripts, and not sent along with another site's requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Depends, Request

from loragate.registry import Registry

from ..auth import Caller, bearer_token, identify
from ..errors import GatewayError
from ..keys import KeyStore
from ..rollouts import RolloutService

COOKIE = "loragate_key"


@dataclass
class ConsoleContext:
    """What the console reads and acts on: the gateway's own, or `loragate ui`'s without a gateway."""

    registry: Registry
    rollouts: RolloutService
    keys: KeyStore
    refresh_s: float


def console_context(request: Request) -> ConsoleContext:
    return request.app.state.console


class SignInNeeded(Exception):
    """A page asked for without a valid key: the console answers with its sign-in page."""

    def __init__(self, message: str):
        self.message = message


def _host(request: Request) -> str | None:
    return request.client.host if request.client else None


async def viewer(request: Request, ctx: ConsoleContext = Depends(console_context)) -> Caller:
    token = request.cookies.get(COOKIE) or bearer_token(request)
    try:
        return await asyncio.to_thread(identify, ctx.keys, token, _host(request))
    except GatewayError as exc:
        if exc.status == 401:
            raise SignInNeeded("" if token is None else "That key is not (or no longer) valid.") from exc
        raise


def same_origin(request: Request) -> bool:
    """A form posted from this console, not from another site: the browser says where it came from."""
    origin = request.headers.get("origin")
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    return origin is None or origin.rstrip("/") == str(request.base_url).rstrip("/")
