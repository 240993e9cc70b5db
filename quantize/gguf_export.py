"""The merged model (or a base model) as a GGUF for llama.cpp, at F16, Q8_0 or Q4_K_M.

llama.cpp's own tools do the work: ``convert_hf_to_gguf.py`` writes F16 and Q8_0 directly;
Q4_K_M comes from the F16 file through llama.cpp's quantizer (``llama_model_quantize``, as
bound by llama-cpp-python), the same code as the ``llama-quantize`` binary.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path

from loragate.registry import InvalidInput, Registry
from loragate.registry.models import VersionArtifact

from .llama_cpp_tools import ConverterError, run_converter
from .lora_gguf import base_hf_folder
from .merge import merged_folder
from .scratch import scratch_folder

KIND = "gguf"
FILENAME = "model.gguf"
# Types the converter writes itself, and those llama.cpp's quantizer derives from F16.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                   "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
TYPES = (*CONVERTER_TYPES, *QUANTIZER_TYPES)
# Bytes per parameter, to check for room before writing (Q-types include their scales).
_BYTES_PER_PARAM = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.7,
                    "q4_k_m": 0.6, "q4_0": 0.57}


def export_gguf(registry: Registry, ref: str, out_type: str) -> VersionArtifact:
    """Merge ``ref`` (if not merged yet), convert it to a GGUF of ``out_type`` and register it."""
    check_gguf_type(out_type)
    tools = registry.settings.tools_dir
    check_architecture(tools, base_hf_folder(registry, ref))  # fail before the slow merge
    merged = merged_folder(registry, ref)
    with scratch_folder(registry, f"gguf-{out_type}", need_bytes=_bytes_needed(merged, out_type)) as out:
        target = out / "artifact"
        target.mkdir()
        if out_type in CONVERTER_TYPES:
            _convert(tools, merged, out_type, target / FILENAME)
        else:
            quantize_gguf(_f16_source(registry, ref, merged, out), target / FILENAME, out_type)
        return registry.add_artifact(ref, target, kind=KIND, type=out_type)


def export_base_gguf(registry: Registry, base: str, out_type: str) -> Path:
    """The base model's own weights as a GGUF of ``out_type`` (``$LORAGATE_HOME/models/BASE.TYPE.gguf``,
    written once): a base for the llama.cpp backend at a higher precision than the one shipped."""
    check_gguf_type(out_type)
    tools = registry.settings.tools_dir
    folder = registry.base_model_folder(base)
    check_architecture(tools, folder)
    target = registry.settings.home / "models" / f"{base}.{out_type}.gguf"
    if target.is_file():
        return target
    with scratch_folder(registry, f"base-gguf-{out_type}", need_bytes=_bytes_needed(folder, out_type)) as out:
        written = out / FILENAME
        if out_type in CONVERTER_TYPES:
            _convert(tools, folder, out_type, written)
        else:
            _convert(tools, folder, "f16", out / "f16.gguf")
            quantize_gguf(out / "f16.gguf", written, out_type)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(written, target)  # same file system (the scratch is under the home): never half-written
    return target


def _f16_source(registry: Registry, ref: str, merged: Path, scratch: Path) -> Path:
    """The F16 GGUF to quantize from: the registered one when there is one."""
    if any(a.kind == KIND and a.type == "f16" for a in registry.derived_artifacts(ref)):
        return gguf_path(registry, ref, "f16")
    f16 = scratch / "f16.gguf"
    _convert(registry.settings.tools_dir, merged, "f16", f16)
    return f16


def _convert(tools: Path, model_folder: Path, out_type: str, target: Path) -> None:
    """llama.cpp's converter: a Hugging Face folder to a GGUF of a type it writes itself."""
    run_converter(tools, "convert_hf_to_gguf.py", ["--outtype", out_type, "--outfile", str(target), str(model_folder)])


def _bytes_needed(model_folder: Path, out_type: str) -> int:
    """Room for the output, and for a quantizer type the F16 it is made from."""
    extra = 2 if out_type in QUANTIZER_TYPES else 0
    return int(_parameter_count(model_folder) * (_BYTES_PER_PARAM[out_type] + extra))


def check_gguf_type(out_type: str) -> None:
    if out_type not in TYPES:
        raise InvalidInput(f"GGUF type must be one of {', '.join(TYPES)}, not {out_type!r}")


def gguf_path(registry: Registry, ref: str, out_type: str) -> Path:
    """The version's merged GGUF of ``out_type``, sha256-checked."""
    return registry.derived_artifact_path(ref, kind=KIND, type=out_type) / FILENAME


def quantize_gguf(source: Path, target: Path, out_type: str, *, threads: int = 0) -> None:
    """llama.cpp's quantizer on a GGUF file (``llama-quantize SOURCE TARGET Q4_K_M``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[out_type])
    params.nthread = threads
    llama_log = logging.getLogger("llama-cpp-python")  # llama.cpp logs every tensor at INFO
    level = llama_log.level
    llama_log.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    finally:
        llama_log.setLevel(level)
    if status != 0:
        raise ConverterError(f"llama.cpp's quantizer failed on {source.name} -> {out_type} (status {status})")


def check_architecture(tools: Path, model_folder: Path) -> None:
    architectures = json.loads((model_folder / "config.json").read_text()).get("architectures") or []
    supported = supported_architectures(tools)
    if not any(arch in supported for arch in architectures):
        raise ConverterError(f"llama.cpp's converter does not support the architecture "
                             f"{', '.join(architectures) or '(none declared)'} of {model_folder.name}")


@functools.cache
def supported_architectures(tools: Path) -> frozenset[str]:
    """What ``convert_hf_to_gguf.py --print-supported-models`` lists (read once per process)."""
    listing = run_converter(tools, "convert_hf_to_gguf.py", ["--print-supported-models"])
    return frozenset(line.strip()[2:] for line in listing.splitlines() if line.strip().startswith("- "))


def _parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    count = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "np") as handle:
            count += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return count
