"""A fleet's costs, measured in one run on the same fast upstream (bench/fast_upstream.py):

  1 gateway                  one replica, meter committed before each answer (the default)
  1 gateway, batched meter   the same with meter_before_answer=false: what zero-loss metering costs
  1 gateway, Redis limits    a key with an rpm limit, counted in Redis: what the shared limiter adds
                             (against the same key counted in-process, row 1's key with a limit)
  nginx -> 1 gateway         the load balancer's own cost
  nginx -> 2 gateways        two replicas on one PostgreSQL and one Redis

All on PostgreSQL (a fleet shares one). On 2 cores, two replicas show overhead, not scale: the
replicas, nginx, the upstream and the load generator share the same cores. Read the ratios.

  python bench/fleet.py --postgres postgresql://postgres@127.0.0.1:55432/postgres --requests 600 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the load generator of gateway_overhead.py, the tests' Redis and nginx

from bench.gateway_overhead import free_port, load, wait_ready  # noqa: E402
from tests.fleet_servers import Nginx, RedisServer  # noqa: E402


def gateway(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(["loragate", "gateway", "serve", "--port", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "LORAGATE_HOME": str(home), **env})
    wait_ready(f"http://127.0.0.1:{port}/health", process)
    return process, f"127.0.0.1:{port}"


def key(home: Path, env: dict[str, str], *options: str) -> str:
    created = subprocess.run(["loragate", "keys", "create", "--name", uuid.uuid4().hex[:8], *options, "--json"],
                             env={**os.environ, "LORAGATE_HOME": str(home), **env}, capture_output=True, text=True,
                             check=True)
    return json.loads(created.stdout)["key"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", required=True, help="an admin URL: a database is created and dropped")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    import psycopg

    scratch = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    name = f"lg_fleet_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    database = args.postgres.rsplit("/", 1)[0] + "/" + name
    upstream_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.fast_upstream:app", "--port",
                                 str(upstream_port), "--log-level", "warning"], cwd=ROOT)
    redis = RedisServer(scratch / "redis").start()
    processes: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    try:
        wait_ready(f"http://127.0.0.1:{upstream_port}/", upstream)
        home = scratch / "home"
        base = {"LORAGATE_DATABASE_URL": database, "LORAGATE_GATEWAY__UPSTREAMS": json.dumps(
            [{"name": "echo", "base_url": f"http://127.0.0.1:{upstream_port}/v1", "model": "echo"}])}
        fleet = {**base, "LORAGATE_REDIS_URL": redis.url, "LORAGATE_GATEWAY__TRUSTED_PROXIES": '["127.0.0.1"]'}
        limited = key(home, base, "--rpm", "1000000000")  # a limit never reached: every request is counted

        def row(label: str, envs: list[dict[str, str]], token: str, balanced: bool) -> None:
            started = [gateway(home, env) for env in envs]
            processes.extend(p for p, _ in started)
            url = f"http://{started[0][1]}/v1"
            nginx = None
            if balanced:
                nginx = Nginx(scratch / f"nginx-{len(results)}", [address for _, address in started]).start()
                url = f"{nginx.url}/v1"
            try:
                results[label] = asyncio.run(load(url, "echo", args.requests, args.concurrency,
                                                  {"Authorization": f"Bearer {token}"}))
            finally:
                if nginx is not None:
                    nginx.stop()
                for process, _ in started:
                    process.terminate()
                    process.wait(timeout=60)

        row("1 gateway", [base], limited, False)
        row("1 gateway, batched meter", [{**base, "LORAGATE_GATEWAY__METER_BEFORE_ANSWER": "false"}], limited, False)
        row("1 gateway, Redis limits", [fleet], limited, False)
        row("nginx -> 1 gateway", [fleet], limited, True)
        row("nginx -> 2 gateways", [fleet, fleet], limited, True)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        upstream.terminate()
        upstream.wait(timeout=30)
        redis.stop()
        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    first = results["1 gateway"]
    print(f"\n{args.requests} non-streaming chat requests, concurrency {args.concurrency}, on {os.cpu_count()} cores\n")
    print("| path | p50 ms | p99 ms | req/s | req/s vs 1 gateway | failed |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['req_per_s']:.0f} "
              f"| {r['req_per_s'] / first['req_per_s']:.2f}x | {r['failures']} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
