"""How generated text is shaped for each endpoint: whole responses and SSE chunks, as OpenAI sends them.

A shape follows every choice of a request (``n``) as its deltas arrive, so it can answer whole
(``response``) or chunk by chunk (``chunks``); tool calls are answered when their choice ends,
since they are parsed from the model's whole answer.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from .backends.base import Delta
from .errors import GatewayError, error_body
from .openai_types import (
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    ResponseMessage,
    Usage,
)
from .tool_calls import ToolAnswer, ToolMode

_FINISH_REASONS = ("stop", "length", "content_filter")


def finish_reason(engine_reason: str | None) -> str:
    """OpenAI's reasons only: an engine's own (vLLM's ``abort``, say) read as a plain stop."""
    return engine_reason if engine_reason in _FINISH_REASONS else "stop"


@dataclass
class ChoiceState:
    parts: list[str] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    offset: int = 0  # characters streamed so far (the completions endpoint's text_offset)
    tool_answer: ToolAnswer | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Shape:
    id_prefix = "cmpl"
    chunk_object = "text_completion"

    def __init__(self, model: str, n: int = 1, logprobs: bool = False):
        self.model, self.logprobs = model, logprobs
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [ChoiceState() for _ in range(n)]

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices}

    def add(self, delta: Delta) -> ChoiceState:
        choice = self.choices[delta.index]
        choice.parts.append(delta.text)
        choice.logprobs.extend(delta.logprobs or [])
        if delta.finish_reason is not None:
            choice.finish_reason = finish_reason(delta.finish_reason)
        return choice

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self._chunk([]), "usage": usage.model_dump()}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, delta: Delta) -> list[dict]:
        raise NotImplementedError

    def response(self, usage: Usage) -> dict:
        raise NotImplementedError

    async def complete(self, usage: Usage) -> None:
        """Called once the whole answer is in, before its last frame or the response goes out."""

    # -- server-sent events --------------------------------------------------------------------

    def frame(self, chunk: dict) -> str:
        return f"data: {json.dumps(chunk)}\n\n"

    def closing(self, usage: Usage, include_usage: bool) -> list[str]:
        """The frames after the last delta: the usage chunk if the client asked for it, then [DONE]."""
        return [*([self.frame(self.usage_chunk(usage))] if include_usage else []), "data: [DONE]\n\n"]

    def error_frame(self, error: GatewayError) -> str:
        return self.frame(error_body(error.status, error.message, error.code, error.param))


class ChatShape(Shape):
    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"

    def __init__(self, model: str, n: int = 1, logprobs: bool = False, tools: ToolMode | None = None):
        super().__init__(model, n, logprobs)
        self.tools = tools

    def _choice_chunk(self, index: int, delta: dict, logprobs: list[dict] | None = None,
                      finish: str | None = None) -> dict:
        return self._chunk([{"index": index, "delta": delta, "logprobs": self._logprobs(logprobs),
                             "finish_reason": finish}])

    def _logprobs(self, entries: list[dict] | None) -> dict | None:
        return ChatLogprobs(content=entries).model_dump() if self.logprobs and entries is not None else None

    def opening(self) -> list[dict]:
        return [self._choice_chunk(i, {"role": "assistant", "content": ""}) for i in range(len(self.choices))]

    def chunks(self, delta: Delta) -> list[dict]:
        choice = self.add(delta)
        if self.tools is not None:
            return self._tool_chunks(delta.index, choice) if delta.finish_reason is not None else []
        out = []
        if delta.text or delta.logprobs:
            out.append(self._choice_chunk(delta.index, {"content": delta.text}, delta.logprobs))
        if delta.finish_reason is not None:
            out.append(self._choice_chunk(delta.index, {}, finish=choice.finish_reason))
        return out

    def _answer(self, choice: ChoiceState) -> tuple[ToolAnswer, str]:
        """A choice's content or tool calls, and its finish reason."""
        if self.tools is None:
            return ToolAnswer(content=choice.text, tool_calls=None), choice.finish_reason or "stop"
        if choice.tool_answer is None:
            choice.tool_answer = self.tools.parse(choice.text)
        reason = "tool_calls" if choice.tool_answer.tool_calls else choice.finish_reason or "stop"
        return choice.tool_answer, reason

    def _tool_chunks(self, index: int, choice: ChoiceState) -> list[dict]:
        answer, reason = self._answer(choice)
        if answer.tool_calls:
            delta = {"tool_calls": [{"index": k, **call.model_dump()} for k, call in enumerate(answer.tool_calls)]}
        else:
            delta = {"content": answer.content}
        return [self._choice_chunk(index, delta, choice.logprobs), self._choice_chunk(index, {}, finish=reason)]

    def response(self, usage: Usage) -> dict:
        choices = []
        for index, choice in enumerate(self.choices):
            answer, reason = self._answer(choice)
            choices.append(ChatChoice(
                index=index, finish_reason=reason,
                message=ResponseMessage(content=answer.content, tool_calls=answer.tool_calls),
                logprobs=ChatLogprobs(content=choice.logprobs) if self.logprobs else None))
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=usage,
                              choices=choices).model_dump()


class CompletionShape(Shape):
    def _legacy(self, choice: ChoiceState, entries: list[dict]) -> CompletionLogprobs:
        """Chat-style token entries in the completions endpoint's layout, offsets counted on."""
        legacy = CompletionLogprobs()
        for entry in entries:
            legacy.tokens.append(entry["token"])
            legacy.token_logprobs.append(entry["logprob"])
            legacy.top_logprobs.append({top["token"]: top["logprob"] for top in entry["top_logprobs"]})
            legacy.text_offset.append(choice.offset)
            choice.offset += len(entry["token"])
        return legacy

    def chunks(self, delta: Delta) -> list[dict]:
        choice = self.add(delta)
        logprobs = self._legacy(choice, delta.logprobs or []).model_dump() if self.logprobs else None
        return [self._chunk([{"index": delta.index, "text": delta.text, "logprobs": logprobs,
                              "finish_reason": choice.finish_reason if delta.finish_reason else None}])]

    def response(self, usage: Usage) -> dict:
        choices = [CompletionChoice(index=index, text=choice.text, finish_reason=choice.finish_reason or "stop",
                                    logprobs=self._legacy(choice, choice.logprobs) if self.logprobs else None)
                   for index, choice in enumerate(self.choices)]
        return Completion(id=self.id, created=self.created, model=self.model, usage=usage,
                          choices=choices).model_dump()
