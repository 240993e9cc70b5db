"""API keys against a real gateway: Bearer auth, scopes, per-key models, rate limits, revocation."""

import json
import time

import httpx
import openai
import pytest

from .conftest import BASE_ID, run_cli
from .gateway_server import GatewayServer

pytestmark = pytest.mark.model
pytest.importorskip("xllamacpp")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("keys") / "home"


def test_without_keys_the_gateway_refuses_a_public_address(home):
    done = run_cli(home, "gateway", "serve", "--host", "0.0.0.0", expect=2)
    assert "only on loopback" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def keys(home):
    ids = {}

    def create(*args):
        created = json.loads(run_cli(home, "keys", "create", *args, "--json").stdout)
        ids[created["key"]] = created["id"]
        return created["key"]

    created = {"user": create("--name", "app", "--rpm", "3"), "admin": create("--name", "ops", "--scope", "admin"),
               "narrow": create("--name", "narrow", "--model", "someone-else"),
               "revoked": create("--name", "old")}
    listed = json.loads(run_cli(home, "keys", "list", "--json").stdout)
    assert {k["name"] for k in listed} == {"app", "ops", "narrow", "old"}
    assert all("key_sha256" not in k and created["user"] not in json.dumps(k) for k in listed)
    run_cli(home, "keys", "revoke", ids[created["revoked"]])
    return created


@pytest.fixture(scope="module")
def server(home, keys):
    gateway = GatewayServer(home).start()
    yield gateway
    gateway.stop()


def _chat(server, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": BASE_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})


def test_missing_wrong_and_revoked_keys_get_401(server, keys):
    for key in (None, "lg_nope_nope", keys["revoked"]):
        response = _chat(server, key)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_admin_routes_need_an_admin_key(server, keys):
    body = {"adapter": "nothing", "candidate": 2, "weight": 5}
    denied = httpx.post(f"{server.url}/admin/rollouts", json=body, timeout=10,
                        headers={"Authorization": f"Bearer {keys['narrow']}"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_required"
    allowed = httpx.post(f"{server.url}/admin/rollouts", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {keys['admin']}"})
    assert allowed.status_code == 404 and "no adapter named 'nothing'" in allowed.json()["error"]["message"]


def test_a_key_sees_and_uses_only_its_models(server, keys):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=keys["narrow"], max_retries=0)
    assert client.models.list().data == []
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=BASE_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    admin = openai.OpenAI(base_url=f"{server.url}/v1", api_key=keys["admin"], max_retries=0)
    assert [m.id for m in admin.models.list().data] == [BASE_ID]


def test_requests_per_minute_limit_gives_429_with_retry_after(server, keys):
    statuses = [_chat(server, keys["user"]) for _ in range(4)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = statuses[3]
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["retry-after"]) <= 60


def test_revocation_reaches_a_running_gateway(home, server, keys):
    fresh = json.loads(run_cli(home, "keys", "create", "--name", "temp", "--json").stdout)
    assert _chat(server, fresh["key"]).status_code == 200
    run_cli(home, "keys", "revoke", fresh["id"])
    time.sleep(5.5)  # replicas cache a verified key for 5 s
    assert _chat(server, fresh["key"]).status_code == 401


CONFIGURED_TOKEN = "deploy-secret-" + "k" * 32


def test_a_configured_admin_key_lets_a_new_deployment_serve_and_make_keys_over_http(tmp_path):
    """As the compose file and the Helm chart run it: the admin key comes from a secret in the
    environment, the gateway listens beyond loopback from its first start on an empty database, and
    clients' keys are made, listed and revoked over HTTP with it."""
    home = tmp_path / "home"
    env = {"LORAGATE_GATEWAY__ADMIN_KEY": CONFIGURED_TOKEN, "LORAGATE_GATEWAY__HOST": "0.0.0.0"}
    admin = {"Authorization": f"Bearer {CONFIGURED_TOKEN}"}
    gateway = GatewayServer(home, **env).start()
    try:
        made = httpx.post(f"{gateway.url}/admin/keys", json={"name": "team-a", "rpm": 5}, headers=admin, timeout=10)
        assert made.status_code == 201, made.text
        created = made.json()
        assert created["scope"] == "user" and created["rpm"] == 5 and created["key"].startswith(created["id"])
        assert _chat(gateway, created["key"]).status_code == 200
        as_user = httpx.get(f"{gateway.url}/admin/keys", headers={"Authorization": f"Bearer {created['key']}"})
        assert as_user.status_code == 403 and as_user.json()["error"]["code"] == "admin_required"
        assert httpx.get(f"{gateway.url}/admin/keys").status_code == 401
        listed = httpx.get(f"{gateway.url}/admin/keys", headers=admin, timeout=10)
        assert sorted((k["name"], k["scope"]) for k in listed.json()) == [("admin (gateway.admin_key)", "admin"),
                                                                         ("team-a", "user")]
        assert created["key"] not in listed.text and CONFIGURED_TOKEN not in listed.text
        assert "key_sha256" not in listed.text
        empty = httpx.post(f"{gateway.url}/admin/keys", json={"name": ""}, headers=admin, timeout=10)
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "name", empty.text
        revoked = httpx.delete(f"{gateway.url}/admin/keys/{created['id']}", headers=admin, timeout=10)
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        unknown = httpx.delete(f"{gateway.url}/admin/keys/lg_nope", headers=admin, timeout=10)
        assert unknown.status_code == 404 and "lg_nope" in unknown.json()["error"]["message"], unknown.text
    finally:
        gateway.stop()
    # Restarted (a rollout of the Deployment, a second replica): the key is found, not made again.
    GatewayServer(home, **env).start().stop()
    listed = json.loads(run_cli(home, "keys", "list", "--json").stdout)
    assert [k["name"] for k in listed].count("admin (gateway.admin_key)") == 1
    audit = json.loads(run_cli(home, "registry", "audit", "--json").stdout)
    assert [e["action"] for e in audit if e["target"] == listed[0]["id"]] == ["key.create"]


def test_replicas_starting_together_make_the_configured_admin_key_once_and_a_revoked_one_stays_revoked(settings):
    from concurrent.futures import ThreadPoolExecutor

    from pydantic import SecretStr

    from loragate.gateway.keys import KeyStore
    from loragate.registry import Registry

    settings.gateway.admin_key = SecretStr(CONFIGURED_TOKEN)
    replicas = [KeyStore(Registry(settings)) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(KeyStore.ensure_configured, replicas))
    assert len({k.id for k in made}) == 1 and made[0].scope == "admin"
    keys = replicas[0]
    assert keys.verify(CONFIGURED_TOKEN).id == made[0].id
    assert [e.action for e in keys.registry.audit_log(target=made[0].id)] == ["key.create"]
    keys.revoke(made[0].id)
    again = keys.ensure_configured()
    assert again.id == made[0].id and again.revoked_at is not None
    assert [k.id for k in keys.list()] == [made[0].id]
