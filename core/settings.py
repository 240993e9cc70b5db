"""The one typed settings object: environment variables (``LORAGATE_*``) over ``loragate.yaml``.

The YAML file is ``$LORAGATE_CONFIG`` if set, else ``./loragate.yaml``, else
``$LORAGATE_HOME/loragate.yaml``. Nested keys read from the environment with ``__``:
``LORAGATE_GATE__TOLERANCE=0.02``.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class GateSettings(BaseModel):
    """What `promote` demands of a version before an alias may point at it."""

    primary_suite: str = "default"
    primary_metric: str = "exact_match"
    # Allowed drop against the alias's current version, in the metric's own units.
    tolerance: float = 0.01
    aliases: list[str] = Field(
        default_factory=lambda: ["production"],
        description="Aliases guarded by the gate; others (e.g. candidate) move freely.",
    )


class DeploymentSettings(BaseModel):
    """The use the licence check is made against."""

    commercial: bool = True
    monthly_active_users: int | None = None


def _default_home() -> Path:
    return Path.home() / ".loragate"


def _config_file() -> Path | None:
    # Read before Settings exists, so these two variables are the only direct env reads.
    explicit = os.environ.get("LORAGATE_CONFIG")
    if explicit:
        return Path(explicit)
    for candidate in (
        Path("loragate.yaml"),
        Path(os.environ.get("LORAGATE_HOME", _default_home())) / "loragate.yaml",
    ):
        if candidate.is_file():
            return candidate
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LORAGATE_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(default_factory=_default_home)
    database_url: str | None = None
    user: str = Field(default_factory=getpass.getuser)
    gate: GateSettings = Field(default_factory=GateSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file()
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL; SQLite in the home unless told otherwise."""
        if self.database_url:
            url = self.database_url
            # Plain postgres URLs get the psycopg 3 driver we ship.
            for prefix in ("postgresql://", "postgres://"):
                if url.startswith(prefix):
                    return "postgresql+psycopg://" + url[len(prefix):]
            return url
        return f"sqlite:///{self.home / 'registry.db'}"

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
