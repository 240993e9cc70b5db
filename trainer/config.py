"""``TrainConfig``: what ``loragate train CONFIG.yaml`` reads.

The defaults are the usual LoRA/QLoRA recipe for small instruction models (r 16, alpha 32,
dropout 0.05 on every linear layer, lr 2e-4 with a cosine schedule, 3% warm-up); the fields a
CPU run needs to stay short (``max_steps``, ``train_limit``) are off by default.

    name: ticket-router
    base: SmolLM2-135M-Instruct
    data: ./tickets-prepared          # a `loragate data prepare` folder
    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
    epochs: 1
    batch_size: 8
    max_seq_length: 192               # `loragate data stats` recommends one
    quantization: 4bit                # QLoRA: NF4 with double quantization, GPU only
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loragate.registry import InvalidInput


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=256)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str  # the adapter name the run registers a version of
    base: str  # a registered base model id
    data: Path  # a prepared dataset folder
    lora: LoraSettings = LoraSettings()
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, ge=-1)  # > 0 overrides epochs
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_seq_length: int = Field(512, ge=16)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    quantization: Literal["4bit"] | None = None
    gradient_checkpointing: bool = False
    eval_steps: int = Field(50, ge=1)  # validation loss, checkpoint and early-stopping cadence
    early_stopping_patience: int = Field(3, ge=1)  # evaluations without improvement
    train_limit: int | None = Field(None, ge=1)  # first N training examples (short CPU runs)
    eval_limit: int | None = Field(None, ge=1)  # first N validation examples
    seed: int = 0
    notes: str | None = None

    @classmethod
    def from_yaml(cls, path: Path, **overrides) -> TrainConfig:
        """Read a YAML file; relative ``data`` paths are relative to the file."""
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise InvalidInput(f"no training config at {path}") from None
        except yaml.YAMLError as exc:
            raise InvalidInput(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidInput(f"{path}: expected a mapping of settings")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            config = cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidInput(f"{path}: {problems}") from None
        if not config.data.is_absolute():
            config.data = (Path(path).parent / config.data).resolve()
        return config

    def fingerprint(self, training_data_sha256: str) -> str:
        """Names the run folder: the same config on the same data resumes the same run."""
        payload = self.model_dump_json(exclude={"notes", "data"}) + training_data_sha256
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def as_record(self) -> dict:
        return json.loads(self.model_dump_json())
