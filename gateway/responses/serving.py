"""A Responses request served as chat: the conversation turned into chat messages, the answer into
Responses output items, whole or as OpenAI's typed stream events.

The chat path does the rest (routing, versions and A/B arms, keys, limits, metering, shadow copies,
output checks, tool calls): a response is one chat completion with ``n=1``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable

from pydantic import ValidationError

from ..backends.base import Delta
from ..errors import GatewayError, error_body
from ..openai_types import ChatCompletionRequest, NamedToolChoice, Usage
from ..shapes import Shape
from ..tool_calls import ToolMode
from .protocol import FunctionCallItem, FunctionCallOutputItem, MessageItem, NamedFunctionChoice, ResponsesRequest


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def with_ids(items: list[MessageItem | FunctionCallItem | FunctionCallOutputItem]) -> list[dict]:
    """The input items as they are stored and listed: each with an id, messages' text as parts."""
    stored = []
    for item in items:
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            parts = ([{"type": kind, "text": item.content}] if isinstance(item.content, str)
                     else [{"type": kind if p.type == "text" else p.type, "text": p.text} for p in item.content])
            if kind == "output_text":
                parts = [{**p, "annotations": [], "logprobs": []} for p in parts]
            stored.append({"id": item.id or item_id("msg"), "type": "message", "role": item.role, "content": parts,
                           "status": "completed"})
        elif isinstance(item, FunctionCallItem):
            stored.append({"id": item.id or item_id("fc"), "type": "function_call", "call_id": item.call_id,
                           "name": item.name, "arguments": item.arguments, "status": "completed"})
        else:
            stored.append({"id": item.id or item_id("fco"), "type": "function_call_output", "call_id": item.call_id,
                           "output": item.text, "status": "completed"})
    return stored


def chat_request(body: ResponsesRequest, history: list[dict], items: list[dict]) -> ChatCompletionRequest:
    """The chat request that answers ``body``: ``instructions`` first (an earlier response's are not
    carried over, as OpenAI does), then the earlier turns, then this input."""
    messages: list[dict] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    for item in [*history, *items]:
        if item["type"] == "message":
            messages.append({"role": item["role"], "content": "".join(p["text"] for p in item["content"])})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") and not last.get("content"):
                last["tool_calls"].append(call)  # consecutive calls: one assistant turn, as chat has them
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    choice = body.tool_choice
    try:
        return ChatCompletionRequest(
            model=body.model, messages=messages, max_completion_tokens=body.max_output_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, stream=body.stream, user=body.user,
            tools=[t.chat() for t in body.tools] if body.tools else None,
            tool_choice=(NamedToolChoice(type="function", function={"name": choice.name})
                         if isinstance(choice, NamedFunctionChoice) else choice),
            parallel_tool_calls=body.parallel_tool_calls is not False,
            response_format=body.text.format.chat() if body.text and body.text.format else None,
            store=body.store)
    except ValidationError as exc:  # e.g. a function_call_output that answers no function_call
        first = exc.errors()[0]
        raise GatewayError(400, f"input: {first['msg'].removeprefix('Value error, ')}", code="invalid_request",
                           param="input") from exc


class ResponsesShape(Shape):
    """One response: its output items, the whole ``response`` object, and its stream of events."""

    def __init__(self, body: ResponsesRequest, tools: ToolMode | None, on_complete: Callable[[dict], Awaitable[None]]):
        super().__init__(body.model)
        self.id = item_id("resp")
        self.body, self.tools, self.on_complete = body, tools, on_complete
        self.sequence = 0
        self.message_id = item_id("msg")
        self.output: list[dict] = []
        self.final: dict | None = None

    # -- the response object -------------------------------------------------------------------

    def snapshot(self, status: str, usage: Usage | None = None) -> dict:
        body = self.body
        incomplete = status == "incomplete"
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
            "output": self.output if status != "in_progress" else [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": body.store is not False, "background": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)
                     if body.text and body.text.format else {"type": "text"}},
            "tool_choice": (body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunctionChoice)
                            else body.tool_choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) | {"strict": bool(t.strict), "parameters": t.parameters}
                      for t in body.tools or []],
            "truncation": "disabled", "metadata": body.metadata or {}, **({"user": body.user} if body.user else {}),
            **({} if usage is None else {"usage": {
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens,
                                         "cache_write_tokens": 0},
                "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens}}),
        }

    @property
    def status(self) -> str:
        return "incomplete" if self.choices[0].finish_reason == "length" and not self._calls() else "completed"

    def response(self, usage: Usage) -> dict:
        if self.final is None:
            self._build_output()
            self.final = self.snapshot(self.status, usage)
        return self.final

    async def complete(self, usage: Usage) -> None:
        await self.on_complete(self.response(usage))

    def _calls(self) -> list:
        if self.tools is None:
            return []
        choice = self.choices[0]
        if choice.tool_answer is None:
            choice.tool_answer = self.tools.parse(choice.text)
        return choice.tool_answer.tool_calls or []

    def _build_output(self) -> None:
        if self.output:
            return
        calls = self._calls()
        if calls:
            self.output = [{"id": item_id("fc"), "type": "function_call", "call_id": call.id,
                            "name": call.function.name, "arguments": call.function.arguments, "status": "completed"}
                           for call in calls]
            return
        choice = self.choices[0]
        text = choice.tool_answer.content if choice.tool_answer is not None else choice.text
        if text is None:  # a tool call cut off by max_output_tokens: nothing complete to show
            return
        self.output = [{"id": self.message_id, "type": "message", "role": "assistant",
                        "status": "incomplete" if self.status == "incomplete" else "completed",
                        "content": [{"type": "output_text", "text": text or "", "annotations": [], "logprobs": []}]}]

    # -- the stream ----------------------------------------------------------------------------

    def frame(self, event: dict) -> str:
        event = {"type": event.pop("type"), **event, "sequence_number": self.sequence}
        self.sequence += 1
        return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    def opening(self) -> list[dict]:
        events = [{"type": "response.created", "response": self.snapshot("in_progress")},
                  {"type": "response.in_progress", "response": self.snapshot("in_progress")}]
        if self.tools is None:  # plain text: the message opens now and its text streams
            events += self._message_opens()
        return events

    def _message_opens(self) -> list[dict]:
        return [{"type": "response.output_item.added", "output_index": 0,
                 "item": {"id": self.message_id, "type": "message", "role": "assistant", "status": "in_progress",
                          "content": []}},
                {"type": "response.content_part.added", "item_id": self.message_id, "output_index": 0,
                 "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}]

    def _text_delta(self, text: str) -> dict:
        return {"type": "response.output_text.delta", "item_id": self.message_id, "output_index": 0,
                "content_index": 0, "delta": text, "logprobs": []}

    def chunks(self, delta: Delta) -> list[dict]:
        self.add(delta)
        if self.tools is None:
            events = [self._text_delta(delta.text)] if delta.text else []
            return events + (self._items_close() if delta.finish_reason is not None else [])
        if delta.finish_reason is None:
            return []  # a tool-call answer is parsed whole, then streamed as its items
        self._build_output()
        if self.output and self.output[0]["type"] == "message":
            text = self.output[0]["content"][0]["text"]
            return self._message_opens() + ([self._text_delta(text)] if text else []) + self._items_close()
        events = []
        for index, item in enumerate(self.output):
            events += [{"type": "response.output_item.added", "output_index": index,
                        "item": {**item, "arguments": "", "status": "in_progress"}},
                       {"type": "response.function_call_arguments.delta", "item_id": item["id"],
                        "output_index": index, "delta": item["arguments"]},
                       {"type": "response.function_call_arguments.done", "item_id": item["id"], "name": item["name"],
                        "output_index": index, "arguments": item["arguments"]},
                       {"type": "response.output_item.done", "output_index": index, "item": item}]
        return events

    def _items_close(self) -> list[dict]:
        self._build_output()
        message = self.output[0]
        part = message["content"][0]
        return [{"type": "response.output_text.done", "item_id": self.message_id, "output_index": 0,
                 "content_index": 0, "text": part["text"], "logprobs": []},
                {"type": "response.content_part.done", "item_id": self.message_id, "output_index": 0,
                 "content_index": 0, "part": part},
                {"type": "response.output_item.done", "output_index": 0, "item": message}]

    def closing(self, usage: Usage, include_usage: bool) -> list[str]:
        final = self.response(usage)
        return [self.frame({"type": f"response.{final['status']}", "response": final})]

    def error_frame(self, error: GatewayError) -> str:
        detail = error_body(error.status, error.message, error.code, error.param)["error"]
        return self.frame({"type": "error", "code": detail["code"], "message": detail["message"],
                           "param": detail["param"]})
