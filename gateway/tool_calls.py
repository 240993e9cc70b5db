"""Tool calling on any model, the same way on every backend.

The tools are described to the model in a system message, and its answer is constrained by the
engine to one JSON object (a JSON schema built from the tools' parameter schemas, enforced by
llama.cpp's grammars or vLLM's structured outputs): ``{"tool_calls": [{"name", "arguments"}]}``,
or with ``tool_choice: auto`` also ``{"content": "..."}``. The gateway parses that back into
OpenAI's ``tool_calls``. Earlier tool calls and tool results in the conversation are written in
the same JSON, so the model sees one consistent format whatever its chat template knows about
tools (most small models' templates know nothing of them).

Calls that end: a named ``tool_choice`` or ``parallel_tool_calls: false`` allows exactly one call,
otherwise at most ``gateway.max_tool_calls``, and the grammar lets the model close the list after
each. The JSON is compact (no whitespace the grammar would otherwise allow). An answer cut off by
``max_tokens`` returns the calls it completed; with none complete, no content and
``finish_reason: length``: the wrapper is never shown as text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .openai_types import ChatCompletionRequest, ChatMessage, FunctionCall, NamedToolChoice, Tool, ToolCall


@dataclass(frozen=True)
class ToolAnswer:
    content: str | None
    tool_calls: list[ToolCall] | None


@dataclass(frozen=True)
class ToolMode:
    tools: list[Tool]
    required: bool  # a call must be made (``required`` or a named function)
    parallel: bool  # several calls in one answer

    max_calls: int = 1

    @classmethod
    def of(cls, body: ChatCompletionRequest, max_calls: int) -> ToolMode | None:
        """None when the model is not to call tools (no tools, or ``tool_choice: none``)."""
        if not body.tools or body.tool_choice == "none":
            return None
        tools, named = body.tools, isinstance(body.tool_choice, NamedToolChoice)
        if named:
            tools = [t for t in tools if t.function.name == body.tool_choice.function.name]
        parallel = body.parallel_tool_calls and not named  # a named function: that one call
        return cls(tools=tools, required=body.tool_choice not in (None, "auto"), parallel=parallel,
                   max_calls=max_calls if parallel else 1)

    def instructions(self) -> str:
        described = [{"name": t.function.name, "description": t.function.description or "",
                      "parameters": t.function.parameters} for t in self.tools]
        lines = ["You can call these functions:", json.dumps(described),
                 'To call functions, answer with {"tool_calls": [{"name": <function name>, "arguments": '
                 '<arguments object>}]}' + (" (one call)." if not self.parallel else
                                            f" (at most {self.max_calls} calls, each different).")]
        if not self.required:
            lines.append('To answer without calling a function, answer with {"content": <your answer>}.')
        return "\n".join(lines)

    def response_format(self) -> dict:
        calls = {"type": "array", "minItems": 1, "maxItems": self.max_calls,
                 "items": {"anyOf": [_call_schema(t) for t in self.tools]} if len(self.tools) > 1
                 else _call_schema(self.tools[0])}
        schema = _object({"tool_calls": calls})
        if not self.required:
            schema = {"anyOf": [schema, _object({"content": {"type": "string"}})]}
        return {"type": "json_schema", "json_schema": {"name": "tool_calls", "strict": True, "schema": schema}}

    def parse(self, text: str) -> ToolAnswer:
        """The model's answer as OpenAI returns it. Cut short by ``max_tokens``: the calls it completed
        (none: no content either, never the wrapper); a call repeated word for word counts once."""
        try:
            answer = json.loads(text)
        except ValueError:
            return ToolAnswer(content=None, tool_calls=_calls(_complete_calls(text)) or None)
        if isinstance(answer, dict) and isinstance(answer.get("tool_calls"), list):
            return ToolAnswer(content=None, tool_calls=_calls(answer["tool_calls"]))
        if isinstance(answer, dict) and isinstance(answer.get("content"), str):
            return ToolAnswer(content=answer["content"], tool_calls=None)
        return ToolAnswer(content=text, tool_calls=None)


def _calls(raw: list[dict]) -> list[ToolCall]:
    unique = list({json.dumps(c, sort_keys=True): c for c in raw}.values())
    return [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                     function=FunctionCall(name=c["name"], arguments=json.dumps(c["arguments"], separators=(",", ":"))))
            for c in unique]


def _complete_calls(text: str) -> list[dict]:
    """The whole call objects at the start of a ``{"tool_calls": [...`` answer that was cut off."""
    start = text.find("[")
    if start < 0 or not text[:start].replace(" ", "").startswith('{"tool_calls":'):
        return []
    decoder, position, calls = json.JSONDecoder(), start + 1, []
    while True:
        while position < len(text) and text[position] in " \t\n\r,":
            position += 1
        try:
            call, position = decoder.raw_decode(text, position)
        except ValueError:
            return calls
        if isinstance(call, dict) and "name" in call and "arguments" in call:
            calls.append(call)


def compact_json(response_format: dict | None) -> dict | None:
    """The engine's JSON constraint with no optional whitespace, so that every token the model spends
    is content: ``x-guidance`` is read by llguidance, llama.cpp's grammar engine here; vLLM engines
    get the same from their ``disable_any_whitespace`` flag (backends/vllm_engine.py). ``json_object``
    becomes the schema of any object, which can carry it."""
    if response_format is None:
        return None
    if response_format["type"] == "json_object":
        response_format = {"type": "json_schema", "json_schema": {"name": "json_object", "schema": {"type": "object"}}}
    spec = response_format["json_schema"]
    compact = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    return {**response_format, "json_schema": {**spec, "schema": {**spec.get("schema", {}), "x-guidance": compact}}}


def _object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _call_schema(tool: Tool) -> dict:
    return _object({"name": {"type": "string", "enum": [tool.function.name]}, "arguments": tool.function.parameters})


def engine_messages(messages: list[ChatMessage], mode: ToolMode | None) -> list[dict[str, str]]:
    """The conversation as plain system/user/assistant text turns, which every chat template
    renders: earlier tool calls and results in the tool JSON, the tools' description first."""
    names = {call.id: call.function.name for m in messages for call in m.tool_calls or []}
    out = []
    for m in messages:
        if m.role == "tool":
            result = {"tool_result": {"name": names.get(m.tool_call_id, m.name), "tool_call_id": m.tool_call_id,
                                      "content": m.text}}
            out.append({"role": "user", "content": json.dumps(result)})
        elif m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        else:
            out.append({"role": "system" if m.role == "developer" else m.role, "content": m.text})
    if mode is not None:
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{mode.instructions()}"}
        else:
            out.insert(0, {"role": "system", "content": mode.instructions()})
    return out


def _arguments(raw: str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
