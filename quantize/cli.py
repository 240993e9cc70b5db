"""``loragate quantize ...``: artifacts for each backend, registered against their version."""

from __future__ import annotations

import typer

from loragate.console import console
from loragate.registry import Registry

app = typer.Typer(help="Merge and convert adapters for each backend (GGUF for llama.cpp).", no_args_is_help=True)


@app.command("lora-gguf")
def lora_gguf(ref: str, out_type: str = typer.Option("f16", "--type", help="f16, f32, bf16 or q8_0.")) -> None:
    """Convert a version's peft adapter to a GGUF LoRA (llama.cpp's converter) and register it."""
    from .lora_gguf import convert_lora_to_gguf

    artifact = convert_lora_to_gguf(Registry(), ref, out_type=out_type)
    console.print(f"{ref}: GGUF LoRA ({out_type}) {artifact.size:,} bytes, sha256 {artifact.sha256[:12]}")
