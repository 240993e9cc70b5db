"""A SIMULATION of adapter routing at a scale no test machine holds: the real routing code
(``loragate.gateway.backends.placement``) over simulated engine replicas.

Replicas serve ``--slots`` requests at once each, first come first served; a request whose adapter
is not resident where it lands first waits ``--load-ms`` (the load), then decodes for
``--decode-ms``; each replica keeps ``--max-loras`` adapters, evicting the least recently used.
Requests arrive as a Poisson process at ``--utilization`` of the fleet's capacity, for adapters
drawn from a Zipf(``--zipf``) popularity over ``--adapters`` adapters. Take the load and decode
times from ``bench/affinity.py`` on real replicas.

Policies, on the same request sequence:
- affinity: loragate's (``AffinityPolicy``);
- round_robin, least_loaded: what a plain balancer does;
- oracle: knows the future. It sends a request where its adapter is resident (least loaded),
  spreads a hot adapter as affinity does, and when it must load, picks the engine whose evicted
  adapter is next needed last (Belady over the engines' LRU victims: an engine evicts its least
  recently used adapter itself, so no router picks the victim within one).

Reported: adapter loads per 1,000 requests and queueing (arrival to start of decode, the load
included) p50/p95, per policy.

    python bench/route_sim.py                      # 1,000 adapters, 32 replicas, max_loras 8
    python bench/route_sim.py --requests 20000 --load-ms 900 --decode-ms 250
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import random
from collections import defaultdict, deque
from dataclasses import dataclass

from loragate.gateway.backends.placement import POLICIES, AffinityPolicy, Placement, ReplicaState


@dataclass
class Request:
    index: int
    arrival: float
    adapter: str


def requests(count: int, adapters: int, zipf: float, rate: float, seed: int) -> list[Request]:
    rng = random.Random(seed)
    weights = [1 / (rank ** zipf) for rank in range(1, adapters + 1)]
    names = [f"adapter-{i:04d}@1" for i in range(adapters)]
    drawn = rng.choices(names, weights=weights, k=count)
    now, out = 0.0, []
    for i, name in enumerate(drawn):
        now += rng.expovariate(rate)
        out.append(Request(i, now, name))
    return out


class Oracle:
    """Affinity's rules, but loads placed by the future (Belady over the engines' LRU victims)."""

    def __init__(self, trace: list[Request], hot_queue: int, slack: int):
        self.uses: dict[str, list[int]] = defaultdict(list)
        for r in trace:
            self.uses[r.adapter].append(r.index)
        self.affinity = AffinityPolicy(hot_queue, slack)
        self.now = 0  # the index of the request being placed

    def next_use(self, adapter: str) -> int:
        uses = self.uses[adapter]
        at = bisect.bisect_right(uses, self.now)
        return uses[at] if at < len(uses) else 1 << 62

    def choose(self, adapter: str, replicas: list[ReplicaState]) -> Placement:
        placement = self.affinity.choose(adapter, replicas)
        if not placement.loads:
            return placement
        # A load: where it evicts the adapter needed last (or nothing), among the replicas not much busier.
        candidates = [r for r in replicas if adapter not in r.resident]
        least = min(r.load for r in candidates)
        near = [r for r in candidates if r.load <= least + self.affinity.slack]
        # Engines evict their least recently used adapter: the oracle picks the engine, not the victim.
        best = max(near, key=lambda r: (r.has_free_slot(), self.next_use(next(iter(r.resident), ""))))
        return Placement(best.id, placement.reason, loads=True)


def simulate(trace: list[Request], policy, replicas: int, max_loras: int, slots: int, load_s: float,
             decode_s: float) -> dict:
    states = [ReplicaState(id=f"replica-{i:02d}", max_loras=max_loras) for i in range(replicas)]
    by_id = {s.id: s for s in states}
    busy = {s.id: 0 for s in states}
    waiting: dict[str, deque] = {s.id: deque() for s in states}
    events: list[tuple[float, int, str]] = []  # (time, request index, replica): a completion
    waits, loads = [], 0

    def start(replica: str, request: Request, needs_load: bool, now: float) -> None:
        busy[replica] += 1
        by_id[replica].load = busy[replica] + len(waiting[replica])
        service = decode_s + (load_s if needs_load else 0.0)
        waits.append(now - request.arrival + (load_s if needs_load else 0.0))
        heapq.heappush(events, (now + service, request.index, replica))

    def complete_until(t: float) -> None:
        while events and events[0][0] <= t:
            done_at, index, replica = heapq.heappop(events)
            busy[replica] -= 1
            by_id[replica].active[trace[index].adapter] -= 1
            if waiting[replica]:
                request, needs_load = waiting[replica].popleft()
                start(replica, request, needs_load, done_at)
            by_id[replica].load = busy[replica] + len(waiting[replica])

    for request in trace:
        complete_until(request.arrival)
        if isinstance(policy, Oracle):
            policy.now = request.index
        placement = policy.choose(request.adapter, states)
        state = by_id[placement.replica]
        needs_load = request.adapter not in state.resident
        state.use(request.adapter, request.index)
        state.active[request.adapter] += 1
        loads += needs_load
        if busy[state.id] < slots:
            start(state.id, request, needs_load, request.arrival)
        else:
            waiting[state.id].append((request, needs_load))
            state.load = busy[state.id] + len(waiting[state.id])
    complete_until(float("inf"))
    waits.sort()
    return {"loads_per_1k": 1000 * loads / len(trace), "queue_p50_ms": 1000 * waits[len(waits) // 2],
            "queue_p95_ms": 1000 * waits[int(len(waits) * 0.95)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8, help="requests a replica decodes at once")
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--utilization", type=float, default=0.5, help="of the fleet's decode capacity")
    parser.add_argument("--load-ms", type=float, default=900.0, help="an adapter load (bench/affinity.py)")
    parser.add_argument("--decode-ms", type=float, default=250.0, help="one request's decode (bench/affinity.py)")
    parser.add_argument("--hot-queue", type=int, default=None, help="default: --slots")
    parser.add_argument("--slack", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.hot_queue = args.hot_queue or args.slots
    load_s, decode_s = args.load_ms / 1000, args.decode_ms / 1000
    rate = args.utilization * args.replicas * args.slots / decode_s
    trace = requests(args.requests, args.adapters, args.zipf, rate, args.seed)
    policies = {"affinity": AffinityPolicy(args.hot_queue, args.slack),
                "round_robin": POLICIES["round_robin"](), "least_loaded": POLICIES["least_loaded"](),
                "oracle": Oracle(trace, args.hot_queue, args.slack)}
    results = {name: simulate(trace, policy, args.replicas, args.max_loras, args.slots, load_s, decode_s)
               for name, policy in policies.items()}
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}, indent=2))
        return
    print(f"SIMULATION: {args.requests} requests, {args.adapters} adapters (Zipf {args.zipf}), {args.replicas} "
          f"replicas x {args.slots} slots, max_loras {args.max_loras}, load {args.load_ms:g} ms, decode "
          f"{args.decode_ms:g} ms, {args.utilization:.0%} of capacity")
    print(f"{'policy':<14}{'loads/1k req':>14}{'queue p50 ms':>14}{'queue p95 ms':>14}")
    for name, r in results.items():
        print(f"{name:<14}{r['loads_per_1k']:>14.1f}{r['queue_p50_ms']:>14.1f}{r['queue_p95_ms']:>14.1f}")
    oracle, affinity, rr = results["oracle"], results["affinity"], results["round_robin"]
    print(f"affinity / oracle loads: {affinity['loads_per_1k'] / max(oracle['loads_per_1k'], 1e-9):.2f}x; "
          f"affinity / round robin queue p95: {affinity['queue_p95_ms'] / max(rr['queue_p95_ms'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
