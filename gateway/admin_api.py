"""Operating the gateway: rollouts, aliases and API keys (admin keys), /health and Prometheus /metrics."""

from __future__ import annotations

import asyncio
from datetime import datetime
from functools import partial
from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from loragate.registry import GateReport, VersionInfo

from .auth import Caller, admin
from .errors import OPENAI_ERRORS
from .keys import KeyStore
from .models import ApiKey
from .rollouts import Ramp, RolloutStatus, Thresholds
from .state import GatewayState, gateway_state


class RolloutRequest(BaseModel):
    adapter: str
    candidate: int = Field(ge=1)
    weight: float = Field(5.0, ge=0, le=100)
    min_requests: int = Field(20, ge=1)
    max_error_rate: float = Field(0.05, ge=0, le=1)
    max_latency_ratio: float = Field(1.5, gt=0)
    max_success_drop: float = Field(0.02, ge=0, le=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    ramp: list[float] | None = Field(None, description="Weights to step through, e.g. [5, 10, 25, 50, 100].")
    step_min_requests: int = Field(100, ge=1)
    step_min_minutes: float = Field(0.0, ge=0)
    mode: Literal["split", "shadow"] = Field("split", description="shadow: production answers everyone; the "
                                             "candidate answers a copy of `weight`% of requests, unseen.")

    def thresholds(self) -> Thresholds:
        return Thresholds(self.min_requests, self.max_error_rate, self.max_latency_ratio, self.max_success_drop,
                          self.alpha)

    def ramp_plan(self) -> Ramp | None:
        return Ramp(self.ramp, self.step_min_requests, self.step_min_minutes) if self.ramp else None


class WeightRequest(BaseModel):
    weight: float = Field(ge=0, le=100)


class PromoteRequest(BaseModel):
    version: int = Field(ge=1)
    to: str = "production"
    reason: str | None = None


class RollbackRequest(BaseModel):
    alias: str = "production"
    reason: str | None = None


class KeyRequest(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    scope: Literal["user", "admin"] = "user"
    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute.")
    models: list[str] = Field(default_factory=list, description="Models this key may use; empty: all.")


class KeyInfo(BaseModel):
    """A key as listed: never its token, nor its hash."""
    id: str
    name: str
    scope: str
    rpm: int | None
    tpm: int | None
    models: list[str]
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyInfo:
        return cls.model_validate(key.model_dump(exclude={"key_sha256"}))


class CreatedKeyInfo(KeyInfo):
    key: str = Field(description="The token (Authorization: Bearer ...), shown once: only its sha256 is stored.")


rollouts = APIRouter(prefix="/admin/rollouts", responses=OPENAI_ERRORS)
keys = APIRouter(prefix="/admin/keys", responses=OPENAI_ERRORS)
aliases = APIRouter(prefix="/admin/adapters", responses=OPENAI_ERRORS)
operations = APIRouter()


@rollouts.post("", response_model=RolloutStatus)
async def start_rollout(body: RolloutRequest, _: Caller = Depends(admin),
                        state: GatewayState = Depends(gateway_state)) -> RolloutStatus:
    await asyncio.to_thread(partial(state.rollouts.start, mode=body.mode), body.adapter, body.candidate,
                            body.weight, body.thresholds(), body.ramp_plan())
    return await asyncio.to_thread(state.rollouts.status, body.adapter)


@rollouts.get("/{adapter}", response_model=RolloutStatus)
async def rollout_status(adapter: str, _: Caller = Depends(admin),
                         state: GatewayState = Depends(gateway_state)) -> RolloutStatus:
    return await asyncio.to_thread(state.rollouts.status, adapter)


@rollouts.post("/{adapter}/weight", response_model=RolloutStatus)
async def rollout_weight(adapter: str, body: WeightRequest, _: Caller = Depends(admin),
                         state: GatewayState = Depends(gateway_state)) -> RolloutStatus:
    await asyncio.to_thread(state.rollouts.set_weight, adapter, body.weight)
    return await asyncio.to_thread(state.rollouts.status, adapter)


@rollouts.post("/{adapter}/promote", response_model=RolloutStatus)
async def rollout_promote(adapter: str, who: Caller = Depends(admin),
                          state: GatewayState = Depends(gateway_state)) -> RolloutStatus:
    await asyncio.to_thread(state.rollouts.promote, adapter, actor=who.actor)
    return await asyncio.to_thread(state.rollouts.status, adapter)


@aliases.post("/{adapter}/promote", response_model=GateReport)
async def promote(adapter: str, body: PromoteRequest, who: Caller = Depends(admin),
                  state: GatewayState = Depends(gateway_state)) -> GateReport:
    """`loragate registry promote` over HTTP: the gate, then the alias's policy about this key."""
    registry = state.registry.acting_as(who.actor)
    return await asyncio.to_thread(registry.promote, f"{adapter}@{body.version}", to=body.to, reason=body.reason)


@aliases.post("/{adapter}/rollback", response_model=VersionInfo)
async def rollback(adapter: str, body: RollbackRequest, who: Caller = Depends(admin),
                   state: GatewayState = Depends(gateway_state)) -> VersionInfo:
    """`loragate registry rollback` over HTTP."""
    registry = state.registry.acting_as(who.actor)
    return await asyncio.to_thread(registry.rollback, adapter, alias=body.alias, reason=body.reason)


@rollouts.post("/{adapter}/abort", response_model=RolloutStatus)
async def rollout_abort(adapter: str, _: Caller = Depends(admin),
                        state: GatewayState = Depends(gateway_state)) -> RolloutStatus:
    await asyncio.to_thread(state.rollouts.abort, adapter)
    return await asyncio.to_thread(state.rollouts.status, adapter)


def _keys(state: GatewayState, who: Caller) -> KeyStore:
    return KeyStore(state.registry.acting_as(who.actor))  # audited as the admin key that asked


@keys.post("", response_model=CreatedKeyInfo, status_code=201)
async def create_key(body: KeyRequest, who: Caller = Depends(admin),
                     state: GatewayState = Depends(gateway_state)) -> CreatedKeyInfo:
    """`loragate keys create` over HTTP."""
    created = await asyncio.to_thread(_keys(state, who).create, body.name, scope=body.scope, rpm=body.rpm,
                                      tpm=body.tpm, models=body.models)
    return CreatedKeyInfo(**KeyInfo.of(created.key).model_dump(), key=created.token)


@keys.get("", response_model=list[KeyInfo])
async def list_keys(_: Caller = Depends(admin), state: GatewayState = Depends(gateway_state)) -> list[KeyInfo]:
    return [KeyInfo.of(k) for k in await asyncio.to_thread(state.keys.list)]


@keys.delete("/{key_id}", response_model=KeyInfo)
async def revoke_key(key_id: str, who: Caller = Depends(admin),
                     state: GatewayState = Depends(gateway_state)) -> KeyInfo:
    """Revoke a key; every replica refuses it within 5 seconds."""
    return KeyInfo.of(await asyncio.to_thread(_keys(state, who).revoke, key_id))


@operations.get("/metrics", include_in_schema=False)
async def prometheus(state: GatewayState = Depends(gateway_state)) -> Response:
    for each in state.backends.values():
        state.metrics.queue.labels(each.name).set(getattr(each, "queue_depth", 0))
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@operations.get("/health")
async def health(state: GatewayState = Depends(gateway_state)) -> dict:
    """The gateway answers; ``engines`` says whether the engines it forwards to answer."""
    engines = await state.engines()
    return {"status": "ok" if all(e["up"] for e in engines.values()) else "degraded",
            "backends": {b.name: b.base_model for b in state.backends.values()}, "engines": engines}
