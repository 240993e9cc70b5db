"""A minimal OpenAI-compatible upstream for overhead measurements: canned answers, no model.

Only for measuring what sits in front of it (loragate, LiteLLM); never as proof that a feature
works. Run: uvicorn bench.fast_upstream:app --port 9100
"""

import json
import time

ANSWER = "Paris is the capital of France."
USAGE = {"prompt_tokens": 14, "completion_tokens": 8, "total_tokens": 22}


def _completion(model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
        "usage": USAGE,
    }).encode()


def _stream(model: str) -> bytes:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ANSWER},
                                    "finish_reason": None}]},
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {**base, "choices": [], "usage": USAGE}]
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(body or b"{}")
    model = request.get("model", "echo")
    streaming = bool(request.get("stream"))
    payload = _stream(model) if streaming else _completion(model)
    kind = b"text/event-stream" if streaming else b"application/json"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
    await send({"type": "http.response.body", "body": payload})
