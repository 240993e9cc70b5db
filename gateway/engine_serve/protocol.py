"""What an engine replica is asked (the OpenAI fields a gateway's pool sends, as to vLLM) and how
it answers: OpenAI chunks, streamed, or one response."""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, Field

from ..backends.base import AdapterHandle, Delta, Generation


class StreamOptions(BaseModel):
    include_usage: bool = False


class EngineRequest(BaseModel):
    model: str
    messages: list[dict] | None = None  # chat; else ``prompt`` (completions)
    prompt: str | None = None
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    response_format: dict | None = None
    logprobs: bool | int | None = None  # chat: a flag beside top_logprobs; completions: the count
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def generation(self, adapter: AdapterHandle | None) -> Generation:
        chat = self.messages is not None
        top = (self.top_logprobs or 0 if self.logprobs else None) if chat else \
            (None if self.logprobs is None or self.logprobs is False else int(self.logprobs))
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Generation(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, stop=stop,
                          seed=self.seed, presence_penalty=self.presence_penalty,
                          frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias, top_logprobs=top,
                          response_format=self.response_format if chat else None, messages=self.messages,
                          prompt=None if chat else (self.prompt or ""), adapter=adapter, ignore_eos=self.ignore_eos)


class ChunkWriter:
    """OpenAI chunks for one answer: chat.completion.chunk or text_completion."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, **fields: object) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}

    def _choice(self, text: str | None, delta: Delta) -> dict:
        logprobs = {"content": delta.logprobs} if delta.logprobs else None
        body = {"delta": {"content": text} if text is not None else {}} if self.chat else {"text": text or ""}
        return {"index": 0, **body, "logprobs": logprobs, "finish_reason": delta.finish_reason}

    def chunk(self, delta: Delta) -> dict:
        return self._envelope(choices=[self._choice(delta.text if delta.finish_reason is None else None, delta)])

    def usage_chunk(self, last: Delta) -> dict:
        return self._envelope(choices=[], usage=_usage(last))

    def response(self, text: str, last: Delta, logprobs: list[dict]) -> dict:
        message = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [{"index": 0, **message, "logprobs": {"content": logprobs} if logprobs else None,
                             "finish_reason": last.finish_reason}], "usage": _usage(last)}


def _usage(last: Delta) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": last.cached_tokens}}
