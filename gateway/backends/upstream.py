"""An OpenAI-compatible server as a backend: a hosted model that is not ours, reached with our
own httpx client or through litellm (provider translation and its price table)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import httpx

from loragate.settings import UpstreamSettings

from ..errors import GatewayError
from .base import BackendUnavailable, Delta, Generation

# litellm otherwise downloads its price table at import; the copy it ships is enough.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _body(request: Generation, model: str) -> dict:
    body = {"model": model, "max_tokens": request.max_tokens, "temperature": request.temperature,
            "top_p": request.top_p, "stream": True, "stream_options": {"include_usage": True}}
    if request.stop:
        body["stop"] = request.stop
    if request.seed is not None:
        body["seed"] = request.seed
    if request.messages is not None:
        body["messages"] = request.messages
    else:
        body["prompt"] = request.prompt or ""
    return body


def _delta(chunk: dict, chat: bool) -> Delta:
    choice = (chunk.get("choices") or [{}])[0]
    text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
    usage = chunk.get("usage") or {}
    return Delta(text=text, finish_reason=choice.get("finish_reason"),
                 prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0))


class UpstreamBackend:
    artifact_kind = "none"  # serves its own model, never a registry adapter

    def __init__(self, settings: UpstreamSettings, timeout_s: float):
        self.settings = settings
        self.name = f"upstream:{settings.name}"
        self.base_model = settings.name
        self.slots = settings.slots
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

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
        self._client = httpx.AsyncClient(
            base_url=self.settings.base_url.rstrip("/"), timeout=self.timeout_s,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            limits=httpx.Limits(max_connections=self.slots, max_keepalive_connections=self.slots))

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def generate(self, request: Generation) -> AsyncIterator[Delta]:
        if self.settings.client == "litellm":
            return self._via_litellm(request)
        return self._via_httpx(request)

    async def _via_httpx(self, request: Generation) -> AsyncIterator[Delta]:
        chat = request.messages is not None
        path = "/chat/completions" if chat else "/completions"
        last = Delta(text="")
        try:
            async with self._client.stream("POST", path, json=_body(request, self.settings.model)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _upstream_error(response.status_code, response.text)
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = _delta(json.loads(line[6:]), chat)
                    last = _merge(last, delta)
                    if delta.text:
                        yield Delta(text=delta.text)
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"upstream {self.settings.name} unreachable: {type(exc).__name__}") from exc
        yield Delta(text="", finish_reason=last.finish_reason or "stop", prompt_tokens=last.prompt_tokens,
                    completion_tokens=last.completion_tokens)

    async def _via_litellm(self, request: Generation) -> AsyncIterator[Delta]:
        import litellm

        body = _body(request, f"openai/{self.settings.model}")
        body.pop("prompt", None)
        messages = request.messages or [{"role": "user", "content": request.prompt or ""}]
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else "none"
        last = Delta(text="")
        try:
            stream = await litellm.acompletion(**{**body, "messages": messages}, api_base=self.settings.base_url,
                                               api_key=key, timeout=self.timeout_s)
            async for chunk in stream:
                delta = _delta(chunk.model_dump(), chat=True)
                last = _merge(last, delta)
                if delta.text:
                    yield Delta(text=delta.text)
        except litellm.exceptions.APIConnectionError as exc:
            raise BackendUnavailable(f"upstream {self.settings.name} unreachable") from exc
        except litellm.exceptions.APIError as exc:
            raise _upstream_error(getattr(exc, "status_code", 502) or 502, str(exc)) from exc
        yield Delta(text="", finish_reason=last.finish_reason or "stop", prompt_tokens=last.prompt_tokens,
                    completion_tokens=last.completion_tokens)


def _merge(last: Delta, delta: Delta) -> Delta:
    return Delta(text="", finish_reason=delta.finish_reason or last.finish_reason,
                 prompt_tokens=delta.prompt_tokens or last.prompt_tokens,
                 completion_tokens=delta.completion_tokens or last.completion_tokens)


def _upstream_error(status: int, text: str) -> GatewayError:
    """The upstream's own client errors pass through; its failures are a bad gateway."""
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:300]
    if 400 <= status < 500 and status not in (401, 403):
        return GatewayError(status, f"upstream: {message}", code="upstream_rejected")
    return GatewayError(502, f"upstream failed with {status}: {message}", code="upstream_error")
