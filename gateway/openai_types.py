"""The OpenAI request and response shapes the gateway speaks.

Requests: every field OpenAI documents for the endpoints we serve is either honoured or, if we do
not serve it, refused with a 400 that names it (``unsupported_params``): a client is never left
believing that a setting took effect. Responses: the fields OpenAI's OpenAPI description requires
are always present, ``null`` where it allows that (tests/data/openai_responses.schema.json).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# OpenAI request fields that only concern OpenAI's own platform (storage, billing tiers, caching
# hints, abuse monitoring): accepted, as they change nothing in what is generated.
PLATFORM_ONLY = frozenset({"store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"})


def text_parts_only(content: object, text_types: tuple[str, ...]) -> object:
    """Say what is wrong with an image, audio or file part, rather than that it is not a string."""
    for part in content if isinstance(content, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in text_types:
            raise ValueError(f"content parts of type {kind!r} are not supported: the models served here "
                             "accept text only")
    return content


def unsupported_params(model: BaseModel) -> list[str]:
    """Fields OpenAI knows (or a client invented) that we would otherwise drop: set, not serveable
    (the model keeps unknown fields with ``extra="allow"``)."""
    extra = model.model_extra or {}
    return sorted(k for k, v in extra.items() if k not in PLATFORM_ONLY and v not in (None, False, [], {}))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON, as the model wrote it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's answer: which call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: object) -> object:
        return text_parts_only(content, ("text",))

    @model_validator(mode="after")
    def _complete(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs the tool_call_id it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs content")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    # Fields we do not model are kept, so that they can be refused by name (unsupported_params).
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128, description="Choices to generate; the gateway's max_n caps it.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = \
        Field(None, description="Token id -> bias added to its logit (-100 bans it, 100 all but forces it).")
    user: str | None = Field(None, max_length=256)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not token.isdigit() or not -100 <= value <= 100:
                raise ValueError(f"logit_bias maps token ids to biases in [-100, 100]; got {token!r}: {value}")
        return bias

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def stores_content(self) -> bool:
        """False where the request said ``"store": false``: a shadow copy keeps only hashes then."""
        return (self.model_extra or {}).get("store") is not False



class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    # Field validators (not one model validator) so that a 400 names the parameter at fault.
    @field_validator("messages")
    @classmethod
    def _tool_answers_follow_calls(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        called: set[str] = set()
        for i, message in enumerate(messages):
            called |= {call.id for call in message.tool_calls or []} if message.role == "assistant" else set()
            if message.role == "tool" and message.tool_call_id not in called:
                raise ValueError(f"messages[{i}] has role 'tool' but answers no tool call of an earlier assistant "
                                 f"message (tool_call_id {message.tool_call_id!r})")
        return messages

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @field_validator("tool_choice")
    @classmethod
    def _among_tools(cls, choice: object, info: ValidationInfo) -> object:
        names = {t.function.name for t in info.data.get("tools") or []}
        if choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names '{choice.function.name}', which is not in tools")
        return choice

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1, description="One prompt per request.")]
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def token_limit(self) -> int:
        return self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV the engine reused from an earlier request


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None  # never set: the models we serve have no refusal channel
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    """The completions endpoint's own (legacy) logprobs layout."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loragate"
    # loragate's own: what an adapter runs on and which version its bare name serves now.
    base_model: str | None = Field(None, exclude_if=lambda v: v is None)
    production_version: int | None = Field(None, exclude_if=lambda v: v is None)
    served_weights: str | None = Field(None, exclude_if=lambda v: v is None)  # e.g. the base GGUF's file name


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
