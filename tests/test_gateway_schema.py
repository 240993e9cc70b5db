"""schemathesis against the gateway's own OpenAPI schema: generated requests, valid and invalid,
must never get a 5xx. A second run narrows ``model`` to the served base so that generated
requests reach real generation rather than stopping at 404."""

import json
import os
import subprocess

import httpx
import pytest

from .conftest import BASE_ID
from .gateway_server import GatewayServer

pytestmark = pytest.mark.model
pytest.importorskip("xllamacpp")
pytest.importorskip("schemathesis")


def _schemathesis(schema: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["schemathesis", "run", schema, "--url", url, "--checks", "not_a_server_error", "--max-examples", "25",
         "--request-timeout", "60", "--exclude-path-regex", "^/admin/", "--seed", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"},
    )


def test_no_server_errors_for_generated_requests(tmp_path):
    # Tiny generations keep the run short; larger max_tokens are refused with a 400.
    gateway = GatewayServer(tmp_path / "home", LORAGATE_GATEWAY__MAX_TOKENS_LIMIT="4",
                            LORAGATE_GATEWAY__LLAMACPP__N_CTX="512").start()
    try:
        schema = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()
        raw = tmp_path / "openapi.json"
        raw.write_text(json.dumps(schema))
        for name in ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest"):
            schema["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": [BASE_ID]}
        narrowed = tmp_path / "openapi-served.json"
        narrowed.write_text(json.dumps(schema))
        runs = [_schemathesis(str(raw), gateway.url), _schemathesis(str(narrowed), gateway.url)]
        metered = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    finally:
        gateway.stop()
    for done in runs:
        assert done.returncode == 0, done.stdout[-4000:]
        assert "generated" in done.stdout and "Tested: 10" in done.stdout  # 6 chat-era operations, 4 of Responses
    # The narrowed run reached the engine: successful generations were served and metered.
    assert 'status="200"' in metered
