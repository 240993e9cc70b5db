"""``loragate train``: a LoRA (or QLoRA) fit with trl's ``SFTTrainer`` on a prepared dataset,
recorded with what it cost and registered as the adapter's next version.

The run lives in ``LORAGATE_HOME/runs/NAME/FINGERPRINT`` (the config's and the training
data's hash), so running the same config again after an interruption finds its checkpoints
and ``--resume`` continues from the last one. Checkpoints are saved at each evaluation; only
the best (lowest validation loss) and the last are kept, and the best is what is registered.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from loragate.console import errors
from loragate.registry import InvalidInput, NotFound, OutputCheck, Registry, VersionInfo

from .config import TrainConfig
from .contamination import record_check
from .dataset import PreparedDataset, open_prepared
from .metrics import looks_like_json
from .progress import Progress_, quiet_library_progress, save_loss_curve, training_progress

if TYPE_CHECKING:
    from transformers import TrainerCallback


class TrainingRun(BaseModel):
    """What a run did and cost; stored with the version as its ``training_config``."""

    config: dict
    training_data_sha256: str
    validation_data_sha256: str
    test_data_sha256: str
    train_examples: int
    validation_examples: int
    device: str
    started_at: datetime
    wall_s: float
    steps: int
    epochs: float
    tokens_seen: int
    tokens_per_s: float
    best_eval_loss: float | None
    best_checkpoint: str | None
    stopped_early: bool
    resumed_from: str | None
    gpu_hours: float
    usd_per_hour: float
    cost_usd: float
    versions: dict[str, str]  # the libraries that trained it
    # The trainer's log: step with training and/or validation loss (the console draws it).
    loss_history: list[dict[str, float]] = []


class TrainResult(BaseModel):
    version: VersionInfo
    run: TrainingRun
    run_dir: Path
    loss_curve: Path


def run_folder(registry: Registry, config: TrainConfig, data: PreparedDataset) -> Path:
    return registry.settings.home / "runs" / config.name / config.fingerprint(data.manifest.training_data_sha256)


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _device() -> tuple[str, bool]:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), True
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", False


def _load_model(folder: Path, config: TrainConfig, on_gpu: bool):
    import torch
    from transformers import AutoModelForCausalLM

    precision = config.precision if config.precision != "auto" else ("bf16" if on_gpu else "fp32")
    if precision in ("bf16", "fp16") and not on_gpu:
        raise InvalidInput(f"precision {precision} needs a GPU; use fp32 (or auto) on CPU")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    kwargs = {"dtype": dtype}
    if config.quantization == "4bit":
        if not on_gpu:
            raise InvalidInput("quantization: 4bit (QLoRA) needs a CUDA GPU and bitsandbytes; remove it to train on CPU")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
        )
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs), precision


def _trl_dataset(examples, limit: int | None):
    from datasets import Dataset

    rows = [e.to_trl() for e in examples[:limit]]
    return Dataset.from_list(rows)


def train(registry: Registry, config: TrainConfig, *, resume: bool = False, restart: bool = False,
          progress: Progress_ = "auto", callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Fit, keep the best checkpoint, record the run, register the adapter as ``name@N+1``.
    ``progress``: a bar on a terminal and log lines elsewhere (``auto``), always lines, or none;
    ``callbacks``: more of transformers' trainer callbacks (``bench/gpu_train.py`` times steps with one)."""
    import peft
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import EarlyStoppingCallback, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    quiet_library_progress()
    data = open_prepared(config.data)
    base_folder = registry.base_model_folder(config.base)
    base_record = next(b for b in registry.base_models() if b.id == config.base)
    run_dir = run_folder(registry, config, data)
    existing = _checkpoints(run_dir / "checkpoints")
    if existing and not (resume or restart):
        raise InvalidInput(f"{run_dir} holds checkpoints of an interrupted run of this config ({existing[-1].name}); "
                           "pass --resume to continue it or --restart to start over")
    if resume and not existing:
        raise InvalidInput(f"nothing to resume: no checkpoint in {run_dir}")
    if restart:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    device, on_gpu = _device()
    model, precision = _load_model(base_folder, config, on_gpu)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    train_set = _trl_dataset(data.split("train"), config.train_limit)
    validation_set = _trl_dataset(data.split("validation"), config.eval_limit)
    if len(validation_set) == 0:
        raise InvalidInput(f"{config.data} has no validation split; early stopping needs one "
                           "(prepare with --val-fraction > 0)")
    args = SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=config.epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio,
        max_length=config.max_seq_length, completion_only_loss=True, packing=False,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not on_gpu,
        activation_checkpointing=config.gradient_checkpointing,
        eval_strategy="steps", eval_steps=config.eval_steps, save_strategy="steps", save_steps=config.eval_steps,
        # With load_best_model_at_end, a limit of 2 keeps the best checkpoint and the last.
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_steps=max(1, min(10, config.eval_steps, config.max_steps if config.max_steps > 0 else 10)),
        report_to="none", disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", seed=config.seed, data_seed=config.seed,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, task_type="CAUSAL_LM")
    extra = [EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience), *callbacks]
    reporter = training_progress(progress)
    if reporter is not None:
        extra.append(reporter)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=validation_set,
                         processing_class=tokenizer, peft_config=lora, callbacks=extra)
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts to stdout; RichProgress reports instead
    resumed_from = str(existing[-1]) if resume else None
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    if resumed_from and reporter is not None:
        errors.print(f"resuming from {existing[-1].name}")
    trainer.train(resume_from_checkpoint=resumed_from)
    wall_s = time.perf_counter() - started
    state = trainer.state

    adapter_dir = run_dir / "adapter"
    shutil.rmtree(adapter_dir, ignore_errors=True)
    trainer.model.save_pretrained(adapter_dir)  # the best checkpoint's weights, loaded back at the end
    _name_base_portably(adapter_dir, base_record.hub_id or base_record.id)
    loss_curve = save_loss_curve(state.log_history, run_dir / "loss.png", title=f"{config.name} on {config.base}")

    hours = wall_s / 3600
    rate = registry.settings.trainer.gpu_usd_per_hour if on_gpu else registry.settings.trainer.cpu_usd_per_hour
    run = TrainingRun(
        config=config.as_record(), training_data_sha256=data.manifest.training_data_sha256,
        validation_data_sha256=data.sha256("validation"), test_data_sha256=data.sha256("test"),
        train_examples=len(train_set), validation_examples=len(validation_set), device=device,
        started_at=started_at, wall_s=round(wall_s, 2), steps=state.global_step, epochs=round(state.epoch or 0, 3),
        tokens_seen=int(state.num_input_tokens_seen or 0),
        tokens_per_s=round((state.num_input_tokens_seen or 0) / wall_s, 1) if wall_s else 0.0,
        best_eval_loss=state.best_metric,
        best_checkpoint=Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        stopped_early=state.global_step < state.max_steps, resumed_from=resumed_from,
        gpu_hours=round(hours, 5) if on_gpu else 0.0, usd_per_hour=rate, cost_usd=round(hours * rate, 5),
        loss_history=[{key: entry[key] for key in ("step", "loss", "eval_loss") if math.isfinite(entry.get(key, math.nan))}
                      for entry in state.log_history if "loss" in entry or "eval_loss" in entry],
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                  "trl": trl.__version__},
    )
    (run_dir / "run.json").write_text(run.model_dump_json(indent=2))

    # The gate reads the contamination check of the training data's hash; a dataset prepared
    # elsewhere brings its check along in the manifest.
    record_check(registry, data.manifest.training_data_sha256, data.manifest.contamination,
                 {"validation": data.sha256("validation"), "test": data.sha256("test")})
    version = registry.register(
        config.name, adapter_dir, base=config.base, training_data_sha256=data.manifest.training_data_sha256,
        training_config=run.model_dump(mode="json"), parent=latest_version(registry, config.name),
        notes=config.notes or f"loragate train: {run.steps} steps on {device}", output_check=output_check(data),
        primary_metric=default_primary_metric(registry, config.name, data),
    )
    # Checkpoints only serve a resume; once registered, a second run of this config starts afresh.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return TrainResult(version=version, run=run, run_dir=run_dir, loss_curve=loss_curve)


def output_check(data: PreparedDataset) -> OutputCheck | None:
    """What the served answers must look like, read off the training data: one of its labels, or JSON
    when every completion is. The gateway checks every answer against it (see `registry output-check`)."""
    if data.manifest.labels:
        try:
            return OutputCheck(labels=data.manifest.labels)
        except ValidationError:  # labels that differ only in case or punctuation cannot be told apart
            return None
    if looks_like_json([e.completion for e in data.split("train")]):
        return OutputCheck(json_output=True)
    return None


def default_primary_metric(registry: Registry, name: str, data: PreparedDataset) -> str | None:
    """For an adapter with no gate metric of its own yet: macro F1 for a label task (on skewed
    labels exact match rewards answering the majority label), field F1 for a JSON task (exact
    match compares strings, key order and spacing included)."""
    if data.manifest.labels:
        metric = "macro_f1"
    elif looks_like_json([e.completion for e in data.split("train")]):
        metric = "field_f1"
    else:
        return None
    try:
        chosen = registry.adapter(name).primary_metric
    except NotFound:
        chosen = None
    return None if chosen else metric


def latest_version(registry: Registry, name: str) -> str | None:
    try:
        return registry.list_versions(name)[-1].ref
    except NotFound:
        return None


def _name_base_portably(adapter_dir: Path, base_name: str) -> None:
    """peft writes the base's local path; the registry and vLLM want a name that travels."""
    import json

    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(adapter_config, indent=2))
