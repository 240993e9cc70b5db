"""Runs `loragate gateway serve` as a real process on 127.0.0.1 for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_port() -> socket.socket:
    """A socket bound to a port but not listening: connecting is refused for as long as it is open.
    A port from `free_port` alone may be taken meanwhile (vLLM binds many ephemeral ports), and a
    process that accepts but never answers turns "engine down" into a timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class GatewayServer:
    def __init__(self, home: Path, **env: str):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / f"gateway-{self.port}.log"
        self.env = {**os.environ, "LORAGATE_HOME": str(home), "LORAGATE_USER": "gateway", **env}
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> GatewayServer:
        self.process = subprocess.Popen(["loragate", "gateway", "serve", "--port", str(self.port)], env=self.env,
                                        stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"gateway did not start: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=60)

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        """A test that failed half-way leaves no gateway behind."""
        if self.process is not None and self.process.poll() is None:
            self.stop()
