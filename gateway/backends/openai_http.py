"""Forwarding a ``Generation`` to an OpenAI-compatible server over httpx, streamed.

Shared by the ``upstream`` backend (a hosted model that is not ours) and the ``vllm`` backend (our
adapters on a vLLM server): one request body, one SSE parser, one error mapping.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from ..errors import GatewayError
from .base import BackendUnavailable, Delta, Generation


class EngineUnreachable(BackendUnavailable):
    """No connection to the server (down or restarting); nothing was generated yet."""


class UpstreamHTTPError(GatewayError):
    """The server answered with an HTTP error; ``upstream_status`` is its own status code."""

    def __init__(self, upstream_status: int, status: int, message: str, *, code: str):
        super().__init__(status, message, code=code)
        self.upstream_status = upstream_status


def request_body(request: Generation, model: str) -> dict:
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


def parse_delta(chunk: dict, chat: bool) -> Delta:
    choice = (chunk.get("choices") or [{}])[0]
    text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
    usage = chunk.get("usage") or {}
    return Delta(text=text, finish_reason=choice.get("finish_reason"),
                 prompt_tokens=usage.get("prompt_tokens", 0), completion_tokens=usage.get("completion_tokens", 0),
                 cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def merge(last: Delta, delta: Delta) -> Delta:
    return Delta(text="", finish_reason=delta.finish_reason or last.finish_reason,
                 prompt_tokens=delta.prompt_tokens or last.prompt_tokens,
                 completion_tokens=delta.completion_tokens or last.completion_tokens,
                 cached_tokens=delta.cached_tokens or last.cached_tokens)


def error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        try:  # vLLM's own routes answer {"message": ...} or {"detail": ...}
            raw = json.loads(text)
            return str(raw.get("message") or raw.get("detail") or text)[:300]
        except (ValueError, AttributeError):
            return text[:300]


def upstream_error(status: int, text: str, label: str = "upstream") -> UpstreamHTTPError:
    """The server's own client errors pass through; its failures are a bad gateway."""
    message = error_message(text)
    if 400 <= status < 500 and status not in (401, 403):
        return UpstreamHTTPError(status, status, f"{label}: {message}", code="upstream_rejected")
    return UpstreamHTTPError(status, 502, f"{label} failed with {status}: {message}", code="upstream_error")


async def stream_generation(client: httpx.AsyncClient, request: Generation, model: str, *, label: str,
                            extra_body: dict | None = None, base_url: str = "") -> AsyncIterator[Delta]:
    """POST to ``/chat/completions`` or ``/completions`` under ``base_url`` (default: the client's)
    and yield the text as it comes, then one closing Delta with the finish reason and usage.
    ``extra_body``: server-specific fields (e.g. vLLM's ``ignore_eos``, llama.cpp's ``lora``)."""
    chat = request.messages is not None
    path = base_url + ("/chat/completions" if chat else "/completions")
    last = Delta(text="")
    started = False
    try:
        async with client.stream("POST", path, json={**request_body(request, model), **(extra_body or {})}) as response:
            if response.status_code >= 400:
                await response.aread()
                raise upstream_error(response.status_code, response.text, label)
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk and not chunk.get("choices"):  # an error after the stream began
                    raise upstream_error(500, json.dumps(chunk), label)
                delta = parse_delta(chunk, chat)
                last = merge(last, delta)
                if delta.text:
                    started = True
                    yield Delta(text=delta.text)
    except httpx.TransportError as exc:
        error = EngineUnreachable if not started else BackendUnavailable
        raise error(f"{label} unreachable: {type(exc).__name__}") from exc
    yield Delta(text="", finish_reason=last.finish_reason or "stop", prompt_tokens=last.prompt_tokens,
                completion_tokens=last.completion_tokens, cached_tokens=last.cached_tokens)
