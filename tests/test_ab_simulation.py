"""Rollouts decided by outcomes and latency, end to end with a known truth: the wiring.

A real gateway (llama.cpp backend, real versions) serves traffic from many users through the
``openai`` client; each answer's outcome is drawn from its version's true success rate and sent
back as feedback, as an application would. The rollout, checked by the gateway after every meter
batch, must end as the truth says. Outcomes are drawn per request number from a seeded generator,
so a scenario's truth is the same whatever the timing. The truths here are far apart, so that a
few hundred requests decide; how often the same decisions go right or wrong at small differences
(false rollbacks, detection delays, ramps that hold) is proven over thousands of simulated runs in
``test_rollout_policy.py``, through the same decision functions.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import openai
import pytest

from loragate.gateway.backends.base import Generation
from loragate.gateway.backends.factory import default_backend
from loragate.gateway.outcomes import send_feedback
from loragate.gateway.rollouts import RolloutService, RolloutStatus
from loragate.registry import Registry
from loragate.settings import Settings

from .conftest import run_cli, serving_home
from .gateway_server import GatewayServer, InProcessGateway

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


def test_a_better_version_ramps_step_by_step_to_production(home, server):
    run = simulate(home, server, "better", {1: 0.50, 2: 0.99}, "--ramp", "20,50,100", "--step-min-requests", "20",
                   budget=1500)
    assert run.status.status == "promoted", run.status
    assert Registry(Settings(home=home)).get("support").version == 2
    taken = [e for e in steps(home) if e.created_at >= run.status.started_at]
    assert [e.after["weight"] for e in taken if e.action == "rollout.step"] == [50, 100]
    for step in taken:  # every step names the figures behind it: the candidate shown not worse
        assert "success rate" in step.reason and step.after["figures"]["success_diff"]["low"] >= -0.02


def test_a_worse_version_is_rolled_back_on_outcomes_alone(home, server):
    """No HTTP error and no latency difference: only the outcomes show it."""
    run = simulate(home, server, "worse", {1: 0.98, 2: 0.60}, "--weight", "50", budget=1000)
    assert run.status.status == "rolled_back" and "success rate" in run.status.end_reason, run.status
    assert all(a.error_rate == 0 for a in run.status.arms)


class SlowedAdapter:
    """The real llama.cpp backend with one version slowed by construction: after each of its tokens
    but the first it waits ``factor`` times the engine's recent time per token, as the other
    versions' streams show it (their gaps between tokens, not slowed, averaged). The engine goes on
    generating meanwhile, so that version's time per output token is about ``factor`` times the
    others' however busy the machine is: a fixed delay shrinks to nothing against a busy machine's
    own slowness, and a rank difference drowns in its noise. Its own gaps are not the measure:
    tokens pile up in the engine while it waits."""

    def __init__(self, backend, slow: str, factor: float, first_guess_s: float = 0.04):
        self.backend, self.slow, self.factor = backend, slow, factor
        self.gap_s = first_guess_s  # until the other versions have streamed tokens

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    async def generate(self, request: Generation):
        slowed = request.adapter is not None and request.adapter.key == self.slow
        last = None
        async for delta in self.backend.generate(request):
            if delta.text:
                now = time.monotonic()
                if slowed and last is not None:
                    await asyncio.sleep(self.factor * self.gap_s)
                elif last is not None:
                    self.gap_s = 0.9 * self.gap_s + 0.1 * (now - last)
                last = now
            yield delta


def test_a_slower_version_is_rolled_back_at_equal_batch_sizes(home, server):
    """support@2 takes about 3x production's time per token (the test's wrapper waits three times
    the engine's recent time per token after each of its tokens): rolled back on time per output
    token, by a gateway whose backend is the real engine behind that wrapper."""
    settings = Settings(home=home, gate={"aliases": []})
    backend = SlowedAdapter(default_backend(settings, Registry(settings)), slow="support@2", factor=3.0)
    with InProcessGateway(settings, backend) as slowed:
        run = simulate(home, slowed, "slower", {}, "--weight", "50", "--min-requests", "8",
                       "--max-latency-ratio", "1.3", max_tokens=16, concurrency=4, budget=400)
    assert run.status.status == "rolled_back", run.status
    assert "time per output token" in run.status.end_reason and run.status.latency_ratio > 1.3
