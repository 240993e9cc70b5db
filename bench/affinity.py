"""Adapter-affinity routing against round robin and least-loaded, on real engine replicas.

``--replicas`` `loragate engine serve` processes (llama.cpp, ``--max-loras`` adapter slots each,
one thread each) behind one `loragate gateway serve` whose backend is the engine pool, with more
adapters in use than the replicas have slots together. Each policy gets fresh replicas and a fresh
gateway and the same requests: streamed completions for adapters drawn from a Zipf(``--zipf``)
popularity (fixed seed), ``--concurrency`` at a time. Reported per policy: time to first token
p50/p95, output tokens/s, and adapter loads per 100 requests (the gateway's
``loragate_pool_adapter_loads_total``). A load on llama.cpp restarts the replica's engine with its
new adapter set (about a second), which is the cost affinity avoids.

    python bench/affinity.py --max-loras 2 --adapters 7 --zipf 1.2 --requests 300   # the README's run
    python bench/affinity.py --requests 120 --concurrency 4 --out affinity.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import tempfile
import time
from pathlib import Path

import httpx
from cpu_serving import TOPICS, build_registry, run_row, start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loads(gateway: str) -> float:
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("loragate_pool_adapter_loads_total{"))


def workload(adapters: int, requests: int, zipf: float, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    weights = [1 / (rank ** zipf) for rank in range(1, adapters + 1)]
    drawn = rng.choices(range(1, adapters + 1), weights=weights, k=requests)
    return [{"model": f"bench@{n}", "prompt": f"Write a short story about {TOPICS[i % len(TOPICS)]}.",
             "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            for i, n in enumerate(drawn)]


async def run_policy(policy: str, home: Path, args: argparse.Namespace, bodies: list[dict]) -> dict:
    env = {"LORAGATE_HOME": str(home), "LORAGATE_USER": "bench", "LORAGATE_ENGINE__HEARTBEAT_S": "0.5",
           "LORAGATE_GATEWAY__LLAMACPP__MAX_LORAS": str(args.max_loras),
           "LORAGATE_GATEWAY__LLAMACPP__SLOTS": str(args.slots),
           "LORAGATE_GATEWAY__LLAMACPP__N_THREADS": str(args.threads)}
    logs = home.parent / "logs"
    logs.mkdir(exist_ok=True)
    processes = []
    try:
        for _ in range(args.replicas):
            port = free_port()
            processes.append(start(["loragate", "engine", "serve", "--port", str(port)], env,
                                   f"http://127.0.0.1:{port}/health", logs / f"engine-{policy}-{port}.log"))
        port = free_port()
        gateway = f"http://127.0.0.1:{port}"
        processes.append(start(["loragate", "gateway", "serve", "--port", str(port)],
                               {**env, "LORAGATE_GATEWAY__BACKEND": "pool", "LORAGATE_GATEWAY__POOL__POLICY": policy,
                                "LORAGATE_GATEWAY__POOL__HEALTH_INTERVAL_S": "0.5",
                                "LORAGATE_GATEWAY__POOL__HOT_QUEUE": str(args.hot_queue)},
                               f"{gateway}/health", logs / f"gateway-{policy}.log"))
        deadline = time.monotonic() + 60
        while sum(r["up"] for r in httpx.get(f"{gateway}/health").json()["engines"]["pool"]["replicas"]) \
                < args.replicas:
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not all join the pool")
            await asyncio.sleep(0.2)
        row = await run_row(policy, f"{gateway}/v1/completions", bodies, args.concurrency, args.adapters)
        return {"policy": policy, **{k: v for k, v in row.as_dict().items() if k not in ("path", "adapters")},
                "loads_per_100": round(100 * loads(gateway) / len(bodies), 1)}
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--max-loras", type=int, default=1, help="adapter slots per replica")
    parser.add_argument("--adapters", type=int, default=6, help="adapters in use (more than replicas x slots)")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--slots", type=int, default=2, help="sequences each replica decodes at once")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per replica")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--hot-queue", type=int, default=8, help="pool.hot_queue (affinity's replication)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="affinity,round_robin,least_loaded")
    parser.add_argument("--home", type=Path, help="reuse a registry built by an earlier run")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="loragate-affinity-")) / "home"
    if args.home is None:
        print(f"building {args.adapters} adapters in {home} ...")
        build_registry(home, args.adapters, rank=8)
    bodies = workload(args.adapters, args.requests, args.zipf, args.max_tokens, args.seed)
    rows = [await run_policy(policy, home, args, bodies) for policy in args.policies.split(",")]
    print(f"{args.replicas} replicas x {args.max_loras} adapter slots, {args.adapters} adapters (Zipf {args.zipf}), "
          f"{args.requests} requests, concurrency {args.concurrency}, {args.max_tokens} tokens, cores: {os.cpu_count()}")
    print(f"{'policy':<14}{'TTFT p50 ms':>12}{'TTFT p95 ms':>12}{'tok/s':>8}{'loads/100':>10}{'failures':>9}")
    for r in rows:
        print(f"{r['policy']:<14}{r['ttft_p50_ms']:>12.0f}{r['ttft_p95_ms']:>12.0f}{r['tok_s']:>8.1f}"
              f"{r['loads_per_100']:>10.1f}{r['failures']:>9}")
    by = {r["policy"]: r for r in rows}
    if "affinity" in by and "round_robin" in by:
        print(f"round robin / affinity TTFT p95: {by['round_robin']['ttft_p95_ms'] / by['affinity']['ttft_p95_ms']:.1f}x")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
