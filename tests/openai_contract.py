"""The OpenAI contract, backend by backend: every response and stream chunk against OpenAI's
published schema, n, logprobs, the sampling parameters, structured outputs, tool calls, and
parameters we cannot honour refused by name.

Not collected on its own (no ``test_`` prefix): test_gateway.py (llama.cpp) and
test_gateway_vllm.py (vLLM) import these tests and run them with their own ``server``, ``client``
and ``home`` fixtures.

The schema (tests/data/openai_responses.schema.json) is derived from openai/openai-openapi's
openapi.json (info.version 2.3.0; tests/data/derive_openai_schema.py). One deviation, written down:
a streamed ``text_completion`` chunk may have ``finish_reason: null`` before its last chunk. The
description says streamed and whole objects share a shape, and OpenAI itself streams nulls there.
"""

from __future__ import annotations

import copy
import json
import time
from functools import cache
from pathlib import Path

import httpx
import jsonschema
import pytest
from sqlalchemy import text

from loragate.registry import Registry
from loragate.settings import Settings

from .conftest import BASE_ID

# What test_gateway.py and test_gateway_vllm.py import (``from .openai_contract import *``).
__all__ = [
    "test_every_endpoint_answers_in_openais_schema",
    "test_models_retrieve_shows_an_adapters_base_and_production_version",
    "test_n_choices_with_logprobs_that_spell_the_text",
    "test_sampling_parameters_reach_the_engine",
    "test_structured_output_follows_a_nested_json_schema",
    "test_tool_call_round_trip",
    "test_tool_calls_end_within_their_bounds_and_never_show_the_wrapper",
    "test_what_cannot_be_honoured_is_refused_by_name",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PARIS = "7042"  # SmolLM2's token " Paris", in the GGUF and the safetensors tokenizer alike
PERSON = {  # nested, strict: objects in objects, an array, an enum, bounded strings
    "type": "object", "additionalProperties": False, "required": ["name", "address", "tags", "active"],
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 12},
                                   "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}}},
        "tags": {"type": "array", "maxItems": 3, "items": {"type": "string", "enum": ["vip", "new", "eu"]}},
        "active": {"type": "boolean"},
    },
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"type": "string", "enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 12}}}}}


@cache
def _validators() -> dict[str, jsonschema.Draft202012Validator]:
    schemas = json.loads((Path(__file__).parent / "data" / "openai_responses.schema.json").read_text())
    streamed = copy.deepcopy(schemas["text_completion"])
    reason = streamed["properties"]["choices"]["items"]["properties"]["finish_reason"]
    streamed["properties"]["choices"]["items"]["properties"]["finish_reason"] = {"anyOf": [reason, {"type": "null"}]}
    schemas["text_completion.chunk"] = streamed
    defs = schemas.pop("$defs")  # what the Responses API's entries refer to
    return {name: jsonschema.Draft202012Validator({**schema, "$defs": defs}) for name, schema in schemas.items()
            if name != "$comment"}


def conforms(body: dict, name: str) -> dict:
    errors = sorted(_validators()[name].iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{name} breaks OpenAI's schema: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:5])
    return body


def _post(server, path: str, body: dict, status: int = 200) -> httpx.Response:
    response = httpx.post(f"{server.url}/v1{path}", json=body, timeout=300)
    assert response.status_code == status, response.text
    return response


def _stream(server, path: str, body: dict) -> list[dict]:
    """The data chunks of a streamed answer, checked to end with [DONE]."""
    lines = _post(server, path, {**body, "stream": True}).text.split("\n\n")
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def test_every_endpoint_answers_in_openais_schema(server):
    chat = {"model": "support", "messages": CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 2, "n": 2}
    whole = conforms(_post(server, "/chat/completions", chat).json(), "chat.completion")
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    assert all(c["message"]["refusal"] is None and "logprobs" in c for c in whole["choices"])
    chunks = _stream(server, "/chat/completions", {**chat, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        conforms(chunk, "chat.completion.chunk")
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0

    completion = {"model": BASE_ID, "prompt": "The capital of France is", "max_tokens": 4, "logprobs": 2}
    conforms(_post(server, "/completions", completion).json(), "text_completion")
    for chunk in _stream(server, "/completions", completion):
        conforms(chunk, "text_completion.chunk")

    listed = conforms(httpx.get(f"{server.url}/v1/models", timeout=30).json(), "list")
    for card in listed["data"]:
        conforms(card, "model")
        single = httpx.get(f"{server.url}/v1/models/{card['id']}", timeout=30)
        assert single.status_code == 200 and conforms(single.json(), "model") == card
    missing = httpx.get(f"{server.url}/v1/models/nope", timeout=30)
    assert missing.status_code == 404 and conforms(missing.json(), "error")["error"]["param"] == "model"
    conforms(_post(server, "/chat/completions", {"model": "support", "messages": []}, 400).json(), "error")


def test_models_retrieve_shows_an_adapters_base_and_production_version(client):
    adapter = client.models.retrieve("support")
    assert adapter.id == "support" and adapter.base_model == BASE_ID and adapter.production_version == 1
    assert adapter.served_weights  # what the backend serves the base from (the GGUF's name on llama.cpp)
    assert client.models.retrieve(BASE_ID).id == BASE_ID  # an id with a slash in it


def test_n_choices_with_logprobs_that_spell_the_text(client):
    answer = client.chat.completions.create(model="support", messages=CHAT, max_tokens=8, n=3, logprobs=True,
                                            top_logprobs=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for choice in answer.choices:
        tokens = choice.logprobs.content
        assert "".join(t.token for t in tokens) == choice.message.content
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in tokens)
    spelled = sum(len(c.logprobs.content) for c in answer.choices)
    assert spelled <= answer.usage.completion_tokens <= spelled + 3  # + an end-of-text token per choice

    completion = client.completions.create(model=BASE_ID, prompt="The capital of France is", max_tokens=5,
                                           logprobs=2, temperature=0)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset[0] == 0 and all(len(top) == 2 for top in logprobs.top_logprobs)


def test_sampling_parameters_reach_the_engine(client):
    def ask(**kwargs):
        return client.chat.completions.create(model="support", **{"messages": CHAT, "max_tokens": 10, **kwargs})

    assert ask(temperature=1, seed=11).choices[0].message.content == ask(temperature=1, seed=11).choices[0].message.content
    forced = ask(temperature=0, max_tokens=4, logit_bias={PARIS: 100}).choices[0].message.content
    assert forced == " Paris" * 4
    greedy = ask(temperature=0, max_tokens=24).choices[0].message.content
    word = greedy.split()[2]
    stopped = ask(temperature=0, max_tokens=24, stop=[word]).choices[0]
    assert stopped.finish_reason == "stop" and word not in stopped.message.content
    assert greedy.startswith(stopped.message.content)
    capped = ask(temperature=0, max_completion_tokens=3)
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
    repeats = [{"role": "user", "content": "Say 'yes' ten times."}]
    plain = ask(temperature=0, messages=repeats, max_tokens=24).choices[0].message.content
    assert ask(temperature=0, messages=repeats, max_tokens=24, frequency_penalty=2).choices[0].message.content != plain
    assert ask(temperature=0, messages=repeats, max_tokens=24, presence_penalty=2).choices[0].message.content != plain


def test_structured_output_follows_a_nested_json_schema(client, server):
    """Every bound is in the schema (string lengths, array sizes, an integer range), so an answer
    always ends well inside max_tokens, greedy or sampled."""
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    messages = [{"role": "user", "content": "Invent a customer from Paris as JSON."}]
    for model, sampling in (("support", {"temperature": 0}), ("support", {"seed": 1}), (BASE_ID, {"seed": 2})):
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=400,
                                                response_format=response_format, **sampling)
        assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
        jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    chunks = _stream(server, "/chat/completions", {"model": BASE_ID, "messages": messages, "max_tokens": 400,
                                                   "seed": 3, "response_format": response_format})
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    jsonschema.validate(json.loads(streamed), PERSON)
    # Any JSON object: nothing bounds its strings, and a 135M model can ramble past any max_tokens. So:
    # whatever ended by itself is a JSON object (of twelve samples, some end; which ones depends on
    # the engine and its dtype).
    ended = [choice.message.content for seed in (1, 2, 3) for choice in client.chat.completions.create(
        model=BASE_ID, messages=messages, max_tokens=120, seed=seed, n=4,
        response_format={"type": "json_object"}).choices if choice.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)


def test_tool_call_round_trip(client, server, home):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    raw = client.chat.completions.with_raw_response.create(
        model="support", messages=messages, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
        max_tokens=120, temperature=0)
    answer = raw.parse()
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    call = choice.message.tool_calls[0]
    # The tool's result goes back in the next turn, after the assistant's call.
    follow_up = client.chat.completions.create(model="support", max_tokens=20, temperature=0, tools=[WEATHER, TIME],
                                               messages=[
        *messages, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}])
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")

    named = client.chat.completions.create(model="support", messages=messages, tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           parallel_tool_calls=False, max_tokens=120, temperature=0).choices[0]
    assert [c.function.name for c in named.message.tool_calls] == ["get_time"]
    auto = client.chat.completions.create(model="support", messages=messages, tools=[WEATHER], max_tokens=80,
                                          temperature=0)
    assert (auto.choices[0].finish_reason == "tool_calls") == bool(auto.choices[0].message.tool_calls)

    # Streamed as OpenAI streams calls: indexed pieces of tool_calls, then the finish reason.
    chunks = _stream(server, "/chat/completions", {"model": "support", "messages": messages, "tools": [WEATHER],
                                                   "tool_choice": "required", "parallel_tool_calls": False,
                                                   "max_tokens": 120, "seed": 4})
    pieces = [t for c in chunks if c["choices"] for t in c["choices"][0]["delta"].get("tool_calls") or []]
    assert pieces and pieces[0]["function"]["name"] == "get_weather" and pieces[0]["id"].startswith("call_")
    jsonschema.validate(json.loads("".join(p["function"]["arguments"] for p in pieces if p["index"] == 0)),
                        WEATHER["function"]["parameters"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"

    # Metered like any other request: its tokens count.
    registry = Registry(Settings(home=home))
    query = text("SELECT completion_tokens, status FROM meter_record WHERE request_id = :id")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with registry.engine.connect() as conn:
            row = conn.execute(query, {"id": raw.headers["x-request-id"]}).first()
        if row:
            break
        time.sleep(0.3)
    assert tuple(row) == (answer.usage.completion_tokens, 200)


def test_tool_calls_end_within_their_bounds_and_never_show_the_wrapper(client, server):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for model in ("support", BASE_ID):  # an adapter and the base
        named = client.chat.completions.create(  # parallel_tool_calls left at its default, true
            model=model, messages=messages, tools=[WEATHER, TIME], max_tokens=100, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_weather"]
        # One call, in compact JSON: {"tool_calls":[{"name":"get_weather","arguments":{"city":...,"unit":...}}]}
        assert named.usage.completion_tokens <= 40 and named.choices[0].finish_reason == "tool_calls"
    required = client.chat.completions.create(model="support", messages=messages, tools=[WEATHER, TIME],
                                              tool_choice="required", max_tokens=200, temperature=0).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in required.message.tool_calls]
    assert required.finish_reason == "tool_calls" and 1 <= len(calls) <= 4 and len(set(calls)) == len(calls)

    # Cut off before any call is whole: no content (never the gateway's own wrapper), finish_reason length.
    cut = client.chat.completions.create(model="support", messages=messages, tools=[WEATHER], tool_choice="required",
                                         max_tokens=5, temperature=0).choices[0]
    assert (cut.finish_reason, cut.message.content, cut.message.tool_calls) == ("length", None, None)
    chunks = _stream(server, "/chat/completions", {"model": "support", "messages": messages, "tools": [WEATHER],
                                                   "tool_choice": "required", "max_tokens": 5})
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    response = client.responses.create(model="support", input=messages[0]["content"], tool_choice="required",
                                       tools=[{"type": "function", **WEATHER["function"]}], max_output_tokens=5)
    assert (response.status, response.output) == ("incomplete", [])


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/completions", {"echo": True}, "echo"),
    ("/completions", {"best_of": 3}, "best_of"),
    ("/completions", {"suffix": "end"}, "suffix"),
    ("/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/chat/completions", {"functions": [WEATHER["function"]]}, "functions"),
    ("/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("/chat/completions", {"n": 99}, "n"),
    ("/chat/completions", {"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ("/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/chat/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/chat/completions", {"tool_choice": "required"}, "tool_choice"),
])
def test_what_cannot_be_honoured_is_refused_by_name(server, path, extra, param):
    body = {"model": BASE_ID, "max_tokens": 2, **({"prompt": "Hi"} if path == "/completions" else {"messages": CHAT})}
    error = _post(server, path, {**body, **extra}, 400).json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    # OpenAI's platform-only fields change nothing in what is generated: accepted.
    _post(server, path, {**body, "store": False, "metadata": {"team": "a"}, "service_tier": "auto"})
