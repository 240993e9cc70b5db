"""The embedded CPU backend: llama.cpp's own server engine on one GGUF base, GGUF LoRAs per request.

The engine (``llamacpp_engine``) runs ``slots`` sequences at once with continuous batching. Every
loaded adapter has an id in the engine, and each request names its adapter with an explicit
``lora`` list (scale 1 for its own, 0 for every other, all 0 for the base), so no request ever runs
under another's adapter. The ``AdapterScheduler`` keeps one adapter in flight at a time (the
engine would not batch two anyway, and would starve the minority one) and picks the slot, so a
slot's KV prefix is reused only for the adapter that computed it.

llama-server loads adapter files only at start-up, so a request for an adapter that is not loaded
waits for its phase (nothing else in flight), and the engine is restarted with the adapters it
now needs: the most recently used ones, at most ``max_loras``. That costs about a second per new
adapter set, once; the weights come from the page cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import httpx

from loragate.settings import LlamaCppSettings

from .adapter_scheduler import BASE, AdapterScheduler
from .base import AdapterHandle, BackendUnavailable, Delta, Generation, PromptTooLong
from .engine_process import EngineProcess, EngineStartFailed, free_port
from .llamacpp_engine import EngineConfig, engine_process
from .openai_http import EngineUnreachable, UpstreamHTTPError, stream_generation, token_session

log = logging.getLogger("loragate.gateway")
_LABEL = "llama.cpp"


class LlamaCppBackend:
    name = "llamacpp"
    artifact_kind = "gguf-lora"
    fetches_artifacts = False

    def __init__(self, settings: LlamaCppSettings, gguf: Path, timeout_s: float, log_dir: Path):
        self.settings, self.gguf, self.timeout_s, self.log_dir = settings, gguf, timeout_s, log_dir
        self.base_model = settings.base_model
        self.weights = gguf.name
        self.slots = settings.slots
        self.scheduler = AdapterScheduler(settings.slots, settings.max_queue, settings.switch_after_s)
        self._loaded: OrderedDict[str, AdapterHandle] = OrderedDict()  # sha256 -> handle, least recent first
        self._engine_loras: list[str] = []  # the running engine's adapters (sha256), by engine id
        self._process: EngineProcess | None = None
        self._client: httpx.AsyncClient | None = None  # control calls: health, props
        self._session: aiohttp.ClientSession | None = None  # the token streams
        self._reload = asyncio.Lock()
        self._bos: list[int] = []  # what an empty completions prompt becomes

    def cost(self, prompt_tokens: int, completion_tokens: int, busy_s: float) -> float:
        return self.settings.price.request_cost(tokens=prompt_tokens + completion_tokens, busy_s=busy_s,
                                                slots=self.slots)

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    async def start(self) -> None:
        await self._start_engine([])

    async def warm(self, adapters: list[AdapterHandle]) -> None:
        """Start with these adapters loaded (the most recent ``max_loras``), before any request."""
        for adapter in adapters[-self.settings.max_loras:]:
            self._loaded[adapter.sha256] = adapter
        try:
            await self._start_engine(list(self._loaded.values()))
        except EngineStartFailed:  # a bad adapter file: start bare, its requests will say what failed
            log.exception("llama.cpp could not start with the serving adapters; starting without them")
            self._loaded.clear()
            await self._start_engine([])

    async def stop(self) -> None:
        if self._process is not None:
            await asyncio.to_thread(self._process.stop, 10)
        if self._client is not None:
            await self._client.aclose()
        if self._session is not None:
            await self._session.close()

    async def health(self) -> dict:
        return {"up": self._process is not None and self._process.running,
                "pid": self._process.pid if self._process else None, "slots": self.slots,
                "in_flight": self.scheduler.in_flight, "queued": self.scheduler.queue_depth,
                "adapters": [self._loaded[sha].key for sha in self._engine_loras if sha in self._loaded]}

    # -- the engine ----------------------------------------------------------------------------

    async def _start_engine(self, loras: list[AdapterHandle]) -> None:
        """(Re)start the engine with exactly these adapters; callers make sure nothing is in flight."""
        if self._process is not None:
            await asyncio.to_thread(self._process.stop, 10)
        config = EngineConfig(gguf=self.gguf, port=free_port(), slots=self.slots, n_ctx=self.settings.n_ctx,
                              n_threads=self.settings.n_threads, loras=[a.path for a in loras])
        process = engine_process(config, self.log_dir, self.settings.start_timeout_s)
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
            # Reusing a connection races with llama-server closing it (idle, or after its keep-alive
            # request count), and a request then fails with a reset connection (seen: 1-2 in 160).
            self._session = token_session(self.timeout_s, self.slots + 4, keep_alive=False)
        process.start()
        try:
            await process.wait_ready(self._client)
        except BaseException:
            await asyncio.to_thread(process.stop, 5)
            self._process, self._engine_loras = None, []
            raise
        self._process, self._engine_loras = process, [a.sha256 for a in loras]
        if not self._bos:
            self._bos = await self._bos_tokens()

    async def _bos_tokens(self) -> list[int]:
        """OpenAI generates from the start of text for an empty prompt; llama-server would generate
        nothing, so such a prompt is sent as the model's BOS token."""
        props = (await self._client.get(f"{self._process.url}/props")).json()
        tokenized = await self._client.post(f"{self._process.url}/tokenize",
                                            json={"content": props.get("bos_token") or "", "parse_special": True})
        return [t if isinstance(t, int) else t["id"] for t in tokenized.json().get("tokens", [])][:1]

    async def _engine_id(self, adapter: AdapterHandle) -> int:
        """The engine's id for ``adapter``, restarting the engine with it if need be. Only requests for
        this adapter are in flight (the scheduler's phase) and none has reached the engine yet."""
        async with self._reload:
            self._loaded[adapter.sha256] = adapter
            self._loaded.move_to_end(adapter.sha256)
            if adapter.sha256 not in self._engine_loras or not self._process or not self._process.running:
                while len(self._loaded) > self.settings.max_loras:
                    self._loaded.popitem(last=False)  # the least recently used
                await asyncio.to_thread(self._verify_loaded, adapter)
                log.info("llama.cpp: starting the engine with %s", ", ".join(a.key for a in self._loaded.values()))
                try:
                    await self._start_engine(list(self._loaded.values()))
                except EngineStartFailed as exc:
                    self._loaded.pop(adapter.sha256)
                    raise BackendUnavailable(f"llama.cpp could not load the GGUF LoRA of {adapter.key}: {exc}") from exc
            return self._engine_loras.index(adapter.sha256)

    def _verify_loaded(self, wanted: AdapterHandle) -> None:
        """Re-hash the files the engine is about to load: drop a damaged one, and fail if it is ours."""
        for sha, handle in list(self._loaded.items()):
            try:
                handle.verify()
            except Exception:
                del self._loaded[sha]
                if handle is wanted:
                    raise

    async def _ensure_running(self) -> None:
        async with self._reload:
            if self._process is None or not self._process.running:
                log.warning("llama.cpp engine is not running; starting it again")
                await self._start_engine([self._loaded[sha] for sha in self._engine_loras if sha in self._loaded])

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, request: Generation) -> AsyncIterator[Delta]:
        if self._client is None:
            raise BackendUnavailable("the llama.cpp backend is not started")
        if request.max_tokens > self.settings.n_ctx:
            raise PromptTooLong(f"max_tokens {request.max_tokens} is over this model's context of "
                                f"{self.settings.n_ctx} tokens per request")
        adapter = request.adapter
        queued = time.perf_counter()
        slot = await self.scheduler.acquire(adapter.sha256 if adapter else BASE, background=request.background)
        admitted, clock = time.perf_counter(), self.scheduler.clock()
        try:
            stream = await self._open(request, slot)
            async for delta in stream:
                if delta.finish_reason is not None:
                    delta.queue_ms = (admitted - queued) * 1000
                    delta.batch = self.scheduler.mean_batch(clock)
                    delta.completion_tokens = min(delta.completion_tokens, request.max_tokens)
                yield delta
        finally:
            self.scheduler.release(slot, time.perf_counter() - admitted)

    async def _open(self, request: Generation, slot: int) -> AsyncIterator[Delta]:
        """The engine's stream with its first delta already received (so errors surface here)."""
        retried = False
        while True:
            if request.adapter is not None:
                chosen = await self._engine_id(request.adapter)
            else:
                await self._ensure_running()
                chosen = -1
            lora = [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in range(len(self._engine_loras))]
            extra = {"lora": lora, "id_slot": slot, "cache_prompt": True}
            if request.messages is None and not request.prompt and self._bos:
                extra["prompt"] = self._bos
            sent = request
            if request.response_format is not None:
                extra["grammar"] = llguidance_grammar(request.response_format)
                sent = replace(request, response_format=None)
            stream = stream_generation(self._session, self._process.url + "/v1", sent, "base",
                                               label=_LABEL, extra_body=extra)
            try:
                first = await anext(stream)
            except EngineUnreachable:
                await stream.aclose()
                if retried:
                    raise
                retried = True  # the engine died or is restarting: (re)start it, once
                continue
            except UpstreamHTTPError as exc:
                await stream.aclose()
                if exc.upstream_status == 400 and "context" in exc.message:
                    raise PromptTooLong(exc.message.removeprefix(f"{_LABEL}: ")) from exc
                raise
            return _prepend(first, stream)


def llguidance_grammar(response_format: dict) -> str:
    """A JSON response format as a grammar for llguidance, the engine's grammar library. Given as
    ``response_format``, llama-server compiles the schema to its own GBNF instead, which ignores the
    schema's ``x-guidance`` options and lets the model spend tokens on newlines and indentation."""
    schema = response_format.get("json_schema", {}).get("schema") or {"type": "object"}
    return f"%llguidance {{}}\nstart: %json {json.dumps(schema)}"


async def _prepend(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    try:
        yield first
        async for delta in rest:
            yield delta
    finally:
        await rest.aclose()  # a client that went away: the engine stops the sequence
