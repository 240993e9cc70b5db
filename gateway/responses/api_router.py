"""The Responses API's routes: create (whole or streamed), retrieve, delete, and list input items."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.exc import OperationalError

from ..auth import Caller, caller
from ..errors import OPENAI_ERRORS, GatewayError
from ..openai_api import serve_chat
from ..pipeline import refuse_unsupported
from ..state import GatewayState, gateway_state
from .protocol import ResponsesRequest
from .serving import ResponsesShape, chat_request, with_ids
from .store import ResponseStore

router = APIRouter(prefix="/v1/responses", responses=OPENAI_ERRORS)


@router.post("")
async def create_response(body: ResponsesRequest, request: Request, who: Caller = Depends(caller),
                          state: GatewayState = Depends(gateway_state)):
    refuse_unsupported(body)
    store = ResponseStore(state.registry)
    history = (await asyncio.to_thread(store.history, body.previous_response_id, who)
               if body.previous_response_id else [])
    items = with_ids(body.items)

    async def keep(response: dict) -> None:
        if body.store is False:
            return
        try:
            await asyncio.to_thread(store.save, response, items, who)
        except OperationalError as exc:  # answered but not kept: say so rather than lose it silently
            raise GatewayError(503, "the response could not be stored (the database is unavailable); try again "
                                    "shortly", code="database_unavailable") from exc

    chat = chat_request(body, history, items)
    return await serve_chat(chat, request, who, state, lambda tools: ResponsesShape(body, tools, keep))


@router.get("/{response_id}")
async def retrieve_response(response_id: str, who: Caller = Depends(caller),
                            state: GatewayState = Depends(gateway_state)) -> dict:
    return (await asyncio.to_thread(ResponseStore(state.registry).get, response_id, who)).response


@router.delete("/{response_id}")
async def delete_response(response_id: str, who: Caller = Depends(caller),
                          state: GatewayState = Depends(gateway_state)) -> dict:
    await asyncio.to_thread(ResponseStore(state.registry).delete, response_id, who)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/{response_id}/input_items")
async def list_input_items(response_id: str, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: str | None = None,
                           who: Caller = Depends(caller), state: GatewayState = Depends(gateway_state)) -> dict:
    items = (await asyncio.to_thread(ResponseStore(state.registry).get, response_id, who)).input_items
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise GatewayError(400, f"after: no input item '{after}' in response '{response_id}'",
                               code="invalid_request", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
