"""loragate: the life of a LoRA adapter, from training data to production traffic."""

__version__ = "0.1.0"
