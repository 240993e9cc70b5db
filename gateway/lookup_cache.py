"""Database lookups kept for a few seconds, so a replica does not ask the database per request.

While the database is away (``OperationalError``: refused, gone, restarting), the last value looked
up serves on, counted in ``loragate_lookups_stale_total``. What was never looked up has nothing
to serve from: the error goes on, and the API answers it with a 503 (``errors.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import TypeVar

from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy.exc import OperationalError

T = TypeVar("T")


class LookupCache:
    def __init__(self, ttl_s: float, stale: MetricWrapperBase | None = None):
        self.ttl_s = ttl_s
        self.stale = stale  # Metrics.stale_lookups, labelled, where the process exports metrics
        self._values: dict[Hashable, tuple[float, object]] = {}

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        now = time.monotonic()
        hit = self._values.get(key)
        if hit and now - hit[0] < self.ttl_s:
            return hit[1]  # type: ignore[return-value]
        try:
            value = load()
        except OperationalError:
            if hit is None:
                raise
            if self.stale is not None:
                self.stale.inc()
            return hit[1]  # type: ignore[return-value]
        self._values[key] = (now, value)
        return value
