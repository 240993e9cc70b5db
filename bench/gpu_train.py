"""The trainer on a GPU: `loragate train` three ways against a plain trl script, one recipe.

    python bench/gpu_train.py                 # a GPU machine: a ~1.1B Llama (TinyLlama's shape), random weights
    python bench/gpu_train.py --dry-run       # CPU: a tiny Llama, a few steps, LoRA and plain trl only

Nothing is downloaded: the base is built from a config with random weights (fine for speed and
memory, meaningless for quality) and a byte-level BPE tokenizer trained here on the bundled
task's text; both go into a fresh LORAGATE_HOME, with the task prepared by `prepare_dataset`.
Runs, all on the same data, steps, batch, sequence length, LoRA rank and learning rate:

    lora       loragate's `train`, bf16 LoRA on every linear layer
    qlora      the same on the base in 4-bit NF4 (bitsandbytes; CUDA only)
    qlora-gc   QLoRA with gradient checkpointing (CUDA only)
    plain-trl  trl's SFTTrainer + peft, the same recipe, without loragate

It prints one table: tokens/s, peak GPU memory, time to first step (from the call, model load
included), last training and final validation loss, tokens/s over the plain script's; and it
checks that each loragate run registered a version whose adapter loads with peft and generates.
The GPU machine has torch, transformers and peft; the rest travels as wheels
(`pip download -d .bench/gpu-wheels trl==... bitsandbytes==... sqlmodel==... ...`, then
`pip install --no-index --find-links .bench/gpu-wheels -e . --no-deps` there).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SIZES = {  # LlamaConfig fields
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class Row:
    run: str
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    first_step_s: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    generates: str = "-"
    note: str = ""


def build_base(folder: Path, size: str, texts: list[str]) -> int:
    """A Llama with random weights and a tokenizer trained on ``texts`` in ``folder``: no download.
    Returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8192, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=CHATML)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SIZES[size])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def step_clock(started: float):
    """A trainer callback noting the time to the first step and the last training loss."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        first_step_s: float | None = None
        train_loss: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if self.first_step_s is None:
                self.first_step_s = time.perf_counter() - started

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.train_loss = logs["loss"]

    return StepClock()


def peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak() -> None:
    """Free the last run's model (trainers hold reference cycles) before measuring the next."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def loragate_run(registry, name: str, recipe: dict, data: Path, **variant) -> Row:
    from loragate.trainer.config import TrainConfig
    from loragate.trainer.train import train

    reset_peak()
    started = time.perf_counter()
    clock = step_clock(started)
    config = TrainConfig(name=name, base="bench-base", data=data, **recipe, **variant)
    result = train(registry, config, progress="none", callbacks=[clock])
    row = Row(name, result.run.tokens_per_s, peak_gib(), clock.first_step_s, clock.train_loss,
              result.run.best_eval_loss)
    row.generates = generates(registry, result.version.ref)
    return row


def plain_trl_run(base: Path, data: Path, recipe: dict, out: Path) -> Row:
    """What a user writes without loragate: SFTTrainer + LoraConfig, the same recipe."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from loragate.trainer.dataset import open_prepared

    reset_peak()
    started = time.perf_counter()
    clock = step_clock(started)
    gpu = torch.cuda.is_available()
    prepared = open_prepared(data)
    train_set = Dataset.from_list([e.to_trl() for e in prepared.split("train")])
    validation = Dataset.from_list([e.to_trl() for e in prepared.split("validation")[:recipe["eval_limit"]]])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if gpu else torch.float32)
    steps = recipe["max_steps"]
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=recipe["batch_size"],
                     per_device_eval_batch_size=recipe["batch_size"], learning_rate=recipe["learning_rate"],
                     lr_scheduler_type="cosine", warmup_steps=0.03, max_length=recipe["max_seq_length"],
                     completion_only_loss=True, bf16=gpu, use_cpu=not gpu, eval_strategy="steps", eval_steps=steps,
                     # Saved and reloaded at its evaluation like loragate's runs, so the timing compares like for like.
                     save_strategy="steps", save_steps=steps, load_best_model_at_end=True,
                     metric_for_best_model="eval_loss", greater_is_better=False, logging_steps=max(1, min(10, steps)), report_to="none", disable_tqdm=True,
                     include_num_input_tokens_seen="non_padding", dataloader_num_workers=0)
    lora = recipe["lora"]
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=validation,
                         processing_class=AutoTokenizer.from_pretrained(base), callbacks=[clock],
                         peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.remove_callback(PrinterCallback)
    began = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - began
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    return Row("plain-trl", trainer.state.num_input_tokens_seen / wall, peak_gib(), clock.first_step_s,
               clock.train_loss, evals[-1] if evals else None)


def generates(registry, ref: str) -> str:
    """Load the registered adapter with peft on the base and generate a few tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = registry.get(ref)
    base = registry.base_model_folder(info.base_model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = PeftModel.from_pretrained(model, registry.store.open(info.artifact_sha256)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "My invoice is wrong"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt.to(device), max_new_tokens=8, do_sample=False)
    new = output.shape[1] - prompt["input_ids"].shape[1]
    return f"{ref}: {new} tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny model, a few steps, no QLoRA.")
    parser.add_argument("--size", choices=SIZES, default=None, help="Default: 1b, or tiny with --dry-run.")
    parser.add_argument("--steps", type=int, default=None, help="Default 60 (4 with --dry-run).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    size = args.size or ("tiny" if args.dry_run else "1b")
    steps = args.steps or (4 if args.dry_run else 60)

    import torch

    from loragate.registry import Registry
    from loragate.settings import Settings
    from loragate.trainer.demo_task import make_task
    from loragate.trainer.prepare import prepare_dataset

    gpu = torch.cuda.is_available()
    if not gpu and not args.dry_run:
        raise SystemExit("no CUDA GPU here: run with --dry-run for the CPU check of the script itself")
    work = Path(tempfile.mkdtemp(prefix="loragate-gpu-bench-"))
    os.environ["LORAGATE_HOME"] = str(work / "home")
    registry = Registry(Settings(home=work / "home"))
    rows = make_task(n=600 if args.dry_run else 3000)
    source = work / "task.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = work / "base"
    parameters = build_base(base, size, [m["content"] for r in rows for m in r["messages"]])
    registry.add_base_model("bench-base", source=str(base), folder=base)
    data = work / "prepared"
    prepare_dataset(source, data, registry=registry)
    recipe = dict(max_steps=steps, batch_size=8 if args.dry_run else 16, max_seq_length=192, learning_rate=2e-4,
                  eval_steps=steps, eval_limit=32 if args.dry_run else 128,
                  lora=dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear"))
    table = [loragate_run(registry, "lora", recipe, data)]
    for name, variant in (("qlora", dict(quantization="4bit")),
                          ("qlora-gc", dict(quantization="4bit", gradient_checkpointing=True))):
        table.append(loragate_run(registry, name, recipe, data, **variant) if gpu
                     else Row(name, note="skipped: 4-bit needs CUDA and bitsandbytes"))
    table.append(plain_trl_run(base, data, recipe, work / "plain-trl"))
    plain = table[-1].tokens_per_s

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    print(f"\n{size} Llama ({parameters / 1e6:.1f}M parameters, random weights) on {device}, "
          f"{steps} steps, batch {recipe['batch_size']}, max_seq_length 192, LoRA r16 all-linear\n")
    print("| run | tokens/s | x plain trl | peak GPU GiB | first step s | train loss | val loss | adapter | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table:
        ratio = r.tokens_per_s / plain if r.tokens_per_s and plain else None
        print(f"| {r.run} | {cell(r.tokens_per_s, '.0f')} | {cell(ratio, '.2f')} | {cell(r.peak_gib, '.2f')} | "
              f"{cell(r.first_step_s, '.1f')} | {cell(r.train_loss, '.3f')} | {cell(r.eval_loss, '.3f')} | "
              f"{r.generates} | {r.note} |")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in table], indent=2))


if __name__ == "__main__":
    main()
