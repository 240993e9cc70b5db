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
