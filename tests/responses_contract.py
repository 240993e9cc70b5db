"""The Responses API (``/v1/responses``), backend by backend, with the clients users run: the
``openai`` SDK's ``responses.create``, ``responses.stream``, ``responses.parse`` and
``previous_response_id``, retrieval, input items and deletion, function tools, and an OpenAI Agents
SDK agent. Every response, item list and stream event is checked against OpenAI's OpenAPI
description (tests/data/openai_responses.schema.json).

Not collected on its own: test_gateway.py (llama.cpp) and test_gateway_vllm.py (vLLM) import these
tests and run them with their own ``server``, ``client`` and ``home`` fixtures.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from .conftest import BASE_ID
from .openai_contract import conforms

__all__ = [
    "test_responses_create_retrieve_continue_and_delete",
    "test_responses_stream_events_in_openais_order",
    "test_responses_parse_fills_a_pydantic_model",
    "test_responses_function_tools_round_trip",
    "test_responses_refuse_what_is_not_served_by_name",
    "test_an_agents_sdk_agent_calls_its_tool_and_finishes",
]
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather now in a city", "strict": True,
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                          "properties": {"city": {"type": "string", "maxLength": 12}}}}
TIME = {"type": "function", "name": "get_time", "description": "The local time in a city", "strict": True,
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 12}}}}
QUESTION = "What is the capital of France?"


def _create(server, body: dict, status: int = 200) -> httpx.Response:
    response = httpx.post(f"{server.url}/v1/responses", json=body, timeout=300)
    assert response.status_code == status, response.text
    return response


def _events(server, body: dict) -> list[dict]:
    """A streamed response's events, each checked against the schema, with its SSE event name."""
    response = _create(server, {**body, "stream": True})
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(conforms(event, "response.stream_event"))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_responses_create_retrieve_continue_and_delete(client, server):
    raw = client.responses.with_raw_response.create(model="support", input=QUESTION, instructions="Answer briefly.",
                                                    max_output_tokens=12, temperature=0, metadata={"team": "a"})
    first = raw.parse()
    body = conforms(json.loads(raw.text), "response")
    assert raw.headers["x-loragate-version"] == "support@1" and first.id.startswith("resp_")
    assert first.status in ("completed", "incomplete") and first.output_text
    assert body["instructions"] == "Answer briefly." and body["metadata"] == {"team": "a"}
    assert first.usage.output_tokens <= 12 and first.usage.input_tokens > 0
    if first.status == "incomplete":
        assert first.incomplete_details.reason == "max_output_tokens"

    kept = httpx.get(f"{server.url}/v1/responses/{first.id}", timeout=30).json()
    assert conforms(kept, "response") == body  # as answered, from the database
    items = httpx.get(f"{server.url}/v1/responses/{first.id}/input_items", timeout=30).json()
    conforms(items, "response.item_list")
    assert [(i["role"], i["content"][0]["text"]) for i in items["data"]] == [("user", QUESTION)]
    assert client.responses.input_items.list(first.id).data[0].id == items["first_id"]

    # The next turn sees the first (its input and answer, not its instructions): more input tokens.
    second = client.responses.create(model="support", input="And of Germany?", previous_response_id=first.id,
                                     max_output_tokens=4, temperature=0)
    alone = client.responses.create(model="support", input="And of Germany?", max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens

    not_kept = client.responses.create(model="support", input=QUESTION, max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(not_kept.id)
    client.responses.delete(first.id)
    for path in (f"/v1/responses/{first.id}", f"/v1/responses/{first.id}/input_items"):
        gone = httpx.get(f"{server.url}{path}", timeout=30)
        assert gone.status_code == 404 and conforms(gone.json(), "error")["error"]["code"] == "not_found"
    orphan = _create(server, {"model": "support", "input": "Hi", "previous_response_id": first.id}, 404)
    assert orphan.json()["error"]["param"] == "previous_response_id"


def test_responses_stream_events_in_openais_order(client, server):
    events = _events(server, {"model": "support", "input": QUESTION, "max_output_tokens": 8, "temperature": 0})
    kinds = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    assert kinds[4 + len(deltas):-1] == ["response.output_text.done", "response.content_part.done",
                                        "response.output_item.done"]
    final = events[-1]["response"]
    assert kinds[-1] == f"response.{final['status']}" and 0 < final["usage"]["output_tokens"] <= 8
    text = "".join(d["delta"] for d in deltas)
    assert final["output"][0]["content"][0]["text"] == text == events[-2]["item"]["content"][0]["text"]

    # The SDK's own stream helper (it wants response.completed: a bounded JSON answer ends before the limit).
    with client.responses.stream(model="support", input=QUESTION, text_format=Capital, max_output_tokens=60,
                                 temperature=0) as stream:
        streamed = [event.type for event in stream]
        answer = stream.get_final_response()
    assert streamed[:4] == kinds[:4] and streamed[-4:] == kinds[-4:-1] + ["response.completed"]
    assert isinstance(answer.output_parsed, Capital) and set(streamed[4:-4]) == {"response.output_text.delta"}


class Capital(BaseModel):
    city: str = Field(max_length=12)
    country: str = Field(max_length=12)


def test_responses_parse_fills_a_pydantic_model(client):
    parsed = client.responses.parse(model="support", input=QUESTION, text_format=Capital, max_output_tokens=60,
                                    temperature=0)
    assert isinstance(parsed.output_parsed, Capital), parsed.output_text
    # Any JSON object: a random adapter may still be writing one when the tokens run out.
    loose = client.responses.create(model="support", input=QUESTION, text={"format": {"type": "json_object"}},
                                    max_output_tokens=40, temperature=0)
    assert loose.text.format.type == "json_object" and loose.output_text.startswith("{")
    assert loose.status == "incomplete" or isinstance(json.loads(loose.output_text), dict)


def test_responses_function_tools_round_trip(client, server):
    body = {"model": "support", "input": "What is the weather in Paris?", "tools": [WEATHER, TIME],
            "tool_choice": "required", "parallel_tool_calls": False, "max_output_tokens": 100, "temperature": 0}
    answer = conforms(_create(server, body).json(), "response")
    assert answer["status"] == "completed" and len(answer["output"]) == 1
    call = answer["output"][0]
    assert call["type"] == "function_call" and call["call_id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["parameters"])

    # The result goes back as a function_call_output item, continuing the stored conversation.
    follow_up = client.responses.create(model="support", previous_response_id=answer["id"], tools=[WEATHER, TIME],
                                        input=[{"type": "function_call_output", "call_id": call["call_id"],
                                                "output": "sunny, 21 C"}], max_output_tokens=30, temperature=0)
    assert follow_up.status in ("completed", "incomplete")
    # ... or stateless, the whole conversation sent again.
    stateless = client.responses.create(model="support", tools=[WEATHER], max_output_tokens=30, temperature=0, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call["call_id"], "name": call["name"], "arguments": call["arguments"]},
        {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny, 21 C"}])
    assert stateless.status in ("completed", "incomplete")

    named = client.responses.create(**{**body, "tool_choice": {"type": "function", "name": "get_time"}})
    assert [(o.type, o.name) for o in named.output] == [("function_call", "get_time")]

    events = _events(server, {**body, "tools": [WEATHER]})
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert events[-1]["response"]["output"][0]["arguments"] == events[4]["arguments"] == events[3]["delta"]


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"truncation": "auto"}, "truncation"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png"}]}]},
     "input"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "21 C"}]}, "input"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_responses_refuse_what_is_not_served_by_name(server, body, param):
    refused = _create(server, {"model": "support", "input": "Hi", **body}, 400).json()
    conforms(refused, "error")
    assert refused["error"]["param"] == param, refused


def test_an_agents_sdk_agent_calls_its_tool_and_finishes(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # traces would go to OpenAI's platform
    seen = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        seen.append(city)
        return f"sunny in {city}"

    model = agents.OpenAIResponsesModel(model=BASE_ID, openai_client=openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0))
    agent = agents.Agent(name="weather", instructions="Answer questions about the weather.", model=model,
                         tools=[get_weather], tool_use_behavior="stop_on_first_tool",
                         model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                             max_tokens=100, temperature=0))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    assert len(seen) == 1 and result.final_output == f"sunny in {seen[0]}"
