"""A fleet: two `loragate gateway serve` replicas on one PostgreSQL and one Redis, behind nginx as the
load balancer, each replica with its own llama.cpp engine, driven through the balancer.

Redis and nginx come from Debian's packages (``.ci/install-servers``); without them the module skips,
unless LORAGATE_TEST_REQUIRE_FLEET=1 (as in CI): then it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from loragate.gateway.rollouts import assign_arm
from loragate.registry import Registry, Webhooks
from loragate.settings import Settings

from .conftest import run_cli, serving_home, shadow_pairs
from .fleet_servers import Nginx, PostgresServer, RedisServer
from .gateway_server import GatewayServer
from .webhook_receiver import Receiver

pytestmark = pytest.mark.model
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def fleet_database():
    admin = os.environ.get("LORAGATE_TEST_POSTGRES_URL")
    missing = [name for name in ("redis-server", "nginx") if not (shutil.which(name) or shutil.which(f"/usr/sbin/{name}"))]
    if not admin:
        missing.append("PostgreSQL (LORAGATE_TEST_POSTGRES_URL)")
    if missing:
        if os.environ.get("LORAGATE_TEST_REQUIRE_FLEET") == "1":
            pytest.fail(f"the fleet tests need {', '.join(missing)} (LORAGATE_TEST_REQUIRE_FLEET=1)")
        pytest.skip(f"no {', '.join(missing)}")
    name = f"lg_fleet_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield admin.rsplit("/", 1)[0] + "/" + name
    from loragate.database import get_engine

    get_engine.cache_clear()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Fleet:
    def __init__(self, home, database_url: str, folder, **env: str):
        self.home, self.database_url = home, database_url
        self.redis = RedisServer(folder / "redis").start()
        # nginx, on this host, is the trusted proxy: its X-Forwarded-For/-Proto name client and scheme.
        env = {"LORAGATE_DATABASE_URL": database_url, "LORAGATE_REDIS_URL": self.redis.url,
               "LORAGATE_GATEWAY__TRUSTED_PROXIES": '["127.0.0.1"]', **env}
        self.replicas = [GatewayServer(home, **env) for _ in range(2)]
        for replica in self.replicas:
            replica.start()
        self.nginx = Nginx(folder / "nginx", [f"127.0.0.1:{r.port}" for r in self.replicas]).start()
        self.admin = ""  # created once the no-keys test has run

    def cli(self, *args: str, expect: int = 0):
        return run_cli(self.home, *args, expect=expect, env={"LORAGATE_DATABASE_URL": self.database_url})

    def key(self, name: str, *options: str) -> str:
        """A new API key's token (created through the CLI, on the fleet's database)."""
        return json.loads(self.cli("keys", "create", "--name", name, *options, "--json").stdout)["key"]

    def stop(self) -> None:
        self.nginx.stop()
        for replica in self.replicas:
            if replica.process is not None and replica.process.poll() is None:
                replica.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, hf_base, fleet_database):
    home = serving_home(tmp_path_factory, hf_base, versions=3, database_url=fleet_database)
    fleet = Fleet(home, fleet_database, tmp_path_factory.mktemp("fleet"))
    try:
        yield fleet
    finally:
        fleet.stop()


def chat(url: str, token: str | None = None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": "support", "messages": CHAT, "max_tokens": 1, **body})


def test_a_request_through_the_load_balancer_gets_no_loopback_rights(fleet):
    """No keys yet: a loopback caller is an admin, but nginx on the same host forwards every caller
    from loopback, so a forwarded request is nobody's."""
    direct = httpx.get(f"{fleet.replicas[0].url}/v1/models", timeout=30)
    proxied = httpx.get(f"{fleet.nginx.url}/v1/models", timeout=30)
    assert direct.status_code == 200
    assert proxied.status_code == 403 and proxied.json()["error"]["code"] == "keys_required"
    spoofed = httpx.get(f"{fleet.replicas[0].url}/v1/models", headers={"X-Forwarded-For": "127.0.0.1"}, timeout=30)
    assert spoofed.status_code == 403  # claiming to forward for loopback is still forwarding
    fleet.admin = fleet.key("admin", "--scope", "admin")  # the tests below run with keys
    time.sleep(5.2)  # each replica learns that keys exist within its key cache's 5 s


def test_the_console_behind_tls_termination_signs_in_with_a_secure_cookie(fleet):
    """A proxy that terminates TLS says so (X-Forwarded-Proto): the console's origin check compares
    with the public https origin, and its cookie is Secure."""
    proxied = {"Host": "gateway.example", "Origin": "https://gateway.example", "X-Forwarded-Proto": "https",
               "X-Forwarded-For": "203.0.113.7"}
    signed_in = httpx.post(f"{fleet.replicas[0].url}/ui/login", data={"key": fleet.admin}, headers=proxied, timeout=30)
    assert signed_in.status_code == 303, signed_in.text
    cookie = signed_in.headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    plain = httpx.post(f"{fleet.replicas[0].url}/ui/login", data={"key": fleet.admin}, timeout=30)
    assert plain.status_code == 303 and "secure" not in plain.headers["set-cookie"].lower()

    def promote(headers: dict) -> httpx.Response:
        return httpx.post(f"{fleet.replicas[0].url}/ui/adapters/support/promote", timeout=30,
                          data={"version": "1", "to": "candidate"}, headers=headers,
                          cookies={"loragate_key": fleet.admin})
    accepted = promote(proxied)
    assert accepted.status_code == 200, accepted.text[-600:]  # the form came from https://gateway.example, the console's origin
    unproxied = {k: v for k, v in proxied.items() if k != "X-Forwarded-Proto"}
    refused = promote(unproxied)  # without the proxy's word the console is http://gateway.example: another origin
    assert refused.status_code == 403 and "not posted from the console" in refused.text


def test_the_same_user_gets_the_same_arm_from_every_replica(fleet):
    fleet.cli("rollout", "start", "support", "--candidate", "2", "--weight", "5", "--max-latency-ratio", "1000")
    rollout_id = json.loads(fleet.cli("rollout", "status", "support", "--json").stdout)["id"]
    time.sleep(1.2)  # every replica's routing cache
    users = [f"user-{n}" for n in range(60)]
    expected = {u: "support@2" if assign_arm(rollout_id, u, 5) == "candidate" else "support@1" for u in users}
    upstreams = Counter()
    for _ in range(2):
        for user in users:
            answer = chat(fleet.nginx.url, fleet.admin, user=user)
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-loragate-version"] == expected[user]
            upstreams[answer.headers["x-upstream"]] += 1
    assert len(upstreams) == 2 and min(upstreams.values()) >= 40  # both replicas answered
    # Every view of the rollout counts what both replicas served (each answer's record is committed
    # before it is sent): the CLI, each replica's admin API and each replica's console.
    candidates = 2 * sum(version == "support@2" for version in expected.values())
    seen = {"production": 2 * len(users) - candidates, "candidate": candidates}
    assert _arm_requests(json.loads(fleet.cli("rollout", "status", "support", "--json").stdout)) == seen
    for replica in fleet.replicas:
        admin = httpx.get(f"{replica.url}/admin/rollouts/support", timeout=30,
                          headers={"Authorization": f"Bearer {fleet.admin}"})
        console = httpx.get(f"{replica.url}/ui/adapters/support/rollout.json", timeout=30,
                            cookies={"loragate_key": fleet.admin})
        assert _arm_requests(admin.json()) == seen and _arm_requests(console.json()["status"]) == seen
    fleet.cli("rollout", "abort", "support", "--reason", "test over")


def _arm_requests(status: dict) -> dict[str, int]:
    return {arm["arm"]: arm["requests"] for arm in status["arms"]}


def test_a_shadow_copies_each_sampled_request_once_whichever_replica_serves_it(fleet):
    """A shadow rollout started through the CLI: users reach both replicas, each sampled request gets
    exactly one compared pair, and `rollout status` counts them all."""
    started = json.loads(fleet.cli("rollout", "shadow", "support", "--candidate", "2", "--percent", "50",
                                   "--json").stdout)
    time.sleep(1.2)  # every replica's routing cache
    users = [f"shadow-{n}" for n in range(16)]
    sampled = [u for u in users if assign_arm(started["id"], u, 50) == "candidate"]
    sampled_on, request_ids, pairs = set(), [], []
    for user in users:
        answer = chat(fleet.nginx.url, fleet.admin, user=user)
        assert answer.status_code == 200 and answer.headers["x-loragate-version"] == "support@1"
        if user in sampled:  # an idle gap, as real traffic has: back to back, live requests preempt copies
            sampled_on.add(answer.headers["x-upstream"])
            request_ids.append(answer.headers["x-request-id"])
            pairs = shadow_pairs(Settings(home=fleet.home, database_url=fleet.database_url), started["id"],
                                 len(request_ids))
    status = json.loads(fleet.cli("rollout", "status", "support", "--json").stdout)
    fleet.cli("rollout", "abort", "support", "--reason", "test over")
    assert len(sampled_on) == 2 and len(sampled) >= 4  # both replicas served sampled users
    assert sorted(p.request_id for p in pairs) == sorted(request_ids)  # one pair each, none twice
    assert all(p.status == "compared" for p in pairs) and status["shadow"]["pairs"] == len(request_ids)


def test_a_promotion_made_anywhere_is_served_by_every_replica_within_the_routing_cache(fleet):
    try:
        fleet.cli("registry", "promote", "support@2", "--to", "production", "--force", "--reason", "fleet test")
        time.sleep(1.2)  # gateway.routing_cache_s: 1 s
        for replica in fleet.replicas:
            assert chat(replica.url, fleet.admin).headers["x-loragate-version"] == "support@2"
    finally:
        fleet.cli("registry", "promote", "support@1", "--to", "production", "--force", "--reason", "fleet test over")
    time.sleep(1.2)


def test_an_automatic_rollback_is_taken_once_however_many_replicas_see_the_failures(fleet):
    registry = Registry(Settings(home=fleet.home, database_url=fleet.database_url))
    lora = next(a for a in registry.derived_artifacts("support@3") if a.kind == "gguf-lora")
    stored = registry.store.root / "sha256" / lora.sha256 / "files" / "adapter.gguf"
    stored.chmod(0o644)
    with stored.open("r+b") as handle:  # a damaged artifact: the candidate fails every request
        handle.seek(1000)
        handle.write(b"\xff\xff\xff\xff")
    fleet.cli("rollout", "start", "support", "--candidate", "3", "--weight", "50", "--min-requests", "5",
              "--max-error-rate", "0.2")
    time.sleep(1.2)
    failed_on = Counter()
    for n in range(40):
        answer = chat(fleet.nginx.url, fleet.admin, user=f"u{n}")
        if answer.status_code == 503:
            failed_on[answer.headers["x-upstream"]] += 1
    assert len(failed_on) == 2  # both replicas saw the candidate fail
    time.sleep(2)  # each replica's meter commit and rollout check
    assert json.loads(fleet.cli("rollout", "status", "support", "--json").stdout)["status"] == "rolled_back"
    decisions = [e for e in registry.audit_log(target="support", limit=500) if e.action == "rollout.rolled_back"]
    assert len(decisions) == 1 and decisions[0].outcome == "auto"


def test_a_limit_of_n_requests_a_minute_admits_n_across_replicas(fleet):
    token = fleet.key("limited", "--rpm", "6")
    if time.time() % 60 > 45:  # the count is per minute window: do not straddle two
        time.sleep(61 - time.time() % 60)
    answers = [chat(fleet.nginx.url, token) for _ in range(12)]
    assert Counter(a.status_code for a in answers) == {200: 6, 429: 6}
    assert {a.headers["x-upstream"] for a in answers if a.status_code == 200} == \
        {f"127.0.0.1:{r.port}" for r in fleet.replicas}
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1


def test_feedback_finds_its_request_on_another_replica(fleet):
    first, second = fleet.replicas
    answer = chat(first.url, fleet.admin)
    receipt = httpx.post(f"{second.url}/v1/feedback", headers={"Authorization": f"Bearer {fleet.admin}"},
                         json={"request_id": answer.headers["x-request-id"], "success": True}, timeout=30)
    assert receipt.status_code == 200, receipt.text  # committed before the answer: no "retry in a second"
    assert receipt.json()["version"] in (1, 2)


def test_redis_down_each_replica_limits_its_own_traffic_and_shares_again_when_it_is_back(fleet):
    fleet.redis.stop()
    try:
        token = fleet.key("no-redis", "--rpm", "2")
        answers = [chat(fleet.nginx.url, token) for _ in range(8)]
        assert Counter(a.status_code for a in answers) == {200: 4, 429: 4}  # two per replica: the stated fallback
        for replica in fleet.replicas:
            metrics = httpx.get(f"{replica.url}/metrics", timeout=30).text
            assert 'loragate_rate_limit_fallback_total{policy="local"}' in metrics
    finally:
        fleet.redis.start()
    token = fleet.key("redis-back", "--rpm", "2")
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    answers = [chat(fleet.nginx.url, token) for _ in range(6)]
    assert Counter(a.status_code for a in answers) == {200: 2, 429: 4}


def test_each_webhook_event_is_delivered_once_by_the_fleet(fleet):
    """Both replicas send the outbox's events (webhooks.deliver_in_gateway); a lease on each delivery
    means one of them sends it."""
    registry = Registry(Settings(home=fleet.home, database_url=fleet.database_url))
    with Receiver() as receiver:
        created = Webhooks(registry).add(receiver.url)
        receiver.secret = created.secret
        try:
            for version in (2, 1):
                fleet.cli("registry", "promote", f"support@{version}", "--to", "production", "--force",
                          "--reason", "webhook test")
            events = receiver.wait_for(2)
            time.sleep(2)  # a second delivery of any of them would have come by now
        finally:
            Webhooks(registry).remove(created.webhook.id)
    assert receiver.rejected == [] and len(events) >= 2
    assert len(receiver.events) == len(receiver.ids())  # no event twice


def test_an_engine_killed_under_a_replica_is_started_again_by_the_next_request(fleet):
    """kill -9 of the llama.cpp engine a replica started: the replica notices when it next sends to it,
    starts it again and answers: no request after the kill sees an error."""
    replica = fleet.replicas[1]

    def engine() -> dict:
        return httpx.get(f"{replica.url}/health", timeout=30).json()["engines"]["llamacpp"]

    assert chat(replica.url, fleet.admin).status_code == 200
    killed = engine()
    os.kill(killed["pid"], signal.SIGKILL)
    answers = [chat(replica.url, fleet.admin) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3, answers[0].text
    again = engine()
    assert again["up"] and again["pid"] != killed["pid"]


def test_kill_9_of_a_replica_under_load_loses_no_answered_request(fleet):
    """Four clients through nginx; one replica is killed mid-traffic. The balancer sends the rest to
    the other, and every request that got its answer has its meter record."""
    answered, failed, stop = [], [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                response = chat(fleet.nginx.url, fleet.admin)
            except httpx.HTTPError:
                failed.append("transport")
                continue
            (answered if response.status_code == 200 else failed).append(
                (response.headers.get("x-request-id"), response.headers.get("x-upstream")))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    def answers(count: int) -> None:
        deadline = time.monotonic() + 120
        while len(answered) < count and time.monotonic() < deadline:
            time.sleep(0.1)

    try:
        answers(8)
        fleet.replicas[0].stop(signal.SIGKILL)
        killed_at = len(answered)
        answers(killed_at + 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    survivor = f"127.0.0.1:{fleet.replicas[1].port}"
    assert killed_at > 0 and len(answered) - killed_at >= 10, (killed_at, len(answered), failed[:5])
    # nginx names every upstream it tried ("dead, survivor" once it retries the dead one): the last answered.
    assert all(upstream.split(", ")[-1] == survivor for _, upstream in answered[killed_at + 4:])
    registry = Registry(Settings(home=fleet.home, database_url=fleet.database_url))
    ids = [request_id for request_id, _ in answered]
    with registry.engine.connect() as conn:
        metered = {row[0] for row in conn.exec_driver_sql(
            "SELECT request_id FROM meter_record WHERE request_id = ANY(%(ids)s)", {"ids": ids})}
    assert set(ids) <= metered, f"{len(set(ids) - metered)} answered requests have no meter record"
    assert len(failed) <= 4  # at most the requests in flight on the killed replica


def _metered(database_url: str, ids: list[str]) -> set[str]:
    with psycopg.connect(database_url) as conn:
        return {row[0] for row in conn.execute("SELECT request_id FROM meter_record WHERE request_id = ANY(%s)", [ids])}


def _counter(replica: GatewayServer, sample: str) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample))


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_postgresql_down_mid_traffic_known_routes_serve_on_and_the_meter_catches_up(tmp_path_factory, hf_base,
                                                                                  outage):
    """The fleet's database (a server of this test's own) stops, or freezes: connections stay open
    and nothing answers. Keys and routes a replica has looked up serve on from its cache (after
    ``lookup_wait_s`` on a frozen server), each answer after ``meter_commit_wait_s`` with its meter
    record kept in memory; what no replica has looked up is a 503 with Retry-After. Requests that need
    the database itself (feedback) hang meanwhile without starving the others. With the database back,
    the fleet serves as before and every answered request has its record."""
    postgres = PostgresServer().start()
    fleet = None
    try:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE fleet")
        # A connect timeout longer than the test: requests that need the database stay stuck on it.
        url = postgres.url.rsplit("/", 1)[0] + "/fleet?connect_timeout=300"
        home = serving_home(tmp_path_factory, hf_base, versions=2, database_url=url)
        fleet = Fleet(home, url, tmp_path_factory.mktemp("fleet-pg"), LORAGATE_GATEWAY__METER_COMMIT_WAIT_S="1",
                      LORAGATE_GATEWAY__LOOKUP_WAIT_S="1")
        token = fleet.key("outage", "--scope", "admin")
        before = [chat(fleet.nginx.url, token) for _ in range(4)]  # round robin: both replicas route "support"
        assert [a.status_code for a in before] == [200] * 4, before[0].text
        if outage == "stopped":
            postgres.stop()
        else:
            postgres.freeze()
            # More requests stuck on the database than a replica's default thread pool has threads (6 on
            # 2 cores): they must not starve the requests its caches can answer.
            stuck = ThreadPoolExecutor(16)
            feedback = [stuck.submit(_feedback, replica.url, token, before[0]) for replica in fleet.replicas
                        for _ in range(8)]
        time.sleep(1.5)  # past routing_cache_s: every lookup now asks the database
        during = [chat(fleet.nginx.url, token) for _ in range(4)]
        assert [a.status_code for a in during] == [200] * 4, during[0].text
        never_routed = chat(fleet.nginx.url, token, model="support@2")
        assert never_routed.status_code == 503 and never_routed.headers["retry-after"] == "5", never_routed.text
        error = never_routed.json()["error"]
        assert error["code"] == "database_unavailable" and error["type"] == "service_unavailable"
        for replica in fleet.replicas:
            assert _counter(replica, 'loragate_lookups_stale_total{what="routing"}') > 0
            assert _counter(replica, "loragate_meter_unconfirmed_total") >= 2  # answered, record in memory
        if outage == "stopped":
            postgres.start()
        else:
            postgres.thaw()
        after = chat(fleet.nginx.url, token, model="support@2")
        assert after.status_code == 200, after.text
        if outage == "frozen":  # what waited on the database is done once it answers again
            assert [f.result(timeout=60).status_code for f in feedback] == [200] * 16
            stuck.shutdown()
        ids = [a.headers["x-request-id"] for a in before + during + [after]]
        deadline = time.monotonic() + 30  # the meter writes what it kept at its next flush
        while (missing := set(ids) - _metered(url, ids)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not missing, f"{len(missing)} answered requests have no meter record"
    finally:
        if fleet is not None:
            fleet.stop()
        postgres.remove()


def _feedback(url: str, token: str, answer: httpx.Response) -> httpx.Response:
    """Feedback on an answered request, which waits on the database however long it hangs."""
    return httpx.post(f"{url}/v1/feedback", headers={"authorization": f"Bearer {token}"}, timeout=120,
               json={"request_id": answer.headers["x-request-id"], "score": 1.0})


def test_a_postgresql_server_that_never_answers_fails_a_lookup_within_the_connect_timeout(monkeypatch):
    """A server that accepts connections and then says nothing (a hung host, a black-holed route)
    fails the lookup after ``CONNECT_TIMEOUT_S``, so the caches above can serve on, instead of
    holding a worker thread for good."""
    from sqlalchemy.exc import OperationalError

    from loragate import database

    monkeypatch.setattr(database, "CONNECT_TIMEOUT_S", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nothing ever answers the startup packet
        engine = database.get_engine(f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/silent")
        started = time.monotonic()
        with pytest.raises(OperationalError):
            engine.connect()
        assert time.monotonic() - started < 5
        engine.dispose()


def test_a_query_held_behind_another_sessions_lock_gives_up_within_the_lock_timeout(monkeypatch, fleet_database):
    """A lookup stuck behind a lock (a migration's ALTER TABLE, a session left open in a transaction)
    fails after ``LOCK_TIMEOUT_S`` with an ``OperationalError``, which the caches serve on from."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from loragate import database

    monkeypatch.setattr(database, "LOCK_TIMEOUT_S", 1)
    with psycopg.connect(fleet_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE held (id int)")
    with psycopg.connect(fleet_database) as holder:
        holder.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")  # kept until this block ends
        # An engine of its own (get_engine keeps one per URL), made with the patched timeout.
        engine = database.get_engine(fleet_database + "?application_name=lock-timeout-test")
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"), engine.connect() as conn:
            conn.execute(text("SELECT * FROM held"))
        assert time.monotonic() - started < 5
        engine.dispose()
