"""A version's adapter merged into its base (peft ``merge_and_unload``), saved as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

from loragate.registry import Registry
from loragate.registry.models import VersionArtifact

from .lora_gguf import base_hf_folder
from .scratch import scratch_folder

KIND = "merged"
TYPE = "safetensors"


def merge_version(registry: Registry, ref: str) -> VersionArtifact:
    """Merge ``ref``'s LoRA into its base in fp32, save in the base's dtype with its tokenizer,
    and register the folder against the version."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base_hf_folder(registry, ref)
    adapter = registry.artifact_path(ref)
    # Merge in fp32 so the sum W + BA is not rounded twice; save at the base's own precision.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    saved_dtype = _declared_dtype(base)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with scratch_folder(registry, "merge", need_bytes=_param_bytes(merged, saved_dtype)) as out:
        merged.to(saved_dtype).save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
        return registry.add_artifact(ref, out, kind=KIND, type=TYPE)


def merged_folder(registry: Registry, ref: str) -> Path:
    """The merged model's folder, sha256-checked; merged first when it does not exist yet."""
    if not any(a.kind == KIND for a in registry.derived_artifacts(ref)):
        merge_version(registry, ref)
    return registry.derived_artifact_path(ref, kind=KIND, type=TYPE)


def _declared_dtype(model_folder: Path):
    import torch

    config = json.loads((model_folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def _param_bytes(model, dtype) -> int:
    import torch

    return sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()
