"""An OpenAI-compatible server as a backend: a hosted model that is not ours, reached with our
own client (aiohttp, ``openai_http``) or through litellm (provider translation and its price table)."""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp

from loragate.settings import UpstreamSettings

from .base import BackendUnavailable, Delta, Generation
from .openai_http import merge, parse_delta, request_body, stream_generation, token_session, upstream_error

# litellm otherwise downloads its price table at import; the copy it ships is enough.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class UpstreamBackend:
    artifact_kind = "none"  # serves its own model, never a registry adapter
    fetches_artifacts = False

    def __init__(self, settings: UpstreamSettings, timeout_s: float):
        self.settings = settings
        self.name = f"upstream:{settings.name}"
        self.base_model = settings.name
        self.weights = settings.name
        self.slots = settings.slots
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, busy_s: float) -> float:
        if self.settings.price is not None:
            return self.settings.price.request_cost(tokens=prompt_tokens + completion_tokens, busy_s=busy_s,
                                                    slots=self.slots)
        import litellm

        if self.settings.model not in litellm.model_cost:
            return 0.0
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=self.settings.model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        return prompt_cost + completion_cost

    async def start(self) -> None:
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else None
        self._session = token_session(self.timeout_s, self.slots, headers={"Authorization": f"Bearer {key}"} if key else {})
        if self.settings.price is None:  # litellm prices it: its import takes seconds, not on the event loop
            await asyncio.to_thread(importlib.import_module, "litellm")

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    def generate(self, request: Generation) -> AsyncIterator[Delta]:
        if self.settings.client == "litellm":
            return self._via_litellm(request)
        return self._direct(request)

    async def _direct(self, request: Generation) -> AsyncIterator[Delta]:
        async for delta in stream_generation(self._session, self.settings.base_url.rstrip("/"), request,
                                             self.settings.model, label=f"upstream {self.settings.name}"):
            yield delta

    async def _via_litellm(self, request: Generation) -> AsyncIterator[Delta]:
        import litellm

        if request.messages is None:  # litellm speaks chat only
            request = replace(request, messages=[{"role": "user", "content": request.prompt or ""}], prompt=None)
        body = request_body(request, f"openai/{self.settings.model}")
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else "none"
        last = Delta(text="")
        try:
            stream = await litellm.acompletion(**body, api_base=self.settings.base_url,
                                               api_key=key, timeout=self.timeout_s)
            async for chunk in stream:
                delta = parse_delta(chunk.model_dump(), chat=True)
                last = merge(last, delta)
                if delta.text or delta.logprobs:
                    yield Delta(text=delta.text, logprobs=delta.logprobs)
        except litellm.exceptions.APIConnectionError as exc:
            raise BackendUnavailable(f"upstream {self.settings.name} unreachable") from exc
        except litellm.exceptions.APIError as exc:
            raise upstream_error(getattr(exc, "status_code", 502) or 502, str(exc)) from exc
        yield Delta(text="", finish_reason=last.finish_reason or "stop", prompt_tokens=last.prompt_tokens,
                    completion_tokens=last.completion_tokens)
