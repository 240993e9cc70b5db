"""A list of prompts answered by a backend the gateway serves with, outside any HTTP server.

The served-path scorer (``loragate eval --served``, ``quantize compare``) uses it so that its
number is what users get: the same backend code as the gateway (the engine process, its slots,
per-request LoRA, the serving base GGUF or the vLLM server), greedy, with the adapter handle the
router would give that version.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from .backends.base import AdapterHandle, Backend, Generation

SPEED_TOKENS = 32  # decode speed: this many new tokens, EOS ignored, after one warm-up


@dataclass(frozen=True)
class EngineAnswers:
    answers: list[str]  # in the order of the conversations
    load_s: float  # starting the engine with the adapter loaded
    tokens_per_s: float  # decode speed of one sequence


def answer_on_backend(backend: Backend, conversations: list[list[dict[str, str]]], *, max_tokens: int,
                      adapter: AdapterHandle | None = None) -> EngineAnswers:
    """Start ``backend`` (with ``adapter`` loaded), answer every conversation greedily, one at a
    time, measure one sequence's decode speed, stop it.

    One at a time: the engine's batched decoding is not bit-identical across batch compositions
    (seen: one answer of 40 changed between two runs at 4 at once), and a score the gate reads
    must come out the same when measured again."""
    return asyncio.run(_answer_all(backend, conversations, max_tokens, adapter))


async def _answer_all(backend: Backend, conversations: list[list[dict[str, str]]], max_tokens: int,
                      adapter: AdapterHandle | None) -> EngineAnswers:
    started = time.perf_counter()
    try:
        await backend.start()
        if adapter is not None and hasattr(backend, "warm"):
            await backend.warm([adapter])
        load_s = time.perf_counter() - started
        answers = [(await _generate(backend, Generation(max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                                        messages=messages, adapter=adapter)))[0]
                   for messages in conversations]
        speed = await _decode_speed(backend, conversations[0], adapter) if conversations else 0.0
    finally:
        await backend.stop()
    return EngineAnswers(answers=answers, load_s=load_s, tokens_per_s=speed)


async def _generate(backend: Backend, request: Generation) -> tuple[str, int]:
    parts, count = [], 0
    async for delta in backend.generate(request):
        parts.append(delta.text)
        if delta.finish_reason is not None:
            count = delta.completion_tokens
    return "".join(parts), count


async def _decode_speed(backend: Backend, messages: list[dict[str, str]], adapter: AdapterHandle | None) -> float:
    request = Generation(max_tokens=SPEED_TOKENS, temperature=0.0, top_p=1.0, messages=messages, adapter=adapter,
                         ignore_eos=True)
    await _generate(backend, request)  # warm-up: caches, thread pools, weight repacking
    started = time.perf_counter()
    _, count = await _generate(backend, request)
    return count / (time.perf_counter() - started)
