"""Publish versions to, and pull adapters from, the Hugging Face Hub (through huggingface_hub)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .api import Registry
from .errors import InvalidInput
from .schemas import VersionInfo
from .store import safe_relative_path
from .validation import CONFIG_FILE, WEIGHTS_FILE

CARD_FILE = "README.md"
# Hub licence ids we can map one to one onto our presets.
_HUB_LICENCES = {"apache-2.0", "mit", "llama3", "gemma", "cc-by-nc-4.0"}


def model_card(info: VersionInfo, base_hub_id: str | None, repo_id: str) -> ModelCard:
    """A card whose YAML header the Hub indexes (base_model, licence, eval results)."""
    eval_results = [
        EvalResult(
            task_type="text-generation", dataset_type=e.suite, dataset_name=e.suite,
            metric_type=e.metric, metric_value=e.value,
            dataset_revision=e.eval_data_sha256,
        )
        for e in info.evals
    ]
    licence_fields = (
        {"license": info.licence} if info.licence in _HUB_LICENCES
        else {"license": "other", "license_name": info.licence}
    )
    data = ModelCardData(
        base_model=base_hub_id or info.base_model, library_name="peft", model_name=repo_id,
        tags=["lora", "loragate"], eval_results=eval_results or None, **licence_fields,
    )
    rows = "\n".join(
        f"| {e.subject} | {e.suite} | {e.metric} | {e.value:.4g} | {e.sample_count} | "
        f"{(e.eval_data_sha256 or '-')[:12]} |"
        for e in info.evals
    ) or "| - | - | - | - | - | - |"
    body = f"""
# {repo_id}

LoRA adapter `{info.ref}` for `{base_hub_id or info.base_model}`, published from the
[loragate](https://pypi.org/project/loragate/) registry.

| | |
|---|---|
| rank / alpha / dropout | {info.r} / {info.lora_alpha:g} / {info.lora_dropout:g} |
| target modules | {", ".join(info.target_modules)} |
| adapter sha256 (loragate manifest) | `{info.artifact_sha256}` |
| training data sha256 | `{info.training_data_sha256 or "not recorded"}` |
| parent version | {info.parent or "none"} |
| licence | {info.licence} |

## Evaluation

| subject | suite | metric | value | samples | eval data sha256 |
|---|---|---|---|---|---|
{rows}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def publish(registry: Registry, ref: str, repo_id: str, *, api: HfApi | None = None,
            private: bool = True) -> str:
    """Upload the version's adapter files with a generated model card; returns the commit URL."""
    api = api or HfApi()
    info = registry.get(ref)
    base = next(b for b in registry.base_models() if b.id == info.base_model)
    with tempfile.TemporaryDirectory(prefix="loragate-publish-") as staging:
        folder = registry.export(ref, Path(staging) / "adapter")
        model_card(info, base.hub_id, repo_id).save(folder / CARD_FILE)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=f"loragate: publish {info.ref}"
        )
    url = str(getattr(commit, "commit_url", commit))
    registry.record_event("publish", info.ref, after={"repo": repo_id, "commit": url})
    return url


def pull(registry: Registry, repo_id: str, *, name: str | None = None, base: str | None = None,
         licence: str | None = None, revision: str | None = None, api: HfApi | None = None) -> VersionInfo:
    """Download a peft adapter from the Hub and register it; base and licence come from its card
    unless given."""
    api = api or HfApi()
    with tempfile.TemporaryDirectory(prefix="loragate-pull-") as staging:
        local = Path(api.snapshot_download(
            repo_id, revision=revision, local_dir=staging,
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CARD_FILE],
        ))
        for path in local.rglob("*"):  # a hostile repo must not smuggle in paths or links
            safe_relative_path(path.relative_to(local).as_posix())
            if path.is_symlink():
                raise InvalidInput(f"{repo_id} holds a symlink ({path.name})")
        card = ModelCard.load(local / CARD_FILE) if (local / CARD_FILE).is_file() else None
        card_base = card.data.base_model if card else None
        base_id = base or _base_for(registry, card_base)
        card_licence = card.data.license if card else None
        licence_id = licence or (card_licence if card_licence in _HUB_LICENCES else None)
        adapter_folder = Path(staging) / "adapter"
        adapter_folder.mkdir()
        for filename in (CONFIG_FILE, WEIGHTS_FILE):
            if (local / filename).is_file():
                (adapter_folder / filename).write_bytes((local / filename).read_bytes())
        return registry.register(
            name or repo_id.rsplit("/", 1)[-1], adapter_folder, base=base_id, licence=licence_id,
            notes=f"pulled from the Hugging Face Hub: {repo_id}" + (f"@{revision}" if revision else ""),
        )


def _base_for(registry: Registry, card_base: str | list[str] | None) -> str:
    wanted = card_base[0] if isinstance(card_base, list) else card_base
    for record in registry.base_models():
        if wanted in (record.id, record.hub_id, record.source):
            return record.id
    raise InvalidInput(
        f"the card names base model {wanted!r}, which is not registered; add it or pass --base"
    )
