"""The adapter registry: versions, lineage, scores, licences, aliases, audit, artifact store.

>>> from loragate.registry import Registry
>>> registry = Registry()
"""

from .api import Registry
from .gate import served_suite
from .errors import ArtifactCorrupt, Conflict, Forbidden, GateRefused, InvalidAdapter, InvalidInput, NotFound, RegistryError
from .schemas import Actor, EvalInput, GateReport, OutputCheck, VersionInfo, VersionRef
from .webhook_sender import WebhookSender
from .webhooks import EVENT_TYPES, Webhooks

__all__ = [
    "EVENT_TYPES",
    "Actor",
    "ArtifactCorrupt",
    "Conflict",
    "EvalInput",
    "Forbidden",
    "GateRefused",
    "GateReport",
    "InvalidAdapter",
    "InvalidInput",
    "NotFound",
    "OutputCheck",
    "Registry",
    "RegistryError",
    "VersionInfo",
    "VersionRef",
    "WebhookSender",
    "Webhooks",
    "served_suite",
]
