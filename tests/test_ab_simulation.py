"""Rollouts decided by outcomes, simulated end to end with a known truth.

A real gateway (llama.cpp backend, real versions) serves traffic from many users through the
``openai`` client; each answer's outcome is drawn from its version's true success rate and sent
back as feedback, as an application would. The rollout, checked by the gateway after every meter
batch, must end as the truth says. Outcomes are drawn per request number from a seeded generator,
so a scenario's truth is the same whatever the timing.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest

from loragate.gateway.outcomes import send_feedback
from loragate.gateway.rollouts import RolloutService, RolloutStatus
from loragate.registry import Registry
from loragate.settings import Settings

from .conftest import BASE_ID, run_cli, serving_home
from .gateway_server import GatewayServer

pytestmark = pytest.mark.model
pytest.importorskip("xllamacpp")

CHAT = [{"role": "user", "content": "Where is my order?"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory, hf_base):
    return serving_home(tmp_path_factory, hf_base, versions=2)


@pytest.fixture(scope="module")
def server(home):
    # Production is not gated here, so that a completed ramp promotes; the gate's refusal is tested
    # in test_rollouts.py and the ramp waiting for it in test_gateway.py.
    with GatewayServer(home, LORAGATE_GATE__ALIASES="[]") as gateway:
        yield gateway


@dataclass
class Run:
    status: RolloutStatus
    served: Counter  # version -> requests
    requests: int
    seconds: float


def simulate(home, server, name: str, truth: dict[int, float], *rollout: str, budget: int, candidate: int = 2,
             max_tokens: int = 1, concurrency: int = 12) -> Run:
    """Start a rollout of support@``candidate`` with the CLI options ``rollout``, then send up to
    ``budget`` requests, each from a new user, with the outcome feedback ``truth`` gives; stop once
    the rollout has ended. A rollout still active at the end is aborted (after its status is read)."""
    registry = Registry(Settings(home=home))
    if registry.get("support").version != 1:
        registry.promote("support@1", force=True, reason="simulation set-up")
    run_cli(home, "rollout", "start", "support", "--candidate", str(candidate), *rollout)
    time.sleep(1.2)  # the gateway's routing cache
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0)

    def request(n: int) -> int:
        raw = client.chat.completions.with_raw_response.create(model="support", messages=CHAT, max_tokens=max_tokens,
                                                               user=f"{name}-{n}")
        version = int(raw.headers["x-loragate-version"].rpartition("@")[2])
        if version in truth:
            succeeded = random.Random(f"{name}:{n}").random() < truth[version]
            send_feedback(client, raw.headers["x-request-id"], success=succeeded)
        return version

    service = RolloutService(registry)
    served: Counter = Counter()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            while sum(served.values()) < budget and service.status("support").status == "active":
                sent = sum(served.values())
                served.update(pool.map(request, range(sent, min(sent + 100, budget))))
    finally:  # a failed scenario leaves no active rollout behind for the next
        seconds = time.monotonic() - started
        time.sleep(1.5)  # the last meter batch, and the check after it
        status = service.status("support")
        if status.status == "active":
            run_cli(home, "rollout", "abort", "support", "--reason", "simulation over")
    print(f"\n{name}: {status.status} after {sum(served.values())} requests in {seconds:.0f} s "
          f"({dict(served)}, latency ratio {status.latency_ratio_interval}): {status.end_reason or ''}")
    return Run(status, served, sum(served.values()), seconds)


def steps(home) -> list:
    return [e for e in Registry(Settings(home=home)).audit_log(target="support", limit=1000)
            if e.action in ("rollout.step", "rollout.ramp-complete", "rollout.rolled_back")]


def test_a_better_version_ramps_from_five_percent_to_production(home, server):
    run = simulate(home, server, "better", {1: 0.80, 2: 0.95}, "--ramp", "5,25,50,100", "--step-min-requests", "30",
                   budget=4000)
    assert run.status.status == "promoted", run.status
    assert Registry(Settings(home=home)).get("support").version == 2
    taken = [e for e in steps(home) if e.created_at >= run.status.started_at]
    assert [e.after["weight"] for e in taken if e.action == "rollout.step"] == [25, 50, 100]
    for step in taken:  # every step names the figures behind it: the candidate shown not worse
        assert "success rate" in step.reason and step.after["figures"]["success_diff"]["low"] >= -0.02


def test_equal_versions_are_not_rolled_back(home, server):
    """Equal arms, checked after every meter batch, with the strictest margin (any drop): the
    documented false-rollback rate is 3% of runs (README, bench/ab_guardrail.py, which repeats
    this at the statistics level 100 times); none of these runs."""
    runs = [simulate(home, server, f"equal-{n}", {1: 0.90, 2: 0.90}, "--weight", "50", "--max-success-drop", "0",
                     budget=500) for n in range(2)]
    assert [r.status.status for r in runs] == ["active"] * 2, [r.status.end_reason for r in runs]
    assert all(r.status.arms[1].success_n > 150 for r in runs)


def test_a_version_five_points_worse_is_rolled_back_on_outcomes_alone(home, server):
    """No HTTP error and no latency difference: only the outcomes show it."""
    run = simulate(home, server, "worse-5", {1: 0.98, 2: 0.93}, "--weight", "50", budget=4000)
    assert run.status.status == "rolled_back" and "success rate" in run.status.end_reason, run.status
    assert all(a.error_rate == 0 for a in run.status.arms)


def test_a_version_two_points_worse_never_ramps(home, server):
    """At the default margin (2 points) a 2-point drop is not 'worse beyond the margin', so it is
    not rolled back, but it is never shown 'not worse' either: the ramp holds at its first step.
    (With margin 0 it is rolled back; bench/ab_guardrail.py: about 6 000 outcomes per arm at 80%.)"""
    held = simulate(home, server, "worse-2", {1: 0.98, 2: 0.96}, "--ramp", "5,25,50,100", "--step-min-requests", "30",
                    budget=1000)
    assert held.status.status == "active" and held.status.weight == 5, held.status
    assert held.served[2] >= 30  # it had its step's requests: evidence, not traffic, held it


def test_a_slower_version_is_rolled_back_at_equal_batch_sizes(home, server, hf_base, tmp_path):
    """A candidate that really decodes slower (rank 256 on every linear layer: about 1.9x the time per
    token of production's rank 8 here; rank 128's 1.5x sat too close to the 1.3x ceiling on a busy
    machine) is rolled back on time per output token."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from loragate.quantize.lora_gguf import convert_lora_to_gguf

    registry = Registry(Settings(home=home))
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    folder = tmp_path / "slow"
    peft.get_peft_model(model, peft.LoraConfig(r=256, lora_alpha=16, target_modules=targets)).save_pretrained(folder)
    slow = registry.register("support", folder, base=BASE_ID)
    convert_lora_to_gguf(registry, slow.ref)
    run = simulate(home, server, "slower", {}, "--weight", "50", "--min-requests", "8", "--max-latency-ratio", "1.3",
                   candidate=slow.version, max_tokens=16, concurrency=4, budget=400)
    assert run.status.status == "rolled_back", run.status
    assert "time per output token" in run.status.end_reason and run.status.latency_ratio > 1.3
