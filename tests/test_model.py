"""With the real offline SmolLM2 base: a peft adapter through the registry, and the README demo."""

import json
import os
import subprocess

import pytest

from loragate.gateway.rollouts import RolloutService
from loragate.registry import InvalidAdapter, Registry
from loragate.settings import Settings

from .conftest import peft_adapter
from .gateway_server import GatewayServer

pytestmark = pytest.mark.model
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def test_a_real_peft_adapter_round_trips_through_the_registry(hf_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loragate.offline_base import BASE_ID

    registry = Registry(Settings(home=tmp_path / "home", user="tester"))
    registry.add_base_model(BASE_ID, source=str(hf_base), folder=hf_base)
    folder = peft_adapter(hf_base, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
    info = registry.register("real", folder, base=BASE_ID)
    assert info.target_modules == ["down_proj", "q_proj", "v_proj"] and info.r == 8

    tokenizer = AutoTokenizer.from_pretrained(hf_base)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        adapted = peft.PeftModel.from_pretrained(base, registry.artifact_path("real@1"))
        adapted_logits = adapted(**inputs).logits
    assert not torch.allclose(base_logits, adapted_logits, atol=1e-3)


def test_an_adapter_for_another_model_is_refused(hf_base, tmp_path):
    from loragate.offline_base import BASE_ID

    registry = Registry(Settings(home=tmp_path / "home"))
    registry.add_base_model(BASE_ID, source=str(hf_base), folder=hf_base)
    folder = peft_adapter(hf_base, tmp_path / "adapter", ["q_proj"])
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidAdapter, match="not on base model"):
        registry.register("real", folder, base=BASE_ID)
    assert registry.list_versions() == []


DEMO_STEPS, DEMO_REQUESTS = 20, 200
TICKET = {"name": "open_ticket", "description": "Open a support ticket about a customer's review",
          "parameters": {"type": "object", "additionalProperties": False, "required": ["sentiment", "summary"],
                         "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]},
                                        "summary": {"type": "string"}}}}


@pytest.mark.timeout(1800)  # the demo process's own bound: on one thread per process (xdist) it takes minutes
def test_readme_demo(hf_base, models_dir, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir)  # reuse the base built above
    # The real demo on a smaller budget than its defaults (40 steps, 60 examples, 300 requests).
    done = subprocess.run(["loragate", "demo", "--steps", str(DEMO_STEPS), "--eval-examples", "30",
                           "--requests", str(DEMO_REQUESTS)], env={**os.environ, "LORAGATE_HOME": str(home)},
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    registry = Registry(Settings(home=home))
    v1, v2, v3 = registry.list_versions("sentiment")
    score = {v.version: v.score("default", "exact_match").value for v in (v1, v2, v3)}
    baselines = registry.baselines("SmolLM2-135M-Instruct", "default", "exact_match",
                                   v2.score("default", "exact_match").eval_data_sha256)
    assert score[2] > baselines["prompted_base"].value > baselines["base"].value
    assert v2.parent == "sentiment@1" and v3.parent == "sentiment@2"
    # Trained by the trainer on the prepared data, with its run recorded.
    prepared = json.loads((home / "demo" / "prepared" / "manifest.json").read_text())
    assert v2.training_data_sha256 == prepared["splits"]["train"]["sha256"]
    assert v2.training_config["steps"] == DEMO_STEPS and v2.training_config["cost_usd"] > 0
    refused = [e for e in registry.audit_log() if e.outcome == "refused"]
    assert refused and refused[0].target == "sentiment@production"
    assert "sentiment@2" in done.stdout and "gate refused sentiment@1" in done.stdout
    # The canary: both versions served over the gateway, metered, then promoted through the gate.
    status = RolloutService(registry).status("sentiment")
    assert status.status == "promoted"
    arms = {arm.arm: arm.requests for arm in status.arms}
    # The 5% arm is not penalised for being the minority (it once showed 2x production's p50).
    production, candidate = status.arms
    assert candidate.p50_ms < 1.5 * production.p50_ms, (candidate.p50_ms, production.p50_ms)
    assert {arm.arm: arm.version for arm in status.arms} == {"production": 2, "candidate": 3}
    assert arms["production"] + arms["candidate"] == DEMO_REQUESTS and 0 < arms["candidate"] < DEMO_REQUESTS * 0.15
    assert [arm.success_n for arm in status.arms] == [arms["production"], arms["candidate"]]  # the scorer's feedback
    assert registry.get("sentiment").version == 3
    assert "rollout promoted: sentiment@3 is production" in done.stdout

    # The fine-tuned classifier asked for a required (or named) tool call: one complete call within
    # 100 tokens, on chat and on the Responses API.
    openai = pytest.importorskip("openai")
    review = [{"role": "user", "content": "The blender broke after two days and support never answered."}]
    with GatewayServer(home) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused-on-loopback", max_retries=0)
        for choice in ("required", {"type": "function", "function": {"name": "open_ticket"}}):
            answer = client.chat.completions.create(model="sentiment", messages=review, max_tokens=100,
                                                    tools=[{"type": "function", "function": TICKET}],
                                                    tool_choice=choice, temperature=0)
            calls = answer.choices[0].message.tool_calls
            assert answer.choices[0].finish_reason == "tool_calls" and len(calls) == 1, answer
            assert set(json.loads(calls[0].function.arguments)) == {"sentiment", "summary"}
        response = client.responses.create(model="sentiment", input=review[0]["content"], max_output_tokens=100,
                                           tools=[{"type": "function", **TICKET}], tool_choice="required",
                                           temperature=0)
        assert response.status == "completed" and [o.type for o in response.output] == ["function_call"], response
