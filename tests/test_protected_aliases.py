"""Protected aliases: only the actors an alias's policy names may move it, on every path (the
Python API, the CLI, the admin API of a real gateway); every refusal is audited and moves nothing."""

import json

import httpx
import pytest

from loragate.registry import Actor, EvalInput, Forbidden, Registry, Webhooks
from loragate.settings import AliasPolicy, GateSettings, Settings

from .conftest import BASE_ID, HUB_ID, run_cli
from .webhook_receiver import Receiver

POLICY = {"production": {"admin_keys": False, "keys": ["ci"], "os_users": ["release"]}}


def _scored_versions(registry: Registry, adapter_factory) -> None:
    """support@1 and @2, each fit for production; @1 is production, put there by `release`."""
    registry.record_contamination_check("t" * 64, passed=True, method="exact-hash")
    registry.add_eval(EvalInput(suite="default", metrics={"exact_match": 0.3}, sample_count=50,
                                eval_data_sha256="d" * 64), base=BASE_ID, subject="base")
    for value in (0.7, 0.8):
        version = registry.register("support", adapter_factory(), base=BASE_ID, training_data_sha256="t" * 64)
        registry.add_eval(EvalInput(suite="default", metrics={"exact_match": value}, sample_count=50,
                                    eval_data_sha256="d" * 64), ref=version.ref)
    release = registry.settings.model_copy(update={"user": "release"})
    Registry(release).promote("support@1", to="production")


@pytest.fixture
def protected(settings, base_folder, adapter_factory):
    settings = settings.model_copy(update={"gate": GateSettings(protected_aliases=POLICY)})
    registry = Registry(settings)
    registry.add_base_model(BASE_ID, source=str(base_folder), hub_id=HUB_ID, folder=base_folder)
    _scored_versions(registry, adapter_factory)
    return registry


def test_only_the_named_actors_move_a_protected_alias(protected):
    tester = protected  # settings.user is "tester": not in the policy
    for attempt in (lambda r: r.promote("support@2"), lambda r: r.rollback("support"),
                    lambda r: r.promote("support@2", force=True, reason="hotfix")):
        with pytest.raises(Forbidden, match="production is protected: tester may not move it"):
            attempt(tester)
    with pytest.raises(Forbidden, match="key:ops may not move it"):
        protected.acting_as(Actor(kind="key", name="ops", admin=True)).promote("support@2")  # admin, not named
    assert protected.get("support").version == 1  # nothing moved
    refused = [e for e in protected.audit_log(target="support@production") if e.outcome == "refused"]
    assert [(e.actor, e.action) for e in refused] == [("tester", "promote"), ("tester", "rollback"),
                                                      ("tester", "promote.forced"), ("key:ops", "promote")]
    assert all("allowed: key ci, OS user release, rollouts" in e.reason for e in refused)

    protected.acting_as(Actor(kind="key", name="ci")).promote("support@2")
    assert protected.get("support").version == 2
    assert protected.alias_history("support", "production")[-1].actor == "key:ci"
    Registry(protected.settings.model_copy(update={"user": "release"})).rollback("support")
    assert protected.get("support").version == 1
    protected.acting_as(Actor(kind="rollout", name="support")).promote("support@2")  # the ramp's own promotion
    assert protected.get("support").version == 2
    protected.set_alias("support@1", "candidate")  # an alias without a policy moves as before


def test_production_is_protected_by_default_once_any_policy_exists():
    gate = GateSettings(protected_aliases={"staging": AliasPolicy(os_users=["ana"])})
    assert gate.policy("production") == AliasPolicy() and gate.policy("staging").os_users == ["ana"]
    assert gate.policy("candidate") is None and GateSettings().policy("production") is None


def test_the_cli_is_refused_with_the_reason_and_moves_nothing(protected):
    home = protected.settings.home
    env_policy = {"LORAGATE_GATE__PROTECTED_ALIASES": json.dumps(POLICY), "LORAGATE_USER": "tester",
                  "LORAGATE_DATABASE_URL": protected.settings.resolved_database_url}
    for args in (("registry", "promote", "support@2"), ("registry", "rollback", "support")):
        done = run_cli(home, *args, expect=2, env=env_policy)
        assert "production is protected: tester may not move it" in done.stderr and "Traceback" not in done.stderr
    assert protected.get("support").version == 1
    run_cli(home, "registry", "promote", "support@2", env={**env_policy, "LORAGATE_USER": "release"})
    assert protected.get("support").version == 2


@pytest.mark.model
def test_the_admin_api_asks_the_policy_about_the_calling_key(tmp_path, base_folder, adapter_factory):
    pytest.importorskip("xllamacpp")
    from .gateway_server import GatewayServer

    home = tmp_path / "gateway-home"
    settings = Settings(home=home, user="tester", gate=GateSettings(protected_aliases=POLICY))
    registry = Registry(settings)
    registry.add_base_model(BASE_ID, source=str(base_folder), hub_id=HUB_ID, folder=base_folder)
    _scored_versions(registry, adapter_factory)
    keys = {name: json.loads(run_cli(home, "keys", "create", "--name", name, "--scope", "admin", "--json").stdout)["key"]
            for name in ("ops", "ci")}
    with Receiver() as receiver, GatewayServer(home, LORAGATE_GATE__PROTECTED_ALIASES=json.dumps(POLICY)) as server:
        receiver.secret = Webhooks(registry).add(receiver.url).secret  # the gateway sends its events

        def post(path, key, body):
            return httpx.post(f"{server.url}/admin/adapters/support/{path}", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {key}"})

        for path, body in (("promote", {"version": 2}), ("rollback", {})):
            refused = post(path, keys["ops"], body)
            error = refused.json()["error"]
            assert refused.status_code == 403 and error["type"] == "permission_error", refused.text
            assert "production is protected: key:ops may not move it" in error["message"]
        assert registry.get("support").version == 1
        promoted = post("promote", keys["ci"], {"version": 2, "reason": "release 2"})
        assert promoted.status_code == 200 and promoted.json()["passed"], promoted.text
        assert registry.get("support").version == 2
        rolled_back = post("rollback", keys["ci"], {"reason": "smoke test failed"})
        assert rolled_back.status_code == 200 and rolled_back.json()["version"] == 1
        events = receiver.wait_for(4)
    assert [(e["type"], e["data"]["actor"]) for e in events] == [
        ("promotion.refused", "key:ops"), ("promotion.refused", "key:ops"), ("alias.moved", "key:ci"),
        ("alias.moved", "key:ci")] and receiver.rejected == []
    actors = [(e.actor, e.action, e.outcome) for e in registry.audit_log(target="support@production")]
    assert ("key:ops", "promote", "refused") in actors and ("key:ops", "rollback", "refused") in actors
    assert [c.actor for c in registry.alias_history("support", "production")][-2:] == ["key:ci", "key:ci"]
