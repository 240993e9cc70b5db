"""Reading the JSONL formats users bring, and validating every line of it.

Three formats, detected from the first line that is a JSON object with known fields (or
named with ``--format``):

- ``prompt_completion``: ``{"prompt": str, "completion": str}``; trl's conversational form
  (``prompt``/``completion`` as message lists, what ``loragate data prepare`` writes) also reads.
- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
  the last message is the assistant's completion, the rest is the prompt.
- ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str}``; the prompt is
  one user message, the instruction then the input.

Extra fields are ignored. Blank lines are skipped. Every other line either gives an
``Example`` or a ``LineProblem`` with its 1-based line number and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from loragate.registry import InvalidInput

from .dataset import Example, Message

Format = Literal["prompt_completion", "messages", "alpaca"]
FORMATS: tuple[str, ...] = get_args(Format)
ROLES = ("system", "user", "assistant")
MAX_LISTED_PROBLEMS = 20


class LineError(ValueError):
    """Why one line is not a valid example; the message is shown to the user."""


@dataclass(frozen=True)
class LineProblem:
    line: int  # 1-based
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class SourceRow:
    line: int  # 1-based, so reports point into the user's file
    example: Example


@dataclass(frozen=True)
class SourceFile:
    path: Path
    format: Format
    rows: list[SourceRow]
    problems: list[LineProblem]


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _text(obj: dict, key: str, where: str = "", *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if key not in obj:
        raise LineError(f"missing field '{where}{key}'")
    if not isinstance(value, str):
        raise LineError(f"field '{where}{key}' must be a string, got {_type_name(value)}")
    if required and not value.strip():
        raise LineError(f"field '{where}{key}' is empty")
    return value


def _message_list(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise LineError(f"field {field!r} must be a list of messages, got {_type_name(value)}")
    if not value:
        raise LineError(f"field {field!r} is empty")
    messages = []
    for i, item in enumerate(value, 1):
        where = f"{field}[{i}]."
        if not isinstance(item, dict):
            raise LineError(f"{field}[{i}] must be an object with role and content, got {_type_name(item)}")
        role = item.get("role")
        if role not in ROLES:
            raise LineError(f"{field}[{i}] has unknown role {role!r} (expected system, user or assistant)")
        messages.append(Message(role=role, content=_text(item, "content", where)))
    if any(m.role == "system" for m in messages[1:]):
        raise LineError(f"field {field!r}: a system message may only come first")
    return messages


def _check_prompt_turns(prompt: list[Message], field: str) -> None:
    # The completion answers the user's last turn; a prompt ending elsewhere has no question.
    if prompt[-1].role != "user":
        raise LineError(f"field {field!r} must end with a user message before the completion")


def parse_prompt_completion(obj: dict) -> Example:
    if "prompt" in obj and isinstance(obj["prompt"], list):
        prompt = _message_list(obj["prompt"], "prompt")
        _check_prompt_turns(prompt, "prompt")
    else:
        prompt = [Message(role="user", content=_text(obj, "prompt"))]
    if "completion" in obj and isinstance(obj["completion"], list):
        answer = _message_list(obj["completion"], "completion")
        if answer[-1].role != "assistant":
            raise LineError("field 'completion' must end with an assistant message")
        return Example(prompt=prompt, completion=answer[-1].content)
    return Example(prompt=prompt, completion=_text(obj, "completion"))


def parse_messages(obj: dict) -> Example:
    if "messages" not in obj:
        raise LineError("missing field 'messages'")
    messages = _message_list(obj["messages"], "messages")
    if messages[-1].role != "assistant":
        raise LineError("messages must end with an assistant message (the completion)")
    if len(messages) < 2:
        raise LineError("messages need a user message before the assistant's answer")
    _check_prompt_turns(messages[:-1], "messages")
    return Example(prompt=messages[:-1], completion=messages[-1].content)


def parse_alpaca(obj: dict) -> Example:
    instruction = _text(obj, "instruction")
    extra = _text(obj, "input", required=False)  # Alpaca's input is often empty
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(prompt=[Message(role="user", content=user)], completion=_text(obj, "output"))


PARSERS: dict[str, Callable[[dict], Example]] = {
    "prompt_completion": parse_prompt_completion,
    "messages": parse_messages,
    "alpaca": parse_alpaca,
}


def detect_format(obj: dict) -> Format | None:
    """The format a line's fields say it is in, or None when it has none of the known fields."""
    if "messages" in obj:
        return "messages"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    return None


def check_format_name(name: str | None) -> Format | None:
    if name is not None and name not in FORMATS:
        raise InvalidInput(f"unknown format {name!r}; expected one of {', '.join(FORMATS)}")
    return name  # type: ignore[return-value]


def _json_lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed object or the LineError) for every non-blank line."""
    parsed: list[tuple[int, Any]] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                parsed.append((number, LineError("not UTF-8 text")))
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                parsed.append((number, LineError(f"bad JSON: {exc.msg} at column {exc.colno}")))
                continue
            if not isinstance(value, dict):
                value = LineError(f"expected a JSON object, got {_type_name(value)}")
            parsed.append((number, value))
    return parsed


def _parse_line(obj: Any, fmt: Format) -> Example:
    if isinstance(obj, LineError):
        raise obj
    found = detect_format(obj)
    if found is not None and found != fmt:
        raise LineError(f"mixed formats: this line is {found}, the file is {fmt}")
    return PARSERS[fmt](obj)


def read_source(path: Path, format: str | None = None) -> SourceFile:
    """Every line parsed: the valid examples and the problems. Never refuses a bad line."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"no such file: {path}")
    lines = _json_lines(path)
    fmt = check_format_name(format) or next(
        (found for _, obj in lines if isinstance(obj, dict) and (found := detect_format(obj))), None)
    if fmt is None:
        raise InvalidInput(f"{path}: cannot detect the format: no line has prompt/completion, messages "
                           "or instruction/output fields (or pass --format)")
    rows, problems = [], []
    for number, obj in lines:
        try:
            rows.append(SourceRow(number, _parse_line(obj, fmt)))
        except LineError as exc:
            problems.append(LineProblem(number, str(exc)))
    return SourceFile(path=path, format=fmt, rows=rows, problems=problems)


def load_source(path: Path, format: str | None = None, *, skip_invalid: bool = False) -> SourceFile:
    """``read_source``, refusing the file when any line is invalid unless ``skip_invalid``."""
    source = read_source(path, format)
    if source.problems and not skip_invalid:
        listed = "; ".join(str(p) for p in source.problems[:MAX_LISTED_PROBLEMS])
        more = len(source.problems) - MAX_LISTED_PROBLEMS
        raise InvalidInput(
            f"{source.path}: {len(source.problems)} invalid line(s) in {source.format} format "
            f"(fix them or pass --skip-invalid): {listed}" + (f"; and {more} more" if more > 0 else ""))
    if not source.rows:
        raise InvalidInput(f"{source.path}: no valid examples")
    return source
