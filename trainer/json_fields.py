"""Scores for JSON answers by field, not by string: what a user of an extraction task cares about.

Both sides are parsed and flattened to (path, value) pairs: nested objects become dotted paths
(``address.city``), list items share their list's path with ``[]`` (so lists compare as
multisets), and values compare after normalising white space in strings and ``1.0`` to ``1``.
Then:

* record match: the pairs are equal (the same object, key order and spacing ignored);
* field precision, recall and F1 over all pairs of all answers (micro-averaged): an answer that
  does not parse contributes no pairs, so it costs recall;
* per-field accuracy: for each path of the references, the share of answers whose values there
  equal the reference's, so a user sees which fields fail;
* schema validity, when the data set declares a JSON schema for its answers: the share of
  answers that parse and validate against it.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

Pair = tuple[str, str]


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        value = " ".join(value.split())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, ensure_ascii=False)


def flatten(value: Any, path: str = "") -> list[Pair]:
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in flatten(item, f"{path}.{key}" if path else str(key))]
    if isinstance(value, list):
        return [pair for item in value for pair in flatten(item, f"{path}[]")]
    return [(path, _scalar(value))]


def pairs_of(text: str) -> Counter[Pair] | None:
    """The answer's (path, value) pairs, or None when it does not parse."""
    try:
        return Counter(flatten(json.loads(text)))
    except ValueError:
        return None


def field_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    matched = predicted = expected = records = 0
    for prediction, reference in zip(predictions, references, strict=True):
        ours, theirs = pairs_of(prediction) or Counter(), pairs_of(reference) or Counter()
        matched += sum((ours & theirs).values())
        predicted += sum(ours.values())
        expected += sum(theirs.values())
        records += ours == theirs
    precision = matched / predicted if predicted else 0.0
    recall = matched / expected if expected else 0.0
    return {
        "record_match": records / len(references) if references else 0.0,
        "field_precision": precision,
        "field_recall": recall,
        "field_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def field_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Path -> share of the answers (among those whose reference has the path) that get it right."""
    right: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for prediction, reference in zip(predictions, references, strict=True):
        ours, theirs = _by_path(pairs_of(prediction) or Counter()), _by_path(pairs_of(reference) or Counter())
        for path, values in theirs.items():
            seen[path] += 1
            right[path] += ours.get(path) == values
    return {path: right[path] / seen[path] for path in sorted(seen)}


def _by_path(pairs: Counter[Pair]) -> dict[str, Counter[str]]:
    grouped: dict[str, Counter[str]] = defaultdict(Counter)
    for (path, value), count in pairs.items():
        grouped[path][value] += count
    return dict(grouped)


def schema_problems(schema: dict[str, Any]) -> str | None:
    """Why ``schema`` is not a valid JSON schema (draft 2020-12), or None."""
    from jsonschema import Draft202012Validator, SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return None


def answer_problems(texts: Sequence[str], schema: dict[str, Any]) -> list[str | None]:
    """For each answer, why it does not parse or validate against ``schema``, or None (one
    validator for them all: building one compiles the schema)."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)

    def problem(text: str) -> str | None:
        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"not JSON ({exc})"
        error = next(iter(validator.iter_errors(value)), None)
        return None if error is None else f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"

    return [problem(text) for text in texts]


def schema_valid(predictions: Sequence[str], schema: dict[str, Any]) -> float:
    problems = answer_problems(predictions, schema)
    return sum(p is None for p in problems) / len(problems) if problems else 0.0
