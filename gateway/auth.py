"""Who is calling: an API key (or, when no key exists, a loopback client), and what it may do."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fastapi import Depends, Request

from loragate.registry import Actor

from .errors import GatewayError
from .keys import KeyStore, retry_after_header
from .models import ApiKey
from .routing import Route
from .state import GatewayState, gateway_state


@dataclass
class Caller:
    key: ApiKey | None  # None: no keys are configured and the caller is on loopback
    user: str

    @property
    def admin(self) -> bool:
        return self.key is None or self.key.scope == "admin"

    @property
    def actor(self) -> Actor:
        """Who the registry audits, and asks protected aliases about (no keys: loopback, as admin)."""
        return Actor(kind="key", name=self.key.name if self.key else self.user, admin=self.admin)


def _is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in ("localhost", "testclient")


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


def identify(keys: KeyStore, token: str | None, host: str | None) -> Caller:
    """The caller behind a token (the API's bearer header, the console's cookie), or a 401/403."""
    if keys.any_active():
        if not token:
            raise GatewayError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        key = keys.verify(token)
        if key is None:
            raise GatewayError(401, "Incorrect API key provided", code="invalid_api_key")
        return Caller(key=key, user=key.id)
    # No keys exist: like vLLM without --api-key, any token is ignored, but only loopback is served.
    if not _is_loopback(host):
        raise GatewayError(403, "no API keys are configured, so only loopback clients are served",
                           code="keys_required")
    return Caller(key=None, user=host or "local")


# Headers a proxy adds to name the client it forwards for.
_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def client_host(request: Request) -> str | None:
    """The caller's address. uvicorn has already put the client a trusted proxy names here
    (``gateway.trusted_proxies``). A loopback peer that forwards for someone is not the caller,
    whoever it is: behind a load balancer on the same host every caller would be loopback, so a
    forwarded request never gets loopback's rights (None: no address that counts)."""
    host = request.client.host if request.client else None
    if _is_loopback(host) and any(name in request.headers for name in _FORWARDING_HEADERS):
        return None
    return host


async def caller(request: Request, state: GatewayState = Depends(gateway_state)) -> Caller:
    return await state.lookup(identify, state.keys, bearer_token(request), client_host(request))


async def admin(who: Caller = Depends(caller)) -> Caller:
    if not who.admin:
        raise GatewayError(403, "this route needs an admin key", code="admin_required")
    return who


async def authorise(state: GatewayState, who: Caller, route: Route) -> None:
    """May this caller use the route's model now (its key's model list and rate limits)?"""
    name = route.adapter or route.base_model
    if who.key is not None and who.key.models and name not in who.key.models:
        raise GatewayError(403, f"this key may not use '{route.model}'", code="model_not_allowed", param="model")
    if who.key is not None:
        wait = await state.limiter.check(who.key)
        if wait is not None:
            raise GatewayError(429, "Rate limit reached for this key", code="rate_limit_exceeded",
                               headers=retry_after_header(wait))
