"""The registry on an S3-compatible object store: SeaweedFS on 127.0.0.1 (a real server with SigV4,
checksums and conditional writes), with the registry's database on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest

from loragate.registry import ArtifactCorrupt, Conflict, Registry, StoreUnavailable
from loragate.registry.object_store import S3ArtifactStore
from loragate.registry.vllm_resolver import StoreResolver
from loragate.settings import Settings, StoreSettings

from .conftest import BASE_ID, HUB_ID, run_cli
from .gateway_server import dead_port
from .object_store_server import BUCKET


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def store_env(seaweedfs, prefix, monkeypatch) -> dict[str, str]:
    env = seaweedfs.env(prefix)
    for key, value in seaweedfs.credentials.items():
        monkeypatch.setenv(key, value)  # boto3 reads them as AWS tools do
    return env


def s3_settings(seaweedfs, prefix: str, **more) -> StoreSettings:
    return StoreSettings(url=f"s3://{BUCKET}/{prefix}", endpoint_url=seaweedfs.endpoint, **more)


@pytest.fixture
def s3_registry(tmp_path, database_url, base_folder, seaweedfs, prefix, store_env) -> Registry:
    registry = Registry(Settings(home=tmp_path / "home", database_url=database_url, user="tester",
                                 store=s3_settings(seaweedfs, prefix)))
    registry.add_base_model(BASE_ID, source=str(base_folder), hub_id=HUB_ID, folder=base_folder)
    return registry


def elsewhere(registry: Registry, tmp_path: Path, **store) -> Registry:
    """The same registry seen from another machine: same database and bucket, an empty local cache."""
    settings = registry.settings.model_copy(update={
        "home": tmp_path / f"other-{uuid.uuid4().hex[:6]}",
        "store": registry.settings.store.model_copy(update=store)})
    return Registry(settings)


def keys(seaweedfs, prefix: str) -> dict[str, bytes]:
    client = seaweedfs.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


def test_versions_are_stored_by_sha256_and_read_back_verified_on_another_machine(
        s3_registry, adapter_factory, seaweedfs, prefix, tmp_path):
    folder = adapter_factory(seed=1)
    info = s3_registry.register("support", folder, base=BASE_ID)
    objects = keys(seaweedfs, prefix)
    for path in folder.iterdir():  # every file under the sha256 of its bytes
        data = path.read_bytes()
        assert objects[f"blobs/sha256/{hashlib.sha256(data).hexdigest()}"] == data
    manifest = objects[f"manifests/sha256/{info.artifact_sha256}.json"]
    assert hashlib.sha256(json.dumps([[e["path"], e["sha256"], e["size"]] for e in json.loads(manifest)],
                                     separators=(",", ":")).encode()).hexdigest() == info.artifact_sha256
    assert json.loads(objects["versions/support/1.json"]) == {
        "name": "support", "version": 1, "sha256": info.artifact_sha256, "base_model": BASE_ID}

    other = elsewhere(s3_registry, tmp_path)
    fetched = other.artifact_path("support@1")
    assert fetched.is_relative_to(other.settings.store_cache_dir)
    assert {p.name: p.read_bytes() for p in fetched.iterdir()} == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert other.get("support@1").artifact_sha256 == info.artifact_sha256  # `registry show`
    exported = other.export("support@1", tmp_path / "exported")
    assert (exported / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()


def test_gc_removes_unreferenced_artifacts_and_their_blobs(s3_registry, adapter_factory, seaweedfs, prefix):
    kept = s3_registry.register("support", adapter_factory(seed=1), base=BASE_ID)
    orphan = s3_registry.store.put(adapter_factory(seed=2))  # stored, never recorded (a crashed register)
    assert s3_registry.gc(grace_s=3600).removed == []  # too fresh: a concurrent register may be committing it
    report = s3_registry.gc(grace_s=0)
    assert report.removed == [orphan.sha256]
    left = keys(seaweedfs, prefix)
    assert f"manifests/sha256/{orphan.sha256}.json" not in left
    assert f"manifests/sha256/{kept.artifact_sha256}.json" in left
    kept_blobs = {e.sha256 for e in s3_registry.store.manifest(kept.artifact_sha256)}
    assert {k.removeprefix("blobs/sha256/") for k in left if k.startswith("blobs/")} == kept_blobs


def test_writes_are_create_only_and_checked_by_the_server(seaweedfs, prefix, store_env, tmp_path):
    store = S3ArtifactStore(s3_settings(seaweedfs, prefix), tmp_path / "cache")
    good = b"the right bytes"
    sha = hashlib.sha256(good).hexdigest()
    with pytest.raises(ArtifactCorrupt, match="do not match their SHA-256"):
        store._create(f"{prefix}/blobs/sha256/{sha}", b"other bytes", sha)  # the server checks what we send
    store._create(f"{prefix}/blobs/sha256/{sha}", good, sha)
    store._create(f"{prefix}/blobs/sha256/{sha}", b"a second writer", hashlib.sha256(b"a second writer").hexdigest())
    assert keys(seaweedfs, prefix) == {f"blobs/sha256/{sha}": good}  # the first write stands


def test_a_large_file_goes_up_in_parts_and_an_interrupted_upload_resumes(seaweedfs, prefix, store_env, tmp_path):
    store = S3ArtifactStore(s3_settings(seaweedfs, prefix, part_size_mb=5), tmp_path / "cache")
    folder = tmp_path / "merged"
    folder.mkdir()
    data = hashlib.sha256(b"seed").digest() * (12 * (1 << 20) // 32 + 7)  # 12 MiB and a bit: three parts
    (folder / "model.gguf").write_bytes(data)
    key = f"{prefix}/blobs/sha256/{hashlib.sha256(data).hexdigest()}"
    # A first upload that died after its first part.
    client = seaweedfs.client()
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=key, ChecksumAlgorithm="SHA256")["UploadId"]
    first = data[:5 << 20]
    client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=first, ChecksumAlgorithm="SHA256",
                       ChecksumSHA256=base64.b64encode(hashlib.sha256(first).digest()).decode())
    sent = []
    upload_part = store.client.upload_part
    store.client.upload_part = lambda **kwargs: sent.append(kwargs["PartNumber"]) or upload_part(**kwargs)

    stored = store.put(folder)
    assert sent == [2, 3]  # part 1 was already there
    assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    assert not client.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads")
    shutil.rmtree(tmp_path / "cache")
    assert (store.open(stored.sha256) / "model.gguf").read_bytes() == data


def test_a_corrupt_or_missing_object_is_refused_and_names_the_version(
        s3_registry, adapter_factory, seaweedfs, prefix, tmp_path):
    info = s3_registry.register("support", adapter_factory(seed=1), base=BASE_ID)
    weights = next(e for e in s3_registry.store.manifest(info.artifact_sha256) if e.path.endswith(".safetensors"))
    key = f"{prefix}/blobs/sha256/{weights.sha256}"
    client = seaweedfs.client()
    original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=key, Body=original[:-1] + bytes([original[-1] ^ 1]))  # a flipped bit

    with pytest.raises(ArtifactCorrupt, match=r"support@1: .*adapter_model.safetensors .*fails its sha256"):
        elsewhere(s3_registry, tmp_path).artifact_path("support@1")
    home = tmp_path / "cli-home"
    done = run_cli(home, "registry", "export", "support@1", str(tmp_path / "out"), expect=2,
                   env={"LORAGATE_DATABASE_URL": s3_registry.settings.database_url,
                        **seaweedfs.env(prefix)})
    assert "support@1" in done.stderr and "sha256" in done.stderr and "Traceback" not in done.stderr

    client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(ArtifactCorrupt, match=r"support@1: .*is missing from s3://"):
        elsewhere(s3_registry, tmp_path).artifact_path("support@1")
    # The machine that registered it still has its verified copy, and a damaged cached copy is fetched again.
    assert s3_registry.artifact_path("support@1").is_dir()


def test_a_damaged_cached_copy_is_fetched_again(s3_registry, adapter_factory):
    info = s3_registry.register("support", adapter_factory(seed=1), base=BASE_ID)
    cached = s3_registry.artifact_path("support@1") / "adapter_config.json"
    cached.chmod(0o644)
    cached.write_text("{}")
    assert json.loads((s3_registry.artifact_path("support@1") / "adapter_config.json").read_text()) != {}
    assert s3_registry.get("support@1").artifact_sha256 == info.artifact_sha256


def test_the_cache_stays_under_its_bound(s3_registry, adapter_factory, tmp_path):
    first = s3_registry.register("support", adapter_factory(seed=1), base=BASE_ID)
    second = s3_registry.register("support", adapter_factory(seed=2), base=BASE_ID)
    one_artifact = first.artifact_size * 1.5 / (1 << 30)
    other = elsewhere(s3_registry, tmp_path, cache_max_gb=one_artifact)
    other.artifact_path("support@1")
    other.artifact_path("support@2")
    assert other.store.cache.digests() == [second.artifact_sha256]  # the least recently used went


def test_what_an_engine_resolved_stays_in_its_cache(s3_registry, adapter_factory, tmp_path):
    """vLLM reloads a resolved adapter from its path without asking again: the bound never evicts it."""
    first = s3_registry.register("support", adapter_factory(seed=1), base=BASE_ID)
    second = s3_registry.register("support", adapter_factory(seed=2), base=BASE_ID)
    settings = s3_registry.settings.store.model_copy(update={"cache_max_gb": first.artifact_size * 1.5 / (1 << 30)})
    engine = S3ArtifactStore(settings, tmp_path / "engine-cache")
    StoreResolver(engine, BASE_ID).find("support@1")
    engine.open(second.artifact_sha256)
    assert set(engine.cache.digests()) == {first.artifact_sha256, second.artifact_sha256}


def test_a_store_shared_by_two_registries_refuses_a_conflicting_version_record(s3_registry, adapter_factory, tmp_path,
                                                                              database_url):
    s3_registry.register("support", adapter_factory(seed=1), base=BASE_ID)
    other = Registry(Settings(home=tmp_path / "other", database_url=f"sqlite:///{tmp_path / 'other.db'}",
                              store=s3_registry.settings.store))
    other.add_base_model(BASE_ID, source=str(s3_registry.base_model_folder(BASE_ID)), hub_id=HUB_ID,
                         folder=s3_registry.base_model_folder(BASE_ID))
    info = other.register("support", adapter_factory(seed=2), base=BASE_ID)  # its support@1: other files
    with pytest.raises(Conflict, match="another registry uses this prefix"):
        other.publish_version(info)
    assert s3_registry.store.read_version("support", 1).sha256 == s3_registry.get("support@1").artifact_sha256


def test_gc_keeps_the_serving_gguf_it_stores(s3_registry, tmp_path):
    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    s3_registry.set_serving_gguf(BASE_ID, gguf, out_type="q8_0")
    assert s3_registry.gc(grace_s=0).removed == []
    assert elsewhere(s3_registry, tmp_path).serving_gguf(BASE_ID).read_bytes() == gguf.read_bytes()


def test_the_store_down_is_a_clear_error_and_loses_nothing(s3_registry, adapter_factory, seaweedfs, prefix, tmp_path):
    s3_registry.register("support", adapter_factory(seed=1), base=BASE_ID)
    dead = dead_port()
    try:
        down = {"LORAGATE_DATABASE_URL": s3_registry.settings.database_url, **seaweedfs.env(prefix),
                "LORAGATE_STORE__ENDPOINT_URL": f"http://127.0.0.1:{dead.getsockname()[1]}",
                "LORAGATE_STORE__CONNECT_TIMEOUT_S": "1"}
        home = tmp_path / "cli-home"
        folder = adapter_factory(seed=2)
        done = run_cli(home, "registry", "register", "support", str(folder), "--base", BASE_ID, expect=2, env=down)
        assert "is unreachable" in done.stderr and "Traceback" not in done.stderr
        with pytest.raises(StoreUnavailable):
            elsewhere(s3_registry, tmp_path, endpoint_url=down["LORAGATE_STORE__ENDPOINT_URL"],
                      connect_timeout_s=1).artifact_path("support@1")
        listed = json.loads(run_cli(home, "registry", "list", "--json", env=down).stdout)
        assert [(v["name"], v["version"]) for v in listed] == [("support", 1)]  # nothing half-registered, nothing lost
    finally:
        dead.close()
    assert elsewhere(s3_registry, tmp_path).artifact_path("support@1").is_dir()  # back up: all there


def test_migrate_store_moves_every_artifact_and_checks_each(
        registry, adapter_factory, seaweedfs, prefix, store_env, tmp_path):
    local = [registry.register("support", adapter_factory(seed=seed), base=BASE_ID) for seed in (1, 2)]
    gguf = tmp_path / "lora"
    gguf.mkdir()
    (gguf / "adapter.gguf").write_bytes(b"GGUF not really")
    registry.add_artifact("support@2", gguf, kind="gguf-lora", type="f16")
    env = {"LORAGATE_DATABASE_URL": registry.settings.database_url}
    done = run_cli(registry.settings.home, "registry", "migrate-store", f"s3://{BUCKET}/{prefix}", "--endpoint-url",
                   seaweedfs.endpoint, "--json", env=env)
    report = json.loads(done.stdout)
    assert (report["artifacts"], report["versions"]) == (3, 2)
    assert report["target"] == f"s3://{BUCKET}/{prefix}"
    moved = elsewhere(registry, tmp_path, url=f"s3://{BUCKET}/{prefix}", endpoint_url=seaweedfs.endpoint)
    for info in local:
        assert moved.artifact_path(info.ref).is_dir()
    assert (moved.derived_artifact_path("support@2", kind="gguf-lora", type="f16") / "adapter.gguf").read_bytes() \
        == b"GGUF not really"
    assert registry.audit_log(target=f"s3://{BUCKET}/{prefix}")[0].action == "store.migrate"


def test_the_resolver_serves_only_versions_of_its_engines_base(s3_registry, adapter_factory, seaweedfs, tmp_path):
    """What vLLM's plugin answers, without vLLM: the verified folder, or None (not ours, another base,
    files that fail their sha256)."""
    s3_registry.register("support", adapter_factory(seed=1), base=BASE_ID)
    engine = S3ArtifactStore(s3_registry.settings.store, tmp_path / "engine-cache")
    folder = Path(StoreResolver(engine, BASE_ID).find("support@1"))
    assert folder.is_relative_to(tmp_path / "engine-cache")
    assert (folder / "adapter_config.json").read_bytes() == \
        (s3_registry.artifact_path("support@1") / "adapter_config.json").read_bytes()
    assert StoreResolver(engine, "Llama-3.2-1B").find("support@1") is None
    assert StoreResolver(engine, BASE_ID).find("support@9") is None
    assert StoreResolver(engine, BASE_ID).find("not-a-version") is None
    assert StoreResolver(engine, BASE_ID).find("../../etc/passwd@1") is None  # a name is never a path
    broken = s3_registry.register("support", adapter_factory(seed=2), base=BASE_ID)
    config = next(e for e in engine.manifest(broken.artifact_sha256) if e.path == "adapter_config.json")
    seaweedfs.client().put_object(Bucket=BUCKET, Key=f"{s3_registry.settings.store.url.split('/', 3)[3]}"
                                  f"/blobs/sha256/{config.sha256}", Body=b"{}")
    assert StoreResolver(engine, BASE_ID).find("support@2") is None


@pytest.mark.model
def test_the_llamacpp_gateway_fetches_its_base_and_loras_from_the_store(
        hf_base, seaweedfs, prefix, store_env, tmp_path):
    """A gateway on a machine that has only the database URL and the bucket: the GGUF LoRA and the
    serving base GGUF come from the object store, verified, into its own cache."""
    import openai

    from loragate.offline_base import smollm2_gguf

    from .conftest import gguf_lora, peft_adapter
    from .gateway_server import GatewayServer

    home = tmp_path / "registering-machine"
    registry = Registry(Settings(home=home, user="tester", store=s3_settings(seaweedfs, prefix)))
    registry.add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID, folder=hf_base)
    ref = registry.register("support", peft_adapter(hf_base, tmp_path / "a1", ["q_proj", "v_proj"], seed=1),
                            base=BASE_ID).ref
    gguf_lora(registry, ref)
    base = tmp_path / "base"
    base.mkdir()
    registry.set_serving_gguf(BASE_ID, Path(shutil.copy(smollm2_gguf(), base)), out_type="q4_1")
    assert registry.base_models()[0].serving_gguf.keys() >= {"artifact", "file", "sha256"}

    serving = tmp_path / "serving-machine"
    gateway = GatewayServer(serving, LORAGATE_DATABASE_URL=f"sqlite:///{home / 'registry.db'}", **store_env).start()
    try:
        answer = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none").chat.completions.create(
            model=ref, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    finally:
        gateway.stop()
    assert answer.model == ref and answer.choices[0].message.content
    cached = Registry(Settings(home=serving, database_url=f"sqlite:///{home / 'registry.db'}",
                               store=s3_settings(seaweedfs, prefix))).store.cache.digests()
    lora = next(a for a in registry.derived_artifacts(ref) if a.kind == "gguf-lora")
    assert {lora.sha256, registry.base_models()[0].serving_gguf["artifact"]} <= set(cached)
