"""The GPU backend: a vLLM OpenAI server with many LoRA adapters on one base.

A registered version is served under its own name, ``name@N``, which is then the ``model`` of the
requests that version serves. It reaches the engine one of two ways (``gateway.vllm.adapters``):

- ``load``: on first use the gateway posts its peft folder from the registry's store
  (``POST /v1/load_lora_adapter``). At most ``max_loras`` stay loaded: the least recently used one
  that no request is using is unloaded. An engine that comes back without our adapters (a restart)
  gets them loaded again.
- ``resolver``: the gateway sends ``model="name@N"`` and the engine's loragate resolver plugin
  fetches the version from the object store by sha256 (``loragate.registry.vllm_resolver``); vLLM
  keeps at most ``--max-loras`` on the GPU itself. The engine needs nothing of the gateway's disk.

While the engine is down or restarting a request retries for ``retry_s`` and then gets a 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator

import aiohttp
import httpx

from loragate.registry import Registry
from loragate.settings import Settings, VllmSettings

from ..errors import GatewayError
from .base import AdapterHandle, BackendUnavailable, Delta, Generation, PromptTooLong
from .openai_http import EngineUnreachable, UpstreamHTTPError, error_message, stream_generation, token_session
from .engine_process import EngineProcess
from .vllm_engine import vllm_process

log = logging.getLogger("loragate.gateway")
_LABEL = "vLLM"


class VllmBackend:
    name = "vllm"
    artifact_kind = "peft"  # the version's own adapter folder, as registered

    def __init__(self, settings: VllmSettings, timeout_s: float, process: EngineProcess | None = None):
        if settings.url is None and process is None:
            raise ValueError("a vLLM backend needs a url to attach to or a process to start")
        self.settings = settings
        self.base_model = settings.base_model
        self.weights = settings.model or settings.base_model
        self.slots = settings.slots
        self.timeout_s = timeout_s
        self.process = process
        self.url = (settings.url or process.url).rstrip("/")
        self._client: httpx.AsyncClient | None = None  # health and the LoRA routes
        self._session: aiohttp.ClientSession | None = None  # the token streams
        self._loaded: OrderedDict[str, None] = OrderedDict()  # LoRA names, least recently used first
        self._in_use: Counter[str] = Counter()
        self._lock = asyncio.Lock()  # one load or unload at a time
        self.fetches_artifacts = settings.adapters == "resolver"

    def cost(self, prompt_tokens: int, completion_tokens: int, busy_s: float) -> float:
        return self.settings.price.request_cost(tokens=prompt_tokens + completion_tokens, busy_s=busy_s,
                                                slots=self.slots)

    async def start(self) -> None:
        # Generation and the LoRA routes live under /v1; /health (asked by absolute URL) does not.
        self._client = httpx.AsyncClient(base_url=f"{self.url}/v1", timeout=self.timeout_s,
                                         limits=httpx.Limits(max_connections=self.slots,
                                                             max_keepalive_connections=self.slots))
        # A connection per request, as for llama.cpp: a reused one that the server closes as we send
        # reads as the engine being down, which a pool would take for a dead replica.
        self._session = token_session(self.timeout_s, self.slots, keep_alive=False)
        if self.process is not None:
            self.process.start()
            try:
                await self.process.wait_ready(self._client)
            except BaseException:
                await asyncio.to_thread(self.process.stop)
                raise
        elif not await self._engine_up():  # attached: serve 503s until it is up, never refuse to start
            log.warning("vLLM at %s is not up yet; requests retry for %g s, then get a 503", self.url,
                        self.settings.retry_s)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._session is not None:
            await self._session.close()
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)

    async def health(self) -> dict:
        """What the gateway's /health reports of the engine."""
        return {"url": self.url, "up": await self._engine_up(), "pid": self.process.pid if self.process else None,
                "adapters": list(self._loaded)}

    async def _engine_up(self) -> bool:
        try:
            return (await self._client.get(f"{self.url}/health", timeout=2)).status_code == 200
        except httpx.TransportError:
            return False

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: Generation) -> AsyncIterator[Delta]:
        adapter = request.adapter
        if adapter is not None:
            self._in_use[adapter.key] += 1
        try:
            first, stream = await self._first_delta(request)
            try:
                yield first
                async for delta in stream:
                    yield delta
            finally:
                await stream.aclose()  # a client that went away: vLLM aborts the request
        finally:
            if adapter is not None:
                self._in_use[adapter.key] -= 1

    async def _first_delta(self, request: Generation) -> tuple[Delta, AsyncIterator[Delta]]:
        """Open the stream, retrying while the engine is unreachable (for ``retry_s``) and once when
        it no longer knows our adapter (it restarted, or another gateway unloaded it)."""
        deadline = time.monotonic() + self.settings.retry_s
        reloaded = False
        while True:
            try:
                model = await self._load(request.adapter) if request.adapter else self.settings.served_name
                stream = stream_generation(self._session, f"{self.url}/v1", request, model, label=_LABEL)
                return await anext(stream), stream
            except EngineUnreachable as exc:
                self._loaded.clear()  # a restarted engine comes back without them
                if time.monotonic() >= deadline:
                    raise BackendUnavailable(f"the vLLM engine at {self.url} is down or restarting "
                                             f"(retried for {self.settings.retry_s:g} s); try again shortly") from exc
                self._restart_if_exited()
                await asyncio.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
            except UpstreamHTTPError as exc:
                if exc.upstream_status == 404 and request.adapter is not None and self.fetches_artifacts:
                    raise GatewayError(503, f"the vLLM engine at {self.url} could not fetch {request.adapter.key} "
                                            f"from the store through its loragate resolver; its log says why",
                                       code="adapter_unresolved") from exc
                if exc.upstream_status == 404 and request.adapter is not None and not reloaded:
                    self._loaded.pop(request.adapter.key, None)
                    reloaded = True
                    continue
                if exc.upstream_status == 400 and "maximum context length" in exc.message:
                    raise PromptTooLong(exc.message.removeprefix(f"{_LABEL}: ")) from exc
                raise

    def _restart_if_exited(self) -> None:
        if self.process is not None and not self.process.running:
            log.warning("vLLM (pid %s) exited; starting it again", self.process.pid)
            self.process.start()

    # -- adapters ------------------------------------------------------------------------------

    async def _load(self, adapter: AdapterHandle) -> str:
        """The LoRA name the engine serves this version under, loading it first if need be."""
        if self.fetches_artifacts:
            return adapter.key  # the engine's resolver fetches it on first use
        async with self._lock:
            if adapter.key not in self._loaded:
                folder = await asyncio.to_thread(adapter.verify)  # re-hashed, and back in the cache if evicted
                await self._post("load", {"lora_name": adapter.key, "lora_path": str(folder)},
                                 already_ok="has already been loaded")
                self._loaded[adapter.key] = None
            self._loaded.move_to_end(adapter.key)
            await self._unload_beyond_limit()
        return adapter.key

    async def _unload_beyond_limit(self) -> None:
        idle = [name for name in self._loaded if not self._in_use[name]]
        for name in idle[:max(len(self._loaded) - self.settings.max_loras, 0)]:
            await self._post("unload", {"lora_name": name}, already_ok="cannot be found")
            del self._loaded[name]

    async def _post(self, action: str, body: dict, *, already_ok: str) -> None:
        """``POST /v1/{action}_lora_adapter``; ``already_ok`` in the answer means it is done already."""
        try:
            response = await self._client.post(f"/{action}_lora_adapter", json=body)
        except httpx.TransportError as exc:
            raise EngineUnreachable(f"{_LABEL} unreachable: {type(exc).__name__}") from exc
        if response.status_code == 200 or already_ok in response.text:
            return
        raise GatewayError(502, f"{_LABEL} could not {action} {body['lora_name']} ({response.status_code}): "
                                f"{error_message(response.text)}", code=f"adapter_{action}_failed")


def vllm_backend(settings: Settings, registry: Registry) -> VllmBackend:
    """Attach to ``gateway.vllm.url``, or start our own server on the registry's base model folder."""
    vllm = settings.gateway.vllm
    process = None
    if vllm.url is None:
        model = vllm.model or str(registry.base_model_folder(vllm.base_model))
        process = vllm_process(vllm, model, settings.home / "logs")
    return VllmBackend(vllm, settings.gateway.request_timeout_s, process)
