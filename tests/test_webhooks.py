"""Webhooks: every event type reaches a real receiver on 127.0.0.1, signed (verified with the
Standard Webhooks reference library), in order per adapter, after the receiver was down, failing or
slow, and after the sender was killed with SIGKILL; the outbox row commits with the change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from sqlmodel import select

from loragate.database import read_session
from loragate.gateway.rollouts import CANDIDATE, PRODUCTION, RolloutService, Thresholds
from loragate.registry import EVENT_TYPES, Actor, EvalInput, Forbidden, InvalidAdapter, Registry, WebhookSender, Webhooks
from loragate.registry.models import WebhookDelivery
from loragate.settings import AliasPolicy, GateSettings, Settings, WebhookSettings

from .conftest import BASE_ID, HUB_ID, run_cli
from .gateway_server import dead_port
from .test_rollouts import _meter
from .webhook_receiver import Receiver, dump, in_order_per_adapter

FAST = WebhookSettings(timeout_s=0.5, lease_s=2, backoff_s=0.05, max_backoff_s=0.2, interval_s=0.05)


@pytest.fixture
def fast(settings, base_folder) -> Registry:
    """A registry whose senders retry within a second, where only `tester` moves production and
    production is not gated (so that a rollout's promotion goes through)."""
    settings = settings.model_copy(update={
        "webhooks": FAST,
        "gate": GateSettings(aliases=[], protected_aliases={"production": AliasPolicy(os_users=["tester"])})})
    registry = Registry(settings)
    registry.add_base_model(BASE_ID, source=str(base_folder), hub_id=HUB_ID, folder=base_folder)
    return registry


def _every_event(registry: Registry, adapter_factory) -> None:
    """At least one event of every type, on adapters `s` and `t`."""
    for _ in range(3):
        registry.register("s", adapter_factory(), base=BASE_ID)
    registry.register("t", adapter_factory(), base=BASE_ID)
    registry.add_eval(EvalInput(suite="default", metrics={"exact_match": 0.5}, sample_count=10), ref="s@2")
    registry.promote("s@1", reason="first release")
    with pytest.raises(Forbidden):
        registry.acting_as(Actor(kind="key", name="ops")).promote("s@2")
    registry.set_alias("s@3", "candidate")
    service = RolloutService(registry)
    thresholds = Thresholds(min_requests=10, max_error_rate=0.5, max_latency_ratio=1.5)
    service.start("s", 2, 50, thresholds)
    service.set_weight("s", 20)
    service.abort("s", reason="wrong candidate")
    slow = service.start("s", 3, 50, thresholds)
    _meter(registry, slow, PRODUCTION, 1, [400.0] * 20, tpot_ms=10.0)
    _meter(registry, slow, CANDIDATE, 3, [700.0] * 20, tpot_ms=20.0)
    assert "time per output token" in service.check(slow)
    service.shadow("s", 3, 50)
    service.abort("s", reason="shadow seen")
    service.start("s", 2, 50, thresholds)
    service.promote("s", reason="looks good")


def _outbox(registry: Registry) -> list[WebhookDelivery]:
    with read_session(registry.engine) as session:
        return list(session.exec(select(WebhookDelivery).order_by(WebhookDelivery.id)).all())


def test_every_event_type_reaches_a_receiver_signed_and_in_order(fast, adapter_factory):
    with Receiver() as receiver, Receiver() as ops:
        receiver.secret = Webhooks(fast).add(receiver.url).secret
        ops.secret = Webhooks(fast).add(ops.url, events=["alias.moved"]).secret
        _every_event(fast, adapter_factory)
        outbox = _outbox(fast)
        WebhookSender(fast).run(once=True)
        events = receiver.first_arrivals()
    assert receiver.rejected == [] == ops.rejected
    assert {e["type"] for e in events} == set(EVENT_TYPES), dump(events)
    assert in_order_per_adapter(events), dump(events)
    assert receiver.ids() | ops.ids() == {d.event_id for d in outbox}
    assert all(d.status == "delivered" for d in _outbox(fast))
    # The second webhook got what it asked for, the same events (same ids), and no others.
    assert ops.ids() == {e["id"] for e in events if e["type"] == "alias.moved"}
    moves = [e for e in events if e["type"] == "alias.moved" and e["data"]["target"] == "s@production"]
    assert [(m["data"]["before"]["version"], m["data"]["after"]["version"]) for m in moves] == [(None, 1), (1, 2)]
    refused = next(e for e in events if e["type"] == "promotion.refused")
    assert refused["data"]["actor"] == "key:ops" and "production is protected" in refused["data"]["reason"]
    rolled_back = next(e for e in events if e["type"] == "rollout.rolled_back")
    assert "time per output token" in rolled_back["data"]["reason"] and rolled_back["adapter"] == "s"
    # One row per event and webhook, and one event per audited change of a type asked for.
    audited = [e for e in fast.audit_log(limit=1000) if e.action not in ("base.add", "webhook.add")]
    assert len({d.event_id for d in outbox}) == len(audited), [e.action for e in audited]


def test_a_failed_change_writes_no_event(fast, adapter_factory, tmp_path):
    Webhooks(fast).add("http://127.0.0.1:9/never")
    fast.register("s", adapter_factory(), base=BASE_ID)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    with pytest.raises(InvalidAdapter):
        fast.register("s", broken, base=BASE_ID)
    assert [d.event_type for d in _outbox(fast)] == ["version.registered"]


def test_a_receiver_that_was_down_then_fails_gets_everything_in_order(fast, adapter_factory):
    port = dead_port()  # bound, not listening: every connection is refused
    hook = Webhooks(fast).add(f"http://127.0.0.1:{port.getsockname()[1]}/hook")
    for _ in range(3):
        fast.register("s", adapter_factory(), base=BASE_ID)
    fast.register("t", adapter_factory(), base=BASE_ID)
    fast.promote("s@2")
    sender = WebhookSender(fast)
    sender.start()
    try:
        time.sleep(1.0)
        down = Webhooks(fast).deliveries()
        assert all(d.status == "pending" for d in down)
        assert any(d.attempts >= 2 and "ConnectError" in d.last_error for d in down), down
        port.close()
        with Receiver(port=int(hook.webhook.url.split(":")[2].split("/")[0])) as receiver:
            receiver.secret, receiver.fail_next = hook.secret, 3
            events = receiver.wait_for(5)
    finally:
        sender.stop()
    assert receiver.rejected == [] and len(events) == 5
    assert in_order_per_adapter(events), dump(events)
    log = {d.event_id: d for d in Webhooks(fast).deliveries()}
    assert all(d.status == "delivered" for d in log.values())
    assert log[events[0]["id"]].attempts >= 3  # refused connections, then 503s, then delivered


def test_a_slow_receiver_holds_only_its_own_queue(fast, adapter_factory):
    with Receiver() as slow, Receiver() as quick:
        slow.delay_s = 1.5  # three times the sender's timeout
        for receiver in (slow, quick):
            receiver.secret = Webhooks(fast).add(receiver.url).secret
        for _ in range(4):
            fast.register("s", adapter_factory(), base=BASE_ID)
        sender = WebhookSender(fast)
        sender.start()
        try:
            assert len(quick.wait_for(4, timeout_s=10)) == 4
            stuck = [d for d in Webhooks(fast).deliveries() if d.status == "pending"]
            assert stuck and all("ReadTimeout" in (d.last_error or "") for d in stuck if d.attempts)
            slow.delay_s = 0.0  # it recovers: everything arrives, in order, despite the timed-out attempts
            events = slow.wait_for(4, timeout_s=20)
        finally:
            sender.stop()
    assert len(events) == 4 and in_order_per_adapter(events), dump(events)
    assert slow.rejected == [] == quick.rejected


def test_killing_the_sender_loses_no_event(tmp_path, base_folder, adapter_factory):
    home = tmp_path / "home"
    registry = Registry(Settings(home=home, user="tester"))
    registry.add_base_model(BASE_ID, source=str(base_folder), hub_id=HUB_ID, folder=base_folder)
    env = {**os.environ, "LORAGATE_HOME": str(home), "LORAGATE_WEBHOOKS__TIMEOUT_S": "2",
           "LORAGATE_WEBHOOKS__LEASE_S": "3", "LORAGATE_WEBHOOKS__INTERVAL_S": "0.1"}
    with Receiver() as receiver:
        receiver.delay_s = 0.3
        receiver.secret = Webhooks(registry).add(receiver.url).secret
        for name in ("a", "b", "c"):
            for _ in range(3):
                registry.register(name, adapter_factory(r=2, layers=2), base=BASE_ID)
        ids = {d.event_id for d in _outbox(registry)}
        first = subprocess.Popen(["loragate", "webhooks", "deliver"], env=env)
        deadline = time.monotonic() + 60
        while len(receiver.ids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert 2 <= len(receiver.ids()) < len(ids)  # killed half way, with deliveries in flight
        second = subprocess.Popen(["loragate", "webhooks", "deliver"], env=env)
        try:
            events = receiver.wait_for(len(ids), timeout_s=60)
        finally:
            second.terminate()
            second.wait(timeout=30)
    assert receiver.ids() == ids and receiver.rejected == []
    assert in_order_per_adapter(events), dump(events)


def test_the_cli_adds_lists_and_removes_webhooks_and_refuses_bad_input(tmp_path):
    home = tmp_path / "home"
    for args, message in ((["ftp://example.com"], "http:// or https://"),
                          (["http://127.0.0.1:9/x", "--event", "alias.mooved"], "unknown event types alias.mooved"),
                          (["http://127.0.0.1:9/x", "--secret", "whsec_@@@"], "whsec_ followed by base64")):
        refused = run_cli(home, "webhooks", "add", *args, expect=2)
        assert message in refused.stderr and "Traceback" not in refused.stderr
    created = json.loads(run_cli(home, "webhooks", "add", "http://127.0.0.1:9/x", "-e", "alias.moved",
                                 "-e", "rollout.rolled_back", "--json").stdout)
    assert created["secret"].startswith("whsec_") and created["webhook"]["events"] == ["alias.moved",
                                                                                        "rollout.rolled_back"]
    listed = json.loads(run_cli(home, "webhooks", "list", "--json").stdout)
    assert [h["url"] for h in listed] == ["http://127.0.0.1:9/x"]
    run_cli(home, "webhooks", "rm", str(created["webhook"]["id"]))
    assert json.loads(run_cli(home, "webhooks", "list", "--json").stdout) == []
    assert "no webhook" in run_cli(home, "webhooks", "rm", str(created["webhook"]["id"]), expect=2).stderr


def test_a_removed_webhook_gets_nothing_more_and_its_pending_events_are_marked(fast, adapter_factory):
    hook = Webhooks(fast).add("http://127.0.0.1:9/never")
    fast.register("s", adapter_factory(), base=BASE_ID)
    Webhooks(fast).remove(hook.webhook.id)
    fast.register("s", adapter_factory(), base=BASE_ID)
    (only,) = Webhooks(fast).deliveries()
    assert only.status == "failed" and only.last_error == "webhook removed"


def test_the_sender_outlives_a_failed_database_read(fast, adapter_factory):
    with Receiver() as receiver:
        receiver.secret = Webhooks(fast).add(receiver.url).secret
        fast.register("s", adapter_factory(), base=BASE_ID)
        sender = WebhookSender(fast)
        due, calls = sender._due_heads, []

        def flaky(now: float):
            calls.append(now)
            if len(calls) == 1:
                raise ConnectionError("database restarting")
            return due(now)

        sender._due_heads = flaky
        sender.start()
        try:
            events = receiver.wait_for(1, timeout_s=10)
        finally:
            sender.stop()
    assert len(calls) >= 2 and [e["type"] for e in events] == ["version.registered"]


def test_a_sender_whose_lease_ran_out_cannot_overwrite_the_new_holder(fast, adapter_factory):
    Webhooks(fast).add("http://127.0.0.1:9/never")
    fast.register("s", adapter_factory(), base=BASE_ID)
    (delivery,) = _outbox(fast)
    stale, current = WebhookSender(fast), WebhookSender(fast)
    first = stale._claim(delivery.id, time.time())
    assert first is not None and current._claim(delivery.id, time.time()) is None  # held
    second = current._claim(delivery.id, first + 0.001)  # the first lease ran out (a killed or hung sender)
    assert second is not None
    stale._record(delivery, first, None, "late failure", give_up=True)  # would mark it failed
    (after,) = _outbox(fast)
    assert after.status == "pending" and after.leased_until == second and after.last_error is None
    current._record(delivery, second, 200, None)
    assert _outbox(fast)[0].status == "delivered"
    for sender in (stale, current):
        sender.stop()


def test_a_url_httpx_cannot_use_is_refused_when_added(fast):
    from loragate.registry import InvalidInput

    for url in ("http://[::1", "https://", "ftp://example.com/hook"):
        with pytest.raises(InvalidInput):
            Webhooks(fast).add(url)
