"""Our own vLLM OpenAI server: the command line, one process group, stopped by its id.

The gateway starts it when ``gateway.vllm.url`` is unset. The engine runs with the runtime LoRA
API on (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) and ``--max-loras``; it dies with the gateway's
process (``PR_SET_PDEATHSIG``) even when the gateway is killed outright.
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

from loragate.settings import VllmSettings

log = logging.getLogger("loragate.gateway")
_PR_SET_PDEATHSIG = 1


class EngineStartFailed(RuntimeError):
    pass


def engine_command(settings: VllmSettings, model: str, port: int, *, lora: bool = True) -> list[str]:
    """``lora=False`` serves the base alone (bench/vllm_multi_lora.py compares against it)."""
    lora_args = ["--enable-lora", "--max-loras", str(settings.max_loras), "--max-lora-rank",
                 str(settings.max_lora_rank)] if lora else []
    return [settings.python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
            "--port", str(port), "--model", model, "--served-model-name", settings.served_name,
            "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len), *lora_args,
            *settings.extra_args]


def _free_port() -> int:
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


class VllmProcess:
    def __init__(self, settings: VllmSettings, model: str, log_dir: Path, *, lora: bool = True):
        self.settings = settings
        self.port = settings.port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = engine_command(settings, model, self.port, lora=lora)
        self.log_path = log_dir / f"vllm-{self.port}.log"
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
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **self.settings.env}
        with self.log_path.open("ab") as out:
            self._process = subprocess.Popen(self.command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             preexec_fn=_die_with_parent)
        log.warning("started vLLM (pid %s) on %s; log: %s", self._process.pid, self.url, self.log_path)

    async def wait_ready(self, client: httpx.AsyncClient, health_url: str) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise EngineStartFailed(f"vLLM exited while starting; see {self.log_path}:\n{self._log_tail()}")
            try:
                if (await client.get(health_url, timeout=2)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
        raise EngineStartFailed(f"vLLM did not answer /health within {self.settings.start_timeout_s:g} s; "
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
        """Wait for every process of the group (the server and its engine core) to exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._process.poll()  # reap the leader: a zombie still counts as a member
            try:
                os.killpg(self._process.pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.1)
        return False

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.is_file() else ""
