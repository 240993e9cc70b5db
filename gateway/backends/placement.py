"""Which engine replica serves a request: the routing policy of an engine pool, on its own.

It sees each replica as a ``ReplicaState`` (the adapters it holds, least recently used first, its
adapter slots and its load) and returns a ``Placement``. It knows nothing of HTTP, so the pool
(``pool.py``) and the simulation (``bench/route_sim.py``) run the same code.

``AffinityPolicy``, in order:

1. a replica that holds the adapter, the least loaded of them (reason ``resident``), unless all of
   them have ``hot_queue`` requests or more and another replica has ``hot_queue`` fewer: the adapter
   is then loaded there too (``replicate``), so a popular adapter spreads over as many replicas as
   its traffic needs;
2. else a replica with a free adapter slot (``free_slot``), else one that must evict (``evict``):
   one whose least recently used adapter, which its engine evicts, has no request there now (else
   those would need it loaded again), and of those the one whose victim has been idle longest in the
   whole fleet (an engine picks the victim within itself; the router picks among engines).

Among replicas whose load is within ``slack`` of the least loaded, ties go by rendezvous hashing
(highest ``hrw(adapter, replica)``): every gateway replica picks the same home for an adapter
without talking to the others, and a replica that joins or leaves moves only its share.

Both arms of an A/B rollout are adapter versions like any other, placed by the same rules: neither
pays more loads than its traffic causes.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

BASE = None  # a request for the base model, no adapter


class NoReplica(Exception):
    """No replica is up."""


@dataclass
class ReplicaState:
    """What the router knows of one replica."""

    id: str
    max_loras: int
    # Adapter -> when it last ran here (the policy's clock), least recently used first.
    resident: OrderedDict[str, int] = field(default_factory=OrderedDict)
    load: int = 0  # requests in flight or waiting there
    healthy: bool = True
    active: Counter[str] = field(default_factory=Counter)  # requests in flight or waiting there, by adapter

    def has_free_slot(self) -> bool:
        return len(self.resident) < self.max_loras

    def eviction_cost(self) -> tuple[bool, int]:
        """What a load here would cost others: whether the adapter it evicts still has requests here
        (they would need it loaded again), and when that adapter last ran (older is cheaper)."""
        if self.has_free_slot():
            return False, -1
        victim, used_at = next(iter(self.resident.items()))
        return self.active[victim] > 0, used_at

    def use(self, adapter: str | None, now: int) -> str | None:
        """Record that ``adapter`` runs here at ``now`` (the engine loads it if need be); the adapter
        the engine evicts to make room, if any: its least recently used, as vLLM and llama.cpp do."""
        if adapter is None:
            return None
        evicted = None
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
        elif not self.has_free_slot():
            evicted = self.resident.popitem(last=False)[0]
        self.resident[adapter] = now
        return evicted


@dataclass(frozen=True)
class Placement:
    replica: str
    reason: str  # resident | replicate | free_slot | evict | base | round_robin | least_loaded
    loads: bool  # the adapter is not resident there: the engine loads it first


def hrw(adapter: str | None, replica: str) -> int:
    """The rendezvous (highest random weight) score of a replica for an adapter."""
    digest = hashlib.blake2b(f"{adapter}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Policy(Protocol):
    def choose(self, adapter: str | None, replicas: list[ReplicaState]) -> Placement: ...


def _up(replicas: list[ReplicaState]) -> list[ReplicaState]:
    up = [r for r in replicas if r.healthy]
    if not up:
        raise NoReplica("no engine replica is up")
    return up


def _placement(replica: ReplicaState, adapter: str | None, reason: str) -> Placement:
    return Placement(replica.id, reason, loads=adapter is not None and adapter not in replica.resident)


class AffinityPolicy:
    def __init__(self, hot_queue: int = 4, slack: int = 2):
        self.hot_queue, self.slack = hot_queue, slack

    def choose(self, adapter: str | None, replicas: list[ReplicaState]) -> Placement:
        up = _up(replicas)
        if adapter is None:
            return _placement(self._home(adapter, up), adapter, "base")
        holders = [r for r in up if adapter in r.resident]
        if holders:
            best = self._home(adapter, holders)
            others = [r for r in up if adapter not in r.resident]
            if best.load >= self.hot_queue and others:
                spare = self._new_home(adapter, others)
                if spare.load + self.hot_queue <= best.load:
                    return _placement(spare, adapter, "replicate")
            return _placement(best, adapter, "resident")
        home = self._new_home(adapter, up)
        return _placement(home, adapter, "free_slot" if home.has_free_slot() else "evict")

    def _home(self, adapter: str | None, candidates: list[ReplicaState]) -> ReplicaState:
        """The highest-ranked (rendezvous) replica among those within ``slack`` of the least load."""
        least = min(r.load for r in candidates)
        near = [r for r in candidates if r.load <= least + self.slack]
        return max(near, key=lambda r: hrw(adapter, r.id))

    def _new_home(self, adapter: str, candidates: list[ReplicaState]) -> ReplicaState:
        least = min(r.load for r in candidates)
        near = [r for r in candidates if r.load <= least + self.slack]
        free = [r for r in near if r.has_free_slot()]
        if free:
            return max(free, key=lambda r: hrw(adapter, r.id))
        cheapest = min(r.eviction_cost() for r in near)
        return max((r for r in near if r.eviction_cost() == cheapest), key=lambda r: hrw(adapter, r.id))


class RoundRobinPolicy:
    """What a plain load balancer does: the next replica, whatever it holds."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, adapter: str | None, replicas: list[ReplicaState]) -> Placement:
        up = _up(replicas)
        return _placement(up[next(self._turn) % len(up)], adapter, "round_robin")


class LeastLoadedPolicy:
    """The replica with the fewest requests, whatever it holds (ties: the first)."""

    def choose(self, adapter: str | None, replicas: list[ReplicaState]) -> Placement:
        return _placement(min(_up(replicas), key=lambda r: r.load), adapter, "least_loaded")


POLICIES = {"affinity": AffinityPolicy, "round_robin": RoundRobinPolicy, "least_loaded": LeastLoadedPolicy}
