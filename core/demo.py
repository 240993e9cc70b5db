"""`loragate demo`: an adapter's life cycle on the offline SmolLM2 base, end to end.

It builds the base model, fits small LoRA adapters on a synthetic sentiment task (a short
plain peft loop, enough to show the registry at work), scores the base model, the prompted
base model and the adapters by exact match on held-out sentences, records a contamination
check, registers everything, lets the gate refuse the weak version and promote the good one.
Then it converts the adapters to GGUF, starts the gateway (llama.cpp), canaries a retrained
version on 5% of users with a few hundred requests from the openai SDK, prints the rollout's
arms and the cost report, and promotes the canary through the gate.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loragate.console import console
from loragate.offline_base import BASE_ID, HUB_ID, build_hf_base
from loragate.registry import EvalInput, GateRefused, Registry
from loragate.registry.cli import print_versions

SUITE = "sentiment-heldout"
METRIC = "exact_match"
INSTRUCTION = ("Classify the sentiment of the review as positive, negative or mixed. "
               "Answer with one word.")
_POSITIVE = ["loved", "enjoyed", "adored", "was delighted by", "recommend", "was impressed by"]
_NEGATIVE = ["hated", "regretted", "was bored by", "was disappointed by", "would avoid", "was annoyed by"]
_THINGS = ["the film", "this book", "the hotel", "the pizza", "the concert", "this phone", "the game",
           "the museum", "the service", "this laptop", "the show", "the restaurant", "the course", "the app"]
_OPENERS = ["Honestly, I", "I", "We", "My family", "Everyone here", "My friend and I"]


@dataclass(frozen=True)
class Example:
    review: str
    label: str


def sentiment_task(seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples; the held-out split uses things never seen in training.
    "mixed" reviews (praise and a complaint) are what a prompted 135M model gets wrong."""
    rng = random.Random(seed)
    things = _THINGS[:]
    rng.shuffle(things)
    held_out_things = set(things[:4])
    train, test = [], []
    for opener in _OPENERS:
        for thing in _THINGS:
            other = rng.choice([t for t in _THINGS if t != thing]).split(" ", 1)[1]
            pos, neg = rng.choice(_POSITIVE), rng.choice(_NEGATIVE)
            for example in (
                Example(f"{opener} {pos} {thing}.", "positive"),
                Example(f"{opener} {neg} {thing}.", "negative"),
                Example(f"{opener} {pos} {thing}, but {neg.replace('was ', '')} the {other}.", "mixed"),
            ):
                (test if thing in held_out_things else train).append(example)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test[:30]


def _messages(review: str, shots: list[Example]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": INSTRUCTION}]
    for shot in shots:
        messages += [{"role": "user", "content": shot.review}, {"role": "assistant", "content": shot.label}]
    return messages + [{"role": "user", "content": review}]


def _example_hash(example: Example) -> str:
    return hashlib.sha256(example.review.strip().lower().encode()).hexdigest()


def data_sha256(examples: list[Example]) -> str:
    lines = "".join(json.dumps(e.__dict__, sort_keys=True) + "\n" for e in examples)
    return hashlib.sha256(lines.encode()).hexdigest()


def fit_lora(base_dir: Path, train: list[Example], out: Path, *, steps: int, r: int, seed: int) -> Path:
    """A minimal LoRA fit (loss on the answer tokens only); the trainer component does more."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = rng.sample(train, 8)
        input_ids, labels = [], []
        for example in batch:
            prompt = tokenizer.apply_chat_template(_messages(example.review, []), add_generation_prompt=True,
                                                   tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(example.label + "<|im_end|>", add_special_tokens=False)["input_ids"]
            input_ids.append(prompt_ids + answer_ids)
            labels.append([-100] * len(prompt_ids) + answer_ids)
        width = max(map(len, input_ids))
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in input_ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in input_ids])
        target = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = HUB_ID  # name the base portably, not by a local path
    config_path.write_text(json.dumps(config, indent=2))
    return out


def exact_match(base_dir: Path, examples: list[Example], *, adapter: Path | None = None,
                shots: list[Example] | None = None) -> float:
    """Greedy answers compared with the label after lower-casing and stripping punctuation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    hits = 0
    for example in examples:
        ids = tokenizer.apply_chat_template(_messages(example.review, shots or []), add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        words = answer.strip().lower().split()
        hits += bool(words) and words[0].strip(".,!:;\"'") == example.label
    return hits / len(examples)


def run_demo(*, fresh: bool = False) -> None:
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

    console.rule("2. data: synthetic sentiment reviews, held-out split, contamination check")
    train, test = sentiment_task()
    train_sha, test_sha = data_sha256(train), data_sha256(test)
    overlap = {_example_hash(e) for e in train} & {_example_hash(e) for e in test}
    registry.record_contamination_check(train_sha, passed=not overlap, method="exact-hash",
                                        details={"held_out_sha256": test_sha, "overlap": len(overlap)})
    console.print(f"{len(train)} train / {len(test)} held-out examples; overlap {len(overlap)}")

    console.rule("3. baselines: base model and prompted base model")
    shots = [next(e for e in train if e.label == lab) for lab in ("positive", "mixed", "negative")]
    baselines = {"base": exact_match(base_dir, test), "prompted_base": exact_match(base_dir, test, shots=shots)}
    for subject, value in baselines.items():
        registry.add_eval(EvalInput(suite=SUITE, metrics={METRIC: value}, sample_count=len(test),
                                    eval_data_sha256=test_sha), base=BASE_ID, subject=subject)
        console.print(f"{subject}: {METRIC} {value:.3f}")

    console.rule("4. two adapter versions")
    name = "sentiment"
    versions = []
    with tempfile.TemporaryDirectory() as scratch:
        for steps, r in ((3, 4), (40, 8)):
            folder = fit_lora(base_dir, train, Path(scratch) / f"r{r}-s{steps}", steps=steps, r=r, seed=steps)
            info = registry.register(
                name, folder, base=BASE_ID, training_data_sha256=train_sha,
                training_config={"steps": steps, "r": r, "lr": 2e-3, "batch": 8},
                parent=versions[-1].ref if versions else None,
                primary_suite=SUITE, primary_metric=METRIC, notes=f"demo fit, {steps} steps",
            )
            score = exact_match(base_dir, test, adapter=registry.artifact_path(info.ref))
            registry.add_eval(EvalInput(suite=SUITE, metrics={METRIC: score}, sample_count=len(test),
                                        eval_data_sha256=test_sha), ref=info.ref)
            console.print(f"registered {info.ref} (r={r}, {steps} steps): {METRIC} {score:.3f}")
            versions.append(info)

    console.rule("5. promotion gate")
    for info in reversed(versions):  # the better version first: the weaker one must then fail
        try:
            report = registry.promote(info.ref, to="production", reason="demo")
            console.print(f"[green]promoted {info.ref} to production[/green]: " + "; ".join(report.checks))
        except GateRefused as refused:
            console.print(f"[yellow]gate refused {info.ref}[/yellow]: " + "; ".join(refused.reasons))
    registry.set_alias(versions[0].ref, "candidate", reason="demo")

    console.rule("6. the registry")
    print_versions(registry, registry.list_versions(name))

    console.rule("7. serving: a retrained version canaried on 5% of users")
    with tempfile.TemporaryDirectory() as scratch:
        folder = fit_lora(base_dir, train, Path(scratch) / "retrain", steps=40, r=8, seed=7)
        retrain = registry.register(name, folder, base=BASE_ID, training_data_sha256=train_sha,
                                    training_config={"steps": 40, "r": 8, "lr": 2e-3, "batch": 8, "seed": 7},
                                    parent=versions[-1].ref, notes="demo retrain, new seed")
    score = exact_match(base_dir, test, adapter=registry.artifact_path(retrain.ref))
    registry.add_eval(EvalInput(suite=SUITE, metrics={METRIC: score}, sample_count=len(test),
                                eval_data_sha256=test_sha), ref=retrain.ref)
    console.print(f"registered {retrain.ref}: {METRIC} {score:.3f}")
    serve_canary(registry, name, [versions[-1].ref, retrain.ref], test)
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s; registry at {settings.resolved_database_url}")


def serve_canary(registry: Registry, name: str, refs: list[str], test: list[Example], requests: int = 300) -> None:
    """Start the gateway, split traffic 95/5, send requests as many users, report, promote."""
    import socket
    import subprocess

    import httpx
    import openai

    from loragate.gateway.cli import print_cost, print_rollout_status
    from loragate.gateway.cost import cost_report
    from loragate.gateway.rollouts import RolloutService
    from loragate.quantize.lora_gguf import convert_lora_to_gguf

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
        correct: dict[str, list[bool]] = {}
        for n in range(requests):
            example = test[n % len(test)]
            raw = client.chat.completions.with_raw_response.create(
                model=name, messages=_messages(example.review, []), max_tokens=4, temperature=0, user=f"user-{n}")
            answer = (raw.parse().choices[0].message.content or "").strip().lower().split()
            hit = bool(answer) and answer[0].strip(".,!:;\"'") == example.label
            correct.setdefault(raw.headers["x-loragate-version"], []).append(hit)
        for version, hits in sorted(correct.items()):
            console.print(f"{version}: {len(hits)} requests, served exact match {sum(hits) / len(hits):.3f}")
        time.sleep(1.5)  # the gateway writes its meter every 0.5 s
        print_rollout_status(rollouts.status(name))
        print_cost(cost_report(registry, by="version"), "version")
        try:
            rollouts.promote(name, reason="canary healthy")
            console.print(f"[green]rollout promoted: {name}@{candidate} is production[/green]")
        except GateRefused as refused:
            rollouts.abort(name, reason="gate refused the candidate")
            console.print(f"[yellow]gate refused the canary[/yellow]: {'; '.join(refused.reasons)}")
    finally:
        gateway.terminate()
        gateway.wait(timeout=60)
