"""``POST /v1/feedback``: an outcome for a served request, by its ``x-request-id``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from .auth import Caller, caller
from .errors import OPENAI_ERRORS
from .outcomes import FeedbackReceipt, FeedbackRequest
from .state import GatewayState, gateway_state

router = APIRouter(prefix="/v1", responses=OPENAI_ERRORS)


@router.post("/feedback", response_model=FeedbackReceipt)
async def feedback(body: FeedbackRequest, who: Caller = Depends(caller),
                   state: GatewayState = Depends(gateway_state)) -> FeedbackReceipt:
    # The meter's queue is read here, on the event loop that moves batches out of it, and before the
    # database: a record is either still queued or already committed, never in between.
    queued = state.meter.pending_record(body.request_id)
    receipt = await asyncio.to_thread(state.feedback.record, body, who.key.id if who.key else None, who.admin,
                                      queued)
    if receipt.rollout_id is not None:  # new evidence: checked with the meter's next batch
        state.meter.touch(receipt.rollout_id)
    served = (receipt.adapter or "-", str(receipt.version or "-"), receipt.arm)
    if body.success is not None:
        state.metrics.feedback.labels(*served, "success", str(body.success).lower()).inc()
    if body.score is not None:
        state.metrics.feedback.labels(*served, "score", "-").inc()
    if body.label is not None:
        state.metrics.feedback.labels(*served, "label", "-").inc()
    return receipt
