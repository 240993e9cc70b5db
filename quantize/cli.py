"""``loragate quantize ...``: artifacts for each backend, registered against their version."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from loragate.console import console, emit, table
from loragate.extras import require, serving_extras
from loragate.registry import Registry
from loragate.registry.models import VersionArtifact

if TYPE_CHECKING:
    from .compare import CompareReport

app = typer.Typer(help="Merge and convert adapters for each backend (GGUF for llama.cpp).", no_args_is_help=True)


def _print_artifact(ref: str, artifact: VersionArtifact) -> None:
    console.print(f"{ref}: {artifact.kind} {artifact.type}, {artifact.size:,} bytes, sha256 {artifact.sha256[:12]}")


@app.command("lora-gguf")
def lora_gguf(ref: str, out_type: str = typer.Option("f16", "--type", help="f16, f32, bf16 or q8_0.")) -> None:
    """Convert a version's peft adapter to a GGUF LoRA (llama.cpp's converter) and register it."""
    from .lora_gguf import convert_lora_to_gguf

    require("train", what="quantize lora-gguf")

    with console.status(f"converting {ref}'s adapter to a GGUF LoRA"):
        _print_artifact(ref, convert_lora_to_gguf(Registry(), ref, out_type=out_type))


@app.command()
def merge(ref: str) -> None:
    """Merge a version's adapter into its base (peft merge_and_unload) as safetensors, and register it."""
    from .merge import merge_version

    require("train", what="quantize merge")

    with console.status(f"merging {ref} into its base"):
        _print_artifact(ref, merge_version(Registry(), ref))


@app.command()
def gguf(ref: str, out_types: list[str] = typer.Option(["f16"], "--type", help="f16, q8_0, q4_k_m (repeat for several); "
                                                        "also f32, bf16, q4_0, q5_k_m, q6_k.")) -> None:
    """The merged model as GGUF at each type (llama.cpp's converter and quantizer), each registered."""
    from .gguf_export import export_gguf

    check_export_types(out_types, what="quantize gguf")
    registry = Registry()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task(f"{ref} to GGUF", total=len(out_types))
        for out_type in out_types:
            progress.update(task, description=f"{ref} to GGUF {out_type}")
            _print_artifact(ref, export_gguf(registry, ref, out_type))
            progress.advance(task)


@app.command("base-gguf")
def base_gguf(
    base: str = typer.Argument(..., help="A registered base model (its Hugging Face folder is converted)."),
    out_type: str = typer.Option("q8_0", "--type", help="f16 or q8_0 (or any `quantize gguf` type)."),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Record it as the GGUF the llama.cpp backend serves "
                               "this base from (when settings name none); a gateway picks it up at its next start."),
    reason: str | None = typer.Option(None),
) -> None:
    """The base model itself as a GGUF: serve adapters on a higher-precision base when the shipped
    one costs more than the quality ceiling (`loragate eval REF --served` measures it)."""
    from .gguf_export import export_base_gguf

    check_export_types([out_type], what="quantize base-gguf")
    registry = Registry()
    with console.status(f"converting {base} to GGUF {out_type}"):
        path = export_base_gguf(registry, base, out_type)
    console.print(f"{base}: GGUF {out_type} at {path} ({path.stat().st_size:,} bytes)")
    if serve:
        registry.set_serving_gguf(base, path, out_type=out_type, reason=reason)
        console.print(f"the llama.cpp backend serves {base} from it now (unless gateway.llamacpp.gguf names a file); "
                      "score your versions on it with `loragate eval REF --served`")


@app.command()
def compare(
    ref: str,
    data: Path = typer.Option(..., "--data", help="The prepared dataset folder whose test split is scored."),
    out_types: list[str] = typer.Option(["f16", "q8_0", "q4_k_m"], "--type", help="GGUF types to compare (repeat)."),
    limit: int | None = typer.Option(None, "--limit", help="Score the first N test examples."),
    ceiling: float | None = typer.Option(None, "--max-loss", help="Quality loss in points an artifact may show and "
                                         "still be fit (default: settings quantize.max_quality_loss_points)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Score the adapter, its merge, each GGUF and the GGUF LoRA on the same held-out prompts;
    record each score against the version; exports what is missing first."""
    from .compare import compare_version

    registry = Registry()
    check_export_types(out_types, what="quantize compare")
    require("llamacpp", *serving_extras(registry.settings), what="quantize compare")
    with console.status(f"scoring {ref}'s artifacts"):
        report = compare_version(registry, ref, data, types=tuple(out_types), limit=limit, ceiling=ceiling)
    emit(report, as_json, lambda: print_compare(report))


def check_export_types(out_types: list[str], *, what: str) -> None:
    """Known GGUF types, and the extras that export them: the converter's, and llama.cpp's quantizer
    for the types it derives from F16 (q4_k_m, ...)."""
    from .gguf_export import QUANTIZER_TYPES, check_gguf_type

    for out_type in out_types:
        check_gguf_type(out_type)
    require("train", *(("quantize",) if set(out_types) & set(QUANTIZER_TYPES) else ()), what=what)


def print_compare(report: CompareReport) -> None:
    table(f"{report.ref} on {report.examples} held-out examples ({report.metric}, "
          f"ceiling {report.ceiling_points:g} points)",
          ["artifact", "backend", report.metric, "loss (points)", "fit", "size", "load s", "tokens/s"],
          [[r.artifact + (" (served)" if r.served else ""), r.backend, f"{r.score:.3f}",
            f"{r.quality_loss_points:.1f}", "yes" if r.fit else "NO", f"{r.size_bytes / 1e6:.0f} MB",
            _figure(r.load_s), _figure(r.tokens_per_s)] for r in report.rows])


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
