"""Derive ``openai_responses.schema.json`` (what the contract tests check responses against) from
OpenAI's published OpenAPI description: ``python derive_openai_schema.py path/to/openai-openapi/openapi.json COMMIT``.

Kept: the response objects of the endpoints the gateway serves, with every ``$ref`` inlined,
OpenAPI 3.0's ``nullable: true`` turned into JSON Schema's ``null`` type (so that the validator
honours it), and descriptions, examples and ``x-`` extensions dropped. The Responses API's objects
refer to a few hundred shared definitions (too many to inline): those entries are a ``$ref`` into
``$defs``, which holds every definition they reach, cleaned the same way.
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
RESPONSES_API = {
    "response": "Response",
    "response.stream_event": "ResponseStreamEvent",
    "response.item_list": "ResponseItemList",
}
_DROP = {"description", "example", "examples", "title", "deprecated", "discriminator", "format"}


def clean(node: object, schemas: dict | None) -> object:
    """Descriptions and extensions dropped, ``nullable`` as a ``null`` type (property names such as
    ``description`` kept); each ``$ref`` inlined when ``schemas`` is given, else pointed into ``$defs``."""
    if isinstance(node, list):
        return [clean(item, schemas) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        return clean(schemas[name], schemas) if schemas is not None else {"$ref": f"#/$defs/{name}"}
    out = {k: ({name: clean(p, schemas) for name, p in v.items()} if k == "properties" else clean(v, schemas))
           for k, v in node.items() if k not in _DROP and not k.startswith("x-") and k != "nullable"}
    if node.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def referenced(node: object, schemas: dict, into: dict) -> dict:
    """Every definition ``node`` reaches, cleaned, with its ``$ref``s pointing into ``$defs``."""
    if isinstance(node, list):
        for item in node:
            referenced(item, schemas, into)
    elif isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            if name not in into:
                into[name] = clean(schemas[name], None)  # before recursing: a cycle finds it here
                referenced(schemas[name], schemas, into)
        for value in node.values():
            referenced(value, schemas, into)
    return into


def main(spec_path: str, commit: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    schemas = spec["components"]["schemas"]
    derived = {
        "$comment": f"Derived by derive_openai_schema.py from openai/openai-openapi openapi.json at commit "
                    f"{commit}, info.version {spec['info']['version']}.",
        **{name: clean(schemas[source], schemas) for name, source in RESPONSES.items()},
        **{name: {"$ref": f"#/$defs/{source}"} for name, source in RESPONSES_API.items()},
        "$defs": referenced([{"$ref": f"#/components/schemas/{source}"} for source in RESPONSES_API.values()],
                            schemas, {}),
    }
    out = Path(__file__).with_name("openai_responses.schema.json")
    out.write_text(json.dumps(derived, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
