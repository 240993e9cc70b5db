"""The optional extras, checked when a command starts: a missing one is a one-line error naming
the ``pip install`` that adds it, before any work, never a traceback minutes in."""

from __future__ import annotations

import importlib.util

from loragate.settings import Settings

# The modules each extra of pyproject.toml brings that loragate imports.
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "gguf", "sentencepiece",
              "datasketch", "sklearn", "rouge_score", "jsonschema", "matplotlib", "openai"),
    "llamacpp": ("xllamacpp",),
    "quantize": ("llama_cpp",),
    "litellm": ("litellm",),
}


# llama-cpp-python compiles llama.cpp, by default for every instruction the build machine lists. A
# virtual machine may list AMX and not allow it (a general protection fault at the first decode), so
# the install asks for a portable build (AVX2, FMA, F16C).
_INSTALL = {"quantize": "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install 'loragate[quantize]'"}


class MissingExtra(RuntimeError):
    pass


def require(*extras: str, what: str, only: tuple[str, ...] | None = None) -> None:
    """Raise ``MissingExtra`` naming the first extra ``what`` needs whose modules are not all installed
    (``only``: just these of its modules)."""
    for extra in extras:
        needed = [module for module in EXTRAS[extra] if only is None or module in only]
        missing = [module for module in needed if importlib.util.find_spec(module) is None]
        if missing:
            install = _INSTALL.get(extra, f"pip install 'loragate[{extra}]'")
            raise MissingExtra(f"{what} needs the '{extra}' extra ({', '.join(missing)} not installed): {install}")


def serving_extras(settings: Settings) -> tuple[str, ...]:
    """What the gateway's backends need here: llama.cpp's engine, unless vLLM serves (its own
    server, in its own environment); litellm when upstreams are called through it."""
    needed = ("llamacpp",) if settings.gateway.backend == "llamacpp" else ()
    if any(upstream.client == "litellm" for upstream in settings.gateway.upstreams):
        needed += ("litellm",)
    return needed
