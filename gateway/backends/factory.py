"""The backend a gateway starts with, from settings."""

from __future__ import annotations

from loragate.offline_base import smollm2_gguf
from loragate.settings import Settings

from .base import Backend
from .llamacpp import LlamaCppBackend


def default_backend(settings: Settings) -> Backend:
    llamacpp = settings.gateway.llamacpp
    return LlamaCppBackend(llamacpp, llamacpp.gguf or smollm2_gguf())
