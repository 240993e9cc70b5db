"""An inference engine in a process of its own: one process group, stopped by its id.

The vLLM server and the embedded llama.cpp server both run this way, so a crash in an engine
never takes the gateway with it. The engine dies with the gateway's process
(``PR_SET_PDEATHSIG``) even when the gateway is killed outright.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

log = logging.getLogger("loragate.gateway")
_PR_SET_PDEATHSIG = 1


class EngineStartFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EngineProcess:
    """``command`` serves HTTP on ``port``; ``health_path`` answers 200 once it is ready."""

    def __init__(self, label: str, command: list[str], port: int, log_path: Path, *, env: dict[str, str] | None = None,
                 start_timeout_s: float = 900.0, health_path: str = "/health"):
        self.label, self.command, self.port = label, command, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path, self.env, self.start_timeout_s = log_path, env or {}, start_timeout_s
        self.health_url = self.url + health_path
        self._process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Spawn the server (in its own session, so the whole group can be stopped by its id)."""
        self.stop(grace_s=5)  # a restart: whatever is left of the last one goes first
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self._process = subprocess.Popen(self.command, env={**os.environ, **self.env}, stdout=out,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True, preexec_fn=_die_with_parent)
        log.info("started %s (pid %s) on %s; log: %s", self.label, self._process.pid, self.url, self.log_path)

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise EngineStartFailed(f"{self.label} exited while starting; see {self.log_path}:\n{self._log_tail()}")
            try:
                if (await client.get(self.health_url, timeout=2)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        raise EngineStartFailed(f"{self.label} did not answer {self.health_url} within {self.start_timeout_s:g} s; "
                                f"see {self.log_path}")

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left after ``grace_s``."""
        if self._process is None:
            return
        pgid = self._process.pid  # its own session: the group id is its pid
        _signal_group(pgid, signal.SIGTERM)
        if not self._group_gone(grace_s):
            _signal_group(pgid, signal.SIGKILL)
            self._group_gone(grace_s)

    def _group_gone(self, timeout_s: float) -> bool:
        """Wait for every process of the group (the server and any engine core) to exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._process.poll()  # reap the leader: a zombie still counts as a member
            try:
                os.killpg(self._process.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.is_file() else ""
