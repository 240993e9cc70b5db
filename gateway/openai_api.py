"""The OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request

from .auth import Caller, caller
from .errors import OPENAI_ERRORS
from .openai_types import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ModelCard, ModelList
from .pipeline import Pipeline
from .shapes import ChatShape, CompletionShape
from .state import GatewayState, gateway_state

router = APIRouter(prefix="/v1", responses=OPENAI_ERRORS)


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, who: Caller = Depends(caller),
                           state: GatewayState = Depends(gateway_state)):
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
    return await Pipeline(state).serve(body, request, who, ChatShape(body.model), {"messages": messages})


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, who: Caller = Depends(caller),
                      state: GatewayState = Depends(gateway_state)):
    return await Pipeline(state).serve(body, request, who, CompletionShape(body.model), {"prompt": body.prompt_text})


@router.get("/models", response_model=ModelList)
async def list_models(who: Caller = Depends(caller), state: GatewayState = Depends(gateway_state)) -> ModelList:
    names = await asyncio.to_thread(state.router.served_models)
    if who.key is not None and who.key.models:
        names = [n for n in names if n in who.key.models]
    created = int(time.time())
    return ModelList(data=[ModelCard(id=name, created=created) for name in names])
