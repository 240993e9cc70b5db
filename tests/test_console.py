"""The web console in-process (``loragate ui``'s app on a real SQLite/PostgreSQL registry): what each
page shows, who may act, and that a refused or forged action moves nothing. The same pages in a real
browser on a real gateway with live traffic: ``test_console_browser.py``."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from loragate.gateway.console import create_console_app
from loragate.gateway.keys import KeyStore
from loragate.database import write_session
from loragate.gateway.models import MeterRecord, Rollout, ShadowPair
from loragate.gateway.timeline import timeline
from loragate.registry import EvalInput, Registry, VersionInfo

from .conftest import BASE_ID
from .gateway_server import free_port

LOSS = [{"step": 5, "loss": 2.1}, {"step": 10, "loss": 1.4, "eval_loss": 1.5}, {"step": 20, "loss": 0.9, "eval_loss": 1.1}]


def scored_versions(registry: Registry, folder_for: Callable[[int], Path],
                    then: Callable[[VersionInfo], object] = lambda _: None) -> None:
    """support@1 (production, 0.70), @2 (0.80, trained from @1, served GGUF measured), @3 (0.20:
    below production and the base, so the gate refuses it); base 0.30, prompted base 0.45.
    ``folder_for(n)``: version n's adapter folder; ``then``: what to do with each registered version."""
    data = "d" * 64
    registry.record_contamination_check("t" * 64, passed=True, method="exact-hash")
    for subject, value in (("base", 0.3), ("prompted_base", 0.45)):
        registry.add_eval(EvalInput(suite="default", metrics={"exact_match": value}, sample_count=50,
                                    eval_data_sha256=data), base=BASE_ID, subject=subject)
    for n, value in ((1, 0.7), (2, 0.8), (3, 0.2)):
        version = registry.register(
            "support", folder_for(n), base=BASE_ID, training_data_sha256="t" * 64, parent=f"support@{n - 1}" if n > 1 else None,
            training_config={"cost_usd": 0.0123 * n, "device": "cpu", "steps": 20, "wall_s": 440.0, "loss_history": LOSS})
        registry.add_eval(EvalInput(suite="default", metrics={"exact_match": value}, sample_count=50,
                                    eval_data_sha256=data), ref=version.ref)
        then(version)
    registry.add_eval(EvalInput(suite="default@served", sample_count=50, eval_data_sha256=data,
                                metrics={"exact_match": 0.78, "quality_loss_points": 2.0, "tokens_per_s": 51.5},
                                higher_is_better={"quality_loss_points": False}), ref="support@2")
    registry.promote("support@1", to="production")


@pytest.fixture
def console(registry, adapter_factory) -> TestClient:
    scored_versions(registry, lambda _: adapter_factory())
    return TestClient(create_console_app(registry.settings), base_url="http://127.0.0.1:8001")


def test_every_page_shows_what_the_registry_holds(console):
    """Loopback with no keys: admin, as the API is."""
    index = console.get("/ui")
    assert index.status_code == 200 and "support" in index.text and "0.700" in index.text
    assert "base 0.300 · prompted 0.450" in index.text

    versions = console.get("/ui/adapters/support").text
    assert [row for row in re.findall(r'data-version="(\d)"', versions)] == ["1", "2", "3"]
    assert "$0.0246" in versions and "tttttttttttt" in versions  # cost and training data hash of @2

    version = console.get("/ui/adapters/support/versions/2").text
    assert re.search(r">support@2</a> → <a[^>]*>support@1</a> → <span>SmolLM2-135M-Instruct</span>", version)
    assert "default@served" in version and "2.00" in version and "51.5" in version  # points lost, tokens/s
    assert '"eval_loss": 1.1' in version  # the loss curve's data for the chart
    audit = re.findall(r"<td>tester</td><td>([\w.]+)</td>\s*<td>([\w@]+)</td>", version)
    assert ("register", "support@2") in audit and ("eval.add", "support@2") in audit  # its audit trail
    assert {target for _, target in audit} == {"support@2"}  # not support@1's, nor @3's
    assert re.search(r'data-testid="gate">\s*<p><strong>passes</strong>', version)

    refused = console.get("/ui/adapters/support/versions/3").text
    assert "refuses" in refused and "does not beat the base model&#39;s 0.3" in refused

    history = console.get("/ui/adapters/support/aliases").text
    assert re.search(r"<td>production</td>\s*<td>–</td><td>v1</td>\s*<td>promote</td><td>tester</td>", history)
    assert console.get("/ui/cost?since=all&by=version").status_code == 200
    missing = console.get("/ui/adapters/nobody")
    assert missing.status_code == 404 and "nobody" in missing.text and "Traceback" not in missing.text
    assert console.get("/ui/cost?by=colour").status_code == 400  # an OpenAI-style error, not a trace

    assert "Plotly" in console.get("/ui/vendor/plotly.min.js").text[:20000]  # from the installed package

    # Bad input is a page or an error saying what, never a 500.
    for path, status in (("/ui/adapters/support/versions/99999999999999999999", 400),
                         ("/ui/adapters/support/versions/0", 400), ("/ui/cost?since=999999999d", 400)):
        answer = console.get(path)
        assert answer.status_code == status and "Traceback" not in answer.text, (path, answer.text)
    no_candidate = console.post("/ui/adapters/support/rollout/start", data={"weight": "5"})
    assert no_candidate.status_code == 400 and "candidate: Field required" in no_candidate.text
    assert no_candidate.headers["content-type"].startswith("text/html")
    # Without keys a loopback client is an admin, but not through a host name rebound to 127.0.0.1.
    rebound = console.get("/ui", headers={"host": "attacker.example:8001"})
    assert rebound.status_code == 403 and "loopback host name" in rebound.json()["error"]["message"]
    assert console.get("/ui", headers={"host": "localhost:8001"}).status_code == 200
    assert console.get("/ui", headers={"host": "[::1]:8001"}).status_code == 200


def test_user_keys_read_admin_keys_act_and_refusals_move_nothing(console, registry):
    keys = KeyStore(registry)
    user, admin = keys.create("viewer").token, keys.create("ops", scope="admin").token

    sign_in = console.get("/ui/adapters/support", follow_redirects=False)  # keys exist: sign in first
    assert sign_in.status_code == 303 and sign_in.headers["location"] == "/ui/login?next=%2Fui%2Fadapters%2Fsupport"
    assert console.post("/ui/adapters/support/promote", data={"version": "2"}).status_code == 401
    assert console.post("/ui/login", data={"key": "lg_wrong"}).status_code == 401
    signed_in = console.post("/ui/login", data={"key": user, "next": "https://elsewhere.example/"},
                             follow_redirects=False)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui"  # no open redirect
    cookie = signed_in.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    page = console.get("/ui/adapters/support/versions/2")
    assert page.status_code == 200 and 'data-action' not in page.text and user not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]

    forged = console.post("/ui/adapters/support/promote", data={"version": "2"})
    assert forged.status_code == 403 and "needs an admin key" in forged.text
    assert registry.get("support@production").version == 1

    console.cookies.clear()
    console.post("/ui/login", data={"key": admin})
    assert 'data-action="promote"' in console.get("/ui/adapters/support/versions/3").text
    refused = console.post("/ui/adapters/support/promote", data={"version": "3", "reason": "try"})
    assert refused.status_code == 409 and 'data-testid="reasons"' in refused.text and "worse than production support@1&#39;s 0.7" in refused.text
    assert registry.get("support@production").version == 1
    cross_site = console.post("/ui/adapters/support/promote", data={"version": "2"},
                              headers={"origin": "https://elsewhere.example"})
    assert cross_site.status_code == 403 and registry.get("support@production").version == 1

    promoted = console.post("/ui/adapters/support/promote", data={"version": "2", "reason": "better"})
    assert promoted.status_code == 200 and "The gate passed" in promoted.text
    assert registry.get("support@production").version == 2
    change = registry.alias_history("support", "production")[-1]
    assert (change.actor, change.reason) == ("key:ops", "better")
    trail = console.get("/ui/adapters/support/versions/2").text
    assert re.search(r"<td>key:ops</td><td>promote</td>\s*<td>support@production</td><td>ok</td><td>better</td>", trail)
    assert "refused" not in trail  # the refusal was of @3: on @3's page
    assert re.search(r"<td>key:ops</td><td>promote</td>\s*<td>support@production</td><td>refused</td>",
                     console.get("/ui/adapters/support/versions/3").text)
    refusals = [e for e in registry.audit_log(target="support@production") if e.outcome == "refused"]
    assert [(e.actor, e.action) for e in refusals] == [("key:ops", "promote")]

    started = console.post("/ui/adapters/support/rollout/start", data={"candidate": "1", "weight": "10"})
    assert started.status_code == 200
    rollout = console.get("/ui/adapters/support/rollout.json").json()["status"]
    assert (rollout["weight"], rollout["arms"][1]["version"]) == (10, 1)
    assert console.post("/ui/adapters/support/rollout/weight", data={"weight": "150"}).status_code == 400
    bad_ramp = console.post("/ui/adapters/support/rollout/start", data={"candidate": "3", "ramp": "5,lots"})
    assert bad_ramp.status_code == 400 and "a ramp is a list of weights" in bad_ramp.text
    assert console.post("/ui/adapters/support/rollout/abort", data={"reason": "enough"}).status_code == 200
    assert registry.audit_log(target="support")[-1].actor == "key:ops"
    assert console.post("/ui/adapters/support/rollout/start", data={"candidate": "3", "mode": "shadow",
                                                                      "weight": "50"}).status_code == 200
    shadow_id = console.get("/ui/adapters/support/rollout.json").json()["status"]["id"]
    with write_session(registry.engine) as session:  # what the shadow runner stores, aggregated by the database
        session.add_all([ShadowPair(rollout_id=shadow_id, request_id="a", status="compared", exact=True, token_f1=1.0),
                         ShadowPair(rollout_id=shadow_id, request_id="b", status="compared", exact=False, token_f1=0.5),
                         ShadowPair(rollout_id=shadow_id, request_id="c", status="dropped")])
    stats = console.get("/ui/adapters/support/rollout.json").json()["status"]["shadow"]
    assert (stats["pairs"], stats["dropped"], stats["exact_agreement"], stats["token_f1"]) == (2, 1, 0.5, 0.75)
    shadow = console.get("/ui/adapters/support/rollout")
    assert 'data-testid="shadow"' in shadow.text and '"shadow.exact_agreement">50.0%' in shadow.text and "a copy of <span data-field=\"weight\">50</span>%" in shadow.text
    assert console.post("/ui/adapters/support/rollout/abort").status_code == 200
    console.post("/ui/logout")
    assert console.get("/ui", follow_redirects=False).status_code == 303


def test_the_timeline_cuts_a_rollout_into_buckets_per_arm():
    started = datetime(2026, 1, 1, tzinfo=UTC)
    rollout = Rollout(id=1, adapter_name="support", production_version=1, candidate_version=2, weight=50,
                      started_by="t", started_at=started, ended_at=started + timedelta(seconds=39))

    def record(second: float, arm: str, latency: float, status: int = 200) -> MeterRecord:
        return MeterRecord(request_id=f"{arm}{second}", created_at=started + timedelta(seconds=second), model="support",
                           arm=arm, backend="b", latency_ms=latency, status=status, cost_usd=0.001)

    records = [record(0.5, "production", 100), record(1.5, "production", 300), record(1.7, "candidate", 50, 500),
               record(38.0, "candidate", 70)]
    line = timeline(rollout, records, points=20)
    assert line.bucket_s == 2 and len(line.starts) == 20 and line.starts[1] == started + timedelta(seconds=2)
    production, candidate = line.arms["production"], line.arms["candidate"]
    assert production["requests"][:2] == [2, 0] and sum(production["requests"]) == 2
    assert production["p50_ms"][0] == 100 and production["p95_ms"][0] == 300 and production["p50_ms"][1] is None
    assert candidate["error_rate"][0] == 1.0 and candidate["error_rate"][19] == 0.0
    assert candidate["cost_per_1k_usd"][19] == pytest.approx(1.0)


def test_loragate_ui_serves_the_console_without_a_gateway(registry, adapter_factory):
    scored_versions(registry, lambda _: adapter_factory())
    port = free_port()
    env = {**os.environ, "LORAGATE_HOME": str(registry.settings.home),
           "LORAGATE_DATABASE_URL": registry.settings.resolved_database_url}
    process = subprocess.Popen(["loragate", "ui", "--port", str(port)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == f"console at http://127.0.0.1:{port}/ui"
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/ui/adapters/support", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        assert page.status_code == 200 and 'data-version="3"' in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 404  # a console, not a gateway
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_training_config_written_elsewhere_cannot_break_a_page():
    from loragate.gateway.console.views import _loss_points, _number

    assert _number("cheap") is None and _number(float("nan")) is None and _number(0.25) == 0.25
    assert _loss_points("junk") == [] and _loss_points([{"step": 1, "loss": float("nan")}, "junk", {"loss": 2.0},
                                                       {"step": 2, "loss": 0.5, "eval_loss": "x"}]) == [{"step": 2, "loss": 0.5}]
