"""Shared fixtures: a registry on SQLite and on a real PostgreSQL server, adapter folders.

PostgreSQL: set LORAGATE_TEST_POSTGRES_URL to an admin URL (``.ci/start-postgres`` prints
one); each test gets a database of its own. Without it the PostgreSQL cases skip, unless
LORAGATE_TEST_REQUIRE_POSTGRES=1 (as in CI), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

# Under pytest-xdist (`-n 2`, as the README's test command runs) two workers share the two cores, so
# every process they start computes on one thread: engines with a thread per core each would spin
# against each other in their thread pools' barriers (a contract test took 398 s, not 6 s). Set
# before numpy, torch or any engine reads it.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                       "LORAGATE_GATEWAY__LLAMACPP__N_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})

import numpy as np
import pytest
from safetensors.numpy import save_file

from loragate.registry import Registry
from loragate.settings import Settings

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_ID = "SmolLM2-135M-Instruct"
# SmolLM2-135M's shapes, so synthetic adapters fit it exactly.
BASE_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
               "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "vocab_size": 49152}
_OUT_FEATURES = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576, "gate_proj": 1536,
                 "up_proj": 1536, "down_proj": 576}


def _postgres_admin_url() -> str | None:
    return os.environ.get("LORAGATE_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    admin = _postgres_admin_url()
    if not admin:
        if os.environ.get("LORAGATE_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail("LORAGATE_TEST_POSTGRES_URL is not set but PostgreSQL tests are required")
        pytest.skip("no PostgreSQL server (set LORAGATE_TEST_POSTGRES_URL)")
    import psycopg

    name = f"lg_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield admin.rsplit("/", 1)[0] + "/" + name
    from loragate.database import get_engine

    get_engine.cache_clear()  # release pooled connections before the drop
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, user="tester")


@pytest.fixture
def base_folder(tmp_path) -> Path:
    folder = tmp_path / "base-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BASE_CONFIG))
    return folder


@pytest.fixture
def registry(settings, base_folder) -> Registry:
    registry = Registry(settings)
    registry.add_base_model(BASE_ID, source=str(base_folder), hub_id=HUB_ID, folder=base_folder)
    return registry


def make_adapter(
    folder: Path,
    *,
    r: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    layers: int = 30,
    hidden: int = 576,
    seed: int = 0,
    base: str = HUB_ID,
    config_overrides: dict | None = None,
) -> Path:
    """A peft-format LoRA folder (same file names, key layout and config fields as peft saves)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for target in targets:
            block = "mlp" if target in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            in_features = 1536 if target == "down_proj" else hidden
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, in_features), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((_OUT_FEATURES[target], r), dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.05,
              "target_modules": list(targets), "base_model_name_or_path": base, "bias": "none"}
    config.update(config_overrides or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def adapter_factory(tmp_path):
    counter = iter(range(10_000))

    def factory(**kwargs) -> Path:
        n = next(counter)
        kwargs.setdefault("seed", n)
        return make_adapter(tmp_path / f"adapter-{n}", **kwargs)

    return factory


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Built once and reused across runs: the base is keyed by the GGUF's sha256."""
    return Path(os.environ.get("LORAGATE_TEST_CACHE", Path.home() / ".cache" / "loragate-tests")) / "models"


@pytest.fixture(scope="session")
def hf_base(models_dir) -> Path:
    pytest.importorskip("transformers")
    from loragate.offline_base import build_hf_base

    return build_hf_base(models_dir)


def run_cli(home: Path, *args: str, expect: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The installed ``loragate`` command on the registry in ``home`` (``env``: more variables)."""
    done = subprocess.run(["loragate", *args], env={**os.environ, "LORAGATE_HOME": str(home), "COLUMNS": "200", **(env or {})},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, (args, done.stdout, done.stderr)
    return done


def serving_home(tmp_path_factory, hf_base: Path, versions: int, database_url: str | None = None) -> Path:
    """A registry with the base model and support@1 (production) to @versions, each a real peft LoRA
    with its GGUF LoRA, ready for a gateway on either backend (default database: SQLite in the home)."""
    home = tmp_path_factory.mktemp("gateway") / "home"
    registry = Registry(Settings(home=home, user="tester", database_url=database_url))
    registry.add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID, folder=hf_base)
    scratch = tmp_path_factory.mktemp("adapters")
    for seed in range(1, versions + 1):
        folder = peft_adapter(hf_base, scratch / f"a{seed}", ["q_proj", "v_proj"], seed=seed)
        gguf_lora(registry, registry.register("support", folder, base=BASE_ID).ref)
    registry.promote("support@1", force=True, reason="test set-up: no eval data for random adapters")
    return home


def write_prepared(folder: Path, examples: list) -> Path:
    """A prepared dataset folder (as `data prepare` writes) whose every split is ``examples``."""
    from loragate.trainer.dataset import ContaminationReport, DedupReport, Manifest, write_examples

    splits = {name: write_examples(folder / f"{name}.jsonl", examples) for name in ("train", "validation", "test")}
    manifest = Manifest(source="test examples", source_sha256=splits["test"].sha256, format="messages", seed=0,
                        dedup=DedupReport(threshold=0.8), splits=splits,
                        contamination=ContaminationReport(passed=True, method="none", threshold=0.8,
                                                          exact_overlaps=0, near_overlaps=0))
    (folder / "manifest.json").write_text(manifest.model_dump_json())
    return folder


def shadow_pairs(settings: Settings, rollout_id: int, count: int, timeout_s: float = 60) -> list:
    """The rollout's shadow pairs, once there are ``count`` of them (or the time is up): copies are
    answered in the background, after the live request."""
    from sqlmodel import select

    from loragate.database import read_session
    from loragate.gateway.models import ShadowPair

    engine = Registry(settings).engine
    deadline = time.monotonic() + timeout_s
    while True:
        with read_session(engine) as session:
            pairs = list(session.exec(select(ShadowPair).where(ShadowPair.rollout_id == rollout_id)).all())
        if len(pairs) >= count or time.monotonic() > deadline:
            return pairs
        time.sleep(0.2)


# What a test starts, it stops: after the run no gateway, engine or browser it started is left.
_BEFORE = pytest.StashKey[set]()
_OURS = ("loragate", "llamacpp_engine", "vllm", "chromium", "webhook_receiver", "weed", "redis-server", "nginx")


def _our_processes() -> dict[int, str]:
    """Gateways, engines and browsers started by this run: descendants of pytest, or orphans."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile

    def ours(pid: int) -> bool:
        if parents.get(pid) == 1:
            return True  # an orphan: its parent (a gateway, say) died before it
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return {pid: command for pid, command in commands.items()
            if pid != os.getpid() and any(word in command for word in _OURS) and ours(pid)}


# The slowest files first (the README's per-file table), so that under xdist, which hands out whole
# files (`--dist loadfile`: a module's engine starts once), the two workers finish together rather than
# one running a long file alone at the end.
_SLOWEST_FIRST = ("test_gateway_vllm.py", "test_model.py", "test_quantize.py", "test_served_eval.py",
                  "test_cli.py", "test_trainer.py", "test_gateway.py", "test_ab_simulation.py",
                  "test_engine_pool.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")  # a pytest-xdist worker; the controller has no workerinput


def pytest_sessionstart(session):
    if not _is_worker(session.config):
        session.config.stash[_BEFORE] = set(_our_processes())


def pytest_sessionfinish(session):
    """Checked where the whole run ends (the xdist controller, after every worker has finished), so a
    process that one worker's test is still stopping is never blamed on another."""
    if _is_worker(session.config):
        return
    before = session.config.stash.get(_BEFORE, set())
    deadline = time.monotonic() + 15  # a process stopped by the last teardown may still be exiting
    while (left := {pid: c for pid, c in _our_processes().items() if pid not in before}) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"FAILED: the tests left processes running: {left}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """The run's S3-compatible object store (SeaweedFS on 127.0.0.1); tests keep apart by prefix."""
    from .object_store_server import SeaweedFS

    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


# Built once per test run and shared by every module (and by both xdist workers), keyed by what
# determines their content: peft adapters by (base, targets, seed), GGUF LoRAs by the sha256 of the
# adapter they convert.
_built: dict[str, Path] = {}


@pytest.fixture(scope="session", autouse=True)
def _build_cache(tmp_path_factory, request) -> None:
    base = tmp_path_factory.getbasetemp()
    _built["root"] = (base.parent if _is_worker(request.config) else base) / "built-once"
    _built["root"].mkdir(exist_ok=True)


def built_once(key: str, build) -> Path:
    """The folder ``build(folder)`` fills for ``key``, built by the first caller of the run (others
    wait on a file lock) and published with a rename, so no one sees half a folder."""
    from filelock import FileLock

    cached = _built["root"] / key
    with FileLock(f"{cached}.lock"):
        if not cached.is_dir():
            staging = cached.with_name(cached.name + ".tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            build(staging)
            staging.rename(cached)
    return cached


def peft_adapter(base_dir: Path, out: Path, targets: list[str], *, seed: int = 0) -> Path:
    """A real peft LoRA on the real base; non-zero B, so it visibly changes the output. Copied into
    ``out`` from the run's cache (built on first use)."""

    def build(folder: Path) -> None:
        import peft
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(model, config).save_pretrained(folder)

    cached = built_once(f"peft-{base_dir.name}-{'-'.join(sorted(targets))}-seed{seed}", build)
    return Path(shutil.copytree(cached, out))


def gguf_lora(registry: Registry, ref: str) -> None:
    """``convert_lora_to_gguf`` (llama.cpp's converter, F16), once per adapter content: a version whose
    adapter was converted before gets the same file registered as its GGUF LoRA."""
    from loragate.quantize.lora_gguf import FILENAME, KIND, convert_lora_to_gguf, lora_gguf_path

    converted = False

    def build(folder: Path) -> None:
        nonlocal converted
        convert_lora_to_gguf(registry, ref)
        converted = True
        shutil.copy2(lora_gguf_path(registry, ref), folder / FILENAME)

    cached = built_once(f"gguf-lora-{registry.get(ref).artifact_sha256}", build)
    if not converted:
        registry.add_artifact(ref, cached, kind=KIND, type="f16")
