"""Checks a peft LoRA folder before it enters the store.

The config must parse, the safetensors header must agree with it (rank, target modules), and
the weights must fit the declared base model (name, layer count, hidden sizes).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .errors import InvalidAdapter
from .models import BaseModelRecord

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# lora_A of these projections reads the residual stream (Llama, Mistral, Qwen, Gemma).
_READS_HIDDEN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class AdapterSpec:
    """What `register` learns from a valid adapter folder."""

    peft_type: str
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str]
    base_model_name_or_path: str | None
    config: dict[str, Any] = field(repr=False)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InvalidAdapter(f"{folder} has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} does not parse: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidAdapter(f"r must be a positive integer, got {r!r}")
    if not isinstance(config.get("lora_alpha"), int | float):
        raise InvalidAdapter("lora_alpha is missing or not a number")
    if not isinstance(config.get("target_modules"), list | str):
        raise InvalidAdapter("target_modules is missing")
    return config


def _read_shapes(folder: Path) -> dict[str, list[int]]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        hint = " (adapter_model.bin is not accepted: save with safe_serialization=True)" if (
            folder / "adapter_model.bin"
        ).exists() else ""
        raise InvalidAdapter(f"{folder} has no {WEIGHTS_FILE}{hint}")
    try:
        with safe_open(str(path), framework="np") as weights:
            shapes = {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    return shapes


def _targets_module(target_modules: list[str] | str, module: str) -> bool:
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, module) is not None
    leaf = module.rsplit(".", 1)[-1]
    return leaf in target_modules or any(module.endswith("." + t) for t in target_modules)


def _rank_for(config: dict[str, Any], module: str) -> int:
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        if module.endswith(pattern) or re.search(pattern, module):
            return int(rank)
    return int(config["r"])


def _check_weights(config: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, dict[str, list[int]]]:
    pairs: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for key, shape in shapes.items():
        match = _KEY.match(key)
        if match:
            pairs[match.group("module")][match.group("ab")] = shape
    if not pairs:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA weights (no lora_A/lora_B tensors)")
    target_modules = config["target_modules"]
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise InvalidAdapter(f"{module} has lora_{''.join(ab)} but not its pair")
        if not _targets_module(target_modules, module):
            raise InvalidAdapter(f"weights adapt {module}, which target_modules does not list")
        rank = _rank_for(config, module)
        if len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != rank or ab["B"][1] != rank:
            raise InvalidAdapter(
                f"{module}: lora_A {ab['A']} / lora_B {ab['B']} do not match r={rank} in the config"
            )
    if isinstance(target_modules, list):
        leaves = {m.rsplit(".", 1)[-1] for m in pairs}
        missing = [t for t in target_modules if t not in leaves and not any(m.endswith("." + t) for m in pairs)]
        if missing:
            raise InvalidAdapter(f"target_modules lists {missing} but the weights adapt none of them")
    return pairs


def _check_base(
    config: dict[str, Any], pairs: dict[str, dict[str, list[int]]], base: BaseModelRecord
) -> None:
    declared = config.get("base_model_name_or_path")
    known = {base.id, base.source, base.hub_id} - {None}
    if declared and declared not in known:
        raise InvalidAdapter(
            f"adapter was trained on {declared!r}, not on base model {base.id!r} "
            f"(known as {sorted(known)})"
        )
    layers = base.config.get("num_hidden_layers")
    hidden = base.config.get("hidden_size")
    intermediate = base.config.get("intermediate_size")
    for module, ab in pairs.items():
        layer = _LAYER.search(module + ".")
        if layers is not None and layer and int(layer.group(1)) >= layers:
            raise InvalidAdapter(f"{module}: layer {layer.group(1)} but {base.id} has {layers} layers")
        leaf = module.rsplit(".", 1)[-1]
        expected_in = hidden if leaf in _READS_HIDDEN else intermediate if leaf == "down_proj" else None
        if expected_in is not None and ab["A"][1] != expected_in:
            raise InvalidAdapter(
                f"{module}: lora_A reads {ab['A'][1]} features but {base.id} feeds it {expected_in}"
            )


def inspect_adapter(folder: Path, base: BaseModelRecord) -> AdapterSpec:
    """Validate a peft LoRA folder against its base model; raise InvalidAdapter with the reason."""
    if folder.is_symlink() or not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a folder")
    config = _read_config(folder)
    pairs = _check_weights(config, _read_shapes(folder))
    _check_base(config, pairs, base)
    targets = config["target_modules"]
    return AdapterSpec(
        peft_type="LORA",
        r=int(config["r"]),
        lora_alpha=float(config["lora_alpha"]),
        lora_dropout=float(config.get("lora_dropout") or 0.0),
        target_modules=sorted(targets) if isinstance(targets, list) else [targets],
        base_model_name_or_path=config.get("base_model_name_or_path"),
        config=config,
    )
