"""An engine replica's heartbeat in the database, which pools with ``discover`` read: it joins
their pools within a heartbeat of starting, and leaves at once when it stops (or within three
heartbeats when it dies)."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import OperationalError

from loragate.database import write_session
from loragate.registry import Registry
from loragate.settings import LlamaCppSettings

from ..models import EngineReplica, utcnow

log = logging.getLogger("loragate.engine")


class Announcer:
    def __init__(self, registry: Registry, url: str, engine: LlamaCppSettings, heartbeat_s: float):
        self.registry, self.url, self.engine, self.heartbeat_s = registry, url, engine, heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_s + 5)
        try:
            with write_session(self.registry.engine) as session:
                row = session.get(EngineReplica, self.url)
                if row is not None:
                    session.delete(row)
        except OperationalError:
            log.warning("could not withdraw %s from the database; pools forget it within 3 heartbeats", self.url)

    def beat(self) -> None:
        with write_session(self.registry.engine) as session:
            row = session.get(EngineReplica, self.url) or EngineReplica(
                url=self.url, base_model=self.engine.base_model, kind="llamacpp", max_loras=self.engine.max_loras,
                slots=self.engine.slots)
            row.heartbeat_at = utcnow()
            session.add(row)

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except OperationalError:  # the database is away: pools keep the replicas they know
                log.warning("engine heartbeat: the database is unavailable")
