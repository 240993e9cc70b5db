"""A registered peft LoRA as a GGUF LoRA for llama.cpp, registered back against its version."""

from __future__ import annotations

import tempfile
from pathlib import Path

from loragate.registry import InvalidInput, Registry
from loragate.registry.models import VersionArtifact

from .llama_cpp_tools import run_converter

KIND = "gguf-lora"
FILENAME = "adapter.gguf"
OUT_TYPES = ("f16", "f32", "bf16", "q8_0")


def base_hf_folder(registry: Registry, ref: str) -> Path:
    """The base model's Hugging Face folder, which the converter reads for its config."""
    return registry.base_model_folder(registry.get(ref).base_model)


def convert_lora_to_gguf(registry: Registry, ref: str, *, out_type: str = "f16") -> VersionArtifact:
    """Convert ``ref``'s adapter with llama.cpp's convert_lora_to_gguf.py and register the result."""
    if out_type not in OUT_TYPES:
        raise InvalidInput(f"GGUF LoRA type must be one of {', '.join(OUT_TYPES)}")
    base = base_hf_folder(registry, ref)
    adapter = registry.artifact_path(ref)
    with tempfile.TemporaryDirectory(prefix="loragate-lora-gguf-") as scratch:
        out = Path(scratch) / "out"
        out.mkdir()
        run_converter(registry.settings.tools_dir, "convert_lora_to_gguf.py",
                      ["--base", str(base), "--outfile", str(out / FILENAME), "--outtype", out_type, str(adapter)])
        return registry.add_artifact(ref, out, kind=KIND, type=out_type)


def lora_gguf_path(registry: Registry, ref: str, *, out_type: str = "f16") -> Path:
    """The version's GGUF LoRA file, sha256-checked."""
    return registry.derived_artifact_path(ref, kind=KIND, type=out_type) / FILENAME
