"""API keys (stored as sha256, shown once) and per-key rate limits."""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from loragate.database import read_session, write_session
from loragate.registry import Registry
from loragate.registry.errors import InvalidInput, NotFound

from .lookup_cache import LookupCache
from .models import ApiKey, utcnow

SCOPES = ("user", "admin")
CONFIGURED_KEY_NAME = "admin (gateway.admin_key)"
_WINDOW_S = 60.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class CreatedKey:
    token: str  # shown once, never stored
    key: ApiKey


class KeyStore:
    def __init__(self, registry: Registry, stale: MetricWrapperBase | None = None):
        self.registry = registry
        # A revocation takes up to 5 s.
        self._lookups = LookupCache(5.0, registry.settings.gateway.lookup_wait_s, stale)

    def create(self, name: str, *, scope: str = "user", rpm: int | None = None, tpm: int | None = None,
               models: list[str] | None = None) -> CreatedKey:
        if scope not in SCOPES:
            raise InvalidInput(f"scope must be one of {', '.join(SCOPES)}")
        key_id = f"lg_{secrets.token_hex(4)}"
        token = f"{key_id}_{secrets.token_urlsafe(32)}"
        key = ApiKey(id=key_id, name=name, key_sha256=_digest(token), scope=scope, rpm=rpm, tpm=tpm,
                     models=models or [])
        with write_session(self.registry.engine) as session:
            self._add(session, key)
        return CreatedKey(token=token, key=key)

    def _add(self, session: Session, key: ApiKey) -> None:
        session.add(key)
        self.registry.audit(session, "key.create", key.id, after={"name": key.name, "scope": key.scope, "rpm": key.rpm,
                                                                  "tpm": key.tpm, "models": key.models})

    def ensure_configured(self) -> ApiKey | None:
        """The admin key whose token the settings hold (``gateway.admin_key``, from a deployment's
        secret), created if no key has that token yet. Every replica runs this at start: the first
        creates it, the others find it. A revoked one stays revoked; configure another token."""
        configured = self.registry.settings.gateway.admin_key
        if configured is None:
            return None
        digest = _digest(configured.get_secret_value())

        def find_or_add() -> ApiKey:
            with write_session(self.registry.engine) as session:
                key = session.exec(select(ApiKey).where(ApiKey.key_sha256 == digest)).first()
                if key is None:
                    key = ApiKey(id=f"lg_{digest[:8]}", name=CONFIGURED_KEY_NAME, key_sha256=digest, scope="admin")
                    self._add(session, key)
                return key

        try:
            return find_or_add()
        except IntegrityError:  # another replica added it at the same moment
            return find_or_add()

    def list(self) -> list[ApiKey]:
        with read_session(self.registry.engine) as session:
            return list(session.exec(select(ApiKey).order_by(col(ApiKey.created_at))).all())

    def revoke(self, key_id: str) -> ApiKey:
        with write_session(self.registry.engine) as session:
            key = session.get(ApiKey, key_id)
            if key is None:
                raise NotFound(f"no key {key_id!r}")
            key.revoked_at = utcnow()
            session.add(key)
            self.registry.audit(session, "key.revoke", key_id)
        return key

    def any_active(self) -> bool:
        def load() -> bool:
            with read_session(self.registry.engine) as session:
                return session.exec(select(ApiKey.id).where(col(ApiKey.revoked_at).is_(None))).first() is not None

        return self._lookups.get("any active", load)

    def verify(self, token: str) -> ApiKey | None:
        """The active key for a bearer token; cached briefly, so a revocation takes up to 5 s."""
        digest = _digest(token)

        def load() -> ApiKey | None:
            with read_session(self.registry.engine) as session:
                key = session.exec(select(ApiKey).where(ApiKey.key_sha256 == digest)).first()
            return None if key is None or key.revoked_at is not None else key

        return self._lookups.get(digest, load)


class RateLimiter:
    """Sliding 60-second windows of requests and tokens per key, in this replica's memory.

    With several replicas each enforces the limit on its own share of traffic: set ``redis_url``
    and they share one count (``shared_limits.RedisRateLimiter``)."""

    def __init__(self) -> None:
        self._requests: dict[str, deque[float]] = defaultdict(deque)
        self._tokens: dict[str, deque[tuple[float, int]]] = defaultdict(deque)

    def _trim(self, key_id: str, now: float) -> None:
        requests, tokens = self._requests[key_id], self._tokens[key_id]
        while requests and now - requests[0] >= _WINDOW_S:
            requests.popleft()
        while tokens and now - tokens[0][0] >= _WINDOW_S:
            tokens.popleft()

    async def check(self, key: ApiKey) -> float | None:
        """None when the request may go; else the seconds to wait (Retry-After)."""
        now = time.monotonic()
        self._trim(key.id, now)
        requests, tokens = self._requests[key.id], self._tokens[key.id]
        if key.rpm is not None and len(requests) >= key.rpm:
            return _WINDOW_S - (now - requests[0])
        if key.tpm is not None and sum(n for _, n in tokens) >= key.tpm:
            return _WINDOW_S - (now - tokens[0][0])
        requests.append(now)
        return None

    def add_tokens(self, key_id: str, count: int) -> None:
        self._tokens[key_id].append((time.monotonic(), count))

    async def close(self) -> None:
        """Nothing to release (the shared limiter's connection is)."""


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
