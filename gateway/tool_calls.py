"""Tool calling on any model, the same way on every backend.

The tools are described to the model in a system message, and its answer is constrained by the
engine to one JSON object (a JSON schema built from the tools' parameter schemas, enforced by
llama.cpp's grammars or vLLM's structured outputs): ``{"tool_calls": [{"name", "arguments"}]}``,
or with ``tool_choice: auto`` also ``{"content": "..."}``. The gateway parses that back into
OpenAI's ``tool_calls``. Earlier tool calls and tool results in the conversation are written in
the same JSON, so the model sees one consistent format whatever its chat template knows about
tools (most small models' templates know nothing of them).
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

    @classmethod
    def of(cls, body: ChatCompletionRequest) -> ToolMode | None:
        """None when the model is not to call tools (no tools, or ``tool_choice: none``)."""
        if not body.tools or body.tool_choice == "none":
            return None
        tools = body.tools
        if isinstance(body.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t.function.name == body.tool_choice.function.name]
        return cls(tools=tools, required=body.tool_choice not in (None, "auto"), parallel=body.parallel_tool_calls)

    def instructions(self) -> str:
        described = [{"name": t.function.name, "description": t.function.description or "",
                      "parameters": t.function.parameters} for t in self.tools]
        lines = ["You can call these functions:", json.dumps(described),
                 'To call functions, answer with {"tool_calls": [{"name": <function name>, "arguments": '
                 '<arguments object>}]}' + (" (one call)." if not self.parallel else ".")]
        if not self.required:
            lines.append('To answer without calling a function, answer with {"content": <your answer>}.')
        return "\n".join(lines)

    def response_format(self) -> dict:
        calls = {"type": "array", "minItems": 1,
                 "items": {"anyOf": [_call_schema(t) for t in self.tools]} if len(self.tools) > 1
                 else _call_schema(self.tools[0])}
        if not self.parallel:
            calls["maxItems"] = 1
        schema = _object({"tool_calls": calls})
        if not self.required:
            schema = {"anyOf": [schema, _object({"content": {"type": "string"}})]}
        return {"type": "json_schema", "json_schema": {"name": "tool_calls", "strict": True, "schema": schema}}

    def parse(self, text: str) -> ToolAnswer:
        """The model's answer as OpenAI returns it; text that is not the agreed JSON (cut short by
        ``max_tokens``) comes back as content."""
        try:
            answer = json.loads(text)
        except ValueError:
            return ToolAnswer(content=text, tool_calls=None)
        if isinstance(answer, dict) and isinstance(answer.get("tool_calls"), list):
            calls = [ToolCall(id=f"call_{uuid.uuid4().hex[:24]}",
                              function=FunctionCall(name=c["name"], arguments=json.dumps(c["arguments"])))
                     for c in answer["tool_calls"]]
            return ToolAnswer(content=None, tool_calls=calls)
        if isinstance(answer, dict) and isinstance(answer.get("content"), str):
            return ToolAnswer(content=answer["content"], tool_calls=None)
        return ToolAnswer(content=text, tool_calls=None)


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
