"""Adapter folder validation: every reason a folder is refused, and what a good one yields."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from loragate.registry.errors import InvalidAdapter
from loragate.registry.models import BaseModelRecord
from loragate.registry.validation import inspect_adapter

from .conftest import BASE_CONFIG, BASE_ID, HUB_ID, make_adapter

BASE = BaseModelRecord(id=BASE_ID, source="/models/smollm2", hub_id=HUB_ID, licence_id="apache-2.0",
                       config={k: v for k, v in BASE_CONFIG.items() if k != "architectures"})


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_valid_adapter(tmp_path):
    spec = inspect_adapter(make_adapter(tmp_path / "a", r=4, targets=("q_proj", "v_proj", "down_proj")), BASE)
    assert (spec.r, spec.lora_alpha, spec.lora_dropout) == (4, 8.0, 0.05)
    assert spec.target_modules == ["down_proj", "q_proj", "v_proj"]
    assert spec.base_model_name_or_path == HUB_ID


def test_rank_pattern_is_honoured(tmp_path):
    folder = make_adapter(tmp_path / "a", r=8)
    _edit_config(folder, r=16, rank_pattern={"q_proj": 8, "v_proj": 8})
    assert inspect_adapter(folder, BASE).r == 16


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "adapter_config.json").unlink(), "has no adapter_config.json"),
        (lambda f: (f / "adapter_config.json").write_text("{not json"), "does not parse"),
        (lambda f: (f / "adapter_config.json").write_text("[1, 2]"), "JSON object"),
        (lambda f: _edit_config(f, peft_type="IA3"), "only LORA"),
        (lambda f: _edit_config(f, r=0), "positive integer"),
        (lambda f: _edit_config(f, r=4), r"do not match r=4"),
        (lambda f: _edit_config(f, lora_alpha="big"), "lora_alpha"),
        (lambda f: _edit_config(f, target_modules=["q_proj", "v_proj", "k_proj"]), r"lists \['k_proj'\]"),
        (lambda f: _edit_config(f, target_modules=["q_proj"]), "which target_modules does not list"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 5), "not a valid safetensors"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(
            (f / "adapter_model.safetensors").read_bytes()[:-100]), "not a valid safetensors"),
        (lambda f: save_file({"x.weight": np.zeros((2, 2), dtype=np.float32)},
                             str(f / "adapter_model.safetensors")), "no LoRA weights"),
        (lambda f: _edit_config(f, base_model_name_or_path="meta-llama/Llama-3.2-1B"), "not on base model"),
    ],
)
def test_broken_adapters_are_refused_with_the_reason(tmp_path, damage, message):
    folder = make_adapter(tmp_path / "a")
    damage(folder)
    with pytest.raises(InvalidAdapter, match=message):
        inspect_adapter(folder, BASE)


def test_unpaired_lora_tensor_is_refused(tmp_path):
    folder = tmp_path / "a"
    make_adapter(folder, layers=1, targets=("q_proj",))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((8, 576), np.float32)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(InvalidAdapter, match="not its pair"):
        inspect_adapter(folder, BASE)


def test_adapter_for_a_wider_model_is_refused(tmp_path):
    folder = make_adapter(tmp_path / "a", hidden=2048, base=BASE_ID)
    with pytest.raises(InvalidAdapter, match="reads 2048 features"):
        inspect_adapter(folder, BASE)


def test_adapter_for_a_deeper_model_is_refused(tmp_path):
    folder = make_adapter(tmp_path / "a", layers=32)
    with pytest.raises(InvalidAdapter, match="layer 30 but"):
        inspect_adapter(folder, BASE)


def test_pickle_weights_get_a_hint(tmp_path):
    folder = make_adapter(tmp_path / "a")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(InvalidAdapter, match="safe_serialization"):
        inspect_adapter(folder, BASE)


def test_a_file_is_not_a_folder(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(InvalidAdapter, match="not a folder"):
        inspect_adapter(path, BASE)
