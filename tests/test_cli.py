"""The `loragate registry` CLI as a user runs it: the installed entry point, in a subprocess."""

import json
import os
import subprocess

import pytest

from .conftest import BASE_CONFIG, BASE_ID, HUB_ID, make_adapter


@pytest.fixture
def cli(tmp_path, database_url):
    env = {**os.environ, "LORAGATE_HOME": str(tmp_path / "home"), "LORAGATE_DATABASE_URL": database_url,
           "LORAGATE_USER": "cli-user", "COLUMNS": "200"}

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
        done = subprocess.run(["loragate", *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == expect, (args, done.stdout, done.stderr)
        return done

    return run


@pytest.fixture
def with_base(cli, tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BASE_CONFIG))
    cli("registry", "base", "add", BASE_ID, "--source", str(folder), "--hub-id", HUB_ID, "--folder", str(folder))
    return cli


def _json_file(path, payload):
    path.write_text(json.dumps(payload))
    return str(path)


def test_help_lists_every_operation(cli):
    out = cli("registry", "--help").stdout
    for command in ("register", "list", "show", "diff", "eval", "alias", "promote", "rollback", "export", "gc",
                    "publish", "pull", "audit", "base", "licence"):
        assert command in out
    assert "add-baseline" in cli("registry", "eval", "--help").stdout


def test_full_lifecycle_through_the_cli(with_base, tmp_path):
    cli = with_base
    data = "t" * 64
    cli("registry", "contamination", data, "--passed", "--method", "exact-hash")
    for i in range(2):
        folder = make_adapter(tmp_path / f"a{i}", seed=i, r=4 + 4 * i)
        out = cli("registry", "register", "support", str(folder), "--base", BASE_ID, "--data-sha256", data,
                  "--json")
        assert json.loads(out.stdout)["version"] == i + 1
    scores = {"suite": "default", "metrics": {"exact_match": 0.2}, "sample_count": 40, "eval_data_sha256": "e" * 64}
    cli("registry", "eval", "add-baseline", BASE_ID, _json_file(tmp_path / "base.json", scores))
    scores["metrics"] = {"exact_match": 0.8}
    cli("registry", "eval", "add", "support@2", _json_file(tmp_path / "v2.json", scores))

    dry = json.loads(cli("registry", "promote", "support@1", "--dry-run", "--json").stdout)
    assert dry["passed"] is False and "no score" in dry["reasons"][0]
    refused = cli("registry", "promote", "support@1", expect=2)
    assert refused.stderr.strip().startswith("error: promotion of support@1 refused: no score")
    assert "Traceback" not in refused.stderr
    assert "promoted" in cli("registry", "promote", "support@2").stdout

    shown = json.loads(cli("registry", "show", "support", "--json").stdout)
    assert shown["version"] == 2 and shown["aliases"] == ["production"] and shown["evals"][0]["value"] == 0.8
    listed = json.loads(cli("registry", "list", "--json").stdout)
    assert [v["version"] for v in listed] == [1, 2]
    assert "support@2" in cli("registry", "list").stdout
    diff = {r["field"]: r for r in json.loads(cli("registry", "diff", "support@1", "support@2", "--json").stdout)}
    assert (diff["r"]["a"], diff["r"]["b"]) == (4, 8)

    cli("registry", "alias", "set", "support@1", "candidate")
    assert "support@1" in cli("registry", "show", "support@candidate").stdout
    cli("registry", "promote", "support@1", "--force", "--reason", "incident 7")
    assert "support@2" in cli("registry", "rollback", "support").stdout
    cli("registry", "export", "support@2", str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    gc = json.loads(cli("registry", "gc", "--json").stdout)
    assert gc["removed"] == [] and gc["kept"] == 2

    audit = json.loads(cli("registry", "audit", "--json", "--limit", "100").stdout)
    actions = [e["action"] for e in audit]
    assert {"register", "eval.add", "promote", "promote.forced", "rollback", "alias.set"} <= set(actions)
    assert all(e["actor"] == "cli-user" for e in audit)
    assert any(e["outcome"] == "refused" for e in audit)


@pytest.mark.parametrize(
    "args",
    [
        ("registry", "show", "nothing@1"),
        ("registry", "show", "bad name"),
        ("registry", "rollback", "nothing"),
        ("registry", "register", "x", "/no/such/folder", "--base", BASE_ID),
        ("registry", "register", "x", "/tmp", "--base", "unknown-base"),
        ("registry", "promote", "x@1", "--force"),
        ("registry", "eval", "add", "x@1", "/no/such/file.json"),
        ("registry", "alias", "set", "x@1", "production"),
    ],
)
def test_user_errors_exit_2_with_one_line(with_base, args):
    done = with_base(*args, expect=2)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr


def test_bad_eval_file_is_a_one_line_error(with_base, tmp_path):
    folder = make_adapter(tmp_path / "a")
    with_base("registry", "register", "x", str(folder), "--base", BASE_ID)
    bad = _json_file(tmp_path / "bad.json", {"suite": "s", "metrics": {}, "sample_count": 0})
    done = with_base("registry", "eval", "add", "x@1", bad, expect=2)
    assert done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1


def test_licences_and_bases_list(with_base):
    licences = json.loads(with_base("registry", "licence", "list", "--json").stdout)
    assert {"apache-2.0", "llama3", "gemma"} <= {li["id"] for li in licences}
    with_base("registry", "licence", "add", "acme", "--name", "ACME", "--non-commercial")
    assert "acme" in with_base("registry", "licence", "list").stdout
    bases = json.loads(with_base("registry", "base", "list", "--json").stdout)
    assert bases[0]["architecture"] == "LlamaForCausalLM"
