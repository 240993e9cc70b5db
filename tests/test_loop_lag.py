"""The gateway's event loop never stalls: every request waits on it. Under a steady load, with every
background job running (the webhook sender delivering, a shadow rollout's copies answered, a canary
rollout evaluated after each meter flush, the meter writing), the loop's own measure of how late it
runs (``loragate_event_loop_lag_seconds``) sees no stall over 50 ms, on a real gateway with the
llama.cpp backend."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from loragate.gateway.rollouts import RolloutService
from loragate.registry import Registry, Webhooks
from loragate.settings import Settings

from .conftest import BASE_ID, gguf_lora, peft_adapter, run_cli, serving_home, shadow_pairs
from .gateway_server import GatewayServer
from .webhook_receiver import Receiver

pytestmark = pytest.mark.model
pytest.importorskip("xllamacpp")

STALL_S = 0.05
REQUESTS, CLIENTS = 120, 4


@pytest.fixture(scope="module")
def home(tmp_path_factory, hf_base):
    """support@1 (production) and @2 for a canary; triage@1 and @2 for a shadow."""
    home = serving_home(tmp_path_factory, hf_base, versions=2)
    registry = Registry(Settings(home=home, user="tester"))
    scratch = tmp_path_factory.mktemp("triage")
    for seed in (5, 6):
        gguf_lora(registry, registry.register("triage", peft_adapter(hf_base, scratch / f"t{seed}", ["q_proj", "v_proj"],
                                                                      seed=seed), base=BASE_ID).ref)
    registry.promote("triage@1", force=True, reason="test set-up: no eval data for random adapters")
    return home


def lag_buckets(server: GatewayServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("loragate_event_loop_lag_seconds_bucket{")}


def test_the_event_loop_never_stalls_under_load_with_every_background_job(home):
    registry = Registry(Settings(home=home))
    with Receiver() as receiver, GatewayServer(home) as server:
        receiver.secret = Webhooks(registry).add(receiver.url).secret  # every event
        canary = json.loads(run_cli(home, "rollout", "start", "support", "--candidate", "2", "--weight", "50",
                                    "--json").stdout)
        shadow = json.loads(run_cli(home, "rollout", "shadow", "triage", "--candidate", "2", "--percent", "50",
                                    "--json").stdout)
        time.sleep(1.2)  # the gateway's routing cache
        before = lag_buckets(server)

        def ask(n: int) -> int:
            streamed = n % 3 == 0
            body = {"model": "support" if n % 2 else "triage", "user": f"user-{n}", "max_tokens": 4,
                    "messages": [{"role": "user", "content": f"Where is order {n}?"}], "stream": streamed}
            return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).status_code

        with ThreadPoolExecutor(CLIENTS) as clients:
            statuses = list(clients.map(ask, range(REQUESTS)))
        after = lag_buckets(server)
        # Copies wait while live requests do (some were dropped, the queue full): the rest are answered now.
        deadline = time.monotonic() + 60
        while not any(p.status == "compared" for p in shadow_pairs(Settings(home=home), shadow["id"], 1)):
            assert time.monotonic() < deadline, "no shadow copy was answered"
            time.sleep(0.2)
        events = receiver.wait_for(2)
    assert statuses == [200] * REQUESTS
    sampled = after["+Inf"] - before["+Inf"]
    stalls = sampled - (after[str(STALL_S)] - before[str(STALL_S)])
    assert sampled > 100, after  # the monitor ran all along (every 25 ms)
    assert stalls == 0, f"{stalls:g} of {sampled:g} loop samples were late by more than {STALL_S * 1000:g} ms: {after}"
    # ... while every background job had work: copies taken, both canary arms metered and evaluated,
    # events delivered.
    arms = {arm.arm: arm.requests for arm in RolloutService(registry).status("support").arms}
    assert arms["production"] > 0 and arms["candidate"] > 0 and canary["id"]
    assert {"rollout.started", "shadow.started"} <= {e["type"] for e in events}
