"""The small interface every inference backend implements (llama.cpp now, vLLM beside it)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Protocol


def _no_check() -> object:
    return None


@dataclass(frozen=True)
class AdapterHandle:
    """An adapter version as a backend needs it: a stable id and its files."""

    key: str  # name@N: what the backend calls the adapter
    sha256: str  # of the artifact the backend loads; a change means a new load
    path: Path | None  # None: the engine fetches the artifact from the store itself
    verify: Callable[[], object] = field(default=_no_check, compare=False)  # re-hash; the folder, or raises


@dataclass(frozen=True)
class Generation:
    """One request, backend-neutral: chat ``messages`` or a raw ``prompt``."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and the k most likely
    response_format: dict | None = None  # OpenAI's json_object / json_schema, enforced by the engine
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    adapter: AdapterHandle | None = None
    background: bool = False  # a shadow copy: served only when no live request waits
    ignore_eos: bool = False  # decode past the end of text (speed measurements), as vLLM and llama.cpp offer


@dataclass
class Delta:
    """A piece of generated text; the last one of a choice carries its finish reason and usage."""

    text: str
    logprobs: list[dict] | None = None  # one entry per token, as OpenAI's chat logprobs ``content``
    index: int = 0  # which choice, when a request asks for several (n)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV the engine reused
    queue_ms: float | None = None  # waiting for an engine slot, when the backend queues itself
    batch: float | None = None  # requests the engine ran at once on average during this one (itself included)


class PromptTooLong(ValueError):
    """The prompt and max_tokens do not fit the model's context: the gateway answers 400."""


class BackendUnavailable(Exception):
    """The engine is down, starting or overloaded: the gateway answers 503."""


class Backend(Protocol):
    name: str
    base_model: str
    weights: str  # the base weights it serves, as /v1/models shows them (a GGUF file, a model folder)
    artifact_kind: str  # which registry artifact this backend loads: gguf-lora, peft ...
    fetches_artifacts: bool  # the engine fetches adapters from the store by itself (vLLM's resolver)
    slots: int  # requests it serves at once (for cost sharing)

    def cost(self, prompt_tokens: int, completion_tokens: int, busy_s: float) -> float:
        """What serving one request cost, in US dollars."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: Generation) -> AsyncIterator[Delta]:
        """Stream the answer; closing the iterator cancels the generation."""
        ...
