"""`loragate demo`: an adapter's life cycle on the offline SmolLM2 base, end to end.

It builds the base model, writes a synthetic sentiment task as chat JSONL, prepares it (dedup,
held-out split, contamination check), trains LoRA versions with the trainer, scores the base
model, the prompted base model and each version on the held-out split, lets the gate refuse the
weak version and promote the good one. Then it converts the adapters to GGUF, starts the
gateway (llama.cpp), canaries a retrained version on 5% of users with a few hundred requests
from the openai SDK, prints the rollout's arms and the cost report, and promotes the canary
through the gate.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loragate.console import console
from loragate.offline_base import BASE_ID, HUB_ID, build_hf_base
from loragate.registry import GateRefused, Registry
from loragate.registry.cli import print_versions

INSTRUCTION = ("Classify the sentiment of the review as positive, negative or mixed. "
               "Answer with one word.")
_POSITIVE = ["loved", "enjoyed", "adored", "was delighted by", "recommend", "was impressed by", "liked",
             "was thrilled with", "praised", "was happy with"]
_NEGATIVE = ["hated", "regretted", "was bored by", "was disappointed by", "would avoid", "was annoyed by",
             "disliked", "was let down by", "complained about", "was fed up with"]
_THINGS = ["the film", "this book", "the hotel", "the pizza", "the concert", "this phone", "the game",
           "the museum", "the service", "this laptop", "the show", "the restaurant", "the course", "the app",
           "the bakery", "this jacket", "the gym", "the podcast", "the ferry", "this blender", "the theatre",
           "the campsite", "this headset", "the tour", "the salon", "the website", "the coffee", "this sofa"]


@dataclass(frozen=True)
class DemoBudget:
    """How much the demo trains, scores and serves (the tests run it smaller)."""

    steps: int = 40  # of the good versions (the weak one gets 3)
    eval_examples: int = 60  # of the held-out split: enough to tell the subjects apart, quick on a CPU
    requests: int = 300  # sent through the gateway during the canary
_OPENERS = ["Honestly, I", "I", "We", "My family", "Everyone here", "My friend and I", "My kids", "Our team",
            "My partner and I", "Last week I", "Yesterday we", "Frankly, I"]


def sentiment_rows(seed: int = 0, per_pair: int = 3) -> list[dict]:
    """About three thousand reviews in the chat ``messages`` format (repeats included, for the
    dedup to find). "mixed" reviews (praise and a complaint) are what a prompted 135M model gets
    wrong."""
    rng = random.Random(seed)
    rows = []
    for opener in _OPENERS:
        for thing in _THINGS:
            for _ in range(per_pair):
                other = rng.choice([t for t in _THINGS if t != thing]).split(" ", 1)[1]
                pos, neg = rng.choice(_POSITIVE), rng.choice(_NEGATIVE)
                for review, label in ((f"{opener} {pos} {thing}.", "positive"),
                                      (f"{opener} {neg} {thing}.", "negative"),
                                      (f"{opener} {pos} {thing}, but {neg.replace('was ', '')} the {other}.",
                                       "mixed")):
                    rows.append({"messages": [{"role": "system", "content": INSTRUCTION},
                                              {"role": "user", "content": review},
                                              {"role": "assistant", "content": label}]})
    rng.shuffle(rows)
    return rows


def demo_config(data: Path, *, steps: int, r: int, seed: int):
    """A short CPU run: LoRA on the attention projections, a high learning rate, few steps."""
    from loragate.trainer.config import LoraSettings, TrainConfig

    return TrainConfig(name="sentiment", base=BASE_ID, data=data, max_steps=steps, seed=seed,
                       lora=LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                       learning_rate=2e-3, batch_size=8, max_seq_length=96, eval_steps=20, eval_limit=16,
                       notes=f"demo: r={r}, {steps} steps, seed {seed}")


def train_and_score(registry: Registry, data: Path, *, steps: int, r: int, seed: int, eval_examples: int):
    from loragate.trainer.evaluate import evaluate_version
    from loragate.trainer.train import train

    result = train(registry, demo_config(data, steps=steps, r=r, seed=seed))
    report = evaluate_version(registry, result.version.ref, data, limit=eval_examples)
    console.print(f"registered {report.ref} (r={r}, {steps} steps, {result.run.wall_s:.0f} s, "
                  f"${result.run.cost_usd:.4f}): {report.metric} {report.scores['adapter'][report.metric]:.3f}")
    return report


def run_demo(*, fresh: bool = False, keep_serving: bool = False, budget: DemoBudget = DemoBudget()) -> None:
    from loragate.trainer.prepare import prepare_dataset

    registry = Registry()
    settings = registry.settings
    if fresh:
        shutil.rmtree(settings.store_dir, ignore_errors=True)
    started = time.perf_counter()
    console.rule("1. offline base model")
    base_dir = build_hf_base(settings.models_dir)
    if BASE_ID not in {b.id for b in registry.base_models()}:
        registry.add_base_model(BASE_ID, source=str(base_dir), hub_id=HUB_ID, licence="apache-2.0", folder=base_dir)
    console.print(f"{BASE_ID} in Hugging Face format at {base_dir}")

    console.rule("2. data: synthetic sentiment reviews, deduplicated, split, checked for contamination")
    folder = settings.home / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "reviews.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in sentiment_rows()))
    prepared = prepare_dataset(source, folder / "prepared", registry=registry)
    counts = {name: split.count for name, split in prepared.manifest.splits.items()}
    console.print(f"{source}: {counts} after removing {len(prepared.removed)} duplicates; "
                  f"contamination check {'passed' if prepared.manifest.contamination.passed else 'FAILED'}")

    console.rule("3. two adapter versions, each scored against the base and the prompted base")
    versions = [train_and_score(registry, prepared.folder, steps=steps, r=r, seed=0, eval_examples=budget.eval_examples)
                for steps, r in ((3, 4), (budget.steps, 8))]
    for subject in ("base", "prompted_base"):
        console.print(f"{subject}: {versions[-1].metric} {versions[-1].scores[subject][versions[-1].metric]:.3f}")

    console.rule("4. promotion gate")
    for report in reversed(versions):  # the better version first: the weaker one must then fail
        try:
            gate = registry.promote(report.ref, to="production", reason="demo")
            console.print(f"[green]promoted {report.ref} to production[/green]: " + "; ".join(gate.checks))
        except GateRefused as refused:
            console.print(f"[yellow]gate refused {report.ref}[/yellow]: " + "; ".join(refused.reasons))
    registry.set_alias(versions[0].ref, "candidate", reason="demo")

    console.rule("5. the registry")
    print_versions(registry, registry.list_versions("sentiment"))

    console.rule("6. serving: a retrained version canaried on 5% of users")
    retrain = train_and_score(registry, prepared.folder, steps=budget.steps, r=8, seed=7,
                              eval_examples=budget.eval_examples)
    serve_canary(registry, "sentiment", [versions[-1].ref, retrain.ref], prepared.folder, budget.requests,
                 keep_serving=keep_serving)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s; registry at {settings.resolved_database_url}")


def serve_canary(registry: Registry, name: str, refs: list[str], data: Path, requests: int = 300, *,
                 keep_serving: bool = False) -> None:
    """Start the gateway, split traffic 95/5, send the held-out prompts as many users, report, promote;
    with ``keep_serving``, leave the gateway (and its web console) up until Ctrl-C."""
    import signal
    import socket
    import subprocess

    import httpx
    import openai

    from loragate.gateway.cli import print_cost, print_rollout_status
    from loragate.gateway.cost import cost_report
    from loragate.gateway.outcomes import send_feedback
    from loragate.gateway.rollouts import RolloutService
    from loragate.quantize.lora_gguf import convert_lora_to_gguf
    from loragate.trainer.dataset import open_prepared
    from loragate.trainer.metrics import exact_match

    test = open_prepared(data).split("test")

    for ref in refs:
        convert_lora_to_gguf(registry, ref)  # llama.cpp serves GGUF LoRAs
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    gateway = subprocess.Popen(["loragate", "gateway", "serve", "--port", str(port)], stdout=subprocess.DEVNULL,
                               env={**os.environ, "LORAGATE_HOME": str(registry.settings.home)})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                if gateway.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the gateway did not start") from None
                time.sleep(0.3)
        rollouts = RolloutService(registry)
        candidate = int(refs[-1].rsplit("@", 1)[1])
        rollouts.start(name, candidate, 5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0)
        served: dict[str, tuple[list[str], list[str]]] = {}  # version -> (answers, references)
        for n in range(requests):
            example = test[n % len(test)]
            raw = client.chat.completions.with_raw_response.create(
                model=name, messages=[m.model_dump() for m in example.prompt], max_tokens=4, temperature=0,
                user=f"user-{n}")
            answers, references = served.setdefault(raw.headers["x-loragate-version"], ([], []))
            answers.append(raw.parse().choices[0].message.content or "")
            references.append(example.completion)
            # The scorer's verdict goes back as the request's outcome: the rollout compares arms on it.
            send_feedback(client, raw.headers["x-request-id"],
                          success=exact_match(answers[-1:], references[-1:]) == 1.0)
        for version, (answers, references) in sorted(served.items()):
            console.print(f"{version}: {len(answers)} requests, served exact match "
                          f"{exact_match(answers, references):.3f}")
        time.sleep(1.5)  # the gateway writes its meter every 0.5 s
        print_rollout_status(rollouts.status(name))
        print_cost(cost_report(registry, by="version"), "version")
        try:
            rollouts.promote(name, reason="canary healthy")
            console.print(f"[green]rollout promoted: {name}@{candidate} is production[/green]")
        except GateRefused as refused:
            rollouts.abort(name, reason="gate refused the candidate")
            console.print(f"[yellow]gate refused the canary[/yellow]: {'; '.join(refused.reasons)}")
        if keep_serving:
            console.print(f"the gateway serves at {url}/v1; its web console: [bold]{url}/ui[/bold] (Ctrl-C stops both)")
            # SIGTERM too ends the wait through the `finally` below, so the gateway never outlives the demo.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                gateway.wait()
            except KeyboardInterrupt:
                pass
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
