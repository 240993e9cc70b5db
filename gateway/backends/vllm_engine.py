"""Our own vLLM OpenAI server: its command line, run as an ``EngineProcess``.

The gateway starts it when ``gateway.vllm.url`` is unset. The engine runs with the runtime LoRA
API on (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) and ``--max-loras``.
"""

from __future__ import annotations

from pathlib import Path

from loragate.settings import VllmSettings

from .engine_process import EngineProcess, free_port


# JSON from structured outputs without free whitespace between tokens: a small or fine-tuned model
# can otherwise spend all of max_tokens on newlines inside the object and never close it (seen with
# SmolLM2). vLLM reads this per server, not per request (start attached servers with it too), and
# only for a named backend: llguidance, which covers more of JSON Schema than xgrammar.
STRUCTURED_OUTPUTS = ["--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}']


def engine_command(settings: VllmSettings, model: str, port: int, *, lora: bool = True) -> list[str]:
    """``lora=False`` serves the base alone (bench/vllm_multi_lora.py compares against it)."""
    lora_args = ["--enable-lora", "--max-loras", str(settings.max_loras), "--max-lora-rank",
                 str(settings.max_lora_rank)] if lora else []
    return [settings.python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
            "--port", str(port), "--model", model, "--served-model-name", settings.served_name,
            "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len), *lora_args,
            *STRUCTURED_OUTPUTS, *settings.extra_args]


def vllm_process(settings: VllmSettings, model: str, log_dir: Path, *, lora: bool = True) -> EngineProcess:
    port = settings.port or free_port()
    return EngineProcess("vLLM", engine_command(settings, model, port, lora=lora), port, log_dir / f"vllm-{port}.log",
                         env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", **settings.env},
                         start_timeout_s=settings.start_timeout_s)
