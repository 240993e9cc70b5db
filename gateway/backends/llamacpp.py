"""The embedded CPU backend: llama-cpp-python with one GGUF base loaded once.

GGUF LoRA adapters are loaded once each (``llama_adapter_lora_init``) and switched per request
with ``llama_set_adapters_lora``; the base weights are never reloaded. A llama.cpp context runs
one sequence at a time, so requests take turns (a bounded queue; beyond it, 503), each on a
worker thread that stops within one token when the client goes away.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loragate.settings import LlamaCppSettings

from .base import AdapterHandle, BackendUnavailable, Delta, Generation, PromptTooLong


class _TokenCounter:
    """A logits processor: llama.cpp calls it once per sampled token."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, input_ids, scores):  # type: ignore[no-untyped-def]
        self.count += 1
        return scores


class LlamaCppBackend:
    name = "llamacpp"
    artifact_kind = "gguf-lora"
    slots = 1

    def __init__(self, settings: LlamaCppSettings, gguf: Path):
        self.settings = settings
        self.base_model = settings.base_model
        self.gguf = gguf
        self._llm = None
        self._formatter = None
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self._adapters: OrderedDict[str, object] = OrderedDict()  # sha256 -> llama_adapter_lora_p
        self._active: str | None = None  # sha256 of the adapter set on the context

    def cost(self, prompt_tokens: int, completion_tokens: int, busy_s: float) -> float:
        return self.settings.price.request_cost(tokens=prompt_tokens + completion_tokens, busy_s=busy_s,
                                                slots=self.slots)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = Llama(model_path=str(self.gguf), n_ctx=self.settings.n_ctx, n_threads=self.settings.n_threads,
                    verbose=False)
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            eos, bos = llm.token_eos(), llm.token_bos()
            self._formatter = Jinja2ChatFormatter(
                template=template, eos_token=llm._model.token_get_text(eos), bos_token=llm._model.token_get_text(bos),
                stop_token_ids=[eos],
            )
        self._llm = llm

    async def stop(self) -> None:
        def close() -> None:
            if self._llm is not None:
                self._llm.close()
                self._llm = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)

    # -- adapters (worker thread only) -------------------------------------------------------

    def _activate(self, adapter: AdapterHandle | None) -> None:
        import llama_cpp

        wanted = adapter.sha256 if adapter else None
        if wanted == self._active:
            return
        ctx = self._llm._ctx.ctx
        if adapter is None:
            result = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            handle = self._adapters.get(adapter.sha256)
            if handle is None:
                handle = llama_cpp.llama_adapter_lora_init(self._llm._model.model, str(adapter.path).encode())
                if not handle:
                    raise BackendUnavailable(f"llama.cpp could not load the GGUF LoRA of {adapter.key}")
                self._adapters[adapter.sha256] = handle
                self._evict()
            self._adapters.move_to_end(adapter.sha256)
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
            scales = (ctypes.c_float * 1)(1.0)
            result = llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales)
        if result != 0:
            raise BackendUnavailable("llama.cpp refused to switch adapters")
        self._active = wanted
        # The KV cache was computed under the previous adapter: never reuse its prefix.
        self._llm.reset()

    def _evict(self) -> None:
        import llama_cpp

        while len(self._adapters) > self.settings.max_loras:
            sha, handle = next(iter(self._adapters.items()))
            if sha == self._active:
                self._adapters.move_to_end(sha)
                continue
            del self._adapters[sha]
            llama_cpp.llama_adapter_lora_free(handle)

    # -- generation ----------------------------------------------------------------------------

    def _prompt(self, request: Generation) -> tuple[list[int], list[str]]:
        stop = list(request.stop)
        if request.messages is not None:
            if self._formatter is None:
                raise PromptTooLong("this model has no chat template; use /v1/completions")
            formatted = self._formatter(messages=request.messages)
            text = formatted.prompt
            stop += [s for s in ([formatted.stop] if isinstance(formatted.stop, str) else formatted.stop or [])]
            tokens = self._llm.tokenize(text.encode(), add_bos=not formatted.added_special, special=True)
        else:
            tokens = self._llm.tokenize((request.prompt or "").encode(), add_bos=True, special=False)
            # An empty prompt is valid (OpenAI generates from the start); llama.cpp needs one token.
            tokens = tokens or [self._llm.token_bos()]
        if len(tokens) + request.max_tokens > self.settings.n_ctx:
            raise PromptTooLong(
                f"this model's context is {self.settings.n_ctx} tokens; the prompt has {len(tokens)} "
                f"and max_tokens asks for {request.max_tokens}"
            )
        return tokens, stop

    def _run(self, request: Generation, emit, cancel: threading.Event) -> None:  # type: ignore[no-untyped-def]
        from llama_cpp import LogitsProcessorList

        try:
            self._activate(request.adapter)
            tokens, stop = self._prompt(request)
            counter = _TokenCounter()
            stream = self._llm.create_completion(
                prompt=tokens, max_tokens=request.max_tokens, temperature=request.temperature,
                top_p=request.top_p, stop=stop or None, seed=request.seed, stream=True,
                logits_processor=LogitsProcessorList([counter]),
            )
            finish = None
            for chunk in stream:
                if cancel.is_set():
                    stream.close()
                    return
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason")
                if choice["text"]:
                    emit(Delta(text=choice["text"]))
            emit(Delta(text="", finish_reason=finish or "stop", prompt_tokens=len(tokens),
                       completion_tokens=counter.count))
        except Exception as exc:  # handed to the request's coroutine, which maps it to an HTTP error
            emit(exc)

    async def generate(self, request: Generation) -> AsyncIterator[Delta]:
        if self._llm is None:
            raise BackendUnavailable("the llama.cpp backend is not loaded")
        if self._waiting >= self.settings.max_queue:
            raise BackendUnavailable(f"llama.cpp queue is full ({self.settings.max_queue} waiting)")
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        worker = loop.run_in_executor(self._executor, self._run, request, lambda item: loop.call_soon_threadsafe(
            queue.put_nowait, item), cancel)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            cancel.set()
            try:
                await asyncio.shield(worker)
            except asyncio.CancelledError:
                await asyncio.wait_for(asyncio.shield(worker), timeout=30)
            finally:
                self._lock.release()
