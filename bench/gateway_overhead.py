"""What the gateway adds on the hot path, measured in one run against the same fast upstream:

  direct          client -> upstream
  loragate/direct  client -> loragate gateway (our own upstream client) -> upstream
  loragate/litellm client -> loragate gateway (litellm.acompletion)      -> upstream
  litellm-proxy   client -> LiteLLM proxy                                 -> upstream

The upstream (bench/fast_upstream.py) answers instantly, so the differences are the layers'
own cost. Everything runs on this machine, so the layers also compete for its cores: read the
figures as relative. Usage:

  bash bench/litellm_proxy_venv.sh            # once: a venv with LiteLLM's proxy
  python bench/gateway_overhead.py --requests 600 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MASTER_KEY = "sk-bench-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
BODY = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


async def load(url: str, model: str, requests: int, concurrency: int, headers: dict) -> dict:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as client:
        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                queue.get_nowait()
                started = time.perf_counter()
                response = await client.post("/chat/completions", json={**BODY, "model": model})
                if response.status_code != 200:
                    failures += 1
                latencies.append((time.perf_counter() - started) * 1000)

        for _ in range(min(30, requests)):  # warm-up: connections, caches
            await client.post("/chat/completions", json={**BODY, "model": model})
        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - started
    quantiles = statistics.quantiles(latencies, n=100)
    return {"p50_ms": statistics.median(latencies), "p99_ms": quantiles[98], "req_per_s": requests / wall,
            "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--litellm", default=str(ROOT / ".bench/litellm-venv/bin/litellm"),
                        help="the `litellm` command of a venv with its proxy (bench/litellm_proxy_venv.sh)")
    args = parser.parse_args()

    processes: list[subprocess.Popen] = []
    scratch = Path(tempfile.mkdtemp(prefix="loragate-bench-"))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    try:
        upstream_port, gateway_port, proxy_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{upstream_port}/v1"
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "bench.fast_upstream:app", "--port", str(upstream_port),
             "--log-level", "warning"], cwd=ROOT, env=env))
        wait_ready(f"http://127.0.0.1:{upstream_port}/", processes[-1])

        upstreams = [{"name": "echo", "base_url": upstream, "model": "echo", "client": "direct"},
                     {"name": "echo-litellm", "base_url": upstream, "model": "echo", "client": "litellm"}]
        processes.append(subprocess.Popen(
            ["loragate", "gateway", "serve", "--port", str(gateway_port)], stdout=subprocess.DEVNULL,
            env={**env, "LORAGATE_HOME": str(scratch / "home"), "LORAGATE_GATEWAY__UPSTREAMS": json.dumps(upstreams)}))
        wait_ready(f"http://127.0.0.1:{gateway_port}/health", processes[-1])

        targets = [("direct", upstream, "echo", {}),
                   ("loragate/direct", f"http://127.0.0.1:{gateway_port}/v1", "echo", {}),
                   ("loragate/litellm", f"http://127.0.0.1:{gateway_port}/v1", "echo-litellm", {})]
        if Path(args.litellm).exists():
            config = scratch / "litellm.yaml"
            config.write_text(json.dumps({
                "model_list": [{"model_name": "echo", "litellm_params": {"model": "openai/echo", "api_base": upstream,
                                                                         "api_key": "none"}}],
                "general_settings": {"master_key": MASTER_KEY}}))
            processes.append(subprocess.Popen([args.litellm, "--config", str(config), "--port", str(proxy_port)],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
            wait_ready(f"http://127.0.0.1:{proxy_port}/health/liveliness", processes[-1], timeout_s=180)
            targets.append(("litellm-proxy", f"http://127.0.0.1:{proxy_port}/v1", "echo",
                            {"Authorization": f"Bearer {MASTER_KEY}"}))
        else:
            print(f"no LiteLLM proxy at {args.litellm}; run bench/litellm_proxy_venv.sh for that column")

        results = {name: asyncio.run(load(url, model, args.requests, args.concurrency, headers))
                   for name, url, model, headers in targets}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)

    direct = results["direct"]
    print(f"\n{args.requests} non-streaming chat requests, concurrency {args.concurrency}, on {os.cpu_count()} cores\n")
    print(f"{'path':18} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'failed':>7}")
    for name, r in results.items():
        print(f"{name:18} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['req_per_s']:8.0f} "
              f"{r['p50_ms'] - direct['p50_ms']:8.2f} {r['p99_ms'] - direct['p99_ms']:8.2f} {r['failures']:7d}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
