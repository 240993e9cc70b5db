"""The llama.cpp backend's admission: a shadow copy (background) never goes before a live request."""

import asyncio

from loragate.gateway.backends.adapter_scheduler import AdapterScheduler


def test_background_requests_wait_for_every_live_one():
    async def scenario() -> list[str]:
        scheduler = AdapterScheduler(slots=1, max_queue=8, switch_after_s=0.0)
        order: list[str] = []

        async def request(name: str, key: str, background: bool = False) -> None:
            slot = await scheduler.acquire(key, background=background)
            order.append(name)
            await asyncio.sleep(0.01)
            scheduler.release(slot, 0.01)

        first = asyncio.create_task(request("live-1", "a"))
        await asyncio.sleep(0)
        shadows = [asyncio.create_task(request(f"shadow-{n}", "b", background=True)) for n in range(2)]
        await asyncio.sleep(0)
        later = [asyncio.create_task(request(f"live-{n}", key)) for n, key in ((2, "a"), (3, "c"))]
        await asyncio.gather(first, *shadows, *later)
        alone = await scheduler.acquire("b", background=True)  # an idle engine takes one at once
        scheduler.release(alone, 0.0)
        return order

    assert asyncio.run(scenario()) == ["live-1", "live-2", "live-3", "shadow-0", "shadow-1"]


def test_a_live_request_that_must_wait_cancels_the_copies_in_flight():
    async def scenario() -> tuple[bool, float]:
        scheduler = AdapterScheduler(slots=2, max_queue=1, switch_after_s=0.0)

        async def copy() -> None:
            slot = await scheduler.acquire("candidate", background=True)
            try:
                await asyncio.sleep(30)  # a long generation
            finally:
                scheduler.release(slot, 0.0)

        running = asyncio.create_task(copy())
        waiting = asyncio.create_task(copy())  # waits behind nothing live, but counts towards no queue
        await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        slot = await scheduler.acquire("production")  # another adapter: it cannot join the copies' phase
        waited = asyncio.get_running_loop().time() - started
        scheduler.release(slot, 0.0)
        waiting.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        return running.cancelled(), waited

    cancelled, waited = asyncio.run(scenario())
    assert cancelled and waited < 1.0
