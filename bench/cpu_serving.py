"""CPU serving, side by side in one run: llama.cpp's own server against a loragate gateway.

Both serve the same GGUF base with the same GGUF LoRAs, threads and parallel slots:

  llama-server   llama.cpp's server engine as a user would start it (the prebuilt xllamacpp wheel,
                 its defaults, ``--parallel SLOTS``, ``--lora`` for each adapter); a request names
                 its adapter with ``"lora": [{"id": i, "scale": 1}]``
  loragate       ``loragate gateway serve`` on a registry holding the same adapters as versions
                 ``bench@1..N``; a request names its version as ``model``

Each row sends the same streamed ``/v1/completions`` requests (greedy, distinct prompts) to both,
one after the other, at a given concurrency, with one adapter or with N adapters mixed (request
i uses adapter i % N). A last row is short answers mixed: N adapters, answers of 1 and 16 tokens
in turn, at concurrency 8 (classification-style traffic, where switching adapters costs most).
It prints output tokens/s, requests/s, time to first token p50/p95 and loragate's tok/s over
llama-server's. Absolute figures drift on shared machines: read the ratios.

  python bench/cpu_serving.py --concurrency 1,4,8 --adapters 4 --requests 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

TOPICS = ["a lighthouse", "the moon", "a lost key", "a small robot", "the ocean", "a city at night", "a dragon",
          "a garden", "an old map", "a train", "the desert", "a violin", "a snowstorm", "a library", "a market",
          "a river", "a forest fire", "a clockmaker", "a paper boat", "a mountain pass"]


@dataclass
class Row:
    kind: str  # "stories" (max_tokens each) or "short" (1 and 16 tokens in turn)
    path: str
    adapters: int
    concurrency: int
    tokens: int
    wall_s: float
    ttfts: list[float]
    failures: int
    requests: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    def as_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "adapters": self.adapters, "concurrency": self.concurrency,
                "tok_s": round(self.tok_s, 1), "req_s": round(self.requests / self.wall_s, 2),
                "ttft_p50_ms": round(_pct(self.ttfts, 50), 1), "ttft_p95_ms": round(_pct(self.ttfts, 95), 1),
                "failures": self.failures, "tokens": self.tokens}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def build_registry(home: Path, count: int, rank: int) -> None:
    """The offline base in HF format, ``count`` random peft LoRAs on it, registered and converted."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from loragate.offline_base import BASE_ID, HUB_ID, build_hf_base
    from loragate.quantize.lora_gguf import convert_lora_to_gguf
    from loragate.registry import Registry
    from loragate.settings import Settings

    hf_base = build_hf_base(Path.home() / ".cache" / "loragate-tests" / "models")
    registry = Registry(Settings(home=home, user="bench"))
    registry.add_base_model(BASE_ID, source=str(hf_base), hub_id=HUB_ID, folder=hf_base)
    model = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    for n in range(count):
        torch.manual_seed(n)
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False)
        folder = home.parent / f"adapter-{n}"
        peft_model = peft.get_peft_model(model, config)
        peft_model.save_pretrained(folder)
        model = peft_model.unload()
        info = registry.register("bench", folder, base=BASE_ID)
        convert_lora_to_gguf(registry, info.ref)
    registry.promote("bench@1", force=True, reason="bench set-up")


def gguf_loras(home: Path, count: int) -> list[Path]:
    from loragate.registry import Registry
    from loragate.settings import Settings

    registry = Registry(Settings(home=home, user="bench"))
    paths = []
    for n in range(1, count + 1):
        artifact = next(a for a in registry.derived_artifacts(f"bench@{n}") if a.kind == "gguf-lora")
        paths.append(registry.store.root / "sha256" / artifact.sha256 / "files" / "adapter.gguf")
    return paths


LLAMA_SERVER = """
import signal, sys, json, xllamacpp
cfg = json.loads(sys.argv[1])
p = xllamacpp.CommonParams()
p.model.path, p.port, p.n_parallel, p.n_ctx = cfg["gguf"], cfg["port"], cfg["slots"], cfg["n_ctx"] * cfg["slots"]
if cfg["threads"]:
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = cfg["threads"]
p.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(path, 0.0) for path in cfg["loras"]]
p.lora_init_without_apply = True
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
server = xllamacpp.Server(p)
signal.sigwait({signal.SIGTERM})
"""


def start(command: list[str], env: dict, health: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited; see {log}")
        try:
            if httpx.get(health, timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{health} did not come up; see {log}")


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise httpx.HTTPStatusError(f"{response.status_code}: {response.text[:300]}", request=response.request,
                                        response=response)
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise httpx.HTTPError(f"error in stream: {chunk['error']}")
            if ttft is None and any(c.get("text") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - started) * 1000, tokens


async def run_row(path: str, url: str, bodies: list[dict], concurrency: int, adapters: int,
                  kind: str = "stories") -> Row:
    ttfts: list[float] = []
    tokens = failures = 0
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while not queue.empty():
            body = queue.get_nowait()
            try:
                try:
                    ttft, count = await one(client, url, body)
                except httpx.RemoteProtocolError:  # a kept-alive connection the server had just closed
                    ttft, count = await one(client, url, body)
                ttfts.append(ttft)
                tokens += count
            except httpx.HTTPError as exc:
                failures += 1
                print(f"{path}: request failed: {exc!r}", file=sys.stderr)

    async with httpx.AsyncClient(timeout=300) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Row(kind, path, adapters, concurrency, tokens, wall, ttfts, failures, len(bodies))


def bodies(path: str, adapters: int, requests: int, max_tokens: int | list[int], offset: int) -> list[dict]:
    """``max_tokens``: one for all, or a list taken in turn."""
    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens]
    out = []
    for i in range(requests):
        adapter = i % adapters
        body = {"prompt": f"Write a short story about {TOPICS[(i + offset) % len(TOPICS)]}.",
                "max_tokens": lengths[i % len(lengths)],
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        if path == "llama-server":
            body |= {"model": "base", "lora": [{"id": adapter, "scale": 1.0}]}
        else:
            body |= {"model": f"bench@{adapter + 1}"}
        out.append(body)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--adapters", type=int, default=4, help="adapters in the mixed rows")
    parser.add_argument("--requests", type=int, default=16, help="per row and path")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="0: llama.cpp's default")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--home", type=Path, help="reuse a registry built by an earlier run")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    from loragate.offline_base import smollm2_gguf
    from loragate.gateway.backends.engine_process import free_port

    scratch = Path(tempfile.mkdtemp(prefix="cpu-serving-"))
    home = args.home or scratch / "home"
    if not (home / ".bench-ready").exists():
        print(f"building {args.adapters} adapters in {home}", file=sys.stderr)
        build_registry(home, args.adapters, args.rank)
        (home / ".bench-ready").touch()
    loras = gguf_loras(home, args.adapters)
    llama_port, gateway_port = free_port(), free_port()
    config = {"gguf": str(smollm2_gguf()), "port": llama_port, "slots": args.slots, "n_ctx": 2048,
              "threads": args.threads, "loras": [str(p) for p in loras]}
    env = {"LORAGATE_HOME": str(home), "LORAGATE_GATEWAY__LLAMACPP__SLOTS": str(args.slots)}
    if args.threads:
        env["LORAGATE_GATEWAY__LLAMACPP__N_THREADS"] = str(args.threads)
    llama = start([sys.executable, "-c", LLAMA_SERVER, json.dumps(config)], {}, f"http://127.0.0.1:{llama_port}/health",
                  scratch / "llama-server.log")
    gateway = start(["loragate", "gateway", "serve", "--port", str(gateway_port)], env,
                    f"http://127.0.0.1:{gateway_port}/health", scratch / "gateway.log")
    urls = {"llama-server": f"http://127.0.0.1:{llama_port}/v1/completions",
            "loragate": f"http://127.0.0.1:{gateway_port}/v1/completions"}
    rows: list[Row] = []
    try:
        for path, url in urls.items():  # warm-up: every adapter once (loragate loads them on first use)
            await run_row(path, url, bodies(path, args.adapters, args.adapters, 4, 0), 1, args.adapters)
        for n, (adapters, concurrency) in enumerate(
                (a, int(c)) for a in (1, args.adapters) for c in args.concurrency.split(",")):
            order = list(urls) if n % 2 == 0 else list(reversed(urls))  # alternate against drift
            for path in order:
                rows.append(await run_row(path, urls[path], bodies(path, adapters, args.requests, args.max_tokens, n),
                                          concurrency, adapters))
        for path in urls:  # short answers mixed: 1 and 16 tokens in turn, N adapters, concurrency 8
            rows.append(await run_row(path, urls[path], bodies(path, args.adapters, 4 * args.requests, [1, 16], 99),
                                      8, args.adapters, kind="short"))
    finally:
        for process in (gateway, llama):
            process.terminate()
            process.wait(timeout=60)
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps([r.as_dict() for r in rows], indent=2))


def print_table(rows: list[Row]) -> None:
    """One line per row: llama-server / loragate side by side, and loragate's tok/s over llama-server's."""
    by_key = {(r.kind, r.adapters, r.concurrency, r.path): r.as_dict() for r in rows}
    print("| adapters | concurrency | llama-server tok/s | loragate tok/s | ratio | req/s (llama-server / loragate) "
          "| TTFT p50 ms | TTFT p95 ms | failures |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (kind, adapters, concurrency, path), ours in by_key.items():
        if path != "loragate":
            continue
        theirs = by_key[(kind, adapters, concurrency, "llama-server")]
        label = adapters if adapters == 1 else f"{adapters} mixed" + (", 1 and 16 tokens" if kind == "short" else "")
        print(f"| {label} | {concurrency} | {theirs['tok_s']} | "
              f"{ours['tok_s']} | **{ours['tok_s'] / theirs['tok_s']:.2f}x** | {theirs['req_s']} / {ours['req_s']} | "
              f"{theirs['ttft_p50_ms']:.0f} / {ours['ttft_p50_ms']:.0f} | {theirs['ttft_p95_ms']:.0f} / "
              f"{ours['ttft_p95_ms']:.0f} | {theirs['failures']} / {ours['failures']} |")


if __name__ == "__main__":
    asyncio.run(main())
