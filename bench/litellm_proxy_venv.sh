#!/usr/bin/env bash
# A separate venv for LiteLLM's proxy (bench only). The `litellm[proxy]` extra asks for a
# `litellm-proxy` package PyPI does not serve, and pins rich<14 against ours, so we install
# litellm plus the modules its proxy imports at start-up (found by starting it until it ran).
set -euo pipefail
VENV=${1:-.bench/litellm-venv}
python -m venv "$VENV"
"$VENV/bin/pip" install -q litellm==1.110.2 websockets backoff orjson apscheduler fastapi uvicorn pyjwt \
  python-multipart cryptography pyyaml redis semver expression fastapi-sso mcp soundfile uvloop
echo "$VENV/bin/litellm"
