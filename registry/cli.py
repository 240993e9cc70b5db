"""``loragate registry ...``: the registry's operations on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml

from loragate.console import console, emit, table
from loragate.settings import StoreSettings

from .api import Registry
from .models import Licence
from .errors import InvalidInput
from .schemas import BASELINES, EvalInput, OutputCheck, VersionInfo

app = typer.Typer(help="Versioned LoRA adapters: register, score, alias, promote, roll back.",
                  no_args_is_help=True)
alias_app = typer.Typer(help="Movable pointers to versions (candidate, staging, ...).", no_args_is_help=True)
eval_app = typer.Typer(help="Eval scores for versions and baselines.", no_args_is_help=True)
base_app = typer.Typer(help="Base models that adapters are trained on.", no_args_is_help=True)
licence_app = typer.Typer(help="Licence terms (presets: apache-2.0, mit, llama3, gemma, cc-by-nc-4.0).",
                          no_args_is_help=True)
app.add_typer(alias_app, name="alias")
app.add_typer(eval_app, name="eval")
app.add_typer(base_app, name="base")
app.add_typer(licence_app, name="licence")

JSON = typer.Option(False, "--json", help="Print JSON for scripts.")


def _registry() -> Registry:
    return Registry()


def _read_mapping(path: Path) -> dict:
    """A JSON or YAML file holding one mapping (training configs)."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} must hold a mapping")
    return data


def print_versions(registry: Registry, versions: list[VersionInfo]) -> None:
    """The registry table; each adapter's score column is its own primary eval."""
    gate = registry.settings.gate
    rows = []
    for v in versions:
        adapter = registry.adapter(v.name)
        suite, metric = adapter.primary_suite or gate.primary_suite, adapter.primary_metric or gate.primary_metric
        score = v.score(suite, metric)
        rows.append([v.ref, v.base_model, f"{v.r}/{v.lora_alpha:g}", ",".join(v.aliases),
                     f"{score.value:.3f} {metric}" if score else "-", v.licence, v.artifact_sha256[:8]])
    table("adapter versions", ["version", "base", "r/α", "aliases", "primary score", "licence", "sha256"], rows)


@app.command()
def register(
    name: str = typer.Argument(..., help="Adapter name; the new version is name@N+1."),
    folder: Path = typer.Argument(..., help="peft adapter folder (adapter_config.json + adapter_model.safetensors)."),
    base: str = typer.Option(..., "--base", help="Registered base model id the adapter was trained on."),
    licence: str | None = typer.Option(None, help="Licence id; default: the base model's."),
    data_sha256: str | None = typer.Option(None, "--data-sha256", help="sha256 of the training data."),
    training_config: Path | None = typer.Option(None, help="JSON/YAML file with the training config."),
    parent: str | None = typer.Option(None, help="Version this one was trained from (name@N)."),
    author: str | None = typer.Option(None),
    notes: str | None = typer.Option(None),
    primary_suite: str | None = typer.Option(None, help="The eval suite the promotion gate reads."),
    primary_metric: str | None = typer.Option(None, help="The metric the promotion gate reads."),
    as_json: bool = JSON,
) -> None:
    """Validate an adapter folder, store it by sha256 and record a new version."""
    registry = _registry()
    info = registry.register(
        name, folder, base=base, licence=licence, training_data_sha256=data_sha256,
        training_config=_read_mapping(training_config) if training_config else None,
        parent=parent, author=author, notes=notes, primary_suite=primary_suite, primary_metric=primary_metric,
    )
    emit(info, as_json, lambda: console.print(f"registered [bold]{info.ref}[/bold] sha256 {info.artifact_sha256}"))


@app.command("list")
def list_versions(name: str | None = typer.Argument(None, help="Only this adapter."), as_json: bool = JSON) -> None:
    """All versions (or one adapter's), with aliases and primary scores."""
    registry = _registry()
    versions = registry.list_versions(name)
    emit(versions, as_json, lambda: print_versions(registry, versions))


@app.command()
def show(ref: str = typer.Argument(..., help="name (= name@production), name@N or name@alias."),
         as_json: bool = JSON) -> None:
    """One version: lineage, config, artifact, aliases and every score."""
    registry = _registry()
    info = registry.get(ref)

    def render() -> None:
        fields = info.model_dump(exclude={"evals", "training_config"})
        table(info.ref, ["field", "value"], [[k, v] for k, v in fields.items()]
              + [["training_config", json.dumps(info.training_config)], *_served_on(registry, info),
                 *(["predictions", str(path)] for path in _prediction_files(registry, info))])
        table("evals", ["subject", "suite", "metric", "value", "samples", "eval data"],
              [[e.subject, e.suite, e.metric, f"{e.value:.4g}", e.sample_count, (e.eval_data_sha256 or "-")[:12]]
               for e in info.evals])

    emit(info, as_json, render)


def _prediction_files(registry: Registry, info: VersionInfo) -> list[Path]:
    """What `loragate eval` saved beside the scores: every answer with its reference."""
    return sorted((registry.settings.home / "evals" / info.ref).glob("*.jsonl"))


def _served_on(registry: Registry, info: VersionInfo) -> list[list[str]]:
    """The base GGUF the llama.cpp gateway serves this version on, when it serves its base."""
    from loragate.offline_base import OfflineModelMissing, llamacpp_base_gguf

    gateway = registry.settings.gateway
    if gateway.backend != "llamacpp" or info.base_model != gateway.llamacpp.base_model:
        return []
    try:
        return [["served on (llama.cpp base)", llamacpp_base_gguf(registry).name]]
    except OfflineModelMissing:
        return []


@app.command()
def diff(a: str, b: str, as_json: bool = JSON) -> None:
    """Two versions' config and scores side by side; differing rows are marked."""
    rows = _registry().diff(a, b)
    emit(rows, as_json, lambda: table(f"{a} vs {b}", ["", "field", a, b],
                                      [["" if r.same else "≠", r.field, r.a, r.b] for r in rows]))


@app.command("output-check")
def output_check(
    ref: str = typer.Argument(..., help="Version (name@N) whose answers the gateway checks."),
    json_output: bool = typer.Option(False, "--json-output", help="Answers must parse as JSON."),
    labels: str | None = typer.Option(None, help="Comma-separated: answers must be one of these labels."),
    clear: bool = typer.Option(False, help="Remove the version's check."),
    reason: str | None = typer.Option(None),
) -> None:
    """Declare what a version's answers must look like: the gateway checks each answer it serves and
    rollouts compare the pass rate per arm, with no feedback needed."""
    check = None if clear else OutputCheck(json_output=json_output,
                                           labels=[x.strip() for x in labels.split(",")] if labels else [])
    info = _registry().set_output_check(ref, check, reason=reason)
    console.print(f"{info.ref}: " + (f"answers must be checked: {check.describe()}" if check else "no output check"))


@eval_app.command("add")
def eval_add(ref: str = typer.Argument(..., help="Version scored (name@N)."),
             scores: Path = typer.Argument(..., help='JSON: {"suite", "metrics": {...}, "sample_count", '
                                                       '"eval_data_sha256", "higher_is_better": {...}}'),
             as_json: bool = JSON) -> None:
    """Record a version's scores from a JSON file."""
    added = _registry().add_eval(EvalInput.model_validate_json(scores.read_text()), ref=ref)
    emit(added, as_json, lambda: console.print(f"recorded {len(added)} score(s) for {ref}"))


@eval_app.command("add-baseline")
def eval_add_baseline(base: str = typer.Argument(..., help="Base model id."),
                      scores: Path = typer.Argument(..., help="JSON file, as for `eval add`."),
                      prompted: bool = typer.Option(False, help="Scores of the prompted base (few-shot)."),
                      subject: str = typer.Option("base", help="base, prompted_base, majority or classical."),
                      as_json: bool = JSON) -> None:
    """Record a baseline's scores (the base model's by default): what adapters are compared with."""
    if subject not in BASELINES:
        raise InvalidInput(f"--subject is one of {', '.join(BASELINES)}, not {subject!r}")
    subject = "prompted_base" if prompted else subject
    added = _registry().add_eval(EvalInput.model_validate_json(scores.read_text()), base=base, subject=subject)
    emit(added, as_json, lambda: console.print(f"recorded {len(added)} {subject} score(s) for {base}"))


@alias_app.command("set")
def alias_set(ref: str, alias: str, reason: str | None = typer.Option(None)) -> None:
    """Point an alias at a version (gated aliases such as production need `promote`)."""
    info = _registry().set_alias(ref, alias, reason=reason)
    console.print(f"{info.name}@{alias} -> {info.ref}")


@alias_app.command("rm")
def alias_rm(name: str, alias: str, reason: str | None = typer.Option(None)) -> None:
    """Remove an alias."""
    _registry().remove_alias(name, alias, reason=reason)
    console.print(f"removed {name}@{alias}")


@alias_app.command("history")
def alias_history(name: str, alias: str | None = typer.Argument(None), as_json: bool = JSON) -> None:
    """Every move of an adapter's aliases."""
    changes = _registry().alias_history(name, alias)
    emit(changes, as_json, lambda: table(f"{name} alias history", ["when", "alias", "from", "to", "action", "who", "reason"],
                                         [[c.created_at.strftime("%Y-%m-%d %H:%M:%S"), c.alias, c.from_version,
                                           c.to_version, c.action, c.actor, c.reason] for c in changes]))


@app.command()
def promote(
    ref: str = typer.Argument(..., help="Version to promote (name@N or name@alias)."),
    to: str = typer.Option("production", "--to", help="Alias to move."),
    force: bool = typer.Option(False, help="Bypass a refusing gate (needs --reason; audited)."),
    reason: str | None = typer.Option(None),
    commercial: bool | None = typer.Option(None, "--commercial/--non-commercial",
                                           help="Declared use for the licence check (default: settings)."),
    mau: int | None = typer.Option(None, help="Declared monthly active users (default: settings)."),
    dry_run: bool = typer.Option(False, help="Only report what the gate decides."),
    as_json: bool = JSON,
) -> None:
    """Move an alias (production by default) to a version if the promotion gate passes."""
    registry = _registry()
    if dry_run:
        report = registry.check_gate(ref, to=to, commercial=commercial, mau=mau)
    else:
        report = registry.promote(ref, to=to, force=force, reason=reason, commercial=commercial, mau=mau)

    def render() -> None:
        for check in report.checks:
            console.print(f"  [green]✓[/green] {check}")
        for problem in report.reasons:
            console.print(f"  [red]✗[/red] {problem}")
        for note in report.notes:
            console.print(f"  [yellow]![/yellow] {note}")
        verdict = "would pass" if dry_run and report.passed else "would be refused" if dry_run else (
            "promoted" if report.passed else "promoted by force")
        console.print(f"{report.target} -> {to}: {verdict}")

    emit(report, as_json, render)


@app.command()
def rollback(name: str, alias: str = typer.Option("production", "--alias"),
             reason: str | None = typer.Option(None)) -> None:
    """Point production (or --alias) back at the version it pointed to before."""
    info = _registry().rollback(name, alias=alias, reason=reason)
    console.print(f"{name}@{alias} -> {info.ref}")


@app.command()
def export(ref: str, destination: Path) -> None:
    """Write a version's adapter files (sha256-checked) and its record to a folder."""
    path = _registry().export(ref, destination)
    console.print(f"exported {ref} to {path}")


@app.command()
def gc(dry_run: bool = typer.Option(False, help="Only list what would go."),
       grace: float = typer.Option(3600, help="Spare artifacts stored less than this many seconds ago."),
       as_json: bool = JSON) -> None:
    """Remove stored artifacts that no version references."""
    report = _registry().gc(dry_run=dry_run, grace_s=grace)
    verb = "would remove" if dry_run else "removed"
    emit(report, as_json, lambda: console.print(
        f"{verb} {len(report.removed)} artifact(s), {report.freed_bytes:,} bytes; {report.kept} referenced"))


@app.command("migrate-store")
def migrate_store(url: str = typer.Argument(..., help="The object store to move to: s3://bucket/prefix."),
                  endpoint_url: str | None = typer.Option(None, help="An S3-compatible server (SeaweedFS, MinIO)."),
                  region: str | None = typer.Option(None), as_json: bool = JSON) -> None:
    """Copy every stored artifact to an object store and check each copy's sha256; then set
    store.url (and store.endpoint_url) to it."""
    registry = _registry()
    target = registry.settings.store.model_copy(update={"url": url, "endpoint_url": endpoint_url, "region": region})
    report = registry.migrate_store(StoreSettings.model_validate(target.model_dump()))
    emit(report, as_json, lambda: console.print(
        f"copied {report.artifacts} artifact(s), {report.bytes:,} bytes, and {report.versions} version record(s) "
        f"to {report.target} in {report.seconds:g} s, each read back and sha256-checked; now set "
        f"LORAGATE_STORE__URL={report.target}" + (f" and LORAGATE_STORE__ENDPOINT_URL={endpoint_url}" if endpoint_url else "")))


@app.command()
def audit(target: str | None = typer.Option(None, help="Only events whose target starts with this."),
          limit: int = typer.Option(50), as_json: bool = JSON) -> None:
    """The audit log: who changed what, when, before and after."""
    entries = _registry().audit_log(target=target, limit=limit)
    emit(entries, as_json, lambda: table("audit log", ["when", "who", "action", "target", "outcome", "before", "after", "reason"],
                                         [[e.created_at.strftime("%Y-%m-%d %H:%M:%S"), e.actor, e.action, e.target,
                                           e.outcome, json.dumps(e.before)[:60], json.dumps(e.after)[:60], e.reason]
                                          for e in entries]))


@app.command()
def contamination(data_sha256: str = typer.Argument(..., help="sha256 of the training data checked."),
                  passed: bool = typer.Option(..., "--passed/--failed"),
                  method: str = typer.Option("manual", help="How the check was made."),
                  details: str | None = typer.Option(None, help="JSON with the check's findings.")) -> None:
    """Record a contamination check (the trainer does this itself)."""
    _registry().record_contamination_check(
        data_sha256, passed=passed, method=method, details=json.loads(details) if details else None)
    console.print(f"recorded contamination check for {data_sha256[:12]}: {'passed' if passed else 'failed'}")


@app.command()
def publish(ref: str, repo: str = typer.Option(..., "--repo", help="Hub repo id, org/name."),
            public: bool = typer.Option(False, help="Create the repo public (default private).")) -> None:
    """Upload a version to the Hugging Face Hub with a generated model card."""
    from .hub import publish as publish_version

    url = publish_version(_registry(), ref, repo, private=not public)
    console.print(f"published {ref} to {url}")


@app.command()
def pull(repo: str = typer.Argument(..., help="Hub repo id, org/name."),
         name: str | None = typer.Option(None, help="Adapter name (default: the repo's name)."),
         base: str | None = typer.Option(None, help="Base model id (default: from the model card)."),
         licence: str | None = typer.Option(None, help="Licence id (default: from the model card)."),
         revision: str | None = typer.Option(None)) -> None:
    """Register an adapter from the Hugging Face Hub."""
    from .hub import pull as pull_adapter

    info = pull_adapter(_registry(), repo, name=name, base=base, licence=licence, revision=revision)
    console.print(f"registered {info.ref} from {repo}")


@base_app.command("add")
def base_add(model_id: str, source: str = typer.Option(..., help="Local path or Hub id of the weights."),
             licence: str = typer.Option("apache-2.0"), hub_id: str | None = typer.Option(None),
             folder: Path | None = typer.Option(None, help="HF model folder to read config.json from.")) -> None:
    """Register a base model."""
    record = _registry().add_base_model(model_id, source=source, licence=licence, hub_id=hub_id, folder=folder)
    console.print(f"added base model {record.id} ({record.architecture or 'architecture unknown'})")


@base_app.command("list")
def base_list(as_json: bool = JSON) -> None:
    """Registered base models."""
    bases = _registry().base_models()
    emit(bases, as_json, lambda: table(
        "base models", ["id", "architecture", "licence", "source", "hub id", "serving GGUF (llama.cpp)"],
        [[b.id, b.architecture, b.licence_id, b.source, b.hub_id,
          f"{b.serving_gguf['type']}: {b.serving_gguf.get('path') or 'sha256 ' + b.serving_gguf['sha256'][:12]}"
          if b.serving_gguf else "-"] for b in bases]))


@licence_app.command("list")
def licence_list(as_json: bool = JSON) -> None:
    """Known licences and their terms."""
    licences = _registry().licences()
    emit(licences, as_json, lambda: table("licences", ["id", "commercial", "MAU cap", "derivatives", "attribution",
                                                       "acceptable use"],
                                          [[li.id, li.commercial_use, li.mau_cap or "-", li.derivatives_redistribution,
                                            li.attribution_required, "; ".join(li.acceptable_use)] for li in licences]))


@licence_app.command("add")
def licence_add(licence_id: str, name: str = typer.Option(...),
                commercial: bool = typer.Option(..., "--commercial/--non-commercial"),
                mau_cap: int | None = typer.Option(None),
                acceptable_use: list[str] = typer.Option([], help="Repeat for each restriction."),
                derivatives: bool = typer.Option(True, "--derivatives/--no-derivatives"),
                attribution: bool = typer.Option(False, "--attribution/--no-attribution")) -> None:
    """Add custom licence terms."""
    _registry().add_licence(Licence(id=licence_id, name=name, commercial_use=commercial, mau_cap=mau_cap,
                                    acceptable_use=acceptable_use, derivatives_redistribution=derivatives,
                                    attribution_required=attribution))
    console.print(f"added licence {licence_id}")
