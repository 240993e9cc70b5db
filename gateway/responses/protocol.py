"""The Responses API's request, as OpenAI documents it, and what the gateway serves of it.

Served: ``input`` (a string, or message, ``function_call`` and ``function_call_output`` items),
``instructions``, ``text.format``, function ``tools``, ``tool_choice``, ``parallel_tool_calls``,
``max_output_tokens``, ``temperature``, ``top_p``, ``stream``, ``store``, ``metadata`` and
``previous_response_id``. What a model here cannot do (built-in tools, ``background``, reasoning
settings, ``truncation: auto``, log probabilities, prompt templates, conversations) is refused with
a 400 that names the parameter, as on the chat endpoint.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from ..openai_types import FunctionDefinition, JsonSchemaFormat, text_parts_only


class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None  # an earlier answer's output_text, sent back as it came


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]
    status: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: object) -> object:
        return text_parts_only(content, ("input_text", "output_text", "text"))

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str
    arguments: str
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: str | list[InputText]
    status: str | None = None

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]
_INPUT_ITEM = TypeAdapter(InputItem)


class FunctionTool(BaseModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat(self) -> dict:
        """The chat endpoint's form of this tool."""
        function = FunctionDefinition(name=self.name, description=self.description, strict=self.strict,
                                      **({"parameters": self.parameters} if self.parameters else {}))
        return {"type": "function", "function": function.model_dump(exclude_none=True)}


class NamedFunctionChoice(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True)

    def chat(self) -> dict | None:
        """The chat endpoint's ``response_format`` for this format (None: plain text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        schema = JsonSchemaFormat(name=self.name or "response", description=self.description,
                                  schema=self.schema_ or {}, strict=self.strict)
        return {"type": "json_schema", "json_schema": schema.model_dump(by_alias=True, exclude_none=True)}


class TextConfig(BaseModel):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only one a model here has


class Reasoning(BaseModel):
    """Accepted empty, as clients send it; a model here has no reasoning to set."""

    effort: None = None
    summary: None = None
    generate_summary: None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name (unsupported_params)

    model: str = Field(min_length=1, max_length=256)
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    previous_response_id: str | None = None
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool | None = True
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=256)
    reasoning: Reasoning | None = None
    truncation: Literal["disabled"] | None = None  # "auto" would drop input silently: not served
    background: Literal[False] | None = None
    include: list[Literal["message.output_text.logprobs"]] | None = Field(None, max_length=0)
    top_logprobs: Literal[0] | None = None
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to obfuscate here

    @field_validator("input", mode="before")
    @classmethod
    def _input_items(cls, value: object) -> object:
        """Each item checked on its own, so that a 400 says which and why (``input`` is the param)."""
        if not isinstance(value, list):
            return value
        items = []
        for i, item in enumerate(value):
            if isinstance(item, dict) and "type" not in item and "role" in item:
                item = {**item, "type": "message"}  # an easy input message: OpenAI allows leaving type out
            try:
                items.append(_INPUT_ITEM.validate_python(item))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"][1:])  # past the item's own type tag
                raise ValueError(f"input[{i}]{'.' + where if where else ''}: "
                                 f"{first['msg'].removeprefix('Value error, ')}") from None
        return items

    @field_validator("tools", mode="before")
    @classmethod
    def _functions_only(cls, tools: object) -> object:
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools[{i}] is of type {kind!r}: only function tools are served here (no built-in "
                                 "tools such as web search or file search)")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _among_tools(cls, choice: object, info) -> object:
        names = {t.name for t in info.data.get("tools") or []}
        if choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedFunctionChoice) and choice.name not in names:
            raise ValueError(f"tool_choice names '{choice.name}', which is not in tools")
        return choice

    @property
    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)
