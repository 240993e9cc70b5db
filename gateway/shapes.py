"""How generated text is shaped for each endpoint: whole responses and SSE chunks, as OpenAI sends them."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from pydantic import BaseModel

from .backends.base import Delta
from .openai_types import (
    ChatChoice,
    ChatCompletion,
    Completion,
    CompletionChoice,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
)


def usage_of(delta: Delta) -> Usage:
    return Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens,
                 total_tokens=delta.prompt_tokens + delta.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=delta.cached_tokens))


@dataclass
class Shape:
    model: str
    id_prefix = "cmpl"
    chunk_object = "text_completion"
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices}

    def usage_chunk(self, last: Delta) -> dict:
        return {**self._chunk([]), "usage": usage_of(last).model_dump()}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, delta: Delta) -> list[dict]:
        raise NotImplementedError

    def response(self, text: str, last: Delta) -> BaseModel:
        raise NotImplementedError


class ChatShape(Shape):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def opening(self) -> list[dict]:
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]

    def chunks(self, delta: Delta) -> list[dict]:
        out = []
        if delta.text:
            out.append(self._chunk([{"index": 0, "delta": {"content": delta.text}, "finish_reason": None}]))
        if delta.finish_reason:
            out.append(self._chunk([{"index": 0, "delta": {}, "finish_reason": delta.finish_reason}]))
        return out

    def response(self, text: str, last: Delta) -> ChatCompletion:
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage_of(last),
                              choices=[ChatChoice(message=ResponseMessage(content=text),
                                                  finish_reason=last.finish_reason)])


class CompletionShape(Shape):
    def chunks(self, delta: Delta) -> list[dict]:
        return [self._chunk([{"index": 0, "text": delta.text, "logprobs": None,
                              "finish_reason": delta.finish_reason}])]

    def response(self, text: str, last: Delta) -> Completion:
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage_of(last),
                          choices=[CompletionChoice(text=text, finish_reason=last.finish_reason)])
