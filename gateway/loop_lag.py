"""How late the event loop is: every request waits on it, so a blocking call or a long stretch of
Python anywhere in the process (a database read, a big JSON dump, a garbage collection) shows up
here before it shows up, scattered, in every request's latency."""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

# Half the 50 ms the gateway promises as its worst stall: finer would only measure the sampling.
INTERVAL_S = 0.025


class LoopLagMonitor:
    """Sleeps ``INTERVAL_S`` again and again; how much later than asked it wakes is the lag."""

    def __init__(self, histogram: Histogram):
        self.histogram = histogram
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time() + INTERVAL_S
            await asyncio.sleep(INTERVAL_S)
            self.histogram.observe(max(0.0, loop.time() - asked))
