"""Database lookups kept for a few seconds, so a replica does not ask the database per request.

While the database is away, the last value looked up serves on, counted in
``loragate_lookups_stale_total``. Away means refused, gone or restarting (``OperationalError``), and
also hung: a server that holds a query without answering (frozen, partitioned off) is given
``wait_s``, after which the request goes on with the cached value while the lookup waits on in the
background, one per key. What was never looked up has nothing to serve from: the error goes on, and
the API answers it with a 503 (``errors.py``).

Asked on the event loop (``answered_now``), a lookup answers from what is kept or raises
``WouldWait`` rather than wait: the request path then asks again on a thread. Most requests
find everything kept and never leave the loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future
from concurrent.futures import TimeoutError as WaitTimeout
from typing import TypeVar

from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy.exc import OperationalError

T = TypeVar("T")
_here = threading.local()


class WouldWait(Exception):
    """What a lookup asked on the event loop raises where it would wait for the database."""


@contextmanager
def answered_now() -> Iterator[None]:
    """Lookups in this block (on this thread) answer from what is kept, else raise ``WouldWait``."""
    _here.now = True
    try:
        yield
    finally:
        _here.now = False


def must_wait() -> None:
    """Called before a lookup that is not a ``LookupCache``'s does I/O."""
    if getattr(_here, "now", False):
        raise WouldWait


class LookupCache:
    def __init__(self, ttl_s: float, wait_s: float, stale: MetricWrapperBase | None = None):
        self.ttl_s, self.wait_s = ttl_s, wait_s
        self.stale = stale  # Metrics.stale_lookups, labelled, where the process exports metrics
        self._values: dict[Hashable, tuple[float, object]] = {}
        self._pending: dict[Hashable, tuple[float, Future]] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        now = time.monotonic()
        hit = self._values.get(key)
        if hit and now - hit[0] < self.ttl_s:
            return hit[1]  # type: ignore[return-value]
        must_wait()
        started, future = self._lookup(key, load, now)
        try:
            # A lookup already pending that long is not waited for again by every request.
            return future.result(timeout=max(0.0, self.wait_s - (now - started)))
        except (OperationalError, WaitTimeout) as exc:
            if hit is None:
                if isinstance(exc, OperationalError):
                    raise
                raise OperationalError("lookup", None, TimeoutError(f"no answer in {self.wait_s:g} s")) from None
            if self.stale is not None:
                self.stale.inc()
            return hit[1]  # type: ignore[return-value]

    def _lookup(self, key: Hashable, load: Callable[[], object], now: float) -> tuple[float, Future]:
        """The pending lookup of ``key``, started now if there is none."""
        with self._lock:
            if key in self._pending:
                return self._pending[key]
            future: Future = Future()
            self._pending[key] = (now, future)

        def run() -> None:
            try:
                value = load()
            except BaseException as exc:  # handed to every waiter
                future.set_exception(exc)
            else:
                self._values[key] = (now, value)
                future.set_result(value)
            finally:
                with self._lock:
                    del self._pending[key]

        # A daemon thread, not a pool's: one stuck on a hung server must not hold up the process's exit.
        threading.Thread(target=run, name="lookup", daemon=True).start()
        return now, future
