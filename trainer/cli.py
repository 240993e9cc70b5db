"""``loragate train`` and ``loragate eval``."""

from __future__ import annotations

from pathlib import Path

import typer

from loragate.console import console, emit, table
from loragate.extras import require, serving_extras
from loragate.registry import GateReport, Registry

JSON = typer.Option(False, "--json", help="Print JSON for scripts.")


def train_command(
    config: Path = typer.Argument(..., help="Training config (YAML): name, base, data, lora, epochs, ..."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of this config from its last checkpoint."),
    restart: bool = typer.Option(False, "--restart", help="Discard an interrupted run's checkpoints and start over."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Override the config's max_steps."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate against base and prompted base after training."),
    eval_limit: int | None = typer.Option(None, "--eval-limit", help="Evaluate on the first N test examples."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress (a bar on a terminal, else a line on stderr "
                                                      "per 50 steps or per minute)."),
    served: bool = typer.Option(False, "--served", help="Then score what the gateway serves (as `eval --served`), "
                                "so the gate has the served path's score without a second command."),
    as_json: bool = JSON,
) -> None:
    """Fit a LoRA (QLoRA on a GPU) and register it as the adapter's next version.

    The version records its lineage and cost; then it is scored against the base model and the
    prompted base model."""
    require("train", what="train")
    registry = Registry()
    if served:
        require(*serving_extras(registry.settings), what="train --served")
    from .config import TrainConfig
    from .evaluate import evaluate_version, print_eval
    from .train import train

    settings = TrainConfig.from_yaml(config, max_steps=max_steps)
    # With --json, stdout is the result's: progress goes to stderr as lines.
    progress = "none" if quiet else "lines" if as_json else "auto"
    result = train(registry, settings, resume=resume, restart=restart, progress=progress)
    ref = result.version.ref
    report = evaluate_version(registry, ref, settings.data, limit=eval_limit) if evaluate else None
    served_reports = _score_served(registry, ref, settings.data, eval_limit, pick_base=True) if served else None

    def render() -> None:
        run = result.run
        table(f"run {result.run_dir.name}", ["", ""], [
            ["registered", result.version.ref],
            ["device", run.device],
            ["steps / epochs", f"{run.steps} / {run.epochs}" + (" (stopped early)" if run.stopped_early else "")],
            ["best validation loss", f"{run.best_eval_loss:.4f}" if run.best_eval_loss is not None else "-"],
            ["wall time", f"{run.wall_s:.0f} s"],
            ["tokens/s", f"{run.tokens_per_s:.0f}"],
            ["GPU-hours", f"{run.gpu_hours:.4f}"],
            ["cost", f"${run.cost_usd:.4f} at ${run.usd_per_hour:.2f}/h"],
            ["loss curve", str(result.loss_curve)],
        ])
        if report is not None:
            print_eval(report)
        if served_reports is not None:
            _print_served(registry, ref, served_reports, registry.check_gate(ref, to="production"))
        elif registry.settings.gateway.backend == "llamacpp" and _structured(settings.data):
            console.print(f"the gateway serves {ref} as a GGUF LoRA on a quantized base: score that path for the gate "
                          f"with `loragate eval {ref} --served --data {settings.data}` (or train with --served)")

    emit({"train": result, "eval": report, "served": served_reports}, as_json, render)


def _structured(data: Path) -> bool:
    """A label or JSON task: where a quantized base most often changes the answer that counts."""
    from .dataset import open_prepared
    from .metrics import looks_like_json

    dataset = open_prepared(data)
    return bool(dataset.manifest.labels) or looks_like_json([e.completion for e in dataset.split("test")[:20]])


def eval_command(
    ref: str = typer.Argument(..., help="The version to score, e.g. tickets@2."),
    data: Path = typer.Option(..., "--data", help="The prepared dataset folder whose test split is scored."),
    limit: int | None = typer.Option(None, "--limit", help="Score the first N test examples."),
    shots: int = typer.Option(3, "--shots", help="Few-shot examples from train for the prompted base."),
    judge_url: str | None = typer.Option(None, "--judge-url",
                                         help="OpenAI-compatible base URL of a judge model (e.g. the gateway's /v1)."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="The judge's model name."),
    judge_key: str = typer.Option("none", "--judge-key", envvar="LORAGATE_JUDGE_API_KEY", help="The judge's API key."),
    served: bool = typer.Option(False, "--served", help="Score what the gateway serves (the GGUF LoRA on its llama.cpp "
                                "base) beside the adapter, for the gate's quality ceiling, instead of the base models."),
    pick_base: bool = typer.Option(True, "--pick-base/--keep-base", help="With --served: when the served path loses "
                                   "more than the ceiling, serve the base at Q8_0, else F16, if that is within it."),
    as_json: bool = JSON,
) -> None:
    """Score the base, the prompted base and a version on held-out data, and store the scores.

    Says whether fine-tuning beat the prompted base and whether the gate would promote it."""
    from loragate.registry import InvalidInput

    require("train", what="eval")
    if served:
        _eval_served(ref, data, limit, pick_base, as_json)
        return
    from .evaluate import evaluate_version, print_eval
    from .judge import JudgeTarget

    if (judge_url is None) != (judge_model is None):
        raise InvalidInput("--judge-url and --judge-model go together")
    judge = JudgeTarget(base_url=judge_url, model=judge_model, api_key=judge_key) if judge_url else None
    report = evaluate_version(Registry(), ref, data, limit=limit, shots=shots, judge=judge)
    emit(report, as_json, lambda: print_eval(report))
    if not as_json:
        console.print("scores stored in the registry: `loragate registry show " + ref + "`")


def judge_shadow_command(
    name: str = typer.Argument(..., help="The adapter whose latest shadow rollout is judged."),
    judge_url: str = typer.Option(..., "--judge-url", help="OpenAI-compatible base URL of a judge model."),
    judge_model: str = typer.Option(..., "--judge-model", help="The judge's model name."),
    judge_key: str = typer.Option("none", "--judge-key", envvar="LORAGATE_JUDGE_API_KEY", help="The judge's API key."),
    limit: int = typer.Option(100, "--limit", help="Judge the first N stored pairs."),
    as_json: bool = JSON,
) -> None:
    """Judge a shadow's stored pairs (candidate against production, both orders); record the win rate."""
    require("train", what="rollout judge")
    from .judge import JudgeTarget
    from .shadow_judge import judge_shadow

    report = judge_shadow(Registry(), name, JudgeTarget(base_url=judge_url, model=judge_model, api_key=judge_key),
                          limit=limit)
    emit(report.model_dump() | {"win_rate": report.win_rate}, as_json, lambda: console.print(
        f"{report.new} against {report.old} on {len(report.verdicts)} live requests, judged by {report.judge_model}: "
        f"{report.wins} wins, {report.losses} losses, {report.ties} ties ({report.unparsed_replies} unparsed "
        f"replies); win rate {report.win_rate:.3f}, recorded as eval suite shadow"))


def _eval_served(ref: str, data: Path, limit: int | None, pick_base: bool, as_json: bool) -> None:
    """The adapter and the served path on the same prompts; the loss is recorded for the gate."""
    registry = Registry()
    require(*serving_extras(registry.settings), what="eval --served")
    reports = _score_served(registry, ref, data, limit, pick_base)
    gate = registry.check_gate(ref, to="production")
    emit({"served": reports, "gate": gate}, as_json, lambda: _print_served(registry, ref, reports, gate))


def _score_served(registry: Registry, ref: str, data: Path, limit: int | None, pick_base: bool) -> list:
    from loragate.quantize.served import score_served

    with console.status(f"scoring {ref} as the gateway serves it"):
        return score_served(registry, ref, data, limit=limit, pick_base=pick_base)


def _print_served(registry: Registry, ref: str, reports: list, gate: GateReport) -> None:
    from loragate.offline_base import llamacpp_base_gguf
    from loragate.quantize.cli import print_compare

    for report in reports:
        print_compare(report)
    if len(reports) > 1:
        console.print(f"the llama.cpp backend now serves {registry.get(ref).base_model} from "
                      f"{llamacpp_base_gguf(registry).name} (from its next start)")
    if gate.passed:
        console.print(f"[green]{ref} is promotable[/green]")
    else:
        console.print(f"[red]{ref} is not promotable[/red]: " + "; ".join(gate.reasons))
