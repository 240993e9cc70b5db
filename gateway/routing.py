"""From the ``model`` a client asks for to the adapter version, arm and files that serve it.

``name`` follows the active rollout (sticky per user) or else production; ``name@N`` pins;
``name@alias`` follows the alias; a base model's own id serves the base with no adapter.
Lookups are cached for ``routing_cache_s`` so a replica does not ask the database per request, and
serve on while the database is away (``lookup_cache``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from loragate.registry import InvalidInput, NotFound, OutputCheck, Registry, VersionRef
from loragate.registry.errors import ArtifactCorrupt, StoreUnavailable

from .backends.base import AdapterHandle, Backend
from .errors import GatewayError
from .lookup_cache import LookupCache, must_wait
from .rollouts import CANDIDATE, PRODUCTION, RolloutService, assign_arm

GGUF_LORA_FILE = "adapter.gguf"
PEFT = "peft"  # a backend that loads the version's own adapter folder, as registered (vLLM)


@dataclass(frozen=True)
class ServedModel:
    id: str
    created: int  # unix seconds: when the production version was registered, or the gateway started
    owned_by: str
    base_model: str | None = None  # adapters only
    production_version: int | None = None
    served_weights: str | None = None  # the base weights the backend serves (a GGUF file's name on llama.cpp)


def _unix(moment: datetime) -> int:
    return int(moment.replace(tzinfo=moment.tzinfo or timezone.utc).timestamp())  # SQLite gives naive UTC


@dataclass(frozen=True)
class Route:
    model: str
    base_model: str
    arm: str  # production | candidate | pinned | alias | base | upstream
    backend: str
    adapter: str | None = None
    version: int | None = None
    rollout_id: int | None = None
    output_check: OutputCheck | None = None  # the version's, applied to every answer it serves
    shadow_version: int | None = None  # a shadow rollout's candidate, to answer a copy of this request


class Router:
    def __init__(self, registry: Registry, rollouts: RolloutService, backend: Backend, cache_s: float,
                 upstreams: list[Backend] = (), stale: MetricWrapperBase | None = None):
        self.registry, self.rollouts, self.backend = registry, rollouts, backend
        self.upstreams = {u.base_model: u.name for u in upstreams}
        self._lookups = LookupCache(cache_s, registry.settings.gateway.lookup_wait_s, stale)
        self._handles: dict[tuple[str, int], AdapterHandle] = {}
        self._started = time.time()

    def served_models(self) -> list[ServedModel]:
        """The base, every adapter with a production alias and the upstreams, as /v1/models lists them."""
        started = int(self._started)
        production = {v.name: v for v in self.registry.list_versions() if PRODUCTION in v.aliases}
        weights = self.backend.weights
        return [ServedModel(id=self.backend.base_model, created=started, owned_by="loragate", served_weights=weights),
                *(ServedModel(id=name, created=_unix(v.created_at), owned_by="loragate",
                              base_model=v.base_model, production_version=v.version, served_weights=weights)
                  for name, v in sorted(production.items())),
                *(ServedModel(id=name, created=started, owned_by="upstream") for name in sorted(self.upstreams))]

    def serving_handles(self) -> list[AdapterHandle]:
        """The files of every version that serves traffic now (production, rollout candidates), for a
        backend to load before the first request; versions whose files fail are left to their requests."""
        versions = {(v.name, v.version) for v in self.registry.list_versions() if PRODUCTION in v.aliases}
        versions |= {(r.adapter_name, r.candidate_version) for r in self.rollouts.all_active()}
        handles = []
        for name, version in sorted(versions):
            try:
                handles.append(self.handle(Route(model=name, base_model=self.backend.base_model, arm=PRODUCTION,
                                                 backend=self.backend.name, adapter=name, version=version)))
            except GatewayError:
                continue
        return handles

    def resolve(self, model: str, user_key: str) -> Route:
        if model == self.backend.base_model:
            return Route(model=model, base_model=model, arm="base", backend=self.backend.name)
        if model in self.upstreams:
            return Route(model=model, base_model=model, arm="upstream", backend=self.upstreams[model])
        try:
            ref = VersionRef.parse(model)
        except InvalidInput:
            raise GatewayError(404, f"The model '{model}' does not exist", code="model_not_found", param="model")
        arm, version, rollout_id, shadow = self._pick_version(model, ref, user_key)
        return Route(model=model, base_model=self.backend.base_model, arm=arm, backend=self.backend.name,
                     adapter=ref.name, version=version, rollout_id=rollout_id, shadow_version=shadow,
                     output_check=self._lookups.get(("output_check", ref.name, version),
                                                    lambda: self._output_check(f"{ref.name}@{version}")))

    def handle(self, route: Route) -> AdapterHandle | None:
        """The adapter files for a route, sha256-checked on first use (metered, unlike resolve). A
        version is immutable, so its handle is kept; backends check the files again when they load
        them (``AdapterHandle.verify``)."""
        if route.adapter is None:
            return None
        key = (route.adapter, route.version)
        if key not in self._handles:
            must_wait()  # the store: a first hash check
            self._handles[key] = self._handle(route.adapter, route.version)
        return self._handles[key]

    def _pick_version(self, model: str, ref: VersionRef, user_key: str) -> tuple[str, int, int | None, int | None]:
        """(arm, version, rollout id, shadow version)."""
        if ref.version is not None:
            return "pinned", ref.version, None, None
        if "@" not in model:  # a bare name: an active rollout decides, else production
            rollout = self._lookups.get(("rollout", ref.name), lambda: self.rollouts.active(ref.name))
            if rollout is not None:
                arm = assign_arm(rollout.id, user_key, rollout.weight)
                if rollout.mode == "shadow":  # production answers; the sampled also go to the candidate, unseen
                    shadow = rollout.candidate_version if arm == CANDIDATE else None
                    return PRODUCTION, rollout.production_version, rollout.id, shadow
                chosen = rollout.candidate_version if arm == CANDIDATE else rollout.production_version
                return arm, chosen, rollout.id, None
        alias = ref.alias or PRODUCTION
        version = self._lookups.get(("alias", ref.name, alias), lambda: self._alias_version(model, ref))
        return (PRODUCTION if alias == PRODUCTION else "alias"), version, None, None

    def _output_check(self, ref: str) -> OutputCheck | None:
        try:
            return self.registry.get(ref).output_check
        except NotFound:
            return None  # `handle` answers the 404, metered

    def _alias_version(self, model: str, ref: VersionRef) -> int:
        try:
            return self.registry.get(str(ref)).version
        except NotFound as exc:
            raise GatewayError(404, f"The model '{model}' does not exist ({exc})", code="model_not_found",
                               param="model") from exc

    def _handle(self, name: str, version: int) -> AdapterHandle:
        return adapter_handle(self.registry, self.backend, f"{name}@{version}")


def adapter_handle(registry: Registry, backend: Backend, ref: str) -> AdapterHandle:
    """The files ``backend`` loads for version ``ref``, hash-checked: its peft folder (vLLM) or its
    derived artifact of the backend's kind (the GGUF LoRA on llama.cpp)."""
    try:
        info = registry.get(ref)
    except NotFound as exc:
        raise GatewayError(404, f"The model '{ref}' does not exist", code="model_not_found") from exc
    if info.base_model != backend.base_model:
        raise GatewayError(400, f"{ref} is an adapter for {info.base_model}, which no backend serves",
                           code="model_not_served", param="model")
    sha256 = info.artifact_sha256 if backend.artifact_kind == PEFT else _derived_sha256(registry, backend, ref)
    if backend.fetches_artifacts:
        # The engine resolves name@N from the store's record: make sure it is there (register wrote
        # it, unless that process died right after its commit).
        with _store_errors(ref):
            registry.publish_version(info)
        return AdapterHandle(key=ref, sha256=sha256, path=None)
    store = registry.store

    def verify() -> Path:
        with _store_errors(ref):
            return store.open(sha256)  # the folder (fetched into the cache if need be), after a full hash check

    folder = verify()  # before any backend loads it
    return AdapterHandle(key=ref, sha256=sha256, path=next(folder.glob("*.gguf"), folder), verify=verify)


@contextmanager
def _store_errors(ref: str) -> Iterator[None]:
    """What the store raises, as the 503 a client sees (the version exists; its files cannot be had)."""
    try:
        yield
    except ArtifactCorrupt as exc:
        raise GatewayError(503, f"{ref}: stored artifact failed its sha256 check", code="artifact_corrupt") from exc
    except NotFound as exc:
        raise GatewayError(503, f"{ref}: its artifact is missing from the store", code="artifact_missing") from exc
    except StoreUnavailable as exc:
        raise GatewayError(503, f"{ref}: the artifact store is unavailable; try again shortly",
                           code="store_unavailable") from exc


def _derived_sha256(registry: Registry, backend: Backend, ref: str) -> str:
    artifact = next((a for a in registry.derived_artifacts(ref) if a.kind == backend.artifact_kind), None)
    if artifact is None:
        raise GatewayError(503, f"{ref} has no {backend.artifact_kind} artifact for the {backend.name} "
                                f"backend; run `loragate quantize lora-gguf {ref}`", code="artifact_missing")
    return artifact.sha256
