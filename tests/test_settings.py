"""The one settings object: defaults, loragate.yaml, and environment variables over both."""

from pathlib import Path

from loragate.settings import Settings


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for var in ("LORAGATE_HOME", "LORAGATE_DATABASE_URL", "LORAGATE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings()
    assert settings.home == Path.home() / ".loragate"
    assert settings.resolved_database_url == f"sqlite:///{Path.home() / '.loragate' / 'registry.db'}"
    assert settings.gate.aliases == ["production"] and settings.deployment.commercial


def test_yaml_file_then_environment(monkeypatch, tmp_path):
    config = tmp_path / "loragate.yaml"
    config.write_text(
        "home: /srv/loragate\n"
        "database_url: postgresql://u@db/loragate\n"
        "gate:\n  primary_suite: support-qa\n  tolerance: 0.05\n"
        "deployment:\n  monthly_active_users: 5000\n"
    )
    monkeypatch.setenv("LORAGATE_CONFIG", str(config))
    monkeypatch.delenv("LORAGATE_HOME", raising=False)
    monkeypatch.delenv("LORAGATE_DATABASE_URL", raising=False)
    settings = Settings()
    assert settings.home == Path("/srv/loragate") and settings.gate.primary_suite == "support-qa"
    assert settings.gate.tolerance == 0.05 and settings.deployment.monthly_active_users == 5000
    # psycopg 3 is the driver we ship; plain postgres URLs are given it.
    assert settings.resolved_database_url == "postgresql+psycopg://u@db/loragate"

    monkeypatch.setenv("LORAGATE_GATE__TOLERANCE", "0.2")
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path))
    settings = Settings()
    assert settings.gate.tolerance == 0.2 and settings.home == tmp_path
    assert settings.gate.primary_suite == "support-qa"  # the rest of the YAML still applies


def test_yaml_in_the_home_is_found(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORAGATE_CONFIG", raising=False)
    monkeypatch.setenv("LORAGATE_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "loragate.yaml").write_text("user: yaml-user\n")
    assert Settings().user == "yaml-user"
