"""The backend a gateway starts with, from settings."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from loragate.offline_base import llamacpp_base_gguf
from loragate.registry import Registry
from loragate.settings import Settings

from .base import Backend
from .llamacpp import LlamaCppBackend
from .pool import EnginePool
from .upstream import UpstreamBackend
from .vllm import vllm_backend


def default_backend(settings: Settings, registry: Registry, metrics: CollectorRegistry | None = None) -> Backend:
    """The backend that serves the base model and the registry's adapters (``gateway.backend``);
    ``metrics``: where a pool exports its routing (the gateway's /metrics)."""
    if settings.gateway.backend == "vllm":
        return vllm_backend(settings, registry)
    if settings.gateway.backend == "pool":
        return EnginePool(settings.gateway.pool, settings.gateway.request_timeout_s, registry,
                          metrics or CollectorRegistry(),
                          heartbeat_s=settings.engine.heartbeat_s)
    llamacpp = settings.gateway.llamacpp
    return LlamaCppBackend(llamacpp, llamacpp_base_gguf(registry), settings.gateway.request_timeout_s,
                           settings.home / "logs")


def upstream_backends(settings: Settings) -> list[Backend]:
    return [UpstreamBackend(u, settings.gateway.request_timeout_s) for u in settings.gateway.upstreams]
