"""The gateway for real: `loragate gateway serve` on 127.0.0.1 with the llama.cpp backend, the
SmolLM2 GGUF base and real GGUF LoRAs converted from peft, driven by the official openai SDK.

test_gateway_vllm.py runs these same tests against the vLLM backend: it overrides the fixtures
``home``, ``server``, ``backend_name``, ``gateway_env`` and ``served_file``."""

import asyncio
import json
import signal
import time
from collections import Counter

import httpx
import openai
import pytest

from loragate.gateway.rollouts import assign_arm
from loragate.registry import Registry
from loragate.settings import Settings

from .conftest import BASE_ID, peft_adapter, run_cli, serving_home
from .gateway_server import GatewayServer
from .openai_contract import *  # noqa: F403  (the contract tests, collected here with this module's fixtures)
from .responses_contract import *  # noqa: F403  (the Responses API's, likewise)

pytestmark = pytest.mark.model
pytest.importorskip("xllamacpp")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def home(tmp_path_factory, hf_base):
    """A registry with the base model and support@1 (production), @2 and @3, each with a GGUF LoRA."""
    return serving_home(tmp_path_factory, hf_base, versions=3)


@pytest.fixture(scope="module")
def server(home):
    gateway = GatewayServer(home).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def backend_name():
    return "llamacpp"


@pytest.fixture(scope="module")
def users():
    """Users in the rollout tests: the wiring per user, the shares themselves are proven by simulation
    (test_rollouts.py); fewer on the vLLM engine, where a request costs several times llama.cpp's."""
    return 120


@pytest.fixture(scope="module")
def gateway_env():
    """Settings (as environment variables) for more gateways on the same registry."""
    return {}


@pytest.fixture(scope="module")
def served_file():
    """The stored file the backend loads for a version (the tests damage it)."""
    def locate(registry: Registry, ref: str):
        gguf = next(a for a in registry.derived_artifacts(ref) if a.kind == "gguf-lora")
        return registry.store.root / "sha256" / gguf.sha256 / "files" / "adapter.gguf"

    return locate


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0)


def _greedy(client, model, messages=CHAT, max_tokens=12):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                          temperature=0).choices[0].message.content


def test_models_lists_the_base_and_served_adapters(client):
    assert {m.id for m in client.models.list().data} == {BASE_ID, "support"}


def test_chat_completion_names_the_version_that_served(client):
    raw = client.chat.completions.with_raw_response.create(model="support", messages=CHAT, max_tokens=8,
                                                           temperature=0)
    assert raw.headers["x-loragate-version"] == "support@1" and raw.headers["x-loragate-arm"] == "production"
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == "support"
    assert completion.choices[0].message.content and completion.choices[0].finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_adapters_change_the_answer_and_switching_is_clean(client):
    """Each version answers differently from the base, and switching back and forth gives the same
    answers again (the KV cache of one adapter is never reused for another)."""
    first = {model: _greedy(client, model) for model in (BASE_ID, "support@1", "support@2")}
    assert len(set(first.values())) == 3, first
    again = {model: _greedy(client, model) for model in ("support@2", BASE_ID, "support@1")}
    assert again == first


def test_completions_endpoint(client):
    raw = client.completions.with_raw_response.create(model="support@2", prompt="The capital of France is",
                                                      max_tokens=5, temperature=0)
    assert raw.headers["x-loragate-version"] == "support@2" and raw.headers["x-loragate-arm"] == "pinned"
    completion = raw.parse()
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.usage.completion_tokens <= 5


def test_an_empty_prompt_is_served_from_the_start_of_text(client):
    # Valid for OpenAI; llama.cpp once failed on it (found by schemathesis). vLLM refuses it (400).
    assert client.completions.create(model=BASE_ID, prompt="", max_tokens=2).usage.prompt_tokens >= 1


def test_streaming_matches_the_plain_answer_and_ends_with_usage(client):
    expected = _greedy(client, "support@1")
    chunks = list(client.chat.completions.create(model="support@1", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_streaming_completions_end_with_done(server):
    body = {"model": BASE_ID, "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in lines[:-1])


def test_async_clients_queue_and_all_get_answers(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*[
            client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, temperature=0)
            for model in ("support", "support@2", BASE_ID, "support@1", "support@2", BASE_ID)])

    results = asyncio.run(run())
    assert all(r.choices[0].message.content for r in results)


def test_concurrent_requests_under_different_adapters_get_their_own_answers(server, client):
    """Requests for the base and two versions at once, several each: every answer is the one the
    same request gets alone, so none ran under another request's adapter."""
    models = [BASE_ID, "support@1", "support@2"]
    alone = {model: _greedy(client, model, max_tokens=16) for model in models}
    assert len(set(alone.values())) == 3

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*[aclient.chat.completions.create(model=model, messages=CHAT, max_tokens=16,
                                                                       temperature=0) for model in models * 4])

    together = [r.choices[0].message.content for r in asyncio.run(run())]
    assert together == [alone[model] for model in models * 4]


def test_prompt_prefix_is_reused_within_an_adapter_and_never_across(client):
    """The engine keeps each slot's KV cache; the gateway sends a request to a slot that last served
    its adapter, and a slot's cache computed under one adapter is never used for another."""
    system = "Loragate prefix-cache probe. " + "You answer questions about European capitals briefly. " * 12
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of Spain?"}]

    def ask(model):
        response = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
        return response.choices[0].message.content, response.usage.prompt_tokens_details.cached_tokens, \
            response.usage.prompt_tokens

    first_2, _, prompt_tokens = ask("support@2")
    assert prompt_tokens > 120
    first_1, cached, _ = ask("support@1")
    assert cached < 20  # the prompt is in support@2's slot, computed under support@2: not reused
    again_1, cached, _ = ask("support@1")
    assert again_1 == first_1 and cached > prompt_tokens - 20
    again_2, cached, _ = ask("support@2")
    assert again_2 == first_2 and cached > prompt_tokens - 20


def test_a_small_engine_loads_new_versions_evicts_old_ones_and_refuses_beyond_its_queue(home, hf_base, tmp_path):
    """One slot, a queue of one, two adapters loaded at most: a version registered after the gateway
    started is served; the least recently used adapter is unloaded; a full queue answers 503 with
    Retry-After; the answers are the main gateway's."""
    from concurrent.futures import ThreadPoolExecutor

    from loragate.quantize.lora_gguf import convert_lora_to_gguf

    small = {"LORAGATE_GATEWAY__LLAMACPP__SLOTS": "1", "LORAGATE_GATEWAY__LLAMACPP__MAX_QUEUE": "1",
             "LORAGATE_GATEWAY__LLAMACPP__MAX_LORAS": "2"}
    registry = Registry(Settings(home=home))
    with GatewayServer(home, **small) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        def story(model):
            return client.completions.create(model=model, prompt="Once upon a time,", max_tokens=24,
                                             temperature=0).choices[0].text

        answers = {model: story(model) for model in ("support@1", "support@2", BASE_ID)}
        assert len(set(answers.values())) == 3
        late = registry.register("support", peft_adapter(hf_base, tmp_path / "late", ["q_proj", "v_proj"], seed=11),
                                 base=BASE_ID)
        convert_lora_to_gguf(registry, late.ref)
        answers[late.ref] = story(late.ref)
        assert len(set(answers.values())) == 4, answers
        engine = httpx.get(f"{gateway.url}/health", timeout=10).json()["engines"]["llamacpp"]
        assert engine["adapters"] == ["support@2", late.ref] and engine["slots"] == 1
        assert story("support@1") == answers["support@1"]  # loaded again, same answer

        def ask(n):
            return httpx.post(f"{gateway.url}/v1/completions", timeout=120,
                              json={"model": BASE_ID, "prompt": f"Story {n}:", "max_tokens": 48})

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(ask, range(6)))
    busy = [r for r in responses if r.status_code == 503]
    assert busy and sum(r.status_code == 200 for r in responses) >= 2
    assert all(r.json()["error"]["code"] == "backend_busy" and int(r.headers["retry-after"]) >= 1 for r in busy)


def test_client_disconnect_cancels_the_generation(server, client):
    body = {"model": BASE_ID, "messages": CHAT, "max_tokens": 400, "stream": True, "temperature": 0.8}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        next(response.iter_lines())
    started = time.monotonic()
    assert _greedy(client, BASE_ID, max_tokens=2)  # the slot frees within a token, not after 400
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nope", "messages": CHAT}, 404, "model_not_found"),
        ({"model": "support@99", "messages": CHAT}, 404, "model_not_found"),
        ({"model": "bad name!", "messages": CHAT}, 404, "model_not_found"),
        ({"model": "support", "messages": CHAT, "temperature": 5}, 400, "invalid_request"),
        ({"model": "support", "messages": []}, 400, "invalid_request"),
        ({"model": "support", "messages": CHAT, "n": 99}, 400, "invalid_request"),
        ({"model": "support", "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_request"),
        ({"model": "support", "messages": CHAT, "max_tokens": 100000}, 400, "invalid_request"),
        ({"model": "support", "messages": [{"role": "user", "content": "word " * 3000}]}, 400,
         "context_length_exceeded"),
        ({"messages": CHAT}, 400, "invalid_request"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, body, status, code):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] and error["message"] and "Traceback" not in response.text


def test_sdk_raises_the_matching_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="support", messages=CHAT, temperature=9)


@pytest.mark.parametrize(("messages", "param", "says"), [
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}],
     "messages", "messages[1] has role 'tool' but answers no tool call"),
    ([{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
     "messages.0.content", "'image_url' are not supported: the models served here accept text only"),
])
def test_messages_the_model_cannot_take_are_refused_saying_why(server, messages, param, says):
    response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "support", "messages": messages},
                          timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_malformed_and_oversized_bodies(server):
    bad = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "support", "messages": [}', timeout=10,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    error = bad.json()["error"]
    assert error["param"] is None and error["message"].startswith("the body is not valid JSON") and \
        "at character 34" in error["message"], error
    big = httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * 2_000_000, timeout=10,
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server.url}/v1/nothing", timeout=10).json()["error"]["type"] == "invalid_request_error"


def test_alias_routing(home, client):
    run_cli(home, "registry", "alias", "set", "support@2", "candidate")
    time.sleep(1.2)  # the routing cache
    raw = client.chat.completions.with_raw_response.create(model="support@candidate", messages=CHAT, max_tokens=2)
    assert (raw.headers["x-loragate-version"], raw.headers["x-loragate-arm"]) == ("support@2", "alias")


def test_rollout_split_is_sticky_and_near_its_weight(home, server, client, users):
    # No latency rollback here: on a busy 2-core machine a noisy p95 once ended this rollout mid-test.
    run_cli(home, "rollout", "start", "support", "--candidate", "2", "--weight", "30", "--max-latency-ratio", "1000")
    rollout_id = json.loads(run_cli(home, "rollout", "status", "support", "--json").stdout)["id"]
    time.sleep(1.2)
    served = {}
    for n in range(users):
        raw = client.chat.completions.with_raw_response.create(
            model="support", messages=CHAT, max_tokens=1, user=f"user-{n}")
        served[n] = raw.headers["x-loragate-version"]
    # Each user gets the arm the assignment gives (its share over 10 000 users: test_rollouts.py).
    assert served == {n: "support@2" if assign_arm(rollout_id, f"user-{n}", 30) == "candidate" else "support@1"
                      for n in range(users)}
    assert 0 < Counter(served.values())["support@2"] < users
    for n in range(0, users, 6):  # the same user sees the same version, by body field or header
        again = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                           json={"model": "support", "messages": CHAT, "max_tokens": 1},
                           headers={"X-Loragate-User": f"user-{n}"})
        assert again.headers["x-loragate-version"] == served[n]
    time.sleep(1.5)  # the meter flushes every 0.5 s
    status = json.loads(run_cli(home, "rollout", "status", "support", "--json").stdout)
    arms = {a["arm"]: a for a in status["arms"]}
    assert arms["candidate"]["requests"] + arms["production"]["requests"] == users + len(range(0, users, 6))
    assert arms["candidate"]["error_rate"] == 0 and arms["production"]["p95_ms"] > 0

    run_cli(home, "rollout", "set-weight", "support", "100")
    time.sleep(1.2)
    assert {client.chat.completions.with_raw_response.create(
        model="support", messages=CHAT, max_tokens=1, user=f"user-{n}").headers["x-loragate-version"]
        for n in range(users // 6)} == {"support@2"}
    run_cli(home, "rollout", "abort", "support", "--reason", "test over")
    time.sleep(1.2)
    assert client.chat.completions.with_raw_response.create(
        model="support", messages=CHAT, max_tokens=1, user="user-1").headers["x-loragate-version"] == "support@1"


def _busy(server, requests: int, users: str, concurrency: int = 6, max_tokens: int = 12) -> Counter:
    """Traffic from many users at once, as a busy service sees it; the status codes."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(n):
        return httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "support", "messages": CHAT, "max_tokens": max_tokens, "user": f"{users}-{n}"}).status_code

    with ThreadPoolExecutor(concurrency) as pool:
        return Counter(pool.map(ask, range(requests)))


def test_a_healthy_five_percent_candidate_on_a_busy_engine_is_not_rolled_back(home, server):
    """The minority arm waits for its adapter's turn on a busy engine, so its end-to-end latency is
    worse; the rollback compares time per output token at equal batch sizes, and leaves it be."""
    run_cli(home, "rollout", "start", "support", "--candidate", "2", "--weight", "5", "--min-requests", "3")
    time.sleep(1.2)
    assert _busy(server, 160, "busy") == {200: 160}
    time.sleep(1.5)
    status = json.loads(run_cli(home, "rollout", "status", "support", "--json").stdout)
    arms = {a["arm"]: a for a in status["arms"]}
    assert status["status"] == "active", status["end_reason"]
    assert arms["candidate"]["requests"] >= 3 and arms["production"]["requests"] >= 100
    assert status["latency_ratio"] is None or status["latency_ratio"] < 1.5
    run_cli(home, "rollout", "abort", "support", "--reason", "test over")


def test_failing_candidate_is_rolled_back_automatically(home, server, client, served_file, users):
    registry = Registry(Settings(home=home))
    stored = served_file(registry, "support@3")
    stored.chmod(0o644)
    with stored.open("r+b") as handle:  # a damaged artifact: the candidate fails every request
        handle.seek(1000)
        handle.write(b"\xff\xff\xff\xff")
    run_cli(home, "rollout", "start", "support", "--candidate", "3", "--weight", "50", "--min-requests", "5",
         "--max-error-rate", "0.2")
    time.sleep(1.2)
    codes = Counter()
    for n in range(max(users // 3, 24)):
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                              json={"model": "support", "messages": CHAT, "max_tokens": 1, "user": f"u{n}"})
        codes[response.status_code] += 1
        if response.status_code != 200:
            assert response.json()["error"]["code"] == "artifact_corrupt"
    assert codes[503] >= 5 and codes[200] > 0
    time.sleep(2)  # a meter flush, the rollback check, the routing cache
    status = json.loads(run_cli(home, "rollout", "status", "support", "--json").stdout)
    assert status["status"] == "rolled_back" and "error rate" in status["end_reason"]
    after = [httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                        json={"model": "support", "messages": CHAT, "max_tokens": 1, "user": f"u{n}"})
             for n in range(users // 6)]
    assert {r.status_code for r in after} == {200}
    assert {r.headers["x-loragate-version"] for r in after} == {"support@1"}
    event = [e for e in registry.audit_log() if e.action == "rollout.rolled_back"][-1]
    assert event.outcome == "auto" and "error rate" in event.reason


def test_metrics_and_cost_report(home, server, backend_name, users):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert ('loragate_requests_total{adapter="support",arm="production",backend="%s",status="200",version="1"}'
            % backend_name) in text
    assert "loragate_request_latency_seconds_bucket" in text and "loragate_cost_usd_total" in text
    assert 'loragate_tokens_total{adapter="support",arm="production"' in text
    rows = {r["group"]: r for r in json.loads(run_cli(home, "cost", "report", "--by", "version", "--json").stdout)}
    assert rows["support@1"]["requests"] > users - 20 and rows["support@1"]["cost_per_1k_usd"] > 0
    assert rows["support@3"]["error_rate"] == 1.0
    assert "support@1" in run_cli(home, "cost", "report", "--by", "version", "--since", "1h").stdout


def test_meter_survives_graceful_shutdown_and_loses_no_answered_request_on_kill(home, gateway_env):
    registry = Registry(Settings(home=home))

    def count():
        with registry.engine.connect() as conn:
            return conn.exec_driver_sql("SELECT count(*) FROM meter_record").scalar()

    def send(gateway, n):
        for _ in range(n):
            assert httpx.post(f"{gateway.url}/v1/completions", timeout=60,
                              json={"model": BASE_ID, "prompt": "Hi", "max_tokens": 1}).status_code == 200

    batched = {"LORAGATE_GATEWAY__METER_BEFORE_ANSWER": "false", "LORAGATE_GATEWAY__METER_FLUSH_INTERVAL_S": "30"}
    before = count()
    with GatewayServer(home, **gateway_env, **batched) as gateway:
        send(gateway, 12)
        # uvicorn shuts down gracefully, then re-raises SIGTERM so the parent sees it: rc -15.
        assert gateway.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert count() == before + 12  # nothing lost on a graceful shutdown, even mid-interval

    before = count()
    with GatewayServer(home, **gateway_env) as gateway:  # meter_before_answer, the default
        send(gateway, 13)
        gateway.stop(signal.SIGKILL)
    assert count() == before + 13  # an answered request is a metered one


def test_answers_are_checked_against_the_versions_output_check(home, server, client):
    """support@2 declares its labels; every answer it serves is checked and the share that passed
    is metered with the request (a free-text answer fails, one constrained to the labels passes)."""
    run_cli(home, "registry", "output-check", "support@2", "--labels", "billing,shipping")
    time.sleep(1.2)  # the gateway's routing cache
    labels = {"type": "json_schema", "json_schema": {"name": "queue", "strict": True,
                                                     "schema": {"type": "string", "enum": ["billing", "shipping"]}}}
    expected = {}
    try:
        raw = client.chat.completions.with_raw_response.create(model="support@2", messages=CHAT, max_tokens=8,
                                                               response_format=labels, n=2)
        assert {c.message.content for c in raw.parse().choices} <= {'"billing"', '"shipping"'}
        expected[raw.headers["x-request-id"]] = 1.0
        stream = client.chat.completions.with_raw_response.create(model="support@2", messages=CHAT, max_tokens=3,
                                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices).strip() not in (
            "billing", "shipping")
        expected[stream.headers["x-request-id"]] = 0.0
        unchecked = client.chat.completions.with_raw_response.create(model="support@1", messages=CHAT, max_tokens=3)
        expected[unchecked.headers["x-request-id"]] = None
    finally:
        run_cli(home, "registry", "output-check", "support@2", "--clear")
    registry = Registry(Settings(home=home))
    ids = ", ".join(f"'{i}'" for i in expected)
    for _ in range(50):  # the meter writes in batches
        with registry.engine.connect() as conn:
            metered = dict(conn.exec_driver_sql(f"SELECT request_id, output_ok FROM meter_record "
                                                f"WHERE request_id IN ({ids})").all())
        if len(metered) == len(expected):
            break
        time.sleep(0.2)
    assert metered == expected
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    checked = 'adapter="support",arm="pinned",backend="llamacpp",version="2"} '
    assert f"loragate_output_checked_total{{{checked}2.0" in metrics
    assert f"loragate_output_passed_total{{{checked}1.0" in metrics


def test_feedback_attaches_to_the_served_version_once_per_kind(home, server, client):
    from loragate.gateway.outcomes import send_feedback

    raw = client.chat.completions.with_raw_response.create(model="support@2", messages=CHAT, max_tokens=2)
    request_id = raw.headers["x-request-id"]
    # At once: the meter record may still be queued, not yet written.
    receipt = send_feedback(client, request_id, success=False, label="thumbs_down")
    assert (receipt.adapter, receipt.version, receipt.arm, receipt.kinds) == ("support", 2, "pinned",
                                                                              ["success", "label"])
    send_feedback(client, request_id, success=True, score=0.75, comment="fine after all")  # the latest wins
    registry = Registry(Settings(home=home))
    with registry.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT kind, value, label FROM feedback WHERE request_id = "
                                    f"'{request_id}' ORDER BY kind").all()
    assert [tuple(r) for r in rows] == [("label", None, "thumbs_down"), ("score", 0.75, None), ("success", 1.0, None)]
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'loragate_feedback_total{adapter="support",arm="pinned",kind="success",outcome="false",version="2"} 1.0' \
        in metrics
    missing = httpx.post(f"{server.url}/v1/feedback", json={"request_id": "chatcmpl-nope", "success": True}, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
    empty = httpx.post(f"{server.url}/v1/feedback", json={"request_id": request_id}, timeout=10)
    assert empty.status_code == 400 and empty.json()["error"]["type"] == "invalid_request_error"


def test_a_stored_response_is_read_and_continued_by_another_gateway_replica(server, home):
    """Stored responses live in the registry's database: a second gateway on it answers GET and
    continues the conversation from the first one's response."""
    first = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0)
    made = first.responses.create(model="support", input="What is the capital of France?", max_output_tokens=4)
    with GatewayServer(home) as other:
        second = openai.OpenAI(base_url=f"{other.url}/v1", api_key="unused-on-loopback", max_retries=0)
        assert second.responses.retrieve(made.id).output_text == made.output_text
        follow_up = second.responses.create(model="support", input="And of Germany?", previous_response_id=made.id,
                                            max_output_tokens=4)
        second.responses.delete(made.id)
    assert follow_up.previous_response_id == made.id
    with pytest.raises(openai.NotFoundError):
        first.responses.retrieve(made.id)
