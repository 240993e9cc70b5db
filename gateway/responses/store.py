"""Stored responses (``store: true``) in the registry's database, so that any gateway replica can
answer ``GET /v1/responses/{id}``, its input items, ``DELETE``, and continue a conversation from
``previous_response_id``. A response is visible to the key that made it (and to admin keys)."""

from __future__ import annotations

from loragate.database import read_session, write_session
from loragate.registry import Registry

from ..auth import Caller
from ..errors import GatewayError
from ..models import StoredResponse

# How many earlier responses a previous_response_id chain may reach back: each is a database read.
MAX_TURNS = 256


class ResponseStore:
    def __init__(self, registry: Registry):
        self.registry = registry

    def save(self, response: dict, input_items: list[dict], who: Caller) -> None:
        with write_session(self.registry.engine) as session:
            session.add(StoredResponse(id=response["id"], key_id=who.key.id if who.key else None,
                                       previous_response_id=response["previous_response_id"],
                                       input_items=input_items, response=response))

    def get(self, response_id: str, who: Caller, param: str | None = None) -> StoredResponse:
        with read_session(self.registry.engine) as session:
            row = session.get(StoredResponse, response_id)
        if row is None or not (who.admin or row.key_id == (who.key.id if who.key else None)):
            raise GatewayError(404, f"No response with id '{response_id}' found (responses are kept only with "
                                    "store: true, for the key that made them)", code="not_found", param=param)
        return row

    def delete(self, response_id: str, who: Caller) -> None:
        row = self.get(response_id, who)
        with write_session(self.registry.engine) as session:
            session.delete(session.get(StoredResponse, row.id))

    def history(self, response_id: str, who: Caller) -> list[dict]:
        """The conversation up to and including ``response_id``'s answer: every earlier input and output item."""
        turns: list[StoredResponse] = []
        next_id: str | None = response_id
        while next_id is not None and len(turns) < MAX_TURNS:
            row = self.get(next_id, who, param="previous_response_id")
            turns.append(row)
            next_id = row.previous_response_id
        return [item for row in reversed(turns) for item in [*row.input_items, *row.response["output"]]]
