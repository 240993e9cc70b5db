"""Who looks at the console: the same keys as the API. A browser signs in once by posting its key,
which comes back as an HttpOnly, SameSite=Strict cookie: never in a URL, never in a page, out of
reach of the page's scripts, and not sent along with another site's requests."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Depends, Request

from loragate.registry import Registry

from ..auth import Caller, bearer_token, client_host, identify
from ..errors import GatewayError
from ..keys import KeyStore
from ..rollouts import RolloutService

COOKIE = "loragate_key"
INVALID_KEY = "That key is not (or no longer) valid."


@dataclass
class ConsoleContext:
    """What the console reads and acts on: the gateway's own, or `loragate ui`'s without a gateway."""

    registry: Registry
    rollouts: RolloutService
    keys: KeyStore
    refresh_s: float
    engines: Callable[[], Awaitable[dict[str, dict]]] | None = None  # the gateway's; None for `loragate ui`


def console_context(request: Request) -> ConsoleContext:
    return request.app.state.console


class SignInNeeded(Exception):
    """A page asked for without a valid key: the console answers with its sign-in page."""

    def __init__(self, message: str):
        self.message = message


def _names_loopback(host_header: str) -> bool:
    host = host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header  # drop the port
    host = host.split("]")[0].lstrip("[")  # [::1]:8000
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def viewer(request: Request, ctx: ConsoleContext = Depends(console_context)) -> Caller:
    token = request.cookies.get(COOKIE) or bearer_token(request)
    try:
        who = await asyncio.to_thread(identify, ctx.keys, token, client_host(request))
    except GatewayError as exc:
        if exc.status == 401:
            raise SignInNeeded("" if token is None else INVALID_KEY) from exc
        raise
    # Without keys a loopback client is an admin; a page from another site whose name was rebound
    # to 127.0.0.1 (DNS rebinding) would be one too, but its requests name that site as Host.
    if who.key is None and not _names_loopback(request.headers.get("host", "")):
        raise GatewayError(403, "no API keys are configured, so the console answers only to a loopback host name "
                                "(localhost, 127.0.0.1, [::1])", code="keys_required")
    return who


def same_origin(request: Request) -> bool:
    """A form posted from this console, not from another site: the browser says where it came from."""
    origin = request.headers.get("origin")
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    return origin is None or origin.rstrip("/") == str(request.base_url).rstrip("/")
