"""Runs `loragate gateway serve` as a real process on 127.0.0.1 for the tests (or, to wrap its
backend, the same app in a thread of the test's own process)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import threading

import httpx
import uvicorn


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


def wait_until_up(check, process: subprocess.Popen, what: str, log: Path, timeout_s: float = 30) -> None:
    """Poll ``check()`` until it is true; the process exiting, or the time running out, is an error
    quoting its log (``check`` raising means not up yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:]}")


def stop_group(process: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
    """Stop a server started in a session of its own, with its children; SIGKILL if it lingers."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class GatewayServer:
    command = ("gateway", "serve")

    def __init__(self, home: Path, **env: str):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        home.mkdir(parents=True, exist_ok=True)
        self.log = home / f"{self.command[0]}-{self.port}.log"
        self.env = {**os.environ, "LORAGATE_HOME": str(home), "LORAGATE_USER": "gateway", **env}
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> GatewayServer:
        self.process = subprocess.Popen(["loragate", *self.command, "--port", str(self.port)], env=self.env,
                                        stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop(signal.SIGKILL)  # never left behind, even when it did not come up
        raise RuntimeError(f"{self.command[0]} did not start: {self.log.read_text()[-2000:]}")

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


class EngineServer(GatewayServer):
    """`loragate engine serve`: a llama.cpp engine replica, announced in the home's database."""

    command = ("engine", "serve")


class InProcessGateway:
    """``create_app(settings, backend)`` served by uvicorn on 127.0.0.1 in a thread: for a test that
    wraps the real backend (a delay, say). Stopped, with its backend, on leaving the block."""

    def __init__(self, settings, backend):
        from loragate.gateway.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(create_app(settings, backend), host="127.0.0.1", port=self.port,
                                                     log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> InProcessGateway:
        self._thread.start()
        deadline = time.monotonic() + 90
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process gateway did not start")
            time.sleep(0.1)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
