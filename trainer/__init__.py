"""Training: data prep, LoRA/QLoRA fine-tuning and evaluation (issue: trainer)."""
