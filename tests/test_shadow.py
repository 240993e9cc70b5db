"""Shadow rollouts on a real gateway (llama.cpp backend, real versions, the ``openai`` client): the
candidate answers copies of live requests that nobody sees; production's answers and status codes
are byte-identical to a run without the shadow; pairs and agreement are recorded; copies that find
the shadow queue full are dropped without an error to anyone."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from sqlmodel import select

from loragate.database import read_session
from loragate.gateway.models import MeterRecord
from loragate.gateway.rollouts import CANDIDATE, RolloutService, assign_arm
from loragate.registry import Registry, Webhooks
from loragate.settings import Settings

from .conftest import BASE_ID, run_cli, serving_home, shadow_pairs
from .gateway_server import GatewayServer
from .webhook_receiver import Receiver

pytestmark = pytest.mark.model
pytest.importorskip("xllamacpp")

USERS = [f"user-{n}" for n in range(16)]


@pytest.fixture(scope="module")
def home(tmp_path_factory, hf_base):
    return serving_home(tmp_path_factory, hf_base, versions=2)


def _ask(server: GatewayServer, user: str, *, max_tokens: int = 12, **extra) -> tuple[int, str, str]:
    """(status, answer, served version) of one chat request, greedy."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="support", messages=[{"role": "user", "content": f"Where is order {user}?"}], max_tokens=max_tokens,
        temperature=0, user=user, extra_body=extra or None)
    return raw.http_response.status_code, raw.parse().choices[0].message.content, raw.headers["x-loragate-version"]


def test_a_shadow_changes_nothing_users_see_and_records_pairs(home):
    registry = Registry(Settings(home=home))
    with Receiver() as receiver, GatewayServer(home) as server:
        receiver.secret = Webhooks(registry).add(receiver.url, events=["shadow.started", "shadow.ended"]).secret
        for _ in range(2):  # the first pass warms the engine's caches; the second is the reference
            without = [_ask(server, user) for user in USERS]
        started = json.loads(run_cli(home, "rollout", "shadow", "support", "--candidate", "2", "--percent", "50",
                                     "--json").stdout)
        assert started["mode"] == "shadow" and started["shadow"]["pairs"] == 0
        time.sleep(1.2)  # the gateway's routing cache
        private = USERS[0]
        sampled = [u for u in USERS if assign_arm(started["id"], u, 50) == CANDIDATE]
        with_shadow = []
        for user in USERS:
            with_shadow.append(_ask(server, user, **({"store": False} if user == private else {})))
            if user in sampled:  # an idle gap, as real traffic has: back to back, live requests preempt copies
                shadow_pairs(Settings(home=home), started["id"], sampled.index(user) + 1)
        pairs = shadow_pairs(Settings(home=home), started["id"], len(sampled))
        status = RolloutService(registry).status("support")
        judged = json.loads(run_cli(home, "rollout", "judge", "support", "--judge-url", f"{server.url}/v1",
                                    "--judge-model", BASE_ID, "--json").stdout)
        # Promotion goes through the gate (which refuses these random adapters: no eval data), with the
        # shadow's agreement recorded on the candidate first.
        refused = run_cli(home, "rollout", "promote", "support", expect=2)
        run_cli(home, "rollout", "abort", "support", "--reason", "seen enough")
        events = receiver.wait_for(2)
    print(f"\nshadow 50% of {len(USERS)} users: {status.shadow}")
    assert with_shadow == without  # status, answer and version: byte for byte
    assert {v for _, _, v in with_shadow} == {"support@1"}
    assert 3 <= len(sampled) <= 13 and len(pairs) == len(sampled), (sampled, pairs)
    assert all(p.status == "compared" and p.candidate_sha256 and p.latency_ms > 0 for p in pairs)
    answers = dict(zip(USERS, (a for _, a, _ in without)))
    by_request = {p.request_id: p for p in pairs}
    stored = [p for p in pairs if p.production_output is not None]
    assert {p.production_output for p in stored} <= set(answers.values())
    if private in sampled:  # it asked not to store content: hashes only
        assert len(stored) == len(pairs) - 1
    shadow = status.shadow
    assert shadow.pairs == len(pairs) and shadow.dropped == 0 and 0 <= shadow.token_f1 <= 1
    assert shadow.exact_agreement == pytest.approx(sum(p.exact for p in pairs) / len(pairs))
    with read_session(registry.engine) as session:
        metered = list(session.exec(select(MeterRecord).where(MeterRecord.arm == "shadow")).all())
    assert {m.request_id.removesuffix(":shadow") for m in metered} == set(by_request)  # its own id: feedback
    assert all(m.key_id is None and m.version == 2 for m in metered)  # on production's request finds production
    assert [e["type"] for e in events] == ["shadow.started", "shadow.ended"] and receiver.rejected == []
    stored_pairs = len(stored)
    assert len(judged["verdicts"]) == stored_pairs and judged["wins"] + judged["losses"] + judged["ties"] == stored_pairs
    assert "promotion of support@2 refused" in refused.stderr and registry.get("support").version == 1
    recorded = {(e.suite, e.metric): e for e in registry.get("support@2").evals if e.suite == "shadow"}
    assert recorded["shadow", "agreement_token_f1"].value == pytest.approx(shadow.token_f1)
    assert recorded["shadow", "agreement_token_f1"].sample_count == len(pairs)
    assert recorded["shadow", "judge_win_rate"].value == pytest.approx(judged["win_rate"])


def test_copies_beyond_a_full_queue_are_dropped_without_an_error_to_anyone(home):
    registry = Registry(Settings(home=home))
    with GatewayServer(home, LORAGATE_GATEWAY__SHADOW_QUEUE="1") as server:
        started = httpx.post(f"{server.url}/admin/rollouts", timeout=30,  # the admin API (loopback, no keys)
                             json={"adapter": "support", "candidate": 2, "weight": 100, "mode": "shadow"})
        assert started.status_code == 200 and started.json()["mode"] == "shadow", started.text
        rollout = RolloutService(registry).active("support")
        time.sleep(1.2)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda u: _ask(server, u, max_tokens=24), [f"burst-{n}" for n in range(24)]))
        pairs = shadow_pairs(Settings(home=home), rollout.id, 24)
        status = RolloutService(registry).status("support")
        exported = httpx.get(f"{server.url}/metrics").text
        RolloutService(registry).abort("support")
    print(f"\nburst of 24 at shadow 100%, queue 1: {status.shadow}")
    assert [s for s, _, _ in answers] == [200] * 24
    assert len(pairs) == 24 and status.shadow.dropped > 0 and status.shadow.failed == 0
    assert status.shadow.pairs + status.shadow.dropped == 24
    reasons = {p.error for p in pairs if p.status == "dropped"}
    assert reasons and all(r in ("the shadow queue was full", "preempted by live traffic") or "not answered within" in r
                           for r in reasons)
    assert f'loragate_shadow_copies_total{{adapter="support",outcome="dropped"}} {status.shadow.dropped}.0' in exported
