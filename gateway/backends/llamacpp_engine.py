"""llama.cpp's own server engine (llama-server: parallel slots, continuous batching, per-request
LoRA, grammars), from the prebuilt ``xllamacpp`` wheel, in a process of its own.

``python -m loragate.gateway.backends.llamacpp_engine CONFIG_JSON`` serves until SIGTERM. Its
LoRA adapters are fixed when it starts (llama-server loads adapter files only at start-up), so the
backend starts a new one when the set of adapters it needs changes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from .engine_process import EngineProcess


class EngineConfig(BaseModel):
    gguf: Path
    port: int
    slots: int  # parallel sequences (llama-server's --parallel)
    n_ctx: int  # per slot
    n_threads: int | None = None
    loras: list[Path] = []  # GGUF LoRAs; a request picks one by its index


def engine_process(config: EngineConfig, log_dir: Path, start_timeout_s: float) -> EngineProcess:
    from .engine_process import EngineProcess  # here: the engine's own process starts faster without httpx

    command = [sys.executable, "-m", __name__, config.model_dump_json()]
    return EngineProcess("llama.cpp", command, config.port, log_dir / f"llamacpp-{config.port}.log",
                         start_timeout_s=start_timeout_s)


def serve(config: EngineConfig) -> None:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(config.gguf)
    params.port = config.port
    params.n_parallel = config.slots
    params.n_ctx = config.n_ctx * config.slots  # llama-server splits the context across its slots
    if config.n_threads:
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = config.n_threads
    # llama-server's host-memory prompt cache is keyed by tokens only, not by LoRA: a prefix computed
    # under one adapter could be restored for another. The per-slot cache stays on (it is cleared
    # when a slot's adapter changes).
    params.cache_ram_mib = 0
    params.endpoint_metrics = True
    params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(path), 0.0) for path in config.loras]
    params.lora_init_without_apply = True
    server = xllamacpp.Server(params)  # loads the model and listens; serves from its own threads
    print(f"llama.cpp engine listening on {server.listening_address}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    os._exit(0)  # the server's threads hold no state worth a clean shutdown


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # waited for in serve()
    serve(EngineConfig.model_validate_json(sys.argv[1]))
