"""The engine pool's routing policy on its own (``placement.py``), and the simulation that runs it at
scale (``bench/route_sim.py``, seeded: deterministic, no clock involved)."""

from __future__ import annotations

import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from loragate.gateway.backends.placement import (AffinityPolicy, LeastLoadedPolicy, NoReplica, ReplicaState,
                                                 RoundRobinPolicy, hrw)


def replicas(*holdings: list[str], max_loras: int = 2, loads: list[int] | None = None) -> list[ReplicaState]:
    return [ReplicaState(id=f"r{i}", max_loras=max_loras, resident=OrderedDict((a, t) for t, a in enumerate(held)),
                         load=(loads or [0] * len(holdings))[i]) for i, held in enumerate(holdings)]


def test_a_request_goes_to_the_least_loaded_replica_that_holds_its_adapter():
    pool = replicas(["a"], ["a", "b"], ["c"], loads=[4, 1, 0])  # within `slack` (2) of each other, a tie
    placement = AffinityPolicy(hot_queue=4).choose("a", pool)
    assert (placement.replica, placement.reason, placement.loads) == ("r1", "resident", False)


def test_a_cold_adapter_takes_a_free_slot_before_evicting_anything():
    pool = replicas(["a", "b"], ["c"], ["d", "e"])
    placement = AffinityPolicy().choose("x", pool)
    assert (placement.replica, placement.reason, placement.loads) == ("r1", "free_slot", True)


def test_without_a_free_slot_the_load_evicts_the_adapter_idle_longest_in_the_fleet():
    pool = replicas(["a", "b"], ["c", "d"], ["e", "f"])
    pool[1].resident = OrderedDict([("c", 0), ("d", 9)])  # c: the fleet's least recently used
    pool[0].resident = OrderedDict([("a", 5), ("b", 6)])
    pool[2].resident = OrderedDict([("e", 3), ("f", 7)])
    placement = AffinityPolicy().choose("x", pool)
    assert (placement.replica, placement.reason) == ("r1", "evict")
    assert pool[1].use("x", 10) == "c" and list(pool[1].resident) == ["d", "x"]


def test_a_hot_adapter_is_loaded_on_a_less_busy_replica_too():
    policy = AffinityPolicy(hot_queue=4)
    pool = replicas(["a"], ["b"], loads=[6, 1])
    assert policy.choose("a", pool).reason == "replicate" and policy.choose("a", pool).replica == "r1"
    pool[0].load = 3  # below hot_queue: it stays where it is
    assert policy.choose("a", pool).reason == "resident"


def test_independent_routers_agree_on_an_adapters_home_and_a_leaving_replica_moves_only_its_share():
    pool = [ReplicaState(id=f"http://10.0.0.{i}:8000", max_loras=8) for i in range(8)]
    first = {f"adapter-{n}": AffinityPolicy().choose(f"adapter-{n}", pool).replica for n in range(200)}
    again = {f"adapter-{n}": AffinityPolicy().choose(f"adapter-{n}", pool).replica for n in range(200)}
    assert first == again and len(set(first.values())) == 8
    gone = pool.pop(3).id
    after = {a: AffinityPolicy().choose(a, pool).replica for a in first}
    assert {a for a in first if first[a] != after[a]} == {a for a in first if first[a] == gone}
    assert max(hrw("x", r.id) for r in pool) > 0


def test_round_robin_and_least_loaded_ignore_adapters_and_no_replica_up_is_an_error():
    pool = replicas(["a"], ["b"], ["c"], loads=[2, 0, 1])
    rr = RoundRobinPolicy()
    assert [rr.choose("a", pool).replica for _ in range(4)] == ["r0", "r1", "r2", "r0"]
    assert LeastLoadedPolicy().choose("a", pool).replica == "r1"
    for each in pool:
        each.healthy = False
    with pytest.raises(NoReplica):
        AffinityPolicy().choose("a", pool)


def test_the_simulation_keeps_loads_near_the_oracles_and_queueing_below_round_robins():
    spec = importlib.util.spec_from_file_location("route_sim", Path(__file__).parents[1] / "bench" / "route_sim.py")
    sim = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sim  # its dataclasses look their module up
    spec.loader.exec_module(sim)
    slots, replicas_n, max_loras, load_s, decode_s = 4, 8, 4, 0.9, 0.25
    trace = sim.requests(4000, adapters=200, zipf=1.0, rate=0.5 * replicas_n * slots / decode_s, seed=1)
    results = {name: sim.simulate(trace, policy, replicas_n, max_loras, slots, load_s, decode_s)
               for name, policy in {"affinity": AffinityPolicy(hot_queue=slots), "round_robin": RoundRobinPolicy(),
                                    "oracle": sim.Oracle(trace, hot_queue=slots, slack=2)}.items()}
    assert results["affinity"]["loads_per_1k"] <= 1.5 * results["oracle"]["loads_per_1k"], results
    assert results["affinity"]["queue_p95_ms"] < results["round_robin"]["queue_p95_ms"], results
    assert results["oracle"]["loads_per_1k"] <= results["affinity"]["loads_per_1k"], results


def test_the_pools_view_follows_what_a_replica_lists_but_keeps_what_may_still_be_loading():
    import time

    from loragate.gateway.backends.pool import EnginePool, Replica

    replica = Replica("http://r0", backend=None, state=replicas(["a", "b", "c"], max_loras=3)[0])
    replica.state.active["b"] = 1  # our request for b is there now
    replica.placed["c"] = time.monotonic()  # sent there just now: not listed yet
    EnginePool._correct_adapters(replica, listed=["d"], since=time.monotonic() - 1)
    assert list(replica.state.resident) == ["d", "b", "c"]  # a is gone; d, placed by another gateway, is oldest
    replica.state.active["b"] = 0
    EnginePool._correct_adapters(replica, listed=["d"], since=time.monotonic() + 1)
    assert list(replica.state.resident) == ["d"]
