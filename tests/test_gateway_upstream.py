"""Upstreams that are not ours: a model behind another OpenAI-compatible server, reached with
httpx or through litellm. The "hosted" server here is a second real gateway on llama.cpp."""

import json

import openai
import pytest

from loragate.gateway.backends.upstream import UpstreamBackend
from loragate.settings import Price, UpstreamSettings

from .conftest import BASE_ID
from .gateway_server import GatewayServer, dead_port

pytestmark = pytest.mark.model
pytest.importorskip("xllamacpp")
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    server = GatewayServer(tmp_path_factory.mktemp("hosted") / "home").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, hosted):
    dead = dead_port()
    upstreams = [
        {"name": "hosted", "base_url": f"{hosted.url}/v1", "model": BASE_ID, "client": "direct",
         "price": {"usd_per_million_tokens": 1000.0}},
        {"name": "hosted-litellm", "base_url": f"{hosted.url}/v1", "model": BASE_ID, "client": "litellm",
         "price": {"usd_per_million_tokens": 1000.0}},
        {"name": "gone", "base_url": f"http://127.0.0.1:{dead.getsockname()[1]}/v1", "model": "x"},
    ]
    server = GatewayServer(tmp_path_factory.mktemp("front") / "home",
                           LORAGATE_GATEWAY__UPSTREAMS=json.dumps(upstreams)).start()
    yield server
    server.stop()
    dead.close()


def _client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("name", ["hosted", "hosted-litellm"])
def test_upstream_answers_like_the_hosted_model(hosted, gateway, name):
    direct = _client(hosted).chat.completions.create(model=BASE_ID, messages=CHAT, max_tokens=10, temperature=0)
    raw = _client(gateway).chat.completions.with_raw_response.create(model=name, messages=CHAT, max_tokens=10,
                                                                     temperature=0)
    via = raw.parse()
    assert raw.headers["x-loragate-arm"] == "upstream" and raw.headers["x-loragate-backend"] == f"upstream:{name}"
    assert via.choices[0].message.content == direct.choices[0].message.content
    assert via.usage.completion_tokens == direct.usage.completion_tokens > 0
    streamed = _client(gateway).chat.completions.create(model=name, messages=CHAT, max_tokens=10, temperature=0,
                                                        stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens


def test_upstreams_are_listed_metered_and_priced(gateway):
    client = _client(gateway)
    assert {"hosted", "hosted-litellm", "gone", BASE_ID} <= {m.id for m in client.models.list().data}
    client.completions.create(model="hosted", prompt="Hello", max_tokens=3)
    import httpx

    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    line = next(m for m in metrics.splitlines()
                if m.startswith('loragate_cost_usd_total{adapter="-",arm="upstream",backend="upstream:hosted"'))
    assert float(line.rsplit(" ", 1)[1]) > 0  # $1000 per 1M tokens: visible even for a few tokens


def test_unreachable_upstream_is_a_503(gateway):
    with pytest.raises(openai.InternalServerError) as raised:
        _client(gateway).chat.completions.create(model="gone", messages=CHAT, max_tokens=3)
    assert raised.value.status_code == 503 and "unreachable" in raised.value.message


def test_cost_comes_from_litellm_price_table_when_no_price_is_set():
    priced = UpstreamBackend(UpstreamSettings(name="mini", base_url="http://x", model="gpt-4o-mini"), 10)
    # gpt-4o-mini in litellm's table: $0.15 per 1M prompt tokens, $0.60 per 1M completion tokens.
    assert priced.cost(1_000_000, 1_000_000, 1.0) == pytest.approx(0.75)
    unknown = UpstreamBackend(UpstreamSettings(name="u", base_url="http://x", model="not-a-listed-model"), 10)
    assert unknown.cost(1000, 1000, 1.0) == 0.0
    fixed = UpstreamBackend(UpstreamSettings(name="f", base_url="http://x", model="m",
                                             price=Price(usd_per_hour=3.6)), 10)
    assert fixed.cost(10, 10, busy_s=1.0) == pytest.approx(3.6 / 3600 / 64)
