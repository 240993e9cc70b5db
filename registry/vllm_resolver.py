"""A vLLM LoRA resolver plugin: a vLLM server serves ``name@N`` from the registry's store alone.

vLLM asks its resolvers about a ``model`` it does not know. This one reads the store's record of
``name@N`` (written when the version was registered), checks that the version was trained on the
base this server serves (``gateway.vllm.base_model``, the registry's id of it: vLLM tells a resolver
only its model path), fetches the artifact by sha256 into the server's local cache, re-hashes it, and
hands vLLM the folder. The server shares no filesystem and no database with the gateway.

Install it beside vLLM (it needs only boto3 and pydantic-settings there, so vLLM keeps its own pins)::

    pip install --no-deps loragate && pip install boto3 'pydantic-settings[yaml]'

and run the server with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``, ``VLLM_PLUGINS=loragate`` (or
unset), the store's settings (``LORAGATE_STORE__URL=s3://bucket/prefix``,
``LORAGATE_STORE__ENDPOINT_URL``, ``LORAGATE_STORE__CACHE_DIR``, AWS credentials), and
``LORAGATE_GATEWAY__VLLM__BASE_MODEL`` and ``--served-model-name`` set to the registry's id of the base.
"""

from __future__ import annotations

import asyncio
import logging

from loragate.settings import Settings

from .errors import RegistryError
from .object_store import open_store
from .store import Store

log = logging.getLogger("loragate.vllm_resolver")


class StoreResolver:
    """Resolves ``name@N`` through the store's version records; anything else is not ours (None)."""

    def __init__(self, store: Store, base_model: str):
        self.store = store
        self.base_model = base_model  # the registry's id of the base this server serves

    def find(self, lora_name: str) -> str | None:
        """The verified local folder of ``lora_name``, or None: not a version, not in the store, for
        another base, or its files cannot be had (logged: the gateway then answers 503). vLLM would
        answer a bare 500 to anything raised here."""
        name, at, number = lora_name.rpartition("@")
        if not at or not name or not number.isdigit():
            return None
        try:
            record = self.store.read_version(name, int(number))
            if record is None:
                log.warning("loragate resolver: no record of %s in the store", lora_name)
                return None
            if record.base_model != self.base_model:
                log.warning("loragate resolver: %s is an adapter for %s, not for this server's %s", lora_name,
                            record.base_model, self.base_model)
                return None
            folder = self.store.open(record.sha256)  # downloaded if need be, re-hashed either way
        except (RegistryError, ValueError, KeyError) as exc:  # a bad name, a damaged record or artifact, the store down
            log.error("loragate resolver: %s: %s", lora_name, exc)
            return None
        self.store.pin(record.sha256)  # vLLM reloads it from this path whenever it needs it again
        log.info("loragate resolver: %s is artifact %s at %s", lora_name, record.sha256[:12], folder)
        return str(folder)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: add the resolver to vLLM's registry."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    settings = Settings()
    resolver = StoreResolver(open_store(settings.store, settings.store_dir, settings.store_cache_dir),
                             settings.gateway.vllm.base_model)

    class LoragateResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            folder = await asyncio.to_thread(resolver.find, lora_name)
            if folder is None:
                return None
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=folder)  # vLLM sets its own id

    LoRAResolverRegistry.register_resolver("loragate", LoragateResolver())
