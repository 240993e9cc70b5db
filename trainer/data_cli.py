"""``loragate data ...``: prepare, stats, check-contamination, make-task."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from loragate.console import console, emit, table
from loragate.extras import require
from loragate.registry import Registry

if TYPE_CHECKING:  # the modules themselves load in the commands: datasketch takes 0.5 s to import
    from .dataset import ContaminationReport
    from .prepare import PrepareResult
    from .stats import DataStats

data_app = typer.Typer(help="Data prep: validate, deduplicate, split and check JSONL before training.",
                       no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON for scripts.")
FORMAT = typer.Option(None, "--format",
                      help="prompt_completion, messages or alpaca; default: detected from the first valid line.")
SHOWN_ROWS = 10


@data_app.command()
def prepare(
    source: Path = typer.Argument(..., help="JSONL in the prompt/completion, messages or Alpaca format."),
    out: Path = typer.Option(..., "--out", help="Folder for train/validation/test.jsonl and manifest.json."),
    format: str | None = FORMAT,
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip invalid lines (listed in the manifest)."),
    near_threshold: float | None = typer.Option(None, "--near-threshold",
                                                help="MinHash Jaccard for near duplicates (default: settings, 0.8)."),
    val_fraction: float | None = typer.Option(None, "--val-fraction", help="Default: settings, 0.1."),
    test_fraction: float | None = typer.Option(None, "--test-fraction", help="Default: settings, 0.1."),
    seed: int | None = typer.Option(None, "--seed", help="Split seed (default: settings, 0)."),
    test: Path | None = typer.Option(None, "--test", help="The data's own test set, kept as given (train rows "
                                                            "that repeat its prompts are dropped instead)."),
    validation: Path | None = typer.Option(None, "--validation", help="The data's own validation set, kept as given."),
    schema: Path | None = typer.Option(None, "--schema", help="A JSON schema every answer follows: checked on the "
                                       "data, and eval reports the share of model answers that follow it."),
    as_json: bool = JSON,
) -> None:
    """Validate every line, remove duplicates, split (stratified for labels), check contamination.

    Exits 1 when the contamination check fails (it is recorded either way)."""
    require("train", what="data prepare", only=("datasketch", "jsonschema"))
    from .prepare import prepare_dataset

    result = prepare_dataset(source, out, format=format, skip_invalid=skip_invalid, near_threshold=near_threshold,
                             validation_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                             registry=Registry(), test=test, validation=validation, answer_schema=schema)
    emit({"folder": str(result.folder), "manifest": result.manifest, "removed": [asdict(r) for r in result.removed],
          "skipped": [asdict(p) for p in result.skipped]}, as_json, lambda: _print_prepared(result))
    if not result.manifest.contamination.passed:
        raise typer.Exit(1)


def _print_prepared(result: PrepareResult) -> None:
    m = result.manifest
    valid = sum(s.count for s in m.splits.values()) + m.dedup.exact_removed + m.dedup.near_removed
    console.print(f"read {m.source} ({m.format}): {valid} valid examples"
                  + (f", {len(m.invalid_skipped)} invalid line(s) skipped" if m.invalid_skipped else ""))
    for problem in result.skipped[:SHOWN_ROWS]:
        console.print(f"  skipped {problem}", highlight=False)
    console.print(f"dedup: removed {m.dedup.exact_removed} exact and {m.dedup.near_removed} near duplicate(s) "
                  f"(threshold {m.dedup.threshold:g})"
                  + (f", and {m.dedup.held_out_removed} train row(s) that repeat a given "
                     f"{' or '.join(m.given)} prompt" if m.given else ""))
    for name, given in m.given.items():
        console.print(f"{name}: kept as given, {given.count} examples from {given.source} "
                      f"(sha256 {given.source_sha256[:12]})")
    if result.removed:
        table(f"duplicates removed (first {min(SHOWN_ROWS, len(result.removed))} of {len(result.removed)})",
              ["kept line", "removed line", "kind", "jaccard"],
              [[r.kept_line, r.removed_line, r.kind, f"{r.similarity:.2f}"] for r in result.removed[:SHOWN_ROWS]])
    how = f"stratified by {len(m.labels)} labels" if m.labels else "not stratified (completions are not labels)"
    table(f"splits (seed {m.seed}, {how}" + (f"; {', '.join(m.given)} given" if m.given else "") + ")", ["split", "examples", "file", "sha256"],
          [[name, s.count, str(result.folder / s.file), s.sha256[:12]] for name, s in m.splits.items()])
    _print_contamination(m.contamination, m.training_data_sha256)


def _print_contamination(report: ContaminationReport, train_sha256: str) -> None:
    verdict = "[green]passed[/green]" if report.passed else "[red]FAILED[/red]"
    console.print(f"contamination check {verdict} ({report.method}): {report.exact_overlaps} exact, "
                  f"{report.near_overlaps} near overlap(s) with train; recorded for training data {train_sha256[:12]}")
    for line in report.examples[:SHOWN_ROWS]:
        console.print(f"  {line}", highlight=False)


@data_app.command("check-contamination")
def check_contamination(
    prepared: Path = typer.Argument(..., help="A folder written by `loragate data prepare`."),
    against: Path | None = typer.Option(None, "--against", help="Also check this JSONL (e.g. your own test set)."),
    format: str | None = FORMAT,
    near_threshold: float | None = typer.Option(None, "--near-threshold",
                                                help="Default: the threshold the folder was prepared with."),
    as_json: bool = JSON,
) -> None:
    """Check validation, test (and --against) for exact and near copies in train; record the result.

    Exits 1 when contamination is found."""
    require("train", what="data check-contamination", only=("datasketch",))
    from .contamination import check_prepared
    from .dataset import open_prepared

    registry = Registry()
    report = check_prepared(prepared, against=against, against_format=format, threshold=near_threshold,
                            registry=registry)
    train_sha256 = open_prepared(prepared).manifest.training_data_sha256
    emit({"training_data_sha256": train_sha256, **report.model_dump()}, as_json,
         lambda: _print_contamination(report, train_sha256))
    if not report.passed:
        raise typer.Exit(1)


@data_app.command()
def stats(
    target: Path = typer.Argument(..., help="A JSONL file or a prepared folder."),
    base_model: str | None = typer.Option(None, "--base-model",
                                          help="HF model folder or registered base id: token lengths."),
    max_seq_length: int | None = typer.Option(None, "--max-seq-length", help="Count what this length truncates."),
    format: str | None = FORMAT,
    as_json: bool = JSON,
) -> None:
    """Counts, label balance, output-format share, token-length percentiles and a max_seq_length."""
    from .stats import dataset_stats, resolve_base_model

    if base_model:
        require("train", what="data stats --base-model", only=("transformers",))
    folder = resolve_base_model(base_model) if base_model else None
    result = dataset_stats(target, base_model=folder, max_seq_length=max_seq_length, format=format)
    emit(result, as_json, lambda: _print_stats(result))


def _print_stats(s: DataStats) -> None:
    table(f"{s.source}: examples", ["split", "examples"], [[k, v] for k, v in s.counts.items()])
    if s.labels and s.label_counts:
        totals = {label: sum(c.get(label, 0) for c in s.label_counts.values()) for label in s.labels}
        everything = sum(totals.values())
        table("label balance", ["label", *s.label_counts, "share"],
              [[label, *(c.get(label, 0) for c in s.label_counts.values()), f"{totals[label] / everything:.1%}"]
               for label in s.labels])
    share = "-" if s.format_share is None else f"{s.format_share:.1%}"
    console.print(f"output format: {s.output_format}, {share} of completions carry it")
    if s.tokens:
        t = s.tokens
        table("tokens per example (chat template)",
              ["p50", "p90", "p99", "max", "recommended max_seq_length"],
              [[t.p50, t.p90, t.p99, t.max, t.recommended_max_seq_length]])
    else:
        console.print("token lengths: pass --base-model (a registered base id or a model folder)")
    for warning in s.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


@data_app.command("make-task")
def make_task(
    out: Path = typer.Argument(..., help="JSONL file to write (messages format)."),
    n: int = typer.Option(3000, "--n", min=50, help="Lines, planted duplicates included."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JSON,
) -> None:
    """Write the bundled narrow task: support tickets routed to one of five queues."""
    require("train", what="data make-task", only=("datasketch",))
    from .demo_task import QUEUES, write_task

    written = write_task(out, n, seed)
    emit({"path": str(out), "examples": written, "format": "messages", "labels": list(QUEUES)}, as_json,
         lambda: console.print(f"wrote {written} support tickets to {out} (messages format; queues "
                               f"{', '.join(QUEUES)}; 1% exact and 1% near duplicates planted)"))
