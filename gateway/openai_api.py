"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request, Response

from .auth import Caller, caller
from .errors import OPENAI_ERRORS, GatewayError
from .openai_types import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ModelCard, ModelList
from .pipeline import Pipeline
from .routing import ServedModel
from .shapes import ChatShape, CompletionShape, Shape
from .state import GatewayState, gateway_state
from .tool_calls import ToolMode, compact_json, engine_messages

router = APIRouter(prefix="/v1", responses=OPENAI_ERRORS)


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, who: Caller = Depends(caller),
                           state: GatewayState = Depends(gateway_state)):
    return await serve_chat(body, request, who, state,
                            lambda tools: ChatShape(body.model, n=body.n, logprobs=body.logprobs, tools=tools))


async def serve_chat(body: ChatCompletionRequest, request: Request, who: Caller, state: GatewayState,
                     shape_for: Callable[[ToolMode | None], Shape]) -> Response:
    """A chat request through the pipeline, answered in the shape ``shape_for`` makes (chat's or
    the Responses API's), given the request's tool mode."""
    tools = ToolMode.of(body, state.settings.gateway.max_tool_calls)
    response_format = _engine_response_format(body)
    if tools is not None:
        if response_format is not None:
            raise GatewayError(400, "response_format cannot be combined with tools: a tool call's arguments "
                                    "already follow the tool's JSON schema", code="invalid_request",
                               param="response_format")
        response_format = tools.response_format()
    response_format = compact_json(response_format)
    return await Pipeline(state).serve(body, request, who, shape_for(tools), {
        "messages": engine_messages(body.messages, tools), "response_format": response_format})


def _engine_response_format(body: ChatCompletionRequest) -> dict | None:
    wanted = body.response_format
    if wanted is None or wanted.type == "text":
        return None
    if wanted.type == "json_schema" and not wanted.json_schema.schema_:
        return {"type": "json_object"}  # any JSON: engines read an empty schema as no constraint at all
    return wanted.model_dump(by_alias=True, exclude_none=True)


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, who: Caller = Depends(caller),
                      state: GatewayState = Depends(gateway_state)):
    shape = CompletionShape(body.model, n=body.n, logprobs=body.logprobs is not None)
    return await Pipeline(state).serve(body, request, who, shape, {"prompt": body.prompt_text})


async def _visible_models(who: Caller, state: GatewayState) -> list[ServedModel]:
    served = await asyncio.to_thread(state.router.served_models)
    if who.key is not None and who.key.models:
        served = [m for m in served if m.id in who.key.models]
    return served


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(id=model.id, created=model.created, owned_by=model.owned_by, base_model=model.base_model,
                     production_version=model.production_version, served_weights=model.served_weights)


@router.get("/models", response_model=ModelList)
async def list_models(who: Caller = Depends(caller), state: GatewayState = Depends(gateway_state)) -> ModelList:
    return ModelList(data=[_card(m) for m in await _visible_models(who, state)])


@router.get("/models/{model:path}", response_model=ModelCard)
async def retrieve_model(model: str, who: Caller = Depends(caller),
                         state: GatewayState = Depends(gateway_state)) -> ModelCard:
    found = next((m for m in await _visible_models(who, state) if m.id == model), None)
    if found is None:
        raise GatewayError(404, f"The model '{model}' does not exist", code="model_not_found", param="model")
    return _card(found)
