"""The adapter registry: versions, lineage, scores, licences, aliases, audit, artifact store.

>>> from loragate.registry import Registry
>>> registry = Registry()

Names load on first use, so a process that needs only the store (vLLM's resolver plugin, in an
environment without the database libraries) imports ``loragate.registry.vllm_resolver`` alone.
"""

from importlib import import_module
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "Registry": "api",
    "served_suite": "gate",
    "EVENT_TYPES": "webhooks",
    "Webhooks": "webhooks",
    "WebhookSender": "webhook_sender",
    **dict.fromkeys(["ArtifactCorrupt", "Conflict", "Forbidden", "GateRefused", "InvalidAdapter", "InvalidInput",
                     "NotFound", "RegistryError", "StoreUnavailable"], "errors"),
    **dict.fromkeys(["Actor", "EvalInput", "GateReport", "OutputCheck", "VersionInfo", "VersionRef"], "schemas"),
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .api import Registry
    from .errors import (ArtifactCorrupt, Conflict, Forbidden, GateRefused, InvalidAdapter, InvalidInput, NotFound,
                         RegistryError, StoreUnavailable)
    from .gate import served_suite
    from .schemas import Actor, EvalInput, GateReport, OutputCheck, VersionInfo, VersionRef
    from .webhook_sender import WebhookSender
    from .webhooks import EVENT_TYPES, Webhooks


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
