"""Publish and pull. The Hub is unreachable from these machines, so an HfApi subclass stands in
for its network calls (create_repo, upload_folder, snapshot_download) and keeps what it is sent:
the card is parsed back with huggingface_hub's own ModelCard, and the uploaded files are checked."""

import shutil
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from loragate.registry import EvalInput, InvalidInput
from loragate.registry.hub import publish, pull

from .conftest import BASE_ID, HUB_ID


class LocalHub(HfApi):
    """Repos as folders under ``root``; everything else is the real HfApi."""

    def __init__(self, root: Path):
        super().__init__(token=False)
        self.root = root
        self.created: list[tuple[str, bool]] = []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        self.created.append((repo_id, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/local"

    def snapshot_download(self, repo_id, *, revision=None, local_dir=None, allow_patterns=None, **kwargs):
        source = self.root / repo_id
        for path in source.rglob("*"):
            if path.is_file() and (allow_patterns is None or path.name in allow_patterns):
                target = Path(local_dir) / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        return str(local_dir)


@pytest.fixture
def hub(tmp_path):
    return LocalHub(tmp_path / "hub")


@pytest.fixture
def scored(registry, adapter_factory):
    registry.register("support", adapter_factory(), base=BASE_ID, training_data_sha256="t" * 64, licence="llama3")
    registry.add_eval(EvalInput(suite="support-qa", metrics={"exact_match": 0.71, "rouge_l": 0.5}, sample_count=200,
                                eval_data_sha256="e" * 64), ref="support@1")
    return registry


def test_publish_uploads_adapter_and_a_card_the_hub_can_parse(scored, hub):
    url = publish(scored, "support@1", "acme/support-lora", api=hub)
    assert url.endswith("/commit/local") and hub.created == [("acme/support-lora", True)]
    repo = hub.root / "acme/support-lora"
    assert sorted(p.name for p in repo.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "loragate-version.json"]
    stored = scored.artifact_path("support@1") / "adapter_model.safetensors"
    assert (repo / "adapter_model.safetensors").read_bytes() == stored.read_bytes()

    card = ModelCard.load(repo / "README.md")
    assert card.data.base_model == HUB_ID and card.data.license == "llama3" and card.data.library_name == "peft"
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("support-qa", "exact_match"): 0.71, ("support-qa", "rouge_l"): 0.5}
    assert "t" * 64 in card.text and scored.get("support@1").artifact_sha256 in card.text
    assert scored.audit_log(target="support@1")[-1].action == "publish"


def test_custom_licence_is_published_as_other(registry, adapter_factory, hub):
    from loragate.registry.models import Licence

    registry.add_licence(Licence(id="acme-eula", name="ACME EULA", commercial_use=True))
    registry.register("x", adapter_factory(), base=BASE_ID, licence="acme-eula")
    publish(registry, "x@1", "acme/x", api=hub)
    card = ModelCard.load(hub.root / "acme/x/README.md")
    assert (card.data.license, card.data.license_name) == ("other", "acme-eula")


def test_pull_registers_with_base_and_licence_from_the_card(scored, hub):
    publish(scored, "support@1", "acme/support-lora", api=hub)
    pulled = pull(scored, "acme/support-lora", name="support-copy", api=hub)
    original = scored.get("support@1")
    assert pulled.ref == "support-copy@1" and pulled.base_model == BASE_ID and pulled.licence == "llama3"
    assert pulled.artifact_sha256 == original.artifact_sha256  # the same bytes came back
    assert "acme/support-lora" in pulled.notes


def test_pull_of_an_unknown_base_is_refused(scored, hub):
    publish(scored, "support@1", "acme/support-lora", api=hub)
    card = hub.root / "acme/support-lora/README.md"
    card.write_text(card.read_text().replace(HUB_ID, "mistralai/Mistral-7B-v0.1"))
    with pytest.raises(InvalidInput, match="not registered"):
        pull(scored, "acme/support-lora", api=hub)
    assert [v.ref for v in scored.list_versions()] == ["support@1"]
