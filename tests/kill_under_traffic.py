"""Streaming clients through a gateway while an engine replica is killed under them: what the pool
tests on both engines (``test_engine_pool.py``, ``test_gateway_vllm.py``) check the same way."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import select

from loragate.database import read_session


class Traffic:
    """Clients, one thread per model, each streaming chat requests back to back until ``stop``."""

    def __init__(self, gateway_url: str, models: list[str], max_tokens: int = 8):
        self.url, self.max_tokens = gateway_url, max_tokens
        self.outcomes: list[tuple[str, bool, bool]] = []  # (request id, got text, finished)
        self.failures: list[tuple[str | None, bool, str]] = []  # the connection broke: (request id, got text, error)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(m,)) for m in models]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def wait_for(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.outcomes) < count:
            assert time.monotonic() < deadline, (self.outcomes, self.failures)
            time.sleep(0.1)

    def _client(self, model: str) -> None:
        while not self._stop.is_set():
            text, finished, request_id = False, False, None
            try:
                with httpx.stream("POST", f"{self.url}/v1/chat/completions", timeout=120,
                                  json={"model": model, "stream": True, "max_tokens": self.max_tokens,
                                        "messages": [{"role": "user", "content": "Hi"}]}) as response:
                    request_id = response.headers.get("x-request-id")
                    assert response.status_code == 200, response.read()
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            assert "error" not in chunk or text, chunk  # an error only after text
                            choice = (chunk.get("choices") or [{}])[0]
                            text = text or bool((choice.get("delta") or {}).get("content"))
                            finished = finished or choice.get("finish_reason") is not None
            except httpx.HTTPError as exc:
                self.failures.append((request_id, text, repr(exc)))
                continue
            self.outcomes.append((request_id, text, finished))


def kill_under_traffic(traffic: Traffic, kill: Callable[[], None], after_s: float = 4) -> int:
    """Kill once the clients are under way, let them go on for ``after_s``; the outcomes before it."""
    traffic.wait_for(3)
    at_kill = len(traffic.outcomes)
    kill()
    time.sleep(after_s)
    return at_kill


def assert_nothing_lost(traffic: Traffic, at_kill: int, database: Engine) -> None:
    """Only a request that had text when its replica died may end unfinished (with an error event);
    the others were retried elsewhere and answered; the survivors served on; each request is
    metered exactly once."""
    assert all(got_text for _, got_text, _ in traffic.failures), traffic.failures
    unfinished = [o for o in traffic.outcomes if not o[2]]
    assert all(got_text for _, got_text, _ in unfinished), unfinished
    assert len([o for o in traffic.outcomes[at_kill:] if o[2]]) >= 3, traffic.outcomes
    ids = [request_id for request_id, _, _ in traffic.outcomes]
    from loragate.gateway.models import MeterRecord

    deadline = time.monotonic() + 10
    with read_session(database) as session:
        while True:
            metered = Counter(session.exec(select(MeterRecord.request_id)
                                           .where(MeterRecord.request_id.in_(ids))).all())
            if len(metered) == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
            session.expire_all()
    assert set(metered) == set(ids) and set(metered.values()) == {1}, metered
