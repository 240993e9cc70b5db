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
