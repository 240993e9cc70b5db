"""Admission to an engine with parallel slots, one adapter at a time.

llama.cpp's server never puts sequences with different LoRA configs in one batch; each step it
decodes the group of its lowest-numbered busy slot, so a request for a minority adapter that
lands behind a stream of majority requests waits until they all stop: an A/B candidate at 5%
would be starved on a busy engine. The gateway therefore admits requests itself:

* everything in flight shares one adapter (or the base): a *phase*;
* within a phase, requests are admitted oldest first up to the engine's slot count, and newer
  requests for the phase's adapter may pass an older request for another adapter only while that
  one has waited less than ``switch_after_s``; then admission stops, the phase drains, and the
  oldest waiting request's adapter gets the next phase (so no adapter waits longer than
  ``switch_after_s`` plus one request's time);
* each admitted request gets a slot id, preferring a free slot that last served the same adapter,
  so its KV prefix can be reused (the engine clears a slot's cache when the adapter changes);
* beyond ``max_queue`` waiting requests the answer is "busy, retry after N s";
* background requests (shadow copies) are admitted only while no live request waits, and a live
  request that has to wait cancels the background ones in flight (the copy is given up, counted
  by its caller), so a copy never holds the engine against live traffic; they count towards
  neither ``max_queue`` nor Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field

from .base import BackendUnavailable

BASE = ""  # the phase key of requests without an adapter


class QueueFull(BackendUnavailable):
    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Waiter:
    key: str
    future: asyncio.Future
    background: bool = False
    task: asyncio.Task | None = None  # a background request's, to cancel when live traffic needs its slot
    since: float = field(default_factory=time.monotonic)


@dataclass
class _Slot:
    id: int
    key: str | None = None  # the adapter whose KV the slot holds
    last_used: float = 0.0
    busy: bool = False


class AdapterScheduler:
    def __init__(self, slots: int, max_queue: int, switch_after_s: float):
        self.max_queue, self.switch_after_s = max_queue, switch_after_s
        self._slots = [_Slot(i) for i in range(slots)]
        self._waiting: deque[_Waiter] = deque()
        self._phase: str | None = None
        self._in_flight = 0
        self._background: dict[int, asyncio.Task] = {}  # slot id -> the background request holding it
        self._service_s = 1.0  # a running mean of request time, for Retry-After
        # The integral of in-flight requests over time: a request's mean batch is its growth over
        # the request's life divided by that life.
        self._area, self._area_at = 0.0, time.monotonic()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def clock(self) -> tuple[float, float]:
        """(now, integral of in-flight requests until now), for ``mean_batch``."""
        now = time.monotonic()
        self._area += self._in_flight * (now - self._area_at)
        self._area_at = now
        return now, self._area

    def mean_batch(self, since: tuple[float, float]) -> float:
        """How many requests the engine ran on average since ``since`` (a ``clock()`` reading)."""
        now, area = self.clock()
        return (area - since[1]) / (now - since[0]) if now > since[0] else float(self._in_flight)

    async def acquire(self, key: str, *, background: bool = False) -> int:
        """Wait for a slot for a request with adapter ``key`` (``BASE`` for none); returns its id."""
        live = sum(not w.background for w in self._waiting)
        if not background and live >= self.max_queue:
            wait = math.ceil(self._service_s * (live + 1) / len(self._slots))
            raise QueueFull(f"the llama.cpp engine is busy ({live} requests waiting); "
                            f"retry after {wait} s", retry_after_s=max(wait, 1))
        waiter = _Waiter(key, asyncio.get_running_loop().create_future(), background,
                         asyncio.current_task() if background else None)
        self._waiting.append(waiter)
        self._dispatch()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
                self._dispatch()  # the head may have changed
            elif waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result(), 0.0)  # granted as the caller went away
            raise

    def release(self, slot_id: int, service_s: float) -> None:
        self._background.pop(slot_id, None)
        slot = self._slots[slot_id]
        slot.busy, slot.last_used = False, time.monotonic()
        self.clock()
        self._in_flight -= 1
        if service_s > 0:
            self._service_s = 0.9 * self._service_s + 0.1 * service_s
        self._dispatch()

    def _dispatch(self) -> None:
        self._admit()
        if self._background and any(not w.background for w in self._waiting):
            for task in self._background.values():  # live traffic waits: the copies give way
                task.cancel()

    def _admit(self) -> None:
        while self._waiting and self._in_flight < len(self._slots):
            queue = [w for w in self._waiting if not w.background] or self._waiting
            if self._in_flight == 0:
                self._phase = queue[0].key
            waiter = next((w for w in queue if w.key == self._phase), None)
            if waiter is None:
                return  # the phase drains, then the oldest waiting request's adapter goes next
            head = queue[0]
            if waiter is not head and time.monotonic() - head.since > self.switch_after_s:
                return  # the head has waited long enough: stop admitting so its turn comes
            self._waiting.remove(waiter)
            if waiter.future.done():  # cancelled while queued
                continue
            slot = self._pick_slot(waiter.key)
            slot.busy, slot.key = True, waiter.key
            if waiter.task is not None:
                self._background[slot.id] = waiter.task
            self.clock()
            self._in_flight += 1
            waiter.future.set_result(slot.id)

    def _pick_slot(self, key: str) -> _Slot:
        free = [s for s in self._slots if not s.busy]
        warm = [s for s in free if s.key == key]
        if warm:
            return max(warm, key=lambda s: s.last_used)
        return min(free, key=lambda s: s.last_used)
