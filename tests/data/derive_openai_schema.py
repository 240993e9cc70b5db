"""Derive ``openai_responses.schema.json`` (what the contract tests check responses against) from
OpenAI's published OpenAPI description: ``python derive_openai_schema.py path/to/openai-openapi/openapi.json COMMIT``.

Kept: the response objects of the endpoints the gateway serves, with every ``$ref`` inlined,
OpenAPI 3.0's ``nullable: true`` turned into JSON Schema's ``null`` type (so that the validator
honours it), and descriptions, examples and ``x-`` extensions dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESPONSES = {
    "chat.completion": "CreateChatCompletionResponse",
    "chat.completion.chunk": "CreateChatCompletionStreamResponse",
    "text_completion": "CreateCompletionResponse",  # streamed chunks have the same shape
    "model": "Model",
    "list": "ListModelsResponse",
    "error": "ErrorResponse",
}
_DROP = {"description", "example", "examples", "title", "deprecated", "discriminator", "format"}


def inline(node: object, schemas: dict) -> object:
    if isinstance(node, list):
        return [inline(item, schemas) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return inline(schemas[node["$ref"].rsplit("/", 1)[1]], schemas)
    out = {k: inline(v, schemas) for k, v in node.items()
           if k not in _DROP and not k.startswith("x-") and k != "nullable"}
    if node.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def main(spec_path: str, commit: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    schemas = spec["components"]["schemas"]
    derived = {
        "$comment": f"Derived by derive_openai_schema.py from openai/openai-openapi openapi.json at commit "
                    f"{commit}, info.version {spec['info']['version']}.",
        **{name: inline(schemas[source], schemas) for name, source in RESPONSES.items()},
    }
    out = Path(__file__).with_name("openai_responses.schema.json")
    out.write_text(json.dumps(derived, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
