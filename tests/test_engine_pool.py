"""An engine pool on real engines: three `loragate engine serve` replicas (llama.cpp) with one
adapter slot each, more adapters than slots, behind one `loragate gateway serve` whose backend is
the pool; the replicas announce themselves in the registry's database. What the pool believes is
checked against what each engine says it holds (its own /v1/models)."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from loragate.registry import Registry
from loragate.settings import Settings

from .conftest import gguf_lora, peft_adapter, serving_home
from .gateway_server import EngineServer, GatewayServer
from .kill_under_traffic import Traffic, assert_nothing_lost, kill_under_traffic

pytestmark = pytest.mark.model
pytest.importorskip("xllamacpp")

FAST = {"LORAGATE_ENGINE__HEARTBEAT_S": "0.5", "LORAGATE_GATEWAY__LLAMACPP__MAX_LORAS": "1",
        "LORAGATE_GATEWAY__LLAMACPP__SLOTS": "2"}


class Pool:
    def __init__(self, home, engines: int):
        self.home = home
        self.engines = [EngineServer(home, **FAST).start() for _ in range(engines)]
        self.gateway = GatewayServer(home, LORAGATE_GATEWAY__BACKEND="pool",
                                     LORAGATE_GATEWAY__POOL__HEALTH_INTERVAL_S="0.5", **FAST).start()

    def replicas(self) -> dict[str, dict]:
        engines = httpx.get(f"{self.gateway.url}/health", timeout=10).json()["engines"]["pool"]["replicas"]
        return {r["url"]: r for r in engines}

    def wait_for(self, condition, what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"{what}: {self.replicas()}"
            time.sleep(0.2)

    def stop(self) -> None:
        for server in [self.gateway, *self.engines]:
            if server.process is not None and server.process.poll() is None:
                server.stop()


def held(engine: EngineServer) -> list[str]:
    """What the engine itself says it holds."""
    models = httpx.get(f"{engine.url}/v1/models", timeout=10).json()["data"]
    return [m["id"] for m in models if m["parent"]]


def chat(url: str, model: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **body})


def metric(server: GatewayServer, name: str) -> dict[str, float]:
    """A metric's samples by their label text."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {line.split("{", 1)[1].rsplit("}", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(name + "{")}


@pytest.fixture(scope="module")
def pool(tmp_path_factory, hf_base):
    home = serving_home(tmp_path_factory, hf_base, versions=4)
    pool = Pool(home, engines=3)
    try:
        pool.wait_for(lambda: sum(r["up"] for r in pool.replicas().values()) == 3, "three replicas up")
        yield pool
    finally:
        pool.stop()


def test_each_adapter_stays_on_the_replica_that_holds_it(pool):
    for _ in range(3):
        for version in (1, 2, 3):
            for _ in range(2):
                answer = chat(pool.gateway.url, f"support@{version}")
                assert answer.status_code == 200, answer.text
    holders = {engine.url: held(engine) for engine in pool.engines}
    assert sorted(a for adapters in holders.values() for a in adapters) == ["support@1", "support@2", "support@3"]
    loads = metric(pool.gateway, "loragate_pool_adapter_loads_total")
    assert sum(loads.values()) == 3, loads  # 18 requests, each adapter loaded once
    view = pool.replicas()
    assert {url: r["adapters"] for url, r in view.items()} == holders  # the pool's view is the engines' truth
    page = httpx.get(f"{pool.gateway.url}/ui/engines", timeout=10)  # the console shows the same
    assert page.status_code == 200
    for url, adapters in holders.items():
        assert f"<td>{url}</td><td>yes</td>" in page.text and f"<td>{adapters[0]}</td>" in page.text


def test_an_adapter_registered_after_start_is_loaded_on_demand_where_it_evicts_the_coldest(pool, hf_base, tmp_path):
    registry = Registry(Settings(home=pool.home, user="tester"))
    ref = registry.register("support", peft_adapter(hf_base, tmp_path / "a9", ["q_proj", "v_proj"], seed=9),
                            base="SmolLM2-135M-Instruct").ref
    gguf_lora(registry, ref)
    for version in (2, 3):  # support@1 is now the fleet's least recently used adapter
        assert chat(pool.gateway.url, f"support@{version}").status_code == 200
    answer = chat(pool.gateway.url, ref)
    assert answer.status_code == 200 and answer.headers["x-loragate-version"] == ref, answer.text
    holders = {engine.url: held(engine) for engine in pool.engines}
    assert sorted(a for adapters in holders.values() for a in adapters) == sorted(["support@2", "support@3", ref])
    evictions = metric(pool.gateway, "loragate_pool_adapter_evictions_total")
    assert [labels for labels in evictions if 'adapter="support@1"' in labels], evictions


def test_a_replica_that_joins_gets_traffic_and_one_that_stops_leaves(pool):
    for version in (2, 3, 4):  # one adapter in each replica's one slot
        assert chat(pool.gateway.url, f"support@{version}").status_code == 200
    assert sorted(a for engine in pool.engines for a in held(engine)) == ["support@2", "support@3", "support@4"]
    joined = EngineServer(pool.home, **FAST).start()
    pool.engines.append(joined)
    pool.wait_for(lambda: pool.replicas().get(joined.url, {}).get("up"), "the new replica up in the pool")
    # Every other slot is taken: a cold adapter goes where one is free.
    answer = chat(pool.gateway.url, "support@1")
    assert answer.status_code == 200, answer.text
    assert held(joined) == ["support@1"]
    decisions = metric(pool.gateway, "loragate_pool_routing_decisions_total")
    assert decisions.get(f'reason="free_slot",replica="{joined.url}"', 0) >= 1, decisions
    joined.stop()
    pool.engines.remove(joined)
    pool.wait_for(lambda: joined.url not in pool.replicas(), "the stopped replica gone from the pool")


def test_replicas_behind_a_dns_name_join_as_the_addresses_it_resolves_to(pool):
    """As with a Kubernetes headless Service: a gateway told only a name routes to what it resolves to,
    and a name that does not resolve leaves the pool serving."""
    engine = pool.engines[0]
    entry = f"http://localhost:{httpx.URL(engine.url).port}"
    with GatewayServer(pool.home, LORAGATE_GATEWAY__BACKEND="pool", LORAGATE_GATEWAY__POOL__DISCOVER="false",
                       LORAGATE_GATEWAY__POOL__DNS=json.dumps([entry, "http://no-such-engine.invalid:8000"]),
                       LORAGATE_GATEWAY__POOL__HEALTH_INTERVAL_S="0.5", **FAST) as gateway:
        def replicas() -> dict[str, dict]:
            listed = httpx.get(f"{gateway.url}/health", timeout=10).json()["engines"]["pool"]["replicas"]
            return {r["url"]: r for r in listed}

        pool.wait_for(lambda: replicas().get(engine.url, {}).get("up"), "the resolved replica up")
        assert {r["source"] for r in replicas().values()} == {entry}
        answer = chat(gateway.url, "support@1")
        assert answer.status_code == 200, answer.text
        assert "support@1" in held(engine)


def test_a_replica_killed_mid_traffic_loses_no_request_that_had_not_started_streaming(pool):
    """Streaming clients on three adapters while one replica is killed with SIGKILL: a request that had
    received no text is retried on another replica and answered; one that had (its replica died
    under it) ends with an error event. Each request is metered once."""
    victim = None

    def kill() -> None:
        nonlocal victim
        victim = next(e for e in pool.engines if held(e))
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()

    with Traffic(pool.gateway.url, ["support@1", "support@2", "support@3", "support@2"]) as traffic:
        at_kill = kill_under_traffic(traffic, kill)
    pool.engines.remove(victim)
    assert_nothing_lost(traffic, at_kill, Registry(Settings(home=pool.home)).engine)
    pool.wait_for(lambda: not pool.replicas().get(victim.url, {"up": False})["up"], "the killed replica down")
