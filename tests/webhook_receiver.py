"""A real HTTP receiver of webhooks on 127.0.0.1 that verifies each delivery as a user's would."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook


class Receiver:
    """Records verified events; ``fail_next`` answers 503 that many times, ``delay_s`` answers late."""

    def __init__(self, port: int = 0):
        self.secret: str | None = None  # set once the webhook exists
        self.events: list[dict] = []  # verified bodies, in arrival order (duplicates included)
        self.rejected: list[str] = []
        self.fail_next = 0
        self.delay_s = 0.0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(receiver.delay_s)
                status = receiver._take(body, dict(self.headers))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _take(self, body: bytes, headers: dict[str, str]) -> int:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return 503
            try:
                event = Webhook(self.secret).verify(body, headers)
            except Exception as exc:  # a bad signature or timestamp: refused, and the test sees it
                self.rejected.append(f"{type(exc).__name__}: {exc}")
                return 400
            assert headers["webhook-id"] == event["id"]
            self.events.append(event)
            return 200

    def ids(self) -> set[str]:
        with self._lock:
            return {e["id"] for e in self.events}

    def first_arrivals(self) -> list[dict]:
        """Each event once, at its first arrival (delivery is at least once)."""
        seen: dict[str, dict] = {}
        with self._lock:
            for event in self.events:
                seen.setdefault(event["id"], event)
        return list(seen.values())

    def wait_for(self, count: int, timeout_s: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.ids()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.first_arrivals()

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def in_order_per_adapter(events: list[dict]) -> bool:
    """Each adapter's events arrived in the order they happened (their audit ids)."""
    by_adapter: dict[str | None, list[int]] = {}
    for event in events:
        by_adapter.setdefault(event["adapter"], []).append(event["data"]["audit_id"])
    return all(ids == sorted(ids) for ids in by_adapter.values())


def dump(events: list[dict]) -> str:
    return json.dumps([(e["type"], e["adapter"], e["data"]["audit_id"]) for e in events])
